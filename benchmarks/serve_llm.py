"""Serving a causal LM through the OpenAI API: tokens/s and time to first token.

One private Ray on 127.0.0.1, one replica of esm-ray's LLM app on a causal-LM directory (merged
base + adapters/<task>/ + optional router/). Each model id is measured in turn with the `openai`
client, streaming completions of --max-tokens tokens (temperature 0, EOS ignored by asking for a
fixed length is not possible through the API, so the table reports the tokens actually made):

  static   the merged model alone (`model: <dir name>`)
  expert   one task's adapter (`model: <task>`)
  routed   the router picks the adapter (`model: auto`; only when the directory has a router)
  mixed    each client thread names a different task: heterogeneous adapters in one batch
  mixed (peft)  the same, on a replica decoding with peft's mixed-adapter batch (--peft-row)

at each concurrency (default 1 and 8): p50 time to first token, p50 request time, generated
tokens/s over all clients, and the mean decoding batch size the replica saw (GET /v1/model).

    .venv/bin/python benchmarks/serve_llm.py --tiny                # the test suite's tiny LLaMA, a smoke run
    .venv/bin/python benchmarks/serve_llm.py --dir out/routed-lm --max-tokens 128
    .venv/bin/python benchmarks/serve_llm.py --dir out/routed-lm --zoo ZOO   # prompts from the LM zoo's test items

With --zoo the prompts are the zoo's own test items, so `auto` routes real domain text and
`mixed` names the adapters in turn. `--routers prototype likelihood,m=2,margin=inf depth=12` gives
one `routed` row per router choice (each its own replica, measured in turn): a router name and/or
its options, m (likelihood candidates), margin (likelihood margin per routed layer; inf: always
the likelihood pass) and depth (decoder blocks of the router pass); what is not named is the
directory's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_tiny(root: Path) -> Path:
    from tests.fixtures.family import make_family
    from tests.fixtures.lm_dir import make_lm_dir

    fam = make_family(root / "family", "llama", 1, seed=0)
    return make_lm_dir(root / "lm", fam["base"])


def one(client, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, request time, tokens) of one streamed completion."""
    t0 = time.perf_counter()
    first, n = None, 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for ch in stream:
        if ch.choices and ch.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if ch.usage is not None:
            n = ch.usage.completion_tokens
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, n


def router_options(choice: str) -> dict[str, object]:
    """LLMOptions fields of a --routers choice: ROUTER[,m=M][,margin=TAU][,depth=N]."""
    keys = {"m": ("likelihood_candidates", int), "margin": ("likelihood_margin", float), "depth": ("router_depth", int)}
    out: dict[str, object] = {}
    for part in choice.split(","):
        k, eq, v = part.partition("=")
        if not eq:
            out["router"] = k
        elif k in keys:
            out[keys[k][0]] = keys[k][1](v)
        else:
            raise SystemExit(f"--routers {choice}: unknown option {k!r} (have: {', '.join(keys)})")
    return out


def zoo_prompts(zoo_dir: str, model_dir: Path, n: int, tokens: int = 32) -> list[str]:
    """n prompts from an LM zoo's test items, the columns taken in turn: a domain passage's first
    `tokens` tokens, a label task's prompt (so `auto` routes real domain text)."""
    from transformers import AutoTokenizer

    from esm_ray.zoo.layout import open_zoo
    from esm_ray.zoo.lm_tasks import column_kind

    zoo = open_zoo(zoo_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir if (model_dir / "tokenizer_config.json").is_file()
                                            else zoo.base_dir))
    per = {}
    for c in zoo.tasks:
        rows = zoo.rows(c, "test")
        if column_kind(zoo, c) == "accuracy":
            per[c] = [r["prompt"] for r in rows]
        else:
            per[c] = [tok.decode(tok(r["text"], add_special_tokens=False)["input_ids"][:tokens]) for r in rows]
    return [per[c][(i // len(per)) % len(per[c])] for i, c in zip(range(n), [*zoo.tasks] * n)]


def measure(url: str, models: list[str], conc: int, requests: int, max_tokens: int,
            prompts: list[str] | None = None) -> dict[str, float]:
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0)
    prompts = prompts or [" ".join(f"w{(7 * i + k) % 60}" for k in range(4 + i % 5)) for i in range(requests)]
    one(client, models[0], prompts[0], 4)  # warm-up
    info = httpx.get(f"{url}/v1/model", timeout=30).json()
    before = (info["batches_run"], info["sequences_run"])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        got = list(pool.map(lambda i: one(client, models[i % len(models)], prompts[i % len(prompts)], max_tokens),
                            range(requests)))
    wall = time.perf_counter() - t0
    info = httpx.get(f"{url}/v1/model", timeout=30).json()
    batch = (info["sequences_run"] - before[1]) / max(1, info["batches_run"] - before[0])
    return {"ttft_p50_ms": 1000 * statistics.median(g[0] for g in got),
            "req_p50_ms": 1000 * statistics.median(g[1] for g in got),
            "tok_s": sum(g[2] for g in got) / wall, "batch": batch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="causal-LM directory to serve")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny LLaMA with 3 LoRA adapters")
    ap.add_argument("--zoo", help="an LM zoo: prompts are its test items (a passage's first 32 tokens, a "
                                  "label task's prompt), the columns in turn; default: synthetic words")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=16, help="requests per (model, concurrency)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the replica")
    ap.add_argument("--routers", nargs="+", default=[],
                    help="routed rows, one replica each: ROUTER[,m=M][,margin=TAU][,depth=N] or options alone "
                         "(e.g. likelihood,m=2,margin=0.05 or depth=12); unnamed: the directory's")
    ap.add_argument("--batch-wait-s", type=float, default=0.01,
                    help="the replica's batch_wait_timeout_s; with wave batching a longer wait (0.25) lets all "
                         "clients' first requests share the first batch, so rows see the same batch sizes")
    ap.add_argument("--peft-row", action="store_true",
                    help="one more `mixed` row on a replica with `adapters: peft` (peft's mixed-adapter batch "
                         "instead of the stacked adapters)")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    if args.tiny:
        model_dir = build_tiny(Path(tmp.name))
        args.max_tokens = min(args.max_tokens, 48)  # the tiny LLaMA holds 64 positions
    elif args.dir:
        model_dir = Path(args.dir)
    else:
        ap.error("give --dir or --tiny")

    import ray
    from ray import serve

    from esm_ray.serve import free_port
    from esm_ray.serve.llm_app import LLMOptions, build_llm
    from esm_ray.serve.llm_backend import adapter_tasks
    from esm_ray.spec import ServeSpec

    ray.init(num_cpus=2 + len(args.routers) + args.peft_row, include_dashboard=False, log_to_driver=False)  # a replica asks 1
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    spec = ServeSpec(num_cpus=1, max_ongoing_requests=64)
    opts = LLMOptions(model_dir=str(model_dir), threads=args.threads, max_batch_size=32,
                      batch_wait_timeout_s=args.batch_wait_s)
    serve.run(build_llm(opts, spec, max_queued_requests=-1), name="lm", route_prefix="/lm")
    url = f"http://127.0.0.1:{port}/lm"
    urls: dict[str, str] = {}  # rows measured on a replica of their own (the others: `url`)
    routed: list[str] = []
    for i, choice in enumerate(args.routers):  # one more replica per router; idle while the others run
        o = opts.model_copy(update=router_options(choice))
        serve.run(build_llm(o, spec, max_queued_requests=-1), name=f"lm{i}", route_prefix=f"/lm{i}")
        routed.append(f"routed ({choice})")
        urls[routed[-1]] = f"http://127.0.0.1:{port}/lm{i}"
    tasks = adapter_tasks(model_dir)
    if args.peft_row and tasks:
        serve.run(build_llm(opts.model_copy(update={"adapters": "peft"}), spec, max_queued_requests=-1), name="lmp",
                  route_prefix="/lmp")
        urls["mixed (peft)"] = f"http://127.0.0.1:{port}/lmp"
    prompts = zoo_prompts(args.zoo, model_dir, args.requests) if args.zoo else None
    rows = {"static": [model_dir.name]}
    if tasks:
        rows |= {"expert": [tasks[0]], "mixed": tasks}
        rows |= {"mixed (peft)": tasks} if "mixed (peft)" in urls else {}
    if (model_dir / "router" / "manifest.json").is_file():
        rows |= {name: ["auto"] for name in routed} if routed else {"routed": ["auto"]}
    print("| model | concurrency | TTFT p50 ms | request p50 ms | tokens/s | mean batch |\n|---|---|---|---|---|---|")
    try:
        for conc in args.concurrency:
            for name, models in rows.items():
                m = measure(urls.get(name, url), models, conc, args.requests, args.max_tokens, prompts)
                print(f"| {name} | {conc} | {m['ttft_p50_ms']:.0f} | {m['req_p50_ms']:.0f} | {m['tok_s']:.1f} | "
                      f"{m['batch']:.1f} |", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
