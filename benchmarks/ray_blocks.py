"""The Ray coordinator's peak memory with and without row blocks, for T = 2, 4, 8 experts.

    python benchmarks/ray_blocks.py [--rows 16384 --cols 512] [--experts 2 4 8] [--method task_arithmetic]

A model of one large embedding (rows x cols float32) and two small tensors; T experts. Each
merge runs on a private local Ray (one ExpertWorker per expert, 0.25 CPU each, one
Coordinator), once with row blocks (block_bytes 4 MiB, the default: on Ray each block has 1/T
the rows, so the T parts of a block together are about 4 MiB) and once with every tensor whole
(block_bytes above the largest tensor). The coordinator actor's peak RSS is read from the
actor itself after the merge (`Coordinator.peak_rss`), next to its RSS before the merge (the
Python + Ray + torch floor), and both outputs are compared byte for byte. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _util import print_table  # noqa: E402

MB = 1 << 20


def write_family(root: Path, rows: int, cols: int, n: int) -> dict[str, Path]:
    """base/ and expert_{i}/ with one large embedding, a norm and a small projection."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(rows, cols, generator=g),
            "model.norm.weight": torch.ones(cols), "lm_head.weight": torch.randn(64, cols, generator=g)}
    out = {}
    for name in ["base"] + [f"expert_{i}" for i in range(n)]:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        sd = base if name == "base" else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": cols, "vocab_size": rows}))
        out[name] = d
    return out


def one_run(fam: dict[str, Path], t: int, method: str, out: Path, block_bytes: int) -> dict[str, float]:
    import ray

    from esm_ray.runtime.plan import build_plan
    from esm_ray.runtime.ray_executor import NAMESPACE, Coordinator, RayPool, worker_options
    from esm_ray.spec import spec_from_dict

    spec = spec_from_dict({"base": str(fam["base"]), "output": str(out), "method": {"name": method},
                           "experts": [{"name": f"e{i}", "model": str(fam[f"expert_{i}"])} for i in range(t)],
                           "runtime": {"name": "ray", "num_cpus_per_worker": 0.25}})
    plan = build_plan(spec)
    pool = RayPool.start(spec, worker_options(spec.runtime, ray.cluster_resources()), f"blocks-{t}-{block_bytes}",
                         log_level=logging.WARNING)
    coord = None
    try:
        pool.wait_ready()
        coord = Coordinator.options(namespace=NAMESPACE).remote(plan, pool.actor_names, pool.names, True,
                                                                logging.WARNING, block_bytes)
        floor = ray.get(coord.peak_rss.remote())
        t0 = time.perf_counter()
        result = ray.get(coord.run.remote())
        wall = time.perf_counter() - t0
        peak = ray.get(coord.peak_rss.remote())
        workers = max(pool.peak_rss())
    finally:
        if coord is not None:
            ray.kill(coord, no_restart=True)
        pool.close()
    return {"floor": floor / MB, "peak": peak / MB, "workers": workers / MB, "wall": wall,
            "blocks": (result.report.get("row_blocks") or {}).get("blocks", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--method", default="task_arithmetic")
    args = ap.parse_args()

    import ray

    from esm_ray.raylocal import init_private
    from esm_ray.runtime.plan import BLOCK_BYTES
    from tests.fixtures.ray import output_files

    root = Path(tempfile.mkdtemp(prefix="esm-ray-blocks-"))
    rows_out = []
    try:
        fam = write_family(root / "fam", args.rows, args.cols, max(args.experts))
        largest = args.rows * args.cols * 4
        init_private(4, namespace="esm-ray", log_to_driver=False)
        try:
            for t in args.experts:
                res = {}
                for label, bb in (("on", BLOCK_BYTES), ("off", 4 * largest)):
                    out = root / f"out-{t}-{label}"
                    res[label] = one_run(fam, t, args.method, out, bb)
                    rows_out.append({"T": t, "blocks": f"{label} ({res[label]['blocks']})",
                                     "floor": res[label]["floor"], "peak": res[label]["peak"],
                                     "above": res[label]["peak"] - res[label]["floor"],
                                     "workers": res[label]["workers"], "wall": res[label]["wall"]})
                same = output_files(root / f"out-{t}-on") == output_files(root / f"out-{t}-off")
                rows_out[-1]["same bytes"] = rows_out[-2]["same bytes"] = "yes" if same else "NO"
                for label in ("on", "off"):
                    shutil.rmtree(root / f"out-{t}-{label}")
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.method}: one {args.rows}x{args.cols} float32 embedding ({largest / MB:.0f} MiB) per model; "
          f"row blocks of {BLOCK_BYTES / MB:.0f} MiB / T; RSS in MiB")
    print_table(rows_out, [("T", "T"), ("blocks", "blocks (count)"), ("floor", "coordinator before"),
                           ("peak", "coordinator peak"), ("above", "peak - before"),
                           ("workers", "largest worker peak"), ("wall", "merge s"), ("same bytes", "same bytes")])


if __name__ == "__main__":
    main()
