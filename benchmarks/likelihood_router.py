"""The likelihood router of a routed causal LM against an LM zoo, for every number of candidate
adapters at once: routing accuracy, routed quality and how many adapter prefills a prompt costs.

Each test item (every `--stride`-th of each column) is routed on its passage (domains) or prompt
(label tasks), and again on its first `--prefix` tokens. For each, the prototype scores and the
mean token log-likelihood under *every* eligible adapter are computed once
(`RoutedLM.scores(..., "prototype")`, `RoutedLM.logliks`); the route of the likelihood router
with m candidates (`core.routing.likelihood_route`: the m eligible tasks the prototypes rank
highest) is then read off the same numbers for each m, so the rows differ only by the rule.
Each routed item is scored with its adapter as `esm-ray eval` scores a routed LM
(`esm_ray.eval.routed_lm.RoutedLMScorer`, lm-eval's conventions), normalised by the zoo's
whole-split base and expert scores, with 95% paired bootstrap intervals over items.

    .venv/bin/python benchmarks/likelihood_router.py DIR --zoo ZOO [--stride 2] [--candidates 1 2 3 all]
        [--margins 0.03 0.05]

`--margins` adds, for each m > 1, a row per likelihood margin τ (mean cosine per routed layer):
prompts whose two best eligible prototype scores differ by at least τ keep the prototype top-1
and cost no adapter prefill. `--depths` repeats every row with the prototype scores of a router
pass over the first N decoder blocks (`router_depth`); the likelihoods are the same numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import print_table  # noqa: E402


def parse_m(v: str) -> int | None:
    return None if v == "all" else int(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=32, help="also route on the first N tokens (0: off)")
    ap.add_argument("--candidates", nargs="+", default=["1", "2", "3", "all"],
                    help="values of m (1 is the prototype router; 'all': every eligible adapter)")
    ap.add_argument("--margins", nargs="*", type=float, default=[],
                    help="likelihood margins per routed layer, each a row for every m > 1")
    ap.add_argument("--depths", nargs="*", type=int, default=[],
                    help="router depths (decoder blocks of the router pass), each a repeat of every row")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from esm_ray.core.routing import likelihood_pairs, likelihood_route, prefilled_pairs
    import numpy as np

    from esm_ray.eval.lm_report import interval, normalized, normalized_resamples, units
    from esm_ray.eval.routed_lm import RoutedLMScorer, paired_comparisons, routing_summary
    from esm_ray.models.lm_items import score
    from esm_ray.routed.lm import load_routed_lm
    from esm_ray.zoo.layout import open_zoo

    zoo = open_zoo(args.zoo)
    lm = load_routed_lm(args.dir)
    if "likelihood" not in lm.routers:
        print(f"{args.dir}: no likelihood router (its gains are missing)", file=sys.stderr)
        return 2
    lm.tokenizer = lm.tokenizer or AutoTokenizer.from_pretrained(str(zoo.base_dir))
    cols = list(zoo.tasks)
    scorer = RoutedLMScorer(lm, zoo, "test", cols, args.batch_size, args.stride)
    eligible = lm.gains > 0
    ms = [parse_m(v) for v in args.candidates]
    rules = [(m, None) for m in ms] + [(m, tau) for tau in args.margins for m in ms if m != 1]

    depths = [None, *args.depths]

    def scores(texts: list[str], max_length: int | None) -> tuple[dict, torch.Tensor, float]:
        """({depth: prototype scores}, log-likelihoods under every eligible adapter where a
        prototype top-1 is eligible, seconds) of the texts, each decided on its own tokens."""
        tok = lm.tokenizer
        tok.truncation_side = "right"
        lengths = [len(tok(t)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        proto = {d: torch.zeros(len(texts), len(lm.tasks)) for d in depths}
        ll = torch.zeros(len(texts), len(lm.tasks))
        t0 = time.perf_counter()
        for s in range(0, len(order), args.batch_size):
            chunk = order[s:s + args.batch_size]
            ids, mask = lm.encode([texts[i] for i in chunk], max_length=max_length)
            pairs = torch.zeros(len(chunk), len(lm.tasks), dtype=torch.bool)
            for d in depths:
                lm.router_depth = d
                p = lm.scores(ids, mask, "prototype")
                proto[d][chunk] = p.float().cpu()
                pairs |= likelihood_pairs(p, eligible.to(p.device), None).cpu()
            ll[chunk] = lm.logliks(ids, mask, pairs).cpu()
        lm.router_depth = None
        return proto, ll, time.perf_counter() - t0

    variants = [("whole", None)] + ([(f"first {args.prefix}", args.prefix)] if args.prefix else [])
    routes: dict[str, dict[str, list[str]]] = {}
    prefills: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for label, max_length in variants:
        got = {c: scores([scorer.routing_text(c, r) for r in scorer.rows[c]], max_length) for c in cols}
        seconds[label] = sum(g[2] for g in got.values())
        print(f"{label}: prototype + every eligible adapter in {seconds[label]:.0f} s", file=sys.stderr)
        for (m, tau), d in [(r, d) for d in depths for r in rules]:
            name = (f"m={'all' if m is None else m}" + (f", margin {tau:g}" if tau is not None else "")
                    + (f", depth {d}" if d is not None else "") + f", {label}")
            lm.router_depth = d
            gap = None if tau is None else tau * len(lm.scored_modules)  # per routed layer -> summed cosines
            routes[name] = {}
            pairs = 0
            for c in cols:
                protos, ll, _ = got[c]
                proto = protos[d]
                pairs += int(prefilled_pairs(likelihood_pairs(proto, eligible, m, gap)).sum())
                routes[name][c] = [lm.tasks[i] for i in
                                   likelihood_route(proto, ll, eligible, m, gap).argmax(-1).tolist()]
            prefills[name] = pairs / sum(len(scorer.rows[c]) for c in cols)
    lm.router_depth = None
    routes["oracle"] = {c: [c] * len(scorer.rows[c]) for c in cols}
    items = {name: {c: scorer.items(c, got[c]) for c in cols} for name, got in routes.items()}
    compared = paired_comparisons(zoo, items, "test")
    kinds = units(zoo, cols)
    dom = [c for c in cols if kinds[c] == "perplexity"]
    ref = f"m=1, {variants[0][0]}"

    def ci(v: float, iv: list[float]) -> str:
        return f"{v:.1f} [{iv[0]:.1f}, {iv[1]:.1f}]"

    def diff(d: dict) -> str:
        return f"{d['difference']:+.1f} [{d['interval'][0]:+.1f}, {d['interval'][1]:+.1f}]"

    table, out = [], {}
    for name, got in routes.items():
        summ = routing_summary(got, lm.tasks)
        acc = summ["routing_accuracy"]
        c = compared[name]
        everything = float(np.mean([normalized(zoo, x, score(items[name][x], kinds[x]), "test") or 0.0
                                    for x in cols])) * 100
        row = {"rule": name, "all": f"{100 * summ['average_routing_accuracy']:.1f}%",
               "dom": f"{100 * sum(acc[x] for x in dom) / len(dom):.1f}%",
               "prefills": f"{prefills[name]:.2f}" if name in prefills else "-",
               "norm": ci(everything, interval(normalized_resamples(zoo, items[name], "test") * 100)),
               "norm_dom": ci(c["domains"]["normalized_average"], c["domains"]["normalized_interval"])
               if "domains" in c else "-",
               "vs": diff(c.get("domain_paired_differences", c["paired_differences"])[ref]) if name != ref else "-"}
        table.append(row)
        out[name] = {"routing": summ, "prefills_per_prompt": prefills.get(name), "normalized_average": everything,
                     **c}
    print_table(table, [("rule", "rule (m candidates, routed on)"), ("all", "routing, all columns"),
                        ("dom", "routing, domains"), ("prefills", "adapter prefills / prompt"),
                        ("norm", "normalised, all [95% CI]"), ("norm_dom", "normalised, domains [95% CI]"),
                        ("vs", f"Δ domains vs {ref}")])
    print()
    print_table([{"rule": n, **{x: f"{100 * out[n]['routing']['routing_accuracy'][x]:.0f}" for x in cols}}
                 for n in routes if n != "oracle"], [("rule", "routing % per column")] + [(x, x) for x in cols])
    if args.json:
        args.json.write_text(json.dumps({"dir": str(args.dir), "zoo": str(args.zoo), "stride": args.stride,
                                         "seconds": seconds, "eligible": dict(zip(lm.tasks, eligible.tolist())),
                                         "rows": out}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
