"""ESM: essential subspace merging (ESD factors of every calibrated linear layer, fused with
per-factor polar orthogonalisation; TSV-M for other matrices; mean for the rest).

Expert side (`prepare`): a linear layer's weight with calibration statistics becomes its ESD
factors (E_k, E_kᵀ ΔW, λ) and ||ΔW||_F, never the dense ΔW; any other 2-D tensor becomes its
top TSV triplets; anything else stays the task vector. Coordinator (`fuse`): ESM, TSV-M or the
mean; `layer_scales` rescales each linear-layer type across depth. α multiplies the keys of
`alpha_scope` and is reported, with those keys, by `report()`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from esm_ray.core.esd import (ESD, auto_route, esd_from_gram, esd_from_task_rows, gram_factor, oas_shrinkage,
                              shrink_gram)
from esm_ray.core.esm import PRESETS, ESMRecipe, esm_factors, esm_fuse, esm_fuse_rows, inter_layer_scales, mean_fuse
from esm_ray.core.layerstats import LayerStats
from esm_ray.core.lora import LoraFactors, LowRank, esd_from_factors, lora_svd
from esm_ray.core.rowblocks import TaskRows, in_row_blocks
from esm_ray.core.tsvm import (drop_null_triplets, task_triplets, task_triplets_rows, tsv_rank, tsvm_factors,
                               tsvm_fuse, tsvm_fuse_rows)
from esm_ray.errors import InputError
from esm_ray.methods._common import ADAPTER_SCALE_NOTE, RESCALE_HINT
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register

# The final factor `auto` gives the RoBERTa recipe: its published ×1 leaves the flat merged
# spectrum about half as large as TSV-M's and costs 2.8-4.1 points on the 8-task zoo, beyond the
# interval; ×2 ties TSV-M there (docs/ablations.md).
AUTO_TEXT_MULTIPLIER = 2.0

# Tensors of a vision tower: `auto` merges them with the ViT recipe, everything else with RoBERTa's.
_VISION = re.compile(r"(^|\.)(visual|vision_model|vision_tower|vit|image_encoder)\.|patch_embed")


def preset_for_config(config: dict[str, Any]) -> str:
    """The recipe for a whole model from its HF config: 'vit' for vision encoders, else 'roberta'."""
    mt = str(config.get("model_type", "")).lower()
    vision = ("vit", "clip", "clip_vision_model", "siglip", "siglip_vision_model", "deit", "beit", "dinov2",
              "swin", "convnext")
    return "vit" if mt in vision or mt.endswith("_vision_model") else "roberta"


class ESMParams(MethodParams):
    preset: Literal["auto", "vit", "roberta"] = Field(
        "auto", description="recipe: 'vit' (all scalings, ×2), 'roberta' (eigen-scaling + Procrustes, ×1, "
                            "as published); 'auto' = vit for vision-tower tensors, otherwise roberta's "
                            "scalings with ×2 (docs/ablations.md: ×1 under-scales the flat spectrum)")
    k: int | None = Field(None, ge=1, description="ESD rank per task; None = max(1, floor(d_out / T))")
    energy: float | None = Field(None, gt=0, le=1, description="also cap k at this fraction of ESD energy")
    alpha: float = Field(1.0, ge=0, description="fixed, label-free scale of the α keys")
    alpha_scope: Literal["auto", "esd", "all"] = Field(
        "auto", description="keys α scales: 'esd' (ViT paper), 'all' (RoBERTa paper); auto = the preset's")
    eigen_exponent: float = Field(0.15, ge=0, description="eigen-scale exponent γ")
    inter_layer_power: float = Field(2.0, ge=0, description="across-depth scaling power p (0 = off)")
    inter_task_power: float | None = Field(None, ge=0, description="override the preset's (ViT 2, RoBERTa 0)")
    inter_column_power: float | None = Field(None, ge=0, description="override the preset's (ViT 2, RoBERTa 0)")
    multiplier: float | None = Field(None, gt=0, description="override the preset's final factor (ViT 2, RoBERTa 1)")
    magnitude: Literal["preset", "energy"] = Field(
        "preset", description="scale of the flat merged spectrum: 'preset' = multiplier · mean singular "
                              "values of the stacked factors (the papers'); 'energy' = the energy of the "
                              "tasks' essential parts, ||ΔW||_F = sqrt(Σ_t ||E_t C_t||²) (label-free)")
    shrinkage: Annotated[float, Field(ge=0, le=1)] | Literal["oas"] = Field(
        0.0, description="pull each layer's Gram toward isotropic inputs before ESD: β in [0, 1] "
                         "(0 = the raw Gram, 1 = TSV-like), or 'oas' for the closed-form "
                         "oracle-approximating intensity from the Gram and its row count")
    fuse_dtype: Literal["float64", "float32"] = Field(
        "float64", description="precision of the coordinator's polar factors (float32: about 2x faster)")
    fuse_route: Literal["gram", "svd"] = Field(
        "gram", description="polar factors from an eigh of each factor's smaller Gram (fast) or from "
                            "its thin SVD (the exact reference)")


@dataclass(frozen=True)
class ESDPart:
    """One expert's part for an ESD key: its essential factors and ||ΔW||_F (float32)."""

    esd: ESD
    norm: float
    transposed: bool = False


@dataclass(frozen=True)
class TSVPart:
    """One expert's top-k singular triplets of a 2-D tensor without statistics."""

    u: Tensor
    s: Tensor
    vh: Tensor


def _tsv_part(u: Tensor, s: Tensor, vh: Tensor) -> TSVPart:
    """Triplets without the numerically null ones (as TSV-M keeps them: their singular vectors
    are arbitrary and would enter the polar factors of the other experts' triplets; a LoRA
    adapter's untouched embedding, merged with a full expert's, is a zero task vector), shipped
    as float32."""
    return TSVPart(u.float().contiguous(), s.float(), vh.float().contiguous())


def _tsv_kept(parts: list[Any]) -> list[TSVPart]:
    """The TSV parts that hold a triplet (a zero task vector holds none)."""
    return [x for x in parts if x.s.numel() > 0]


def _task_vector(expert: Tensor, base: Tensor) -> Tensor:
    """expert − base in float64 (exact), without a float64 copy of the base beside it."""
    delta = expert.to(torch.float64, copy=True)
    delta -= base
    return delta


def oriented(info: TensorInfo, stats: LayerStats) -> bool:
    """Whether the weight is stored (d_in, d_out) (GPT-2 Conv1D); checks the widths agree."""
    if getattr(stats, "transposed", False):
        if info.shape[0] != stats.d_in:
            raise InputError(f"{info.name}: shape {info.shape} does not match statistics of width {stats.d_in}")
        return True
    if info.shape[1] == stats.d_in:
        return False
    if info.shape[0] == stats.d_in:
        return True
    raise InputError(f"{info.name}: shape {info.shape} does not match statistics of width {stats.d_in}")


@register
class ESM(MergeMethod[ESMParams]):
    name = "esm"
    summary = "Essential subspace merging: ESD of each task's output shift, polar-orthogonalised fusion"
    zero_for_zero_tasks = True
    needs_stats = True
    needs_layer_scales = True
    decomposes = True
    factored = True

    def __init__(self, params: ESMParams, n_experts: int, seed: int = 0) -> None:
        super().__init__(params, n_experts, seed)
        self._alpha_keys: set[str] = set()
        self._branch: dict[str, str] = {}
        self._ranks: dict[str, list[int]] = {}
        self._presets: dict[str, int] = {}
        self._scopes: set[str] = set()
        self._shrink: dict[str, float] = {}
        self._last_factor: tuple[Tensor, Tensor] | None = None  # (Gram, its factor), expert side

    # recipe ----------------------------------------------------------------------------------
    def _default_scale(self) -> bool:
        """`alpha` 1 and the default `k`: each rank-r adapter is kept whole (see adapters_note)."""
        return self.params.alpha == 1.0 and self.params.k is None

    def adapters_note(self) -> str | None:
        if not self._default_scale():
            return None
        return (f"`alpha` 1 (the default): {ADAPTER_SCALE_NOTE} (ESM's default recipe doubles it); consider "
                f"{RESCALE_HINT}, a smaller alpha, or task arithmetic or TSV-M with lambda chosen on validation")

    def rescales_adapters(self) -> bool:
        """At `alpha` 1 and the default `k`, ESM rescales adapters' merges by default: their
        whole update fits in the directions it keeps, and the recipe's scale adds every adapter
        at twice its strength (LoRA LM zoo, README: -830 without, 46 with the rescale)."""
        return self._default_scale()

    def preset_of(self, info: TensorInfo) -> str:
        p = self.params
        if p.preset != "auto":
            return p.preset
        return "vit" if _VISION.search(info.name) else "roberta"

    def recipe(self, info: TensorInfo) -> ESMRecipe:
        p = self.params
        base = PRESETS[self.preset_of(info)]
        # `auto` on non-vision tensors: the RoBERTa scalings with the ViT recipe's ×2 (AUTO_TEXT_MULTIPLIER)
        mult = AUTO_TEXT_MULTIPLIER if p.preset == "auto" and base.name == "roberta" else base.multiplier
        return ESMRecipe(
            base.name, eigen_exponent=p.eigen_exponent,
            inter_task_power=base.inter_task_power if p.inter_task_power is None else p.inter_task_power,
            inter_column_power=base.inter_column_power if p.inter_column_power is None else p.inter_column_power,
            multiplier=mult if p.multiplier is None else p.multiplier,
            inter_layer_power=p.inter_layer_power,
            magnitude="energy" if p.magnitude == "energy" else "mean_singular")

    def alpha_scope_of(self, info: TensorInfo) -> str:
        p = self.params
        if p.alpha_scope != "auto":
            return p.alpha_scope
        return "esd" if self.preset_of(info) == "vit" else "all"

    # expert side -----------------------------------------------------------------------------
    def _input(self, info: TensorInfo, stats: LayerStats, d_out: int) -> LayerStats:
        """The layer's statistics after `shrinkage` (a shrunk Gram is full rank, so its row
        count is at least d_out: the span of the n rows no longer caps ESD's rank)."""
        p = self.params
        beta = oas_shrinkage(stats.gram, stats.n) if p.shrinkage == "oas" else float(p.shrinkage)
        self._shrink[info.name] = beta
        if beta == 0.0:
            return stats
        return LayerStats(max(stats.n, d_out), stats.s1, shrink_gram(stats.gram, beta))

    def _factor(self, stats: LayerStats) -> Tensor:
        """A factor L of the Gram (L Lᵀ = G): the rows' Xᵀ where they are held, else
        gram_factor; kept for the next tensor that reads the same input (q, k and v; gate and
        up): the statistics store hands them the same object."""
        last = self._last_factor  # read once: another thread may replace it meanwhile
        if last is None or last[0] is not stats:
            f = stats.factor()
            last = (stats, f if f is not None else gram_factor(stats.gram, stats.n))
            self._last_factor = last
        return last[1]

    @staticmethod
    def _held_gram(stats: LayerStats) -> Tensor | None:
        """The Gram when it is held; None when only the rows are (ESD then goes by Xᵀ)."""
        return None if stats.rows is not None else stats.gram

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        """The part of one tensor. A matrix whose float64 task vector is over
        core.rowblocks.ROWS_MIN_BYTES (a vocabulary matrix, a 7B's MLP) is decomposed from row
        blocks of the task vector where the route allows (the TSV triplets of a tall matrix; the
        ESD by the factor route), so the worker never holds it whole in float64."""
        p = self.params
        rows = in_row_blocks(expert)
        if expert.ndim == 2 and ctx.stats is not None and ctx.stats.n > 0:
            t = oriented(info, ctx.stats)
            d_out, d_in = (expert.shape[1], expert.shape[0]) if t else (expert.shape[0], expert.shape[1])
            st = self._input(info, ctx.stats, d_out)
            n, gram = st.n, self._held_gram(st)
            route = auto_route(d_out, d_in, n, rows=gram is None)
            factor = self._factor(st) if route == "factor" else None
            if rows and route == "factor" and not t:
                tv = TaskRows.of(expert, base)
                esd = esd_from_task_rows(tv, gram, n, k=p.k, n_tasks=self.n_experts, energy=p.energy,
                                         factor=factor)
                return ESDPart(esd.to(torch.float32), math.sqrt(tv.sq_norm()), t)
            delta = _task_vector(expert, base)
            esd = esd_from_gram(delta.T if t else delta, gram, n, k=p.k, n_tasks=self.n_experts,
                                energy=p.energy, route=route, factor=factor)
            return ESDPart(esd.to(torch.float32), float(delta.norm()), t)
        if expert.ndim == 2:
            k = tsv_rank((expert.shape[0], expert.shape[1]), self.n_experts)
            if rows:
                return _tsv_part(*task_triplets_rows(TaskRows.of(expert, base), k))
            return _tsv_part(*task_triplets(_task_vector(expert, base), k))
        return _task_vector(expert, base).float()

    def prepare_lora(self, info: TensorInfo, lora: LoraFactors, ctx: ExpertContext) -> Any:
        """A LoRA expert's part from its factors: the ESD through the (r, r) core
        (core.lora.esd_from_factors) where statistics exist, else the top TSV triplets from
        the factors' QRs; ||ΔW||_F from the factors' Grams. The same parts as `prepare` on the
        densified tensor, never forming ΔW."""
        p = self.params
        if ctx.stats is not None and ctx.stats.n > 0:
            t = oriented(info, ctx.stats)
            f = LoraFactors(lora.a.T, lora.b.T, lora.scale) if t else lora
            st = self._input(info, ctx.stats, f.shape[0])
            gram = self._held_gram(st)  # None where the rows are held: A G Aᵀ from them, G never formed
            esd = esd_from_factors(f, gram, st.n, k=p.k, n_tasks=self.n_experts, energy=p.energy,
                                   rows=st.rows if gram is None else None)
            return ESDPart(esd.to(torch.float32), lora.lowrank().norm(), t)
        return _tsv_part(*drop_null_triplets(*lora_svd(lora, tsv_rank(lora.shape, self.n_experts)),
                                             resolution=torch.float32))

    # coordinator -----------------------------------------------------------------------------
    def fuse_lowrank(self, info: TensorInfo, base: Tensor, parts: list[Any],
                     ctxs: list[ExpertContext]) -> LowRank | None:
        """The update of an ESD or TSV key kept factored (before `layer_scales`); α applied as in
        `fuse`. None for the mean branch."""
        p = self.params
        parts = list(parts)
        scope = self.alpha_scope_of(info)
        if parts and all(isinstance(x, ESDPart) for x in parts):
            recipe = self.recipe(info)
            c, pu, pv = esm_factors([x.esd for x in parts], recipe, [x.norm for x in parts],
                                    getattr(torch, p.fuse_dtype), p.fuse_route)
            b, a = (pu * c).double(), pv.double()
            if parts[0].transposed:
                b, a = a.T, b.T
            self._ranks[info.name] = [x.esd.rank for x in parts]
            self._presets[recipe.name] = self._presets.get(recipe.name, 0) + 1
            self._record(info, "esd", scope)
            return LowRank(b * p.alpha, a)
        if parts and all(isinstance(x, TSVPart) for x in parts):
            kept = _tsv_kept(parts)
            if kept:
                b, a = tsvm_factors([x.u for x in kept], [x.s for x in kept], [x.vh for x in kept], torch.float64)
            else:
                b = torch.zeros(base.shape[0], 0, dtype=torch.float64)
                a = torch.zeros(0, base.shape[1], dtype=torch.float64)
            self._record(info, "tsv", scope)
            return LowRank(b * (p.alpha if scope == "all" else 1.0), a)
        return None

    def _record(self, info: TensorInfo, branch: str, scope: str) -> None:
        """What `report()` says of a tensor merged by `fuse_lowrank` (as `fuse` records it)."""
        self._branch[info.name] = branch
        self._scopes.add(scope)
        if scope == "all" or branch == "esd":
            self._alpha_keys.add(info.name)

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        p = self.params
        kinds = {type(x) for x in parts}
        if len(kinds) != 1:
            raise InputError(f"{info.name}: experts disagree on how to merge it ({sorted(k.__name__ for k in kinds)}); "
                             f"calibration statistics must exist for all experts or for none")
        first = parts[0]
        scope = self.alpha_scope_of(info)
        branch = "esd" if isinstance(first, ESDPart) else "tsv" if isinstance(first, TSVPart) else "mean"
        alpha = p.alpha if scope == "all" or branch == "esd" else 1.0
        # a large tall matrix (an LM head, a vocabulary matrix) is fused by row blocks, never
        # whole in float64 (the route-'gram' polar factors in float64, as by default)
        rows = (branch != "mean" and in_row_blocks(base) and not getattr(first, "transposed", False)
                and p.fuse_route == "gram" and p.fuse_dtype == "float64")
        if branch == "esd":
            recipe = self.recipe(info)
            if rows:
                dw = esm_fuse_rows([x.esd for x in parts], recipe, [x.norm for x in parts], alpha)
            else:
                dw = esm_fuse([x.esd for x in parts], recipe, [x.norm for x in parts], getattr(torch, p.fuse_dtype),
                              p.fuse_route)
            if first.transposed:
                dw = dw.T
            self._ranks[info.name] = [x.esd.rank for x in parts]
            self._presets[recipe.name] = self._presets.get(recipe.name, 0) + 1
        elif branch == "tsv":
            kept = _tsv_kept(parts)
            if not kept:
                dw = torch.zeros(base.shape, dtype=torch.float64)
            elif rows:
                dw = tsvm_fuse_rows([x.u for x in kept], [x.s for x in kept], [x.vh for x in kept], alpha)
            else:
                dw = tsvm_fuse([x.u for x in kept], [x.s for x in kept], [x.vh for x in kept], torch.float64)
        else:
            dw = mean_fuse(parts)
        self._branch[info.name] = branch
        self._scopes.add(scope)
        if scope == "all" or branch == "esd":
            self._alpha_keys.add(info.name)
            if not rows:
                dw *= alpha  # in place: the same values as dw * α, without a second float64 matrix
        return dw.reshape(base.shape).to(torch.float32)

    def layer_scales(self, infos: dict[str, TensorInfo], norms: dict[str, float]) -> dict[str, float]:
        """Across-depth factors for the 2-D weights of linear layers inside repeated blocks."""
        p = self.params
        if not p.inter_layer_power:
            return {}
        groups = {n: i.layer_type for n, i in infos.items()
                  if i.ndim == 2 and i.module is not None and i.layer_index is not None}
        return inter_layer_scales(norms, groups, p.inter_layer_power)

    @property
    def alpha_keys(self) -> list[str]:
        """Names of the tensors α multiplied so far (complete once every tensor is fused)."""
        return sorted(self._alpha_keys)

    def report(self) -> dict[str, Any]:
        """What the merge report records: α, the keys it scaled, and how each key was merged."""
        p = self.params
        count = {b: sum(1 for v in self._branch.values() if v == b) for b in ("esd", "tsv", "mean")}
        return {"method": self.name, "alpha": p.alpha, "alpha_scope": p.alpha_scope,
                "alpha_scope_resolved": sorted(self._scopes),
                "alpha_keys": self.alpha_keys, "presets": dict(self._presets),
                "branches": count, "esd_keys": sorted(n for n, b in self._branch.items() if b == "esd"),
                "esd_ranks": dict(sorted(self._ranks.items())),
                "shrinkage": dict(sorted(self._shrink.items()))}
