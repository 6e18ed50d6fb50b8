"""Quality ablations on an encoder zoo: merge variants, score every test item, print a table
with 95% bootstrap intervals and paired differences against a reference row.

    python benchmarks/ablate.py --zoo ZOO --out RUN_DIR \\
        --variant tsvm=tsvm --variant esm=esm:preset=roberta \\
        --variant esm_oas=esm:preset=roberta,shrinkage=oas --ref tsvm [--samples 32]

A variant is NAME=METHOD[:key=value,...] (values parsed as YAML scalars); `pave.rho=...`
purifies with PAVE; `rescale.scope=tensor` (or `global`) sets the spec's `rescale`. Each variant's per-item correctness is kept in RUN_DIR/<name>.json (keyed
by the spec), so a rerun only merges what changed. The interval is a percentile bootstrap
(1000 resamples of the test items, stratified by task) of the mean normalised accuracy
(accuracy / the expert's, averaged over tasks); a difference "exceeds the interval" when the
paired bootstrap interval of the difference excludes 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from esm_ray.eval.metrics import task_hits
from esm_ray.models.encoder import load_encoder, load_tokenizer
from esm_ray.runtime import run_merge
from esm_ray.spec import dump_spec
from esm_ray.zoo.layout import open_zoo
from esm_ray.zoo.specs import METHOD_TABLE, MethodEntry, spec_for

RESAMPLES = 1000


def parse_variant(text: str) -> tuple[str, MethodEntry]:
    name, _, rest = text.partition("=")
    method, _, kv = rest.partition(":")
    params: dict = dict(METHOD_TABLE[method].params) if method in METHOD_TABLE else {}
    purify = METHOD_TABLE[method].purify if method in METHOD_TABLE else None
    rescale = METHOD_TABLE[method].rescale if method in METHOD_TABLE else None
    real = METHOD_TABLE[method].method if method in METHOD_TABLE else method
    for item in filter(None, kv.split(",")):
        k, _, v = item.partition("=")
        val = yaml.safe_load(v)
        if k.startswith("pave."):
            purify = {**(purify or {}), k[5:]: val}
        elif k.startswith("rescale."):  # rescale.scope=tensor: the spec's `rescale`
            rescale = {**(rescale or {}), k[8:]: val}
        elif "." in k:
            outer, inner = k.split(".", 1)
            params[outer] = {**params.get(outer, {}), inner: val}
        else:
            params[k] = val
    return name, MethodEntry(real, params, purify, rescale)


def score(model_dir: Path, zoo, split: str) -> dict[str, list[int]]:
    model = load_encoder(model_dir, torch.float32, strict=True)
    tok = load_tokenizer(zoo.base_dir)
    max_length = int(zoo.manifest.get("max_length", 64))
    return {t: task_hits(model, tok, zoo, t, split, max_length=max_length) for t in zoo.tasks}


def norm_mean(items: dict[str, torch.Tensor], ref: dict[str, float], idx: dict[str, torch.Tensor] | None = None):
    vals = []
    for t, c in items.items():
        x = c if idx is None else c[idx[t]]
        vals.append(x.float().mean(-1) / ref[t])
    return torch.stack(vals).mean(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--ref", help="row the paired differences are taken against")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples per task")
    ap.add_argument("--split", default="test")
    ap.add_argument("--keep", action="store_true", help="keep merged models")
    ap.add_argument("--table-only", action="store_true",
                    help="print the table from RUN_DIR's saved rows of these variants, merging nothing")
    a = ap.parse_args(argv)
    zoo = open_zoo(a.zoo)
    run = Path(a.out)
    run.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for text in a.variant:
        name, entry = parse_variant(text)
        spec = spec_for(zoo, name, run / "merged" / name, entry=entry, calibration={"samples": a.samples})
        key = hashlib.sha256((dump_spec(spec) + a.split).encode()).hexdigest()[:16]
        cache = run / f"{name}.json"
        if cache.is_file() and (a.table_only or json.loads(cache.read_text()).get("key") == key):
            results[name] = json.loads(cache.read_text())
            continue
        t0 = time.perf_counter()
        if entry.method == "base":
            mdir = zoo.base_dir
        else:
            run_merge(spec, progress=False)
            mdir = run / "merged" / name
        secs = time.perf_counter() - t0
        res = {"key": key, "variant": text, "merge_seconds": round(secs, 1), "items": score(mdir, zoo, a.split)}
        cache.write_text(json.dumps(res))
        if not a.keep and entry.method != "base":
            shutil.rmtree(mdir, ignore_errors=True)
        results[name] = res
        print(f"# {name}: merged in {secs:.0f} s", file=sys.stderr, flush=True)

    ref_acc = {t: float(zoo.task(t)["metrics"]["expert"][a.split]) for t in zoo.tasks}
    gen = torch.Generator().manual_seed(0)
    n = {t: len(next(iter(results.values()))["items"][t]) for t in zoo.tasks}
    idx = {t: torch.randint(0, n[t], (RESAMPLES, n[t]), generator=gen) for t in zoo.tasks}
    items = {k: {t: torch.tensor(v["items"][t]) for t in zoo.tasks} for k, v in results.items()}
    boots = {k: norm_mean(v, ref_acc, idx) * 100 for k, v in items.items()}
    point = {k: float(norm_mean(v, ref_acc)) * 100 for k, v in items.items()}
    head = ["row", "norm. acc", "95% CI"] + ([f"Δ vs {a.ref}", "95% CI", "exceeds"] if a.ref else [])
    head += [t[:12] for t in zoo.tasks]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for k in results:
        lo, hi = torch.quantile(boots[k], torch.tensor([0.025, 0.975], dtype=boots[k].dtype)).tolist()
        cells = [k, f"{point[k]:.1f}", f"[{lo:.1f}, {hi:.1f}]"]
        if a.ref:
            d = boots[k] - boots[a.ref]
            dlo, dhi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=d.dtype)).tolist()
            cells += [f"{point[k] - point[a.ref]:+.1f}", f"[{dlo:+.1f}, {dhi:+.1f}]",
                      "yes" if dlo > 0 or dhi < 0 else "no"]
        cells += [f"{100 * sum(results[k]['items'][t]) / n[t]:.1f}" for t in zoo.tasks]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
