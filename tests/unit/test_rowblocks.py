"""Decompositions of a task vector read in row blocks (core.rowblocks) against the dense routes."""

from __future__ import annotations

import pytest
import torch

from esm_ray.core import rowblocks
from esm_ray.core.esd import esd_from_gram, esd_from_task_rows, gram_factor
from esm_ray.core.rowblocks import TaskRows
from esm_ray.core.tsvm import task_triplets, task_triplets_rows


def _pair(p: int, q: int, rank: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, expert) float32 with expert − base = a rank-`rank` part plus `noise`, on a grid of
    2⁻¹⁶ (so the float32 difference TSV-M's dense route takes is exact too)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(p, q, generator=g)
    upd = torch.randn(p, rank, generator=g) @ torch.randn(rank, q, generator=g) / rank ** 0.5
    grid = 2.0 ** 16
    return (base * grid).round() / grid, ((base + upd + noise * torch.randn(p, q, generator=g)) * grid).round() / grid


def _dense(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    return expert.double() - base.double()


def test_products_equal_the_dense_ones_for_a_ragged_last_block():
    base, expert = _pair(37, 11, 4, 0.1, 0)
    tv, d = TaskRows(expert, base, rows=8), _dense(base, expert)
    w, e = torch.randn(11, 5, dtype=torch.float64), torch.randn(37, 3, dtype=torch.float64)
    assert [i for i, _ in tv.blocks()] == [0, 8, 16, 24, 32]
    assert torch.equal(tv.dense(), d)  # the float64 subtraction of float32 rows is exact
    assert torch.allclose(tv.gram(), d.T @ d, rtol=1e-13, atol=1e-12)
    assert torch.allclose(tv.times(w), d @ w, rtol=1e-13, atol=1e-12)
    assert torch.allclose(tv.rmatmul_t(e), e.T @ d, rtol=1e-13, atol=1e-12)
    assert tv.sq_norm() == pytest.approx(float(d.square().sum()), rel=1e-13)
    assert TaskRows.of(expert, base, block_bytes=8 * 11 * 3).rows == 3
    with pytest.raises(ValueError, match="shapes do not match"):
        TaskRows(expert, base[:, :5], rows=8)


@pytest.mark.parametrize("rank,k", [(64, 12), (3, 10), (40, 40)])
def test_tall_triplets_from_row_blocks_equal_the_dense_ones(monkeypatch, rank, k):
    base, expert = _pair(300, 48, rank, 1e-3 if rank > 3 else 0.0, rank)
    monkeypatch.setattr(TaskRows, "dense", lambda self: pytest.fail("the tall route formed τ whole"))
    u, s, vh = task_triplets_rows(TaskRows(expert, base, rows=64), k)
    u0, s0, vh0 = task_triplets(_dense(base, expert), k)
    assert s.shape == s0.shape  # the same null triplets dropped (rank 3: three kept of ten)
    assert torch.allclose(s, s0, rtol=1e-9, atol=0)
    assert torch.allclose((u * s) @ vh, (u0 * s0) @ vh0, rtol=0, atol=1e-9 * float(s0[0]))
    assert torch.allclose(u.T @ u, torch.eye(len(s), dtype=u.dtype), atol=1e-9)


def test_zero_and_wide_task_vectors():
    base, _ = _pair(100, 20, 2, 0.0, 1)
    u, s, vh = task_triplets_rows(TaskRows(base.clone(), base, rows=16), 5)
    assert (u.shape, s.shape, vh.shape) == ((100, 0), (0,), (0, 20))
    base, expert = _pair(20, 100, 6, 1e-3, 2)  # wide: decomposed whole
    u, s, vh = task_triplets_rows(TaskRows(expert, base, rows=16), 5)
    u0, s0, vh0 = task_triplets(_dense(base, expert), 5)
    assert torch.allclose((u * s) @ vh, (u0 * s0) @ vh0, atol=1e-12)


@pytest.mark.parametrize("n", [24, 400])  # thin factor (n < d_in) and a full one
def test_esd_by_row_blocks_equals_the_factor_route(monkeypatch, n):
    base, expert = _pair(256, 64, 16, 1e-2, n)
    x = torch.randn(n, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    gram = x.T @ x
    monkeypatch.setattr(TaskRows, "dense", lambda self: pytest.fail("the row route formed ΔW whole"))
    esd = esd_from_task_rows(TaskRows(expert, base, rows=40), gram, n, n_tasks=4)
    ref = esd_from_gram(_dense(base, expert), gram, n, n_tasks=4, route="factor", factor=gram_factor(gram, n))
    assert esd.rank == ref.rank == min(64, n)
    assert torch.allclose(esd.eigenvalues, ref.eigenvalues, rtol=1e-10, atol=0)
    assert torch.allclose(esd.reconstruct(), ref.reconstruct(), atol=1e-10)
    assert torch.allclose(esd.basis.T @ esd.basis, torch.eye(esd.rank, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("method", ["esm", "tsvm"])
def test_methods_merge_large_matrices_from_row_blocks(monkeypatch, method):
    """With the size threshold at zero, ESM (ESD factor route and TSV branch) and TSV-M prepare
    every matrix from row blocks; the merged tensors equal the dense route's to round-off."""
    from esm_ray.core.layerstats import LayerStats
    from esm_ray.methods.base import ExpertContext, TensorInfo
    from esm_ray.methods.registry import build_method

    tensors = {"up.weight": (96, 32, True), "emb.weight": (120, 24, False)}
    pairs = {name: [_pair(p, q, 8, 1e-2, 10 * i + len(name))[1] for i in range(3)] for name, (p, q, _) in tensors.items()}
    bases = {name: _pair(p, q, 8, 1e-2, len(name))[0] for name, (p, q, _) in tensors.items()}
    x = torch.randn(50, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def merged() -> dict[str, torch.Tensor]:
        m = build_method(method, {}, n_experts=3)
        out = {}
        for name, (p, q, calibrated) in tensors.items():
            calibrated = calibrated and method == "esm"
            info = TensorInfo.of(name, (p, q), module=name.rsplit(".", 1)[0] if calibrated else None)
            stats = LayerStats.from_rows(x) if calibrated else None
            ctxs = [ExpertContext(i, f"e{i}", stats=stats) for i in range(3)]
            parts = [m.prepare(info, bases[name], pairs[name][i], c) for i, c in enumerate(ctxs)]
            out[name] = m.fuse(info, bases[name], parts, ctxs)
        return out

    dense = merged()
    monkeypatch.setattr(rowblocks, "ROWS_MIN_BYTES", 0)
    monkeypatch.setattr(TaskRows, "dense", lambda self: pytest.fail("a tall matrix was decomposed whole"))
    rows = merged()
    for name in tensors:
        assert torch.allclose(rows[name], dense[name], rtol=0, atol=1e-6 * float(dense[name].abs().max())), name


def _triplets(p: int, q: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    base, expert = _pair(p, q, 2 * k, 1e-2, seed)
    return task_triplets(_dense(base, expert), k)


@pytest.mark.parametrize("p,q,k", [(400, 40, 10), (30, 40, 10)])  # tall, and wide (Σk > d_out: whole)
def test_tsvm_fuse_by_row_blocks_equals_tsvm_fuse(p, q, k):
    from esm_ray.core.tsvm import tsvm_fuse, tsvm_fuse_rows

    trip = [_triplets(p, q, k, s) for s in range(3)]
    us, ss, vhs = ([t[i].float() for t in trip] for i in range(3))
    ref = 0.5 * tsvm_fuse(us, ss, vhs, torch.float64)
    out = tsvm_fuse_rows(us, ss, vhs, scale=0.5, dtype=torch.float64)
    assert torch.allclose(out, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    assert tsvm_fuse_rows(us, ss, vhs).dtype == torch.float32


@pytest.mark.parametrize("preset,magnitude", [("roberta", "mean_singular"), ("vit", "mean_singular"),
                                              ("roberta", "energy")])
def test_esm_fuse_by_row_blocks_equals_the_gram_route(preset, magnitude):
    import dataclasses

    from esm_ray.core.esm import PRESETS, esm_fuse, esm_fuse_rows

    recipe = dataclasses.replace(PRESETS[preset], magnitude=magnitude)
    x = torch.randn(30, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    parts, norms = [], []
    for t in range(3):
        base, expert = _pair(500, 40, 12, 1e-2, 20 + t)
        parts.append(esd_from_gram(_dense(base, expert), x.T @ x, 30, n_tasks=3).to(torch.float32))
        norms.append(float(_dense(base, expert).norm()))
    ref = 2.0 * esm_fuse(parts, recipe, norms, torch.float64, "gram")
    out = esm_fuse_rows(parts, recipe, norms, scale=2.0, dtype=torch.float64)
    assert torch.allclose(out, ref, rtol=0, atol=1e-9 * float(ref.abs().max()))
