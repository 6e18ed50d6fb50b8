"""`esm-ray demo`: the main job, end to end on the packaged test bed.

Builds (or reuses) the offline zoo of text-classification experts on MiniLM, merges them with
a few methods through the normal merge path, evaluates every merged encoder with each task's
own head, and prints where everything went and one table.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger("esm_ray.demo")

DEFAULT_METHODS = ["task_arithmetic", "ties", "tsvm", "esm"]


def cmd_demo(args: argparse.Namespace) -> int:
    from esm_ray.eval.report import to_markdown, write_report
    from esm_ray.eval.sweep import sweep
    from esm_ray.runtime import run_merge
    from esm_ray.zoo.build import build_zoo
    from esm_ray.zoo.specs import write_specs

    t0 = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    zoo_dir = build_zoo(args.zoo_root, reduced=args.reduced, progress=not args.no_progress)
    print(f"zoo:     {zoo_dir}")
    specs = write_specs(zoo_dir, out / "specs", methods=args.methods, merged_root=out / "merged")

    def merge(spec) -> str:
        return str(run_merge(spec, progress=not args.no_progress).output)

    title = args.title or "esm-ray demo: merged MiniLM experts (test accuracy)"

    def progress(t) -> None:  # the report is rewritten after every row, so a long run shows its progress
        write_report(t, out / "report", title=title)

    table = sweep(specs, zoo_dir, merge, split="test", select=args.select, on_row=progress)
    paths = write_report(table, out / "report", title=title)
    print(to_markdown(table))
    print(f"specs:   {out / 'specs'}")
    print(f"merged:  {out / 'merged'}  ({', '.join(args.methods)})")
    for kind, p in paths.items():
        print(f"{kind + ':':<8} {p}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build the test bed, merge with several methods, evaluate, print a table")
    p.add_argument("--out", default="out/demo", help="where specs, merged models and the report go")
    p.add_argument("--zoo-root", default=None, help="zoo cache root (default $ESM_RAY_ZOO or ~/.cache/esm-ray/zoo)")
    p.add_argument("--reduced", action="store_true", help="2 tasks and a few training steps (about a minute)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="methods from the zoo's spec table")
    p.add_argument("--select", action="store_true",
                   help="choose task arithmetic's λ and ESM's α on the validation splits, then score test once")
    p.add_argument("--title", help="title of the report table and chart")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
