"""`core.linalg.truncated_svd`'s Gram route for small k against the thin SVD."""

from __future__ import annotations

import torch

from esm_ray.core.linalg import topk_svd_gram, truncated_svd


def _lowrank(p: int, q: int, r: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, r, generator=g, dtype=torch.float64) @ torch.randn(r, q, generator=g, dtype=torch.float64)
    return a / r ** 0.5 + noise * torch.randn(p, q, generator=g, dtype=torch.float64)


def test_gram_route_gives_the_svds_top_k_triplets_on_both_orientations():
    for p, q in ((96, 200), (200, 96), (64, 64)):
        m = _lowrank(p, q, 24, 1e-3, p + q)
        k = min(p, q) // 4
        u, s, vh = truncated_svd(m, k)
        assert topk_svd_gram(m, k) is not None  # the route under test was taken
        u0, s0, vh0 = torch.linalg.svd(m, full_matrices=False)
        assert torch.allclose(s, s0[:k], rtol=1e-12, atol=0)
        assert torch.allclose((u * s) @ vh, (u0[:, :k] * s0[:k]) @ vh0[:k], rtol=0, atol=1e-12 * float(s0[0]))
        assert torch.allclose(u.T @ u, torch.eye(k, dtype=m.dtype), atol=1e-12)
        assert torch.allclose(vh @ vh.T, torch.eye(k, dtype=m.dtype), atol=1e-12)
        # each singular pair equals the SVD's up to a common sign
        sign = torch.sign((u * u0[:, :k]).sum(0))
        assert torch.allclose(u * sign, u0[:, :k], atol=1e-9) and torch.allclose(vh * sign[:, None], vh0[:k], atol=1e-9)


def test_rank_deficient_top_k_falls_back_to_the_svd():
    m = _lowrank(120, 80, 5, 0.0, 1)  # rank 5 < k = 20: the Gram cannot tell the rest apart
    assert topk_svd_gram(m, 20) is None
    u, s, vh = truncated_svd(m, 20)
    assert u.shape == (120, 20) and vh.shape == (20, 80)
    assert torch.allclose(u.T @ u, torch.eye(20, dtype=m.dtype), atol=1e-10)  # orthonormal completion kept
    assert float(s[5:].max()) < 1e-10 * float(s[0])


def test_float32_and_large_k_use_the_svd():
    m = _lowrank(64, 48, 8, 1e-3, 2)
    u, s, vh = truncated_svd(m.float(), 4)
    u0, s0, vh0 = torch.linalg.svd(m.float(), full_matrices=False)
    assert torch.equal(s, s0[:4]) and torch.equal(u, u0[:, :4])
    u, s, vh = truncated_svd(m, 40)  # k > min/4
    u0, s0, vh0 = torch.linalg.svd(m, full_matrices=False)
    assert torch.equal(s, s0[:40]) and torch.equal(vh, vh0[:40])
