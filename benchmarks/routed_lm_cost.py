"""What each router of a routed causal LM costs on real prompts, against the generation it
precedes: a routed LM directory (`esm-ray merge` with esm_pp / sim on a causal LM) and an LM zoo
(`esm-ray zoo lm`) whose test passages and prompts give the requests.

For batch sizes 1 and 8, prompts of `--prompt` tokens (the first tokens of the zoo's test
items, taken round-robin over its columns) are routed by every router the directory has, then
generated greedily for `--new` tokens with the routed adapters; each timing is the median of
`--repeat` runs after one warm-up, in this process (one torch thread by default). The table gives each router's
time per batch and as a share of the generation; `--candidates 2 3 all` times the likelihood
router with each number of candidate adapters.

    .venv/bin/python benchmarks/routed_lm_cost.py DIR --zoo ZOO
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import print_table  # noqa: E402
from routed_lm_routing import timed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--new", type=int, default=128, help="generated tokens (default 128)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--candidates", nargs="+", type=lambda v: None if v == "all" else int(v), default=[None],
                    help="the likelihood router's candidates per prompt, one row each ('all': every eligible)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from esm_ray.eval.routed_lm import RoutedLMScorer
    from esm_ray.routed.lm import load_routed_lm
    from esm_ray.zoo.layout import open_zoo

    zoo = open_zoo(args.zoo)
    lm = load_routed_lm(args.dir)
    lm.tokenizer = lm.tokenizer or AutoTokenizer.from_pretrained(str(zoo.base_dir))
    scorer = RoutedLMScorer(lm, zoo, "test", zoo.tasks)
    texts = [scorer.routing_text(c, scorer.rows[c][i]) for i in range(8) for c in zoo.tasks]
    rows = []
    for batch in (1, 8):
        ids, mask = lm.encode(texts[:batch], max_length=args.prompt)
        tasks = lm.route(ids, mask, "prototype")
        gen = timed(lambda: lm.generate(ids, mask, tasks=tasks, max_new_tokens=args.new, min_new_tokens=args.new,
                                        do_sample=False), args.repeat)
        for router in lm.routers:
            for m in (args.candidates if router == "likelihood" else [None]):
                lm.likelihood_candidates = m
                t = timed(lambda: lm.route(ids, mask, router), args.repeat)
                name = router if router != "likelihood" or m is None else f"likelihood, {m} candidates"
                rows.append({"batch": batch, "router": name, "route_s": t, "generate_s": gen,
                             "share": f"{100 * t / gen:.1f}%"})
    gains = lm.gains.tolist() if lm.gains is not None else None
    print(f"{args.dir.name}: {len(lm.tasks)} tasks, routers {', '.join(lm.routers)}; prompts of {args.prompt} "
          f"tokens, {args.new} generated, {args.threads} thread(s)"
          + (f"; likelihood-eligible tasks: {sum(g > 0 for g in gains)}" if gains else ""))
    print_table(rows, [("batch", "batch"), ("router", "router"), ("route_s", "route s"),
                       ("generate_s", f"generate {args.new} s"), ("share", "route / generate")])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
