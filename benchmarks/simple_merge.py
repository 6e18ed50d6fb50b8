"""Simple merges side by side with mergekit and with the read floor.

For each case a LLaMA-shaped base and T experts (base + random low-rank update + noise, in
bfloat16) are generated once and cached. Then, in one run and interleaved, each of these runs
`--reps` times in a fresh process:

  esm-ray    each of --methods         `python -m esm_ray.cli merge spec.yaml`
  mergekit   each of --methods         `mergekit-yaml config.yml out` (0.1.5, own venv)
  floor      read+sum                  read every input tensor once, sum into float32
             read+sum, then write      the same, writing each sum (bf16) as it is made into one
                                       file, fsynced at the end (serial: a merge overlaps them)

Methods (`--methods`, default task_arithmetic,ties): task_arithmetic, ties (density --density),
slerp (t 0.5, the first expert only), model_stock, della (density --density, epsilon 0.1),
sce (select_topk --density) and sce_topk (the same with select_ties topk: mergekit's bytes on
CPU; compared with the same mergekit run). DELLA draws random masks, so its outputs differ from
mergekit's by design (the comparison line says how much).

The floors run once per set of inputs the methods read (slerp reads the base and the first
expert: its floors read those two models). The table gives medians: wall time of the whole
process (Python start included), the merge time esm-ray reports in merge_report.json, the
process's peak RSS, and the ratios; "x floor" compares a merge with the read floor of its own
inputs, and "floor x mergekit" is that floor against mergekit's time for the method: no merge
of those inputs can take a smaller fraction of mergekit's time. The outputs of esm-ray and
mergekit are compared tensor by tensor.

    .venv/bin/python benchmarks/simple_merge.py                       # smol-t4, smol-t8, 1b-t4
    .venv/bin/python benchmarks/simple_merge.py --cases smol-t4 --reps 5
    .venv/bin/python benchmarks/simple_merge.py --quick               # tiny model, one rep
    .venv/bin/python benchmarks/simple_merge.py --threads 1,2         # esm-ray on 1 and on 2 math threads

esm-ray runs its math on `runtime.num_cpus_per_worker` threads (default 1, the same in the local
and Ray executors so their bytes agree); mergekit on torch's default, every core. `--threads`
adds an esm-ray run per thread count (tool `esm-ray-2t` and so on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fixtures import mergekit as _mergekit  # noqa: E402  (the venv helper the tests use)
from _util import (  # noqa: E402
    Family,
    LlamaShape,
    cache_root,
    clean_env,
    compare_dirs,
    disk_free,
    floor_cmd,
    make_llama_family,
    median,
    print_table,
    run_timed,
    ties_ties,
)

METHODS = ("task_arithmetic", "ties", "slerp", "model_stock", "della", "sce", "sce_topk")
VARIANT_OF = {"sce_topk": "sce"}  # esm-ray settings of one method, all compared with its mergekit run
DEFAULT_METHODS = "task_arithmetic,ties"
DELLA_EPSILON = 0.1

SMOL = LlamaShape("smollm2-135m", hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3,
                  vocab=49152, tied=True, rope_theta=100000.0, max_positions=8192)
ONE_B = LlamaShape("llama-1b", hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=32,
                   vocab=32000, tied=False)
TINY = LlamaShape("tiny", hidden=128, layers=4, intermediate=352, heads=4, kv_heads=2, vocab=4096, tied=True)
CASES = {"smol-t4": (SMOL, 4), "smol-t8": (SMOL, 8), "1b-t4": (ONE_B, 4), "1b-t8": (ONE_B, 8),
         "tiny-t2": (TINY, 2)}
DEFAULT_CASES = "smol-t4,smol-t8,1b-t4"


def smol_shape() -> LlamaShape:
    """SmolLM2-135M's shape, from a converted copy in the zoo when there is one."""
    zoo = Path(os.environ.get("ESM_RAY_ZOO") or Path.home() / ".cache" / "esm-ray" / "zoo")
    for cfg_path in sorted(zoo.glob("smollm2/*/config.json")):
        c = json.loads(cfg_path.read_text())
        rope = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or SMOL.rope_theta
        return LlamaShape(SMOL.name, c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"],
                          c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"]),
                          c["vocab_size"], bool(c.get("tie_word_embeddings", False)), float(rope),
                          int(c.get("max_position_embeddings", SMOL.max_positions)))
    return SMOL


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- mergekit in its own venv (shared with the tests) -------------------------------------------

def mergekit_bin(cache: Path) -> Path:
    """mergekit-yaml from mergekit 0.1.5's own venv, created on first use (about a minute)."""
    return _mergekit.mergekit_bin(None, log=log)


# ---- configs -----------------------------------------------------------------------------------

def method_setup(method: str, density: float) -> tuple[dict, dict, dict, int | None]:
    """(esm-ray params, mergekit global parameters, mergekit per-model parameters, experts used
    or None for all) for one benchmarked method; the same settings for both tools."""
    if method == "task_arithmetic":
        return {"lambda": 1.0, "normalize": False}, {"lambda": 1.0, "normalize": False}, {"weight": 1.0}, None
    if method == "ties":
        p = {"lambda": 1.0, "normalize": True}
        return {**p, "density": density}, p, {"weight": 1.0, "density": density}, None
    if method == "slerp":
        return {"t": 0.5}, {"t": 0.5}, {}, 1
    if method == "model_stock":
        return {}, {}, {}, None
    if method == "della":
        p = {"lambda": 1.0, "normalize": True}
        return ({**p, "density": density, "epsilon": DELLA_EPSILON}, p,
                {"weight": 1.0, "density": density, "epsilon": DELLA_EPSILON}, None)
    if method == "sce":
        return {"select_topk": density}, {"select_topk": density}, {}, None
    if method == "sce_topk":  # ties at Select's threshold kept as torch.topk on CPU keeps them (mergekit's bytes)
        return {"select_topk": density, "select_ties": "topk"}, {"select_topk": density}, {}, None
    raise ValueError(f"no benchmark settings for {method!r}; choose from {', '.join(METHODS)}")


def method_of(name: str) -> str:
    """The method a benchmarked name runs in both tools (sce_topk: sce, with other settings), and
    so the mergekit run it is compared with."""
    return VARIANT_OF.get(name, name)


def esm_spec(fam: Family, method: str, density: float, out: Path, shard: int, threads: int = 1) -> dict:
    params, _, _, n = method_setup(method, density)
    return {"runtime": {"num_cpus_per_worker": threads}, "base": str(fam.base),
            "experts": [{"name": f"e{i}", "model": str(p)} for i, p in enumerate(fam.experts[:n])],
            "method": {"name": method_of(method), "params": params},
            "output": str(out), "dtype": "bfloat16", "shard_size": shard, "overwrite": True}


def mergekit_config(fam: Family, method: str, density: float, dtype: str) -> dict:
    _, glob, per, n = method_setup(method, density)
    return {"merge_method": method_of(method), "base_model": str(fam.base),
            "models": [{"model": str(p), **({"parameters": dict(per)} if per else {})} for p in fam.experts[:n]],
            **({"parameters": glob} if glob else {}),
            "dtype": dtype, "out_dtype": "bfloat16"}


# ---- one case ----------------------------------------------------------------------------------

def esm_tool(threads: int) -> str:
    """The tool column of an esm-ray run on `threads` math threads."""
    return "esm-ray" if threads == 1 else f"esm-ray-{threads}t"


def run_case(case: str, fam: Family, args, mk: Path | None, python: str) -> tuple[list[dict], list[dict]]:
    work = cache_root() / "runs" / case
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = clean_env()
    runs: list[tuple[str, str, list[str], Path | None]] = []  # (tool, method, cmd, output dir)
    for m in args.methods:
        for n in args.threads:
            tool = esm_tool(n)
            out = work / f"{tool}-{m}"
            spec = work / f"{tool}-{m}.yaml"
            spec.write_text(yaml.safe_dump(esm_spec(fam, m, args.density, out, args.shard_size, n)))
            runs.append((tool, m, [python, "-m", "esm_ray.cli", "-q", "merge", str(spec), "--no-progress"], out))
        mkm = method_of(m)  # one mergekit run per method, whatever esm-ray settings compare with it
        if mk is not None and not any(t == "mergekit" and n == mkm for t, n, _, _ in runs):
            out = work / f"mergekit-{mkm}"
            cfg = work / f"mergekit-{mkm}.yml"
            cfg.write_text(yaml.safe_dump(mergekit_config(fam, mkm, args.density, args.mergekit_dtype)))
            runs.append(("mergekit", m, [str(mk), str(cfg), str(out), "--no-write-model-card",
                                         "--out-shard-size", str(args.shard_size)], out))
    for n in sorted({n_used(m, len(fam.experts)) for m in args.methods}, reverse=True):
        inputs = [fam.base, *fam.experts[:n]]
        runs.append(("floor", floor_name("read+sum", n, fam), floor_cmd(python, inputs), None))
        out = work / f"floor-{n}"
        runs.append(("floor", floor_name("read+sum, then write", n, fam), floor_cmd(python, inputs, out), out))

    samples: dict[tuple[str, str], list[dict]] = {(t, m): [] for t, m, _, _ in runs}
    for rep in range(args.reps):
        order = runs[rep % len(runs):] + runs[:rep % len(runs)]  # rotate: no run always goes first
        for tool, m, cmd, out in order:
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)
            r = run_timed(cmd, env=env, cwd=work, log_dir=work / "logs")
            if r.rc != 0:
                raise SystemExit(f"{case}: {tool} {m} failed (rc {r.rc}):\n{r.err[-3000:]}")
            s = {"wall": r.wall, "cpu": r.cpu, "rss": r.peak_rss}
            if tool.startswith("esm-ray"):
                rep_doc = json.loads((out / "merge_report.json").read_text())
                s["merge"] = rep_doc["timings_s"]["total"]
                s["stages"] = rep_doc["timings_s"]
            elif tool == "floor":
                doc = json.loads(r.out.strip().splitlines()[-1])
                s["merge"] = doc["read_sum_s"]
            samples[(tool, m)].append(s)
            log(f"  [{case} rep {rep + 1}/{args.reps}] {tool:<8} {m:<15} wall {r.wall:6.2f}s  cpu {r.cpu:6.2f}s  "
                f"rss {r.peak_rss / 1e9:5.2f} GB" + (f"  merge {s['merge']:.2f}s" if "merge" in s else ""))

    checks = []
    if mk is not None:
        for m in args.methods:
            for n in args.threads:
                c = compare_dirs(work / f"{esm_tool(n)}-{m}", work / f"mergekit-{method_of(m)}")
                c.update(case=case, method=m if n == 1 else f"{m} ({esm_tool(n)})")
                if m == "ties" and c.get("elements_differing"):
                    c.update(ties_ties(work / f"{esm_tool(n)}-{m}", work / f"mergekit-{method_of(m)}", fam.base, fam.experts,
                                       args.density))
                checks.append(c)

    model_bytes = fam.shape.nbytes

    def wall_of(tool: str, m: str) -> float:
        return median([s["wall"] for s in samples.get((tool, m), [])]) if (tool, m) in samples else float("nan")

    rows = []
    for (tool, m), ss in samples.items():
        wall = median([s["wall"] for s in ss])
        mk_wall = wall_of("mergekit", method_of(m)) if mk is not None else float("nan")
        rss = median([s["rss"] for s in ss])
        row = {"case": case, "tool": tool, "method": m, "wall": wall, "cpu": median([s["cpu"] for s in ss]),
               "merge": median([s["merge"] for s in ss]) if "merge" in ss[0] else None,
               "rss": rss / 1e9, "vs_mk": wall / mk_wall if tool != "floor" else None,
               "rss_model": rss / model_bytes, "walls": [round(s["wall"], 2) for s in ss]}
        if tool == "floor":
            row["vs_floor"] = wall / wall_of("floor", floor_name("read+sum", len(fam.experts), fam))
        else:  # against the floors of the inputs this method reads
            floor = wall_of("floor", floor_name("read+sum", n_used(m, len(fam.experts)), fam))
            row.update(vs_floor=wall / floor, floor_vs_mk=floor / mk_wall if tool == "esm-ray" else None)
        if tool.startswith("esm-ray"):
            stages = {}
            for k in ss[0]["stages"]:
                stages[k] = round(median([s["stages"][k] for s in ss]), 2)
            row["stages"] = stages
        rows.append(row)
    return rows, checks


COLUMNS = [("case", "case"), ("tool", "tool"), ("method", "method"), ("wall", "wall s"),
           ("merge", "merge s"), ("cpu", "cpu s"), ("rss", "peak RSS GB"), ("vs_mk", "x mergekit"), ("vs_floor", "x floor"),
           ("floor_vs_mk", "floor x mergekit"), ("rss_model", "RSS / model")]


def n_used(method: str, t: int) -> int:
    """How many of the case's T experts a benchmarked method reads (slerp: the first)."""
    return method_setup(method, 0.5)[3] or t


def floor_name(kind: str, n: int, fam: Family) -> str:
    """The method column of a floor run over the base and the first n experts."""
    return kind if n == len(fam.experts) else f"{kind} ({n + 1} models)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None, help=f"comma-separated, from {', '.join(CASES)} (default {DEFAULT_CASES})")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every run, interleaved (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny model, one repetition: a smoke test of the script")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, from {', '.join(METHODS)} (default {DEFAULT_METHODS})")
    p.add_argument("--density", type=float, default=0.5,
                   help="TIES / DELLA density and SCE select_topk, the same for both tools (default 0.5)")
    p.add_argument("--shard-size", type=int, default=2_000_000_000,
                   help="output shard bytes, the same for both tools (default 2e9, esm-ray's default)")
    p.add_argument("--mergekit-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="mergekit's compute dtype (float32: the same arithmetic as esm-ray; default)")
    p.add_argument("--threads", default="1",
                   help="comma-separated math thread counts for esm-ray (runtime.num_cpus_per_worker), one "
                        "esm-ray run each (default 1, esm-ray's default; mergekit uses torch's default: every core)")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit (no install, no comparison)")
    p.add_argument("--python", default=sys.executable, help="interpreter with esm-ray installed (default: this one)")
    p.add_argument("--json", type=Path, help="also write rows and checks to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.cases = args.cases or "tiny-t2"
        args.reps = 1
    names = (args.cases or DEFAULT_CASES).split(",")
    bad = [c for c in names if c not in CASES]
    if bad:
        p.error(f"unknown case(s) {bad}; choose from {', '.join(CASES)}")
    args.methods = args.methods.split(",")
    args.threads = [int(n) for n in args.threads.split(",")]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")

    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    log(f"cache: {cache} ({disk_free(cache) / 1e9:.0f} GB free)")
    mk = None if args.no_mergekit else mergekit_bin(cache)
    all_rows, all_checks = [], []
    for case in names:
        shape, t = CASES[case]
        if shape is SMOL:
            shape = smol_shape()
        log(f"{case}: {shape.name}, {shape.n_params / 1e6:.1f}M params, {shape.nbytes / 1e9:.2f} GB per model, T={t}")
        t0 = time.perf_counter()
        fam = make_llama_family(shape, t, log=log)
        log(f"  models ready in {time.perf_counter() - t0:.1f}s under {fam.root}")
        rows, checks = run_case(case, fam, args, mk, args.python)
        all_rows += rows
        all_checks += checks
        shutil.rmtree(cache_root() / "runs" / case, ignore_errors=True)  # outputs are big; keep the cache lean

    print()
    print_table(all_rows, COLUMNS)
    print()
    for r in all_rows:
        if r["tool"].startswith("esm-ray"):
            print(f"{r['case']} {r['tool']} {r['method']}: stages {r['stages']}; walls {r['walls']}")
    if all_checks:
        print()
        for c in all_checks:
            if "error" in c:
                print(f"{c['case']} {c['method']}: esm-ray vs mergekit: {c['error']}")
                continue
            extra = ""
            if c["only_a"] or c["only_b"]:
                extra = f"; only esm-ray: {c['only_a']}; only mergekit: {c['only_b']}"
            if "at_threshold_ties" in c:
                extra += (f"; {c['at_threshold_ties']} of them where an expert's |tau| ties at its trim "
                          "threshold (tie-break convention)")
            if c["method"] == "della":
                extra += "; DELLA's masks are random draws (each tool its own RNG), so values differ by design"
            print(f"{c['case']} {c['method']}: esm-ray vs mergekit: max|diff| {c['max_abs_diff']:.3g}"
                  f" ({c['elements_differing']} of {c['elements']} elements differ){extra}")
    if args.json:
        args.json.write_text(json.dumps({"rows": all_rows, "checks": all_checks}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
