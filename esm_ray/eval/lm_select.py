"""Choosing a merge's scale on an LM zoo's validation splits: task arithmetic's λ, ESM's α.

A merge that is linear in its scale f (task arithmetic: W = W₀ + λ Σ τ; ESM: α scales the
update of its `alpha_keys`) is made once at f₀ and rescaled in memory:
W(f) = W₀ + (f / f₀)(W_merged − W₀) on the scaled keys, rounded to the stored dtype of the
merged file (so the chosen model is the one a merge at f would write, up to that rounding).

The objective is the mean normalised score over the zoo's columns on their validation splits
(`esm_ray.eval.lm_report.normalized`: the share of the expert's log-perplexity gain kept, or
accuracy / the expert's), scored in process by `esm_ray.models.lm_items`, which follows
lm-eval's conventions (the test that compares them is tests/integration/test_lm_zoo.py). Test
splits are never read here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from esm_ray.errors import InputError
from esm_ray.eval.lm_report import normalized
from esm_ray.eval.scaled import ScaledUpdate
from esm_ray.models.lm_items import choice_items, rolling_items, score
from esm_ray.zoo.layout import Zoo

log = logging.getLogger("esm_ray.eval")


class ScaledLM(ScaledUpdate):
    """A merged causal LM whose update on `keys` (None: every floating tensor) can be rescaled
    in place (`ScaledUpdate`)."""

    def __init__(self, base_dir: str | Path, merged_dir: str | Path, keys: Sequence[str] | None = None):
        from esm_ray.models.lm import load_lm

        super().__init__(load_lm(Path(merged_dir)), base_dir, merged_dir, keys)


def column_items(model, tokenizer, zoo: Zoo, column: str, split: str, max_items: int | None = None,
                 stride: int = 1) -> list[dict]:
    """Per-item records of a model on one column's split (`esm_ray.models.lm_items`, lm-eval's
    conventions): {"ll", "tokens", "words", "bytes"} per passage, or {"lls", "label", "correct"}.
    Only every `stride`-th item, or with max_items every ⌈n / max_items⌉-th item (a strided
    subset: every block of the split represented)."""
    from esm_ray.eval.harness import column_kind
    from esm_ray.zoo.lm_data import get_label_task

    rows = zoo.rows(column, split)
    if max_items is not None and len(rows) > max_items:
        stride = max(stride, -(-len(rows) // max_items))
    rows = rows[::stride]
    if column_kind(zoo, column) == "perplexity":
        return rolling_items(model, tokenizer, [r["text"] for r in rows])
    return choice_items(model, tokenizer, [r["prompt"] for r in rows], get_label_task(column).choices,
                        [r["label"] for r in rows])


def validation_score(model, tokenizer, zoo: Zoo, names: Sequence[str] | None = None, split: str = "validation",
                     max_items: int | None = None) -> tuple[float, dict[str, float]]:
    """(mean normalised score, {column: normalised score}) of a model on the zoo's `split`
    (on a strided subset of at most `max_items` items per column if given; the reference
    scores it is normalised by are those of the whole split)."""
    from esm_ray.eval.harness import column_kind

    per = {}
    for c in names or zoo.tasks:
        items = column_items(model, tokenizer, zoo, c, split, max_items)
        n = normalized(zoo, c, score(items, column_kind(zoo, c)), split)
        if n is None:
            raise InputError(f"{zoo.root}: column {c} has no recorded base/expert {split} score to normalise by")
        per[c] = n
    return sum(per.values()) / len(per), per


def select_scale(scaled: ScaledLM, factor0: float, zoo: Zoo, tokenizer, names: Sequence[str] | None = None,
                 grid: Sequence[float] | None = None, lo: float = 0.0, hi: float = 2.0, tol: float = 0.05,
                 max_iter: int = 6, what: str = "scale", max_items: int | None = None) -> dict:
    """Choose the scale f on validation: on `grid` if given, else by golden-section search on
    [lo, hi] (max_items: score a strided subset of each validation split, for a cheaper search).
    Leaves `scaled.model` at the chosen scale; returns {"value", "validation", "history"}."""
    from esm_ray.eval.sweep import golden_section_max

    if factor0 == 0:
        raise InputError(f"choosing {what} needs a merge made with a non-zero {what}")

    def val(f: float) -> float:
        scaled.set_factor(f / factor0)
        v, _ = validation_score(scaled.model, tokenizer, zoo, names, max_items=max_items)
        log.info("%s %.3f: mean normalised validation score %.4f", what, f, v)
        return v

    if grid is not None:
        history = [(float(f), val(f)) for f in grid]
        best, best_val = max(history, key=lambda h: h[1])
    else:
        best, best_val, history = golden_section_max(val, lo, hi, tol, max_iter)
    scaled.set_factor(best / factor0)
    return {"value": best, "validation": best_val, "history": [list(h) for h in history]}
