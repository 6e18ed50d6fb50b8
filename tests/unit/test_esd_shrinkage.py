"""Gram shrinkage before ESD: the OAS intensity against scikit-learn, and the two ends of β."""

from __future__ import annotations

import pytest
import torch

from esm_ray.core.esd import esd_from_gram, oas_shrinkage, shrink_gram


def _rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.1, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales + 0.3


@pytest.mark.parametrize("n,d", [(12, 40), (200, 40), (5000, 16)])
def test_oas_intensity_equals_scikit_learn(n, d):
    cov = pytest.importorskip("sklearn.covariance")
    x = _rows(n, d)
    ref = cov.OAS(assume_centered=True).fit(x.numpy()).shrinkage_
    assert oas_shrinkage(x.T @ x, n) == pytest.approx(float(ref), rel=1e-10, abs=1e-12)


def test_oas_is_large_for_few_rows_and_small_for_many():
    few, many = _rows(10, 64), _rows(20000, 64)
    assert oas_shrinkage(few.T @ few, 10) > 0.5
    assert oas_shrinkage(many.T @ many, 20000) < 0.05


def test_shrink_gram_keeps_energy_and_ends():
    x = _rows(30, 20)
    g = x.T @ x
    assert torch.equal(shrink_gram(g, 0.0), g)
    half = shrink_gram(g, 0.5)
    assert torch.trace(half) == pytest.approx(float(torch.trace(g)), rel=1e-12)
    iso = shrink_gram(g, 1.0)
    assert torch.allclose(iso, torch.eye(20, dtype=torch.float64) * torch.trace(g) / 20, rtol=0, atol=1e-9)
    with pytest.raises(ValueError):
        shrink_gram(g, 1.5)


def test_full_shrinkage_gives_the_top_singular_directions_of_the_update():
    """β = 1: ESD of ΔW is its truncated SVD (the TSV truncation), whatever the rows were."""
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(24, 20, generator=g, dtype=torch.float64)
    x = _rows(5, 20)  # 5 rows: the raw Gram has rank 5
    raw = esd_from_gram(delta, x.T @ x, 5, k=8)
    assert raw.rank == 5  # capped by the span of the rows
    shrunk = esd_from_gram(delta, shrink_gram(x.T @ x, 1.0), 24, k=8)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    assert shrunk.rank == 8
    assert torch.allclose(shrunk.reconstruct(), (u[:, :8] * s[:8]) @ vh[:8], atol=1e-10)
