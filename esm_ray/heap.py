"""glibc's allocator told to keep freed memory while a merge or a calibration runs.

On CPU a fresh large tensor costs a page fault per 4 KiB when first written; work that
allocates and frees same-sized tensors over and over (a merge's per-tensor buffers, a forward
pass's activations batch after batch) pays that again at every reuse unless the allocator keeps
what was freed.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["return_kept_memory", "reuse_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters
_GLIBC_DEFAULT = 128 * 1024

_lock = threading.Lock()
_depth = 0  # reuse_freed_memory blocks running now, in any thread
_libc = None  # set while the setting is in force
_trim: threading.Thread | None = None  # the last thread returning the kept memory (joined at exit)


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


@contextmanager
def reuse_freed_memory(threshold: int = 32 << 20, keep: int = 1 << 30) -> Iterator[None]:
    """glibc only: while the block runs, blocks up to `threshold` bytes come from the heap and
    freed memory stays there (up to `keep` bytes free at the heap's top), instead of being
    mapped and unmapped for each tensor.

    A merge allocates and frees same-sized tensors over and over. By default glibc gives every
    block above an adaptive threshold its own mapping and unmaps it on free, so each reuse pays
    a page fault per 4 KiB, which on a VM costs about as much as the arithmetic. 32 MiB is the
    largest threshold glibc accepts. The same holds for the heap's top: a method that keeps a
    tensor's row blocks between its passes (model_stock, SCE: up to PASS_CACHE_BYTES) frees
    them tensor after tensor, and a top returned to the system at each free faults every page
    again for the next tensor (about 4 million faults, a third of model_stock's time at 1B).
    Calibration frees a forward pass's activations batch after batch: about 270 thousand
    faults and 0.5 s of system time in a 2.8 s MiniLM calibration on 128 samples.
    Threads started meanwhile (the local pool's part and state threads) share the main heap
    instead of getting heaps of their own: a part made on one of them and kept by the
    coordinator is freed into its thread's 64 MiB heaps, which glibc unmaps whenever one
    empties, whatever the threshold. (glibc fixes its limit on heaps the first time it needs
    one, so in a process that starts threads later the limit of one may outlast the block:
    those threads share the existing heaps, which costs some locking, no memory.)
    Peak RSS is unchanged. Nested and concurrent blocks share one setting (a calibration inside
    a merge): the first to enter sets it, the last to leave restores glibc's defaults, and the
    kept memory is then returned on a thread of its own.
    """
    global _depth, _libc
    with _lock:
        _depth += 1
        if _depth == 1:
            _libc = _set(threshold, keep)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _libc is not None:
                _restore(_libc)
                _libc = None


def return_kept_memory() -> None:
    """Inside a `reuse_freed_memory` block: return the free memory the heap keeps to the system
    now (glibc's malloc_trim; elsewhere nothing happens). Between two pieces of work whose
    memory differs in kind (one expert's layer-wise calibration and the next one's embedding,
    which is mapped on its own), what the first left free would otherwise add to the peak."""
    with _lock:
        libc = _libc
    if libc is not None:
        libc.malloc_trim(0)


def _set(threshold: int, keep: int):
    """The C library with the setting in force, or None where it could not be set."""
    if not _glibc():
        return None
    try:
        libc = ctypes.CDLL(None)
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, threshold) and libc.mallopt(_M_TRIM_THRESHOLD, keep)
              and libc.mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return None
    return libc if ok else None


def _restore(libc) -> None:
    global _trim
    libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
    libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
    libc.mallopt(_M_ARENA_MAX, 0)  # 0: glibc's own limit (8 per core)
    # Returning the kept memory takes a while after a large merge (0.4 s at 1B); a thread does
    # it, so the caller (the CLI, which leaves without the interpreter's teardown) need not
    # wait. A process that does tear down (a Ray actor when it is stopped) waits for it first:
    # a daemon thread still inside malloc_trim while the interpreter deletes its thread states
    # ended the coordinator actor with a segmentation fault.
    _trim = threading.Thread(target=libc.malloc_trim, args=(0,), name="esm-ray-trim", daemon=True)
    _trim.start()


@atexit.register
def _wait_for_trim() -> None:
    t = _trim
    if t is not None:
        t.join(timeout=10)
