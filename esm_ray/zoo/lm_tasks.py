"""The LM zoo's columns as lm-evaluation-harness task files (YAML), written with the zoo so that
any merged model can be scored with the tool users already have (see esm_ray/eval/harness.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml

from esm_ray.zoo.layout import Zoo

TASK_PREFIX = "esmlm_"  # lm-eval task names: esmlm_<column>


def column_kind(zoo: Zoo, name: str) -> str:
    """"perplexity" for a domain, "accuracy" for a label task."""
    return "accuracy" if zoo.task(name).get("kind") == "label_task" else "perplexity"


def task_config(zoo: Zoo, name: str, split: str) -> dict:
    data = str(zoo.data_path(name, split).resolve())
    cfg: dict = {"task": TASK_PREFIX + name, "dataset_path": "json",
                 "dataset_kwargs": {"data_files": {"test": data}}, "test_split": "test",
                 "metadata": {"version": 1, "zoo": zoo.manifest.get("hash"), "split": split}}
    if column_kind(zoo, name) == "accuracy":
        cfg.update({"output_type": "multiple_choice", "doc_to_text": "prompt", "doc_to_target": "label",
                    "doc_to_choice": list(zoo.task(name)["choices"]),
                    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
    else:
        cfg.update({"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
                    "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in
                                    (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                                     ("bits_per_byte", "bits_per_byte"))]})
    return cfg


def write_harness_tasks(zoo: Zoo, split: str = "test", names: Sequence[str] | None = None) -> Path:
    """Write (or rewrite: paths follow the zoo if it moved) the lm-eval task YAMLs of a split."""
    d = zoo.root / "lm_eval" / split
    d.mkdir(parents=True, exist_ok=True)
    for n in names or zoo.tasks:
        text = yaml.safe_dump(task_config(zoo, n, split), sort_keys=False, allow_unicode=True)
        p = d / f"{n}.yaml"
        if not p.is_file() or p.read_text() != text:
            p.write_text(text)
    return d
