"""Scoring an LM zoo's domains and label tasks with lm-evaluation-harness, offline.

`write_harness_tasks(zoo, split)` (esm_ray/zoo/lm_tasks.py) writes one lm-eval task per column under
`<zoo>/lm_eval/<split>/` (YAML next to nothing else: the data are the zoo's own JSONL files,
named by absolute path through the `json` dataset builder, so no hub is needed):

- a domain: `output_type: loglikelihood_rolling`, target = the passage; metrics word and byte
  perplexity and bits per byte;
- a label task: `output_type: multiple_choice`, context = the prompt, choices = the answer
  words (lm-eval puts one space before each), target = the label index; metric `acc`.

`harness_items(model_dir, zoo, split)` runs `lm_eval.simple_evaluate` with the local HF model
on the CPU, `log_samples=True`, and returns per-item records in the form of
`esm_ray.models.lm_items` ({"ll", "words", "bytes"} or {"lls", "label", "correct"}), so the
report's scores and bootstrap intervals come from lm-eval's own per-item numbers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from esm_ray.errors import InputError
from esm_ray.zoo.layout import Zoo
from esm_ray.zoo.lm_tasks import TASK_PREFIX, column_kind, write_harness_tasks  # noqa: F401  (eval API)

log = logging.getLogger("esm_ray.eval")
HF_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


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
                  batch_size: int = 8, loaded=None) -> dict[str, list[dict]]:
    """{column: per-item records} from lm-eval's `simple_evaluate` on a local model, offline.

    `loaded` = (model, tokenizer) scores a model already in memory (e.g. rescaled on validation
    by `esm_ray.eval.lm_select`) through lm-eval's HFLM; model_dir then only names it."""
    for k, v in HF_OFFLINE.items():
        os.environ.setdefault(k, v)
    try:
        from lm_eval import simple_evaluate
    except ImportError as err:
        raise InputError(f"lm-evaluation-harness is not installed ({err}); install the `lm` extra: "
                         "pip install 'esm-ray[lm]'") from None
    p = Path(model_dir)
    cols = list(names or zoo.tasks)
    tm = task_manager(write_harness_tasks(zoo, split, cols))
    if loaded is not None:
        from lm_eval.models.huggingface import HFLM

        model: object = HFLM(pretrained=loaded[0], tokenizer=loaded[1], batch_size=batch_size)
        args: dict | None = None
    else:
        adapter = (p / "adapter_config.json").is_file()  # a PEFT adapter (a LoRA zoo's expert): on the zoo's base
        if not adapter and not (p / "config.json").is_file():
            raise InputError(f"{p}: not a Hugging Face model directory (no config.json) nor a PEFT adapter "
                             "(no adapter_config.json)")
        model = "hf"
        args = {"pretrained": str((zoo.base_dir if adapter else p).resolve()), "dtype": "float32",
                "tokenizer": str((p if _has_tokenizer(p) else zoo.base_dir).resolve())}
        if adapter:
            args["peft"] = str(p.resolve())
    res = simple_evaluate(model=model, model_args=args, tasks=[TASK_PREFIX + c for c in cols], task_manager=tm,
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
