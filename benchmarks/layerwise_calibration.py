"""Layer-wise against full-model calibration: peak memory and time.

    python benchmarks/layerwise_calibration.py [--cases mid-8,mid-32,smol] [--samples 16]
        [--max-length 64] [--batch-size 8] [--threads 2]

For each case, a synthetic LLaMA-shaped base (benchmarks/_util.py's make_llama_family: bf16 on
disk, cached) is calibrated twice by `esm_ray.stats.calibrate_expert` on the same random token
rows, each in a fresh process with an empty statistics cache: `calibration.mode: full` (the
whole model loaded in float32, one forward per batch) and `layerwise` (one block at a time from
the lazy reader, each block's statistics spilled to disk). Prints per run the wall and CPU
seconds, the process's peak RSS and its peak above the RSS after imports (what calibration
itself added), beside the sizes that bound it: one block, the embedding, the whole model (all
float32), the calibration activations and the float64 statistics. mid-8 and mid-32 differ
only in depth: layer-wise memory must not grow with it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _util import LlamaShape, clean_env, make_llama_family, print_table, run_timed  # noqa: E402
from simple_merge import SMOL  # noqa: E402

MID = dict(hidden=256, intermediate=704, heads=4, kv_heads=2, vocab=8192, tied=True)
CASES = {"mid-8": LlamaShape("mid-8", layers=8, **MID), "mid-32": LlamaShape("mid-32", layers=32, **MID),
         "smol": SMOL}

CHILD = r"""
import json, resource, sys, time
from esm_ray.spec import CalibrationSpec
from esm_ray.stats.calibrate import calibrate_expert
import torch, transformers, safetensors.torch  # imported before the baseline, as calibration does
from transformers import LlamaForCausalLM  # noqa: F401  (the model's code, ~200 MB of modules)
torch.nn.functional.scaled_dot_product_attention(*(torch.zeros(1, 1, 2, 4),) * 3)  # kernels loaded
model, data, cache, mode, samples, max_length, batch = sys.argv[1:8]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
store = calibrate_expert(model, data, CalibrationSpec(samples=int(samples), max_length=int(max_length),
                         batch_size=int(batch), cache_dir=cache, mode=mode))
print(json.dumps({"base_rss": base, "seconds": time.perf_counter() - t0, "tokens": store.manifest["tokens"],
                  "modules": len(store.modules()), "forward": store.manifest["seconds_forward"]}))
"""


def _sizes(shape: LlamaShape, tokens_padded: int) -> dict[str, float]:
    """MB of one block, the embedding, the model (float32) and the activations; float64 Grams."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * (shape.hidden // shape.heads)
    block = 2 * h + 2 * h * h + 2 * kv * h + 3 * h * i
    emb = shape.vocab * h
    grams_block = 8 * (3 * (h * h + h) + (i * i + i))
    return {"block": 4 * block / 1e6, "embedding": 4 * emb / 1e6, "model": 4 * shape.n_params / 1e6,
            "activations": 4 * tokens_padded * h / 1e6, "grams_block": grams_block / 1e6,
            "grams_all": (shape.layers * grams_block + 8 * (h * h + h)) / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mid-8,mid-32,smol")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    env = clean_env(args.threads)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    rows = []
    with tempfile.TemporaryDirectory(prefix="esm-ray-lw-bench-") as tmp:
        for case in args.cases.split(","):
            shape = CASES[case]
            fam = make_llama_family(shape, 0, log=lambda m: print(m, file=sys.stderr))
            rng = random.Random(0)
            data = Path(tmp) / f"{case}.jsonl"
            data.write_text("".join(json.dumps({"input_ids": [rng.randrange(3, shape.vocab)
                                                              for _ in range(args.max_length)]}) + "\n"
                                    for _ in range(args.samples)))
            sizes = _sizes(shape, args.samples * args.max_length)
            for mode in ("full", "layerwise"):
                cache = Path(tmp) / f"cache-{case}-{mode}"
                run = run_timed([sys.executable, "-c", CHILD, str(fam.base), str(data), str(cache), mode,
                                 args.samples, args.max_length, args.batch_size], env=env)
                if run.rc != 0:
                    print(run.err[-3000:], file=sys.stderr)
                    raise SystemExit(f"{case} {mode}: exit {run.rc}")
                res = json.loads(run.out.strip().splitlines()[-1])
                print(f"{case} {mode}: {res['seconds']:.1f}s, peak {run.peak_rss / 1e6:.0f} MB", file=sys.stderr)
                rows.append({"case": case, "layers": shape.layers, "params M": shape.n_params / 1e6, "mode": mode,
                             "tokens": res["tokens"], "wall s": run.wall, "calibration s": res["seconds"],
                             "cpu s": run.cpu, "peak RSS MB": run.peak_rss / 1e6,
                             "added MB": (run.peak_rss - res["base_rss"]) / 1e6,
                             "block MB": sizes["block"], "embedding MB": sizes["embedding"],
                             "model MB": sizes["model"], "activations MB": sizes["activations"],
                             "Grams block/all MB": f"{sizes['grams_block']:.1f} / {sizes['grams_all']:.0f}"})
    print(f"\n{args.samples} rows x {args.max_length} tokens, batch {args.batch_size}, {args.threads} threads; "
          "sizes in float32 (Grams float64); added = peak RSS above the RSS after imports\n")
    print_table(rows, [("case", "case"), ("layers", "layers"), ("params M", "params M"), ("mode", "mode"),
                       ("calibration s", "calibration s"), ("cpu s", "cpu s"), ("peak RSS MB", "peak RSS MB"),
                       ("added MB", "added MB"), ("block MB", "block MB"), ("embedding MB", "embedding MB"),
                       ("model MB", "model MB"), ("activations MB", "activations MB"),
                       ("Grams block/all MB", "Grams block/all MB")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
