"""Scoring an LM zoo's domains and label tasks with lm-evaluation-harness, offline.

`write_harness_tasks(zoo, split)` writes one lm-eval task per column under
`<zoo>/lm_eval/<split>/` (YAML next to nothing else: the data are the zoo's own JSONL files,
named by absolute path through the `json` dataset builder, so no hub is needed):

- a domain: `output_type: loglikelihood_rolling`, target = the passage; metrics word and byte
  perplexity and bits per byte;
- a label task: `output_type: multiple_choice`, context = the prompt, choices = the answer
  words (lm-eval puts one space before each), target = the label index; metric `acc`.

`harness_items(model_dir, zoo, split)` runs `lm_eval.simple_evaluate` with the local HF model
on the CPU, `log_samples=True`, and returns per-item records in the form of
`esm_ray.eval.lm_items` ({"ll", "words", "bytes"} or {"lls", "label", "correct"}), so the
report's scores and bootstrap intervals come from lm-eval's own per-item numbers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import yaml

from esm_ray.errors import InputError
from esm_ray.zoo.layout import Zoo

log = logging.getLogger("esm_ray.eval")
TASK_PREFIX = "esmlm_"
HF_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


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


def task_manager(task_dir: Path):
    from lm_eval.tasks import TaskManager

    try:
        return TaskManager(include_path=str(task_dir), include_defaults=False)
    except TypeError:  # older lm-eval without include_defaults
        return TaskManager(include_path=str(task_dir))


def _has_tokenizer(p: Path) -> bool:
    return any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _items(kind: str, samples: list[dict]) -> list[dict]:
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        if kind == "perplexity":
            ll, words = s["word_perplexity"]
            _, nbytes = s["byte_perplexity"]
            out.append({"ll": float(ll), "words": int(words), "bytes": int(nbytes)})
        else:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            out.append({"lls": lls, "label": int(s["target"]), "correct": float(s["acc"])})
    return out


def harness_items(model_dir: str | Path, zoo: Zoo, split: str = "test", names: Sequence[str] | None = None,
                  batch_size: int = 8) -> dict[str, list[dict]]:
    """{column: per-item records} from lm-eval's `simple_evaluate` on a local model, offline."""
    for k, v in HF_OFFLINE.items():
        os.environ.setdefault(k, v)
    try:
        from lm_eval import simple_evaluate
    except ImportError as err:
        raise InputError(f"lm-evaluation-harness is not installed ({err}); install the `lm` extra: "
                         "pip install 'esm-ray[lm]'") from None
    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise InputError(f"{p}: not a Hugging Face model directory (no config.json)")
    cols = list(names or zoo.tasks)
    tm = task_manager(write_harness_tasks(zoo, split, cols))
    args = {"pretrained": str(p.resolve()), "dtype": "float32",
            "tokenizer": str((p if _has_tokenizer(p) else zoo.base_dir).resolve())}
    res = simple_evaluate(model="hf", model_args=args, tasks=[TASK_PREFIX + c for c in cols], task_manager=tm,
                          batch_size=batch_size, device="cpu", log_samples=True, bootstrap_iters=0,
                          random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    if res is None or "samples" not in res:
        raise InputError(f"{p}: lm-eval returned no per-item samples")
    out = {}
    for c in cols:
        samples = res["samples"].get(TASK_PREFIX + c)
        if not samples:
            raise InputError(f"{p}: lm-eval gave no samples for task {TASK_PREFIX + c}")
        out[c] = _items(column_kind(zoo, c), samples)
    return out
