"""`ties`: trim, elect sign, disjoint merge (TIES-Merging), as mergekit's `ties`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pydantic import Field
from torch import Tensor

from esm_ray.core.ties import TrimThreshold, kept_count, magnitude_trim, rescale_l1, sign_consensus_merge, trim_threshold
from esm_ray.core.ties import Consensus
from esm_ray.methods import _common
from esm_ray.methods._common import (
    compact,
    consensus_field,
    dense_in_order,
    density_field,
    expert_density,
    lambda_field,
    normalize_field,
    task_vector_blocks,
    weights_of,
)
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register


class TiesParams(MethodParams):
    density: float = density_field(1.0)
    normalize: bool = normalize_field(True)
    rescale: bool = Field(False, description="rescale each trimmed task vector to its original L1 norm")
    consensus: Consensus = consensus_field()
    lambda_: float = lambda_field()


@register
class Ties(MergeMethod[TiesParams]):
    """Expert side: keep the top-density fraction of τ_i by magnitude (a sparse part when that
    is smaller). Coordinator: elect the sign of Σ w_i τ_i per entry, average the agreeing
    entries by their weights, scale by λ. Every tensor is treated the same, whatever its shape.
    """

    name = "ties"
    summary = "TIES-Merging: magnitude trim, sign election, disjoint mean"
    zero_for_zero_tasks = True

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        tv = expert.float() - base.float()
        density = expert_density(ctx, self.params_for(info, ctx))
        trimmed = magnitude_trim(tv, density)
        if self.params_for(info, ctx).rescale and trimmed is not tv:
            trimmed = rescale_l1(tv, trimmed)
        return compact(trimmed, max_nonzero=kept_count(tv.numel(), density))

    # Row blocks: the trim threshold of the whole τ_i first (two streamed passes), then each
    # block is trimmed by it; the sign election and the disjoint mean are elementwise.
    # L1 rescaling sums over the whole tensor, in an order that blocks would change.
    def blockwise(self, info: TensorInfo) -> bool:
        return not self.params_for(info).rescale

    def block_state(self, info: TensorInfo, blocks: Callable[[], Iterator[tuple[Tensor, Tensor]]],
                    ctx: ExpertContext) -> "TrimState | None":
        k = kept_count(info.numel, expert_density(ctx, self.params_for(info, ctx)))
        if k >= info.numel:
            return None
        tv = task_vector_blocks(blocks, info.numel)
        threshold = trim_threshold(tv, k)
        # τ kept for the passes is kept on for the blocks when every expert's would fit
        # PASS_CACHE_BYTES together (with the base): the blocks are then not read again
        kept = tv.kept() if (self.n_experts + 1) * info.numel * 4 <= _common.PASS_CACHE_BYTES else None
        return TrimState(threshold, kept or {})

    def state_block(self, state: "TrimState | None", start: int) -> Tensor | None:
        tv = state.kept.pop(start, None) if state is not None else None
        return None if tv is None else state.threshold.apply(tv, start)

    def prepare_block(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext,
                      state: "TrimState | None", start: int) -> Tensor:
        tv = expert - base
        return tv if state is None else state.threshold.apply(tv, start)

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        tvs, ctxs = dense_in_order(parts, ctxs)
        p = self.params_for(info)
        return sign_consensus_merge(tvs, weights_of(ctxs), lam=p.lambda_, normalize=p.normalize,
                                    method=p.consensus).float()


@dataclass
class TrimState:
    """An expert's state for TIES in row blocks: the trim threshold of the whole τ, and the
    blocks of τ kept from its passes (by first flat index; each given up once)."""

    threshold: TrimThreshold
    kept: dict[int, Tensor]
