"""`model_stock`: Model Stock's angle-set interpolation, as mergekit 0.1.5."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from pydantic import Field
from torch import Tensor

from esm_ray.core.model_stock import StockStats, model_stock, stock_apply, stock_factor
from esm_ray.methods._common import StackedBlocks, dense_list, exactly
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, Parts, TensorInfo
from esm_ray.methods.registry import register


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="one angle per row instead of per tensor")


@register
class ModelStock(MergeMethod[ModelStockParams]):
    """W = t · mean(W_i) + (1 − t) W_0 with t from the mean pairwise cosine of the task vectors.

    Row blocks: per row (filter_wise) each block of a matrix is merged as the whole tensor would
    be (a 1-D tensor, one row, is merged whole); per
    tensor, a first pass over the blocks gathers the task vectors' chunk norms and dots, then t
    applies to every block."""

    name = "model_stock"
    summary = "Model Stock: interpolate base and expert average by the task vectors' angle"
    stored_dtype_blocks = True  # a block's part is the expert's rows as stored (kept between the passes)
    small_fuse_state = True  # t, and the kept blocks

    def __init__(self, params: ModelStockParams, n_experts: int, seed: int = 0) -> None:
        exactly(n_experts, (2, None), self.name)
        super().__init__(params, n_experts, seed)

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        return expert

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        ws, _ = dense_list(parts, ctxs)
        b = base.float()
        return (model_stock(b, ws, filter_wise=self.params_for(info).filter_wise) - b).float()

    def blockwise(self, info: TensorInfo) -> bool:
        return info.ndim > 1 or not self.params_for(info).filter_wise  # a 1-D tensor is one row

    def fuse_state(self, info: TensorInfo, passes: Callable[[], Iterator[tuple[Tensor, Parts]]],
                   ctxs: list[ExpertContext]) -> tuple[Tensor, StackedBlocks] | None:
        if self.params_for(info).filter_wise:
            return None
        blocks = StackedBlocks(passes, ctxs, info.numel, stack=False)  # kept for fuse_block when small
        stats = StockStats(len(ctxs), info.numel)  # float32, whatever the parts' dtype
        for _, b, ws in blocks():
            stats.add(b, ws)
        return stock_factor(stats.result()), blocks

    def fuse_block(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext],
                   state: tuple[Tensor, StackedBlocks] | None, start: int) -> Tensor:
        if state is None:
            return self.fuse(info, base, parts, ctxs)
        t, blocks = state
        kept = blocks.take(start)
        ws = list(kept) if kept is not None else dense_list(parts, ctxs)[0]
        b = base.reshape(-1)
        return stock_apply(t, b, [w.reshape(-1) for w in ws], minus_base=True).reshape(base.shape).float()
