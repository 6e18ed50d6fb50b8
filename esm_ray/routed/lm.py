"""A routed causal LM that generates: the merged base, one PEFT LoRA adapter per task and a
router that picks one adapter per sequence from its prompt (layout: esm_ray.routed.lm_format).

Routing is per sequence, decided once on the prompt and held for every generated token, so
one adapter serves a whole request (the KV cache stays consistent, and a request is what
multi-LoRA engines batch):

- "prototype" (esm_pp merged without likelihood gains): one router pass of the merged base
  with every adapter disabled and without the LM head; at each routed linear the token mean of
  its input over the prompt's tokens (padding masked) is scored by cosine against that layer's
  task prototypes; the scores are summed over the routed layers and the top-1 task wins (ties:
  the lower task index). Cost: one extra forward of the base over the prompt (no KV cache kept);
  with `router_depth` N, of its first N decoder blocks only, scoring the routed linears in them.
- "sim": one pass of the pretrained backbone over the prompt; its mean last hidden state is
  scored against the SiM task subspaces (esm_ray.core.routing.sim_route). Cost: one extra
  forward of the backbone over the prompt.
- "likelihood" (esm_pp's default when the merge measured the gains): the prototype pass decides
  whether the prompt belongs to an *eligible* task, one whose adapter models its own task's rows
  better than the base (a positive gain, measured at merge time); if so, of the
  `likelihood_candidates` eligible tasks the prototypes rank highest (every eligible task when
  None), the adapter that gives the prompt the highest mean token log-likelihood (its first
  token included, after the tokenizer's BOS or EOS) wins
  (`core.routing.likelihood_route`). With `likelihood_margin` τ, a prompt whose two best
  eligible prototype scores differ by at least τ per routed layer (τ × the number of routed
  linears in summed cosines) keeps its prototype top-1 without the likelihood pass. Cost: the
  prototype pass plus, for the other such prompts, one prefill of the prompt with each
  candidate adapter (logits included).

Generation runs every sequence with its own adapter in one batch: the adapters stacked per
layer (esm_ray.routed.multi_lora), or peft's mixed-adapter batch (`adapter_names=`) for beam
search and for adapters that cannot be stacked. Prompts are left-padded (attention_mask 0 on the left); position ids of the
router pass come from the mask, as in `generate`, so a prompt routes the same alone or batched.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from esm_ray.core.routing import (cosine_scores, likelihood_pairs, likelihood_route, mean_token_loglik,
                                  prefilled_pairs, sim_route, token_mean)
from esm_ray.errors import InputError
from esm_ray.models.hf import base_model
from esm_ray.routed.format import SIM_BASIS_KEY, SIM_MEAN_KEY, prototype_key
from esm_ray.routed.lm_format import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, GAIN_KEY, lora_keys, read_lm_manifest,
                                      read_router_state)
from esm_ray.routed.multi_lora import MultiLoRA

__all__ = ["RoutedLM", "load_routed_lm"]

log = logging.getLogger("esm_ray.routed")


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack of a *ForCausalLM (its hidden states without the LM head)."""
    inner = base_model(model)
    return model if inner is None else inner


def _positions(mask: Tensor) -> Tensor:
    """Position ids from an attention mask, as `generate` makes them: 0.. over each prompt's own
    tokens, whatever its left padding."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _block(module: str) -> int:
    """The decoder block a routed linear sits in: the first numeric part of its name
    (model.layers.3.mlp.up_proj -> 3; transformer.h.3.mlp.c_fc -> 3)."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    raise InputError(f"routed linear {module!r}: no decoder block index in its name")


class _RouterDone(Exception):
    """Raised by the prototype pass after its deepest block: the blocks above it do not run."""


def _prefixed(input_ids: Tensor, mask: Tensor, token: int) -> tuple[Tensor, Tensor]:
    """Each sequence with `token` just before its first real token (one column longer): the
    first token is then scored too, as lm-eval's rolling log-likelihood scores it after its
    prefix token. Left or right padding alike."""
    ids = torch.cat([input_ids[:, :1], input_ids], 1)  # a padding row keeps its pad id there
    m = torch.nn.functional.pad(mask, (1, 0), value=0)
    before = m.argmax(1) - 1  # the column before the first real token
    rows = torch.arange(ids.shape[0], device=ids.device)
    ids[rows, before] = token
    m[rows, before] = 1
    return ids, m


class RoutedLM:
    """The routed causal LM of a directory (load with `load_routed_lm`).

    tasks:     the task names, in adapter order
    model:     the peft.PeftModel over the merged base with every task's adapter loaded
               (adapter name: `adapter_names[task]`)
    tokenizer: the directory's tokenizer, or None
    router:    the default router ("prototype", "sim" or "likelihood"); `routers` lists those available
    manifest:  router/manifest.json
    gains:     (T,) each task's log-likelihood gain over the base (the likelihood router), or None
    likelihood_candidates: the likelihood router's adapters per prompt (the eligible tasks the
               prototypes rank highest), or None for every eligible task
    likelihood_margin: skip the likelihood pass for a prompt whose two best eligible prototype
               scores are at least this far apart, in mean cosine per scored linear (the summed
               scores differ by at least this × len(scored_modules)), or None: never skip
    router_depth: the prototype pass runs the first `router_depth` decoder blocks only and scores
               the routed linears in them (None: every block); the likelihood router's
               candidates and margin come from these scores too
    stacked:   the adapters stacked per layer (MultiLoRA), or None when they cannot be
    """

    def __init__(self, model: Any, tasks: list[str], adapter_names: dict[str, str], manifest: dict[str, Any],
                 prototypes: dict[str, Tensor], sim: tuple[Tensor, Tensor, bool, bool] | None,
                 backbone: nn.Module | None, tokenizer: Any = None, router: str | None = None,
                 gains: Tensor | None = None, likelihood_candidates: int | None = None,
                 likelihood_margin: float | None = None, router_depth: int | None = None) -> None:
        if likelihood_candidates is not None and likelihood_candidates < 1:
            raise InputError(f"likelihood_candidates must be at least 1 (got {likelihood_candidates})")
        if likelihood_margin is not None and not likelihood_margin >= 0:
            raise InputError(f"likelihood_margin must be at least 0 (got {likelihood_margin})")
        self.model = model.eval()
        self.likelihood_candidates = likelihood_candidates
        if router_depth is not None and router_depth < 1:
            raise InputError(f"router_depth must be at least 1 (got {router_depth})")
        self.likelihood_margin = likelihood_margin
        self.router_depth = router_depth
        self.tasks = list(tasks)
        self.adapter_names = dict(adapter_names)
        self.manifest = manifest
        self.prototypes = prototypes
        self.sim = sim
        self.backbone = backbone.eval() if backbone is not None else None
        self.gains = gains
        self.tokenizer = tokenizer
        self.source_dir: Path | None = None
        self.routers = [r for r in ("prototype", "sim", "likelihood") if self._has(r)]
        pref = manifest.get("router")
        self.router = router or (pref if pref in self.routers else (self.routers[0] if self.routers else ""))
        if self.router not in self.routers:
            raise InputError(f"router {self.router!r} is not available for this model "
                             f"(have: {', '.join(self.routers) or 'none'})")
        self._lock = threading.RLock()  # router hooks and adapter hooks sit on shared modules
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._adapter_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        if not all(hasattr(m, "_disable_adapters") for m in self._adapter_layers):
            raise InputError("this peft version's adapter layers have no `_disable_adapters` flag; "
                             "use peft >= 0.21")
        # the adapters stacked per layer (esm_ray.routed.multi_lora): the likelihood router's
        # mixed batches, and the server's decoding; None where peft's own path must run
        self.stacked, why = MultiLoRA.of(self.model)
        if why is not None:
            log.warning("the adapters cannot be stacked (%s): peft's mixed-adapter batch runs them", why)

    @property
    def lock(self) -> threading.RLock:
        """Held while the router or an adapter choice uses the model's shared modules."""
        return self._lock

    def _has(self, router: str) -> bool:
        if router in ("prototype", "likelihood"):
            protos = bool(self.prototypes) and all(m in self.prototypes for m in self.modules)
            return protos and (router == "prototype" or (self.gains is not None and len(self.gains) == len(self.tasks)))
        return self.sim is not None and self.backbone is not None

    @property
    def modules(self) -> list[str]:
        """The routed linears (the adapters' target modules), in model order."""
        return [layer["module"] for layer in self.manifest.get("layers", [])]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- routing ---------------------------------------------------------------------------
    @torch.no_grad()
    def scores(self, input_ids: Tensor, attention_mask: Tensor | None = None, router: str | None = None) -> Tensor:
        """Per sequence and task the router's score on the prompt, higher = better. (B, T) float.

        prototype: Σ over routed layers of cos(token-mean input, prototype); sim: −residual;
        likelihood: `core.routing.likelihood_route` (mean token log-likelihoods, −inf off the route's candidates)."""
        router = router or self.router
        if router not in self.routers:
            raise ValueError(f"router {router!r} is not available (have: {', '.join(self.routers)})")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with self._lock:
            if router == "sim":
                return self._sim_scores(input_ids, mask)
            if router == "likelihood":
                return self._likelihood_scores(input_ids, mask)
            return self._prototype_scores(input_ids, mask)

    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None, router: str | None = None) -> list[str]:
        """One task per sequence, decided on the prompt only (top-1 of `scores`)."""
        s = self.scores(input_ids, attention_mask, router)
        return [self.tasks[i] for i in s.argmax(-1).tolist()]

    def _prototype_scores(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        inner = self.model.get_base_model()
        total = torch.zeros(input_ids.shape[0], len(self.tasks), dtype=torch.float32, device=input_ids.device)
        handles = []
        scored = self.scored_modules

        def hook(module_name: str):
            def pre(_mod: nn.Module, args: tuple) -> None:
                nonlocal total
                x = args[0]
                m = mask if x.ndim == 3 and mask.shape == x.shape[:2] else None
                proto = self.prototypes[module_name].to(x.device)
                total = total + cosine_scores(token_mean(x.float(), m), proto).to(total.device, torch.float32)
            return pre

        def done(*_: Any) -> None:
            raise _RouterDone

        try:
            for module in scored:
                handles.append(inner.get_submodule(module).register_forward_pre_hook(hook(module)))
            if self.router_depth is not None:  # stop after the deepest block scored
                parts = scored[-1].split(".")
                block = ".".join(parts[:parts.index(str(_block(scored[-1]))) + 1])
                handles.append(inner.get_submodule(block).register_forward_hook(done))
            with self._base_only():
                _decoder(inner)(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask),
                                use_cache=False)
        except _RouterDone:
            pass
        finally:
            for h in handles:
                h.remove()
        return total

    @property
    def scored_modules(self) -> list[str]:
        """The routed linears the prototype pass scores (those of the first router_depth blocks)."""
        if self.router_depth is None:
            return self.modules
        got = [m for m in self.modules if _block(m) < self.router_depth]
        if not got:
            raise InputError(f"router_depth {self.router_depth}: no routed linear in the first "
                             f"{self.router_depth} decoder blocks")
        return got

    def _likelihood_scores(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        assert self.gains is not None
        proto = self._prototype_scores(input_ids, mask)
        eligible = (self.gains > 0).to(proto.device)
        m, gap = self.likelihood_candidates, self.likelihood_margin
        gap = None if gap is None else gap * len(self.scored_modules)  # per routed layer -> summed cosines
        pairs = prefilled_pairs(likelihood_pairs(proto, eligible, m, gap))
        return likelihood_route(proto, self.logliks(input_ids, mask, pairs), eligible, m, gap)

    @torch.no_grad()
    def logliks(self, input_ids: Tensor, mask: Tensor, pairs: Tensor) -> Tensor:
        """Mean token log-likelihood of each sequence under each task's adapter, its first token
        scored after the prefix token (`_prefix_token`), where `pairs` (B, T) bool is set; 0
        elsewhere. The pairs run task by task in batches of at most B sequences (a batch mixes
        adapters only where one task's rows end), so each LoRA layer runs few adapters per batch.
        With the stacked adapters (`stacked`) a batch mixes adapters at the cost of two batched
        matmuls per LoRA layer; otherwise peft's mixed-adapter batch runs them.
        (B, T) float32."""
        ll = torch.zeros(pairs.shape, dtype=torch.float32, device=input_ids.device)
        tasks, rows = pairs.T.nonzero(as_tuple=True)
        if not rows.numel():
            return ll
        ids, m = _prefixed(input_ids, mask, self._prefix_token())
        step = input_ids.shape[0]
        with self._lock:
            for s in range(0, rows.numel(), step):
                r, t = rows[s:s + step], tasks[s:s + step]
                names = [self.adapter_names[self.tasks[i]] for i in t.tolist()]
                live = m[r].any(0).nonzero().flatten()  # drop the columns that pad every row here
                cols = slice(int(live[0]), int(live[-1]) + 1)
                ids_r, m_r = ids[r, cols], m[r, cols]
                inputs = dict(input_ids=ids_r, attention_mask=m_r, position_ids=_positions(m_r), use_cache=False)
                if self.stacked is not None:
                    with self.stacked.rows(names) as model:
                        logits = model(**inputs).logits
                else:
                    logits = self.model(**inputs, adapter_names=names).logits
                ll[r.to(ll.device), t.to(ll.device)] = mean_token_loglik(logits, ids_r, m_r).to(ll.device)
        return ll

    def _prefix_token(self) -> int:
        """The token a prompt's likelihood is conditioned on (as the zoo's scorer conditions a
        passage): the tokenizer's BOS, else its EOS; without a tokenizer the config's."""
        src = self.tokenizer if self.tokenizer is not None else self.model.get_base_model().config
        for name in ("bos_token_id", "eos_token_id"):
            tok = getattr(src, name, None)
            tok = tok[0] if isinstance(tok, list) and tok else tok
            if isinstance(tok, int) and tok >= 0:
                return tok
        return 0

    @contextmanager
    def _base_only(self) -> Iterator[None]:
        """Every adapter layer off (the merged base alone). peft's `disable_adapter` checks the
        model's status and resets requires_grad on every adapter, several times the cost of a
        small model's router pass; this flips the flag its layers read (`disable_adapters`)
        and restores each layer's own value."""
        before = [layer._disable_adapters for layer in self._adapter_layers]
        for layer in self._adapter_layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, b in zip(self._adapter_layers, before):
                layer._disable_adapters = b

    def _sim_scores(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        assert self.sim is not None and self.backbone is not None
        out = _decoder(self.backbone)(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask),
                                      use_cache=False)
        feats = token_mean(out.last_hidden_state, mask).float()
        means, bases, normalize, relative = self.sim
        _, s = sim_route(feats, means.to(feats.device), bases.to(feats.device), normalize, relative)
        return s.float()

    # ---- forward and generation -----------------------------------------------------------
    def _names(self, tasks: Sequence[str], n: int) -> list[str]:
        if len(tasks) != n:
            raise ValueError(f"tasks has {len(tasks)} entries for {n} sequences")
        bad = [t for t in tasks if t not in self.adapter_names]
        if bad:
            raise ValueError(f"unknown task {bad[0]!r} (known: {', '.join(self.tasks)})")
        return [self.adapter_names[t] for t in tasks]

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               tasks: Sequence[str] | None = None) -> Tensor:
        """The LM's logits (B, L, vocab) with each sequence's adapter (routed when tasks is None)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with self._lock:
            tasks = list(tasks) if tasks is not None else self.route(input_ids, mask)
            names = self._names(tasks, input_ids.shape[0])
            return self.model(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask),
                              adapter_names=names, use_cache=False).logits

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 tasks: Sequence[str] | None = None, router: str | None = None, **generate_kwargs: Any) -> Any:
        """`generate` with one adapter per sequence, held for every generated token.

        tasks: one task per sequence (bypasses the router), or None to route each prompt
        (`route`). Prompts must be left-padded. generate_kwargs go to transformers' generate
        (max_new_tokens, do_sample, temperature, top_p, num_return_sequences, ...); its output
        is returned as is. Call `route` first to know the tasks: generate(tasks=...) then adds
        no second router pass."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if bool((mask[:, -1] == 0).any()):
            raise ValueError("prompts must be left-padded for generation (a row's last position is padding)")
        with self._lock:
            tasks = list(tasks) if tasks is not None else self.route(input_ids, mask, router)
            names = self._names(tasks, input_ids.shape[0])
            k = int(generate_kwargs.get("num_return_sequences") or 1)
            beams = int(generate_kwargs.get("num_beams") or 1) > 1
            if k > 1 and not beams:  # peft expands for beams only
                names = [n for n in names for _ in range(k)]
            if self.stacked is not None and not beams:  # the stacked adapters; beams keep peft's path
                with self.stacked.rows(names) as model:
                    return model.generate(input_ids=input_ids, attention_mask=mask, **generate_kwargs)
            return self.model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names,
                                       **generate_kwargs)

    def encode(self, prompts: Sequence[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Left-padded (input_ids, attention_mask) of texts, on the model's device."""
        if self.tokenizer is None:
            raise InputError("this routed model has no tokenizer: pass token ids")
        tok = self.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(list(prompts), return_tensors="pt", padding=True, truncation=max_length is not None,
                  max_length=max_length)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)


def _check_adapter(d: Path, rel: str, modules: list[str]) -> Path:
    """An adapter directory with both files and a LoRA pair for every routed linear; InputError
    naming the file (and the tensor) otherwise. Reads only the tensor names."""
    from safetensors import safe_open

    p = d / rel
    for f in (p / ADAPTER_CONFIG, p / ADAPTER_WEIGHTS):
        if not f.is_file():
            raise InputError(f"{f}: adapter file not found")
    try:
        with safe_open(str(p / ADAPTER_WEIGHTS), "pt") as f:
            keys = set(f.keys())
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise InputError(f"{p / ADAPTER_WEIGHTS}: not a readable safetensors file: {err}") from None
    for m in modules:
        for k in lora_keys(m):
            if k not in keys:
                raise InputError(f"{p / ADAPTER_WEIGHTS}: tensor {k!r} is missing")
    return p


def load_routed_lm(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   router: str | None = None, likelihood_candidates: int | None = None,
                   likelihood_margin: float | None = None, router_depth: int | None = None, s3=None) -> RoutedLM:
    """Load a routed causal-LM directory (local or s3://): the merged base with every adapter
    (peft), the router state, the SiM backbone when stored, the tokenizer when present.
    likelihood_candidates: the likelihood router's adapters per prompt; None takes the
    manifest's (`esm_pp`'s `likelihood_candidates` at merge time; absent: every eligible task).
    likelihood_margin, router_depth: see RoutedLM; None takes the manifest's `likelihood_margin` /
    `router_depth` (absent: off, every block)."""
    from transformers import AutoModelForCausalLM

    from esm_ray.routed.load import local_dir, sim_router

    try:
        from peft import PeftModel
    except ImportError:  # an optional dependency: pip install 'esm-ray[llm]'
        raise InputError("serving a routed causal LM needs peft (pip install 'esm-ray[llm]')") from None
    d = local_dir(str(path), s3)
    man = read_lm_manifest(d)
    if not (d / "config.json").is_file():
        raise InputError(f"{d / 'config.json'}: not found (the merged base is missing)")
    modules = [layer["module"] for layer in man.get("layers", [])]
    paths = {t: _check_adapter(d, man["adapters"][t], modules) for t in man["tasks"]}
    state = read_router_state(d, man)
    protos = {m: state[prototype_key(m)].to(device) for m in modules if prototype_key(m) in state}
    gains = state.get(GAIN_KEY)
    base = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype)
    sim, backbone = sim_router(d, man, state.get(SIM_MEAN_KEY), state.get(SIM_BASIS_KEY), base, dtype, s3)
    names = {t: paths[t].name for t in man["tasks"]}
    model = None
    for t in man["tasks"]:
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, str(paths[t]), adapter_name=names[t])
            else:
                model.load_adapter(str(paths[t]), adapter_name=names[t])
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            raise InputError(f"{paths[t]}: peft could not load the adapter: {err}") from None
    assert model is not None  # the manifest names at least one task
    tokenizer = None
    from esm_ray.models.text import TOKENIZER_FILES

    if any((d / n).is_file() for n in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(d))
    sim_state = (sim.means.to(device), sim.bases.to(device), sim.normalize, sim.relative) if sim is not None else None
    lm = RoutedLM(model.to(device), list(man["tasks"]), names, man, protos, sim_state,
                  backbone.to(device) if backbone is not None else None, tokenizer, router, gains,
                  likelihood_candidates if likelihood_candidates is not None else man.get("likelihood_candidates"),
                  likelihood_margin if likelihood_margin is not None else man.get("likelihood_margin"),
                  router_depth if router_depth is not None else man.get("router_depth"))
    lm.source_dir = d
    return lm
