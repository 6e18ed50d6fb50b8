"""Sweeps: merge each spec, evaluate, and build one table; validation-selected scales.

Scale selection follows the papers: a coefficient is chosen on the labelled validation splits
and the test numbers are computed once, at the chosen value.

- ESM α: the merge report lists the keys α scaled (`method_report.alpha_keys`) and α0, the α
  of the merge. For those keys only, W(α) = W0 + (α/α0)(W(α0) − W0); other keys stay as
  merged. Golden-section search on [0, 2] (tol 0.05, at most 8 iterations) maximises the
  mean validation accuracy; the best point evaluated wins.
- Task arithmetic λ: the merge is linear in λ, so W(λ) = W0 + (λ/λ0)(W(λ0) − W0) on every
  floating-point key; λ is picked from a grid on validation.

Merges are not run here: callers inject `merge_fn(spec) -> output directory`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

from esm_ray.errors import InputError
from esm_ray.eval.metrics import (evaluate_encoder, evaluate_lm, evaluate_model, evaluate_probe, expert_results,
                                  load_encoder_checked, lm_tokenizer, mean_entropy, _tokenizer_for)
from esm_ray.eval.report import ReportTable, Row, row_from_result
from esm_ray.eval.scaled import ScaledUpdate
from esm_ray.spec import MergeSpec, load_spec
from esm_ray.zoo.layout import Zoo, open_zoo
from esm_ray.zoo.specs import spec_label

log = logging.getLogger("esm_ray.eval")

GOLDEN = (math.sqrt(5) - 1) / 2
LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))
LAMBDA_METHODS = ("task_arithmetic",)
REPORT_FILE = "merge_report.json"


class ScaledModel(ScaledUpdate):
    """A merged encoder whose update on chosen keys can be rescaled in place (`ScaledUpdate`)."""

    def __init__(self, base_dir: str | Path, merged_dir: str | Path, keys: Sequence[str] | None):
        super().__init__(load_encoder_checked(merged_dir), base_dir, merged_dir, keys)


def _mean_acc(res: dict) -> float:
    return float(res["average"]["accuracy"])


def golden_section_max(f: Callable[[float], float], lo: float, hi: float, tol: float = 0.01,
                       max_iter: int = 15) -> tuple[float, float, list[tuple[float, float]]]:
    """Maximise f on [lo, hi] by golden-section search; return (best x, best f, all (x, f)).

    The best point among all evaluated points is returned (accuracy is piecewise constant,
    so the final bracket's midpoint is not necessarily better).
    """
    cache: dict[float, float] = {}

    def g(x: float) -> float:
        x = round(x, 6)
        if x not in cache:
            cache[x] = f(x)
        return cache[x]

    a, b = lo, hi
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = g(c), g(d)
    it = 0
    while b - a > tol and it < max_iter:
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = g(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = g(d)
        it += 1
    history = sorted(cache.items())
    best_x, best_f = max(history, key=lambda p: (p[1], -abs(p[0] - (lo + hi) / 2)))
    return best_x, best_f, history


def _report(merged_dir: Path) -> dict:
    p = merged_dir / REPORT_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def search_alpha(base_dir: str | Path, merged_dir: str | Path, alpha_keys: Sequence[str] | None, alpha0: float | None,
                 zoo_dir: str | Path | Zoo, tasks: Sequence[str] | None = None, lo: float = 0.0, hi: float = 2.0,
                 tol: float = 0.05, max_iter: int = 8, evaluate_test: bool = True,
                 objective: str = "validation") -> dict:
    """Golden-section search of ESM's α; test accuracy once at the chosen α.

    objective 'validation': mean accuracy on the labelled validation splits (the papers');
    'entropy': minus the heads' mean prediction entropy on each task's unlabelled calibration
    rows (label-free, AdaMerging's surrogate). alpha_keys / alpha0 default to
    `method_report.alpha_keys` / `.alpha` of the merge report in merged_dir.
    Returns {"alpha", "objective", "validation" (the best objective value), "history": [[α, value], ...], "test"}.
    """
    if objective not in ("validation", "entropy"):
        raise InputError(f"objective must be 'validation' or 'entropy', got {objective!r}")
    zoo = zoo_dir if isinstance(zoo_dir, Zoo) else open_zoo(zoo_dir)
    merged_dir = Path(merged_dir)
    rep = _report(merged_dir).get("method_report", {})
    keys = list(alpha_keys) if alpha_keys is not None else rep.get("alpha_keys")
    a0 = alpha0 if alpha0 is not None else rep.get("alpha")
    if not keys or a0 is None:
        raise InputError(f"{merged_dir}: no alpha_keys/alpha given and none in {REPORT_FILE}")
    if a0 <= 0:
        raise InputError(f"{merged_dir}: α0 = {a0}; rescaling needs the merge run with α0 > 0")
    sm = ScaledModel(base_dir, merged_dir, keys)
    tok = _tokenizer_for(merged_dir, zoo)

    def val(alpha: float) -> float:
        sm.set_factor(alpha / a0)
        if objective == "entropy":
            h = mean_entropy(sm.model, tok, zoo, tasks)["average"]
            log.info("alpha %.4f: mean entropy on calibration rows %.4f", alpha, h)
            return -h
        acc = _mean_acc(evaluate_model(sm.model, tok, zoo, "validation", tasks))
        log.info("alpha %.4f: mean validation accuracy %.4f", alpha, acc)
        return acc

    best, best_val, history = golden_section_max(val, lo, hi, tol, max_iter)
    out = {"alpha": best, "alpha0": a0, "objective": objective, "validation": best_val, "history": [list(h) for h in history],
           "n_keys": len(keys)}
    if evaluate_test:
        sm.set_factor(best / a0)
        out["test"] = evaluate_model(sm.model, tok, zoo, "test", tasks)
    return out


def select_lambda(base_dir: str | Path, merged_dir: str | Path, lambda0: float, zoo_dir: str | Path | Zoo,
                  grid: Sequence[float] = LAMBDA_GRID, tasks: Sequence[str] | None = None,
                  evaluate_test: bool = True) -> dict:
    """λ of a merge that is linear in λ (task arithmetic), chosen from `grid` on validation by
    rescaling every floating-point key of a merge made at λ0."""
    zoo = zoo_dir if isinstance(zoo_dir, Zoo) else open_zoo(zoo_dir)
    if lambda0 == 0:
        raise InputError("select_lambda needs a merge made with λ0 != 0")
    sm = ScaledModel(base_dir, merged_dir, None)
    tok = _tokenizer_for(Path(merged_dir), zoo)
    history = []
    for lam in grid:
        sm.set_factor(lam / lambda0)
        acc = _mean_acc(evaluate_model(sm.model, tok, zoo, "validation", tasks))
        log.info("lambda %.2f: mean validation accuracy %.4f", lam, acc)
        history.append([lam, acc])
    best, best_val = max(history, key=lambda h: h[1])
    out = {"lambda": best, "lambda0": lambda0, "validation": best_val, "history": history}
    if evaluate_test:
        sm.set_factor(best / lambda0)
        out["test"] = evaluate_model(sm.model, tok, zoo, "test", tasks)
    return out


def _selected_lm_rows(spec: MergeSpec, label: str, out: Path, zoo: Zoo, split: str, names: Sequence[str],
                      info: dict) -> list[Row]:
    """On an LM zoo: task arithmetic's λ (grid) or ESM's α (golden section) chosen on validation
    by rescaling the merge in memory, then scored once on `split` by lm-eval; [] for other methods."""
    from esm_ray.eval.lm_report import evaluate_lm_harness, row_from_items
    from esm_ray.eval.lm_select import ScaledLM, select_scale

    mrep = _report(out).get("method_report", {})
    if spec.method.name in LAMBDA_METHODS:
        scaled, f0, what, kw = ScaledLM(zoo.base_dir, out), _lambda_of(spec), "λ", {"grid": LAMBDA_GRID}
    elif spec.method.name == "esm" and mrep.get("alpha_keys") and mrep.get("alpha"):
        scaled, f0, what, kw = ScaledLM(zoo.base_dir, out, mrep["alpha_keys"]), float(mrep["alpha"]), "α", {}
    else:
        return []
    tok = lm_tokenizer(out, zoo)
    sel = select_scale(scaled, f0, zoo, tok, names, what=what, **kw)
    items = evaluate_lm_harness(out, zoo, split, names, loaded=(scaled.model, tok))["items"]
    key = "lambda" if what == "λ" else "alpha"
    return [row_from_items(zoo, f"{label} [{what}={sel['value']:.2f} on val]", items, split, "merged",
                           {**info, "selected": {key: sel["value"], "validation": sel["validation"],
                                                 "history": sel["history"]}})]


def _lambda_of(spec: MergeSpec) -> float:
    p = spec.method.params
    return float(p.get("lambda", p.get("lambda_", 1.0)))


def baseline_rows(zoo: Zoo, split: str = "test", tasks: Sequence[str] | None = None) -> list[Row]:
    """The "pretrained (linear probe)" and "experts" rows of an encoder zoo, or the LM's
    "pretrained" and per-domain "experts" rows."""
    if zoo.kind == "encoder":
        return [row_from_result("pretrained (linear probe)", evaluate_probe(zoo, split, tasks), "probe"),
                row_from_result("experts", expert_results(zoo, split, tasks), "experts")]
    from esm_ray.eval.lm_report import is_harness_zoo, lm_baseline_rows

    if is_harness_zoo(zoo):
        return lm_baseline_rows(zoo, split, tasks)
    names = list(tasks) if tasks else zoo.tasks
    base = {d: zoo.task(d)["metrics"]["base"][split] for d in names}
    own = {d: zoo.task(d)["metrics"]["expert"][split] for d in names}
    return [Row("pretrained", base, None, "probe"), Row("experts (own domain)", own, None, "experts")]


def sweep(specs: Sequence[MergeSpec | str | Path], zoo_dir: str | Path | Zoo,
          merge_fn: Callable[[MergeSpec], str], split: str = "test", tasks: Sequence[str] | None = None,
          select: bool = False, on_row: Callable[[ReportTable], None] | None = None) -> ReportTable:
    """Merge each spec with `merge_fn`, evaluate it, and return one table with the baseline rows.

    select=True chooses ESM's α (golden section) and task arithmetic's λ (grid) on validation
    before the single test evaluation, and adds that row after the label-free one (as merged);
    other methods are evaluated as merged. `on_row(table)`
    is called after every row (the CLI rewrites the report, so a long sweep shows its progress).
    """
    zoo = zoo_dir if isinstance(zoo_dir, Zoo) else open_zoo(zoo_dir)
    names = list(tasks) if tasks else zoo.tasks
    from esm_ray.eval.lm_report import evaluate_lm_harness, is_harness_zoo, row_from_items, units

    harness = is_harness_zoo(zoo)
    metric = "accuracy" if zoo.kind == "encoder" else "lm" if harness else "perplexity"
    table = ReportTable(names, metric=metric, split=split,
                        meta={"zoo": str(zoo.root), "zoo_hash": zoo.manifest.get("hash"), "select": select,
                              **({"units": units(zoo, names), "scorer": "lm-evaluation-harness"} if harness else {})})
    for row in baseline_rows(zoo, split, names):
        table.add(row)
    for item in specs:
        if on_row is not None:
            on_row(table)
        spec = item if isinstance(item, MergeSpec) else load_spec(item)
        label = spec_label(spec)
        log.info("sweep: merging %s", label)
        t0 = time.perf_counter()
        out = Path(merge_fn(spec))
        info = {"output": str(out), "method": spec.method.name, "params": dict(spec.method.params),
                "merge_seconds": round(time.perf_counter() - t0, 2),
                "purify": spec.purify.model_dump(mode="json") if spec.purify else None}
        from esm_ray.eval.routed import is_routed_dir, routed_rows

        if is_routed_dir(out):  # ESM++ / SiM: one row per router, routing results in the row's info
            for row in routed_rows(label, out, zoo, split, names, info):
                table.add(row)
            continue
        if harness:
            items = evaluate_lm_harness(out, zoo, split, names)["items"]
            table.add(row_from_items(zoo, label, items, split, "merged", info))
            if select:
                for row in _selected_lm_rows(spec, label, out, zoo, split, names, info):
                    table.add(row)
            continue
        if zoo.kind == "causal_lm":
            table.add(row_from_result(label, evaluate_lm(out, zoo, split, names), "merged", info))
            continue
        mrep = _report(out).get("method_report", {})
        if select and (spec.method.name in LAMBDA_METHODS or (spec.method.name == "esm" and mrep.get("alpha_keys"))):
            # the label-free row (as merged) first, then the validation-selected one
            table.add(row_from_result(label, evaluate_encoder(out, zoo, split, names), "merged", dict(info)))
        if select and spec.method.name == "esm" and mrep.get("alpha_keys"):
            res = search_alpha(zoo.base_dir, out, None, None, zoo, names)
            info["selected"] = {"alpha": res["alpha"], "validation": res["validation"], "history": res["history"]}
            table.add(row_from_result(f"{label} [α={res['alpha']:.3f} on val]", res["test"], "merged", info))
        elif select and spec.method.name in LAMBDA_METHODS:
            res = select_lambda(zoo.base_dir, out, _lambda_of(spec), zoo, tasks=names)
            info["selected"] = {"lambda": res["lambda"], "validation": res["validation"], "history": res["history"]}
            table.add(row_from_result(f"{label} [λ={res['lambda']:.1f} on val]", res["test"], "merged", info))
        else:
            table.add(row_from_result(label, evaluate_encoder(out, zoo, split, names), "merged", info))
    if on_row is not None:
        on_row(table)
    return table
