"""Serving load: the routed model against the static merged model and the oracle-routed expert.

In one run, one private Ray on 127.0.0.1 hosts these Serve applications side by side (one
replica each, same CPU and thread settings), all on one loopback HTTP port:

  routed   ESM++ (prototype router)   requests without a task: routed per input
  sim      SiM-routed experts         requests without a task (when a SiM directory is given)
  static   the static merge (ESM)     requests name the task (its head is applied)
  expert   one fine-tuned expert      requests of its own task: the oracle-routed expert

For each concurrency level, each application gets a warm-up and then `--requests` requests from
that many client threads (keep-alive HTTP), applications in turn; the table gives p50 / p99
latency, requests/s and inputs/s. The memory table gives each model's weights on disk against T
full experts, and each replica's RSS as it reports it (GET /v1/model).

    .venv/bin/python benchmarks/serve_load.py --zoo ~/.cache/esm-ray/zoo/<hash>
        builds (once, cached) the ESM, ESM++ r=32 and SiM merges of the zoo, then measures
    .venv/bin/python benchmarks/serve_load.py --routed R --static S --expert TASK=E --zoo Z
    .venv/bin/python benchmarks/serve_load.py --tiny        # a tiny random model, a quick smoke run

With `--quality` it measures, instead of load, what the routing buys on the zoo's test split:
normalised accuracy of ESM++ (r = 8 and 32, prototype router) and of the SiM-routed experts,
against the static ESM merge (router "none", the same merged base) and oracle routing; routing
accuracy per router, with confusion-matrix PNGs (`--png-dir`); and SiM's routing accuracy for
several subspace ranks. The `sim` directories hold the prototypes as well, so both routers are
measured on the very same experts.

    .venv/bin/python benchmarks/serve_load.py --quality --zoo ~/.cache/esm-ray/zoo/<hash> --png-dir docs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Target:
    name: str
    model_dir: str
    heads: dict[str, str]
    with_task: bool                 # requests name their task
    tasks: list[str] | None = None  # tasks whose texts it receives (default: all)


# ---- models ------------------------------------------------------------------------------------

def _cache() -> Path:
    env = os.environ.get("ESM_RAY_BENCH_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "esm-ray" / "bench") / "serve"


ESM_PARAMS = {"preset": "roberta", "alpha": 1.0}  # the zoo's ESM entry (esm_ray.zoo.specs)


def merged(zoo, name: str) -> Path:
    """A merge of the zoo's experts, built once and cached: 'esm', 'esm_pp_r<r>' or 'sim_r<r>'."""
    from esm_ray.runtime import run_merge
    from esm_ray.zoo.specs import MethodEntry, spec_for

    import esm_ray.methods.esm_pp  # noqa: F401
    import esm_ray.methods.sim  # noqa: F401

    out = _cache() / zoo.root.name / name
    if (out / "config.json").is_file():
        return out
    if name == "esm":
        entry = MethodEntry("esm", ESM_PARAMS)
    else:
        method, _, r = name.rpartition("_r")
        entry = MethodEntry(method, {"base_method": "esm", "base_params": ESM_PARAMS, "rank": int(r)})
    print(f"building {name} -> {out}", flush=True)
    t0 = time.perf_counter()
    run_merge(spec_for(zoo, name, out, entry=entry), progress=False)
    print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def build_zoo_models(zoo_dir: str, rank: int, sim: bool) -> tuple[list[Target], dict[str, list[str]]]:
    """ESM (static), ESM++ and SiM merges of a zoo (cached), the first expert, and test texts."""
    from esm_ray.zoo.layout import open_zoo

    zoo = open_zoo(zoo_dir)
    root = _cache() / zoo.root.name
    for name in ["esm", f"esm_pp_r{rank}"] + ([f"sim_r{rank}"] if sim else []):
        merged(zoo, name)
    heads = {t: str(zoo.expert_dir(t)) for t in zoo.tasks}
    first = zoo.tasks[0]
    targets = [Target("routed", str(root / f"esm_pp_r{rank}"), {}, False)]
    if sim:
        targets.append(Target("sim", str(root / f"sim_r{rank}"), {}, False))
    targets += [Target("static", str(root / "esm"), heads, True),
                Target("expert", str(zoo.expert_dir(first)), {first: heads[first]}, True, [first])]
    texts = {t: [r["text"] for r in zoo.rows(t, "test")] for t in zoo.tasks}
    return targets, texts


def build_tiny_models(root: Path) -> tuple[list[Target], dict[str, list[str]]]:
    """A tiny random routed model (smoke run): reuses the test suite's in-memory family."""
    from tests.methods.test_routed import TASKS, _rows, make_family_in_memory, routed_in_memory
    from tests.integration.test_serve import WORDS, _tokenizer

    fam = make_family_in_memory()
    rm = routed_in_memory(fam, rank=8)
    rm.tokenizer = _tokenizer(root)
    rm.save(root / "routed")
    with rm.unwrapped() as plain:
        plain.save_pretrained(str(root / "static"))
    rm.tokenizer.save_pretrained(str(root / "static"))
    (root / "static" / "heads").mkdir()
    from safetensors.torch import save_file

    for t, h in rm.heads.items():
        save_file({"weight": h.linear.weight.detach().contiguous(), "bias": h.linear.bias.detach().contiguous()},
                  str(root / "static" / "heads" / f"{t}.safetensors"), metadata={"labels": "\t".join(h.labels)})
    texts = {t: [" ".join(WORDS[i - 5] for i in r["input_ids"]) for r in _rows(k, 64, seed=k)]
             for k, t in enumerate(TASKS)}
    return [Target("routed", str(root / "routed"), {}, False),
            Target("sim", str(root / "routed"), {}, False),
            Target("static", str(root / "static"), {}, True)], texts


# ---- load ----------------------------------------------------------------------------------------

def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_level(url: str, bodies: list[dict], concurrency: int) -> dict:
    import httpx

    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    chunks = [bodies[i::concurrency] for i in range(concurrency)]

    def client(chunk: list[dict]) -> None:
        nonlocal errors
        with httpx.Client(timeout=120) as c:
            for body in chunk:
                t0 = time.perf_counter()
                r = c.post(url, json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                    else:
                        errors += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, chunks))
    wall = time.perf_counter() - t0
    n_inputs = sum(len(b["inputs"]) for b in bodies)
    return {"p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
            "p99_ms": 1000 * _percentile(lat, 0.99) if lat else float("nan"),
            "req_s": len(lat) / wall, "inputs_s": n_inputs * len(lat) / max(len(bodies), 1) / wall,
            "errors": errors}


# ---- quality ---------------------------------------------------------------------------------------

def quality(zoo_dir: str, ranks: list[int], png_dir: str | None, split: str, sim_ranks: list[int]) -> dict:
    """Normalised accuracy and routing accuracy per router on the zoo (see the module docstring)."""
    import torch

    from esm_ray.core.routing import fit_subspace, sim_route, stack_subspaces
    from esm_ray.routed import load_routed
    from esm_ray.routed.evaluate import confusion_png, evaluate_routed
    from esm_ray.stats.data import load_calibration_rows
    from esm_ray.zoo.layout import open_zoo

    zoo = open_zoo(zoo_dir)
    tasks = zoo.tasks
    max_length = int(zoo.manifest.get("max_length", 64))
    data = {t: ([r["text"] for r in zoo.rows(t, split)], [int(r["label"]) for r in zoo.rows(t, split)]) for t in tasks}
    expert = {t: float(zoo.task(t)["metrics"]["expert"][split]) for t in tasks}
    rows: list[tuple[str, dict]] = []
    confusions: dict[str, list] = {}
    for r in ranks:
        d = merged(zoo, f"sim_r{r}")
        model = load_routed(d)
        t0 = time.perf_counter()
        res = evaluate_routed(model, data, ["none", "prototype", "sim", "oracle"], expert, batch_size=64,
                              max_length=max_length)
        print(f"evaluated sim_r{r} in {time.perf_counter() - t0:.0f} s", flush=True)
        if r == ranks[0]:
            rows.append(("static ESM (router none)", res["routers"]["none"]))
        rows += [(f"ESM++ r={r} (prototype router)", res["routers"]["prototype"]),
                 (f"SiM-routed experts r={r}", res["routers"]["sim"]),
                 (f"oracle routing r={r}", res["routers"]["oracle"])]
        confusions[f"prototype_r{r}"] = res["routers"]["prototype"]["confusion"]
        confusions[f"sim_r{r}"] = res["routers"]["sim"]["confusion"]
    # SiM routing accuracy against the subspace rank, from the same support rows the merge used
    model = load_routed(merged(zoo, f"sim_r{ranks[0]}"))
    man = model.manifest["sim"]

    def feats(texts: list[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), 64):
            ids, mask = model.encode(texts[s:s + 64], max_length)
            out.append(model.backbone_features(ids, mask))
        return torch.cat(out).double()

    support = {t: feats([r["text"] for r in load_calibration_rows(str(zoo.calib_path(t)), man["samples"], 0)])
               for t in tasks}
    test = torch.cat([feats(data[t][0]) for t in tasks])
    truth = torch.cat([torch.full((len(data[t][0]),), i) for i, t in enumerate(tasks)])
    sweep = {}
    for k in sim_ranks:
        for center in (True, False):
            means, bases = stack_subspaces([fit_subspace(support[t], k, center=center, normalize=True) for t in tasks])
            choice, _ = sim_route(test, means, bases, normalize=True)
            per_task = [float((choice[truth == i] == i).float().mean()) for i in range(len(tasks))]
            sweep[f"k={k} {'centred' if center else 'uncentred'}"] = sum(per_task) / len(per_task)

    print()
    print(f"zoo {zoo.root.name}: {len(tasks)} tasks, split {split}, "
          f"{sum(len(v[0]) for v in data.values())} samples in mixed-task batches")
    print()
    head = "| model | avg acc | avg norm. acc | task-unknown norm. acc | routing acc |" + "".join(
        f" {t} |" for t in tasks)
    print(head)
    print("|---" * (5 + len(tasks)) + "|")
    for name, r in rows:
        a = r["average"]
        cells = "".join(f" {100 * r['tasks'][t]['normalized']:.1f} |" for t in tasks)
        ra = f"{100 * a['routing_accuracy']:.1f}" if "routing_accuracy" in a else "-"
        print(f"| {name} | {100 * a['accuracy']:.1f} | {100 * a['normalized']:.1f} | "
              f"{100 * a['normalized_task_unknown']:.1f} | {ra} |{cells}")
    print()
    print("| router | " + " | ".join(tasks) + " | mean |")
    print("|---" * (len(tasks) + 2) + "|")
    for name, conf in confusions.items():
        c = torch.tensor(conf, dtype=torch.float64)
        acc = (c.diag() / c.sum(1).clamp_min(1)).tolist()
        print(f"| {name} | " + " | ".join(f"{100 * x:.1f}" for x in acc) + f" | {100 * sum(acc) / len(acc):.1f} |")
    print()
    print("SiM routing accuracy by subspace rank (support = the merge's calibration rows, normalised features):")
    for k, v in sweep.items():
        print(f"  {k:<16} {100 * v:.1f} %")
    if png_dir:
        for name, conf in confusions.items():
            p = confusion_png(conf, tasks, Path(png_dir) / f"routed_confusion_{name}.png",
                              f"{name} ({split})")
            print(f"wrote {p}")
    return {"rows": rows, "confusions": confusions, "sim_rank_sweep": sweep}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", help="a built zoo: test texts (and the models, unless given)")
    ap.add_argument("--routed", help="routed directory (ESM++)")
    ap.add_argument("--sim", help="SiM routed directory")
    ap.add_argument("--static", help="static merged directory (heads from the zoo's experts)")
    ap.add_argument("--expert", help="TASK=EXPERT_DIR for the oracle-routed expert")
    ap.add_argument("--rank", type=int, default=32, help="ESM++ rank when building from the zoo")
    ap.add_argument("--no-sim", action="store_true", help="skip the SiM application")
    ap.add_argument("--tiny", action="store_true", help="tiny random model, for a smoke run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=200, help="requests per application and level")
    ap.add_argument("--inputs", type=int, default=1, help="inputs per request")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--quality", action="store_true", help="routing quality on the zoo instead of load")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32], help="--quality: expert ranks")
    ap.add_argument("--sim-ranks", type=int, nargs="+", default=[2, 4, 8, 16, 24], help="--quality: SiM ranks")
    ap.add_argument("--split", default="test", help="--quality: zoo split")
    ap.add_argument("--png-dir", help="--quality: where the confusion-matrix PNGs go")
    args = ap.parse_args(argv)
    if args.quality:
        if not args.zoo:
            ap.error("--quality needs --zoo")
        res = quality(args.zoo, args.ranks, args.png_dir, args.split, args.sim_ranks)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str))
        return 0

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # everything on 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.TemporaryDirectory(prefix="esm-ray-serve-bench-")
    if args.tiny:
        targets, texts = build_tiny_models(Path(tmp.name))
    elif args.routed or args.static:
        from esm_ray.zoo.layout import open_zoo

        if not args.zoo:
            ap.error("--zoo is needed for the test texts (and the static model's heads)")
        zoo = open_zoo(args.zoo)
        texts = {t: [r["text"] for r in zoo.rows(t, "test")] for t in zoo.tasks}
        heads = {t: str(zoo.expert_dir(t)) for t in zoo.tasks}
        targets = []
        if args.routed:
            targets.append(Target("routed", args.routed, {}, False))
        if args.sim:
            targets.append(Target("sim", args.sim, {}, False))
        if args.static:
            targets.append(Target("static", args.static, heads, True))
        if args.expert:
            task, _, d = args.expert.partition("=")
            targets.append(Target("expert", d, {task: d}, True, [task]))
    elif args.zoo:
        targets, texts = build_zoo_models(args.zoo, args.rank, not args.no_sim)
    else:
        ap.error("give --zoo, explicit model directories, or --tiny")

    import httpx
    import ray
    from ray import serve

    from esm_ray.serve import ServeOptions, build, free_port
    from esm_ray.spec import ServeSpec

    ray.init(num_cpus=max(2, len(targets)), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    spec = ServeSpec(num_cpus=1, max_ongoing_requests=64, max_batch_size=args.max_batch_size,
                     batch_wait_timeout_s=args.batch_wait_timeout_s)
    routers = {"routed": "prototype", "sim": "sim"}
    for t in targets:
        opts = ServeOptions(model_dir=t.model_dir, heads=t.heads, router=routers.get(t.name),
                            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                            threads=args.threads, max_inputs_per_request=max(64, args.inputs))
        serve.run(build(opts, spec, max_queued_requests=-1), name=t.name, route_prefix=f"/{t.name}")
        print(f"deployed {t.name}: {t.model_dir}", flush=True)

    rng = random.Random(args.seed)
    pool = [(task, x) for task, xs in texts.items() for x in xs]
    results: list[dict] = []
    info = {}
    with httpx.Client(timeout=60) as c:
        for t in targets:
            info[t.name] = c.get(f"{base}/{t.name}/v1/model").json()
    for conc in args.concurrency:
        for t in targets:
            mine = [p for p in pool if t.tasks is None or p[0] in t.tasks]
            bodies = []
            for _ in range(args.requests + 10):
                picks = [rng.choice(mine) for _ in range(args.inputs)]
                body: dict = {"inputs": [x for _, x in picks]}
                if t.with_task:  # one task per request: the one of its first input
                    body = {"inputs": [x for task, x in picks if task == picks[0][0]], "task": picks[0][0]}
                bodies.append(body)
            url = f"{base}/{t.name}/v1/predict"
            run_level(url, bodies[:10], min(conc, 10))  # warm-up
            r = run_level(url, bodies[10:], conc)
            results.append({"app": t.name, "concurrency": conc, **r})
            print(f"  {t.name:<7} c={conc:<3} p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                  f"{r['req_s']:7.1f} req/s  errors {r['errors']}", flush=True)
    with httpx.Client(timeout=60) as c:
        for t in targets:
            info[t.name]["replica"] = c.get(f"{base}/{t.name}/v1/model").json()["replica"]
    serve.shutdown()
    ray.shutdown()
    tmp.cleanup()

    print()
    print(f"serving load: {args.requests} requests x {args.inputs} input(s) per app and level; one replica each "
          f"({args.threads} torch thread), max_batch_size {args.max_batch_size}, batch wait "
          f"{1000 * args.batch_wait_timeout_s:.0f} ms; loopback HTTP")
    print()
    print("| app | concurrency | p50 ms | p99 ms | requests/s | inputs/s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['app']} | {r['concurrency']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['req_s']:.1f} | "
              f"{r['inputs_s']:.1f} | {r['errors']} |")
    print()
    print("| app | tasks | routed layers | rank | weights on disk MB | T full experts MB | ratio | replica RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ref = info["routed"]["sizes"] if "routed" in info else None
    for t in targets:
        s = info[t.name]["sizes"]
        rss = info[t.name]["replica"]["rss_bytes"]
        full = (ref or s)["full_experts_bytes"]
        print(f"| {t.name} | {s['tasks']} | {s['routed_layers']} | {s['rank']} | {s['total_bytes'] / 1e6:.1f} | "
              f"{full / 1e6:.1f} | {s['total_bytes'] / full:.3f} | {(rss or 0) / 1e6:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "models": info}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
