"""`linear`: weighted average of the experts' weights (model soup), as mergekit's `linear`."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from esm_ray.core.arithmetic import linear
from esm_ray.core.lora import LowRank, concat
from esm_ray.errors import SpecError
from esm_ray.methods._common import all_lora, dense_in_order, in_expert_order, weights_of
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register


class LinearParams(MethodParams):
    normalize: bool = Field(True, description="divide by the sum of the expert weights")


@register
class Linear(MergeMethod[LinearParams]):
    """W = Σ w_i W_i / Σ w_i over the experts (the base is not one of the averaged models).

    The expert side ships τ_i = W_i − W_0 and the coordinator returns
    ΔW = Σ w_i τ_i / Σ w_i, which equals the average of the W_i minus W_0. Without normalize,
    ΔW = Σ w_i τ_i + (Σ w_i − 1) W_0, so that W_0 + ΔW = Σ w_i W_i as in mergekit.
    """

    name = "linear"
    summary = "weighted average of the expert weights (model soup)"
    elementwise = True
    factored = True

    def fuse_lowrank(self, info: TensorInfo, base: Tensor, parts: list[Any],
                     ctxs: list[ExpertContext]) -> LowRank | None:
        """LoRA experts: Σ w_i s_i B_i A_i / Σ w_i as one LoRA of rank Σ r_i (core.lora.concat);
        None without normalize unless Σ w_i = 1 (the update then holds (Σ w_i − 1) W_0)."""
        if not all_lora(parts):
            return None
        parts, ctxs = in_expert_order(list(parts), ctxs)
        weights = weights_of(ctxs)
        total = sum(weights)
        if self.params_for(info).normalize:
            _check_total(total)
            return concat(parts, [w / total for w in weights])
        return concat(parts, weights) if total == 1.0 else None

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        low = self.fuse_lowrank(info, base, parts, ctxs)
        if low is not None:
            return low.dense()
        tvs, ctxs = dense_in_order(parts, ctxs)
        weights = weights_of(ctxs)
        normalize = self.params_for(info).normalize
        if normalize:
            _check_total(sum(weights))
        out = linear(weights, tvs, normalize=normalize)
        if not normalize:
            out += (sum(weights) - 1.0) * base.float()
        return out.float()


def _check_total(total: float) -> None:
    if total == 0.0:
        raise SpecError("field `experts[*].weight`: the weights sum to 0, which `linear` with "
                        "normalize=true cannot divide by")
