"""Arcee Fusion: keep the entries of one expert's task vector whose importance (change times the
divergence of the row's softmax) is an upper outlier, as mergekit 0.1.5's `arcee_fusion`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def fusion_importance(base: Tensor, expert: Tensor) -> Tensor:
    """I = |W_1 − W_0| · KL(softmax(W_1) ‖ softmax(W_0)) with the KL taken along the last
    dimension (per row; a 1-D tensor is one row) and 1e-8 added to both distributions."""
    p = F.softmax(expert, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (expert - base).abs() * kl


def fusion_threshold(importance: Tensor, samples: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """median + 1.5 · (Q3 − Q1) of the importances; the q-quantile is the sorted value at index
    floor(q · (n − 1)) (no interpolation). samples > 0 and fewer entries than that: quartiles of
    `samples` entries drawn with replacement (mergekit does so above 1,000,000 entries)."""
    flat = importance.reshape(-1)
    if 0 < samples < flat.numel():
        flat = flat[torch.randint(flat.numel(), (samples,), generator=generator)]
    ordered = torch.sort(flat).values
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, med, q3 = ordered[idx]
    return med + 1.5 * (q3 - q1)


def arcee_fusion(base: Tensor, expert: Tensor, samples: int = 0,
                 generator: torch.Generator | None = None) -> Tensor:
    """ΔW = (W_1 − W_0) · [I ≥ threshold], I and the threshold as above. base, expert: S -> S."""
    imp = fusion_importance(base, expert)
    keep = (imp >= fusion_threshold(imp, samples, generator)).float()
    return (expert - base) * keep


__all__ = ["arcee_fusion", "fusion_importance", "fusion_threshold"]
