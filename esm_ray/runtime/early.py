"""The coordinator's whole-tensor state of the next blocked tensor, made while this one is merged.

A blockwise method with a `fuse_state` (model_stock's cosines, SCE's variance and weights)
reads every row block of a tensor once before it can merge any of them. The local executor
overlaps that first pass with the merge of the tensor before: when tensor n's blocks start, the
state of the next blocked tensor n+1 is computed on a thread of its own (it reads n+1's base
rows and the experts' parts, and keeps them for the second pass when they fit
PASS_CACHE_BYTES), while this thread merges, adds and writes n's blocks. On a 1B LLaMA model
at T = 4 the statistics pass is about half of model_stock's work, so the two halves run side by
side on two cores instead of one after another.

The state is computed by the same code with the same thread settings as when it is made in
place, so the bytes do not change; only the local pool allows it (its parts are made in this
process; a Ray pool's workers answer one block request at a time). What it holds is one more
tensor's kept blocks (at most PASS_CACHE_BYTES) beside the tensor being merged; as for the
pool's early block states, a tensor over EARLY_STATE_BYTES in float32 (an embedding, an LM
head: SCE's state of one holds its variance and Select's indices) gets its state when reached,
unless the method's state is a few numbers (`MergeMethod.small_fuse_state`: model_stock).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from esm_ray.methods.base import MergeMethod

log = logging.getLogger(__name__)

__all__ = ["EarlyStates", "early_state_applies"]


def early_state_applies(method: MergeMethod) -> bool:
    """Whether `method`'s fuse_state may be made early: it has one, and its parts need no
    per-expert `block_state` (whose pool bookkeeping belongs to the merging thread)."""
    kind = type(method)
    return kind.fuse_state is not MergeMethod.fuse_state and kind.block_state is MergeMethod.block_state


class EarlyStates:
    """Futures of fuse_state by tensor name, on one thread of their own."""

    def __init__(self) -> None:
        self._thread: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future] = {}

    def start(self, name: str, make: Callable[[], Any]) -> None:
        """Begin `make()` (the state of tensor `name`) on the thread, unless already begun."""
        if name in self._futures:
            return
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="esm-ray-fuse-state")
        log.debug("fuse state of %s started early", name)
        self._futures[name] = self._thread.submit(make)

    def take(self, name: str) -> Future | None:
        """The future of tensor `name`'s state when it was begun early, else None."""
        return self._futures.pop(name, None)

    def close(self) -> None:
        """Cancel what has not begun and wait for what has (it reads the inputs)."""
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
