"""Report rows of an LM zoo (`esm_ray.zoo.lm_zoo`): domains by word perplexity, label tasks by
accuracy, each cell with a 95% bootstrap interval over the split's items.

Normalised score per column (expert = 1): for a domain, the share of the expert's gain over
the base kept in log space, log(ppl_base / ppl_model) / log(ppl_base / ppl_expert); for a label
task, accuracy / the expert's accuracy. The base and expert rows come from the per-item scores
recorded at build time (same conventions as lm-eval); a model under test is scored by lm-eval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from esm_ray.errors import InputError
from esm_ray.models.lm_items import bootstrap_interval, score
from esm_ray.eval.report import Row
from esm_ray.zoo.layout import Zoo


def is_harness_zoo(zoo: Zoo) -> bool:
    """An LM zoo built by `esm-ray zoo lm` (per-item scores and lm-eval task files)."""
    return zoo.kind == "causal_lm" and "base_scores" in zoo.manifest


def units(zoo: Zoo, names: Sequence[str]) -> dict[str, str]:
    from esm_ray.eval.harness import column_kind

    return {n: column_kind(zoo, n) for n in names}


def normalized(zoo: Zoo, name: str, value: float, split: str) -> float | None:
    from esm_ray.eval.harness import column_kind

    m = zoo.task(name)["metrics"]
    base, expert = m["base"].get(split), m["expert"].get(split)
    if base is None or expert is None:
        return None
    if column_kind(zoo, name) == "accuracy":
        return value / expert if expert > 0 else None
    gain = math.log(base / expert)
    return math.log(base / value) / gain if abs(gain) > 1e-12 else None


def normalized_resamples(zoo: Zoo, items: dict[str, list[dict]], split: str, iters: int = 1000, seed: int = 0,
                         refs: dict[str, tuple[float, float]] | None = None):
    """The mean normalised score over columns for `iters` bootstrap resamples (numpy array): each
    column's items resampled with replacement on their own. The indices depend only on the seed,
    the column order and the item counts, so two models scored on the same items get paired
    resamples (the difference of their arrays is the paired bootstrap of the difference).
    refs: {column: (base score, expert score)} to normalise by (default: the zoo's recorded
    scores of the whole split)."""
    import numpy as np

    from esm_ray.models.lm_items import _resampled

    kinds = units(zoo, list(items))
    total = np.zeros(iters)
    for i, (c, it) in enumerate(items.items()):
        rng = np.random.default_rng([seed, i, len(it)])
        vals = _resampled(it, kinds[c], rng.integers(0, len(it), size=(iters, len(it))))
        if refs is not None:
            base, expert = refs[c]
        else:
            m = zoo.task(c)["metrics"]
            base, expert = m["base"][split], m["expert"][split]
        if kinds[c] == "accuracy":
            total += vals / expert
        else:
            total += np.log(base / vals) / math.log(base / expert)
    return total / len(items)


def interval(samples, level: float = 0.95) -> list[float]:
    import numpy as np

    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def row_from_items(zoo: Zoo, name: str, items: dict[str, list[dict]], split: str, kind: str = "model",
                   info: dict | None = None) -> Row:
    """A Row (value, normalised value, interval per column) from per-item records."""
    kinds = units(zoo, list(items))
    vals, norm, ivals = {}, {}, {}
    for c, it in items.items():
        if not it:
            raise InputError(f"{zoo.root}: no {split} items for {c}")
        vals[c] = score(it, kinds[c])
        ivals[c] = list(bootstrap_interval(it, kinds[c]))
        n = normalized(zoo, c, vals[c], split)
        if n is not None:
            norm[c] = n
    extra = {"n_items": {c: len(it) for c, it in items.items()}}
    if len(norm) == len(items):
        extra["normalized_interval"] = interval(normalized_resamples(zoo, items, split))
    return Row(name, vals, norm, kind, {**(info or {}), **extra}, ivals)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: recorded scores missing from the zoo")
    return json.loads(path.read_text())


def lm_baseline_rows(zoo: Zoo, split: str = "test", names: Sequence[str] | None = None) -> list[Row]:
    """"pretrained" (the base on every column) and "experts (own column)" rows with intervals."""
    cols = list(names or zoo.tasks)
    base = _load(zoo.path(zoo.manifest["base_scores"]))
    if split not in base:
        raise InputError(f"{zoo.root}: no recorded base scores on split {split!r} (recorded: {', '.join(base)})")
    own = {c: _load(zoo.path(zoo.task(c)["scores"])).get(split, {}).get(c) for c in cols}
    missing = [c for c, v in own.items() if v is None]
    if missing:
        raise InputError(f"{zoo.root}: no recorded {split} scores of the experts {missing}")
    return [row_from_items(zoo, "pretrained", {c: base[split][c] for c in cols}, split, "probe"),
            row_from_items(zoo, "experts (own column)", own, split, "experts")]


def evaluate_lm_harness(model_dir: str | Path, zoo: Zoo, split: str = "test", names: Sequence[str] | None = None,
                        batch_size: int = 8, loaded=None) -> dict:
    """Score a model on the zoo's columns with lm-eval; {"model", "split", "items": {column: records}}.
    `loaded` = (model, tokenizer): a model in memory (see `harness_items`)."""
    from esm_ray.eval.harness import harness_items

    return {"model": str(model_dir), "split": split,
            "items": harness_items(model_dir, zoo, split, list(names or zoo.tasks), batch_size, loaded)}
