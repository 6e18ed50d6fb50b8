"""core.rescale: the output-shift least-squares factor against a direct least-squares fit."""

from __future__ import annotations

import pytest
import torch

from esm_ray.core.layerstats import LayerStats
from esm_ray.core.rescale import least_squares_factor, shift_products


def _direct(merged: torch.Tensor, taus: list[torch.Tensor], xs: list[torch.Tensor]) -> float:
    """argmin_c Σ_t ‖(c M − τ_t) X_tᵀ‖² / n_t by a one-column least-squares solve on the stacked outputs."""
    a = torch.cat([(merged @ x.T).reshape(-1) / x.shape[0] ** 0.5 for x in xs])
    b = torch.cat([(t @ x.T).reshape(-1) / x.shape[0] ** 0.5 for t, x in zip(taus, xs)])
    return float(torch.linalg.lstsq(a[:, None], b[:, None]).solution)


def test_factor_is_the_least_squares_fit_of_the_output_shifts():
    g = torch.Generator().manual_seed(0)
    d_out, d_in = 6, 10
    taus = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(3)]
    xs = [torch.randn(n, d_in, generator=g, dtype=torch.float64) * (1 + i) for i, n in enumerate((4, 25, 40))]
    merged = sum(taus) * 0.7 + 0.1 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    # rows held (n < d_in: the thin route) or the Gram (n ≥ d_in), as calibration keeps them
    stats = [LayerStats(x.shape[0], x.sum(0), rows=x.float()) if x.shape[0] < d_in else LayerStats.from_rows(x)
             for x in xs]
    xs32 = [x.float().double() for x in xs]  # the rows as calibration holds them (float32)
    want = _direct(merged, taus, xs32)
    c = least_squares_factor([shift_products(merged, t, s, torch.float64) for t, s in zip(taus, stats)])
    assert abs(c - want) < 1e-10 * abs(want)
    c32 = least_squares_factor([shift_products(merged, t, s) for t, s in zip(taus, stats)])  # the default
    assert abs(c32 - want) < 1e-5 * abs(want)


def test_one_task_recovers_the_scale_of_its_own_update():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(5, 8, generator=g, dtype=torch.float64)
    s = LayerStats.from_rows(torch.randn(30, 8, generator=g, dtype=torch.float64))
    assert abs(least_squares_factor([shift_products(4.0 * tau, tau, s, torch.float64)]) - 0.25) < 1e-12


def test_an_update_that_moves_no_output_keeps_factor_one():
    s = LayerStats.from_rows(torch.randn(12, 4, dtype=torch.float64))
    tau = torch.randn(3, 4, dtype=torch.float64)
    assert least_squares_factor([shift_products(torch.zeros(3, 4), tau, s)]) == 1.0
    assert least_squares_factor([]) == 1.0


def test_thin_form_and_factored_task_give_the_dense_products():
    """M of rank 6 as Q P (core.rescale.thin) and τ as LoRA factors: the products of the dense
    M and τ, through the rows and through the Gram; a full-rank M is not thinned."""
    from esm_ray.core.rescale import thin

    g = torch.Generator().manual_seed(2)
    d_out, d_in = 40, 30
    m = torch.randn(d_out, 6, generator=g) @ torch.randn(6, d_in, generator=g)
    b, a = torch.randn(d_out, 4, generator=g), torch.randn(4, d_in, generator=g)
    tau = b @ a
    t = thin(m, 8)
    assert t is not None and t.q.shape == (d_out, 8)
    assert thin(torch.randn(d_out, d_in, generator=g), 8) is None
    x = torch.randn(25, d_in, generator=g)
    for s in (LayerStats(25, x.double().sum(0), rows=x), LayerStats.from_rows(x.double())):
        want = shift_products(m.double(), tau.double(), s, torch.float64)
        for got in (shift_products(t, tau, s), shift_products(m, (b, a), s), shift_products(t, (b, a), s)):
            assert got == pytest.approx(want, rel=1e-5)
