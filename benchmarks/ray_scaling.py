"""Ray executor scaling: the per-expert stages with 1 and 2 expert workers at a time.

    python benchmarks/ray_scaling.py [--experts 4] [--method esm] [--hidden 512 --layers 4]

Runs the two stages that happen on the expert side, once with one worker busy at a time (the
experts one after another, as one worker would) and once with two at a time, on the same
ExpertWorker actors (one per expert, 1 CPU and 1 torch thread each) of a private local Ray:

- calibration: a forward pass of each expert over its samples, accumulating LayerStats
  (the statistics cache is emptied before each run);
- decomposition: `prepare` on every tensor, layer group by layer group, as the coordinator
  asks for it (for ESM: the essential-subspace factors of each linear layer).

It also reports the bytes the parts of one transformer block take through the object store
(pickled, all experts) against the dense alternative, T x d_out x d_in float32 per matrix, and
each worker's peak resident memory, and the coordinator's fusion time for the same parts.
"workers busy N cores" is the workers' CPU time over the wall time: with two free cores the
2-wide runs reach about 2; less means other processes on the machine took the rest, and the
speed-up of that run says more about the machine's load than about the executor. Prints one
table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _util import LlamaShape, cache_root, make_llama_family, print_table  # noqa: E402


def write_data(root: Path, n: int, vocab: int, rows: int, length: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rng = random.Random(1000 + i)
        p = root / f"task_{i}.jsonl"
        p.write_text("".join(json.dumps({"input_ids": [rng.randrange(3, vocab) for _ in range(length)]}) + "\n"
                             for _ in range(rows)))
        out.append(p)
    return out


CPU: dict[str, float] = {}  # worker CPU seconds spent in the last run_stage call


def run_stage(workers, method: str, pool_id: str, journal, args: tuple, concurrency: int) -> tuple[float, list]:
    """Call `method` on every worker, `concurrency` at a time; (seconds, results in order).
    CPU["last"] is the CPU time the workers spent on it."""
    import ray

    c0 = sum(ray.get([w.cpu_seconds.remote() for w in workers]))
    t0 = time.perf_counter()
    results = []
    for start in range(0, len(workers), concurrency):
        wave = workers[start:start + concurrency]
        results += ray.get([w.call.remote(method, pool_id, journal[start + j], args) for j, w in enumerate(wave)])
    wall = time.perf_counter() - t0
    CPU["last"] = sum(ray.get([w.cpu_seconds.remote() for w in workers])) - c0
    return wall, results


def fuse_group(plan, base, group, parts) -> float:
    """Seconds the coordinator's fuse takes for one group (the job's code path, 1 thread)."""
    import torch

    from esm_ray.methods import ExpertContext
    from esm_ray.runtime.threads import torch_threads

    ctxs = [ExpertContext(i, e.name, e.weight, e.density) for i, e in enumerate(plan.spec.experts)]
    t0 = time.perf_counter()
    with torch_threads(1):
        for j, info in enumerate(group):
            plan.method.fuse(info, base.get(info.name).to(torch.float32), [p[j] for p in parts], ctxs)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--method", default="esm")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest counts")
    ap.add_argument("--address", help="an existing Ray (default: a private local one)")
    ap.add_argument("--json", help="also write the measurements here")
    ap.add_argument("--zoo", help="a built zoo (e.g. `esm-ray zoo lm`): its base, experts and calibration rows "
                                  "instead of the synthetic family (--experts: the first N of its experts)")
    ap.add_argument("--equal", action="store_true",
                    help="with --zoo: also merge the zoo once locally and once with --runtime ray (2 workers) "
                         "and compare the output files byte for byte")
    ap.add_argument("--equal-only", action="store_true", help="with --zoo: only the --equal comparison, no timings")
    args = ap.parse_args(argv)
    if args.equal_only:
        args.equal, args.repeats = True, 0
    logging.basicConfig(level=logging.WARNING)

    import ray

    from esm_ray.io.reader import open_model
    from esm_ray.methods import TensorInfo
    from esm_ray.runtime.layout import layer_groups as _groups
    from esm_ray.runtime.layout import linear_module as _module
    from esm_ray.runtime.plan import build_plan
    from esm_ray.runtime.ray_executor import RayPool, ray_session, worker_options
    from esm_ray.spec import spec_from_dict

    load0 = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cache_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="esm-ray-scaling-", dir=cache_root()))
    stats_cache = work / "stats"
    if args.zoo:
        from esm_ray.zoo.layout import open_zoo

        zoo = open_zoo(args.zoo)
        names = zoo.tasks[:args.experts]
        length = int(zoo.manifest.get("max_length", args.length))
        raw = {"base": str(zoo.base_dir), "output": str(work / "unused"),
               "experts": [{"name": n, "model": str(zoo.expert_dir(n)), "data": str(zoo.calib_path(n))} for n in names]}
        model_name = f"zoo {zoo.manifest.get('hash')} ({zoo.manifest.get('backbone', {}).get('class', zoo.kind)})"
    else:
        shape = LlamaShape(f"scaling-h{args.hidden}-l{args.layers}", args.hidden, args.layers, args.intermediate,
                           heads=8, kv_heads=8, vocab=args.vocab, tied=False)
        fam = make_llama_family(shape, args.experts)
        data = write_data(work / "data", args.experts, args.vocab, args.samples, args.length)
        raw = {"base": str(fam.base), "output": str(work / "unused"),
               "experts": [{"name": f"e{i}", "model": str(d), "data": str(data[i])}
                           for i, d in enumerate(fam.experts)]}
        model_name, length = f"synthetic LLaMA {shape.name}", args.length
    raw.update({"method": {"name": args.method},
                "calibration": {"samples": args.samples, "max_length": length, "batch_size": 8,
                                "cache_dir": str(stats_cache)},
                "runtime": {"name": "ray", "address": args.address, "num_cpus_per_worker": 1,
                            "num_gpus_per_worker": 0}})
    spec = spec_from_dict(raw)
    plan = build_plan(spec)
    t = args.experts
    rows: list[dict] = []
    n_params = sum(shape_numel(sh) for sh in plan.shapes.values())
    measured: dict = {"model": model_name, "params": n_params, "experts": t, "method": args.method,
                      "cores": os.cpu_count()}
    try:
        if not args.equal_only:
            with ray_session(spec.runtime, n_workers=t):  # T actors exist; at most 2 compute at once
                imports = tuple(type(m).__module__ for m in (plan.method, plan.purifier) if m is not None)
                pool = RayPool.start(spec, worker_options(spec.runtime, ray.cluster_resources()), "scaling",
                                     imports=imports)
                pool.wait_ready()
                w, pid = pool.workers, pool.id
                none = [[] for _ in w]
                times: dict[str, dict[int, float]] = {"calibration": {}, "decomposition": {}}
                cpu: dict[str, dict[int, float]] = {"calibration": {}, "decomposition": {}}
                parts_bytes: dict[str, int] = {}
                base = open_model(spec.base)
                fuse_s = 0.0
                # warm-up, untimed: imports, model classes, page cache
                if plan.needs_stats:
                    run_stage(w, "calibrate", pid, none, (), 2)
                for rep in range(args.repeats):
                    for conc in ((1, 2) if rep % 2 == 0 else (2, 1)):
                        if plan.needs_stats:
                            shutil.rmtree(stats_cache, ignore_errors=True)
                            s, mods = run_stage(w, "calibrate", pid, none, (), conc)
                            if s < times["calibration"].get(conc, float("inf")):
                                times["calibration"][conc], cpu["calibration"][conc] = s, CPU["last"]
                            modules = set(mods[0])
                        else:
                            modules = set()
                        journal = [[("calibrate", ray.put(()))] if plan.needs_stats else [] for _ in w]
                        infos = [TensorInfo.of(n, plan.shapes[n], _module(n, modules)) for n in plan.names]
                        floating = [i for i in infos if plan.dtypes[i.name].is_floating_point]
                        total = total_cpu = 0.0
                        for group in _groups(floating, 64 << 20):
                            s, parts = run_stage(w, "prepare", pid, journal, (group,), conc)
                            total += s
                            total_cpu += CPU["last"]
                            if rep == 0 and conc == 1:
                                if group[0].layer_index is not None:
                                    for j, info in enumerate(group):
                                        parts_bytes[info.name] = sum(len(pickle.dumps(p[j])) for p in parts)
                                fuse_s += fuse_group(plan, base, group, parts)
                        if total < times["decomposition"].get(conc, float("inf")):
                            times["decomposition"][conc], cpu["decomposition"][conc] = total, total_cpu
                rss = pool.peak_rss()
                pool.close()
        if args.equal:
            measured["equal"] = merge_both(raw, work)
            rows.append({"m": "local vs Ray (2 workers) output", "v": "identical" if measured["equal"]["identical"]
                         else "DIFFERENT", "n": f"{measured['equal']['files']} files compared byte for byte; "
                         f"merge {measured['equal']['local_s']:.0f} s local, {measured['equal']['ray_s']:.0f} s Ray"})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if not args.equal_only:
        rows = timing_rows(rows, measured, times, cpu, parts_bytes, plan, t, fuse_s, rss)
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=2))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nRay scaling: {args.method}, {model_name} ({n_params / 1e6:.1f}M params), "
          f"T={t} experts, {os.cpu_count()} cores (load average before: {load0}; after: {load}), "
          f"1 CPU and 1 torch thread per worker\n")
    print_table(rows, [("m", "measure"), ("v", "value"), ("n", "note")])
    return 0


def timing_rows(rows: list, measured: dict, times: dict, cpu: dict, parts_bytes: dict, plan, t: int, fuse_s: float,
                rss: list) -> list:
    """The table rows (and `measured` entries) of the stage timings."""
    for stage, by in times.items():
        if not by:
            continue
        speed = by[1] / by[2]
        busy = {c: cpu[stage][c] / by[c] for c in by}  # cores the workers kept busy on average
        rows.append({"m": f"{stage}, 1 worker at a time", "v": f"{by[1]:.2f} s",
                     "n": f"{t} experts one after another; workers busy {busy[1]:.2f} cores"})
        rows.append({"m": f"{stage}, 2 workers at a time", "v": f"{by[2]:.2f} s",
                     "n": f"speed-up {speed:.2f}x; workers busy {busy[2]:.2f} cores"})
        measured[stage] = {"1": by[1], "2": by[2], "speedup": speed, "cpu_s": cpu[stage], "busy_cores": busy}
    layer0 = {n: b for n, b in parts_bytes.items() if ".layers.0." in n}
    dense = sum(t * shape_numel(plan.shapes[n]) * 4 for n in layer0)
    dense_2d = sum(t * shape_numel(plan.shapes[n]) * 4 for n in layer0 if len(plan.shapes[n]) == 2)
    ours = sum(layer0.values())
    rows.append({"m": "object store per block (parts, all experts)", "v": f"{ours / 1e6:.2f} MB",
                 "n": f"{ours / dense:.2f}x of dense {dense / 1e6:.2f} MB (T x d_out x d_in float32)"})
    measured["bytes_per_block"] = {"parts": ours, "dense": dense, "dense_matrices": dense_2d}
    rows.append({"m": "fusion on the coordinator (1 thread)", "v": f"{fuse_s:.2f} s",
                 "n": "all tensors, T parts each; not spread over workers"})
    measured["fusion_s"] = fuse_s
    rows.append({"m": "peak RSS per worker (max of T)", "v": f"{max(rss) / 1e6:.0f} MB",
                 "n": f"one expert + base readers, stats; min {min(rss) / 1e6:.0f} MB"})
    measured["peak_rss_per_worker"] = rss
    return rows


def merge_both(raw: dict, work: Path) -> dict:
    """Merge the spec once with the local runtime and once on Ray (2 workers, fresh statistics
    each), and compare every output file byte for byte."""
    import hashlib

    from esm_ray.runtime import run_merge
    from esm_ray.spec import spec_from_dict

    out: dict = {}
    digests = {}
    for rt in ("local", "ray"):
        r = json.loads(json.dumps(raw))
        r["output"] = str(work / f"merged-{rt}")
        r["calibration"]["cache_dir"] = str(work / f"stats-{rt}")
        r["runtime"] = ({"name": "local"} if rt == "local" else
                        dict(raw["runtime"]))
        t0 = time.perf_counter()
        run_merge(spec_from_dict(r), progress=False)
        out[f"{rt}_s"] = time.perf_counter() - t0
        digests[rt] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in sorted(Path(r["output"]).glob("*.safetensors"))}
    out["files"] = len(digests["local"])
    out["identical"] = bool(digests["local"]) and digests["local"] == digests["ray"]
    return out


def shape_numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
