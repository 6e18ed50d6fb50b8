"""SCE (Select, Calculate, Erase; FuseChat 2.0): keep the entries where the experts' task vectors
vary most, weight each expert by its task vector's mean square, erase entries against the elected
sign, as mergekit 0.1.5's `sce` (float32 results equal bit for bit)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def sce_select_mask(tvs: Tensor, select_topk: float) -> Tensor:
    """Entries kept by Select: the k = int(nnz · select_topk) entries of largest variance across
    experts, nnz the number of entries whose variance is nonzero. tvs: (T, *S) -> float (S)."""
    if select_topk <= 0:
        return torch.zeros_like(tvs[0])
    if select_topk >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * select_topk)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sce_merge(task_vectors: Sequence[Tensor], select_topk: float = 1.0) -> Tensor:
    """ΔW of SCE from T task vectors τ_i (shape S):

        Select:    τ_i ← τ_i · M, M from sce_select_mask (only when select_topk < 1)
        Calculate: c_i = mean(τ_i²) / Σ_j mean(τ_j²)   (1/T each when that sum is < 1e-6)
        Erase:     e_i = [sign τ_i = elected sign], elected = sign of Σ_i τ_i (+ on a tie)
        ΔW = Σ_i c_i e_i τ_i / max(Σ_i c_i e_i, 1e-6)
    """
    tvs = torch.stack(list(task_vectors), dim=0)
    if select_topk < 1:
        tvs = tvs * sce_select_mask(tvs, select_topk).unsqueeze(0)
    sign = tvs.sign()
    elected = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = sign == elected
    c = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(c).item()
    c = torch.ones_like(c) / c.shape[0] if abs(total) < 1e-6 else c / total
    c = c.view(-1, *([1] * (tvs.dim() - 1)))
    ce = c * erase
    return (tvs * ce).sum(dim=0) / torch.sum(ce, dim=0).clamp(min=1e-6)


__all__ = ["sce_merge", "sce_select_mask"]
