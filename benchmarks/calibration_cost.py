"""Calibration cost: collecting the float64 input statistics against a plain forward pass.

    python benchmarks/calibration_cost.py [--zoo DIR] [--tasks t1 t2] [--repeats 3]

For each expert of a built zoo (default: the reduced zoo, built or reused), on the same
calibration rows, batches and threads: a plain forward pass (inference mode), and
`esm_ray.stats.calibrate` (the same forward with the hooks that accumulate n, Σx and the
Gram XᵀX of every linear layer's input, padding excluded), once with each
`calibration.gram_precision` (float64, and mixed: float32 block products into float64). Prints per expert the
fastest of `--repeats` runs of each, their ratio, and the size of the statistics; then the
Gram's share estimated from flop counts. No cache is involved (the function is called directly).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModel, AutoTokenizer

    from esm_ray.spec import CalibrationSpec
    from esm_ray.models.text import encode_rows, make_batches
    from esm_ray.models.text import pad_id as _pad_id
    from esm_ray.stats.calibrate import calibrate
    from esm_ray.zoo.build import build_zoo
    from esm_ray.zoo.layout import open_zoo, read_jsonl

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", help="a built encoder zoo (default: the reduced zoo)")
    ap.add_argument("--tasks", nargs="+", help="experts to measure (default: all)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    zoo = open_zoo(args.zoo or build_zoo(None, reduced=True, progress=False))
    max_length = int(zoo.manifest.get("max_length", 64))
    settings = {prec: CalibrationSpec(samples=args.samples, max_length=max_length, batch_size=args.batch_size,
                                      gram_precision=prec) for prec in ("float64", "mixed")}
    rows_out = []
    for task in args.tasks or zoo.tasks:
        d = zoo.expert_dir(task)
        model = AutoModel.from_pretrained(str(d), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(d))
        rows = read_jsonl(zoo.calib_path(task))[: args.samples]
        batches = list(make_batches(encode_rows(rows, tok, max_length), args.batch_size, _pad_id(model, tok)))
        tokens = int(sum(int(m.sum()) for _, m in batches))

        def plain() -> None:
            with torch.inference_mode():
                for ids, mask in batches:
                    model(input_ids=ids, attention_mask=mask)

        stats: dict = {}

        def stats_pass(prec: str) -> None:
            stats.clear()
            stats.update(calibrate(model, rows, tok, settings[prec]))

        plain()  # warm-up
        t_plain = _fastest(plain, args.repeats)
        t64 = _fastest(lambda: stats_pass("float64"), args.repeats)
        t_mix = _fastest(lambda: stats_pass("mixed"), args.repeats)
        unique = {id(s): s for s in stats.values()}.values()
        size = sum(s.gram.numel() * s.gram.element_size() + s.s1.numel() * s.s1.element_size() for s in unique)
        rows_out.append((task, len(rows), tokens, t_plain, t64, t_mix, len(stats), len(unique), size))
        print(f"{task}: plain {t_plain:.3f} s, statistics float64 {t64:.3f} s, mixed {t_mix:.3f} s", file=sys.stderr)

    print(f"\nzoo {zoo.root.name}, {args.threads} threads, batch {args.batch_size}, max length {max_length}, "
          f"fastest of {args.repeats}\n")
    print("| expert | rows | tokens | plain forward s | float64 stats s | ratio | mixed stats s | ratio | "
          "layers (distinct inputs) | stats MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for task, n, tokens, tp, t64, tm, n_layers, n_unique, size in rows_out:
        print(f"| {task} | {n} | {tokens} | {tp:.3f} | {t64:.3f} | {t64 / tp:.2f} | {tm:.3f} | {tm / tp:.2f} | "
              f"{n_layers} ({n_unique}) | {size / 1e6:.1f} |")
    tp, t64, tm = (sum(r[i] for r in rows_out) for i in (3, 4, 5))
    print(f"\ntotal: plain {tp:.2f} s, float64 statistics {t64:.2f} s (ratio {t64 / tp:.2f}), "
          f"mixed {tm:.2f} s (ratio {tm / tp:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
