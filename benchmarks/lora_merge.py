"""Merging T LoRA adapters: esm-ray on the factors vs peft vs mergekit vs esm-ray on the same
adapters densified into full experts.

For a case (the LLaMA-shaped base of simple_merge.py: `smol`, SmolLM2-135M's shape, or `1b`,
953M parameters; cached by benchmarks/_util.py) T rank-r adapters (default 8 of rank 16, on
q/k/v/o/gate/up/down, lora_alpha 2r) are made by peft once, deterministically (random A and B,
so ΔW ≠ 0), written with `save_pretrained` and cached. The same adapters densified (W₀ + s·B A,
in float32, stored in bfloat16 like the base) are the full experts of the dense comparison.
Then every run below is timed once in a fresh process (wall time, peak RSS):

  esm-ray   task_arithmetic and tsvm, each with a dense output (bfloat16) and with
            `output_format: peft`; task_arithmetic `peft: {rank: r}` too; esm with a dense
            output, calibrated on `--calib-rows` rows of random token ids per expert (the same
            rows for the adapter and for its densified expert), with the default calibration
            (`calibration.mode: auto`: layer-wise for adapters, whole-model for full experts),
            then that spec again, its statistics cached (the merge alone), then with the
            whole-model calibration (`calibration.mode: full`)
  peft      load the base and the T adapters, add_weighted_adapter `cat` / `svd` (rank r),
            save the merged adapter
  mergekit  task_arithmetic over `base+adapter` references (0.1.5, own venv: it densifies each
            adapter into a cached full model first; the cache is emptied before the run)
  dense     esm-ray tsvm and esm on the densified experts

"fuse s" is the merge without calibration (merge_report.json's `fuse` stage): what the factored
and the densified runs of ESM do differently. The calibration statistics are computed afresh in
every run (each run has its own statistics cache) but the "cached statistics" one.

    .venv/bin/python benchmarks/lora_merge.py                   # smol, T = 8
    .venv/bin/python benchmarks/lora_merge.py --case 1b
    .venv/bin/python benchmarks/lora_merge.py --case tiny --t 2 # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.builders import calibration_files  # noqa: E402
from tests.fixtures import mergekit as _mergekit  # noqa: E402
from _util import (  # noqa: E402
    LlamaShape,
    _write_safetensors,
    cache_root,
    clean_env,
    compare_dirs,
    make_llama_family,
    print_table,
    run_timed,
)
from simple_merge import ONE_B, TINY, smol_shape  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = {"smol": None, "1b": ONE_B, "tiny": TINY}
CALIB_LENGTH = 64  # token ids per calibration row


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- inputs ------------------------------------------------------------------------------------

ADAPTER_CODE = r"""
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM
base, r, std, targets, outs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(","), sys.argv[5:]
model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
for i, out in enumerate(outs):
    torch.manual_seed(1000 + i)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    pm.save_pretrained(out)
    model = pm.unload()
"""


def make_adapters(base: Path, root: Path, t: int, r: int, std: float, python: str) -> list[Path]:
    """T peft adapters of `base` under root/adapter_i (made once; adapter i is the same for any T)."""
    outs = [root / f"adapter_{i}" for i in range(t)]
    todo = [o for o in outs if not (o / "adapter_model.safetensors").is_file()]
    if todo:
        t0 = time.perf_counter()
        run = run_timed([python, "-c", ADAPTER_CODE, str(base), str(r), str(std), ",".join(TARGETS),
                         *map(str, outs)], env=clean_env(1), log_dir=root / "logs")
        if run.rc:
            raise SystemExit(f"making adapters failed:\n{run.err[-3000:]}")
        log(f"  {t} adapters made by peft in {time.perf_counter() - t0:.1f}s under {root}")
    return outs


def densify(base: Path, adapter: Path, out: Path) -> Path:
    """The adapter applied to the base (W₀ + s·B A in float32), written in bfloat16 like the base."""
    from safetensors import safe_open

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    with safe_open(str(base / "model.safetensors"), "pt") as b, \
            safe_open(str(adapter / "adapter_model.safetensors"), "pt") as a:
        keys = set(a.keys())
        items = [(k, tuple(b.get_slice(k).get_shape())) for k in sorted(b.keys())]

        def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            w = b.get_tensor(name).float()
            stem = "base_model.model." + name[: -len(".weight")]
            if f"{stem}.lora_A.weight" in keys:
                w += s * (a.get_tensor(f"{stem}.lora_B.weight").float() @ a.get_tensor(f"{stem}.lora_A.weight").float())
            return w
        _write_safetensors(out / "model.safetensors", items, make)
    shutil.copy(base / "config.json", out / "config.json")
    return out


# ---- runs --------------------------------------------------------------------------------------

PEFT_CODE = r"""
import sys, torch
from peft import PeftModel
from transformers import LlamaForCausalLM
base, how, r, out, ads = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16), ads[0], adapter_name="a0")
for i, a in enumerate(ads[1:], 1):
    model.load_adapter(a, adapter_name=f"a{i}")
names = [f"a{i}" for i in range(len(ads))]
kw = {"svd_rank": r} if how == "svd" else {}
model.add_weighted_adapter(names, [1.0] * len(ads), "merged", combination_type=how, **kw)
for n in names:
    model.delete_adapter(n)
model.save_pretrained(out, selected_adapters=["merged"])
"""


def esm_spec(base: Path, experts: list[Path], method: str, out: Path, fmt: str, rank: int | None,
             data: list[Path] | None = None, calib_mode: str = "auto") -> dict:
    params = {"lambda": 1.0, "normalize": False} if method == "task_arithmetic" else {}
    spec = {"base": str(base), "experts": [{"name": f"e{i}", "model": str(p)} for i, p in enumerate(experts)],
            "method": {"name": method, "params": params}, "output": str(out), "dtype": "bfloat16",
            "overwrite": True,
            # each run its own statistics cache, which must not hold the output
            "calibration": {"cache_dir": str(out.parent / f"{out.name}-stats")}}
    if data:
        for e, d in zip(spec["experts"], data):
            e["data"] = str(d)
        rows = len(data[0].read_text().splitlines())
        spec["calibration"] |= {"samples": rows, "max_length": CALIB_LENGTH, "batch_size": 8, "mode": calib_mode}
    if fmt == "peft":
        spec["output_format"] = "peft"
        if rank:
            spec["peft"] = {"rank": rank}
    return spec


def mergekit_config(base: Path, adapters: list[Path]) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": f"{base}+{a}", "parameters": {"weight": 1.0}} for a in adapters],
            "parameters": {"lambda": 1.0, "normalize": False}, "dtype": "float32", "out_dtype": "bfloat16"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="smol", choices=list(CASES))
    p.add_argument("--t", type=int, default=8, help="adapters (default 8)")
    p.add_argument("--rank", type=int, default=16, help="rank of every adapter (default 16)")
    p.add_argument("--std", type=float, default=0.02, help="std of the random A and B entries")
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--no-dense", action="store_true", help="skip esm-ray on the densified experts")
    p.add_argument("--calib-rows", type=int, default=32, help="calibration rows per expert for esm (default 32)")
    p.add_argument("--only", default=None,
                   help="comma-separated TOOL:METHOD of the runs to do (e.g. esm-ray:tsvm); default all")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    shape: LlamaShape = CASES[args.case] or smol_shape()
    log(f"{args.case}: {shape.name}, {shape.n_params / 1e6:.1f}M params, T={args.t} adapters of rank {args.rank}")
    fam = make_llama_family(shape, 1, log=log)  # the base (and one unused expert) of simple_merge's family
    key = hashlib.sha256(f"{fam.root.name}/{args.rank}/{args.std}/{','.join(TARGETS)}".encode()).hexdigest()[:10]
    lroot = cache_root() / "lora" / f"{shape.name}-{key}"
    adapters = make_adapters(fam.base, lroot, args.t, args.rank, args.std, args.python)
    dense = []
    if not args.no_dense:
        t0 = time.perf_counter()
        dense = [densify(fam.base, a, lroot / f"dense_{i}") for i, a in enumerate(adapters)]
        log(f"  densified experts ready in {time.perf_counter() - t0:.1f}s")

    work = cache_root() / "runs" / f"lora-{args.case}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py, env = args.python, clean_env()
    runs: list[tuple[str, str, str, list[str], Path]] = []  # (tool, method, output, cmd, out dir)

    calib = calibration_files(lroot / "calib", args.t, shape.vocab, rows=args.calib_rows, length=CALIB_LENGTH)

    def esm(method: str, fmt: str, experts: list[Path], tool: str, rank: int | None = None,
            calib_mode: str = "auto", again: bool = False) -> None:
        tag = f"{tool}-{method}-{fmt}{rank or ''}{'' if calib_mode == 'auto' else '-' + calib_mode}".replace(" ", "-")
        spec = work / f"{tag}.yaml"
        data = calib if method == "esm" else None
        spec.write_text(yaml.safe_dump(esm_spec(fam.base, experts, method, work / tag, fmt, rank, data, calib_mode)))
        label = (fmt if not rank else f"peft r{rank}") + {"auto": "", "full": ", whole-model calibration",
                                                          "layerwise": ", layer-wise calibration"}[calib_mode]
        cmd = [py, "-m", "esm_ray.cli", "-q", "merge", str(spec), "--no-progress"]
        runs.append((tool, method, label, cmd, work / tag))
        if again:  # the same spec again: its statistics are cached now, so this is the merge alone
            runs.append((tool, method, f"{fmt}, cached statistics", cmd, work / tag))

    for m in ("task_arithmetic", "tsvm"):
        esm(m, "dense", adapters, "esm-ray")
        esm(m, "peft", adapters, "esm-ray")
    esm("task_arithmetic", "peft", adapters, "esm-ray", args.rank)
    esm("esm", "dense", adapters, "esm-ray", again=True)  # auto: layer-wise for adapters
    esm("esm", "dense", adapters, "esm-ray", calib_mode="full")
    for how in ("cat", "svd"):
        runs.append(("peft", how, "peft" if how == "cat" else f"peft r{args.rank}",
                     [py, "-c", PEFT_CODE, str(fam.base), how, str(args.rank), str(work / f"peft-{how}"),
                      *map(str, adapters)], work / f"peft-{how}"))
    mk_cache = work / "mergekit-lora-cache"
    if not args.no_mergekit:
        mk = _mergekit.mergekit_bin(None, log=log)
        cfg = work / "mergekit.yml"
        cfg.write_text(yaml.safe_dump(mergekit_config(fam.base, adapters)))
        runs.append(("mergekit", "task_arithmetic", "dense",
                     [str(mk), str(cfg), str(work / "mergekit"), "--no-write-model-card",
                      "--lora-merge-cache", str(mk_cache)], work / "mergekit"))
    for m in ("tsvm", "esm") if dense else ():
        esm(m, "dense", dense, "esm-ray densified")

    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if f"{r[0]}:{r[1]}" in keep]
    rows = []
    t_all = time.perf_counter()
    for tool, m, fmt, cmd, out in runs:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(mk_cache, ignore_errors=True)
        r = run_timed(cmd, env=env, cwd=work, log_dir=work / "logs")
        row = {"tool": tool, "method": m, "output": fmt, "wall": r.wall, "cpu": r.cpu, "rss": r.peak_rss / 1e9}
        if r.rc:
            row["note"] = f"failed rc {r.rc}: " + (r.err.strip().splitlines() or ["?"])[-1][:100]
        elif tool.startswith("esm-ray"):
            timings = json.loads((out / "merge_report.json").read_text())["timings_s"]
            row["merge"], row["fuse"] = timings["total"], timings.get("fuse")
        log(f"  {tool:<17} {m:<15} {fmt:<8} wall {r.wall:7.2f}s  cpu {r.cpu:7.2f}s  rss {r.peak_rss / 1e9:5.2f} GB"
            + (f"  {row['note']}" if "note" in row else ""))
        rows.append(row)
    log(f"  all runs: {time.perf_counter() - t_all:.0f}s")

    def wall(tool: str, m: str, fmt: str) -> float:
        return next((r["wall"] for r in rows if (r["tool"], r["method"], r["output"]) == (tool, m, fmt)
                     and "note" not in r), float("nan"))
    for r in rows:
        ref = {"peft": ("peft", "cat", "peft"), f"peft r{args.rank}": ("peft", "svd", f"peft r{args.rank}"),
               "dense": ("mergekit", "task_arithmetic", "dense")}.get(r["output"])
        # a ratio only where the run it compares with was made (not left out by --only or --no-*)
        if r["tool"] == "esm-ray" and r["method"] == "task_arithmetic" and ref and not math.isnan(wall(*ref)):
            r["vs"] = f"{wall(*ref) / r['wall']:.1f}x faster than {ref[0]} {ref[1]}"
        own = wall("esm-ray", r["method"], "dense")
        if r["tool"] == "esm-ray densified" and not math.isnan(own):
            fuse = next((o.get("fuse") for o in rows if (o["tool"], o["method"], o["output"])
                         == ("esm-ray", r["method"], "dense")), None)
            r["vs"] = f"{r['wall'] / own:.1f}x the time on the adapters" + (
                f" (fuse {r['fuse'] / fuse:.0f}x)" if fuse and r.get("fuse") else "")

    print()
    print(f"{args.case}: {shape.n_params / 1e6:.0f}M params base ({shape.nbytes / 1e9:.2f} GB bf16), "
          f"T = {args.t} adapters of rank {args.rank} on {len(TARGETS)} projections")
    print_table(rows, [("tool", "tool"), ("method", "method"), ("output", "output"), ("wall", "wall s"),
                       ("merge", "merge s"), ("fuse", "fuse s"), ("cpu", "cpu s"), ("rss", "peak RSS GB"), ("vs", "ratio"),
                       ("note", "note")])
    if not args.no_mergekit and (work / "mergekit").is_dir() and (work / "esm-ray-task_arithmetic-dense").is_dir():
        c = compare_dirs(work / "esm-ray-task_arithmetic-dense", work / "mergekit")
        print(f"\nesm-ray vs mergekit task_arithmetic (dense): max|diff| {c.get('max_abs_diff', c)}"
              f" ({c.get('elements_differing')} of {c.get('elements')} elements differ; mergekit reads each adapter "
              "from a densified model that transformers saved, esm-ray reads W0 + s*B*A in float32)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
