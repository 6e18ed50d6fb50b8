"""`nearswap`: the expert's values where they are near the base's, as mergekit 0.1.5."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from esm_ray.core.nearswap import nearswap
from esm_ray.methods._common import OneExpertMethod, dense_list
from esm_ray.methods.base import ExpertContext, MethodParams, TensorInfo
from esm_ray.methods.registry import register


class NearSwapParams(MethodParams):
    t: float = Field(description="distance below which the expert's entry is taken whole")


@register
class NearSwap(OneExpertMethod[NearSwapParams]):
    """W = s W_1 + (1 − s) W_0, s = clamp(t / |W_0 − W_1|, 0, 1) per entry (one expert)."""

    name = "nearswap"
    summary = "take the expert's entries that lie within t of the base's"
    elementwise = True

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        (w1,), _ = dense_list(parts, ctxs)
        b = base.float()
        return (nearswap(b, w1, self.params_for(info).t) - b).float()
