"""Routed models (ESM++ / SiM) against a built zoo: accuracy and routing accuracy per router.

A routed directory (one holding `routed/manifest.json`) is scored once per router of the model
(`RoutedModel.routers`: prototype, sim, oracle, none) on the zoo's labelled split, with samples
of all tasks mixed in each batch (`esm_ray.routed.evaluate.evaluate_routed`). A row's values
are `accuracy`, the true task's head on the routed features (the ESM++ protocol); the routing
side (per-task routing accuracy, task-unknown accuracy, the true x routed confusion) goes in
`Row.info["routing"]`, from which the report writes a routing table and a confusion PNG.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from esm_ray.errors import InputError
from esm_ray.eval.metrics import _as_zoo, _tasks, expert_reference
from esm_ray.eval.report import Row
from esm_ray.routed.load import MANIFEST_FILE, head_from, load_routed
from esm_ray.models.encoder import load_tokenizer
from esm_ray.zoo.layout import Zoo

log = logging.getLogger("esm_ray.eval")

ROUTER_LABELS = {"prototype": "prototype router", "sim": "sim router", "oracle": "oracle router",
                 "none": "no routing"}


def is_routed_dir(path: str | Path) -> bool:
    """Whether `path` is a local routed directory: an encoder's (routed/manifest.json) or a
    causal LM's (router/manifest.json, scored by `esm_ray.eval.routed_lm`)."""
    from esm_ray.eval.routed_lm import is_routed_lm_dir

    return (Path(path) / MANIFEST_FILE).is_file() or is_routed_lm_dir(path)


def evaluate_routed_zoo(model_dir: str | Path, zoo: str | Path | Zoo, split: str = "test",
                        tasks: Sequence[str] | None = None, routers: Sequence[str] | None = None,
                        batch_size: int = 64) -> dict[str, Any]:
    """`evaluate_routed` of the routed directory on the zoo's `split` of `tasks` (default all).

    Expert accuracies (for `normalized`) are the zoo's records; heads are the model's own, and
    the zoo's for a task whose head the model lacks. Returns evaluate_routed's result plus
    "model", "split" and "model_tasks" (the model's task order, the confusion's axes).
    """
    zoo = _as_zoo(zoo)
    if zoo.kind != "encoder":
        raise InputError(f"{zoo.root}: a {zoo.kind} zoo has no classification tasks to score a routed model on")
    names = _tasks(zoo, tasks)
    model = load_routed(model_dir)
    missing = [t for t in names if t not in model.tasks]
    if missing:
        raise InputError(f"{model_dir}: the routed model has no expert for the zoo task(s) {', '.join(missing)} "
                         f"(its tasks: {', '.join(model.tasks)})")
    extra = [t for t in model.tasks if t not in zoo.tasks]
    if extra:
        log.warning("%s: routed tasks %s are not in the zoo %s; routes to them count as misses",
                    model_dir, ", ".join(extra), zoo.root)
    for t in names:
        if t not in model.heads:
            model.heads[t] = head_from(zoo.head_path(t))
    if model.tokenizer is None:
        model.tokenizer = load_tokenizer(zoo.base_dir)
    data = {}
    for t in names:
        rows = zoo.rows(t, split)
        data[t] = ([r["text"] for r in rows], [int(r["label"]) for r in rows])
    from esm_ray.routed.evaluate import evaluate_routed

    res = evaluate_routed(model, data, routers, {t: expert_reference(zoo, t, split) for t in names},
                          batch_size=batch_size, max_length=int(zoo.manifest.get("max_length", 64)))
    return {"model": str(model_dir), "split": split, "model_tasks": list(model.tasks), **res}


def routed_rows(label: str, model_dir: str | Path, zoo: str | Path | Zoo, split: str = "test",
                tasks: Sequence[str] | None = None, info: dict[str, Any] | None = None,
                routers: Sequence[str] | None = None) -> list[Row]:
    """One table row per router: `<label> [<router> router]`, values = per-task accuracy with
    the true task's head; `info["routing"]` holds routing accuracy, task-unknown accuracy and
    the confusion matrix (None for the no-routing row). A routed causal LM gets
    `esm_ray.eval.routed_lm.routed_lm_rows` instead (routed, prefix-routed and oracle rows)."""
    from esm_ray.eval.routed_lm import is_routed_lm_dir, routed_lm_rows

    if is_routed_lm_dir(model_dir):
        return routed_lm_rows(label, model_dir, zoo, split, tasks, info, routers)
    res = evaluate_routed_zoo(model_dir, zoo, split, tasks, routers)
    rows = []
    for router, r in res["routers"].items():
        per = r["tasks"]
        routing = None
        if r.get("confusion") is not None:
            routing = {"routing_accuracy": {t: v["routing_accuracy"] for t, v in per.items()},
                       "average_routing_accuracy": r["average"]["routing_accuracy"],
                       "accuracy_task_unknown": {t: v["accuracy_task_unknown"] for t, v in per.items()},
                       "average_accuracy_task_unknown": r["average"]["accuracy_task_unknown"],
                       "confusion": r["confusion"], "confusion_tasks": res["model_tasks"],
                       "n": {t: v["n"] for t, v in per.items()}}
            if "layer_routing_accuracy" in r["average"]:
                routing["average_layer_routing_accuracy"] = r["average"]["layer_routing_accuracy"]
        row_info = {**(info or {}), "output": str(model_dir), "router": router, "routing": routing}
        rows.append(Row(f"{label} [{ROUTER_LABELS.get(router, router + ' router')}]",
                        {t: v["accuracy"] for t, v in per.items()},
                        {t: v["normalized"] for t, v in per.items() if "normalized" in v} or None,
                        "routed", row_info))
    return rows
