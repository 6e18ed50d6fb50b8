"""The tables of a built LM zoo (`esm-ray zoo lm`) for docs/zoo.md, from its zoo.json and
recorded per-item scores: base vs expert on every column's test split with 95% bootstrap
intervals, the cross table (each expert on every column against the base on the same items),
and the task vectors' norms and cosines.

    python benchmarks/lm_zoo_table.py ZOO
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esm_ray.models.lm_items import bootstrap_interval, score  # noqa: E402
from esm_ray.zoo.layout import open_zoo  # noqa: E402


def fmt(v: float, acc: bool) -> str:
    return f"{100 * v:.1f}" if acc else (f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def main(argv=None) -> int:
    zoo = open_zoo((argv or sys.argv[1:])[0])
    m = zoo.manifest
    base = json.loads(zoo.path(m["base_scores"]).read_text())["test"]
    cols = list(zoo.tasks)
    print(f"Zoo {m['hash']} (seed {m['seed']}), built in {m['build_seconds'] / 60:.0f} min of wall time.\n")
    print("| column | kind | test / val / train | base | expert | expert steps, s |")
    print("|---|---|---|---:|---:|---:|")
    for c in cols:
        t = zoo.task(c)
        acc = t["kind"] != "domain"
        kind = "accuracy" if acc else "perplexity"
        own = json.loads(zoo.path(t["scores"]).read_text())["test"][c]
        cells = []
        for items in (base[c], own):
            lo, hi = bootstrap_interval(items, kind)
            cells.append(f"{fmt(score(items, kind), acc)} [{fmt(lo, acc)}, {fmt(hi, acc)}]")
        s = t["sizes"]
        print(f"| {c} | {'label task (acc. %)' if acc else 'domain (word ppl)'} | {s['test']} / {s['validation']} / "
              f"{s['train']} | {cells[0]} | {cells[1]} | {t['steps']}, {t['train_seconds']:.0f} |")

    print("\nCross table (test; an expert off its own column on every ⌈n/32⌉-th item): perplexity "
          "ratio expert / base on the same items for domains (below 1: better than the base), accuracy "
          "difference in points for label tasks; the diagonal is on the whole split.\n")
    bc = m["test_scores_base_cross"]
    print("| expert \\ column | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for e in cols:
        row = m["test_scores"][e]
        cells = []
        for c in cols:
            ref = m["test_scores"]["base"][c] if c == e else bc[c]
            if zoo.task(c)["kind"] == "domain":
                cells.append(f"{row[c] / ref:.2f}")
            else:
                cells.append(f"{100 * (row[c] - ref):+.1f}")
        cells = [f"**{x}**" if c == e else x for x, c in zip(cells, cols)]
        print(f"| {e} | " + " | ".join(cells) + " |")

    tv = m["task_vectors"]
    off = [tv["cosine"][a][b] for i, a in enumerate(cols) for b in cols[i + 1:]]
    print(f"\nTask vectors: norm {min(tv['norm'].values()):.2f}-{max(tv['norm'].values()):.2f}; pairwise cosine "
          f"{min(off):+.3f} to {max(off):+.3f} (mean {sum(off) / len(off):+.3f}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
