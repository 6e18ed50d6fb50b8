"""Routed causal LMs (ESM++ / SiM adapters + router) against an LM zoo: routing accuracy and
routed quality per column, with the same per-item records and intervals as a static LM.

Each test item of a column is routed on its own text, alone as a request would be:
- a domain item on its passage (the text whose perplexity is scored), and again on the
  passage's first `prefix_tokens` tokens (default 32), a served prompt's length;
- a label-task item on its prompt (without the answer), and on the prompt's first
  `prefix_tokens` tokens.
Texts are encoded as `RoutedLM.encode` encodes a prompt (the tokenizer's special tokens, left
padding, truncation on the right), in batches of similar length; the decision does not depend
on the batch (positions and token means follow each row's mask).

Each item is then scored with the adapter it was routed to: items are grouped by adapter, the
group's adapter is made the active one (`PeftModel.set_adapter`) and the group is scored by
`esm_ray.models.lm_items` (`rolling_items` / `choice_items`, lm-evaluation-harness's
conventions), so a routed row's records are those of the model a routed request runs. The row
is `lm_report.row_from_items` of these records: value, normalised score and bootstrap interval
per column, as for a static model. Scores are kept per (column, adapter, item), so the rows of
several routers and the oracle share every computation.

Rows: `<label> [<router> router]` (routed on the whole text), `<label> [<router> router, first N
tokens]`, and `<label> [oracle routing]` (each item with its own column's adapter: what the
adapters give when the router is never wrong; the gap to it is the router's cost).
`info["routing"]` of a routed row holds routing accuracy per column, its average and the
confusion (zoo column x routed task, over the model's tasks), as for encoder routed rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from esm_ray.errors import InputError
from esm_ray.eval.lm_report import is_harness_zoo, normalized, row_from_items
from esm_ray.eval.report import Row
from esm_ray.models.lm_items import choice_items, rolling_items, score
from esm_ray.routed.lm_format import LM_MANIFEST_FILE
from esm_ray.zoo.layout import Zoo, open_zoo
from esm_ray.zoo.lm_tasks import column_kind

log = logging.getLogger("esm_ray.eval")

PREFIX_TOKENS = 32


def is_routed_lm_dir(path: str | Path) -> bool:
    """Whether `path` is a local routed causal-LM directory (it holds router/manifest.json)."""
    return (Path(path) / LM_MANIFEST_FILE).is_file()


def route_texts(lm: Any, texts: Sequence[str], router: str, max_length: int | None = None,
                batch_size: int = 16) -> list[str]:
    """The task `lm` routes each text to, each decided on its own tokens (the first `max_length`
    when given); texts run in batches of similar length."""
    tok = lm.tokenizer
    tok.truncation_side = "right"
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out: list[str] = [""] * len(texts)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        ids, mask = lm.encode([texts[i] for i in chunk], max_length=max_length)
        for i, t in zip(chunk, lm.route(ids, mask, router)):
            out[i] = t
    return out


class RoutedLMScorer:
    """Per-item records of a zoo's columns under any choice of adapter per item, each
    (column, adapter, item) scored once."""

    def __init__(self, lm: Any, zoo: Zoo, split: str, columns: Sequence[str], batch_size: int = 8,
                 stride: int = 1) -> None:
        self.lm, self.zoo, self.split, self.batch_size = lm, zoo, split, batch_size
        self.rows = {c: zoo.rows(c, split)[::stride] for c in columns}  # every stride-th item
        self.kind = {c: column_kind(zoo, c) for c in columns}
        self._cache: dict[tuple[str, str, int], dict] = {}

    def routing_text(self, column: str, row: dict) -> str:
        """What an item routes on: a domain's passage, a label task's prompt."""
        return row["prompt"] if self.kind[column] == "accuracy" else row["text"]

    def _score(self, column: str, task: str, idx: list[int]) -> list[dict]:
        lm = self.lm
        model = lm.model.get_base_model()  # the LoRA layers sit in it; the active adapter decides
        rows = [self.rows[column][i] for i in idx]
        with lm._lock:
            before = lm.model.active_adapter
            lm.model.set_adapter(lm.adapter_names[task])
            try:
                if self.kind[column] == "perplexity":
                    return rolling_items(model, lm.tokenizer, [r["text"] for r in rows], self.batch_size)
                return choice_items(model, lm.tokenizer, [r["prompt"] for r in rows],
                                    list(self.zoo.task(column)["choices"]), [r["label"] for r in rows],
                                    self.batch_size)
            finally:
                lm.model.set_adapter(before)

    def items(self, column: str, tasks: Sequence[str]) -> list[dict]:
        """The records of the column's items, item i scored with task `tasks[i]`'s adapter."""
        if len(tasks) != len(self.rows[column]):
            raise ValueError(f"{column}: {len(tasks)} tasks for {len(self.rows[column])} items")
        for task in dict.fromkeys(tasks):
            todo = [i for i, t in enumerate(tasks) if t == task and (column, task, i) not in self._cache]
            if todo:
                for i, rec in zip(todo, self._score(column, task, todo)):
                    self._cache[(column, task, i)] = rec
        return [self._cache[(column, t, i)] for i, t in enumerate(tasks)]


def routing_summary(routes: dict[str, list[str]], model_tasks: Sequence[str]) -> dict[str, Any]:
    """Routing accuracy per column (share of its items routed to its own task), the average,
    the confusion (column x routed task over the model's tasks) and item counts."""
    pos = {t: i for i, t in enumerate(model_tasks)}
    conf = [[0] * len(model_tasks) for _ in model_tasks]
    acc = {}
    for c, got in routes.items():
        for t in got:
            conf[pos[c]][pos[t]] += 1
        acc[c] = sum(t == c for t in got) / max(len(got), 1)
    return {"routing_accuracy": acc, "average_routing_accuracy": sum(acc.values()) / max(len(acc), 1),
            "confusion": conf, "confusion_tasks": list(model_tasks), "n": {c: len(g) for c, g in routes.items()}}


def evaluate_routed_lm_zoo(model_dir: str | Path, zoo: str | Path | Zoo, split: str = "test",
                           columns: Sequence[str] | None = None, routers: Sequence[str] | None = None,
                           prefix_tokens: int | None = PREFIX_TOKENS, batch_size: int = 8,
                           stride: int = 1) -> dict[str, Any]:
    """Route and score every item of the zoo's `columns` (default all) with the routed LM.

    Returns {"model", "split", "model_tasks", "routes": {name: {column: [task per item]}},
    "items": {name: {column: records}}, "prefix_tokens"}; names are "<router>",
    "<router>@<prefix_tokens>" and "oracle"; routers default to all the model has."""
    from esm_ray.routed.lm import load_routed_lm

    zoo = zoo if isinstance(zoo, Zoo) else open_zoo(zoo)
    if not is_harness_zoo(zoo):
        raise InputError(f"{zoo.root}: a routed causal LM is scored on an LM zoo (built by `esm-ray zoo lm`), "
                         f"not a {zoo.kind} zoo")
    cols = list(columns or zoo.tasks)
    lm = load_routed_lm(model_dir)
    missing = [c for c in cols if c not in lm.tasks]
    if missing:
        raise InputError(f"{model_dir}: the routed LM has no adapter for the zoo column(s) {', '.join(missing)} "
                         f"(its tasks: {', '.join(lm.tasks)})")
    if lm.tokenizer is None:
        from transformers import AutoTokenizer

        lm.tokenizer = AutoTokenizer.from_pretrained(str(zoo.base_dir))
    names = list(routers or lm.routers)
    bad = [r for r in names if r not in lm.routers]
    if bad:
        raise InputError(f"{model_dir}: router(s) {', '.join(bad)} not available (have: {', '.join(lm.routers)})")
    scorer = RoutedLMScorer(lm, zoo, split, cols, batch_size, stride)
    texts = {c: [scorer.routing_text(c, r) for r in scorer.rows[c]] for c in cols}
    routes: dict[str, dict[str, list[str]]] = {}
    for r in names:
        routes[r] = {c: route_texts(lm, texts[c], r) for c in cols}
        if prefix_tokens:
            routes[f"{r}@{prefix_tokens}"] = {c: route_texts(lm, texts[c], r, prefix_tokens) for c in cols}
    routes["oracle"] = {c: [c] * len(texts[c]) for c in cols}
    items = {name: {c: scorer.items(c, got[c]) for c in cols} for name, got in routes.items()}
    return {"model": str(model_dir), "split": split, "model_tasks": list(lm.tasks), "routes": routes,
            "items": items, "prefix_tokens": prefix_tokens}


def paired_comparisons(zoo: Zoo, items: dict[str, dict[str, list[dict]]], split: str) -> dict[str, dict[str, Any]]:
    """For each routing (name -> {column: records}, all on the same items): `paired_differences`,
    its normalised average minus every other routing's, with the 95% paired bootstrap interval
    (`lm_report.normalized_resamples` draws the same resamples for every routing), in percent;
    and, when the zoo has label tasks too, `domains` (its normalised average over the domain
    (perplexity) columns only, with its interval) and `domain_paired_differences`. Names as in
    `evaluate_routed_lm_zoo`'s routes."""
    import numpy as np

    from esm_ray.eval.lm_report import interval, normalized_resamples, units

    names = list(items)
    if not names:
        return {}
    cols = list(items[names[0]])
    kinds = units(zoo, cols)

    def averages(subset: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
        """Each routing's normalised average over `subset` (percent) and its bootstrap resamples."""
        point = {n: float(np.mean([normalized(zoo, c, score(items[n][c], kinds[c]), split) or 0.0
                                   for c in subset])) * 100 for n in names}
        return point, {n: normalized_resamples(zoo, {c: items[n][c] for c in subset}, split) * 100 for n in names}

    def differences(n: str, point: dict[str, float], boots: dict[str, Any]) -> dict[str, Any]:
        return {o: {"difference": point[n] - point[o], "interval": interval(boots[n] - boots[o])}
                for o in names if o != n}

    point, boots = averages(cols)
    out = {n: {"paired_differences": differences(n, point, boots)} for n in names}
    dom = [c for c in cols if kinds[c] == "perplexity"]
    if dom and len(dom) < len(cols):
        point, boots = averages(dom)
        for n in names:
            out[n]["domains"] = {"columns": dom, "normalized_average": point[n],
                                 "normalized_interval": interval(boots[n])}
            out[n]["domain_paired_differences"] = differences(n, point, boots)
    return out


def routed_lm_rows(label: str, model_dir: str | Path, zoo: str | Path | Zoo, split: str = "test",
                   columns: Sequence[str] | None = None, info: dict[str, Any] | None = None,
                   routers: Sequence[str] | None = None, prefix_tokens: int | None = PREFIX_TOKENS,
                   stride: int = 1) -> list[Row]:
    """Rows of a routed LM: one per router on the whole text, one per router on the first
    `prefix_tokens` tokens, and the oracle row (each item with its own column's adapter).
    stride > 1: every stride-th item of each column only (normalised by the zoo's whole-split
    base and expert scores)."""
    zoo = zoo if isinstance(zoo, Zoo) else open_zoo(zoo)
    res = evaluate_routed_lm_zoo(model_dir, zoo, split, columns, routers, prefix_tokens, stride=stride)
    compared = paired_comparisons(zoo, res["items"], split)
    rows = []
    for name, got in res["routes"].items():
        router, _, n = name.partition("@")
        if router == "oracle":
            title, routing = "oracle routing", None
        else:
            title = f"{router} router" + (f", first {n} tokens" if n else "")
            routing = routing_summary(got, res["model_tasks"])
            routing["routes_on"] = (f"the first {n} tokens of the passage (domains) or prompt (label tasks)" if n
                                    else "the whole passage (domains) or prompt (label tasks)")
        row_info = {**(info or {}), "output": str(model_dir), "router": router, "routing": routing,
                    "prefix_tokens": int(n) if n else None, "scorer": "esm_ray.models.lm_items",
                    **compared.get(name, {})}
        rows.append(row_from_items(zoo, f"{label} [{title}]", res["items"][name], split, "routed", row_info))
    return rows
