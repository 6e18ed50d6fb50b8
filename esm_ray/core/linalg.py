"""Small linear-algebra helpers shared by the subspace methods."""

from __future__ import annotations

import torch
from torch import Tensor


def polar(m: Tensor) -> tuple[Tensor, Tensor]:
    """Polar (Procrustes) factor of a matrix and its mean singular value.

    For the thin SVD m = A diag(s) B^T, returns (A B^T, mean(s)): the nearest partial
    isometry to m in Frobenius norm, and the scale the merge methods put back.

    m: (p, q) -> ((p, q), scalar tensor)
    """
    a, s, bt = torch.linalg.svd(m, full_matrices=False)
    return a @ bt, s.mean()


def truncated_svd(m: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets: U (p, k), S (k,), Vh (k, q)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = max(0, min(k, s.shape[0]))
    return u[:, :k], s[:k], vh[:k, :]
