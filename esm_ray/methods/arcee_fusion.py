"""`arcee_fusion`: keep the expert's most important changes, as mergekit 0.1.5."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from esm_ray.core.arcee_fusion import arcee_fusion
from esm_ray.core.sparsify import della_seed
from esm_ray.methods._common import OneExpertMethod, dense_list
from esm_ray.methods.base import ExpertContext, MethodParams, TensorInfo
from esm_ray.methods.registry import register


class ArceeFusionParams(MethodParams):
    quantile_samples: int = Field(
        0, ge=0, description="0: exact quartiles; n: quartiles of n entries drawn with replacement when "
                             "the tensor has more (mergekit: 1000000)")


@register
class ArceeFusion(OneExpertMethod[ArceeFusionParams]):
    """ΔW = τ · [importance ≥ median + 1.5 IQR], importance = |τ| · KL of the rows' softmaxes."""

    name = "arcee_fusion"
    summary = "keep the entries of one expert whose importance is an upper outlier"

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        (w1,), _ = dense_list(parts, ctxs)
        n = self.params_for(info).quantile_samples
        gen = torch.Generator().manual_seed(della_seed(self.seed, 0, "arcee_fusion/" + info.name)) if n else None
        return arcee_fusion(base.float(), w1, n, gen).float()
