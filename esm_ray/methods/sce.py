"""`sce`: Select, Calculate, Erase (FuseChat 2.0), as mergekit 0.1.5."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from pydantic import Field
from torch import Tensor

from esm_ray.core.chunks import regroup
from esm_ray.core.sce import (SelectTies, sce_fuse, sce_mask, sce_merge, sce_select, sce_selected, sce_variance_flat,
                              sce_weights)
from esm_ray.core.sparsify import pack_bits, unpack_bits
from esm_ray.methods._common import StackedBlocks, dense_list
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, Parts, TensorInfo
from esm_ray.methods.registry import register


class SceParams(MethodParams):
    select_topk: float = Field(1.0, ge=0.0, le=1.0,
                               description="fraction of the entries with nonzero variance across experts kept")
    select_ties: SelectTies = Field(
        "index", description="which of the entries whose variance equals Select's threshold are kept when not all "
                             "can be: index (the lowest flat indices; torch.topk's choice on CUDA) or topk "
                             "(torch.topk's choice on CPU: mergekit's bytes there, slower)")
    int8_mask: bool = Field(False, description="accepted for mergekit configs; no effect on the result")


@register
class Sce(MergeMethod[SceParams]):
    """ΔW = Σ c_i e_i τ_i / Σ c_i e_i over the top-variance entries (core.sce). The spec weights
    are not used (mergekit's `sce` takes none).

    Row blocks: one pass over the blocks computes the variance across experts (when
    select_topk < 1; held whole in float32 while Select finds its threshold), one more
    Calculate's weights c_i, then each block is erased and merged. A tensor whose task vectors
    fit in PASS_CACHE_BYTES is read once and kept between the passes (methods._common.
    StackedBlocks); a larger one is read on each pass, with Select's mask kept packed 1 bit an
    entry."""

    name = "sce"
    summary = "SCE: select high-variance entries, weight by energy, erase sign conflicts"

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        tvs, _ = dense_list(parts, ctxs)
        p = self.params_for(info)
        return sce_merge(tvs, p.select_topk, p.select_ties).float()

    def blockwise(self, info: TensorInfo) -> bool:
        return True

    def fuse_state(self, info: TensorInfo, passes: Callable[[], Iterator[tuple[Tensor, Parts]]],
                   ctxs: list[ExpertContext]) -> tuple[Tensor, dict[int, Tensor], StackedBlocks]:
        blocks = StackedBlocks(passes, ctxs, info.numel)  # kept between the passes when small
        p = self.params_for(info)
        # Select's variance, once: one tensor's worth of float32 until the masks are made
        var = sce_variance_flat((tvs for _, _, tvs in blocks()), info.numel) if 0 < p.select_topk < 1 else None
        select = sce_select(lambda: () if var is None else (var,), p.select_topk, p.select_ties)
        masks: dict[int, Tensor] = {}  # block start -> Select's mask, packed 8 entries a byte

        def selected() -> Iterator[list[Tensor]]:
            for start, _, tvs in blocks():
                n = tvs[0].numel()
                mask = sce_mask(tvs, select, start, None if var is None else var[start:start + n].view(tvs.shape[1:]))
                sel = sce_selected(tvs, mask)
                if blocks.keeps:
                    blocks.put(start, sel)  # fuse_block takes it as it is
                elif mask is not None:
                    masks[start] = pack_bits(mask.bool())
                yield list(sel.reshape(sel.shape[0], -1))

        c = sce_weights((torch.stack(chunk) for chunk in regroup(selected())), info.numel)
        return c, masks, blocks

    def fuse_block(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext],
                   state: tuple[Tensor, dict[int, Tensor], StackedBlocks], start: int) -> Tensor:
        c, masks, blocks = state
        sel = blocks.take(start)
        if sel is None:  # read again, with Select's mask from fuse_state
            tvs = torch.stack(dense_list(parts, ctxs)[0])
            packed = masks.pop(start, None)
            mask = None if packed is None else unpack_bits(packed, tvs[0].numel()).reshape(tvs.shape[1:]).to(tvs.dtype)
            sel = sce_selected(tvs, mask)
        return sce_fuse(sel, c).float()
