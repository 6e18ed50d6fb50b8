"""NearSwap: take the expert's value where it is close to the base's, keep the base elsewhere,
with a smooth blend in between, as mergekit 0.1.5's `nearswap`."""

from __future__ import annotations

import torch
from torch import Tensor


def nearswap(base: Tensor, expert: Tensor, t: float) -> Tensor:
    """W = s · W_1 + (1 − s) · W_0 with s = clamp(t / max(|W_0 − W_1|, 1e-6), 0, 1) per entry.

    Entries that differ by at most t become the expert's; larger differences move towards it by
    t. Elementwise. base, expert: shape S -> S.
    """
    s = (t / torch.abs(base - expert).clamp(min=1e-6)).clamp(min=0, max=1)
    return s * expert + (1 - s) * base


__all__ = ["nearswap"]
