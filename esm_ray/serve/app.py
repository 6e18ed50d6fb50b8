"""The HTTP service: a Ray Serve deployment with a FastAPI ingress around a RoutedModel.

    POST /v1/predict   {"inputs": [text or token ids, ...], "task": optional, "router": optional}
                       -> per input: label, task used, router scores
    GET  /v1/model     tasks, labels, method, routers, sizes, limits
    GET  /healthz      liveness
    GET  /docs         OpenAPI UI (/openapi.json)

Inputs of all concurrent requests are gathered by @serve.batch into one forward pass. Routing
stays per sample inside the batch: each routed layer groups the batch's samples by their chosen
expert and runs each expert once (SiM: one backbone pass decides every sample's expert first).
Every input is checked before it joins a batch (esm_ray/serve/guard.py), and a batch that fails
anyway is rerun one input at a time, so one bad input fails its own request only.
Errors: 422 malformed JSON or wrong types (FastAPI names the field), a token id outside the
vocabulary or text that is not valid Unicode (naming `inputs[i]`); 413 a body over
max_body_bytes, an input over max_input_chars (naming it) or too many inputs; 400 empty inputs
or an unknown task; 503 when the replica's queue is full (max_ongoing_requests plus
max_queued_requests, enforced by Ray Serve). Inputs are cut at max_length tokens, and
max_length at the model's position limit.
"""

import asyncio
import logging
import time
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from ray import serve

from esm_ray.serve.guard import check_inputs, parse_body, read_body

log = logging.getLogger("esm_ray.serve")

Router = Literal["prototype", "sim", "oracle", "none"]


class ServeOptions(BaseModel):
    """What a replica needs besides its resources (those are deployment options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: str
    router: Router | None = None
    heads: dict[str, str] = Field(default_factory=dict, description="extra {task: expert dir or head file}")
    device: str | None = None  # default: cuda when the replica has a GPU, else cpu
    threads: int | None = Field(None, ge=1, description="torch threads per replica (default: its CPUs)")
    max_inputs_per_request: int = Field(64, ge=1)
    max_length: int = Field(128, ge=4)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body bytes before 413")
    max_input_chars: int = Field(20_000, ge=1, description="characters (or token ids) per input before 413")
    debug_delay_s: float = Field(0.0, ge=0, description="test only: extra seconds per batch")
    debug_fail_input: str | None = Field(None, description="test only: a batch holding this text raises")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[StrictStr | list[StrictInt]] = Field(
        description="texts, or token id lists for models without a tokenizer", examples=[["a fine film"]])
    task: StrictStr | None = Field(None, description="use this task's expert and head for every input "
                                                     "(default: route each input)")
    router: Router | None = Field(None, description="override the model's default router")


class Prediction(BaseModel):
    label: str
    label_id: int
    task: str = Field(description="the task whose expert and head served this input")
    scores: dict[str, float] | None = Field(None, description="router score per task (higher is better); "
                                                              "absent when the task was given")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    router: str
    took_ms: float


def _replica_gpus() -> int:
    import ray

    try:
        return len(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside a Ray worker there are none to ask about
        return 0


# /v1/predict reads its body itself (size limit first); its schema is declared for the docs
_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


# Serve ships the deployment class by value, with the module globals it found when the class was
# decorated: whatever it uses is defined above it, and annotations are real objects (no
# `from __future__ import annotations`), so FastAPI can rebuild the schemas in the proxy.
app = FastAPI(title="esm-ray routed model", version="1",
              description="Merged model with per-sample routed low-rank experts (ESM++ / SiM).")


@serve.deployment(name="RoutedModel")
@serve.ingress(app)
class RoutedServer:
    """One replica: a RoutedModel in memory and a batched predict path."""

    def __init__(self, options: dict[str, Any]) -> None:
        import torch

        from esm_ray.raylocal import loopback_grpc
        from esm_ray.routed import load_routed

        loopback_grpc()  # a replica on a loopback node keeps its internal gRPC server there too
        self.opts = ServeOptions.model_validate(options)
        device = self.opts.device or ("cuda" if _replica_gpus() > 0 and torch.cuda.is_available() else "cpu")
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        t0 = time.perf_counter()
        self.model = load_routed(self.opts.model_dir, device=device, router=self.opts.router,
                                 heads=dict(self.opts.heads))
        missing = [t for t in self.model.tasks if t not in self.model.heads]
        if missing:
            raise ValueError(f"{self.opts.model_dir}: no head for task(s) {', '.join(missing)}; "
                             "give them with --head TASK=EXPERT_DIR")
        limit = self.model.max_positions
        self.max_length = min(self.opts.max_length, limit) if limit else self.opts.max_length
        self.vocab_size = self.model.vocab_size
        self._predict_batch.set_max_batch_size(self.opts.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.opts.batch_wait_timeout_s)
        self._info = self._describe()
        log.info("loaded %s (%d tasks, router %s) on %s in %.1fs", self.opts.model_dir, len(self.model.tasks),
                 self.model.router, device, time.perf_counter() - t0)

    def _describe(self) -> dict[str, Any]:
        m = self.model
        return {"model_dir": self.opts.model_dir, "method": m.manifest.get("method", "static"),
                "base_method": m.manifest.get("base_method"),
                "tasks": [{"name": t, "labels": m.heads[t].labels} for t in m.tasks],
                "router": m.router, "routers": m.routers, "rank": m.rank, "routed_layers": len(m.routed),
                "sizes": m.sizes(),
                "limits": {"max_inputs_per_request": self.opts.max_inputs_per_request,
                           "max_length": self.max_length, "max_batch_size": self.opts.max_batch_size,
                           "batch_wait_timeout_s": self.opts.batch_wait_timeout_s,
                           "max_body_bytes": self.opts.max_body_bytes, "max_input_chars": self.opts.max_input_chars,
                           "vocab_size": self.vocab_size}}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "tasks": len(self.model.tasks)}

    @app.get("/v1/model")
    async def model_info(self) -> dict[str, Any]:
        import os

        try:
            import psutil

            rss = int(psutil.Process().memory_info().rss)
        except ImportError:  # psutil comes with ray[default]; without it the RSS is not reported
            rss = None
        return {**self._info, "replica": {"pid": os.getpid(), "rss_bytes": rss}}

    @app.post("/v1/predict", response_model=PredictResponse, openapi_extra=_PREDICT_BODY)
    async def predict(self, request: Request) -> PredictResponse:
        t0 = time.perf_counter()
        req = parse_body(await read_body(request, self.opts.max_body_bytes), PredictRequest)
        n = len(req.inputs)
        if n == 0:
            raise HTTPException(400, "`inputs` is empty: send at least one text or token id list")
        if n > self.opts.max_inputs_per_request:
            raise HTTPException(413, f"too many inputs: {n} in one request, at most "
                                     f"{self.opts.max_inputs_per_request}; split the request")
        check_inputs(req.inputs, vocab_size=self.vocab_size, max_chars=self.opts.max_input_chars,
                     has_tokenizer=self.model.tokenizer is not None)
        if req.task is not None and req.task not in self.model.tasks:
            raise HTTPException(400, f"unknown task {req.task!r} (known: {', '.join(self.model.tasks)})")
        router = req.router or self.model.router
        if router not in self.model.routers:
            raise HTTPException(400, f"router {router!r} is not available (have: {', '.join(self.model.routers)})")
        if req.task is None and (router == "oracle" or router == "none") and len(self.model.tasks) > 1:
            raise HTTPException(400, f"router {router!r} needs `task` (one of {', '.join(self.model.tasks)})")
        results = await asyncio.gather(*[self._predict_batch((x, req.task, router)) for x in req.inputs])
        for i, r in enumerate(results):
            if "error" in r:
                raise HTTPException(422, f"`inputs[{i}]` could not be processed: {r['error']}")
        return PredictResponse(predictions=[Prediction(**r) for r in results], router=router,
                               took_ms=round(1000 * (time.perf_counter() - t0), 3))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, items: list[tuple[Any, str | None, str]]) -> list[dict[str, Any]]:
        if self.opts.debug_delay_s:
            await asyncio.sleep(self.opts.debug_delay_s)
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: list[tuple[Any, str | None, str]]) -> list[dict[str, Any]]:
        """One forward pass per router over the batch; if it raises, each of its inputs is run
        alone, so only the input that fails gets an error ({"error": message})."""
        out: list[dict[str, Any] | None] = [None] * len(items)
        by_router: dict[str, list[int]] = {}
        for i, (_, _, router) in enumerate(items):
            by_router.setdefault(router, []).append(i)
        for router, idx in by_router.items():
            try:
                preds = self._forward([items[i] for i in idx], router)
            except Exception as err:  # noqa: BLE001 - isolate the input that caused it
                log.warning("a batch of %d failed (%s: %s); running its inputs one by one", len(idx),
                            type(err).__name__, err)
                preds = []
                for i in idx:
                    try:
                        preds.extend(self._forward([items[i]], router))
                    except Exception as one:  # noqa: BLE001 - this input's own failure, reported to its caller
                        preds.append({"error": f"{type(one).__name__}: {one}"})
            for i, p in zip(idx, preds):
                out[i] = p
        return out  # type: ignore[return-value]

    def _forward(self, items: list[tuple[Any, str | None, str]], router: str) -> list[dict[str, Any]]:
        if self.opts.debug_fail_input is not None and any(x == self.opts.debug_fail_input for x, _, _ in items):
            raise RuntimeError(f"debug_fail_input {self.opts.debug_fail_input!r} in the batch")
        return self.model.predict([x for x, _, _ in items], [t for _, t, _ in items], router=router,
                                  max_length=self.max_length)


def deployment_options(spec: Any, max_queued_requests: int | None = None) -> dict[str, Any]:
    """Serve deployment options from a ServeSpec: replicas, resources, request limits."""
    opts: dict[str, Any] = {
        "num_replicas": spec.num_replicas,
        "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        "max_ongoing_requests": spec.max_ongoing_requests,
    }
    if max_queued_requests is not None:
        opts["max_queued_requests"] = max_queued_requests
    return opts


def build(options: ServeOptions | dict[str, Any], spec: Any = None, max_queued_requests: int | None = None,
          constructor_retries: int | None = None):
    """The bound Serve application for a model directory. constructor_retries: how often Serve
    tries to start a replica before the deployment fails (default: Ray Serve's)."""
    from esm_ray.spec import ServeSpec

    spec = spec or ServeSpec()
    opts = options if isinstance(options, ServeOptions) else ServeOptions.model_validate(options)
    extra = {} if constructor_retries is None else {"max_constructor_retry_count": constructor_retries}
    dep = RoutedServer.options(**deployment_options(spec, max_queued_requests), **extra)
    return dep.bind(opts.model_dump())


def app_builder(args: dict[str, Any]):
    """Import path for `serve run` / KubeRay serveConfigV2: esm_ray.serve.app:app_builder.

    args: the ServeOptions fields (model_dir, router, heads, limits) plus the deployment knobs
    num_replicas, num_cpus, num_gpus, max_ongoing_requests, max_queued_requests.
    """
    from esm_ray.spec import ServeSpec

    args = dict(args)
    knobs = {k: args.pop(k) for k in ("num_replicas", "num_cpus", "num_gpus", "max_ongoing_requests")
             if k in args}
    queued = args.pop("max_queued_requests", None)
    for k in ("max_batch_size", "batch_wait_timeout_s", "max_inputs_per_request", "max_body_bytes",
              "max_input_chars"):
        if k in args:
            knobs[k] = args[k]
    spec = ServeSpec(**knobs)
    return build(ServeOptions.model_validate(args), spec, None if queued is None else int(queued))
