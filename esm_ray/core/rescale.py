"""The output-shift least-squares factor of a merged update (label-free, from calibration).

For one linear layer, merged update M (d_out, d_in), task t's update τ_t and the second moment
of its calibration inputs C_t = X_tᵀ X_t / n_t, the factor c that makes c·M reproduce every
task's output shift on its own inputs best,

    c* = argmin_c Σ_t ‖(c·M − τ_t) X_tᵀ‖² / n_t = Σ_t ⟨M C_t, τ_t⟩ / Σ_t ⟨M C_t, M⟩,

is the ratio of two sums, each term computed by one expert from its own statistics and update
(`shift_products`) and summed by the coordinator (`least_squares_factor`). ⟨A, B⟩ = Σ_ij A_ij B_ij.
"""

from __future__ import annotations

import torch
from torch import Tensor

from esm_ray.core.layerstats import LayerStats


def shift_products(merged: Tensor, task: Tensor, stats: LayerStats,
                   dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(⟨M C, τ⟩, ⟨M C, M⟩), C = XᵀX / n the layer's input second moment.

    merged, task: (d_out, d_in); stats over d_in-wide rows. Where the rows X are held (fewer
    than 2 · d_in of them, `stats.hooks`), G is never formed: ⟨M C, τ⟩ = ⟨M Xᵀ, τ Xᵀ⟩ / n
    (d_out · d_in · n multiply-adds, against n · d_in² to form G); else M G. The products run in
    `dtype` (float32 by default: a factor needs no more), the two sums in float64.
    """
    if stats.n == 0:
        return 0.0, 0.0
    m, t = merged.to(dtype), task.to(dtype)
    x = stats.factor()  # Xᵀ (d_in, n) where the rows are held
    if x is not None:
        x = x.to(dtype)
        mx = m @ x  # M Xᵀ (d_out, n)
        pairs = ((mx, t @ x), (mx, mx))
    else:
        mc = m @ stats.gram.to(dtype)  # M G
        pairs = ((mc, t), (mc, m))
    num, den = (float((a.to(torch.float64) * b.to(torch.float64)).sum()) / stats.n for a, b in pairs)
    return num, den


def least_squares_factor(products: list[tuple[float, float]]) -> float:
    """c* = Σ_t num_t / Σ_t den_t over the experts' `shift_products`; 1 where the merged update
    moves no expert's outputs (den = 0: a zero update, or no statistics)."""
    num = sum(p[0] for p in products)
    den = sum(p[1] for p in products)
    return num / den if den > 0 else 1.0
