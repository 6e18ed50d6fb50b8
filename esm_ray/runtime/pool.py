"""Expert pools: how the coordinator reaches the T expert sides.

Both pools (`LocalPool` here, `RayPool` in ray_executor) implement `ExpertPool`: calls on every
side, and the experts' parts of a group of tensors as `GroupParts`. The local pool makes a
part when the method first reads it; the Ray pool fetches a group's whole-tensor parts from
the workers at once and a large tensor's row blocks one after another (runtime/ray_blocks.py).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from esm_ray.methods import Parts, TensorInfo
from esm_ray.runtime.expert import ExpertSide
from esm_ray.runtime.memory import read_to_float32
from esm_ray.runtime.plan import BLOCK_BYTES
from esm_ray.spec import MergeSpec

# Parts of row blocks made ahead of the fuse (about 4 MiB each), so that the thread keeps
# working while the fuse adds and writes a block: with two ahead it was idle about half of the
# time in task arithmetic at 1b-t4, and its fuse took 9.5 s instead of about 7.
AHEAD_BLOCK = 6


class GroupParts(Protocol):
    """The experts' parts of the tensors of one group."""

    def of(self, j: int, info: TensorInfo, base: Tensor) -> Parts:
        """The parts of tensor j of the group, `base` its float32 value (read once, checked)."""

    def rows(self, info: TensorInfo, base: Tensor, rows: tuple[int, int], states: list[Any]) -> Parts:
        """The parts of `rows` of a tensor (`info.shape` is the block's), for pools that merge
        in row blocks; `states` the sides' `block_states` of the whole tensor."""


class ExpertPool(Protocol):
    n: int
    blockwise: bool  # may merge large tensors in row blocks
    early_states: bool  # the next blocked tensor's fuse_state may be made on another thread (runtime.early)

    @property
    def block_parts(self) -> int:
        """How many experts' parts of one row block the pool holds at once (the rows shrink by it)."""

    def call(self, method: str, *args: Any) -> list[Any]:
        """Call `method(*args)` on every expert side; results in expert order."""

    def call_each(self, method: str, args: list[tuple]) -> list[Any]:
        """Call `method(*args[i])` on expert side i; results in expert order."""

    def group_parts(self, infos: list[TensorInfo]) -> GroupParts:
        """The parts of a group of tensors (floating tensors the method merges)."""

    def expect_blocks(self, order: list[tuple[TensorInfo, list[tuple[int, int]]]]) -> None:
        """The tensors the job will merge in row blocks, in its order (before the first)."""

    def block_states(self, info: TensorInfo, blocks: list[tuple[int, int]]) -> list[Any]:
        """Every side's `block_state` of one tensor, before its row blocks (blockwise pools)."""

    def close(self) -> None: ...


class _LazyGroup:
    """GroupParts of the local pool: each part made when the method reads it."""

    def __init__(self, pool: "LocalPool") -> None:
        self._pool = pool
        self._last: weakref.ref[LazyParts] | None = None  # the latest block's parts, while alive

    def of(self, j: int, info: TensorInfo, base: Tensor) -> Parts:
        return self._pool.parts(info, base)

    def rows(self, info: TensorInfo, base: Tensor, rows: tuple[int, int], states: list[Any]) -> Parts:
        """A block's parts; when the caller asks for the next block of the same pass before it
        has streamed this one's, this one's stream starts the next one's first parts on the
        thread once its own are all under way (LazyParts.follow)."""
        parts = self._pool.parts(info, base, rows=rows, states=states)
        last = self._last() if self._last is not None else None
        if last is not None and last.continues_to(parts):
            last.follow(parts)
        self._last = weakref.ref(parts)
        return parts


def on_threads(n: int, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with torch on `n` intra-op threads: the job's count, from whichever thread."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return fn(*args)


# The local pool's block_states share the base's float32 rows among the sides when the tensor
# takes at most this many bytes in float32 (then it is read once instead of once per side, and
# kept until every side's state is made: a 1B model's 32000 x 2048 embedding is 262 MB); a
# larger one is read by each side, so memory stays bounded whatever the largest tensor.
SHARED_BASE_BYTES = 512 << 20

# A tensor's states are started early (LocalPool.expect_blocks) only when it takes at most this
# many bytes in float32, so that what they hold (the shared base, an expert's task vector kept
# between the threshold passes) stays small beside the tensor being merged; larger ones (an
# embedding, an LM head) are made when reached, on two threads.
EARLY_STATE_BYTES = 128 << 20


class _SharedRows:
    """The base's float32 row blocks of one tensor, read (and checked) on first use, then kept
    for the other sides: calling it with j gives block j. Safe from the two threads of
    `block_states`."""

    def __init__(self, side: ExpertSide, info: TensorInfo, blocks: list[tuple[int, int]]) -> None:
        self._side, self._info, self._blocks = side, info, blocks
        self._rows: dict[int, Tensor] = {}
        self._locks = [threading.Lock() for _ in blocks]  # one per block: the threads read different ones at once

    def __call__(self, j: int) -> Tensor:
        with self._locks[j]:
            got = self._rows.get(j)
            if got is None:
                side = self._side
                got = self._rows[j] = read_to_float32(side.base, self._info.name, side.spec.base,
                                                      rows=self._blocks[j])
            return got


class LocalPool:
    """All expert sides in this process, called one after another (`parts` overlaps one side's
    work with the coordinator's on a second thread)."""

    blockwise = True
    early_states = True
    block_parts = 1  # LazyParts.stream makes the parts in order and holds at most AHEAD_BLOCK + 1 of a block, whatever T

    def __init__(self, spec: MergeSpec) -> None:
        self.sides = [ExpertSide(spec, i) for i in range(len(spec.experts))]
        self.n = len(self.sides)
        self._ahead: ThreadPoolExecutor | None = None
        self._early: ThreadPoolExecutor | None = None  # the next blocked tensor's states (expect_blocks)
        self._next: dict[str, tuple[TensorInfo, list[tuple[int, int]]]] = {}  # name -> the next blocked tensor
        self._started: dict[str, tuple[list[tuple[int, int]], list[Future]]] = {}

    def group_parts(self, infos: list[TensorInfo]) -> GroupParts:
        return _LazyGroup(self)

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in self.sides]

    def call_each(self, method: str, args: list[tuple]) -> list[Any]:
        return [getattr(s, method)(*a) for s, a in zip(self.sides, args)]

    def parts(self, info: TensorInfo, base: Tensor, rows: tuple[int, int] | None = None,
              states: list[Any] | None = None) -> "LazyParts":
        """The experts' parts of one tensor (or of its `rows`), each computed when the method
        first reads it, against the coordinator's float32 base (read and checked once instead
        of T times)."""
        return LazyParts(self.sides, info, base, self._thread(), rows, states)

    def _thread(self) -> ThreadPoolExecutor:
        """The one thread that does expert-side work beside this one (slerp's one expert too:
        its side interpolates the blocks while this thread adds and writes)."""
        if self._ahead is None:
            self._ahead = ThreadPoolExecutor(1, thread_name_prefix="esm-ray-part")
        return self._ahead

    def expect_blocks(self, order: list[tuple[TensorInfo, list[tuple[int, int]]]]) -> None:
        """The tensors the job will merge in row blocks, in its order: from then on each
        `block_states` call starts the next one's states (up to EARLY_STATE_BYTES) on two more
        threads, which work while this tensor's blocks are merged (the part thread is about
        half idle then, the coordinator's fuse being the slower side)."""
        self._next = {info.name: (nxt, list(b)) for (info, _), (nxt, b) in zip(order, order[1:])}

    def block_states(self, info: TensorInfo, blocks: list[tuple[int, int]]) -> list[Any]:
        """Every side's `block_state` of one tensor (e.g. TIES's trim thresholds): started early
        (`expect_blocks`) and collected here, or made now two sides at a time (the odd ones on
        the `parts` thread while this thread does the even ones). The base's rows are read
        once for all sides, when a side first asks for them, and kept until the states are
        done, for tensors up to SHARED_BASE_BYTES in float32."""
        early = self._started.pop(info.name, None)
        nxt, nxt_blocks = self._next.get(info.name, (None, []))
        if nxt is not None and nxt.name not in self._started and nxt.numel * 4 <= EARLY_STATE_BYTES:
            if self._early is None:
                self._early = ThreadPoolExecutor(2, thread_name_prefix="esm-ray-state")
            threads = torch.get_num_threads()
            shared = self._shared_base(nxt, nxt_blocks)
            self._started[nxt.name] = nxt_blocks, [
                self._early.submit(on_threads, threads, s.block_state, nxt, nxt_blocks, shared) for s in self.sides]
        if early is not None and early[0] == list(blocks):
            return [f.result() for f in early[1]]
        ahead, threads = self._thread(), torch.get_num_threads()
        base_rows = self._shared_base(info, blocks)

        def state(i: int) -> Any:
            return on_threads(threads, self.sides[i].block_state, info, blocks, base_rows)

        odd = {i: ahead.submit(state, i) for i in range(1, self.n, 2)}
        try:
            even = {i: state(i) for i in range(0, self.n) if i not in odd}
            return [even[i] if i in even else odd[i].result() for i in range(self.n)]
        finally:
            for f in odd.values():
                f.cancel()

    def _shared_base(self, info: TensorInfo, blocks: list[tuple[int, int]]) -> _SharedRows | None:
        return _SharedRows(self.sides[0], info, blocks) if self.n > 1 and info.numel * 4 <= SHARED_BASE_BYTES else None

    def close(self) -> None:
        for _, futures in self._started.values():
            for f in futures:
                f.cancel()
        self._started.clear()
        if self._early is not None:
            self._early.shutdown(wait=True)
            self._early = None
        if self._ahead is not None:
            self._ahead.shutdown(wait=True)
            self._ahead = None
        for s in self.sides:
            s.close()


class OnReadParts(Parts):
    """Parts made (or fetched) by `_make(i)` when first read; indexing keeps what it made, a
    subclass's `stream(order)` may hand parts out without keeping them."""

    _done: dict[int, Any]

    def _make(self, i: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i not in self._done:
            self._done[i] = self._fetch(i)
        return self._done[i]

    def _fetch(self, i: int) -> Any:
        """Part i, made now (or collected where a subclass started it earlier)."""
        return self._make(i)


class LazyParts(OnReadParts):
    """Expert i's part of one tensor, computed on first access.

    Indexing keeps what it computed (a method may read a part several times); `stream(order)`
    yields the parts in that order without keeping them, so a method that fuses in one pass
    (methods._common.dense_in_order) holds a bounded number of parts whatever T is: the one
    being fused, and a few more made meanwhile, in order, on the `ahead` thread (torch
    releases the GIL, so a second core does the expert side's work): two for a whole tensor,
    one for a whole tensor above BLOCK_BYTES, AHEAD_BLOCK for a row block. Row blocks of one
    pass are chained (`follow`): once a block's last parts are under way, the thread
    goes on with the next block's first ones, so it is not idle while this thread fuses, adds
    and writes a block. The parts are the same objects the sides' `prepare` would return,
    computed with the same thread settings, so fusing them gives the same bytes as the Ray
    executor.
    """

    def __init__(self, sides: list[ExpertSide], info: TensorInfo, base: Tensor,
                 ahead: ThreadPoolExecutor | None = None, rows: tuple[int, int] | None = None,
                 states: list[Any] | None = None) -> None:
        self._sides = sides
        self._info = info
        self._rows = rows
        self._states = states or [None] * len(sides)
        # Parts made ahead of the fuse: two keep the thread busy while the fuse catches up; a
        # part of a whole large tensor is held to one, so at most two such parts exist at once;
        # row blocks are small, and AHEAD_BLOCK of them cover the fuse's work between blocks.
        self._depth = AHEAD_BLOCK if rows is not None else 2 if info.numel * 4 <= BLOCK_BYTES else 1
        self._base = base
        self._ahead = ahead
        self._threads = torch.get_num_threads()  # the job's math threads, for the ahead thread too
        self._done: dict[int, Any] = {}
        self._pending: dict[int, Future] = {}  # parts under way on the ahead thread
        self._next: LazyParts | None = None

    def _make(self, i: int) -> Any:
        return on_threads(self._threads, self._sides[i].prepare_with_base, self._info, self._base, self._rows,
                          self._states[i])

    def _fetch(self, i: int) -> Any:
        fut = self._pending.pop(i, None)
        return fut.result() if fut is not None else self._make(i)

    def __len__(self) -> int:
        return len(self._sides)

    def continues_to(self, other: "LazyParts") -> bool:
        """Whether `other` is the next row block of the same tensor, in the same pass."""
        return (self._rows is not None and other._rows is not None and self._info.name == other._info.name
                and self._rows[1] == other._rows[0] and self._states is other._states)

    def follow(self, nxt: "LazyParts") -> None:
        """Let this block's stream start `nxt`'s first parts once its own are all under way."""
        self._next = nxt

    def _start(self, order: list[int], n: int) -> None:
        """Put the first n parts of `order` not made yet under way on the thread (this thread only)."""
        assert self._ahead is not None
        for j in order[:n]:
            if j not in self._pending and j not in self._done:
                self._pending[j] = self._ahead.submit(self._make, j)

    def stream(self, order: list[int]) -> Iterator[Any]:
        todo = [i for i in order if i not in self._done]
        finished = False
        try:
            for i in order:
                if i in self._done:
                    yield self._done[i]
                    continue
                todo.remove(i)
                if self._ahead is not None:  # keep the thread busy `depth` parts ahead, in order
                    self._start(todo, self._depth)
                part = self._fetch(i)  # made here when not under way
                spare = self._depth - min(len(todo), self._depth)
                if spare and self._next is not None and self._ahead is not None:
                    # Only once part i exists: an expert's blocks are made one after another,
                    # never two at once (DELLA and DARE draw each expert's blocks from one stream).
                    self._next._start(list(range(len(self._next))), spare)
                yield part
                del part
            finished = True
        finally:
            self._cancel()
            if not finished and self._next is not None:  # abandoned: nobody will collect these
                self._next._cancel()

    def _cancel(self) -> None:
        """Cancel the parts still under way (those already running finish unused)."""
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
