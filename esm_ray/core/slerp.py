"""Spherical interpolation of weights: SLERP between two tensors, NuSLERP (weighted, per row or
flattened) and Multi-SLERP (a barycentre of T tensors on the sphere), as mergekit 0.1.5 does.

Each function takes float32 (or float64) tensors and returns a tensor of the same shape; the
arithmetic follows mergekit's operation by operation, so float32 results are equal bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

_SLERP_CHUNK = 1 << 20  # elements per chunk of slerp's norm and dot passes (mergekit: 1024 * 1024)


def _work(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """SLERP of two whole tensors (each flattened to one vector) at fraction t from v0 to v1.

        u0 = v0 / |v0|, u1 = v1 / |v1|  (a norm ≤ eps counts as 1),  d = clamp(u0 · u1, -1, 1)
        θ = arccos d
        result = sin((1 − t) θ) / sin θ · v0 + sin(t θ) / sin θ · v1
    and the straight line (1 − t) v0 + t v1 where |d| > dot_threshold (nearly collinear).

    The norms are norms of 2^20-element chunk norms and the dot a sum of chunk dots, as in
    mergekit, so large tensors give its bytes too. The coefficients are float32 scalars (float64
    for float64 inputs), t included. v0, v1: shape S -> S.
    """
    if v0.shape != v1.shape:
        raise ValueError(f"slerp: shapes differ: {tuple(v0.shape)} vs {tuple(v1.shape)}")
    dtype = _work(v0)
    a = v0.reshape(1, -1).to(dtype)
    b = v1.reshape(1, -1).to(dtype)
    starts = range(0, a.shape[1], _SLERP_CHUNK)
    c0, c1 = slerp_coefficients(t, lambda: ((a[:, s:s + _SLERP_CHUNK], b[:, s:s + _SLERP_CHUNK]) for s in starts),
                                dtype, dot_threshold, eps)
    out = torch.empty_like(a)
    for s in starts:  # c0 · a + c1 · b, into the output
        torch.mul(a[:, s:s + _SLERP_CHUNK], c0, out=out[:, s:s + _SLERP_CHUNK]).add_(c1 * b[:, s:s + _SLERP_CHUNK])
    return out.reshape(v0.shape)


def slerp_coefficients(t: float, chunks: Callable[[], Iterable[tuple[Tensor, Tensor]]],
                       dtype: torch.dtype = torch.float32, dot_threshold: float = 0.9995,
                       eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """(c0, c1), (1, 1) tensors of `dtype`, with slerp(t, v0, v1) = c0 · v0 + c1 · v1 entry by
    entry, from the two vectors' 2^20-element chunks in order: `chunks()` yields (v0 chunk,
    v1 chunk) pairs (any shapes, `_SLERP_CHUNK` entries each but the last) and is called twice
    (the norms, then the dot of the normalised chunks). No chunks (empty tensors): the line."""
    tt = torch.tensor([[t]], dtype=dtype)
    norms_a, norms_b = [], []
    for a, b in chunks():
        norms_a.append(torch.linalg.vector_norm(a.reshape(1, -1), dim=1, keepdim=True))
        norms_b.append(torch.linalg.vector_norm(b.reshape(1, -1), dim=1, keepdim=True))
    if not norms_a:
        return 1 - tt, tt
    na = torch.linalg.vector_norm(torch.stack(norms_a), dim=0)
    nb = torch.linalg.vector_norm(torch.stack(norms_b), dim=0)
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    dot = torch.stack([(a.reshape(1, -1) / na).mul_(b.reshape(1, -1) / nb).sum(dim=1, keepdim=True)
                       for a, b in chunks()]).sum(dim=0).clamp(-1, 1)
    straight = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(straight, 0, dot))
    sin_theta = torch.sin(theta)
    c0 = torch.where(straight, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    c1 = torch.where(straight, tt, torch.sin(tt * theta) / sin_theta)
    return c0, c1


def nuslerp_fraction(w0: float, w1: float) -> float:
    """NuSLERP's t from the two weights: w1 / (w0 + w1), or 0.5 when |w0 + w1| < 1e-6."""
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def nuslerp(t: float, v0: Tensor, v1: Tensor, flatten: bool = True, row_wise: bool = False,
            eps: float = 1e-8) -> Tensor:
    """NuSLERP: SLERP of v0 and v1 at fraction t along vectors of the tensor.

    flatten: the whole tensor is one vector. Else the vectors lie along the last dimension
    (rows of a matrix), or along the first with row_wise (columns of a matrix; mergekit's name).
    Per vector: u = v / max(|v|, 1e-7), c = clamp(u0 · u1, -1, 1), θ = arccos c,
        result = (sin((1 − t) θ) v0 + sin(t θ) v1) / sin θ,
    and (1 − t) v0 + t v1 where 1 − c² ≤ eps² (collinear). t is a Python float.
    v0, v1: shape S -> S.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(collinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def multislerp(vectors: Sequence[Tensor], weights: Sequence[float], normalize_weights: bool = True,
               eps: float = 1e-8) -> Tensor:
    """Multi-SLERP: a weighted barycentre of T tensors on the unit sphere, rescaled.

    Each tensor is one flattened vector v_i with norm n_i and direction u_i = v_i / (n_i + eps).
    With w normalised to sum 1 (normalize_weights):
        m = Σ w_i u_i / |Σ w_i u_i|                          (the tangent point)
        g = Σ w_i (u_i − (u_i · m) m),  ρ = |g| + eps         (mean tangent vector)
        result = (Σ w_i n_i) · (cos ρ · m + sin ρ / ρ · g)     (exponential map, rescaled)
    One tensor is returned unchanged. When every v_i is zero (a tensor no expert changed, e.g.
    frozen embeddings) the result is zero, the limit of the formula (Σ w_i n_i = 0). Otherwise,
    when |Σ w_i u_i| < eps, two tensors give the straight line w_0 v_0 + w_1 v_1 and more raise
    ValueError (antipodal inputs that cancel).
    vectors: T tensors of shape S -> S.
    """
    if len(vectors) != len(weights):
        raise ValueError(f"multislerp: {len(weights)} weights for {len(vectors)} tensors")
    if len(vectors) == 1:
        return vectors[0]
    stacked = torch.stack(list(vectors), dim=0)
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    if not bool(norms.any()):
        return torch.zeros_like(stacked[0])
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:
            return (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        raise ValueError("multislerp: the weighted directions cancel (antipodal inputs with balancing "
                         "weights); choose other weights")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    g = (tangents * w.view(-1, 1)).sum(0)
    rho = torch.norm(g) + eps
    out = mean * torch.cos(rho) + g * (torch.sin(rho) / rho)
    out = out * (norms.squeeze(-1) * w).sum()
    return out.view(stacked.shape[1:])


__all__ = ["multislerp", "nuslerp", "nuslerp_fraction", "slerp", "slerp_coefficients"]
