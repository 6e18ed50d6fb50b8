"""TSV-M: task singular vectors, merged after decorrelating the stacked bases.

Per task, keep the top-k singular triplets of τ_t (k = floor(min(d_out, d_in) / T)), then
concatenate U_cat = [U_1 .. U_T], S_cat, V_cat = [V_1 .. V_T] and replace both bases by their
polar factors:  ΔW = polar(U_cat) · diag(S_cat) · polar(V_cat)^T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from esm_ray.core.arithmetic import is_zero
from esm_ray.core.linalg import polar, polar_core, truncated_svd
from esm_ray.core.rowblocks import StackedRows, TaskRows


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


def task_triplets_rows(tv: TaskRows, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """`task_triplets` of a task vector read in row blocks, never whole in float64.

    For a tall τ (p ≥ q): τᵀτ = W diag(s²) Wᵀ summed block by block, then U = τ W diag(1/s)
    block by block, for the top k that `drop_null_triplets` keeps. Those have s_i / s_max above
    ρ = max(p, q) · eps(float32), and the float64 Gram gives s_i² to about q · eps(float64) / ρ²
    relative (4e-10 · q on a 32000-row matrix): the same triplets as the thin SVD up to
    round-off and each pair's sign. A wide τ (p < q) is decomposed whole (`task_triplets`).
    -> U (p, k'), S (k',), Vh (k', q) float64, k' ≤ k
    """
    p, q = tv.shape
    k = max(0, min(k, p, q))
    if q > p:
        return task_triplets(tv.dense(), k)
    evals, evecs = torch.linalg.eigh(tv.gram())
    s = evals.flip(0)[:k].clamp_min(0).sqrt()
    keep = null_cut(s, max(p, q), torch.float32)
    s, w = s[:keep], evecs.flip(1)[:, :keep]
    u = tv.times(w)
    u /= s
    return u, s, w.T.contiguous()


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


def tsvm_fuse_rows(us: list[Tensor], ss: list[Tensor], vhs: list[Tensor], scale: float = 1.0,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """scale · `tsvm_fuse` of a tall update (d_out ≥ Σk, e.g. a vocabulary matrix) by row blocks,
    without its (d_out, Σk) stacked basis or a (d_out, d_in) matrix in float64.

    polar(U_cat) = U_cat · K with K = W diag(1/σ) Wᵀ from the eigh of U_catᵀ U_cat (summed over
    row blocks; `linalg.polar_core`, the Gram route of `polar_gram`: about eps · κ(U_cat)² from
    the SVD's polar factor), so ΔW = U_cat · (K diag(S) polar(V_cat)ᵀ), one row block at a time,
    stored in `dtype`. A wide U_cat (d_out < Σk) goes through `tsvm_fuse`.

    us[t]: (d_out, k_t), ss[t]: (k_t,), vhs[t]: (k_t, d_in) -> (d_out, d_in) in `dtype`
    """
    u = StackedRows.of(us)
    d_out, width = u.shape
    if width > d_out:
        out = tsvm_fuse(us, ss, vhs, torch.float64)
        out *= scale
        return out.to(dtype)
    core, _ = polar_core(u.gram(), d_out)
    pv, _ = polar(torch.cat([vh.T for vh in vhs], dim=1).to(torch.float64))
    return u.times(core @ (torch.cat(ss).to(torch.float64)[:, None] * pv.T), scale, dtype)


def drop_null_triplets(u: Tensor, s: Tensor, vh: Tensor, rtol: float | None = None,
                       resolution: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Drop the triplets whose singular value is numerically zero (s_i <= rtol · s_max).

    Their singular vectors are arbitrary, and inside tsvm_fuse they would still take part in
    the polar factors of the other tasks. rtol defaults to max(d_out, d_in) · eps(resolution),
    the matrix-rank tolerance, with resolution the dtype the matrix was known to (default s's).
    A zero matrix keeps no triplet.
    u (d_out, k), s (k,), vh (k, d_in) -> the same with k' <= k columns / rows
    """
    keep = null_cut(s, max(u.shape[0], vh.shape[1]), resolution, rtol)
    return u[:, :keep], s[:keep], vh[:keep, :]


def null_cut(s: Tensor, size: int, resolution: torch.dtype | None = None, rtol: float | None = None) -> int:
    """How many of the descending singular values s are not numerically zero: s_i > rtol · s_max,
    rtol defaulting to size · eps(resolution or s's dtype) (`drop_null_triplets`). (k,) -> int"""
    if s.numel() == 0:
        return 0
    if rtol is None:
        rtol = size * torch.finfo(resolution or s.dtype).eps
    return int((s > rtol * s.max()).sum()) if float(s.max()) > 0 else 0
