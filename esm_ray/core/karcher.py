"""The weighted Karcher (Fréchet) mean of tensors on the unit sphere, rescaled by their mean norm,
as mergekit 0.1.5's `karcher` computes it (float32 results equal bit for bit)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def karcher_mean(tensors: Sequence[Tensor], weights: Sequence[float] | None = None, max_iter: int = 10,
                 tol: float = 1e-5) -> Tensor:
    """Riemannian mean of the directions of T tensors, times the weighted mean of their norms.

    Each tensor is one flattened vector x_i with norm n_i and direction u_i = x_i / n_i (zero for
    a zero tensor). Tensors with n_i ≤ tol take no part in the direction; the others' weights
    a_i are renormalised to sum 1 (default weights: 1/T each). Starting from m = normalise(Σ a_i u_i)
    (u of the first when that sum nearly vanishes), up to max_iter times:
        θ_i = arccos clamp(m · u_i, -1, 1)
        g   = Σ_{θ_i ≥ tol} a_i θ_i / sin θ_i · (u_i − (m · u_i) m)      (log map, averaged)
        stop when |g| < tol, else m = normalise(cos|g| · m + sin|g| · g / |g|)   (exp map)
    Result: (Σ_i w_i n_i) · m with the original weights w_i (zero tensors included); a single
    tensor is returned unchanged and all-zero inputs give zeros.
    tensors: T tensors of shape S -> S.
    """
    xs = list(tensors)
    if not xs:
        raise ValueError("karcher_mean: need at least one tensor")
    if len(xs) == 1:
        return xs[0]
    alphas = [1.0 / len(xs)] * len(xs) if weights is None else [float(w) for w in weights]
    if len(alphas) != len(xs):
        raise ValueError(f"karcher_mean: {len(alphas)} weights for {len(xs)} tensors")
    dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in xs]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(xs, norms)]
    live = [i for i, n in enumerate(norms) if n.item() > tol]
    if not live:
        return sum(x * 0 for x in xs)  # type: ignore[return-value]
    live_sum = sum(alphas[i] for i in live)
    a = [alphas[i] / live_sum for i in live]
    u = [units[i] for i in live]
    m = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        m += ai * ui
    m_norm = torch.linalg.vector_norm(m.to(dtype))
    m = u[0].clone() if m_norm.item() < tol else (m / m_norm).to(m.dtype)
    for _ in range(max_iter):
        g = torch.zeros_like(m)
        for ai, ui in zip(a, u):
            c = torch.clamp(torch.dot(m.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(c)
            if theta.item() < tol:
                continue
            g += ai * (theta / torch.sin(theta)) * (ui - c * m)
        g_norm = torch.linalg.vector_norm(g.to(dtype))
        if g_norm.item() < tol:
            break
        m = (torch.cos(g_norm) * m + torch.sin(g_norm) * (g / g_norm)).to(m.dtype)
        n = torch.linalg.vector_norm(m.to(dtype))
        if n.item() > tol:
            m = (m / n).to(m.dtype)
    scale = sum(w * n for w, n in zip(alphas, norms))
    return scale * m


__all__ = ["karcher_mean"]
