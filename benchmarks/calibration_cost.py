"""Calibration cost: collecting the float64 input statistics against a plain forward pass.

    python benchmarks/calibration_cost.py [--zoo DIR] [--tasks t1 t2] [--repeats 3]

For each expert of a built zoo (default: the reduced zoo, built or reused), on the same
calibration rows, batches and threads: a plain forward pass (inference mode), and
`esm_ray.stats.calibrate` (the same forward with the hooks that accumulate n, Σx and the
Gram XᵀX of every linear layer's input, padding excluded), once with each
`calibration.gram_precision` (float64, and mixed: float32 products of the Gram's lower
block-triangle summed into float64; both keep the rows instead of a Gram for inputs at least
256 wide that see fewer rows than their width), `grams` (mixed, every input held as a Gram, as
before rows were kept: `stats.hooks.ROWS_MIN_WIDTH` raised for the call), and with `--before`
also an older mixed accumulation (the full float32 XᵀX of each call added into float64; kept
here, not in the package, for the side-by-side ratio). The variants run interleaved, `--repeats` rounds; per
expert it prints the median wall time and the median CPU time of this process (steadier on a
loaded machine, exact for `--threads 1`) of each, their ratios to the plain forward, and the
size of the statistics. No cache is involved (the function is called directly).

On an LM zoo (`esm-ray zoo lm`) the plain forward is the causal LM's whole forward, logits
included, and the variant `logits` is the mixed calibration through that whole forward (as
before calibration ran the base model alone and handed its last hidden state to the head's
statistics, `esm_ray.stats.calibrate.output_head`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _before_add(self, x) -> None:
    """The previous "mixed" accumulation: the full float32 XᵀX of each block of rows, added
    into a full float64 Gram (allocated on first use)."""
    from esm_ray.stats.hooks import BLOCK_ROWS

    self.n += int(x.shape[0])
    self.rows = None  # the previous release kept no rows
    if getattr(self, "gram", None) is None:
        self.gram = torch.zeros(self.d, self.d, dtype=torch.float64, device=x.device)
    x32 = x.to(torch.float32)
    for i in range(0, int(x32.shape[0]), BLOCK_ROWS):
        blk = x32[i:i + BLOCK_ROWS]
        self.s1 += blk.sum(0)
        self.gram += blk.T @ blk


def _before_result(self):
    return self.n, self.s1, self.gram, None


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    import importlib

    calibrate_module = importlib.import_module("esm_ray.stats.calibrate")  # the package exports the function

    from esm_ray.spec import CalibrationSpec
    from esm_ray.models.text import encode_rows, make_batches
    from esm_ray.models.text import pad_id as _pad_id
    from esm_ray.stats.calibrate import calibrate
    from esm_ray.zoo.build import build_zoo
    from esm_ray.zoo.layout import open_zoo, read_jsonl

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", help="a built encoder or LM zoo (default: the reduced encoder zoo)")
    ap.add_argument("--tasks", nargs="+", help="experts to measure (default: all)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--split", default="calib", help="rows from this split of each task (calib, train, ...): "
                    "the calibration file may hold fewer rows than --samples")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians are reported)")
    ap.add_argument("--before", action="store_true", help="also time the previous mixed accumulation")
    args = ap.parse_args(argv)

    from esm_ray.stats import hooks

    torch.set_num_threads(args.threads)
    zoo = open_zoo(args.zoo or build_zoo(None, reduced=True, progress=False))
    max_length = int(zoo.manifest.get("max_length", 64))
    settings = {prec: CalibrationSpec(samples=args.samples, max_length=max_length, batch_size=args.batch_size,
                                      gram_precision=prec) for prec in ("float64", "mixed")}
    causal = zoo.kind == "causal_lm"
    variants = (["plain", "float64", "mixed", "grams"] + (["logits"] if causal else [])
                + (["before"] if args.before else []))
    rows_out = []
    for task in args.tasks or zoo.tasks:
        d = zoo.expert_dir(task)
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(str(d), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(d))
        src = zoo.calib_path(task) if args.split == "calib" else zoo.data_path(task, args.split)
        rows = read_jsonl(src)[: args.samples]
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

        def before() -> None:
            add, result = hooks._Acc.add, hooks._Acc.result
            hooks._Acc.add, hooks._Acc.result = _before_add, _before_result
            try:
                stats_pass("mixed")
            finally:
                hooks._Acc.add, hooks._Acc.result = add, result

        def grams() -> None:
            width = hooks.ROWS_MIN_WIDTH
            hooks.ROWS_MIN_WIDTH = 1 << 62
            try:
                stats_pass("mixed")
            finally:
                hooks.ROWS_MIN_WIDTH = width

        def logits() -> None:
            head = calibrate_module.output_head
            calibrate_module.output_head = lambda m: None
            try:
                stats_pass("mixed")
            finally:
                calibrate_module.output_head = head

        run = {"plain": plain, "float64": lambda: stats_pass("float64"), "mixed": lambda: stats_pass("mixed"),
               "grams": grams, "before": before, "logits": logits}
        plain()  # warm-up
        times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                times[v].append(_timed(run[v]))
        med = {v: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
               for v, ts in times.items()}
        stats_pass("mixed")  # the size column is the default's
        unique = {id(s): s for s in stats.values()}.values()
        held = [s.rows if s.rows is not None else s.gram for s in unique]  # no Gram formed from rows here
        size = sum(h.numel() * h.element_size() + s.s1.numel() * s.s1.element_size() for h, s in zip(held, unique))
        n_rows = sum(s.rows is not None for s in unique)
        rows_out.append((task, len(rows), tokens, med, len(stats), len(unique), n_rows, size))
        print(f"{task}: " + ", ".join(f"{v} {w:.3f} s wall / {c:.3f} s CPU" for v, (w, c) in med.items()),
              file=sys.stderr)

    print(f"\nzoo {zoo.root.name}, {args.threads} threads, batch {args.batch_size}, max length {max_length}, "
          f"median of {args.repeats} interleaved rounds; ratios to the plain forward, wall (CPU)\n")
    print("| expert | rows | tokens | plain forward s wall (CPU) | " +
          " | ".join(f"{v} stats s | ratio" for v in variants[1:]) + " | layers (distinct inputs, of which rows) | stats MB |")
    print("|---|---:|---:|---:|" + "---:|---:|" * (len(variants) - 1) + "---|---:|")
    for task, n, tokens, med, n_layers, n_unique, n_rows, size in rows_out:
        pw, pc = med["plain"]
        cells = " | ".join(f"{med[v][0]:.3f} ({med[v][1]:.3f}) | {med[v][0] / pw:.2f} ({med[v][1] / pc:.2f})"
                           for v in variants[1:])
        print(f"| {task} | {n} | {tokens} | {pw:.3f} ({pc:.3f}) | {cells} | {n_layers} ({n_unique}, {n_rows}) | "
              f"{size / 1e6:.1f} |")
    tot = {v: (sum(r[3][v][0] for r in rows_out), sum(r[3][v][1] for r in rows_out)) for v in variants}
    print("\ntotal: " + ", ".join(f"{v} {w:.2f} s ({c:.2f} s CPU), ratio {w / tot['plain'][0]:.2f} "
                                  f"({c / tot['plain'][1]:.2f})" for v, (w, c) in tot.items() if v != "plain"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
