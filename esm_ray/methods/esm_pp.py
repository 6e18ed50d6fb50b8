"""`esm_pp`: ESM++, a static merge plus per-sample routed low-rank residual experts.

The static base is any registered static method (ESM by default), run unchanged: this method
hands prepare / fuse / layer_scales to an inner instance of it. Then, for each routed linear,
once its merged weight W_m is final (the post stage), every expert computes its residual expert
from δW_t = W_t − W_m and its calibration Gram (`core.routing.residual_expert`) and its
prototype p_t = s1 / n; the coordinator stacks them. Before the merge loop (the support stage)
each expert sends its task head. The output is the merged base in HF layout plus routed/* and
heads/* (see `esm_ray.routed.load`); for a causal LM (the base's config names a *ForCausalLM)
one PEFT LoRA adapter per task under adapters/ and the router under router/ instead
(`esm_ray.routed.lm_format`, served by `esm_ray.routed.lm`).

With `residual_of: base` (the default when every expert is a LoRA adapter) the routed linears
keep the base's weight W_0 instead, and a task's routed expert there is W_t − W_0: an adapter's
own factors (s·B, A), taken as they are (`post_prepare_lora`), or a full expert's rank-r ESD.
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import re
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import torch
from pydantic import Field
from safetensors.torch import save as st_save
from torch import Tensor

from esm_ray.routed.format import (
    BACKBONE_FILE,
    DEFAULT_ROUTED_LAYERS,
    EXPERTS_FILE,
    MANIFEST_FILE,
    ROUTER_FILE,
    head_file,
    pack_routed,
    routed_manifest,
)
from esm_ray.routed.lm_format import LM_BACKBONE_FILE, pack_lm
from esm_ray.core.dtypes import DTYPES
from esm_ray.core.lora import LoraFactors
from esm_ray.core.routing import residual_expert
from esm_ray.errors import SpecError
from esm_ray.methods._common import in_expert_order
from esm_ray.methods.base import (BaseWeights, ExpertContext, MergeMethod, MethodParams, Needs, SupportInputs,
                                  TensorInfo)
from esm_ray.methods.registry import METHODS, build_method, register

log = logging.getLogger(__name__)

_DTYPES = DTYPES
ROUTED_METHODS = ("esm_pp", "sim")


class RoutedParams(MethodParams):
    base_method: str = Field("esm", description="static method that makes the merged base")
    base_params: dict[str, Any] = Field(default_factory=dict, description="parameters of base_method")
    rank: int = Field(32, ge=1, description="rank r of each residual expert")
    layers: str | None = Field(None, description="regex (searched in module names) of the routed linears; "
                                                 "default: every attention and MLP linear per block")
    expert_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="storage dtype of the experts' factors")
    likelihood_samples: int = Field(
        16, ge=0, description="causal LMs: rows of each expert's data on which its log-likelihood gain over "
                              "the base is measured, for the likelihood router, then ESM++'s default router on a causal "
                              "LM (0: no likelihood router; the prototypes route)")
    likelihood_candidates: int | None = Field(
        2, ge=1, description="causal LMs: the likelihood router's adapters per prompt, the eligible tasks the "
                             "prototypes rank highest (null: every eligible task); stored in the router "
                             "manifest, `load_routed_lm` and `esm-ray serve` may override it")
    likelihood_margin: float | None = Field(
        0.05, ge=0, description="causal LMs: the likelihood router keeps the prototypes' choice, without its "
                                "pass, for a prompt whose two best eligible prototype scores differ by at "
                                "least this in mean cosine per routed layer (null: always run the pass); "
                                "stored in the router manifest, `load_routed_lm` and `esm-ray serve` may "
                                "override it")
    router_depth: int | None = Field(
        None, ge=1, description="causal LMs: the router pass (prototype and likelihood routers) runs the first N "
                                "decoder blocks only and scores the routed linears in them (null: every block); "
                                "stored in the router manifest, `load_routed_lm` and `esm-ray serve` may override it")
    prototypes: Literal["auto", "expert", "base"] = Field(
        "auto", description="where each task's router prototypes (mean input per routed layer over its "
                            "calibration rows) come from: `expert`, its own fine-tuned model (ESM++ as "
                            "published); `base`, the pretrained base, the model the router pass runs when "
                            "`residual_of` is base (one more base pass over each expert's rows); `auto`: "
                            "`base` when `residual_of` settles on base, else `expert`")
    residual_of: Literal["auto", "merged", "base"] = Field(
        "auto", description="what each task's routed expert corrects: `merged`, the static merge (the "
                            "routed linears carry the merge, each expert the rank-r residual W_t − W_m); "
                            "`base`, the pretrained base (the routed linears keep W_0; a LoRA adapter "
                            "expert is routed as itself, exactly, a full expert as the rank-r W_t − W_0); "
                            "`auto`: `base` when every expert is a LoRA adapter, else `merged`")


@dataclass(frozen=True)
class ExpertPart:
    """One expert's residual expert and prototype at one routed layer (its post-stage part)."""

    B: Tensor          # (d_out, r)
    A: Tensor          # (r, d_in)
    prototype: Tensor  # (d_in,) float32
    kept: int          # nonzero factors (≤ r)


def _widen(b: Tensor, a: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Factors B (d_out, r_b) and A (r_b, d_in) with zero factors appended up to rank r:
    the same update, at the one rank the routed experts are stacked and written at (an adapter
    routed as itself keeps its own rank, a full expert gets `rank`)."""
    pad = torch.nn.functional.pad
    return pad(b, (0, r - b.shape[-1])), pad(a, (0, 0, 0, r - a.shape[-2]))


def _inner(params: RoutedParams, n_experts: int, seed: int) -> MergeMethod:
    name = params.base_method
    if name in ROUTED_METHODS:
        raise SpecError(f"field `method.params.base_method`: {name!r} is routed; the base must be a static method")
    if name not in METHODS:  # methods register when their module is imported
        import esm_ray.methods as pkg

        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_") and mod.name not in ("base", "registry"):
                importlib.import_module(f"esm_ray.methods.{mod.name}")
    try:
        inner = build_method(name, dict(params.base_params), n_experts=n_experts, seed=seed)
    except SpecError as err:
        raise SpecError(f"in `method.params.base_method` / `base_params`: {err}") from None
    if inner.output_kind != "static":
        raise SpecError(f"field `method.params.base_method`: {name!r} is not a static method")
    if inner.search_stage:
        raise SpecError(f"field `method.params.base_method`: {name!r} learns its merge in a search stage, "
                        "which a routed method does not run; merge with it first, or pick a closed-form method")
    return inner


RP = TypeVar("RP", bound=RoutedParams)


@register
class ESMPlusPlus(MergeMethod[RP], Generic[RP]):
    """Static merge + per-layer prototype-routed residual experts (ESM++)."""

    name = "esm_pp"
    summary = "ESM++: static merge (ESM by default) + low-rank residual experts routed per sample by prototypes"
    output_kind = "routed"
    needs_stats = True
    post_stage = True
    needs_support_features = True
    router_kind = "prototype"
    post_decomposes = True  # the residual experts' truncated SVDs

    Params = RoutedParams

    def needs(self) -> Needs:
        return super().needs() | self.inner.needs()

    def __init__(self, params: RP, n_experts: int, seed: int = 0) -> None:
        super().__init__(params, n_experts, seed)
        p = params
        self.inner = _inner(p, n_experts, seed)
        self.needs_layer_scales = self.inner.needs_layer_scales
        self.accepts_purifier = self.inner.accepts_purifier
        self.decomposes = self.inner.decomposes
        self.factored = self.inner.factored  # adapters' targets reach the static merge as factors
        self._on_base = p.residual_of == "base"  # `auto` is settled by bind_experts
        try:
            self._pattern = re.compile(p.layers or DEFAULT_ROUTED_LAYERS)
        except re.error as err:
            raise SpecError(f"field `method.params.layers`: not a regular expression: {err}") from None
        self._experts: dict[str, list[tuple[Tensor, Tensor]]] = {}  # module -> each task's (B, A)
        self._protos: dict[str, Tensor] = {}
        self._kept: dict[str, list[int]] = {}
        self._tasks: list[str] = []
        self._support: list[SupportInputs] = []
        self._causal = False  # bind_model: a causal LM's experts are written as PEFT adapters

    def bind_model(self, config: dict[str, Any] | None, causal_lm: bool = False) -> None:
        self._causal = causal_lm

    def bind_experts(self, adapters: list[bool]) -> None:
        if self.params.residual_of == "auto":
            self._on_base = bool(adapters) and all(adapters)

    def _residual_of(self) -> str:
        """`residual_of` as settled for this job: 'base' or 'merged'."""
        return "base" if self._on_base else "merged"

    def _prototypes(self) -> str:
        """`prototypes` as settled for this job: 'base' or 'expert'."""
        p = self.params.prototypes
        return p if p != "auto" else ("base" if self._on_base else "expert")

    def support_base_means(self) -> bool:
        return self._prototypes() == "base"

    def _keeps_base(self, info: TensorInfo) -> bool:
        """Whether this tensor is a routed linear that keeps the base's weight (residual_of base)."""
        return self._on_base and self.post_applies(info)

    # ---- the static base: delegated (the routed linears keep W_0 when residual_of is base) ----
    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        return None if self._keeps_base(info) else self.inner.prepare(info, base, expert, ctx)

    def prepare_lora(self, info: TensorInfo, lora: LoraFactors, ctx: ExpertContext) -> Any:
        return None if self._keeps_base(info) else self.inner.prepare_lora(info, lora, ctx)

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        if self._keeps_base(info):
            return torch.zeros_like(base)
        return self.inner.update_of(info, base, parts, ctxs)

    def layer_scales(self, infos: dict[str, TensorInfo], norms: dict[str, float]) -> dict[str, float]:
        kept = {n: i for n, i in infos.items() if not self._keeps_base(i)}
        return self.inner.layer_scales(kept, {n: v for n, v in norms.items() if n in kept})

    def memory_note(self, shapes: dict[str, tuple[int, ...]]) -> str | None:
        note = self.inner.memory_note(shapes)
        rank = ("each LoRA adapter's own rank (residual_of base), full experts' rank "
                f"{self.params.rank}") if self._on_base else f"rank {self.params.rank}"
        mine = f"routed experts: T x {rank} factors per routed linear held by the coordinator until the end"
        return f"{note}; {mine}" if note else mine

    # ---- support stage: heads (and SiM features in the subclass) -----------------------------
    def support_part(self, ctx: ExpertContext, inputs: SupportInputs) -> SupportInputs:
        return inputs

    def support_gain_samples(self) -> int:
        return self.params.likelihood_samples

    def support_fuse(self, parts: list[Any], ctxs: list[ExpertContext]) -> None:
        parts, ctxs = in_expert_order(parts, ctxs)
        self._support = list(parts)
        self._tasks = [c.name for c in ctxs]

    def _gains(self) -> Tensor | None:
        """Each task's log-likelihood gain over the base (T,), when every expert measured one."""
        gains = [s.gain for s in self._support]
        if not gains or any(g is None for g in gains):
            return None
        return torch.tensor(gains, dtype=torch.float32)

    # ---- post stage: residual experts --------------------------------------------------------
    def post_applies(self, info: TensorInfo) -> bool:
        return (info.module is not None and info.ndim == 2 and info.name == f"{info.module}.weight"
                and self._pattern.search(info.module) is not None)

    def _stats(self, info: TensorInfo, ctx: ExpertContext) -> Any:
        """This expert's statistics of the routed layer (its prototype needs them)."""
        if ctx.stats is None:
            raise RuntimeError(f"{self.name}: no calibration statistics for layer {info.module!r} of {ctx.name!r}")
        return ctx.stats

    def post_prepare(self, info: TensorInfo, merged: Tensor, expert: Tensor, ctx: ExpertContext) -> ExpertPart:
        st = self._stats(info, ctx)
        e = residual_expert(expert, merged, st.gram, st.n, self.params.rank)
        kept = int((e.A.abs().sum(1) > 0).sum())
        dt = _DTYPES[self.params.expert_dtype]
        return ExpertPart(e.B.to(dt).contiguous(), e.A.to(dt).contiguous(), st.mean().to(torch.float32), kept)

    def post_prepare_lora(self, info: TensorInfo, merged: Tensor, lora: LoraFactors,
                          ctx: ExpertContext) -> ExpertPart | None:
        """residual_of base: an adapter's target is routed as the adapter itself, B = s·B_t and
        A = A_t at the adapter's own rank (W_0 + s B_t A_t is the expert's weight, exactly, up
        to `expert_dtype`). Otherwise None: the residual against the merge is computed densely."""
        if not self._on_base:
            return None
        st = self._stats(info, ctx)
        if (lora.b.shape[0], lora.a.shape[1]) != tuple(merged.shape):  # e.g. a Conv1D target (d_in, d_out)
            return None
        dt = _DTYPES[self.params.expert_dtype]
        b = (lora.b.to(torch.float32) * lora.scale).to(dt).contiguous()
        return ExpertPart(b, lora.a.to(dt).contiguous(), st.mean().to(torch.float32), int(lora.a.shape[0]))

    def post_fuse(self, info: TensorInfo, merged: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> None:
        parts, ctxs = in_expert_order(parts, ctxs)
        if not self._tasks:
            self._tasks = [c.name for c in ctxs]
        module = info.module
        assert module is not None
        self._experts[module] = [(p.B, p.A) for p in parts]
        if self._prototypes() == "base":
            means = [s.base_means for s in self._support]
            bad = [t for t, m in zip(self._tasks, means) if m is None or module not in m]
            if bad:
                raise RuntimeError(f"{self.name}: no base mean input of layer {module!r} from expert {bad[0]!r}")
            self._protos[module] = torch.stack([m[module] for m in means if m is not None])
        else:
            self._protos[module] = torch.stack([p.prototype for p in parts])
        self._kept[module] = [p.kept for p in parts]

    # ---- output --------------------------------------------------------------------------------
    def routers(self) -> list[str]:
        return ["prototype"]

    def _stacked(self) -> tuple[dict[str, tuple[Tensor, Tensor]], int]:
        """The routed experts stacked per layer, {module: (B (T, d_out, R), A (T, R, d_in))}, at
        one rank R for every task and layer (zero factors appended to narrower ones: adapters of
        other ranks, full experts at `rank`), and R."""
        r = max(int(b.shape[1]) for parts in self._experts.values() for b, _ in parts)
        stacked = {}
        for m, parts in self._experts.items():
            wide = [_widen(b, a, r) for b, a in parts]
            stacked[m] = (torch.stack([b for b, _ in wide]), torch.stack([a for _, a in wide]))
        return stacked, r

    def sim_state(self) -> tuple[Tensor | None, Tensor | None, dict[str, Any] | None, dict[str, BaseWeights]]:
        """(means, bases, manifest entry, extra files) of the SiM router; none for ESM++."""
        return None, None, None, {}

    def artifacts(self) -> dict[str, bytes | BaseWeights]:
        if not self._experts:
            raise RuntimeError(f"{self.name}: no linear layer matched the routed-layer pattern "
                               f"{self.params.layers or DEFAULT_ROUTED_LAYERS!r}")
        p = self.params
        means, bases, sim_meta, extra = self.sim_state()
        experts, rank = self._stacked()
        if self._causal:
            return self._lm_artifacts(experts, rank, means, bases, sim_meta, extra)
        packed = pack_routed(experts, self._protos, means, bases, _DTYPES[p.expert_dtype])
        files: dict[str, bytes | BaseWeights] = {rel: st_save(tensors) for rel, tensors in packed.items()}
        files.update(extra)
        heads: dict[str, dict[str, Any]] = {}
        used: set[str] = set()
        for task, part in zip(self._tasks, self._support):
            if part.head is None:
                continue
            rel = head_file(task)
            if rel in used:  # two task names that map to one file name
                rel = rel.replace(".safetensors", f"-{len(used)}.safetensors")
            used.add(rel)
            files[rel] = part.head
            heads[task] = {"file": rel, "labels": part.labels}
        size = {rel: len(v) if isinstance(v, bytes) else 0 for rel, v in files.items()}
        layers = {m: (int(b.shape[1]), int(a.shape[2])) for m, (b, a) in experts.items()}
        sizes = {"experts_bytes": size[EXPERTS_FILE], "router_bytes": size[ROUTER_FILE],
                 "backbone_bytes": self._support[0].base_bytes if extra else 0,
                 "heads_bytes": sum(size[h["file"]] for h in heads.values())}
        man = routed_manifest(method=self.name, tasks=self._tasks, router=self.router_kind, rank=rank,
                              expert_dtype=p.expert_dtype, layers=layers, routers=self.routers(), sim=sim_meta,
                              heads=heads, base_method=p.base_method,
                              base_params=dict(p.base_params), residual_of=self._residual_of(),
                              prototypes=self._prototypes(), kept_ranks=self._kept, sizes=sizes)
        files[MANIFEST_FILE] = json.dumps(man, indent=2).encode()
        return files

    def _lm_artifacts(self, experts: dict[str, tuple[Tensor, Tensor]], rank: int, means: Tensor | None,
                      bases: Tensor | None, sim_meta: dict[str, Any] | None,
                      extra: dict[str, BaseWeights]) -> dict[str, bytes | BaseWeights]:
        """A causal LM's routed files (esm_ray.routed.lm_format): one PEFT LoRA adapter per task
        and the router state under router/; the SiM backbone as router/backbone.safetensors."""
        p = self.params
        if sim_meta is not None and sim_meta.get("backbone") == BACKBONE_FILE:
            sim_meta = {**sim_meta, "backbone": LM_BACKBONE_FILE}
            extra = {LM_BACKBONE_FILE if k == BACKBONE_FILE else k: v for k, v in extra.items()}
        layers = {m: (int(b.shape[1]), int(a.shape[2])) for m, (b, a) in experts.items()}
        gains = self._gains()
        routers = self.routers() + (["likelihood"] if gains is not None else [])
        # ESM++ on a causal LM routes `auto` by likelihood when the gains are there: on the LoRA LM
        # zoo it routes 98.5% of the domains' rows against the prototypes' 94.6% (docs/routed.md)
        default = "likelihood" if gains is not None and self.router_kind == "prototype" else self.router_kind
        man = routed_manifest(method=self.name, tasks=self._tasks, router=default, rank=rank,
                              expert_dtype=p.expert_dtype, layers=layers, routers=routers, sim=sim_meta,
                              heads={}, base_method=p.base_method, base_params=dict(p.base_params),
                              residual_of=self._residual_of(), prototypes=self._prototypes(),
                              kept_ranks=self._kept, likelihood_gains=None if gains is None else dict(zip(self._tasks, gains.tolist())),
                              likelihood_candidates=p.likelihood_candidates, likelihood_margin=p.likelihood_margin,
                              router_depth=p.router_depth)
        packed = pack_lm(self._tasks, experts, self._protos, means, bases, _DTYPES[p.expert_dtype], man, gains)
        files: dict[str, bytes | BaseWeights] = {rel: v if isinstance(v, bytes) else st_save(v)
                                                 for rel, v in packed.items()}
        files.update(extra)
        return files

    def report(self) -> dict[str, Any]:
        kept = [k for ks in self._kept.values() for k in ks]
        return {"base_method": self.inner.name, "base_report": self.inner.report(),
                "routed_layers": len(self._experts), "rank": self.params.rank,
                "residual_of": self._residual_of(),
                "mean_kept_rank": round(sum(kept) / len(kept), 3) if kept else 0, "routers": self.routers()}
