"""Row blocks on Ray: the coordinator fuses a large tensor a block at a time.

Before a tensor's blocks every worker computes its block state (TIES's trim threshold, DARE's
random stream) and keeps it, keyed by the tensor (`ExpertSide.block_begin`): nothing but the
tensor's name and its row ranges travels. Then the coordinator asks every worker for block b
in parallel (`ExpertSide.prepare_rows`), `AHEAD` blocks in advance, so the workers prepare the
next blocks while the coordinator fuses this one; the parts wait in the object store, and the
coordinator fetches a block's parts as the method reads them (`RefParts.stream`). Since all T
parts of a block are in flight at once, the Ray pool's blocks have 1/T the rows of the local
executor's (`RayPool.block_parts`, `core.rowblocks.row_blocks`): the T parts of a block together are
about `block_bytes`, and the coordinator holds about (AHEAD + 1) x `block_bytes` of parts,
whatever T and the largest tensor (at least one row per expert and block).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor

from esm_ray.methods import Parts, TensorInfo
from esm_ray.runtime.pool import OnReadParts

AHEAD = 1  # blocks requested beyond the one being fused (each holds T parts in the object store)


class RefParts(OnReadParts):
    """The experts' parts of one row block, as object references fetched on first read.

    Indexing keeps what it fetched; `stream(order)` fetches in that order without keeping."""

    def __init__(self, refs: list[Any], get: Callable[[int, Any], Any]) -> None:
        super().__init__()
        self._refs = refs
        self._get = get
        self._done: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._refs)

    def _make(self, i: int) -> Any:
        return self._get(i, self._refs[i])

    def stream(self, order: list[int]) -> Iterator[Any]:
        for i in order:
            if i in self._done:
                yield self._done[i]
                continue
            part = self._get(i, self._refs[i])
            self._refs[i] = None  # the object store may drop it once read
            yield part
            del part


class BlockFeed:
    """One tensor's row blocks, requested from every worker in order, `ahead` blocks early."""

    def __init__(self, submit: Callable[[int], list[Any]], get: Callable[[int, Any], Any],
                 blocks: list[tuple[int, int]], ahead: int = AHEAD) -> None:
        self._submit, self._get = submit, get
        self.blocks = blocks
        self._ahead = ahead
        self._next = 0
        self._queue: deque[tuple[tuple[int, int], list[Any]]] = deque()

    @property
    def done(self) -> bool:
        return self._next == len(self.blocks) and not self._queue

    def take(self, rows: tuple[int, int]) -> RefParts:
        """The parts of the next block, which must be `rows`."""
        while len(self._queue) <= self._ahead and self._next < len(self.blocks):
            self._queue.append((self.blocks[self._next], self._submit(self._next)))
            self._next += 1
        if not self._queue or self._queue[0][0] != tuple(rows):
            raise RuntimeError(f"row blocks asked out of order: {tuple(rows)}, expected "
                               f"{self._queue[0][0] if self._queue else 'none'}")
        return RefParts(self._queue.popleft()[1], self._get)


class RayGroupParts:
    """GroupParts of the Ray pool: whole-tensor parts fetched for the group at once, row
    blocks through the pool's feed of each blocked tensor."""

    def __init__(self, whole: list[list[Any]], feeds: dict[str, BlockFeed]) -> None:
        self._whole = whole
        self._feeds = feeds

    def of(self, j: int, info: TensorInfo, base: Tensor) -> Parts:
        return Parts([p[j] for p in self._whole])

    def rows(self, info: TensorInfo, base: Tensor, rows: tuple[int, int], states: list[Any]) -> Parts:
        feed = self._feeds[info.name]
        parts = feed.take(rows)
        if feed.done:
            del self._feeds[info.name]
        return parts


__all__ = ["AHEAD", "BlockFeed", "RayGroupParts", "RefParts"]
