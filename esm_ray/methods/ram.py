"""`ram`, `ramplus_tl`: Reinforced Agent Merging, as mergekit 0.1.5."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from esm_ray.core.ram import ram_merge
from esm_ray.methods._common import dense_list
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register

_EPS = Field(1e-5, ge=0.0, description="|τ| above which an expert counts as having changed an entry")


class RamParams(MethodParams):
    epsilon: float = _EPS


@register
class Ram(MergeMethod[RamParams]):
    """Entries changed by one expert are kept, entries changed by several are averaged."""

    name = "ram"
    summary = "RAM: keep unique changes, average shared ones"

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        tvs, _ = dense_list(parts, ctxs)
        return ram_merge(tvs, self.params_for(info).epsilon).float()


class RamPlusTLParams(MethodParams):
    r: float = Field(0.1, description="boost per unit of overlap ratio")
    alpha: float = Field(0.2, description="cap on the overlap ratio")
    epsilon: float = _EPS


@register
class RamPlusTL(MergeMethod[RamPlusTLParams]):
    """RAM with each expert's unique changes boosted by its overlap ratio, per tensor."""

    name = "ramplus_tl"
    summary = "RAM+ (tensor-local): RAM with overlap-scaled unique changes"

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        tvs, _ = dense_list(parts, ctxs)
        p = self.params_for(info)
        return ram_merge(tvs, p.epsilon, r=p.r, alpha=p.alpha).float()
