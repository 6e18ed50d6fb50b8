"""The output-shift least-squares factor of a merged update (label-free, from calibration).

For one linear layer, merged update M (d_out, d_in), task t's update τ_t and the second moment
of its calibration inputs C_t = X_tᵀ X_t / n_t, the factor c that makes c·M reproduce every
task's output shift on its own inputs best,

    c* = argmin_c Σ_t ‖(c·M − τ_t) X_tᵀ‖² / n_t = Σ_t ⟨M C_t, τ_t⟩ / Σ_t ⟨M C_t, M⟩,

is the ratio of two sums, each term computed by one expert from its own statistics and update
(`shift_products`) and summed by the coordinator (`least_squares_factor`). ⟨A, B⟩ = Σ_ij A_ij B_ij.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from esm_ray.core.layerstats import LayerStats


@dataclass(frozen=True)
class Thin:
    """A merged update in thin form, M = Q P: Q (d_out, k) with orthonormal columns, P = QᵀM
    (k, d_in). Then ⟨M C, τ⟩ = ⟨P C, Qᵀτ⟩ and ⟨M C, M⟩ = ⟨P C, P⟩: the products cost k / d_out
    of M's."""

    q: Tensor
    p: Tensor

    def numel(self) -> int:
        return self.q.numel() + self.p.numel()


def thin(m: Tensor, k: int, tol: float = 1e-5, seed: int = 0) -> Thin | None:
    """M as Q P when its rank is below k, found by a seeded randomized range finder (Q from the
    QR of M Ω, Ω Gaussian (d_in, k)) and checked: None unless ‖M − Q QᵀM‖_F ≤ tol · ‖M‖_F and
    k < d_out / 2 (no gain otherwise). m: (d_out, d_in) float32, whose own rounding leaves
    about 1e-6 of its norm outside any low-rank subspace (hence the tolerance)."""
    d_out, d_in = m.shape
    if k >= d_out // 2 or k >= d_in:
        return None
    omega = torch.randn(d_in, k, generator=torch.Generator().manual_seed(seed), dtype=m.dtype)
    q = torch.linalg.qr(m @ omega).Q
    p = q.T @ m
    norm = float(torch.linalg.vector_norm(m))
    if float(torch.linalg.vector_norm(m - q @ p)) > tol * norm:
        return None
    return Thin(q.contiguous(), p.contiguous())


def shift_products(merged: Tensor | Thin, task: Tensor | tuple[Tensor, Tensor], stats: LayerStats,
                   dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(⟨M C, τ⟩, ⟨M C, M⟩), C = XᵀX / n the layer's input second moment.

    merged: M (d_out, d_in), or its `Thin` form; task: τ (d_out, d_in), or a LoRA update's
    (s·B (d_out, r), A (r, d_in)), never densified. Where the rows X are held (fewer than
    2 · d_in of them, `stats.hooks`), G is never formed: ⟨M C, τ⟩ = ⟨M Xᵀ, τ Xᵀ⟩ / n; else the
    products go through G. They run in `dtype` (float32 by default: a factor needs no more),
    the two sums in float64.
    """
    if stats.n == 0:
        return 0.0, 0.0
    # τ = tb · ta (ta None: τ = tb)
    tb, ta = (task[0].to(dtype), task[1].to(dtype)) if isinstance(task, tuple) else (task.to(dtype), None)
    if isinstance(merged, Thin):  # ⟨Q P C, τ⟩ = ⟨P C, Qᵀτ⟩
        m, tb = merged.p.to(dtype), merged.q.to(dtype).T @ tb
    else:
        m = merged.to(dtype)
    if stats.rows is not None:
        x = stats.rows.to(dtype)  # (n, d_in)
        mx = m @ x.T
        tx = tb @ (x.T if ta is None else ta @ x.T)
        pairs = ((mx, tx), (mx, mx))
    else:
        g = stats.gram.to(dtype)
        mg = m @ g
        pairs = ((mg, tb if ta is None else tb @ ta), (mg, m))
    num, den = (float((a.to(torch.float64) * b.to(torch.float64)).sum()) / stats.n for a, b in pairs)
    return num, den


def least_squares_factor(products: list[tuple[float, float]]) -> float:
    """c* = Σ_t num_t / Σ_t den_t over the experts' `shift_products`; 1 where the merged update
    moves no expert's outputs (den = 0: a zero update, or no statistics)."""
    num = sum(p[0] for p in products)
    den = sum(p[1] for p in products)
    return num / den if den > 0 else 1.0
