"""The LLM quality table on an LM zoo (`esm-ray zoo lm`): merge each variant, score it on the
test split with lm-evaluation-harness, print normalised scores with 95% bootstrap intervals and
paired differences against a reference row.

    python benchmarks/lm_table.py --zoo ZOO --out RUN_DIR --ref tsvm \\
        --variant ta=task_arithmetic --variant ta_val=task_arithmetic:select=lambda \\
        --variant tsvm=tsvm --variant esm=esm:preset=auto --variant esm_val=esm:preset=auto,select=alpha

A variant is NAME=METHOD[:key=value,...] as in benchmarks/ablate.py (`pave.rho=...` purifies
with PAVE, `rescale.scope=tensor` rescales; METHOD may name an entry of esm_ray.zoo.specs.METHOD_TABLE). `select=lambda`
(task arithmetic) or `select=alpha` (ESM) chooses the scale on the validation splits
(esm_ray.eval.lm_select; golden-section search, λ on [0, 1] and α on [0, 2], on a strided
subset of `--val-items` items per column) before the one test scoring. `base` and `experts` are the rows recorded
when the zoo was built. Each variant's per-item records are kept in RUN_DIR/<name>.json (keyed by
the spec), so a rerun only merges what changed; `--table-only` merges nothing. Test items are
scored by esm_ray.models.lm_items (lm-eval's conventions; tests/integration/test_lm_zoo.py checks
that `esm-ray eval`'s lm-eval scores equal them), or with `--scorer lm-eval` by
lm-evaluation-harness itself, which on a 2-core CPU takes about an hour per model on the full
zoo's test splits (it runs every answer of a multiple-choice item with its prompt).

Normalised score per column: the share of the expert's log word-perplexity gain over the base
that the model keeps (domains), or accuracy / the expert's accuracy (label tasks); averaged over
columns. Intervals: percentile bootstrap, 1000 resamples of each column's test items; a
difference "exceeds" when the paired bootstrap interval of the difference excludes 0.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ablate import parse_variant  # noqa: E402

from esm_ray.eval.lm_report import evaluate_lm_harness, interval, normalized_resamples, units  # noqa: E402
from esm_ray.models.lm_items import score  # noqa: E402
from esm_ray.spec import dump_spec  # noqa: E402
from esm_ray.zoo.layout import open_zoo  # noqa: E402
from esm_ray.zoo.specs import spec_for  # noqa: E402


def recorded(zoo, which: str, split: str) -> dict[str, list[dict]]:
    """The base's (which='base') or each expert's own-column items recorded at build time."""
    if which == "base":
        return json.loads(zoo.path(zoo.manifest["base_scores"]).read_text())[split]
    return {c: json.loads(zoo.path(zoo.task(c)["scores"]).read_text())[split][c] for c in zoo.tasks}


def run_variant(zoo, run: Path, text: str, split: str, samples: int, keep: bool, scorer: str,
                reuse: bool = False, val_items: int | None = 24, stride: int = 1) -> dict:
    from esm_ray.eval.lm_select import ScaledLM, select_scale
    from esm_ray.eval.metrics import lm_tokenizer
    from esm_ray.runtime import run_merge

    name, entry = parse_variant(text)
    select = entry.params.pop("select", None)
    out = run / "merged" / name
    spec = spec_for(zoo, name, out, entry=entry, calibration={"samples": samples})
    t0 = time.perf_counter()
    rep_file = out / "merge_report.json"
    reused = (reuse and rep_file.is_file() and json.loads(rep_file.read_text()).get("method") == entry.method
              and json.loads(rep_file.read_text()).get("params", {}).items() >= entry.params.items())
    if not reused:
        run_merge(spec, progress=False)
    res: dict = {"merge_seconds": None if reused else round(time.perf_counter() - t0, 1)}
    loaded = None
    if select:
        rep = json.loads((out / "merge_report.json").read_text()).get("method_report", {})
        if select == "lambda":
            f0 = float(entry.params.get("lambda", 1.0))
            scaled = ScaledLM(zoo.base_dir, out)
            kw: dict = {"lo": 0.0, "hi": 1.0}  # golden section, as for α (a 10-point grid costs 10 scorings)
        elif select == "alpha":
            f0 = float(rep["alpha"])
            scaled, kw = ScaledLM(zoo.base_dir, out, rep["alpha_keys"]), {}
        else:
            raise SystemExit(f"{name}: select must be 'lambda' or 'alpha', got {select!r}")
        tok = lm_tokenizer(out, zoo)
        t1 = time.perf_counter()
        res["selected"] = select_scale(scaled, f0, zoo, tok, what=select, max_items=val_items, **kw)
        res["select_seconds"] = round(time.perf_counter() - t1, 1)
        loaded = (scaled.model, tok)
    t1 = time.perf_counter()
    if scorer == "lm-eval":
        res["items"] = evaluate_lm_harness(out, zoo, split, loaded=loaded)["items"]
    else:
        from esm_ray.eval.lm_select import column_items
        from esm_ray.models.lm import load_lm

        model, tok = loaded if loaded is not None else (load_lm(out), lm_tokenizer(out, zoo))
        res["items"] = {c: column_items(model, tok, zoo, c, split, stride=stride) for c in zoo.tasks}
        res["stride"] = stride
    res["scorer"] = scorer
    res["score_seconds"] = round(time.perf_counter() - t1, 1)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--ref", help="row the paired differences are taken against")
    ap.add_argument("--samples", type=int, default=32, help="calibration samples per expert")
    ap.add_argument("--split", default="test")
    ap.add_argument("--keep", action="store_true", help="keep merged models")
    ap.add_argument("--scorer", choices=["esm-ray", "lm-eval"], default="esm-ray",
                    help="per-item test scores from esm_ray.models.lm_items (lm-eval's conventions, batched, "
                         "one prompt pass per multiple-choice item) or from lm-evaluation-harness itself "
                         "(the same numbers, about 4x the CPU time)")
    ap.add_argument("--reuse", action="store_true",
                    help="score a merged model already in RUN_DIR/merged/NAME (same method and params) as it is")
    ap.add_argument("--stride", type=int, default=1,
                    help="score (and tabulate) every N-th test item of each column only; rows scored on "
                         "every item are subset to the same items")
    ap.add_argument("--val-items", type=int, default=24,
                    help="select=...: score every ⌈n/N⌉-th validation item per column during the search")
    ap.add_argument("--table-only", action="store_true", help="print the table from RUN_DIR, merging nothing")
    a = ap.parse_args(argv)
    zoo = open_zoo(a.zoo)
    run = Path(a.out)
    run.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for text in a.variant:
        if "=" not in text:  # NAME alone: the method of that name (or METHOD_TABLE entry)
            text = f"{text}={text}"
        name = text.partition("=")[0]
        if name in ("base", "experts"):
            results[name] = {"items": recorded(zoo, name, a.split)}
            continue
        _, entry = parse_variant(text)
        spec = spec_for(zoo, name, run / "merged" / name, entry=entry, calibration={"samples": a.samples})
        key = hashlib.sha256((dump_spec(spec) + a.split + text + a.scorer
                              + ("" if a.stride == 1 else f"/{a.stride}")).encode()).hexdigest()[:16]
        cache = run / f"{name}.json"
        if cache.is_file():
            got = json.loads(cache.read_text())
            every = got.get("stride") or 1  # rows of older runs may carry null
            # a row scored on every s-th item serves a table on every (multiple of s)-th item too
            # (its items are subset below)
            if a.table_only or got.get("key") == key or (every != a.stride and a.stride % every == 0
                                                         and got.get("variant") == text):
                results[name] = got
                continue
        if a.table_only:
            continue
        res = {"key": key, "variant": text, **run_variant(zoo, run, text, a.split, a.samples, a.keep, a.scorer, a.reuse,
                                                             a.val_items, a.stride)}
        cache.write_text(json.dumps(res))
        results[name] = res
        print(f"# {name}: merge {res['merge_seconds'] or 0:.0f} s, select {res.get('select_seconds', 0):.0f} s, "
              f"score {res['score_seconds']:.0f} s", file=sys.stderr, flush=True)

    cols = list(zoo.tasks)
    kinds = units(zoo, cols)
    for k in list(results):  # every row on the same items: every `stride`-th one
        got = results[k].get("stride") or 1  # rows of older runs may carry null
        if got == a.stride:
            continue
        if a.stride % got:
            print(f"# {k}: scored on every {got}th item, left out of a table on every {a.stride}th", file=sys.stderr)
            del results[k]
            continue
        step = a.stride // got
        results[k] = {**results[k], "items": {c: it[::step] for c, it in results[k]["items"].items()}}
    # normalise by the base's and the experts' scores on the same items as the rows
    base_it, exp_it = recorded(zoo, "base", a.split), recorded(zoo, "experts", a.split)
    refs = {c: (score(base_it[c][::a.stride], kinds[c]), score(exp_it[c][::a.stride], kinds[c])) for c in cols}

    def norm(c: str, value: float) -> float:
        b, e = refs[c]
        return value / e if kinds[c] == "accuracy" else math.log(b / value) / math.log(b / e)

    boots = {k: normalized_resamples(zoo, {c: v["items"][c] for c in cols}, a.split, refs=refs) * 100
             for k, v in results.items()}
    point = {k: 100 * sum(norm(c, score(v["items"][c], kinds[c])) for c in cols) / len(cols)
             for k, v in results.items()}
    head = ["row", "norm.", "95% CI"] + ([f"Δ vs {a.ref}", "95% CI", "exceeds"] if a.ref in results else [])
    head += [c[:12] for c in cols]
    print(f"{a.split}{'' if a.stride == 1 else f' (every {a.stride}th item)'}, zoo {zoo.manifest.get('hash')}: normalised score (% of the expert; domains: share of the "
          "log word-perplexity gain kept), per column the same")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for k, v in results.items():
        lo, hi = interval(boots[k])
        label = k
        sel = v.get("selected")
        if sel:
            label += f" ({sel.get('what', '')}{sel['value']:.2f} on val)"
        cells = [label, f"{point[k]:.1f}", f"[{lo:.1f}, {hi:.1f}]"]
        if a.ref in results:
            dlo, dhi = interval(boots[k] - boots[a.ref])
            cells += [f"{point[k] - point[a.ref]:+.1f}", f"[{dlo:+.1f}, {dhi:+.1f}]",
                      "yes" if dlo > 0 or dhi < 0 else "no"]
        cells += [f"{100 * norm(c, score(v['items'][c], kinds[c])):.1f}" for c in cols]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
