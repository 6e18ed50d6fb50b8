"""RegMean (Jin et al. 2023): the closed-form least-squares merge of a linear layer.

For nn.Linear weights W_i (d_out, d_in) and the Grams of their inputs G_i = X_iᵀX_i (d_in, d_in),
RegMean takes the W minimising Σ_i ||X_i W_iᵀ − X_i Wᵀ||², i.e.

    W* = (Σ_i W_i G̃_i) (Σ_i G̃_i)⁻¹,   G̃_i = α G_i + (1 − α) diag(G_i),

where α scales the off-diagonal entries (α = 1: the exact least squares; α < 1 pulls towards
the per-feature average, and regularises a near-singular Σ G̃_i). Everything is float64; the
inverse is never formed (one symmetric solve).

Written in task vectors, W* − W_0 = (Σ_i τ_i G̃_i)(Σ_i G̃_i)⁻¹ with τ_i = W_i − W_0 (the same
number, without the cancellation of subtracting W_0 from a merged weight afterwards).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """G̃ = α G + (1 − α) diag(G): off-diagonal entries times α, the diagonal kept.

    FusionBench's `reduce_non_diagonal_ratio` is this α. gram: (d, d) -> (d, d), same dtype.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_terms(weight: Tensor, gram: Tensor, alpha: float, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """One expert's share of the normal equations: (s · W G̃, s · G̃), float64.

    weight: (d_out, d_in) (a weight or a task vector), gram: (d_in, d_in) the Gram of the
    layer's inputs (already divided by the row count where wanted), s: the expert's weight.
    """
    if weight.ndim != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and Gram {tuple(gram.shape)} do not fit: "
                         f"the Gram must be (d_in, d_in) of the weight's second dimension")
    g = reduce_off_diagonal(gram.to(torch.float64), alpha)
    if scale != 1.0:
        g = g * scale
    return weight.to(torch.float64) @ g, g


def regmean_solve(wg_sum: Tensor, g_sum: Tensor) -> tuple[Tensor, bool]:
    """W = (Σ W_i G̃_i)(Σ G̃_i)⁻¹ by one solve of the symmetric system, float64.

    Returns (W (d_out, d_in), exact): where Σ G̃_i is singular (a feature no calibration row ever
    touches, α = 1 with fewer rows than d_in), the minimum-norm least-squares solution instead,
    and exact=False.
    """
    a = g_sum.to(torch.float64)
    b = wg_sum.to(torch.float64).T  # G X = (W G)ᵀ  ⇔  X = Wᵀ, G symmetric
    x, info = torch.linalg.solve_ex(a, b)
    if int(info) == 0 and bool(torch.isfinite(x).all()):
        return x.T.contiguous(), True
    x = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return x.T.contiguous(), False


def regmean(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 0.9,
            scales: Iterable[float] | None = None) -> Tensor:
    """The RegMean weight from all experts at once: (Σ s_i W_i G̃_i)(Σ s_i G̃_i)⁻¹, float64.

    weights: T tensors (d_out, d_in); grams: T tensors (d_in, d_in); scales: per-expert
    factors s_i (default 1). The streaming executors use `regmean_terms` and `regmean_solve`.
    """
    if len(weights) != len(grams) or not weights:
        raise ValueError(f"got {len(weights)} weights and {len(grams)} Grams")
    ss = [1.0] * len(weights) if scales is None else list(scales)
    wg_sum: Tensor | None = None
    g_sum: Tensor | None = None
    for w, g, s in zip(weights, grams, ss):
        wg, gt = regmean_terms(w, g, alpha, s)
        wg_sum = wg if wg_sum is None else wg_sum + wg
        g_sum = gt if g_sum is None else g_sum + gt
    assert wg_sum is not None and g_sum is not None
    return regmean_solve(wg_sum, g_sum)[0]
