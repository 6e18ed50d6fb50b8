"""`esm-ray serve DIR`: host a routed (or static merged + heads) model over HTTP with Ray Serve."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from esm_ray.errors import SpecError


def _heads(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        task, sep, path = v.partition("=")
        if not sep or not task or not path:
            raise SpecError(f"--head {v!r}: expected TASK=EXPERT_DIR_OR_HEAD_FILE")
        out[task] = path
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from esm_ray.raylocal import loopback_env

    if not args.address:
        loopback_env()  # the private Ray stays on 127.0.0.1: set before Ray is first imported
    from esm_ray.serve.app import ServeOptions
    from esm_ray.serve.llm_app import LLMOptions
    from esm_ray.serve.llm_backend import is_causal_lm_dir
    from esm_ray.serve.runner import ReplicaFailed, start, stop
    from esm_ray.spec import ServeSpec, load_spec

    base = ServeSpec()
    if args.spec:
        base = load_spec(args.spec).serve or base
    updates = {k: v for k, v in {
        "host": args.host, "port": args.port, "num_replicas": args.replicas, "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus, "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s, "max_ongoing_requests": args.max_ongoing_requests,
        "max_inputs_per_request": args.max_inputs, "max_body_bytes": args.max_body_bytes,
        "max_input_chars": args.max_input_chars}.items() if v is not None}
    spec = ServeSpec.model_validate({**base.model_dump(), **updates})
    llm = is_causal_lm_dir(args.dir)
    if args.likelihood_candidates is not None and args.likelihood_candidates < 1:
        raise SpecError(f"--likelihood-candidates must be at least 1 (got {args.likelihood_candidates})")
    if args.likelihood_margin is not None and not args.likelihood_margin >= 0:
        raise SpecError(f"--likelihood-margin must be at least 0 (got {args.likelihood_margin})")
    if args.router_depth is not None and args.router_depth < 1:
        raise SpecError(f"--router-depth must be at least 1 (got {args.router_depth})")
    opts: LLMOptions | ServeOptions
    if llm:
        if args.head or args.router in ("oracle", "none"):
            raise SpecError(f"{args.dir} is a causal LM: --head and --router oracle|none are for routed encoders "
                            "(a causal LM routes `model: auto` with prototype, sim or likelihood)")
        opts = LLMOptions(model_dir=args.dir, served_name=args.served_name, max_batch_size=spec.max_batch_size,
                          batch_wait_timeout_s=spec.batch_wait_timeout_s,
                          max_waiting=args.max_waiting or 8 * spec.max_batch_size,
                          max_inputs_per_request=spec.max_inputs_per_request, max_body_bytes=spec.max_body_bytes,
                          max_input_chars=spec.max_input_chars, threads=max(1, int(spec.num_cpus)),
                          router=args.router, likelihood_candidates=args.likelihood_candidates,
                          likelihood_margin=args.likelihood_margin, router_depth=args.router_depth,
                          **({"adapters": args.adapters} if args.adapters else {}))
    else:
        if args.router == "likelihood" or args.likelihood_candidates is not None or args.likelihood_margin is not None:
            raise SpecError(f"{args.dir} is not a causal LM: the likelihood router is for routed causal LMs")
        if args.router_depth is not None:
            raise SpecError(f"{args.dir} is not a causal LM: --router-depth is for routed causal LMs")
        if args.adapters:
            raise SpecError(f"{args.dir} is not a causal LM: --adapters is for causal LMs with LoRA adapters")
        opts = ServeOptions(model_dir=args.dir, router=args.router, heads=_heads(args.head or []),
                            max_inputs_per_request=spec.max_inputs_per_request, max_length=args.max_length,
                            max_batch_size=spec.max_batch_size, batch_wait_timeout_s=spec.batch_wait_timeout_s,
                            max_body_bytes=spec.max_body_bytes, max_input_chars=spec.max_input_chars,
                            threads=max(1, int(spec.num_cpus)))
    queued = args.max_queued_requests if args.max_queued_requests is not None else 4 * spec.max_ongoing_requests
    try:
        running = start(opts, spec, max_queued_requests=queued, address=args.address, name=args.name)
    except ReplicaFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    routes = ("POST /v1/completions, POST /v1/chat/completions, GET /v1/models" if llm else
              "POST /v1/predict, GET /v1/model")
    print(f"serving {args.dir} on {running.url}  ({routes}, GET /healthz, docs at /docs)", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        stop(running)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a routed or merged model over HTTP (Ray Serve); a causal LM "
                                     "directory gets the OpenAI API")
    p.add_argument("dir", help="routed or merged model directory (local or s3://; a causal LM: local)")
    p.add_argument("--spec", help="take defaults from a job spec's `serve:` section")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, help="number of replicas")
    p.add_argument("--num-cpus", type=float, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, help="GPUs per replica (fractions share a GPU)")
    p.add_argument("--max-batch-size", type=int, help="inputs per batched forward pass")
    p.add_argument("--batch-wait-timeout-s", type=float, help="how long a batch waits to fill")
    p.add_argument("--max-ongoing-requests", type=int, help="concurrent requests per replica")
    p.add_argument("--max-queued-requests", type=int,
                   help="requests waiting beyond that before 503 (default 4 x max-ongoing-requests; -1 = no limit)")
    p.add_argument("--max-inputs", type=int, help="inputs per request before 413")
    p.add_argument("--max-body-bytes", type=int, help="request body bytes before 413 (default 1 MiB)")
    p.add_argument("--max-input-chars", type=int, help="characters (or token ids) per input before 413 "
                                                       "(default 20000)")
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens per input (longer inputs are truncated; never above the model's position limit)")
    p.add_argument("--router", choices=["prototype", "sim", "likelihood", "oracle", "none"],
                   help="default router (causal LM: prototype, sim or likelihood, the router of model: auto)")
    p.add_argument("--likelihood-candidates", type=int, metavar="M",
                   help="causal LM, likelihood router: adapters scored per prompt, the M the prototypes rank "
                        "highest (default: the directory's)")
    p.add_argument("--likelihood-margin", type=float, metavar="TAU",
                   help="causal LM, likelihood router: keep the prototypes' choice without the likelihood pass "
                        "when their two best scores differ by at least TAU per routed layer (default: the "
                        "directory's; inf: always run the pass)")
    p.add_argument("--router-depth", type=int, metavar="N",
                   help="causal LM, prototype and likelihood routers: the router pass runs the first N decoder "
                        "blocks only (default: the directory's; all)")
    p.add_argument("--adapters", choices=["stacked", "peft"],
                   help="causal LM: how rows on different adapters share a decoding batch: each LoRA layer's "
                        "adapters stacked, two batched matmuls per layer (default), or peft's mixed-adapter batch")
    p.add_argument("--head", action="append", metavar="TASK=PATH",
                   help="a task head from an expert directory or head file (repeatable)")
    p.add_argument("--served-name", help="causal LM: the merged model's id in the OpenAI API (default: DIR's name)")
    p.add_argument("--max-waiting", type=int, help="causal LM: sequences waiting for a decoding batch before 503 "
                                                   "(default 8 x max-batch-size)")
    p.add_argument("--address", help="existing Ray cluster (auto, ray://host:10001); default: a private one")
    p.add_argument("--name", default="esm-ray", help="Serve application name")
    p.set_defaults(func=cmd_serve)
