"""Per-sequence routing of a routed causal LM: what the router pass costs, and how its decision
compares with ESM++'s per-layer routing.

One run builds (under a temporary directory) a synthetic LLaMA family whose T experts own
distinct input domains: each domain is a token range whose embedding rows are shifted along the
domain's own direction (base and experts alike), and each expert's task vector is a random
low-rank update of every linear. Prompts mix `--own` of their tokens from their domain with the
rest from a range shared by all domains, so routing is not trivial. The family is merged with
`esm_pp` and `sim` (task arithmetic base, rank `--rank`) through the merge runtime, then:

- routing accuracy on held-out prompts of each domain: the per-sequence rule of
  esm_ray.routed.lm (summed prototype cosines over the routed layers, one router pass of the
  merged base), SiM (one backbone pass), and ESM++'s per-layer routing (esm_ray.routed: each
  layer picks its own expert from its routed input; the layers' majority, and the share of
  layer decisions that hit the true domain);
- time of the router pass against the prefill of the prompt with its adapter and against the
  whole generation of `--new` tokens (greedy), at batch sizes 1 and 8.

    .venv/bin/python benchmarks/routed_lm_routing.py            # hidden 256, 4 layers (~2 min CPU)
    .venv/bin/python benchmarks/routed_lm_routing.py --tiny     # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_family(root: Path, hidden: int, layers: int, vocab: int, tasks: int, span: int, seed: int = 0
                 ) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=max(hidden // 64, 4), num_key_value_heads=max(hidden // 128, 2),
                      max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    shift = torch.linalg.qr(torch.randn(hidden, tasks, generator=g))[0].T * 0.05
    sd = model.state_dict()
    emb = sd["model.embed_tokens.weight"]
    for t in range(tasks):
        emb[1 + span * t:1 + span * (t + 1)] += shift[t]
    base = {k: v.clone() for k, v in sd.items()}
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"])
    for t in range(tasks):
        sd = {}
        for k, v in base.items():
            if v.ndim == 2 and "embed" not in k:
                a = torch.randn(v.shape[0], 4, generator=g) * 0.08
                b = torch.randn(4, v.shape[1], generator=g) * 0.08
                v = v + a @ b
            sd[k] = v
        model.load_state_dict(sd)
        paths[f"expert_{t}"] = root / f"expert_{t}"
        model.save_pretrained(paths[f"expert_{t}"])
    return paths


def prompts(task: int, n: int, span: int, shared: tuple[int, int], own: float, lo: int, hi: int, seed: int
            ) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        mine = torch.rand(length, generator=g) < own
        a = torch.randint(1 + span * task, 1 + span * (task + 1), (length,), generator=g)
        b = torch.randint(shared[0], shared[1], (length,), generator=g)
        out.append(torch.where(mine, a, b).tolist())
    return out


def left(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    from esm_ray.models.text import pad_batch

    return pad_batch(rows, 0, side="left")


def right(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    from esm_ray.models.text import pad_batch

    return pad_batch(rows, 0)


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers: a smoke run")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--own", type=float, default=0.6, help="share of a prompt's tokens from its own domain")
    ap.add_argument("--prompt", type=int, default=64, help="prompt length for the timings")
    ap.add_argument("--new", type=int, default=128, help="generated tokens for the timings")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hidden, layers = (64, 2) if args.tiny else (256, 4)
    tasks, span, vocab = 3, 96, 512
    shared = (1 + span * tasks, vocab)

    from esm_ray.routed import load_routed
    from esm_ray.routed.lm import load_routed_lm
    from esm_ray.runtime import run_merge
    from esm_ray.spec import MergeSpec
    import esm_ray.methods.sim  # noqa: F401

    names = [f"domain{t}" for t in range(tasks)]
    res: dict = {"shape": {"hidden": hidden, "layers": layers, "vocab": vocab, "tasks": tasks, "rank": args.rank},
                 "own": args.own, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fam = build_family(root / "family", hidden, layers, vocab, tasks, span)
        experts = []
        for t in range(tasks):
            p = root / f"{names[t]}.jsonl"
            p.write_text("".join(json.dumps({"input_ids": r}) + "\n"
                                 for r in prompts(t, 64, span, shared, args.own, 16, 64, seed=t)))
            experts.append({"name": names[t], "model": str(fam[f"expert_{t}"]), "data": str(p)})
        out = root / "sim"  # SiM stores the prototypes too: both routers on the same experts
        run_merge(MergeSpec(base=str(fam["base"]), experts=experts, output=str(out),
                            method={"name": "sim", "params": {"base_method": "task_arithmetic", "rank": args.rank,
                                                              "expert_dtype": "float32", "subspace_rank": 8,
                                                              "support_samples": 64}},
                            calibration={"samples": 64, "batch_size": 16, "max_length": 64,
                                         "cache_dir": str(root / "cache")}), progress=False)
        lm = load_routed_lm(out)
        per_layer = load_routed(out)

        # ---- routing accuracy ------------------------------------------------------------------
        acc: dict = {}
        for lo, hi in ((4, 8), (16, 32), (64, 64)):
            rows = [r for t in range(tasks) for r in prompts(t, 100, span, shared, args.own, lo, hi, seed=1000 + t)]
            truth = torch.tensor([t for t in range(tasks) for _ in range(100)])
            ids, mask = left(rows)
            row = {}
            for router in ("prototype", "sim"):
                got = torch.tensor([names.index(x) for x in lm.route(ids, mask, router)])
                row[f"sequence_{router}"] = float((got == truth).float().mean())
            with torch.no_grad():  # right-padded: RoutedModel counts positions from the first column
                o = per_layer(*right(rows), router="prototype")
            row["per_layer_vote"] = float((o.task.cpu() == truth).float().mean())
            row["per_layer_decisions"] = float((o.layer_choices.cpu() == truth[:, None]).float().mean())
            acc[f"{lo}-{hi} tokens"] = row
        res["routing_accuracy"] = acc

        # ---- cost --------------------------------------------------------------------------------
        cost = {}
        for batch in (1, 8):
            rows = [r for r in prompts(0, batch, span, shared, args.own, args.prompt, args.prompt, seed=7)]
            ids, mask = left(rows)
            task_list = [names[0]] * batch
            t_route = timed(lambda: lm.route(ids, mask, "prototype"), 5)
            t_sim = timed(lambda: lm.route(ids, mask, "sim"), 5)
            t_prefill = timed(lambda: lm.logits(ids, mask, task_list), 5)
            t_gen = timed(lambda: lm.generate(ids, mask, tasks=task_list, max_new_tokens=args.new, do_sample=False,
                                              min_new_tokens=args.new), 2)
            cost[f"batch {batch}"] = {"router_pass_s": t_route, "sim_pass_s": t_sim, "prefill_s": t_prefill,
                                      "generate_s": t_gen,
                                      "router_over_prefill": t_route / t_prefill,
                                      "router_over_generate": t_route / t_gen,
                                      "sim_over_generate": t_sim / t_gen}
        res["cost"] = cost
        res["prompt_tokens"], res["new_tokens"] = args.prompt, args.new
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
