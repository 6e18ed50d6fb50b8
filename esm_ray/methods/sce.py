"""`sce`: Select, Calculate, Erase (FuseChat 2.0), as mergekit 0.1.5."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from esm_ray.core.sce import sce_merge
from esm_ray.methods._common import dense_list
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register


class SceParams(MethodParams):
    select_topk: float = Field(1.0, ge=0.0, le=1.0,
                               description="fraction of the entries with nonzero variance across experts kept")
    int8_mask: bool = Field(False, description="accepted for mergekit configs; no effect on the result")


@register
class Sce(MergeMethod[SceParams]):
    """ΔW = Σ c_i e_i τ_i / Σ c_i e_i over the top-variance entries (core.sce). The spec weights
    are not used (mergekit's `sce` takes none)."""

    name = "sce"
    summary = "SCE: select high-variance entries, weight by energy, erase sign conflicts"

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        tvs, _ = dense_list(parts, ctxs)
        return sce_merge(tvs, self.params_for(info).select_topk).float()
