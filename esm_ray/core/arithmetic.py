"""Weighted averaging of models (linear / model soup) and of task vectors (task arithmetic).

Sums run expert by expert in the order given, so the result does not depend on the thread
count. Half-precision inputs are promoted to float32; float64 inputs stay float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def work_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def is_zero(t: Tensor) -> bool:
    """Whether every entry of a real tensor is zero (NaN is not), from one min/max pass:
    `(t != 0).any()` first writes a bool tensor of t's size, which a merge making one such check
    per expert and tensor leaves behind as heap fragments."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(lo == 0) and bool(hi == 0)


def check_group(tensors: Sequence[Tensor], weights: Sequence[float]) -> None:
    """Raise ValueError unless there is at least one tensor, one weight each, all one shape."""
    if len(tensors) == 0:
        raise ValueError("need at least one tensor")
    if len(weights) != len(tensors):
        raise ValueError(f"got {len(weights)} weights for {len(tensors)} tensors")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"tensors differ in shape: {sorted(shapes)}")


def weighted_sum(tensors: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_i w_i · t_i, accumulated in the given order.

    tensors: T tensors of one shape S, weights: T floats -> S. `tensors` may also be a lazy
    iterable (the local executor computes each expert's part when it is reached): each tensor
    is used once and not kept, so memory does not grow with T. Its working dtype is then that
    of the first tensor (float64 stays float64, anything else float32).
    """
    if isinstance(tensors, Sequence):
        check_group(tensors, weights)
        dtype: torch.dtype | None = work_dtype(tensors)
    else:
        dtype = None
    acc: Tensor | None = None
    scratch: Tensor | None = None
    n = 0
    for t in tensors:
        if n >= len(weights):
            raise ValueError(f"got {len(weights)} weights for more than {n} tensors")
        w = float(weights[n])
        n += 1
        if acc is None:
            dtype = dtype or (torch.float64 if t.dtype == torch.float64 else torch.float32)
            acc = torch.zeros(t.shape, dtype=dtype, device=t.device)
        elif t.shape != acc.shape:
            raise ValueError(f"tensors differ in shape: {sorted({tuple(acc.shape), tuple(t.shape)})}")
        t = t.to(dtype)
        if w == 1.0:  # t * 1.0 is t, bit for bit: skip the product and its temporary
            acc += t
        else:
            if scratch is None:
                scratch = torch.empty_like(acc)
            acc += torch.mul(t, w, out=scratch)
    if acc is None:
        raise ValueError("need at least one tensor")
    if n != len(weights):
        raise ValueError(f"got {len(weights)} weights for {n} tensors")
    return acc


def linear(weights: Sequence[float], tensors: Iterable[Tensor], normalize: bool = True) -> Tensor:
    """Weighted average of whole weights (model soup): Σ w_i W_i / Σ w_i.

    With normalize=False the weighted sum Σ w_i W_i is returned as is.
    tensors: T tensors of one shape S -> S. Raises ValueError when normalize is set and the
    weights sum to zero.
    """
    acc = weighted_sum(tensors, weights)
    if normalize:
        total = sum(float(w) for w in weights)
        if total == 0.0:
            raise ValueError("linear merge with normalize=True needs weights with a nonzero sum")
        acc /= total
    return acc


def task_arithmetic(task_vectors: Iterable[Tensor], weights: Sequence[float], lam: float = 1.0,
                    normalize: bool = False) -> Tensor:
    """Task arithmetic: ΔW = λ · Σ w_i τ_i  (divided by Σ w_i when normalize).

    As in mergekit, a weight sum with |Σ w_i| < 1e-8 is treated as 1 when normalizing.
    task_vectors: T tensors of one shape S (or a lazy iterable of them, see weighted_sum) -> S
    """
    acc = weighted_sum(task_vectors, weights)
    if normalize:
        total = sum(float(w) for w in weights)
        if abs(total) >= 1e-8:
            acc /= total
    if lam != 1.0:
        acc *= lam
    return acc


__all__ = ["check_group", "linear", "task_arithmetic", "weighted_sum", "work_dtype"]
