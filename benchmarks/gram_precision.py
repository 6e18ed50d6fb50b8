"""Gram precision: the error of the mixed accumulation and its effect on merged weights.

    python benchmarks/gram_precision.py [--zoo DIR] [--samples 16] [--threads 2]

1. Statistics: `calibrate` with `gram_precision: float64` and `mixed` on the same rows, for
   all-MiniLM-L6-v2 (the packaged model, on the zoo's calibration text when --zoo is given,
   else on the input ids of a fixed-seed token list) and a tiny random LLaMA. Per model, the
   largest relative Frobenius error ||G_mixed − G_64|| / ||G_64|| over the distinct inputs.
2. Merged weights: the same merge run with each precision (ESM and task_arithmetic+PAVE on the
   tiny LLaMA family; on the zoo's MiniLM experts when --zoo is given), and the largest
   relative Frobenius difference over the output tensors.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gram_error(model, rows, tok, samples: int) -> float:
    from esm_ray.spec import CalibrationSpec
    from esm_ray.stats.calibrate import calibrate

    out = {}
    for prec in ("float64", "mixed"):
        st = calibrate(model, rows, tok, CalibrationSpec(samples=samples, max_length=64, batch_size=8,
                                                         gram_precision=prec))
        out[prec] = {id_: s for id_, s in st.items()}
    errs = [float((out["mixed"][m].gram - s.gram).norm() / s.gram.norm()) for m, s in out["float64"].items()]
    return max(errs)


def merged_difference(spec: dict, root: Path) -> float:
    from safetensors.torch import load_file

    from esm_ray.runtime import run_merge
    from esm_ray.spec import spec_from_dict

    outs = {}
    for prec in ("float64", "mixed"):
        s = dict(spec, output=str(root / f"out-{prec}"))
        s["calibration"] = dict(spec["calibration"], gram_precision=prec, cache_dir=str(root / f"cache-{prec}"))
        run_merge(spec_from_dict(s), progress=False)
        outs[prec] = {}
        for f in sorted((root / f"out-{prec}").glob("*.safetensors")):
            outs[prec].update(load_file(str(f)))
    worst = 0.0
    for name, ref in outs["float64"].items():
        ref64, got = ref.double(), outs["mixed"][name].double()
        if ref64.norm() > 0:
            worst = max(worst, float((got - ref64).norm() / ref64.norm()))
    return worst


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModel, AutoTokenizer

    from esm_ray.zoo.sources import minilm_dir
    from tests.fixtures.models import make_family
    from tests.fixtures.ray import calibration_files, merge_spec

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", help="a built (or partly built) encoder zoo: base/, experts/<task>/, data/<task>/calib.jsonl")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo) if args.zoo else None
    tasks = sorted(p.name for p in (zoo / "experts").iterdir() if (p / "model.safetensors").is_file()) if zoo else []

    d = minilm_dir()
    model, tok = AutoModel.from_pretrained(str(d)).eval(), AutoTokenizer.from_pretrained(str(d))
    if tasks:
        from esm_ray.stats.data import load_calibration_rows
        rows = load_calibration_rows(str(zoo / "data" / tasks[0] / "calib.jsonl"), args.samples, 0)
    else:
        rng = random.Random(0)
        rows = [{"input_ids": [rng.randrange(1000, 20000) for _ in range(48)]} for _ in range(args.samples)]
    print(f"MiniLM Gram, {len(rows)} rows: max relative error {gram_error(model, rows, tok, args.samples):.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fam = make_family(root / "llama", "llama", 3, seed=0)
        data = calibration_files(root / "data", 3, vocab=80)
        from transformers import LlamaForCausalLM
        lm = LlamaForCausalLM.from_pretrained(str(fam["expert_0"])).eval()
        from esm_ray.stats.data import load_calibration_rows
        lrows = load_calibration_rows(str(data[0]), 12, 0)
        print(f"tiny LLaMA Gram: max relative error {gram_error(lm, lrows, None, 12):.2e}")
        cases = [("esm", None), ("task_arithmetic", "pave")]
        for method, purify in cases:
            spec = merge_spec(fam, root / "unused", method, purify=purify, data=data, seed=7)
            diff = merged_difference(spec, root / f"m-{method}-{purify}")
            print(f"tiny LLaMA {method}{'+' + purify if purify else ''}: max relative tensor difference {diff:.2e}")
        if tasks:
            experts = [{"name": t, "model": str(zoo / "experts" / t), "data": str(zoo / "data" / t / "calib.jsonl")}
                       for t in tasks]
            for method, purify in cases:
                spec = {"base": str(zoo / "base"), "experts": experts, "method": {"name": method},
                        "output": "unused", "calibration": {"samples": args.samples, "max_length": 64, "batch_size": 8},
                        "runtime": {"name": "local"}, "seed": 7}
                if purify:
                    spec["purify"] = {"name": purify}
                diff = merged_difference(spec, root / f"z-{method}-{purify}")
                print(f"MiniLM zoo ({len(tasks)} experts) {method}{'+' + purify if purify else ''}: "
                      f"max relative tensor difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
