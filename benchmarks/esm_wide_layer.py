"""ESM on one wide layer: ESD of T task updates and the fuse, timed by route, in one run.

    python benchmarks/esm_wide_layer.py [--d-out 3072] [--d-in 768] [--tasks 3] [--rows 2048]

Task updates are random (a rank-64 part plus small full-rank noise, so k reaches its cap
min(d_in, n)); the Gram comes from random activations. Times `esd_from_gram` (route auto) per
task and `esm_fuse` with the polar factors from the thin SVD ('svd', the old default) and from
the smaller Gram ('gram'), in float64, and prints the relative Frobenius difference of the two
fused updates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from esm_ray.core.esd import esd_from_gram
    from esm_ray.core.esm import PRESETS, esm_fuse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-out", type=int, default=3072)
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="roberta", choices=sorted(PRESETS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.d_in, generator=g, dtype=torch.float64)
    gram = x.T @ x
    parts = []
    t0 = time.perf_counter()
    for _ in range(args.tasks):
        low = torch.randn(args.d_out, 64, generator=g, dtype=torch.float64) @ torch.randn(
            64, args.d_in, generator=g, dtype=torch.float64)
        delta = 1e-3 * low + 1e-4 * torch.randn(args.d_out, args.d_in, generator=g, dtype=torch.float64)
        parts.append(esd_from_gram(delta, gram, args.rows, n_tasks=args.tasks).to(torch.float32))
    t_esd = time.perf_counter() - t0
    out, times = {}, {}
    for route in ("svd", "gram"):
        t0 = time.perf_counter()
        out[route] = esm_fuse(parts, PRESETS[args.preset], route=route)
        times[route] = time.perf_counter() - t0
    diff = float((out["gram"] - out["svd"]).norm() / out["svd"].norm())
    ks = [p.rank for p in parts]
    print(f"layer {args.d_out}x{args.d_in}, T={args.tasks}, k={ks}, {args.threads} threads, float64")
    print(f"ESD (route auto), all tasks: {t_esd:.2f} s")
    print(f"fuse svd: {times['svd']:.2f} s, fuse gram: {times['gram']:.2f} s, ratio {times['svd'] / times['gram']:.2f}")
    print(f"total svd: {t_esd + times['svd']:.2f} s, total gram: {t_esd + times['gram']:.2f} s")
    print(f"relative difference gram vs svd: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
