"""Search-step time of the Concrete / AdaMerging methods: local executor vs Ray at 1 and 2 CPUs.

    python benchmarks/search_steps.py [--zoo DIR] [--methods concrete_ta adamerging] [--steps 5]
                                      [--settings local ray-1cpu ray-2cpu] [--repeats 1] [--json PATH]

Each method of the zoo's METHOD_TABLE runs `--steps` search steps (Concrete AdaMerging: that
many outer and AdaMerging steps) through `run_merge`, in this process, once per setting:

- local:     the local executor, the experts one after another in this process;
- ray-N cpu: a private Ray on 127.0.0.1 started here with `ray.init(num_cpus=N)`, the T expert
  workers at N/T logical CPUs each, and the Ray processes pinned (CPU affinity, inherited from
  this process at `ray.init`) to N cores: logical CPUs alone do not stop two actors from
  running at once. The Ray is shut down after each setting.

Seconds per step, and the part of it spent waiting for the experts' entropy gradients, come
from the merge report (`method_report.search`); the rest of a step is the coordinator's (merge
θ, sum the gradients, backward through the merge formula, Adam). The setup of the search
(task vectors, the experts' models) is not in it. Every setting runs with 1 torch thread per
expert (`num_cpus_per_worker` <= 1), so the executors should write the same bits: the
*.safetensors files of each run are compared byte for byte with the method's first run.
With `--repeats` > 1 the fastest run counts. Prints one Markdown table; progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _util import cache_root, print_table  # noqa: E402

SETTINGS = ("local", "ray-1cpu", "ray-2cpu")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_setting(s: str) -> int | None:
    """None for 'local', N for 'ray-<N>cpu'."""
    if s == "local":
        return None
    if s.startswith("ray-") and s.endswith("cpu") and s[4:-3].isdigit() and int(s[4:-3]) > 0:
        return int(s[4:-3])
    raise SystemExit(f"unknown setting {s!r}: use local or ray-<N>cpu")


@contextlib.contextmanager
def pinned(n: int) -> Iterator[list[int]]:
    """This process (and what it starts meanwhile) on the first `n` of its allowed cores."""
    old = os.sched_getaffinity(0)
    cores = sorted(old)[:n]
    if len(cores) < n:
        say(f"  only {len(cores)} cores available for {n} CPUs; the Ray runs oversubscribed")
    os.sched_setaffinity(0, cores)
    try:
        yield cores
    finally:
        os.sched_setaffinity(0, old)


@contextlib.contextmanager
def private_ray(n: int) -> Iterator[None]:
    """A local Ray with `n` logical CPUs, listening on 127.0.0.1 only; shut down on exit."""
    import ray

    from esm_ray.runtime.ray_executor import NAMESPACE, _loopback_only

    if ray.is_initialized():
        raise SystemExit("Ray is already initialised in this process")
    _loopback_only()
    ray.init(num_cpus=n, include_dashboard=False, namespace=NAMESPACE, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def output_digest(out: Path) -> str:
    """sha256 over the *.safetensors files of a merged model (names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(out.rglob("*.safetensors")):
        h.update(str(p.relative_to(out)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def make_spec(zoo, method: str, steps: int, output: Path, cpus: int | None):
    from esm_ray.spec import RuntimeSpec
    from esm_ray.zoo.specs import METHOD_TABLE, spec_for

    entry = METHOD_TABLE[method]
    params = dict(entry.params, steps=steps)
    if "adamerging_steps" in params:
        params["adamerging_steps"] = steps
    spec = spec_for(zoo, method, output, entry=replace(entry, params=params))
    if cpus is None:
        return spec
    per_worker = min(1.0, cpus / len(spec.experts))  # all T workers fit; 1 torch thread each
    return spec.model_copy(update={"runtime": RuntimeSpec(name="ray", num_cpus_per_worker=per_worker,
                                                          num_gpus_per_worker=0)})


def run_one(zoo, method: str, steps: int, setting: str, out: Path) -> dict[str, Any]:
    from esm_ray.runtime import run_merge

    cpus = parse_setting(setting)
    spec = make_spec(zoo, method, steps, out, cpus)
    with contextlib.ExitStack() as stack:
        if cpus is not None:
            stack.enter_context(pinned(cpus))
            stack.enter_context(private_ray(cpus))
        t0 = time.perf_counter()  # the merge alone, not ray.init / shutdown
        res = run_merge(spec, progress=False)
        wall = time.perf_counter() - t0
    search = res.report.get("method_report", {}).get("search", {})
    s_step = float(search.get("seconds_per_step", float("nan")))
    e_step = float(search.get("expert_seconds_per_step", float("nan")))
    return {"method": method, "setting": setting, "steps_run": search.get("steps", 0),
            "merge_s": wall, "search_s": res.timings.get("search"), "s_step": s_step,
            "expert_s_step": e_step, "coord_s_step": s_step - e_step,
            "objective_last": search.get("objective_last"), "digest": output_digest(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", help="a built zoo (default: the reduced zoo, built or reused)")
    ap.add_argument("--methods", nargs="+", default=["concrete_ta", "adamerging"],
                    help="METHOD_TABLE entries: concrete_ta, adamerging, concrete_adamerging")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), help="local, ray-<N>cpu")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting; the fastest counts")
    ap.add_argument("--json", help="also write the measurements here")
    args = ap.parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    for s in args.settings:
        parse_setting(s)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("esm_ray").setLevel(logging.WARNING)

    from esm_ray.zoo.build import build_zoo
    from esm_ray.zoo.layout import open_zoo
    from esm_ray.zoo.specs import METHOD_TABLE

    for m in args.methods:
        if m not in METHOD_TABLE or not METHOD_TABLE[m].method.startswith(("concrete", "adamerging")):
            raise SystemExit(f"{m!r} is not a search method of METHOD_TABLE")
    zoo_dir = Path(args.zoo) if args.zoo else build_zoo(None, reduced=True)
    zoo = open_zoo(zoo_dir)
    load0 = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    say(f"zoo {zoo_dir} ({len(zoo.tasks)} tasks), {args.steps} steps, {os.cpu_count()} cores, load {load0}")

    cache_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="esm-ray-search-steps-", dir=cache_root()))
    runs: list[dict[str, Any]] = []
    try:
        for method in args.methods:
            for rep in range(args.repeats):
                order = args.settings if rep % 2 == 0 else args.settings[::-1]
                for setting in order:
                    say(f"{method} / {setting} (run {rep + 1} of {args.repeats}) ...")
                    out = work / f"{method}-{setting}-{rep}"
                    r = run_one(zoo, method, args.steps, setting, out)
                    r["repeat"] = rep
                    runs.append(r)
                    shutil.rmtree(out, ignore_errors=True)
                    say(f"  {r['s_step']:.3f} s/step (experts {r['expert_s_step']:.3f}), "
                        f"merge {r['merge_s']:.1f} s, objective {r['objective_last']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        ref = next(r["digest"] for r in mine if r["setting"] == args.settings[0])
        best = {s: min((r for r in mine if r["setting"] == s), key=lambda r: r["s_step"]) for s in args.settings}
        base = best.get("ray-1cpu")
        for s in args.settings:
            b = best[s]
            same = all(r["digest"] == ref for r in mine if r["setting"] == s)
            speed = base["s_step"] / b["s_step"] if base else None
            rows.append({"method": method, "setting": s, "s": f"{b['s_step']:.3f}", "e": f"{b['expert_s_step']:.3f}",
                         "c": f"{b['coord_s_step']:.3f}", "x": f"{speed:.2f}" if speed else "-",
                         "same": "yes" if same else "no"})
            summary.append({k: v for k, v in b.items() if k != "repeat"} | {"x_ray_1cpu": speed, "same_output": same})
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nSearch steps: {', '.join(args.methods)} on {zoo_dir.name} ({len(zoo.tasks)} experts), "
          f"{args.steps} steps, {os.cpu_count()} cores (load average before: {load0}; after: {load}); "
          f"1 torch thread per expert; same output = the *.safetensors bytes equal those of "
          f"{args.settings[0]}\n")
    print_table(rows, [("method", "method"), ("setting", "setting"), ("s", "s/step"), ("e", "experts s/step"),
                       ("c", "coordinator s/step"), ("x", "x ray-1cpu"), ("same", "same output")])
    if args.json:
        Path(args.json).write_text(json.dumps({"zoo": str(zoo_dir), "steps": args.steps, "cores": os.cpu_count(),
                                               "load_before": load0, "load_after": load,
                                               "summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
