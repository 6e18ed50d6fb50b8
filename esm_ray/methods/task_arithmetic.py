"""`task_arithmetic`: ΔW = λ Σ w_i τ_i, as mergekit's `task_arithmetic`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from esm_ray.core.arithmetic import task_arithmetic
from esm_ray.core.lora import LowRank, concat
from esm_ray.methods._common import all_lora, dense_in_order, in_expert_order, lambda_field, normalize_field, weights_of
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register


class TaskArithmeticParams(MethodParams):
    normalize: bool = normalize_field(False)
    lambda_: float = lambda_field()


@register
class TaskArithmetic(MergeMethod[TaskArithmeticParams]):
    """Sum of weighted task vectors, optionally divided by Σ w_i, scaled by λ. All tensors alike."""

    name = "task_arithmetic"
    summary = "weighted sum of task vectors, scaled by lambda"
    zero_for_zero_tasks = True
    elementwise = True
    factored = True

    def fuse_lowrank(self, info: TensorInfo, base: Tensor, parts: list[Any],
                     ctxs: list[ExpertContext]) -> LowRank | None:
        """LoRA experts: λ Σ w_i s_i B_i A_i as one LoRA of rank Σ r_i (core.lora.concat)."""
        if not all_lora(parts):
            return None
        parts, ctxs = in_expert_order(list(parts), ctxs)
        p = self.params_for(info)
        weights = weights_of(ctxs)
        c = p.lambda_
        if p.normalize and abs(sum(weights)) >= 1e-8:
            c /= sum(weights)
        return concat(parts, [w * c for w in weights])

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        low = self.fuse_lowrank(info, base, parts, ctxs)
        if low is not None:
            return low.dense()
        tvs, ctxs = dense_in_order(parts, ctxs)
        p = self.params_for(info)
        return task_arithmetic(tvs, weights_of(ctxs), lam=p.lambda_,
                               normalize=p.normalize).float()
