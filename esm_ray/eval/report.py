"""One results table (rows = methods, columns = tasks) and its JSON, Markdown and PNG forms.

The Markdown imitates the papers' tables: absolute accuracy in percent with the normalised
accuracy (percent of the fine-tuned expert) in parentheses, and an average column. For LM
zoos the metric is perplexity (lower is better) and no normalisation is shown. Routed rows
(`info["routing"]`, see `esm_ray.eval.routed`) add a routing-accuracy table to the Markdown and
a confusion_<row>.png each.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass
class Row:
    name: str
    values: dict[str, float]                   # per task: accuracy in [0, 1] (or perplexity)
    normalized: dict[str, float] | None = None  # per task: value / expert value
    kind: str = "merged"                        # "probe", "experts", "merged", "model"
    info: dict[str, Any] = field(default_factory=dict)
    intervals: dict[str, list[float]] | None = None  # per task: 95% bootstrap interval [low, high]

    def average(self, tasks: Sequence[str]) -> float:
        vals = [self.values[t] for t in tasks if t in self.values]
        return sum(vals) / len(vals) if vals else float("nan")

    def normalized_average(self, tasks: Sequence[str]) -> float | None:
        if not self.normalized:
            return None
        vals = [self.normalized[t] for t in tasks if t in self.normalized]
        return sum(vals) / len(vals) if vals else None


@dataclass
class ReportTable:
    tasks: list[str]
    rows: list[Row] = field(default_factory=list)
    metric: str = "accuracy"   # or "perplexity", or "lm" (meta["units"]: per task "perplexity" / "accuracy")
    split: str = "test"
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "split": self.split, "tasks": list(self.tasks), "meta": self.meta,
                "rows": [{**asdict(r), "average": r.average(self.tasks),
                          "normalized_average": r.normalized_average(self.tasks)} for r in self.rows]}

    @staticmethod
    def from_dict(d: dict) -> "ReportTable":
        rows = [Row(r["name"], dict(r["values"]), r.get("normalized"), r.get("kind", "merged"), r.get("info", {}),
                    r.get("intervals")) for r in d["rows"]]
        return ReportTable(list(d["tasks"]), rows, d.get("metric", "accuracy"), d.get("split", "test"),
                           d.get("meta", {}))


def combine(tables: Sequence[ReportTable]) -> ReportTable:
    """One table from several reports of the same zoo, split and tasks (a sweep run in parts):
    rows in order, a row name seen before (the probe and expert rows) kept once."""
    if not tables:
        raise ValueError("nothing to combine")
    first = tables[0]
    for t in tables[1:]:
        if (t.tasks, t.metric, t.split) != (first.tasks, first.metric, first.split):
            raise ValueError(f"cannot combine reports over different tasks/metric/split: {first.tasks} "
                             f"{first.metric}/{first.split} vs {t.tasks} {t.metric}/{t.split}")
        if t.meta.get("zoo_hash") != first.meta.get("zoo_hash"):
            raise ValueError(f"cannot combine reports of different zoos: {first.meta.get('zoo_hash')} "
                             f"vs {t.meta.get('zoo_hash')}")
    out = ReportTable(list(first.tasks), [], first.metric, first.split, dict(first.meta))
    seen: set[str] = set()
    for t in tables:
        for r in t.rows:
            if r.name not in seen:
                seen.add(r.name)
                out.add(r)
    return out


def row_from_result(name: str, result: dict, kind: str = "merged", info: dict | None = None) -> Row:
    """A Row from an `evaluate_encoder` / `evaluate_lm` result."""
    if "domains" in result:
        vals = {d: v["perplexity"] for d, v in result["domains"].items()}
        return Row(name, vals, None, kind, info or {})
    vals = {t: v["accuracy"] for t, v in result["tasks"].items()}
    norm = {t: v["normalized"] for t, v in result["tasks"].items()}
    ivals = {t: list(v["interval"]) for t, v in result["tasks"].items() if "interval" in v}
    info = dict(info or {})
    if "interval" in result.get("average", {}):
        info["average_interval"] = list(result["average"]["interval"])
    return Row(name, vals, norm, kind, info, ivals or None)


# ---------------------------------------------------------------- writers


def write_json(table: ReportTable, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(table.to_dict(), indent=2) + "\n")
    return p


def _cell(v: float | None, n: float | None, pct: bool, ci: Sequence[float] | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.2f}" if abs(x) < 1e4 else f"{x:.3g}")
    s = f(v)
    if ci is not None and len(ci) == 2 and not any(math.isnan(x) for x in ci):
        s += f" [{f(ci[0])}, {f(ci[1])}]"
    if n is not None and not math.isnan(n):
        s += f" ({100 * n:.1f})"
    return s


def _pct(table: "ReportTable", task: str) -> bool:
    if table.metric == "lm":
        return table.meta.get("units", {}).get(task) == "accuracy"
    return table.metric == "accuracy"


def to_markdown(table: ReportTable, title: str | None = None) -> str:
    pct = table.metric == "accuracy"
    head = ["method", *table.tasks, "avg"]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    if table.metric == "lm":
        lines += [f"{table.split}: word perplexity for domains (lower is better), accuracy (%) for label tasks; "
                  "[95% bootstrap interval over items]; (normalised, % of the expert: share of its log-perplexity "
                  "gain over the base kept, or accuracy / expert accuracy); avg: of the normalised scores, with its "
                  "95% bootstrap interval (every column's items resampled).", ""]
    elif pct:
        lines += [f"{table.split} accuracy (%), [95% bootstrap interval over {table.split} items] where measured, "
                  "normalised accuracy (% of the fine-tuned expert) in parentheses.", ""]
    else:
        lines += [f"{table.split} {table.metric} (lower is better).", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in table.rows:
        cells = [r.name]
        for t in table.tasks:
            cells.append(_cell(r.values.get(t), (r.normalized or {}).get(t), _pct(table, t), (r.intervals or {}).get(t)))
        if table.metric == "lm":
            na = r.normalized_average(table.tasks)
            ci = r.info.get("normalized_interval") if set(r.values) == set(table.tasks) else None
            cells.append("-" if na is None or math.isnan(na) else
                         f"({100 * na:.1f})" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""))
        else:
            # the average's interval holds for the row's own tasks only
            ci = r.info.get("average_interval") if set(r.values) == set(table.tasks) else None
            cells.append(_cell(r.average(table.tasks), r.normalized_average(table.tasks), pct, ci))
        lines.append("| " + " | ".join(cells) + " |")
    lines += _routing_markdown(table)
    return "\n".join(lines) + "\n"


def _routing(row: Row) -> dict | None:
    """The routing results a routed row carries (`esm_ray.eval.routed.routed_rows`), else None."""
    r = row.info.get("routing") if row.info else None
    return r if isinstance(r, dict) and "routing_accuracy" in r else None


def _routing_markdown(table: ReportTable) -> list[str]:
    """A second table for routed rows: routing accuracy per task and its average, and the
    average accuracy when the routed task's head is used (task unknown)."""
    rows = [(r, _routing(r)) for r in table.rows if _routing(r) is not None]
    if not rows:
        return []
    heads = any(ro.get("accuracy_task_unknown") for _, ro in rows)  # encoders: the routed task's head
    head = ["router", *table.tasks, "avg"] + (["acc. task unknown (avg)"] if heads else [])
    lines = ["", f"{table.split} routing accuracy (%): share of each task's samples routed to its own expert"
                 + ("; last column: accuracy with the routed task's head." if heads else "."), "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r, ro in rows:
        acc = ro["routing_accuracy"]
        vals = [acc[t] for t in table.tasks if t in acc]
        avg = sum(vals) / len(vals) if vals else None
        unk = ro.get("accuracy_task_unknown") or {}
        uvals = [unk[t] for t in table.tasks if t in unk]
        cells = [r.name, *(_cell(acc.get(t), None, True) for t in table.tasks), _cell(avg, None, True)]
        if heads:
            cells.append(_cell(sum(uvals) / len(uvals) if uvals else None, None, True))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(table: ReportTable, path: str | Path, title: str | None = None) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(to_markdown(table, title))
    return p


_KIND_COLORS = {"probe": "#b8b8b8", "experts": "#4a4a4a"}


def write_png(table: ReportTable, path: str | Path, title: str | None = None) -> Path:
    """Grouped bars: one group per task (plus the average), one bar per row of the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pct = table.metric == "accuracy"
    cols = [*table.tasks, "average"]
    n_rows = max(len(table.rows), 1)
    width = 0.8 / n_rows
    fig_w = max(8.0, 1.0 + len(cols) * (0.35 + 0.13 * n_rows))
    fig, ax = plt.subplots(figsize=(fig_w, 4.8), dpi=120)
    # tab10 without its grey (kept for the probe and expert rows), then tab20 for long tables
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7] + list(plt.get_cmap("tab20b").colors)
    merged_i = 0
    lm = table.metric == "lm"  # mixed units: plot the normalised scores (% of the expert)
    for i, r in enumerate(table.rows):
        if lm:
            na = r.normalized_average(table.tasks)
            vals = [(r.normalized or {}).get(t, float("nan")) for t in table.tasks] + [na if na is not None else float("nan")]
        else:
            vals = [r.values.get(t, float("nan")) for t in table.tasks] + [r.average(table.tasks)]
        vals = [100 * v if pct or lm else v for v in vals]
        color = _KIND_COLORS.get(r.kind)
        if color is None:
            color = palette[merged_i % len(palette)]
            merged_i += 1
        xs = [j + (i - (n_rows - 1) / 2) * width for j in range(len(cols))]
        hatch = "//" if r.kind == "probe" else None
        ax.bar(xs, vals, width * 0.95, label=r.name, color=color, hatch=hatch, edgecolor="white", linewidth=0.4)
        if not math.isnan(vals[-1]):  # label the averages
            ax.annotate(f"{vals[-1]:.1f}" if pct else f"{vals[-1]:.2f}", (xs[-1], vals[-1]), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7,
                        rotation=90 if n_rows > 4 else 0)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c.replace("_", "\n", 1) for c in cols], fontsize=9)
    ax.axvline(len(cols) - 1.5, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_ylabel(f"{table.split} accuracy (%)" if pct else f"{table.split} normalised score (% of expert)" if lm
                  else f"{table.split} {table.metric}")
    if pct:
        lows = [100 * v for r in table.rows for v in r.values.values() if not math.isnan(v)]
        ax.set_ylim(max(0.0, (min(lows) if lows else 0) - 10) // 10 * 10, 100)
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=12)
    ncol = min(n_rows, 4)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, fontsize=8.5, frameon=False)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, bbox_inches="tight")
    plt.close(fig)
    return p


def slug(name: str) -> str:
    """A file-name form of a row name: runs of other characters become '-'."""
    return re.sub(r"[^A-Za-z0-9_.=]+", "-", name).strip("-").lower() or "row"


def write_confusions(table: ReportTable, out_dir: str | Path) -> dict[str, Path]:
    """confusion_<row-slug>.png (true task x routed task) for every row that carries a
    routing confusion; returns {row name: path}."""
    out = {}
    for r in table.rows:
        ro = _routing(r)
        if ro is None or not ro.get("confusion"):
            continue
        from esm_ray.routed.evaluate import confusion_png

        out[r.name] = confusion_png(ro["confusion"], ro.get("confusion_tasks") or table.tasks,
                                    Path(out_dir) / f"confusion_{slug(r.name)}.png", r.name)
    return out


def write_report(table: ReportTable, out_dir: str | Path, stem: str = "report", title: str | None = None) -> dict:
    """report.json, report.md and report.png under out_dir, plus a confusion PNG per routed row;
    returns their paths ({"json", "markdown", "png", "confusion <row name>" ...})."""
    d = Path(out_dir)
    paths = {"json": write_json(table, d / f"{stem}.json"),
             "markdown": write_markdown(table, d / f"{stem}.md", title),
             "png": write_png(table, d / f"{stem}.png", title)}
    paths.update({f"confusion {name}": p for name, p in write_confusions(table, d).items()})
    return paths
