"""`model_stock`: Model Stock's angle-set interpolation, as mergekit 0.1.5."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from esm_ray.core.model_stock import model_stock
from esm_ray.methods._common import dense_list, exactly
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="one angle per row instead of per tensor")


@register
class ModelStock(MergeMethod[ModelStockParams]):
    """W = t · mean(W_i) + (1 − t) W_0 with t from the mean pairwise cosine of the task vectors."""

    name = "model_stock"
    summary = "Model Stock: interpolate base and expert average by the task vectors' angle"

    def __init__(self, params: ModelStockParams, n_experts: int, seed: int = 0) -> None:
        exactly(n_experts, (2, None), self.name)
        super().__init__(params, n_experts, seed)

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        return expert

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        ws, _ = dense_list(parts, ctxs)
        b = base.float()
        return (model_stock(b, ws, filter_wise=self.params_for(info).filter_wise) - b).float()
