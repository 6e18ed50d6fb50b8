"""What a merge writes, in which order, and how each tensor is produced: decided once.

The merge works through *groups* of consecutive tensors of one block (one call to the expert
sides per group, one resume checkpoint per group). Every output tensor gets one strategy:

- ``copy``:     not floating (e.g. integer buffers): the base's value, unchanged;
- ``whole``:    the experts' parts of the whole tensor, fused at once;
- ``blocks``:   row blocks of about `block_bytes`, fused one after another (a blockwise method,
                without purifier, layer scaling or post stage; with resume, the finished
                blocks are staged as they are written);
- ``restored``: a group a killed run of the same job finished (runtime/resume.py); a tensor
                that would be merged in blocks keeps them, and is read back block by block
                when it was staged that way.

The writer's layout is this list, and the merge loop walks the same list, so nothing has to
predict the loop's order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch

from esm_ray.io.composite import is_pre
from esm_ray.methods import TensorInfo
from esm_ray.methods.schedule import position
from esm_ray.runtime.plan import MergePlan

How = Literal["copy", "whole", "blocks", "restored"]


@dataclass(frozen=True)
class OutTensor:
    """One output tensor: what it is, its output dtype, its group and how it is made."""

    info: TensorInfo
    dtype: torch.dtype
    group: int
    position: int  # index in the model's (the base's) tensor order
    how: How
    blocks: tuple[tuple[int, int], ...] = ()  # [start, stop) rows, for 'blocks' (and 'restored')

    @property
    def entry(self) -> tuple[str, torch.dtype, tuple[int, ...]]:
        """(name, dtype, shape): the writer's layout entry."""
        return self.info.name, self.dtype, self.info.shape


@dataclass(frozen=True)
class Group:
    """A group of output tensors in write order (floating ones first)."""

    index: int
    tensors: tuple[OutTensor, ...]
    restored: bool

    @property
    def merged(self) -> list[OutTensor]:
        """The tensors the method merges (not copied)."""
        return [o for o in self.tensors if o.how != "copy"]


def linear_module(name: str, modules: set[str]) -> str | None:
    """The calibrated linear module that owns weight `name`, or None."""
    if name.endswith(".weight") and name[: -len(".weight")] in modules:
        return name[: -len(".weight")]
    return None


def tensor_infos(plan: MergePlan, modules: set[str]) -> list[TensorInfo]:
    """Every tensor of the model in the base's order, tagged with its calibrated module and
    placed for per-tensor parameters (its slice, its position in it)."""
    infos = [TensorInfo.of(n, plan.shapes[n], linear_module(n, modules)) for n in plan.names]
    return placed(infos, [sl.length for sl in plan.spec.slices] if plan.spec.slices else None)


def placed(infos: list[TensorInfo], runs: list[int] | None) -> list[TensorInfo]:
    """`infos` with `slice` and `position` set (methods.schedule): layer k of a run of n layers
    (one per `slices` entry, or the whole model) at k / (n - 1); tensors outside the blocks at 0,
    in the first run (embeddings) or the last (the rest), as mergekit places them."""
    if runs is None:
        idx = [i.layer_index for i in infos if i.layer_index is not None]
        runs = [max(idx) + 1] if idx else [1]
    starts = [sum(runs[:k]) for k in range(len(runs))]
    out = []
    for info in infos:
        if info.layer_index is None:
            out.append(replace(info, slice=0 if is_pre(info.name) else len(runs) - 1, position=0.0))
            continue
        s = max(k for k, st in enumerate(starts) if st <= info.layer_index) if info.layer_index >= 0 else 0
        out.append(replace(info, slice=s, position=position(info.layer_index, starts[s], runs[s])))
    return out


def layer_groups(infos: list[TensorInfo], max_bytes: int) -> Iterator[list[TensorInfo]]:
    """Consecutive tensors of the same block, up to max_bytes (float32) per group."""
    group: list[TensorInfo] = []
    size = 0
    for info in infos:
        nbytes = info.numel * 4
        if group and (info.layer_index != group[-1].layer_index or size + nbytes > max_bytes):
            yield group
            group, size = [], 0
        group.append(info)
        size += nbytes
    if group:
        yield group


def plan_groups(plan: MergePlan, groups: list[list[TensorInfo]], restored: list[bool], *,
                blockwise: bool, block_bytes: int, block_parts: int = 1) -> list[Group]:
    """Each group's output tensors with their strategy. `blockwise`: the pool may merge in row
    blocks; `block_parts`: how many experts' parts of one block it holds at once (the block
    rows shrink so that those parts together stay about `block_bytes`)."""
    out = []
    position = {n: i for i, n in enumerate(plan.names)}
    for gi, infos in enumerate(groups):
        tensors = []
        def copied(info: TensorInfo) -> bool:
            return not plan.dtypes[info.name].is_floating_point or plan.copies_base(info.name)

        for info in sorted(infos, key=copied):  # the merged tensors first, then the copies
            pos = position[info.name]
            if not plan.dtypes[info.name].is_floating_point:
                tensors.append(OutTensor(info, plan.dtypes[info.name], gi, pos, "copy"))
                continue
            if plan.copies_base(info.name):  # no expert changes it: the base's value, in the output dtype
                tensors.append(OutTensor(info, plan.out_dtype, gi, pos, "copy"))
                continue
            blocks = plan.in_blocks(info, block_bytes, block_parts) if blockwise else None
            how: How = "restored" if restored[gi] else ("blocks" if blocks else "whole")
            tensors.append(OutTensor(info, plan.out_dtype, gi, pos, how, tuple(blocks or ())))
        out.append(Group(gi, tuple(tensors), restored[gi]))
    return out


def write_order(groups: list[Group], spilled: bool) -> list[OutTensor]:
    """The order the writer receives the tensors: group by group (floating tensors first); with a
    layer-scaling pass, which writes after every group is fused, the model's order."""
    tensors = [o for g in groups for o in g.tensors]
    return sorted(tensors, key=lambda o: o.position) if spilled else tensors
