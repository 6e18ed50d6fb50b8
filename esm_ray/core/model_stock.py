"""Model Stock (Jang et al. 2024): interpolate between the base and the experts' average by a
factor set from the angle between the experts' task vectors, as mergekit 0.1.5's `model_stock`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def model_stock(base: Tensor, experts: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """W = t · mean_i(W_i) + (1 − t) · W_0,  t = N cos θ / (1 + (N − 1) cos θ).

    cos θ is the mean over the N(N−1)/2 pairs of experts of the cosine between their task
    vectors τ_i = W_i − W_0 (each cosine clamped to [-1, 1], norms' product floored at 1e-6):
    one angle for the whole (flattened) tensor, or one per row with filter_wise (a 1-D tensor is
    then one row). Where |1 + (N − 1) cos θ| < 1e-6, t = 0 (the base is kept).
    base: shape S, experts: N ≥ 2 tensors of shape S -> S.
    """
    ws = list(experts)
    if len(ws) < 2:
        raise ValueError(f"model_stock needs at least 2 experts, got {len(ws)}")
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in ws]
    else:
        w0 = base.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    tvs = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(tvs):
        for b in tvs[i + 1:]:
            denom = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / denom).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (n * cos) / torch.where(singular, torch.ones_like(denom), denom))
    mean = sum(ws) / n
    return (t * mean + (1 - t) * w0).reshape(shape)


__all__ = ["model_stock"]
