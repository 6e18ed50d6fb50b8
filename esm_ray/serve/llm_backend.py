"""A causal-LM directory in memory, ready to generate: the one place the router plugs in.

    DIR/config.json, model*.safetensors, tokenizer files    the merged model (HF layout)
    DIR/adapters/<task>/adapter_config.json + .safetensors   one standard PEFT LoRA adapter per task
    DIR/router/manifest.json (+ its state)                   the router (optional)

Model ids a request may name: the merged model (the directory's name, or `served_name`), each
task (its adapter on the merged model; `<merged>:<task>` as Ray Serve LLM spells it works too),
and `auto` when a router is present. `auto` asks the router (esm_ray.routed.lm.load_routed_lm,
or the loader named by `router_loader`) for one task per prompt, decided on the prompt alone
and held for every generated token; the router gets the prompts right-padded with their mask.
Without a router, `auto` is a 400 saying so.
"""

from __future__ import annotations

import importlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from esm_ray.errors import InputError
from esm_ray.models.hf import is_causal_lm
from esm_ray.routed.multi_lora import MultiLoRA
from esm_ray.serve.llm_api import ROUTER_CHOICES, ApiError
from esm_ray.serve.llm_decode import Row, decode

log = logging.getLogger("esm_ray.serve")

ADAPTERS_DIR, ROUTER_MANIFEST = "adapters", "router/manifest.json"
AUTO = "auto"
DEFAULT_ROUTER_LOADER = "esm_ray.routed.lm:load_routed_lm"


def is_causal_lm_dir(path: str | Path) -> bool:
    """A local directory whose config.json names a *ForCausalLM architecture."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return is_causal_lm(json.loads(cfg.read_text()))
    except (json.JSONDecodeError, OSError):
        return False


def adapter_tasks(path: str | Path) -> list[str]:
    """Task names of the PEFT adapters under DIR/adapters/ (sorted)."""
    root = Path(path) / ADAPTERS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())


def _load_router(model_dir: Path, loader: str, **options: Any) -> tuple[Any, str | None]:
    """(router object, None) or (None, why there is none)."""
    if not (model_dir / ROUTER_MANIFEST).is_file():
        return None, f"{model_dir.name} has no router ({ROUTER_MANIFEST} is missing)"
    module, _, attr = loader.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None, f"{model_dir.name} has a router, but this esm-ray cannot load it ({loader} is missing)"
    import inspect

    params = inspect.signature(fn).parameters
    asked = [k for k in ROUTER_CHOICES if k in options and k not in params]
    if asked:
        raise InputError(f"the router loader {loader} takes no {', '.join(asked)}")
    return fn(str(model_dir), **{k: v for k, v in options.items() if k in params}), None


def router_choice(router: str | None, likelihood_candidates: int | None,
                  likelihood_margin: float | None = None, router_depth: int | None = None) -> dict[str, Any]:
    """The loader's keyword arguments for a router other than the directory's default."""
    return {k: v for k, v in zip(ROUTER_CHOICES, (router, likelihood_candidates, likelihood_margin, router_depth))
            if v is not None}


def load_router(model_dir: str | Path, loader: str = DEFAULT_ROUTER_LOADER, **options: Any) -> tuple[Any, str | None]:
    """(RoutedLM, None) when DIR/router/ exists and the loader imports, else (None, why not).
    options (device, dtype) go to the loader when it takes them."""
    return _load_router(Path(model_dir), loader, **options)


def adapter_names(router: Any, tasks: list[str]) -> dict[str, str]:
    """{task: its adapter's name}: the router's `adapter_names` (a task name made safe for a
    directory), else the task itself (adapters/<task>/)."""
    names = dict(getattr(router, "adapter_names", None) or {})
    return {t: str(names.get(t, t)) for t in tasks}


def route_prompts(router: Any, prompts: list[list[int]], tasks: list[str], *, pad_id: int,
                  device: str = "cpu") -> list[str]:
    """router.route() on the prompts right-padded with their attention mask; checks the answer."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        mask[i, :len(p)] = 1
    with torch.inference_mode():
        got = list(router.route(ids.to(device), mask.to(device)))
    bad = [t for t in got if t not in tasks]
    if len(got) != len(prompts) or bad:
        raise RuntimeError(f"the router answered {got!r} for {len(prompts)} prompts (tasks: {tasks})")
    return got


def _peft_inside(routed: Any) -> Any:
    """The PeftModel a RoutedLM holds, if it exposes one."""
    from peft import PeftModel

    for name in ("peft_model", "model"):
        m = getattr(routed, name, None)
        if isinstance(m, PeftModel):
            return m
    return None


class LLMBackend:
    """Tokenizer, the merged model with every task adapter (peft), the router if any."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", served_name: str | None = None,
                 router_loader: str = DEFAULT_ROUTER_LOADER, cache: str | Path | None = None,
                 router: str | None = None, likelihood_candidates: int | None = None,
                 likelihood_margin: float | None = None, router_depth: int | None = None,
                 stacked: bool = True) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from esm_ray.routed.load import local_dir

        d = local_dir(str(model_dir), cache=cache)  # an s3:// prefix is downloaded once into the cache
        if not is_causal_lm_dir(d):
            raise InputError(f"{d}: not a causal LM directory (config.json must name a *ForCausalLM architecture)")
        self.dir, self.device = d, device
        self.name = served_name or str(model_dir).rstrip("/").rsplit("/", 1)[-1]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(d))
        except (OSError, ValueError) as err:
            raise InputError(f"{d}: no usable tokenizer ({err})") from None
        dtype = torch.float32 if device == "cpu" else None  # None: the checkpoint's own dtype
        self.router, self.no_router = _load_router(d, router_loader, device=device,
                                                   **({"dtype": dtype} if dtype is not None else {}),
                                                   **router_choice(router, likelihood_candidates,
                                                                   likelihood_margin, router_depth))
        model = _peft_inside(self.router) if self.router is not None else None
        shared = model is not None  # the router's own model (and its stacked adapters, if it has them)
        self.tasks = list(getattr(self.router, "tasks", None) or adapter_tasks(d))
        self.adapter_of = adapter_names(self.router, self.tasks)  # task -> the peft adapter's name
        if AUTO in self.tasks or self.name in self.tasks:
            raise InputError(f"{d}: a task may not be called {AUTO!r} or {self.name!r} (model ids would clash)")
        if model is None:
            # float32 on CPU; on a GPU the checkpoint's own dtype (a 7B model in float32 would not fit)
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32 if device == "cpu" else "auto")
            if self.tasks and adapter_tasks(d):
                model = self._with_adapters(model)
        self.model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' typed .to wrapper
        self.mixed = bool(self.tasks)
        have = set(getattr(self.model, "peft_config", {}) or {})
        missing = sorted(t for t in self.tasks if self.adapter_of[t] not in have)
        if self.mixed and missing:
            raise InputError(f"{d}: no adapter for task(s) {', '.join(missing)} (the router names them; "
                             f"{ADAPTERS_DIR}/ has {', '.join(adapter_tasks(d)) or 'none'})")
        self.stacked: MultiLoRA | None = None  # the adapters stacked per layer: the fast decoding path
        if self.mixed and stacked:
            if shared and hasattr(self.router, "stacked"):
                self.stacked = self.router.stacked  # stacked once, by the router (which says why if it cannot)
            else:
                self.stacked, why = MultiLoRA.of(self.model)
                if why is not None:
                    log.warning("%s: decoding with peft's mixed-adapter batch (the adapters cannot be stacked: %s)",
                                d.name, why)
        cfg = self.model.config if not self.mixed else self.model.get_base_model().config
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        self.vocab_size = int(cfg.vocab_size)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)

    def _with_adapters(self, model: Any) -> Any:
        from peft import PeftModel

        root = self.dir / ADAPTERS_DIR
        try:
            first, *rest = adapter_tasks(self.dir)
            peft_model = PeftModel.from_pretrained(model, str(root / first), adapter_name=first)
            for t in rest:
                peft_model.load_adapter(str(root / t), adapter_name=t)
        except Exception as err:  # noqa: BLE001 - peft raises many types for a bad adapter
            raise InputError(f"{root}: an adapter does not load on the merged model: {type(err).__name__}: "
                             f"{err}") from None
        return peft_model

    # ---- what a request may ask for ---------------------------------------------------------
    def model_ids(self) -> list[dict[str, str]]:
        """GET /v1/models rows: the merged model, each task, `auto` when a router exists."""
        rows = [{"id": self.name, "kind": "merged"}] + [{"id": t, "kind": "adapter"} for t in self.tasks]
        return rows + ([{"id": AUTO, "kind": "router"}] if self.router is not None else [])

    def resolve(self, model: str) -> tuple[str | None, bool]:
        """(adapter or None for the merged model, whether the router decides)."""
        if model == AUTO:
            if self.router is None:
                raise ApiError(400, f"`model`: {AUTO!r} needs a router, and {self.no_router}; "
                                    f"name a model instead (one of {', '.join(self._names())})", "model",
                               "no_router")
            return None, True
        base, sep, task = model.partition(":")
        if sep and base == self.name:
            model = task
        if model == self.name:
            return None, False
        if model in self.tasks:
            return model, False
        raise ApiError(404, f"`model`: the model {model!r} does not exist here (have: {', '.join(self._names())})",
                       "model", "model_not_found")

    def _names(self) -> list[str]:
        return [r["id"] for r in self.model_ids()]

    # ---- text <-> tokens --------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The tokenizer's chat template applied, with the assistant's turn opened."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"`messages`: the model {self.name!r} has no chat template in its tokenizer; "
                                "use /v1/completions", "messages", "no_chat_template")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template may raise anything on unusual messages
            raise ApiError(400, f"`messages`: the chat template refused them: {err}", "messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    # ---- routing and generation -------------------------------------------------------------
    def route(self, prompts: list[list[int]]) -> list[str]:
        """One task per prompt from the router."""
        return route_prompts(self.router, prompts, self.tasks, pad_id=self.pad_id, device=self.device)

    def generate(self, rows: list[Row]) -> None:
        """Decode the rows (their `adapter` is a task name, or None for the merged model): with the
        stacked adapters when they could be built (esm_ray.routed.multi_lora), else with peft's
        mixed-adapter batch."""
        for r in rows:
            r.adapter = self.adapter_of[r.adapter] if r.adapter is not None else None
        if self.stacked is None:
            decode(self.model, rows, pad_id=self.pad_id, eos_ids=self.eos_ids, mixed=self.mixed, device=self.device)
            return
        with getattr(self.router, "lock", None) or nullcontext(), self.stacked.rows([r.adapter for r in rows]) as model:
            decode(model, rows, pad_id=self.pad_id, eos_ids=self.eos_ids, mixed=False, device=self.device)


__all__ = ["AUTO", "DEFAULT_ROUTER_LOADER", "LLMBackend", "adapter_tasks", "is_causal_lm_dir", "load_router",
           "router_choice",
           "route_prompts"]
