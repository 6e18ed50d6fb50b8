"""Pieces shared by the classic task-vector methods: parameter fields, compact parts, expert order."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

import torch
from pydantic import Field
from torch import Tensor

from esm_ray.core.lora import LoraFactors
from esm_ray.methods.base import P, ExpertContext, MergeMethod, Parts, TensorInfo


def density_field(default: float = 1.0) -> Any:
    return Field(default, gt=0.0, le=1.0,
                 description="fraction of each task vector's entries kept (per-model `density` in the spec overrides it)")


def lambda_field() -> Any:
    return Field(1.0, alias="lambda", description="scale applied to the merged task vector")


def normalize_field(default: bool) -> Any:
    return Field(default, description="divide by the sum of the weights of the contributing experts")


def consensus_field() -> Any:
    return Field("sum", description="sign election: 'sum' (sign of Σ w·τ, TIES) or 'count' (majority of signs)")




@dataclass(frozen=True)
class SparsePart:
    """A mostly-zero tensor as its nonzero entries: flat row-major int64 indices and values."""

    shape: tuple[int, ...]
    indices: Tensor  # (nnz,) int64
    values: Tensor   # (nnz,) float32

    @property
    def nbytes(self) -> int:
        return self.indices.numel() * self.indices.element_size() + self.values.numel() * self.values.element_size()

    def to_dense(self) -> Tensor:
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device).reshape(-1)
        out[self.indices] = self.values
        return out.reshape(self.shape)


def compact(t: Tensor, max_nonzero: int | None = None) -> Tensor | SparsePart:
    """A SparsePart when that ships fewer bytes than the dense tensor, else `t` itself.

    With int64 indices and float32 values a sparse part costs 12 bytes per nonzero entry, so
    it wins below one nonzero in three. `max_nonzero`: a known upper bound on the nonzero
    entries (TIES keeps k); when even the bound is too many for a sparse part to win, `t` is
    returned without counting.
    """
    if max_nonzero is not None and max_nonzero * (8 + t.element_size()) >= t.numel() * t.element_size():
        return t
    # count_nonzero of a bool tensor is branch-free; on floats with scattered zeros it is ~5x slower
    if int(torch.count_nonzero(t != 0)) * (8 + t.element_size()) >= t.numel() * t.element_size():
        return t
    idx = torch.nonzero(t.reshape(-1)).squeeze(1)
    return SparsePart(tuple(t.shape), idx, t.reshape(-1)[idx].clone())


def dense(part: Tensor | SparsePart | LoraFactors) -> Tensor:
    """A part as a dense tensor (a LoRA expert's factors densified, s · B A)."""
    if isinstance(part, LoraFactors):
        return part.float()
    return part.to_dense() if isinstance(part, SparsePart) else part


def all_lora(parts: Sequence[Any]) -> bool:
    """Whether every part is a LoRA expert's factors (a factored fuse applies)."""
    return len(parts) > 0 and all(isinstance(p, LoraFactors) for p in Parts.of(parts))


def in_expert_order(parts: list[Any], ctxs: list[ExpertContext]) -> tuple[list[Any], list[ExpertContext]]:
    """Sort parts and contexts by expert index, so the fusion order never depends on arrival."""
    if len(parts) != len(ctxs):
        raise ValueError(f"got {len(parts)} parts for {len(ctxs)} experts")
    order = sorted(range(len(ctxs)), key=lambda i: ctxs[i].index)
    return [parts[i] for i in order], [ctxs[i] for i in order]


def dense_in_order(parts: Sequence[Any], ctxs: list[ExpertContext],
                   float32: bool = True) -> tuple[Iterator[Tensor], list[ExpertContext]]:
    """The parts as dense float32 tensors (in their own dtype with `float32=False`), one at a
    time in expert order, and the sorted contexts.

    For methods that fuse in one pass: the parts are streamed (`Parts.stream`), so with the
    local executor each part is computed as it is reached and dropped after use, and the
    coordinator never holds T parts at once.
    """
    if len(parts) != len(ctxs):
        raise ValueError(f"got {len(parts)} parts for {len(ctxs)} experts")
    order = sorted(range(len(ctxs)), key=lambda i: ctxs[i].index)
    stream = (dense(p) for p in Parts.of(parts).stream(order))
    return ((p.float() for p in stream) if float32 else stream), [ctxs[i] for i in order]


class HasDensity(Protocol):
    """Parameters with a global `density` (TIES, DARE)."""

    @property
    def density(self) -> float: ...


def expert_density(ctx: ExpertContext, params: HasDensity) -> float:
    """The expert's own `density` from the spec when set, else the method's global one."""
    return float(ctx.density) if ctx.density is not None else float(params.density)


def weights_of(ctxs: list[ExpertContext]) -> list[float]:
    """Per-expert weights; the spec's `experts[i].weight` (default 1.0) is authoritative."""
    return [float(c.weight) for c in ctxs]


def dense_list(parts: Sequence[Any], ctxs: list[ExpertContext],
               float32: bool = True) -> tuple[list[Tensor], list[ExpertContext]]:
    """All parts at once as dense float32 tensors (in their own dtype with `float32=False`) in
    expert order, with the sorted contexts (for methods that need every expert's tensor
    together: a norm, a variance, an angle)."""
    tvs, ctxs = dense_in_order(parts, ctxs, float32)
    return list(tvs), ctxs


# A blockwise method whose fuse_state reads a tensor's blocks more than once keeps them between
# its passes when the experts' float32 rows and the base's take at most this ((T + 1) · numel · 4
# bytes): a 2048 x 5632 matrix at T = 4 is 231 MB. Larger tensors (an embedding, or more
# experts) are read again on each pass, so memory stays bounded whatever T and the largest tensor.
PASS_CACHE_BYTES = 256 << 20


class StackedBlocks:
    """The experts' parts of one tensor's row blocks, stacked (T, rows...) in expert order, for
    a blockwise method's passes: calling it yields (first flat index, base rows, stacked parts)
    block after block (with `stack=False`, the list of the T dense parts in their own dtype,
    as they were made, without the copy: a `stored_dtype_blocks` method's bfloat16 rows).

    The first call reads the blocks (`passes`, as MergeMethod.fuse_state gets it). When the
    tensor is small enough (PASS_CACHE_BYTES) it keeps them: later calls replay them without
    reading, a pass may `put` a transformed block in place of one, and fuse_block `take`s its
    block instead of reading the parts again. Above the limit every call reads again and
    `take` gives None."""

    def __init__(self, passes: Callable[[], Iterator[tuple[Tensor, Parts]]], ctxs: list[ExpertContext],
                 numel: int, stack: bool = True) -> None:
        self._passes, self._ctxs, self._stack = passes, ctxs, stack
        self.keeps = (len(ctxs) + 1) * numel * 4 <= PASS_CACHE_BYTES
        self._kept: dict[int, tuple[Tensor, Any]] = {}
        self._complete = False

    def __call__(self) -> Iterator[tuple[int, Tensor, Any]]:
        if self._complete:
            for start, (base, block) in self._kept.items():
                yield start, base, block
            return
        start = 0
        for base, parts in self._passes():
            block = (torch.stack(dense_list(parts, self._ctxs)[0]) if self._stack
                     else dense_list(parts, self._ctxs, float32=False)[0])
            if self.keeps:
                self._kept[start] = base, block
            yield start, base, block
            start += block[0].numel()
        self._complete = self.keeps

    def put(self, start: int, block: Tensor) -> None:
        """Keep `block` in place of the kept parts at `start` (only when the blocks are kept)."""
        assert self.keeps and start in self._kept
        self._kept[start] = self._kept[start][0], block

    def take(self, start: int) -> Any:
        """The kept parts at `start`, given up (the last pass, fuse_block), or None."""
        kept = self._kept.pop(start, None)
        return None if kept is None else kept[1]


K = TypeVar("K")


class KeptBlocks(Generic[K]):
    """What a block_state makes of each (base, expert) float32 row block of one tensor
    (`make(base, expert)`), block after block, for a block_state that reads the blocks more
    than once: `__call__()` as block_state gets it. When the kept values take at most half of
    PASS_CACHE_BYTES (`entry_bytes` per entry of the tensor; two experts' states are made at
    once) the first pass keeps them and later passes replay them without reading; `kept()`
    then gives them by first flat index, for state_block to make the blocks' parts without a
    read. `task_vector_blocks` (TIES's threshold passes) and `pair_blocks` (slerp's norms, then
    its dot) are the two kinds in use."""

    def __init__(self, blocks: Callable[[], Iterator[tuple[Tensor, Tensor]]], numel: int,
                 make: Callable[[Tensor, Tensor], K], entry_bytes: int) -> None:
        self._blocks, self._make = blocks, make
        self._kept: list[tuple[int, K]] | None = [] if numel * entry_bytes <= PASS_CACHE_BYTES // 2 else None
        self._complete = False

    def __call__(self) -> Iterator[K]:
        if self._complete:
            assert self._kept is not None
            yield from (v for _, v in self._kept)
            return
        if self._kept is not None:
            self._kept.clear()  # a pass left unfinished is read again whole
        for b, e in self._blocks():
            v = self._make(b, e)
            if self._kept is not None:
                self._kept.append((b.numel(), v))
            yield v
        self._complete = self._kept is not None

    def kept(self) -> dict[int, K] | None:
        """The kept values by their block's first flat index, after a complete pass, else None."""
        if not self._complete or self._kept is None:
            return None
        out, start = {}, 0
        for n, v in self._kept:
            out[start] = v
            start += n
        return out


def task_vector_blocks(blocks: Callable[[], Iterator[tuple[Tensor, Tensor]]], numel: int) -> KeptBlocks[Tensor]:
    """τ = W − W_0 block after block, kept when it takes at most half of PASS_CACHE_BYTES."""
    return KeptBlocks(blocks, numel, lambda b, e: e - b, 4)


def pair_blocks(blocks: Callable[[], Iterator[tuple[Tensor, Tensor]]],
                numel: int) -> KeptBlocks[tuple[Tensor, Tensor]]:
    """(W_0, W) block after block, kept when the two take at most half of PASS_CACHE_BYTES."""
    return KeptBlocks(blocks, numel, lambda b, e: (b, e), 8)


# What the adapter notes propose first: the spec's label-free `rescale` (core.rescale).
RESCALE_HINT = "`rescale: {scope: tensor}` (the scale from the calibration data, no labels)"

ADAPTER_SCALE_NOTE = (
    "on LoRA adapters each task's whole update fits in the directions kept (an adapter's rank is at most "
    "floor(d / T)), so every adapter is added at full strength, like task arithmetic at lambda 1; on the LoRA LM "
    "zoo (README) this default scored far below the base and a scale near 1/sqrt(T) did well")


def exactly(n_experts: int, n: int | tuple[int, None], method: str) -> None:
    """SpecError naming `experts` unless there are exactly n experts (or at least n[0])."""
    from esm_ray.errors import SpecError

    if isinstance(n, tuple):
        if n_experts < n[0]:
            raise SpecError(f"field `experts`: method {method!r} needs at least {n[0]} experts, got {n_experts}")
    elif n_experts != n:
        raise SpecError(f"field `experts`: method {method!r} needs exactly {n} expert{'s' if n > 1 else ''} "
                        f"besides the base, got {n_experts}")


class OneExpertMethod(MergeMethod[P], Generic[P]):
    """A method of the base and exactly one expert whose expert side ships the expert's own
    weights (not τ): `fuse` gets W_1 as the one part (`dense_list(parts, ctxs)`)."""

    def __init__(self, params: P, n_experts: int, seed: int = 0) -> None:
        exactly(n_experts, 1, self.name)
        super().__init__(params, n_experts, seed)

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        return expert
