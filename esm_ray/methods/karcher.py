"""`karcher`: the Karcher mean of the experts' weights on the sphere, as mergekit 0.1.5."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from esm_ray.core.karcher import karcher_mean
from esm_ray.methods._common import dense_list
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register


class KarcherParams(MethodParams):
    max_iter: int = Field(10, ge=0, description="iterations of the fixed-point update")
    tol: float = Field(1e-5, gt=0.0, description="stop when the tangent step is shorter")
    include_base: bool = Field(False, description="average the base too (mergekit with a base_model)")


@register
class Karcher(MergeMethod[KarcherParams]):
    """W = karcher_mean(W_1..W_T), equal weights; with include_base the base is one more input,
    last (mergekit adds a config's base_model to the inputs of this base-agnostic method)."""

    name = "karcher"
    summary = "Riemannian (Karcher) mean of the expert weights on the sphere"

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        return expert

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        ws, _ = dense_list(parts, ctxs)
        p = self.params_for(info)
        b = base.float()
        xs = ws + [b] if p.include_base else ws
        return (karcher_mean(xs, max_iter=p.max_iter, tol=p.tol) - b).float()
