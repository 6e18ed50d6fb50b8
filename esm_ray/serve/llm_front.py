"""esm-ray's router in front of a multi-LoRA engine (Ray Serve LLM with vLLM, or esm-ray's own
LLM app): it picks the adapter, the engine generates.

    POST /v1/completions, /v1/chat/completions   `model: auto` -> the router picks the task on the
                                                 prompt; `model: <task>` -> that task; either is
                                                 sent upstream as `<base_model_id>:<task>`, the id
                                                 Ray Serve LLM gives a LoRA adapter stored at
                                                 `<dynamic_lora_loading_path>/<task>`
    GET  /v1/models                              the base, each task, `auto`

The front holds only the tokenizer and the router (esm_ray.routed.lm.load_routed_lm, or
`router_loader`), reads the body (size limit), rewrites `model` and forwards the request to
`upstream` over HTTP, streaming the answer back unchanged; a JSON answer gets `esm_ray: {"task"}`
added, and every answer an `x-esm-ray-task` header. All prompts of one `auto` request must route
to one task (one LoRA per upstream request), else 400. Configuration for a cluster:
cluster/serve-llm.yaml.
"""

import json
import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ConfigDict, Field
from ray import serve

from esm_ray.serve.guard import read_body
from esm_ray.serve.llm_api import ApiError, RouterOptions, error_body, validation_error

log = logging.getLogger("esm_ray.serve")


class FrontOptions(RouterOptions):
    """Where the router and the engine are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: str = Field(description="the routed LM directory (local or s3://): tokenizer, adapters/, router/")
    upstream: str = Field(description="base URL of the engine's OpenAI app, e.g. http://127.0.0.1:8000/llm")
    base_model_id: str = Field(description="the engine's model id for the merged base (LLMConfig model_id)")
    device: str | None = Field(None, description="where the router runs (default: cuda when the replica has one)")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    timeout_s: float = Field(600.0, gt=0)


front = FastAPI(title="esm-ray router front", version="1",
                description="Chooses the task adapter per request; a multi-LoRA engine generates.")


@front.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@front.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    e = validation_error(list(err.errors()))
    return JSONResponse(e.body(), status_code=e.status)


@front.exception_handler(HTTPException)
async def _http_error(_: Request, err: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(err.detail)), status_code=err.status_code)


@serve.deployment(name="RouterFront")
@serve.ingress(front)
class RouterFront:
    """One replica: tokenizer + router, and an HTTP client to the engine."""

    def __init__(self, options: dict[str, Any]) -> None:
        import httpx
        from transformers import AutoTokenizer

        from esm_ray.routed.load import local_dir
        from esm_ray.serve.llm_backend import adapter_names, adapter_tasks, load_router

        import torch

        self.opts = FrontOptions.model_validate(options)
        device = self.opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        d = local_dir(self.opts.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(d))
        self.router, self.no_router = load_router(d, self.opts.router_loader, device=device,
                                                  **({"dtype": torch.float32} if device == "cpu" else {}),
                                                  **self.opts.router_choice())
        self.device = device
        self.tasks = list(getattr(self.router, "tasks", None) or adapter_tasks(d))
        self.adapter_of = adapter_names(self.router, self.tasks)  # the engine loads adapters/<name>
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.client = httpx.AsyncClient(base_url=self.opts.upstream.rstrip("/"), timeout=self.opts.timeout_s)

    @front.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        ids = [self.opts.base_model_id, *self.tasks] + (["auto"] if self.router is not None else [])
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "esm-ray"} for i in ids]}

    @front.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._forward(request, "/v1/completions")

    @front.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        return await self._forward(request, "/v1/chat/completions")

    def _task(self, body: dict[str, Any], path: str) -> str | None:
        """The task for this request (None: the merged base)."""
        model, base = body["model"], self.opts.base_model_id
        if model == base:
            return None
        if model.startswith(base + ":") and model.split(":", 1)[1] in self.tasks:
            return model.split(":", 1)[1]
        if model.startswith(base + ":") and model.split(":", 1)[1] in self.adapter_of.values():  # the engine's spelling
            return next(t for t, n in self.adapter_of.items() if n == model.split(":", 1)[1])
        if model in self.tasks:
            return model
        if model != "auto":
            raise ApiError(404, f"`model`: the model {model!r} does not exist here (have: "
                                f"{', '.join([base, *self.tasks, 'auto'])})", "model", "model_not_found")
        if self.router is None:
            raise ApiError(400, f"`model`: 'auto' needs a router, and {self.no_router}", "model", "no_router")
        prompts = self._prompt_ids(body, path)
        from esm_ray.serve.llm_backend import route_prompts

        tasks = set(route_prompts(self.router, prompts, self.tasks, pad_id=self.pad_id, device=self.device))
        if len(tasks) > 1:
            raise ApiError(400, f"`prompt`: the prompts of one request route to different tasks "
                                f"({', '.join(sorted(tasks))}); send them as separate requests", "prompt")
        return tasks.pop()

    def _prompt_ids(self, body: dict[str, Any], path: str) -> list[list[int]]:
        try:
            if path.endswith("chat/completions"):
                text = self.tokenizer.apply_chat_template(body["messages"], tokenize=False,
                                                          add_generation_prompt=True)
                return [list(self.tokenizer(text, add_special_tokens=False)["input_ids"])]
            prompt = body["prompt"]
            if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
                prompt = [prompt]
            out = [list(self.tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in prompt]
        except Exception as err:  # noqa: BLE001 - a missing field, a wrong type, a template that refuses
            field_ = "messages" if path.endswith("chat/completions") else "prompt"
            raise ApiError(400, f"`{field_}` cannot be routed: {err}", field_) from None
        if not out or any(not p for p in out):
            raise ApiError(400, "`prompt` is empty", "prompt")
        return out

    async def _forward(self, request: Request, path: str) -> Any:
        raw = await read_body(request, self.opts.max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(422, "the body is not valid JSON", None, "json_invalid") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise ApiError(422, "`model`: a string is required", "model")
        task = self._task(body, path)
        body["model"] = self.opts.base_model_id if task is None else f"{self.opts.base_model_id}:{self.adapter_of[task]}"
        headers = {"x-esm-ray-task": task or ""}
        import httpx

        try:
            data = json.dumps(body).encode()  # ASCII escapes: even a lone surrogate reaches the engine to be refused
            resp = await self.client.send(self.client.build_request(
                "POST", path, content=data, headers={"content-type": "application/json"}), stream=True)
        except httpx.HTTPError as err:
            raise ApiError(502, f"the engine at {self.opts.upstream} did not answer: {type(err).__name__}: {err}",
                           None, "upstream_unavailable", "server_error") from None
        kind = resp.headers.get("content-type", "application/json")
        if body.get("stream") or not kind.startswith("application/json"):
            async def relay():
                try:
                    async for part in resp.aiter_raw():
                        yield part
                finally:
                    await resp.aclose()

            return StreamingResponse(relay(), status_code=resp.status_code, media_type=kind, headers=headers)
        data = json.loads(await resp.aread())
        await resp.aclose()
        if resp.status_code == 200 and isinstance(data, dict):
            data["esm_ray"] = {"task": task, "tasks": [task] * len(data.get("choices") or [])}
        return JSONResponse(data, status_code=resp.status_code, headers=headers)


def app_builder(args: dict[str, Any]):
    """Import path for `serve run` / serveConfigV2: esm_ray.serve.llm_front:app_builder. args: the
    FrontOptions fields plus num_replicas, num_cpus, num_gpus (the router runs a partial prefill of
    the merged model: give a large model a GPU share), max_ongoing_requests."""
    args = dict(args)
    knobs = {"num_replicas": args.pop("num_replicas", 1),
             "ray_actor_options": {"num_cpus": args.pop("num_cpus", 1), "num_gpus": args.pop("num_gpus", 0)},
             "max_ongoing_requests": args.pop("max_ongoing_requests", 64)}
    return RouterFront.options(**knobs).bind(FrontOptions.model_validate(args).model_dump())
