"""Task metrics of a model against a built zoo.

Encoder zoos: each task is scored with that task's own head on the mean-pooled features of
the model under test (the protocol of the papers' tables: merged backbone, per-task heads).
Normalised accuracy is accuracy / the task's fine-tuned expert's accuracy on the same split.
Causal-LM zoos: per-domain perplexity on held-out text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Sequence

import torch

from esm_ray.errors import InputError
from esm_ray.models.encoder import features, load_encoder, load_tokenizer, predict
from esm_ray.models.heads import load_head
from esm_ray.models.lm import load_lm, perplexity  # noqa: F401  (eval API)
from esm_ray.models.lm_items import bootstrap_interval, mean_interval
from esm_ray.zoo.layout import Zoo, open_zoo, read_jsonl

Heads = Literal["expert", "probe"]


def _as_zoo(zoo: str | Path | Zoo) -> Zoo:
    return zoo if isinstance(zoo, Zoo) else open_zoo(zoo)


def _tasks(zoo: Zoo, tasks: Sequence[str] | None) -> list[str]:
    names = list(tasks) if tasks else zoo.tasks
    for t in names:
        zoo.task(t)
    return names


def load_encoder_checked(model_dir: str | Path):
    """A float32 BertModel that must hold every encoder weight (models.encoder.load_encoder)."""
    return load_encoder(model_dir, torch.float32, strict=True)


def _tokenizer_for(model_dir: Path, zoo: Zoo):
    has = any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    return load_tokenizer(model_dir if has else zoo.base_dir)


def expert_reference(zoo: Zoo, task: str, split: str) -> float:
    """The fine-tuned expert's recorded accuracy on a split (the normalisation constant)."""
    m = zoo.task(task)["metrics"]["expert"]
    if split not in m:
        raise InputError(f"{zoo.root}: no recorded expert accuracy of {task} on split {split!r}")
    return float(m[split])


@torch.no_grad()
def task_hits(model, tokenizer, zoo: Zoo, task: str, split: str = "test", heads: Heads = "expert",
              batch_size: int = 64, max_length: int = 64) -> list[int]:
    """1 or 0 for each of the task's rows on a split: whether the task's head (or its probe)
    on the model's features predicts the row's label."""
    rows = zoo.rows(task, split)
    head = load_head(zoo.head_path(task) if heads == "expert" else zoo.probe_path(task))
    pred = predict(model, tokenizer, head, [r["text"] for r in rows], batch_size, max_length)
    return [int(h) for h in (pred == torch.tensor([int(r["label"]) for r in rows])).tolist()]


@torch.no_grad()
def evaluate_model(model, tokenizer, zoo: str | Path | Zoo, split: str = "test", tasks: Sequence[str] | None = None,
                   heads: Heads = "expert", batch_size: int = 64) -> dict:
    """Accuracy of an in-memory encoder on each task with that task's head (or its probe), each
    with a 95% bootstrap interval over the task's items, and the average's interval (every task
    resampled on its own)."""
    zoo = _as_zoo(zoo)
    if zoo.kind != "encoder":
        raise InputError(f"{zoo.root}: a {zoo.kind} zoo has no classification tasks; use evaluate_lm")
    max_length = int(zoo.manifest.get("max_length", 64))
    out: dict[str, dict] = {}
    items: list[list[dict]] = []
    for t in _tasks(zoo, tasks):
        hits = [{"correct": h} for h in task_hits(model, tokenizer, zoo, t, split, heads, batch_size, max_length)]
        items.append(hits)
        correct = sum(h["correct"] for h in hits)
        acc = correct / max(len(hits), 1)
        ref = expert_reference(zoo, t, split)
        out[t] = {"accuracy": acc, "correct": correct, "n": len(hits), "expert_accuracy": ref,
                  "normalized": acc / ref if ref > 0 else float("nan"),
                  "interval": list(bootstrap_interval(hits, "accuracy"))}
    average = {**_averages(out), "interval": list(mean_interval(items, "accuracy"))}
    return {"split": split, "heads": heads, "tasks": out, "average": average}


@torch.no_grad()
def mean_entropy(model, tokenizer, zoo: str | Path | Zoo, tasks: Sequence[str] | None = None,
                 batch_size: int = 64) -> dict:
    """Label-free score: each task's head's mean prediction entropy (nats) on that task's
    unlabelled calibration rows (calib.jsonl), and the mean over tasks (AdaMerging's surrogate)."""
    zoo = _as_zoo(zoo)
    max_length = int(zoo.manifest.get("max_length", 64))
    out: dict[str, float] = {}
    for t in _tasks(zoo, tasks):
        texts = [r["text"] for r in read_jsonl(zoo.calib_path(t))]
        head = load_head(zoo.head_path(t))
        logp = torch.log_softmax(head(features(model, tokenizer, texts, batch_size, max_length)), -1)
        out[t] = float(-(logp.exp() * logp).sum(-1).mean())
    return {"tasks": out, "average": sum(out.values()) / max(len(out), 1)}


def _averages(per_task: dict[str, dict]) -> dict:
    vals = list(per_task.values())
    if not vals:
        return {"accuracy": float("nan"), "normalized": float("nan")}
    return {"accuracy": sum(v["accuracy"] for v in vals) / len(vals),
            "normalized": sum(v["normalized"] for v in vals) / len(vals)}


def evaluate_encoder(model_dir: str | Path, zoo_dir: str | Path | Zoo, split: str = "test",
                     tasks: Sequence[str] | None = None, heads: Heads = "expert") -> dict:
    """Per-task accuracy, normalised accuracy (model / expert) and their averages.

    model_dir: a local HF directory of a BertModel (a merged model, an expert, the base).
    Returns {"model", "split", "heads", "tasks": {task: {accuracy, correct, n, expert_accuracy,
    normalized}}, "average": {accuracy, normalized}}.
    """
    zoo = _as_zoo(zoo_dir)
    p = Path(model_dir)
    res = evaluate_model(load_encoder_checked(p), _tokenizer_for(p, zoo), zoo, split, tasks, heads)
    return {"model": str(p), **res}


def evaluate_probe(zoo_dir: str | Path | Zoo, split: str = "test", tasks: Sequence[str] | None = None) -> dict:
    """The "pretrained" row: the base encoder with each task's linear-probe head."""
    zoo = _as_zoo(zoo_dir)
    return evaluate_encoder(zoo.base_dir, zoo, split, tasks, heads="probe")


def expert_results(zoo_dir: str | Path | Zoo, split: str = "test", tasks: Sequence[str] | None = None) -> dict:
    """The "experts" row from the zoo's records: each expert on its own task (normalised 1.0)."""
    zoo = _as_zoo(zoo_dir)
    out = {}
    for t in _tasks(zoo, tasks):
        if zoo.kind == "encoder":
            ref = expert_reference(zoo, t, split)
            n = zoo.task(t)["sizes"][split]
            out[t] = {"accuracy": ref, "correct": round(ref * n), "n": n, "expert_accuracy": ref, "normalized": 1.0}
    return {"model": "experts", "split": split, "heads": "expert", "tasks": out, "average": _averages(out)}


# ---------------------------------------------------------------- causal LM


def lm_tokenizer(model_dir: Path, zoo: Zoo):
    from transformers import AutoTokenizer

    src = model_dir if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file() \
        else zoo.base_dir
    tok = AutoTokenizer.from_pretrained(str(src))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def evaluate_lm_model(model, tokenizer, zoo: str | Path | Zoo, split: str = "test",
                      domains: Sequence[str] | None = None) -> dict:
    zoo = _as_zoo(zoo)
    if zoo.kind != "causal_lm":
        raise InputError(f"{zoo.root}: an {zoo.kind} zoo has no LM domains; use evaluate_encoder")
    max_length = int(zoo.manifest.get("max_length", 128))
    out = {}
    for d in _tasks(zoo, domains):
        texts = [r["text"] for r in zoo.rows(d, split)]
        res = perplexity(model, tokenizer, texts, max_length)
        rec = zoo.task(d).get("metrics", {})
        ref = rec.get("expert", {}).get(split)
        out[d] = {**res, "expert_perplexity": ref, "base_perplexity": rec.get("base", {}).get(split),
                  "ratio_to_expert": res["perplexity"] / ref if ref else None}
    vals = [v["perplexity"] for v in out.values()]
    avg = {"perplexity": sum(vals) / len(vals) if vals else float("nan"),
           "log_perplexity": sum(math.log(v) for v in vals) / len(vals) if vals else float("nan")}
    return {"split": split, "domains": out, "average": avg}


def evaluate_lm(model_dir: str | Path, zoo_dir: str | Path | Zoo, split: str = "test",
                domains: Sequence[str] | None = None) -> dict:
    """Per-domain perplexity of a causal LM on the zoo's held-out text (lower is better)."""
    zoo = _as_zoo(zoo_dir)
    p = Path(model_dir)
    res = evaluate_lm_model(load_lm(p), lm_tokenizer(p, zoo), zoo, split, domains)
    return {"model": str(p), **res}
