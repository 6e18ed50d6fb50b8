"""Memory helpers of the merge loop: a per-thread pool of scratch buffers reused from tensor to
tensor, reading a tensor as float32 into it, and glibc's allocator told to keep freed blocks.

All three exist for one reason: on CPU a fresh large tensor costs a page fault per 4 KiB when
first written, which costs more than the elementwise work of a simple merge.
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from esm_ray.io.reader import check_finite

__all__ = ["read_stored", "read_to_float32", "reuse_freed_memory", "scratch"]

_scratch = threading.local()


def _unshared(buf: Tensor) -> bool:
    try:  # the buffer itself and the temporary storage wrapper; more means a view is still alive
        return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2
    except (AttributeError, RuntimeError):
        return False


SCRATCH_MAX_BYTES = 64 << 20  # larger tensors are not kept in a slot (see `scratch`)


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised tensor backed by this thread's buffer for `slot`.

    On CPU a fresh large tensor costs a page fault per 4 KiB when first written, which costs
    more than the elementwise work of a simple merge; so the local executor's per-tensor buffers
    are reused from tensor to tensor. Reuse is safe whatever the caller does with the result: a
    buffer that anything still references (a part, a method's state, the writer) is left to its
    holders and the slot gets a new one. A tensor over SCRATCH_MAX_BYTES (a vocabulary matrix,
    read whole by a decomposing method) gets a fresh tensor, not kept: its page faults are
    small beside its decomposition, and keeping it would hold that size per slot and thread
    for the rest of the merge (about 0.65 GB at 1B for the base, expert and read slots).
    """
    n = torch.empty(0, dtype=dtype).element_size()
    for d in shape:
        n *= int(d)
    if n > SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    bufs = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get(slot)
    if buf is None or buf.numel() < n or not _unshared(buf):
        buf = bufs[slot] = torch.empty(n, dtype=torch.uint8)
    return buf[:n].view(dtype).view(shape)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters
_GLIBC_DEFAULT = 128 * 1024


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
    Threads started meanwhile (the local pool's part and state threads) share the main heap
    instead of getting heaps of their own: a part made on one of them and kept by the
    coordinator is freed into its thread's 64 MiB heaps, which glibc unmaps whenever one
    empties, whatever the threshold. (glibc fixes its limit on heaps the first time it needs
    one, so in a process that starts threads later the limit of one may outlast the merge:
    those threads share the existing heaps, which costs some locking, no memory.)
    Peak RSS is unchanged. The defaults are restored afterwards, and the kept memory is
    returned on a thread of its own.
    """
    libc = None
    if _glibc():
        try:
            libc = ctypes.CDLL(None)
            ok = (libc.mallopt(_M_MMAP_THRESHOLD, threshold) and libc.mallopt(_M_TRIM_THRESHOLD, keep)
                  and libc.mallopt(_M_ARENA_MAX, 1))
        except (OSError, AttributeError):
            ok = False
        if not ok:
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
            libc.mallopt(_M_ARENA_MAX, 0)  # 0: glibc's own limit (8 per core)
            # Returning the kept memory takes a while after a large merge (0.4 s at 1B); a
            # thread does it, so the caller (the CLI, which then exits) need not wait.
            threading.Thread(target=libc.malloc_trim, args=(0,), name="esm-ray-trim", daemon=True).start()


EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


def read_stored(reader, name: str, source: str, rows: tuple[int, int] | None = None) -> Tensor:
    """Tensor `name` (or only its `rows`) checked for NaN/Inf, as a fresh tensor in its stored
    dtype when that is exact in float32 (float32, bfloat16, float16), else as float32."""
    if hasattr(reader, "get_float32") or reader.info(name).dtype not in EXACT_IN_FLOAT32:
        return read_to_float32(reader, name, source, rows=rows)
    return _read_checked(reader, name, source, rows)


def _read_checked(reader, name: str, source: str, rows: tuple[int, int] | None) -> Tensor:
    """Tensor `name` (or its `rows`) as stored, a fresh tensor, checked for NaN/Inf."""
    raw = reader.get(name, rows=rows)
    check_finite(name, raw, source)
    return raw


def read_to_float32(reader, name: str, source: str, slot: str | None = None,
                    rows: tuple[int, int] | None = None) -> Tensor:
    """Tensor `name` (or only its `rows`) checked for NaN/Inf, as float32: a fresh tensor, or
    this thread's `slot` buffer (see `scratch`). A tensor stored in another dtype is read into
    a scratch buffer."""
    if hasattr(reader, "get_float32"):  # a LoRA adapter (io.adapter): W_0 + s·BA never rounded
        raw = reader.get_float32(name, rows=rows)
        check_finite(name, raw, source)
        return raw
    meta = reader.info(name)
    shape = meta.shape if rows is None else (rows[1] - rows[0], *meta.shape[1:])
    if meta.dtype == torch.float32 or not meta.nbytes:
        return _read_checked(reader, name, source, rows)
    raw = reader.get(name, out=scratch("read", shape, meta.dtype), rows=rows)
    check_finite(name, raw, source)
    return scratch(slot, shape).copy_(raw) if slot else raw.to(torch.float32)
