"""`passthrough`: one expert's weights, optionally scaled, as mergekit 0.1.5."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from esm_ray.methods._common import OneExpertMethod, dense_list
from esm_ray.methods.base import ExpertContext, MethodParams, TensorInfo
from esm_ray.methods.registry import register


class PassthroughParams(MethodParams):
    scale: float | None = Field(None, description="factor applied to the weights (none: copied)")


@register
class Passthrough(OneExpertMethod[PassthroughParams]):
    """W = scale · W_1 (W_1 itself without scale): the one expert copied (frankenmerge slices)."""

    name = "passthrough"
    summary = "copy one expert's weights, optionally scaled"
    elementwise = True

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        (w1,), _ = dense_list(parts, ctxs)
        s = self.params_for(info, ctxs[0]).scale
        return ((w1 if s is None else w1 * s) - base.float()).float()
