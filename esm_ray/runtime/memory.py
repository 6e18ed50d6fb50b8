"""Memory helpers of the merge loop: a per-thread pool of scratch buffers reused from tensor to
tensor, reading a tensor as float32 into it, and glibc's allocator told to keep freed blocks
(`esm_ray.heap`, shared with calibration).

All three exist for one reason: on CPU a fresh large tensor costs a page fault per 4 KiB when
first written, which costs more than the elementwise work of a simple merge.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from esm_ray.heap import reuse_freed_memory
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
