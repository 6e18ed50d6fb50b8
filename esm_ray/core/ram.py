"""RAM (Reinforced Agent Merging): keep what only one expert changed, average what several
changed; RAM+ (tensor-local) also boosts an expert's unique entries by how much it overlaps
the others, as mergekit 0.1.5's `ram` and `ramplus_tl` (float32 results equal bit for bit)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def ram_merge(task_vectors: Sequence[Tensor], epsilon: float = 1e-5, r: float | None = None,
              alpha: float = 0.2) -> Tensor:
    """ΔW from T task vectors τ_i (shape S). An entry of τ_i counts when |τ_ij| > epsilon; c_j
    is how many experts count at entry j.

        RAM:   ΔW_j = Σ_i [τ_ij counts] · τ_ij · ([c_j = 1] + [c_j > 1] / c_j)
        RAM+:  the unique part of expert i is scaled by λ_i = 1 + r · clamp(ρ_i, 0, alpha),
               ρ_i = (#entries i shares with others) / max(#entries only i changed, epsilon)
    r = None gives RAM, a number gives RAM+ (tensor-local: counts over this tensor only).
    """
    tvs = torch.stack(list(task_vectors), dim=0)
    flat = tvs.view(tvs.shape[0], -1)
    counts_mask = flat.abs() > epsilon
    counts = counts_mask.sum(dim=0, keepdim=True)
    shared = counts > 1
    unique = counts == 1
    kept = flat * counts_mask
    unique_part = kept * unique
    if r is not None:
        rho = (counts_mask & shared).sum(dim=1) / (counts_mask & unique).sum(dim=1).clamp(min=epsilon)
        unique_part = unique_part * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    out = (unique_part + kept * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return out.reshape(tvs.shape[1:])


__all__ = ["ram_merge"]
