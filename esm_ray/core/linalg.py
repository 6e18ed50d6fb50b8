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


GRAM_TOPK_SHARE = 4  # the Gram route serves k ≤ min(p, q) / GRAM_TOPK_SHARE


def truncated_svd(m: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets: U (p, k), S (k,), Vh (k, q).

    For a float64 m and k ≤ min(p, q) / 4 the triplets come from the Gram of the smaller
    side (`topk_svd_gram`: one GEMM and one eigh of size min(p, q), 5-10x cheaper than the thin
    SVD on a 576 x 1536 matrix); when its k-th eigenvalue is too small to trust there (a
    rank-deficient top-k, where the SVD's completion is arbitrary anyway) and otherwise, the thin
    SVD. Both give the same triplets up to round-off and the sign of each pair.
    """
    r = min(m.shape)
    k = max(0, min(k, r))
    if m.dtype == torch.float64 and 0 < k and GRAM_TOPK_SHARE * k <= r:
        out = topk_svd_gram(m, k)
        if out is not None:
            return out
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k], s[:k], vh[:k, :]


def topk_svd_gram(m: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Top-k singular triplets from the eigh of the smaller side's Gram, or None when the k-th
    squared singular value is below 1e3 · min(p, q) · eps · s_max² (the Gram cannot resolve it).

    For q ≤ p: MᵀM = V diag(s²) Vᵀ, U = M V diag(1/s); for q > p the same from the left. The
    Gram squares the condition number, so the test keeps only directions whose s²/s_max² is far
    above round-off; for those U and V agree with the SVD's to about eps · s_max² / (s_k · gap).

    m: (p, q) float64 -> U (p, k), S (k,), Vh (k, q), or None
    """
    p, q = m.shape
    right = q <= p
    g = m.T @ m if right else m @ m.T
    evals, evecs = torch.linalg.eigh(g)
    s2 = evals.flip(0)[:k]
    if not (s2[0] > 0) or s2[-1] <= 1e3 * min(p, q) * torch.finfo(m.dtype).eps * s2[0]:
        return None
    w = evecs.flip(1)[:, :k]
    s = s2.sqrt()
    if right:
        return (m @ w) / s, s, w.T.contiguous()
    return w.contiguous(), s, ((m.T @ w) / s).T.contiguous()


def polar_gram(m: Tensor) -> tuple[Tensor, Tensor]:
    """`polar` through the Gram matrix of the smaller side: one eigh of size min(p, q) and GEMMs.

    For q ≤ p, MᵀM = W diag(s²) Wᵀ and polar(M) = M W diag(1/s) Wᵀ (for q > p the same on M Mᵀ,
    from the left). An eigh of the (q, q) Gram costs a fraction of the thin SVD of the (p, q)
    matrix (3x to 4x on a 3072 x 2304 factor in float64). The Gram squares the condition number:
    directions whose squared singular value is below 10 · max(p, q) · eps · s_max² are dropped
    (they are round-off in the Gram), so for well-conditioned M this agrees with `polar` to about eps · κ(M)², and for a
    rank-deficient M it returns the partial isometry on its range (where the SVD picks arbitrary
    completions). The mean singular value counts min(p, q) values, as `polar`'s does.

    m: (p, q) -> ((p, q), scalar tensor)
    """
    p, q = m.shape
    left = q > p
    core, mean = polar_core(m @ m.T if left else m.T @ m, max(p, q))
    return (core @ m if left else m @ core), mean


def polar_core(g: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """From the Gram g of a factor's smaller side, the matrix that makes its polar factor, and
    the factor's mean singular value: for g = MᵀM = W diag(s²) Wᵀ, polar(M) = M · W diag(1/s) Wᵀ
    (`polar_gram`; for g = M Mᵀ the core multiplies from the left). Directions with s² below
    10 · size · eps · s_max² are dropped; size is the factor's longer side.

    g: (r, r) -> (core (r, r), scalar tensor)
    """
    w, v = torch.linalg.eigh(0.5 * (g + g.T))
    s = w.clamp_min(0).sqrt()
    top = w.max() if w.numel() else w.new_zeros(())
    keep = w > top * 10 * size * torch.finfo(g.dtype).eps
    vk = v[:, keep] / s[keep]
    return vk @ v[:, keep].T, s.mean()
