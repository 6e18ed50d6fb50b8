"""`sce`: Select, Calculate, Erase (FuseChat 2.0), as mergekit 0.1.5."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from pydantic import Field
from torch import Tensor

from esm_ray.core.chunks import regroup
from esm_ray.core.sce import sce_fuse, sce_mask, sce_merge, sce_select, sce_selected, sce_variance, sce_weights
from esm_ray.core.sparsify import pack_bits, unpack_bits
from esm_ray.methods._common import dense_list
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, Parts, TensorInfo
from esm_ray.methods.registry import register


class SceParams(MethodParams):
    select_topk: float = Field(1.0, ge=0.0, le=1.0,
                               description="fraction of the entries with nonzero variance across experts kept")
    int8_mask: bool = Field(False, description="accepted for mergekit configs; no effect on the result")


@register
class Sce(MergeMethod[SceParams]):
    """ΔW = Σ c_i e_i τ_i / Σ c_i e_i over the top-variance entries (core.sce). The spec weights
    are not used (mergekit's `sce` takes none).

    Row blocks: passes over the blocks find Select's variance threshold (two, when
    select_topk < 1) and Calculate's weights c_i (one, which keeps Select's mask packed 1 bit
    an entry), then each block is erased and merged."""

    name = "sce"
    summary = "SCE: select high-variance entries, weight by energy, erase sign conflicts"

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        tvs, _ = dense_list(parts, ctxs)
        return sce_merge(tvs, self.params_for(info).select_topk).float()

    def blockwise(self, info: TensorInfo) -> bool:
        return True

    def fuse_state(self, info: TensorInfo, passes: Callable[[], Iterator[tuple[Tensor, Parts]]],
                   ctxs: list[ExpertContext]) -> tuple[Tensor, dict[int, Tensor]]:
        def stacked() -> Iterator[Tensor]:  # (T, rows...) block after block
            for _, parts in passes():
                yield torch.stack(dense_list(parts, ctxs)[0])

        select = sce_select(lambda: (sce_variance(tvs) for tvs in stacked()), self.params_for(info).select_topk)
        masks: dict[int, Tensor] = {}  # block start -> Select's mask, packed 8 entries a byte

        def selected() -> Iterator[list[Tensor]]:
            start = 0
            for tvs in stacked():
                mask = sce_mask(tvs, select, start)
                if mask is not None:
                    masks[start] = pack_bits(mask.bool())
                sel = sce_selected(tvs, mask)
                start += sel[0].numel()
                yield list(sel.reshape(sel.shape[0], -1))

        c = sce_weights((torch.stack(chunk) for chunk in regroup(selected())), info.numel)
        return c, masks

    def fuse_block(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext],
                   state: tuple[Tensor, dict[int, Tensor]], start: int) -> Tensor:
        c, masks = state
        tvs = torch.stack(dense_list(parts, ctxs)[0])
        packed = masks.pop(start, None)
        mask = None if packed is None else unpack_bits(packed, tvs[0].numel()).reshape(tvs.shape[1:]).to(tvs.dtype)
        return sce_fuse(sce_selected(tvs, mask), c).float()
