"""`dare_linear` and `dare_ties`: random drop and rescale (DARE), then a sum or TIES consensus."""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, Literal, TypeVar

import torch

from pydantic import Field
from torch import Tensor

from esm_ray.core.arithmetic import task_arithmetic
from esm_ray.core.dare import dare_drop, dare_generator
from esm_ray.core.ties import sign_consensus_merge
from esm_ray.core.ties import Consensus
from esm_ray.methods._common import (
    compact,
    consensus_field,
    dense_in_order,
    density_field,
    expert_density,
    lambda_field,
    normalize_field,
    weights_of,
)
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register


class DareParams(MethodParams):
    density: float = density_field(1.0)
    normalize: bool = normalize_field(False)
    rescale: bool = Field(True, description="rescale the surviving entries (see rescale_mode)")
    rescale_mode: Literal["inverse_density", "l1"] = Field(
        "inverse_density",
        description="'inverse_density': divide survivors by density (DARE, unbiased); "
                    "'l1': match the task vector's L1 norm (mergekit)")
    lambda_: float = lambda_field()


class DareTiesParams(DareParams):
    consensus: Consensus = consensus_field()


DP = TypeVar("DP", bound=DareParams)


class _Dare(MergeMethod[DP], Generic[DP]):
    """Expert side: drop entries of τ_i at random (keep probability = density), rescale, ship
    sparse when smaller. The random stream is seeded from (job seed, expert index, tensor
    name), so the expert side is reproducible anywhere."""

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        p = self.params_for(info, ctx)
        tv = expert.float() - base.float()
        gen = dare_generator(self.seed, ctx.index, info.name)
        return compact(dare_drop(tv, expert_density(ctx, p), gen, rescale=p.rescale, rescale_mode=p.rescale_mode))

    # Row blocks: the mask is one serial random stream per tensor and expert, drawn one entry
    # at a time, so drawing it block after block (in order) gives the whole tensor's mask. The
    # state is that stream; the executor asks for each expert's blocks once, in order.
    # L1 rescaling sums over the whole tensor, in an order that blocks would change.
    def blockwise(self, info: TensorInfo) -> bool:
        p = self.params_for(info)
        return not (p.rescale and p.rescale_mode == "l1")

    def block_state(self, info: TensorInfo, blocks: Callable[[], Iterator[tuple[Tensor, Tensor]]],
                    ctx: ExpertContext) -> torch.Generator:
        return dare_generator(self.seed, ctx.index, info.name)

    def prepare_block(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext,
                      state: torch.Generator, start: int) -> Tensor:
        p = self.params_for(info, ctx)
        return dare_drop(expert - base, expert_density(ctx, p), state, rescale=p.rescale,
                         rescale_mode=p.rescale_mode)


@register
class DareLinear(_Dare[DareParams]):
    """DARE, then λ Σ w_i τ̃_i (divided by Σ w_i when normalize)."""

    name = "dare_linear"
    summary = "DARE random drop and rescale, then task arithmetic"
    zero_for_zero_tasks = True

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        tvs, ctxs = dense_in_order(parts, ctxs)
        p = self.params_for(info)
        return task_arithmetic(tvs, weights_of(ctxs), lam=p.lambda_,
                               normalize=p.normalize).float()


@register
class DareTies(_Dare[DareTiesParams]):
    """DARE, then TIES sign election and disjoint merge, scaled by λ."""

    name = "dare_ties"
    summary = "DARE random drop and rescale, then TIES sign consensus"
    zero_for_zero_tasks = True

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        tvs, ctxs = dense_in_order(parts, ctxs)
        p = self.params_for(info)
        return sign_consensus_merge(tvs, weights_of(ctxs), lam=p.lambda_, normalize=p.normalize,
                                    method=p.consensus).float()
