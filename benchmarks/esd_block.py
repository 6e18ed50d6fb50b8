"""ESD of one LLaMA block of one expert, by route, side by side in one run.

    python benchmarks/esd_block.py [--hidden 2048] [--intermediate 5632] [--rows 256] [--tasks 4]

The seven linear layers of a block read four inputs: q, k and v one, o one, gate and up one,
down one. Each input's Gram comes from `--rows` random activation rows, each ΔW is a rank-16
update plus small full-rank noise (like benchmarks/_util.py's experts). Three ways, in float64
on `--threads` threads, with the same data:

  gram     eigh of ΔW G ΔWᵀ for every layer (the 'gram' route everywhere)
  before   route auto as it was: the factor route (SVD of ΔW L, L of all d_in columns) where
           d_out > d_in, else gram
  now      route auto (`core.esd.auto_route`): also square layers with fewer rows than inputs
           take the factor route, L keeps at most n columns, and one L serves every layer that
           reads the same input, as methods.esm keeps it

Prints the seconds per layer and per block, and the largest difference of the kept subspaces
(spectral norm of the projector difference) against 'gram'. With `--fuse`, it then computes
the ESD of T - 1 more tasks per layer ('now') and times the coordinator's fusion of the T
parts per layer (`core.esm.esm_fuse`, RoBERTa recipe, polar factors by the Gram route), as an
ESM merge of T experts does for every block.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import print_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from esm_ray.core.esd import auto_route, esd_from_gram, gram_factor
    from esm_ray.core.esm import PRESETS, esm_fuse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fuse", action="store_true", help="also time the fusion of T tasks' parts per layer")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, i, n = args.hidden, args.intermediate, args.rows
    g = torch.Generator().manual_seed(0)
    inputs = {"qkv": h, "o": h, "gate_up": h, "down": i}
    grams = {}
    for name, d in inputs.items():
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        grams[name] = x.T @ x
    layers = [("q", "qkv", h, h), ("k", "qkv", h, h), ("v", "qkv", h, h), ("o", "o", h, h),
              ("gate", "gate_up", i, h), ("up", "gate_up", i, h), ("down", "down", h, i)]
    deltas = {name: 2e-3 * torch.randn(d_out, 16, generator=g, dtype=torch.float64)
              @ torch.randn(16, d_in, generator=g, dtype=torch.float64) / 4
              + 2e-4 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
              for name, _, d_out, d_in in layers}

    def run(way: str, deltas=deltas, keep: dict | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        times, bases, last = {}, {}, None
        for name, src, d_out, d_in in layers:
            t0 = time.perf_counter()
            if way == "gram":
                e = esd_from_gram(deltas[name], grams[src], n, n_tasks=args.tasks, route="gram")
            elif way == "before":
                route = "factor" if d_out > d_in else "gram"
                f = gram_factor(grams[src]) if route == "factor" else None
                e = esd_from_gram(deltas[name], grams[src], n, n_tasks=args.tasks, route=route, factor=f)
            else:
                route = auto_route(d_out, d_in, n)
                f = None
                if route == "factor":
                    if last is None or last[0] != src:
                        last = (src, gram_factor(grams[src], n))
                    f = last[1]
                e = esd_from_gram(deltas[name], grams[src], n, n_tasks=args.tasks, route=route, factor=f)
            times[name] = time.perf_counter() - t0
            bases[name] = e.basis
            if keep is not None:
                keep.setdefault(name, []).append(e)
        return times, bases

    parts: dict[str, list] = {}
    results = {way: run(way, keep=parts if way == "now" else None) for way in ("gram", "before", "now")}
    rows = []
    for way, (times, bases) in results.items():
        row = {"way": way, **{f"{name} s": times[name] for name, *_ in layers}, "block s": sum(times.values())}
        ref = results["gram"][1]
        row["max subspace diff"] = f"{max(float(torch.linalg.matrix_norm(bases[k] @ bases[k].T - ref[k] @ ref[k].T, ord=2)) for k in bases):.1e}"
        rows.append(row)
    print(f"\nESD of one block, hidden {h}, intermediate {i}, {n} rows, T = {args.tasks} "
          f"(k = d_out / T, capped at n), float64, {args.threads} thread(s)\n")
    print_table(rows, [(k, k) for k in rows[0]])
    before, now = rows[1]["block s"], rows[2]["block s"]
    print(f"\nnow / before: {now / before:.2f}")
    if args.fuse:
        for t in range(1, args.tasks):
            more = {name: dw + 2e-3 * torch.randn(dw.shape[0], 16, generator=g, dtype=torch.float64)
                    @ torch.randn(16, dw.shape[1], generator=g, dtype=torch.float64) / 4 for name, dw in deltas.items()}
            run("now", more, keep=parts)
        fuse = {}
        for name, *_ in layers:
            t0 = time.perf_counter()
            esm_fuse(parts[name], PRESETS["roberta"])
            fuse[name] = time.perf_counter() - t0
        print(f"\nfusion of {args.tasks} parts per layer (ranks {[p.rank for p in parts['q']]} for q):")
        print_table([{**{f"{k} s": v for k, v in fuse.items()}, "block s": sum(fuse.values())}],
                    [(f"{k} s", f"{k} s") for k in fuse] + [("block s", "block s")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
