"""The OpenAI-compatible HTTP service for causal-LM directories (static merge, task adapters, router).

    POST /v1/completions        prompt(s) -> text; stream: true sends server-sent events
    POST /v1/chat/completions   messages through the tokenizer's chat template -> assistant text
    GET  /v1/models             the merged model, each task adapter, `auto` when a router exists
    GET  /healthz               liveness

Every response names the task that served it: `esm_ray: {"task": ..., "tasks": [per choice]}`
(and in each stream chunk). Errors are OpenAI's JSON shape: 422 a body that does not parse or a
field of the wrong type or unknown (naming it), 400 a field esm-ray does not honour or a bad value
(naming it), 404 an unknown model, 413 a body over max_body_bytes, a prompt over max_input_chars
characters or the model's positions, too many prompts; 503 when more than max_waiting sequences
wait (and Ray Serve's own max_queued_requests). Concurrent requests share decoding batches
(esm_ray/serve/llm_batcher.py).
"""

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ConfigDict, Field
from ray import serve

from esm_ray.serve.guard import parse_body, read_body
from esm_ray.serve.llm_api import (ApiError, ChatRequest, CompletionRequest, RouterOptions, error_body,
                                   validation_error)

log = logging.getLogger("esm_ray.serve")


class LLMOptions(RouterOptions):
    """What a causal-LM replica needs besides its resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: str
    served_name: str | None = Field(None, description="the merged model's id (default: the directory's name)")
    adapters: Literal["stacked", "peft"] = Field(
        "stacked", description="how rows on different adapters share a decoding batch: stacked factors "
                               "(esm_ray.routed.multi_lora) or peft's mixed-adapter batch")
    device: str | None = None
    threads: int | None = Field(None, ge=1)
    max_batch_size: int = Field(32, ge=1, description="sequences per decoding batch")
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_waiting: int = Field(256, ge=1, description="sequences waiting for a batch before 503")
    max_inputs_per_request: int = Field(64, ge=1, description="prompts x n per request before 413")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_input_chars: int = Field(20_000, ge=1, description="characters (or token ids) per prompt before 413")
    max_tokens_limit: int = Field(1024, ge=1, description="the largest max_tokens a request may ask")
    max_n: int = Field(8, ge=1)
    debug_delay_s: float = Field(0.0, ge=0, description="test only: extra seconds per batch")
    debug_fail_token: int | None = Field(None, description="test only: a batch holding this token id raises")


app = FastAPI(title="esm-ray routed LM", version="1",
              description="OpenAI-compatible completions on a merged model with one LoRA adapter per task.")


@app.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    e = validation_error(list(err.errors()))
    return JSONResponse(e.body(), status_code=e.status)


@app.exception_handler(HTTPException)
async def _http_error(_: Request, err: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)


def _check_text(text: str, where: str, max_chars: int) -> None:
    """413 over max_chars characters, 422 for text that is not valid Unicode (a lone surrogate)."""
    if len(text) > max_chars:
        raise ApiError(413, f"`{where}` has {len(text)} characters, over the limit of {max_chars}", where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(422, f"`{where}` is not valid Unicode text ({err.reason} at character {err.start})",
                       where) from None


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


@serve.deployment(name="RoutedLM")
@serve.ingress(app)
class LLMServer:
    """One replica: the backend (model, adapters, router) and its decoding batcher."""

    def __init__(self, options: dict[str, Any]) -> None:
        import torch

        from esm_ray.raylocal import loopback_grpc
        from esm_ray.serve.llm_backend import LLMBackend
        from esm_ray.serve.llm_batcher import Batcher

        loopback_grpc()
        self.opts = LLMOptions.model_validate(options)
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        device = self.opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        self.backend = LLMBackend(self.opts.model_dir, device=device, served_name=self.opts.served_name,
                                  router_loader=self.opts.router_loader, **self.opts.router_choice(),
                                  stacked=self.opts.adapters == "stacked")
        self.batcher = Batcher(self.backend, max_batch_size=self.opts.max_batch_size,
                               wait_s=self.opts.batch_wait_timeout_s, max_waiting=self.opts.max_waiting,
                               debug_delay_s=self.opts.debug_delay_s, debug_fail_token=self.opts.debug_fail_token)
        self.created = int(time.time())
        log.info("loaded %s (%d task adapters, router: %s) on %s in %.1fs", self.opts.model_dir,
                 len(self.backend.tasks), self.backend.router is not None, device, time.perf_counter() - t0)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "tasks": len(self.backend.tasks)}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m["id"], "object": "model", "created": self.created, "owned_by": "esm-ray",
             "esm_ray": {"kind": m["kind"]}} for m in self.backend.model_ids()]}

    @app.get("/v1/model")
    async def model_info(self) -> dict[str, Any]:
        b = self.backend
        return {"model_dir": self.opts.model_dir, "name": b.name, "tasks": b.tasks, "router": b.router is not None,
                "adapters": "stacked" if b.stacked is not None else ("peft" if b.mixed else None),
                "max_positions": b.max_positions, "vocab_size": b.vocab_size,
                "recent_batch_sizes": list(self.batcher.batches), "batches_run": self.batcher.batches_run,
                "sequences_run": self.batcher.sequences_run, "limits": self.opts.model_dump()}

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        req = parse_body(await read_body(request, self.opts.max_body_bytes), CompletionRequest)
        prompts = self._prompts(req.prompt)
        return await self._answer(req, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        req = parse_body(await read_body(request, self.opts.max_body_bytes), ChatRequest)
        if not req.messages:
            raise ApiError(400, "`messages` is empty: send at least one message", "messages")
        msgs = []
        for i, m in enumerate(req.messages):
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            _check_text(content, f"messages[{i}].content", self.opts.max_input_chars)
            msgs.append({**(m.model_extra or {}), "role": m.role, "content": content})
        return await self._answer(req, [self._check_ids(self.backend.chat_ids(msgs), "messages")], chat=True)

    # ---- request -> sequences -----------------------------------------------------------------
    def _prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "`prompt` is empty", "prompt")
        if len(prompt) > self.opts.max_inputs_per_request:
            raise ApiError(413, f"`prompt`: {len(prompt)} prompts in one request, at most "
                                f"{self.opts.max_inputs_per_request}", "prompt")
        out = []
        for i, p in enumerate(prompt):
            where = f"prompt[{i}]" if len(prompt) > 1 else "prompt"
            if isinstance(p, str):
                _check_text(p, where, self.opts.max_input_chars)
                ids = self.backend.encode(p)
            else:
                if len(p) > self.opts.max_input_chars:
                    raise ApiError(413, f"`{where}` has {len(p)} token ids, over the limit of "
                                        f"{self.opts.max_input_chars}", where)
                bad = [t for t in p if not 0 <= t < self.backend.vocab_size]
                if bad:
                    raise ApiError(422, f"`{where}`: token id {bad[0]} is outside the vocabulary "
                                        f"[0, {self.backend.vocab_size})", where)
                ids = list(p)
            out.append(self._check_ids(ids, where))
        return out

    def _check_ids(self, ids: list[int], where: str) -> list[int]:
        if not ids:
            raise ApiError(400, f"`{where}` is empty (no tokens)", where)
        limit = self.backend.max_positions
        if limit and len(ids) >= limit:
            raise ApiError(413, f"`{where}` is {len(ids)} tokens; this model holds {limit} positions, so a prompt "
                                f"may have at most {limit - 1}", where, "context_length_exceeded")
        return ids

    def _seqs(self, req: Any, prompts: list[list[int]], chat: bool, events: asyncio.Queue) -> list[Any]:
        from esm_ray.serve.llm_batcher import Seq

        bad = req.unsupported()
        if bad:
            raise ApiError(400, f"`{bad[0]}` is not supported by esm-ray (leave it out)", bad[0], "unsupported")
        adapter, auto = self.backend.resolve(req.model)
        n = req.n or 1
        if n > self.opts.max_n:
            raise ApiError(400, f"`n` = {n} is over this server's limit of {self.opts.max_n}", "n")
        if n * len(prompts) > self.opts.max_inputs_per_request:
            raise ApiError(413, f"`n` x prompts = {n * len(prompts)} sequences, at most "
                                f"{self.opts.max_inputs_per_request} per request", "n")
        field_ = "max_completion_tokens" if chat and getattr(req, "max_completion_tokens", None) is not None \
            else "max_tokens"
        asked = getattr(req, field_)
        if asked is not None and not 0 <= asked <= self.opts.max_tokens_limit:
            raise ApiError(400, f"`{field_}` = {asked} must be in [0, {self.opts.max_tokens_limit}]", field_)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "`stop`: at most 4 non-empty strings", "stop")
        limit = self.backend.max_positions
        loop = asyncio.get_running_loop()
        seqs = []
        for p, ids in enumerate(prompts):
            room = (limit - len(ids)) if limit else self.opts.max_tokens_limit
            want = asked if asked is not None else (min(self.opts.max_tokens_limit, room) if chat else 16)
            if want > room:
                raise ApiError(400, f"`{field_}` = {want} and the prompt's {len(ids)} tokens exceed the model's "
                                    f"{limit} positions; ask at most {room}", field_, "context_length_exceeded")
            for k in range(n):
                seqs.append(Seq(index=p * n + k, ids=ids, adapter=adapter, auto=auto, max_tokens=want,
                                temperature=1.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p,
                                seed=None if req.seed is None else req.seed + k, stop=stop, events=events, loop=loop))
        return seqs

    async def _answer(self, req: Any, prompts: list[list[int]], chat: bool) -> Any:
        events: asyncio.Queue = asyncio.Queue()
        seqs = self._seqs(req, prompts, chat, events)
        self.batcher.submit(seqs)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": req.model}
        usage_prompt = sum(len(p) for p in prompts) * (req.n or 1)
        if req.stream:
            return StreamingResponse(self._stream(req, seqs, events, head, chat, usage_prompt),
                                     media_type="text/event-stream")
        texts, tasks, reasons, used = await self._collect(seqs, events)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                        "finish_reason": reasons[i]} for i in range(len(seqs))]
        else:
            choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                       for i in range(len(seqs))]
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                             "usage": {"prompt_tokens": usage_prompt, "completion_tokens": used,
                                       "total_tokens": usage_prompt + used},
                             "esm_ray": {"task": tasks[0] if len(set(tasks)) == 1 else None, "tasks": tasks}})

    async def _collect(self, seqs: list[Any], events: asyncio.Queue) -> tuple[list[str], list[Any], list[str], int]:
        texts, tasks, reasons = [""] * len(seqs), [None] * len(seqs), [""] * len(seqs)
        used, left = 0, len(seqs)
        try:
            while left:
                kind, i, *rest = await events.get()
                if kind == "task":
                    tasks[i] = rest[0]
                elif kind == "text":
                    texts[i] += rest[0]
                elif kind == "done":
                    reasons[i], used, left = rest[0], used + rest[1], left - 1
                else:
                    raise ApiError(422, f"the request could not be processed: {rest[0]}", None, "generation_failed")
        except BaseException:
            for s in seqs:
                s.cancelled = True
            raise
        return texts, tasks, reasons, used

    async def _stream(self, req: Any, seqs: list[Any], events: asyncio.Queue, head: dict[str, Any], chat: bool,
                      usage_prompt: int):
        kind_ = "chat.completion.chunk" if chat else "text_completion"
        tasks: list[Any] = [None] * len(seqs)
        used, left = 0, len(seqs)

        def chunk(i: int, text: str | None, reason: str | None, first: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                    {"content": text} if text is not None else {})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            return _sse({**head, "object": kind_, "choices": [choice], "esm_ray": {"task": tasks[i]}})

        try:
            while left:
                kind, i, *rest = await events.get()
                if kind == "task":
                    tasks[i] = rest[0]
                    if chat:
                        yield chunk(i, None, None, first=True)
                elif kind == "text":
                    yield chunk(i, rest[0], None)
                elif kind == "done":
                    used, left = used + rest[1], left - 1
                    yield chunk(i, None, rest[0])
                else:
                    left -= 1
                    yield _sse(error_body(f"choice {i} could not be generated: {rest[0]}", "server_error"))
            if (req.stream_options or {}).get("include_usage"):
                yield _sse({**head, "object": kind_, "choices": [],
                            "usage": {"prompt_tokens": usage_prompt, "completion_tokens": used,
                                      "total_tokens": usage_prompt + used}})
            yield b"data: [DONE]\n\n"
        finally:
            for s in seqs:
                s.cancelled = True  # a client that went away stops its sequences (a finished one is unaffected)


def build_llm(options: LLMOptions | dict[str, Any], spec: Any = None, max_queued_requests: int | None = None,
              constructor_retries: int | None = None):
    """The bound Serve application for a causal-LM directory."""
    from esm_ray.serve.app import deployment_options
    from esm_ray.spec import ServeSpec

    spec = spec or ServeSpec()
    opts = options if isinstance(options, LLMOptions) else LLMOptions.model_validate(options)
    extra = {} if constructor_retries is None else {"max_constructor_retry_count": constructor_retries}
    return LLMServer.options(**deployment_options(spec, max_queued_requests), **extra).bind(opts.model_dump())


def app_builder(args: dict[str, Any]):
    """Import path for `serve run` / KubeRay: esm_ray.serve.llm_app:app_builder. args: the LLMOptions
    fields plus num_replicas, num_cpus, num_gpus, max_ongoing_requests, max_queued_requests."""
    from esm_ray.spec import ServeSpec

    args = dict(args)
    knobs = {k: args.pop(k) for k in ("num_replicas", "num_cpus", "num_gpus", "max_ongoing_requests") if k in args}
    queued = args.pop("max_queued_requests", None)
    return build_llm(LLMOptions.model_validate(args), ServeSpec(**knobs), None if queued is None else int(queued))
