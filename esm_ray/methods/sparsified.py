"""`breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`: task vectors sparsified by
magnitude rank, then summed or merged by TIES's sign consensus, as mergekit 0.1.5."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

import torch
from pydantic import Field
from torch import Tensor

from esm_ray.core.arithmetic import task_arithmetic
from esm_ray.core.chunks import regroup
from esm_ray.core.sparsify import (DellaRescale, breadcrumbs, della_draw, della_drop, della_generator, l1_scale,
                                   pack_bits, unpack_bits)
from esm_ray.core.ties import sign_consensus_merge
from esm_ray.methods._common import compact, dense_in_order, density_field, expert_density, lambda_field, weights_of
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register

_INT8 = Field(False, description="accepted for mergekit configs; no effect on the result")


class SparsifiedParams(MethodParams):
    """What the fuse of every sparsified method reads."""

    normalize: bool = Field(False, description="divide by the sum of the weights of the contributing experts")
    lambda_: float = lambda_field()


class BreadcrumbsParams(SparsifiedParams):
    density: float = density_field(1.0)
    gamma: float = Field(0.01, ge=0.0, le=1.0, description="fraction of the largest |τ| entries dropped as outliers")
    normalize: bool = Field(False, description="divide by the sum of the weights of the contributing experts")
    rescale: bool = Field(False, description="rescale each sparsified task vector to its original L1 norm")
    lambda_: float = lambda_field()
    int8_mask: bool = _INT8


class DellaParams(SparsifiedParams):
    density: float = density_field(1.0)
    epsilon: float = Field(0.15, ge=0.0, lt=1.0,
                           description="keep probabilities span density ± epsilon by magnitude rank in the row")
    normalize: bool = Field(True, description="divide by the sum of the weights of the contributing experts")
    rescale: bool = Field(True, description="rescale the surviving entries (see rescale_mode)")
    rescale_mode: DellaRescale = Field(
        "l1", description="'l1': match the task vector's L1 norm (mergekit); "
                         "'inverse_probability': divide each survivor by its keep probability (DELLA paper)")
    lambda_: float = lambda_field()
    int8_mask: bool = _INT8


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide by the sum of the expert weights")


SP = TypeVar("SP", bound=SparsifiedParams)
DP = TypeVar("DP", bound=DellaParams)


class _Sparsified(MergeMethod[SP], Generic[SP]):
    """Expert side: sparsify τ_i (a sparse part when smaller). Coordinator: λ Σ w_i τ̃_i (divided
    by Σ w_i with normalize), or with `ties` TIES's sign election and disjoint mean."""

    ties: bool = False

    def sparsify(self, info: TensorInfo, tv: Tensor, ctx: ExpertContext) -> Tensor:
        raise NotImplementedError

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        return compact(self.sparsify(info, expert.float() - base.float(), ctx))

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        tvs, ctxs = dense_in_order(parts, ctxs)
        p = self.params_for(info)
        if self.ties:
            return sign_consensus_merge(tvs, weights_of(ctxs), lam=p.lambda_, normalize=p.normalize,
                                        method="sum").float()
        return task_arithmetic(tvs, weights_of(ctxs), lam=p.lambda_, normalize=p.normalize).float()


class _Breadcrumbs(_Sparsified[BreadcrumbsParams]):
    def sparsify(self, info: TensorInfo, tv: Tensor, ctx: ExpertContext) -> Tensor:
        p = self.params_for(info, ctx)
        return breadcrumbs(tv, expert_density(ctx, p), p.gamma, p.rescale)


@register
class Breadcrumbs(_Breadcrumbs):
    """Model Breadcrumbs: drop the gamma largest and the smallest |τ| entries, then sum."""

    name = "breadcrumbs"
    summary = "Model Breadcrumbs: drop outliers and small entries, then task arithmetic"


@register
class BreadcrumbsTies(_Breadcrumbs):
    """Model Breadcrumbs, then TIES's sign consensus."""

    name = "breadcrumbs_ties"
    summary = "Model Breadcrumbs, then TIES sign consensus"
    ties = True


@dataclass
class DellaBlocks:
    """One expert's DELLA state for the row blocks of a tensor.

    generator: the tensor's random stream, drawn block after block (no L1 rescaling)
    masks:     with L1 rescaling, the keep masks drawn in the first pass, packed 8 a byte, by the
               block's first flat index (popped as the blocks are prepared)
    scale:     the L1 factor of the whole tensor (float64), or None (left unscaled)
    """

    generator: torch.Generator | None = None
    masks: dict[int, Tensor] = field(default_factory=dict)
    scale: Tensor | None = None


class _Della(_Sparsified[DP], Generic[DP]):
    """MAGPRUNE: keep τ entries at random with probabilities density ± epsilon by magnitude rank
    in the row. The random stream of a tensor of an expert is seeded from (job seed, expert
    index, tensor name), so a spec gives the same masks anywhere.

    Row blocks of a matrix (ranks are per row; a 1-D tensor is one row, merged whole): the
    stream is drawn block after block, in order, as on the whole tensor. With L1 rescaling a
    first pass draws the masks (kept packed, 1 bit an entry) and sums the norms of the whole
    tensor; the blocks then apply them. The coordinator's TIES or sum is entry by entry."""

    def sparsify(self, info: TensorInfo, tv: Tensor, ctx: ExpertContext) -> Tensor:
        p = self.params_for(info, ctx)
        return della_drop(tv, expert_density(ctx, p), p.epsilon, della_generator(self.seed, ctx.index, info.name),
                          rescale=p.rescale, rescale_mode=p.rescale_mode)

    def blockwise(self, info: TensorInfo) -> bool:
        return info.ndim > 1

    def block_state(self, info: TensorInfo, blocks: Callable[[], Iterator[tuple[Tensor, Tensor]]],
                    ctx: ExpertContext) -> DellaBlocks | None:
        p = self.params_for(info, ctx)
        density = expert_density(ctx, p)
        if density >= 1:
            return None
        gen = della_generator(self.seed, ctx.index, info.name)
        if not (p.rescale and p.rescale_mode == "l1"):
            return DellaBlocks(generator=gen)
        state = DellaBlocks()

        def drawn() -> Iterator[tuple[Tensor, Tensor]]:
            start = 0
            for b, e in blocks():
                tv = e - b
                keep, _ = della_draw(tv, density, p.epsilon, gen, rescale=False)
                state.masks[start] = pack_bits(keep)
                start += tv.numel()
                yield tv, keep

        state.scale = l1_scale(regroup(drawn()))
        return state

    def prepare_block(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext,
                      state: DellaBlocks | None, start: int) -> Tensor:
        tv = expert - base
        if state is None:
            return tv
        if state.generator is not None:
            p = self.params_for(info, ctx)
            return della_draw(tv, expert_density(ctx, p), p.epsilon, state.generator, rescale=p.rescale,
                              rescale_mode=p.rescale_mode)[1]
        out = tv * unpack_bits(state.masks.pop(start), tv.numel()).reshape(tv.shape)
        return out if state.scale is None else out * state.scale.to(out.dtype)


@register
class Della(_Della[DellaParams]):
    """DELLA: MAGPRUNE, then TIES's sign consensus (normalized by default)."""

    name = "della"
    summary = "DELLA: magnitude-ranked random drop, then TIES sign consensus"
    ties = True


@register
class DellaLinear(_Della[DellaLinearParams]):
    """DELLA's MAGPRUNE, then task arithmetic."""

    name = "della_linear"
    summary = "DELLA magnitude-ranked random drop, then task arithmetic"
