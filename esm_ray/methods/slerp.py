"""`slerp`, `nuslerp`, `multislerp`: spherical interpolation of weights, as mergekit 0.1.5."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

import torch
from pydantic import Field
from torch import Tensor

from esm_ray.core.chunks import regroup
import esm_ray.core.slerp as core_slerp
from esm_ray.core.slerp import multislerp, nuslerp, nuslerp_fraction, slerp, slerp_coefficients
from esm_ray.methods._common import dense_list, exactly, pair_blocks, weights_of
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register


WP = TypeVar("WP", bound=MethodParams)


class _Weights(MergeMethod[WP], Generic[WP]):
    """Ships each expert's own weights (not τ), so the interpolation sees mergekit's inputs."""

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        return expert


class SlerpParams(MethodParams):
    t: float = Field(description="interpolation fraction: 0 gives the base, 1 the expert")


@register
class Slerp(_Weights[SlerpParams]):
    """W = slerp(t, W_0, W_1): from the base (t = 0) to the one expert (t = 1) along the great
    circle through the two flattened tensors, per tensor."""

    name = "slerp"
    summary = "spherical interpolation from the base to one expert at fraction t"
    fuse_gives_weights = True  # c0 · W_0 + c1 · W_1 is written as it is
    fuse_block_base = False  # ... made on the expert side: the coordinator needs no base rows

    def __init__(self, params: SlerpParams, n_experts: int, seed: int = 0) -> None:
        exactly(n_experts, 1, self.name)
        super().__init__(params, n_experts, seed)

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        (w1,), _ = dense_list(parts, ctxs)
        return slerp(self.params_for(info).t, base.float(), w1).float()

    # Row blocks: the expert side finds the two coefficients from the whole tensors' chunk norms
    # and dots (two passes, mergekit's 2^20-element chunks; the blocks are kept between them and
    # for the merge when small, methods._common.pair_blocks), then interpolates each block (the
    # same operations as the whole-tensor fuse), so the coordinator passes the slerped rows on
    # to the writer as they are (`fuse_gives_weights`).
    def blockwise(self, info: TensorInfo) -> bool:
        return True

    def block_state(self, info: TensorInfo, blocks: Callable[[], Iterator[tuple[Tensor, Tensor]]],
                    ctx: ExpertContext) -> "SlerpState":
        pairs = pair_blocks(blocks, info.numel)
        c0, c1 = slerp_coefficients(self.params_for(info).t,
                                    lambda: ((c[0], c[1]) for c in regroup(pairs(), core_slerp._SLERP_CHUNK)))
        return SlerpState(c0, c1, pairs.kept() or {})

    def state_block(self, state: "SlerpState", start: int) -> Tensor | None:
        pair = state.kept.pop(start, None)
        return None if pair is None else self._interpolate(state, *pair)

    def prepare_block(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext,
                      state: "SlerpState", start: int) -> Tensor:
        return self._interpolate(state, base, expert)

    @staticmethod
    def _interpolate(state: "SlerpState", base: Tensor, expert: Tensor) -> Tensor:
        """c0 · W_0 + c1 · W of the rows: the slerped rows."""
        return torch.mul(base.reshape(1, -1), state.c0).add_(state.c1 * expert.reshape(1, -1)).reshape(base.shape)

    def fuse_block(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext],
                   state: Any, start: int) -> Tensor:
        (rows,), _ = dense_list(parts, ctxs)  # the slerped rows, from the expert side
        return rows


@dataclass
class SlerpState:
    """slerp's state of one tensor in row blocks: the coefficients, and the (base, expert)
    blocks kept from their passes (by first flat index; each given up once)."""

    c0: Tensor
    c1: Tensor
    kept: dict[int, tuple[Tensor, Tensor]]


class NuSlerpParams(MethodParams):
    flatten: bool = Field(True, alias="nuslerp_flatten", description="one vector per tensor (else per row)")
    row_wise: bool = Field(False, alias="nuslerp_row_wise",
                           description="without flatten: vectors along the first dimension (columns)")
    task_vectors: bool = Field(True, description="interpolate W_i − W_0 and add W_0 (mergekit with a "
                                                 "base_model); false: interpolate W_i themselves")


@register
class NuSlerp(_Weights[NuSlerpParams]):
    """NuSLERP of two experts at t = w_2 / (w_1 + w_2) (their spec weights): of their task
    vectors, added to the base (`task_vectors`, mergekit with a base_model), or of their
    weights (mergekit without one)."""

    name = "nuslerp"
    summary = "spherical interpolation of two experts by their weights, per tensor or per row"

    def __init__(self, params: NuSlerpParams, n_experts: int, seed: int = 0) -> None:
        exactly(n_experts, 2, self.name)
        super().__init__(params, n_experts, seed)

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        (w1, w2), ctxs = dense_list(parts, ctxs)
        p = self.params_for(info)
        t = nuslerp_fraction(*weights_of(ctxs))
        b = base.float()
        if p.task_vectors:
            return nuslerp(t, w1 - b, w2 - b, flatten=p.flatten, row_wise=p.row_wise)
        return nuslerp(t, w1, w2, flatten=p.flatten, row_wise=p.row_wise) - b


class MultiSlerpParams(MethodParams):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, description="added to norms against division by zero")
    task_vectors: bool = Field(True, description="interpolate W_i − W_0 and add W_0 (mergekit with a "
                                                 "base_model); false: interpolate W_i themselves")


@register
class MultiSlerp(_Weights[MultiSlerpParams]):
    """Barycentric SLERP of T experts by their spec weights: of their task vectors, added to
    the base (`task_vectors`, mergekit with a base_model), or of their weights (without one)."""

    name = "multislerp"
    summary = "spherical barycentre of T experts by their weights"

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        ws, ctxs = dense_list(parts, ctxs)
        p = self.params_for(info)
        b = base.float()
        if len(ws) == 1:  # mergekit returns the one expert as it is, base or not
            return ws[0] - b
        if p.task_vectors:
            return multislerp([w - b for w in ws], weights_of(ctxs), p.normalize_weights, p.eps)
        return multislerp(ws, weights_of(ctxs), p.normalize_weights, p.eps) - b
