"""TSV-M: task singular vectors, merged after decorrelating the stacked bases.

Per task, keep the top-k singular triplets of τ_t (k = floor(min(d_out, d_in) / T)), then
concatenate U_cat = [U_1 .. U_T], S_cat, V_cat = [V_1 .. V_T] and replace both bases by their
polar factors:  ΔW = polar(U_cat) · diag(S_cat) · polar(V_cat)^T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from esm_ray.core.arithmetic import is_zero
from esm_ray.core.linalg import polar, truncated_svd


def tsv_rank(shape: tuple[int, int], n_tasks: int) -> int:
    """Per-task rank k = max(1, floor(min(d_out, d_in) / T))."""
    return max(1, min(shape) // max(n_tasks, 1))


def tsv_truncate(delta: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets of one task vector.

    delta: (d_out, d_in) -> U (d_out, k), S (k,), Vh (k, d_in)
    """
    return truncated_svd(delta, k)


def task_triplets(delta: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """One task vector's top-k triplets without the numerically null ones, computed in float64.

    delta comes from float32 weights, so directions below float32 resolution are noise and are
    dropped (`drop_null_triplets`); a zero matrix (a tensor a LoRA adapter leaves untouched)
    gives none, without an SVD.
    delta: (d_out, d_in) -> U (d_out, k'), S (k',), Vh (k', d_in), k' <= k, delta's dtype or float64
    """
    if is_zero(delta):
        return delta.new_zeros(delta.shape[0], 0), delta.new_zeros(0), delta.new_zeros(0, delta.shape[1])
    return drop_null_triplets(*tsv_truncate(delta.double(), k), resolution=torch.float32)


def tsvm_fuse(us: list[Tensor], ss: list[Tensor], vhs: list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Merge per-task triplets: polar(U_cat) diag(S_cat) polar(V_cat)^T, in `dtype` (default: the inputs').

    us[t]: (d_out, k_t), ss[t]: (k_t,), vhs[t]: (k_t, d_in) -> (d_out, d_in)
    """
    b, a = tsvm_factors(us, ss, vhs, dtype)
    return b @ a


def tsvm_factors(us: list[Tensor], ss: list[Tensor], vhs: list[Tensor],
                 dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """tsvm_fuse kept factored: (polar(U_cat) diag(S_cat) (d_out, Σk), polar(V_cat)ᵀ (Σk, d_in)).

    The stacked factors are cast to `dtype` once stacked (the same values as casting each
    part first, without holding the cast parts beside the stack: on a 32000-row vocabulary
    matrix with Σk = 2048 that is 524 MB less in float64)."""
    u_cat = torch.cat(us, dim=1)
    s_cat = torch.cat(ss)
    v_cat = torch.cat([vh.T for vh in vhs], dim=1)
    if dtype is not None:
        u_cat, s_cat, v_cat = u_cat.to(dtype), s_cat.to(dtype), v_cat.to(dtype)
    pu, _ = polar(u_cat)
    del u_cat
    pv, _ = polar(v_cat)
    return pu * s_cat, pv.T


def drop_null_triplets(u: Tensor, s: Tensor, vh: Tensor, rtol: float | None = None,
                       resolution: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Drop the triplets whose singular value is numerically zero (s_i <= rtol · s_max).

    Their singular vectors are arbitrary, and inside tsvm_fuse they would still take part in
    the polar factors of the other tasks. rtol defaults to max(d_out, d_in) · eps(resolution),
    the matrix-rank tolerance, with resolution the dtype the matrix was known to (default s's).
    A zero matrix keeps no triplet.
    u (d_out, k), s (k,), vh (k, d_in) -> the same with k' <= k columns / rows
    """
    if s.numel() == 0:
        return u, s, vh
    if rtol is None:
        rtol = max(u.shape[0], vh.shape[1]) * torch.finfo(resolution or s.dtype).eps
    keep = int((s > rtol * s.max()).sum()) if float(s.max()) > 0 else 0
    return u[:, :keep], s[:keep], vh[:keep, :]
