"""core.lora: the factored routes equal the dense computation on the densified updates (float64)."""

from __future__ import annotations

import pytest
import torch

from esm_ray.core.esd import esd_from_gram
from esm_ray.core.esm import PRESETS, esm_fuse
from esm_ray.core.lora import (LoraFactors, LowRank, concat, esd_from_factors, lora_svd, lowrank_of_dense,
                               svd_of_product, truncate)
from esm_ray.core.tsvm import drop_null_triplets, tsv_rank, tsv_truncate, tsvm_fuse

D_OUT, D_IN = 24, 20
RANKS = (2, 3, 4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _loras(seed: int = 0) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return [LoraFactors(torch.randn(D_OUT, r, generator=g, dtype=torch.float64),
                        torch.randn(r, D_IN, generator=g, dtype=torch.float64), 1.5 / (i + 1))
            for i, r in enumerate(RANKS)]


def test_concat_is_the_weighted_sum_of_updates():
    loras, w = _loras(), [0.5, 1.0, -0.25]
    low = concat(loras, w)
    assert low.rank == sum(RANKS)
    want = sum(wi * f.dense(torch.float64) for f, wi in zip(loras, w))
    assert _rel(low.dense(torch.float64), want) < 1e-12
    assert abs(low.norm() - float(want.norm())) < 1e-10 * float(want.norm())


def test_svd_of_product_matches_the_dense_svd():
    f = _loras()[2]
    u, s, vh = svd_of_product(f.b * f.scale, f.a)
    dense_s = torch.linalg.svdvals(f.dense(torch.float64))
    assert torch.allclose(s, dense_s[: s.numel()], rtol=1e-12, atol=0)
    assert _rel((u * s) @ vh, f.dense(torch.float64)) < 1e-12


def test_factored_tsvm_equals_dense_tsvm():
    loras = _loras(1)
    k = tsv_rank((D_OUT, D_IN), len(loras))
    dense_parts = [drop_null_triplets(*tsv_truncate(f.dense(torch.float64), k)) for f in loras]
    lora_parts = [lora_svd(f, k) for f in loras]
    for (u1, s1, _), (u2, s2, _) in zip(dense_parts, lora_parts):
        assert s1.shape == s2.shape
    want = tsvm_fuse(*[list(x) for x in zip(*dense_parts)])
    got = tsvm_fuse(*[list(x) for x in zip(*lora_parts)])
    assert _rel(got, want) < 1e-8


def test_factored_esd_and_esm_equal_the_dense_route():
    loras = _loras(2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, D_IN, generator=g, dtype=torch.float64)
    gram = x.T @ x
    dense = [esd_from_gram(f.dense(torch.float64), gram, 40, n_tasks=3) for f in loras]
    fact = [esd_from_factors(f, gram, 40, n_tasks=3) for f in loras]
    for a, b in zip(dense, fact):
        assert a.rank == b.rank
        assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-10)
        assert _rel(b.reconstruct(), a.reconstruct()) < 1e-10
    norms = [float(f.dense(torch.float64).norm()) for f in loras]
    for recipe in PRESETS.values():
        want = esm_fuse(dense, recipe, norms, route="svd")
        got = esm_fuse(fact, recipe, [f.lowrank().norm() for f in loras], route="svd")
        assert _rel(got, want) < 1e-8, recipe.name


@pytest.mark.parametrize("n", [7, 40])
def test_factored_esd_from_rows_equals_the_gram_route_without_forming_the_gram(n, monkeypatch):
    """With the rows X held instead of G (few rows on a wide input, float32 as calibration keeps
    them), esd_from_factors takes A G Aᵀ = (A Xᵀ)(A Xᵀ)ᵀ: the same ESD as from G = XᵀX in
    float64 (n = 7: fewer rows than the adapters' ranks allow, a rank-capped spectrum), with X
    upcast a few rows at a time (ROWS_CHUNK 3 here)."""
    from esm_ray.core import lora as lora_mod

    monkeypatch.setattr(lora_mod, "ROWS_CHUNK", 3)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, D_IN, generator=g).float() + 0.5
    gram = x.double().T @ x.double()
    for f in _loras(n):
        want = esd_from_factors(f, gram, n, n_tasks=3)
        got = esd_from_factors(f, None, n, n_tasks=3, rows=x)
        assert got.rank == want.rank
        assert torch.allclose(got.eigenvalues, want.eigenvalues, rtol=1e-10)
        assert _rel(got.reconstruct(), want.reconstruct()) < 1e-10
        dense = esd_from_gram(f.dense(torch.float64), gram, n, n_tasks=3)
        assert _rel(got.reconstruct(), dense.reconstruct()) < 1e-10
    with pytest.raises(ValueError, match="rows"):
        esd_from_factors(_loras()[0], None, n, rows=x[:, :5])


def test_truncate_keeps_the_best_rank_and_energy():
    low = concat(_loras(4), [1.0, 1.0, 1.0])
    s = torch.linalg.svdvals(low.dense(torch.float64))
    t = truncate(low, rank=3)
    assert t.rank == 3
    u, sv, vh = torch.linalg.svd(low.dense(torch.float64))
    assert _rel(t.dense(torch.float64), (u[:, :3] * sv[:3]) @ vh[:3]) < 1e-10
    e = truncate(low, energy=0.9)
    frac = torch.cumsum(s.square(), 0) / s.square().sum()
    assert e.rank == int((frac < 0.9 - 1e-12).sum()) + 1
    assert truncate(low).rank == sum(RANKS)  # numerical rank: exact
    assert lowrank_of_dense(low.dense(torch.float64)).rank == sum(RANKS)
    assert LowRank(torch.zeros(3, 0), torch.zeros(0, 2)).norm() == 0.0


def test_tsvm_skips_the_svd_of_an_untouched_tensor(monkeypatch):
    """A tensor no expert changes (a LoRA adapter's non-target, e.g. the embeddings) gives TSV-M
    no triplet without an SVD (which costs seconds on a vocabulary-sized matrix), and the merge
    of it and of a changed expert is what the SVD route gives."""
    import esm_ray.methods.tsvm as tsvm_mod
    from esm_ray.methods.base import ExpertContext, TensorInfo

    m = tsvm_mod.Tsvm(tsvm_mod.TsvmParams(), n_experts=2)
    info = TensorInfo.of("model.embed_tokens.weight", (12, 6))
    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 6, generator=g)
    changed = base + 0.1 * torch.randn(12, 6, generator=g)
    ctxs = [ExpertContext(0, "a"), ExpertContext(1, "b")]
    want = m.fuse(info, base, [m.prepare(info, base, base.clone(), ctxs[0]),
                               m.prepare(info, base, changed, ctxs[1])], ctxs)

    def no_svd(*a, **k):
        raise AssertionError("SVD of a zero task vector")
    import esm_ray.core.tsvm as core_tsvm

    monkeypatch.setattr(core_tsvm, "tsv_truncate", no_svd)  # where methods.tsvm's task_triplets calls it
    part = m.prepare(info, base, base.clone(), ctxs[0])
    assert part.u.shape == (12, 0) and part.s.shape == (0,) and part.vh.shape == (0, 6)
    monkeypatch.undo()
    got = m.fuse(info, base, [part, m.prepare(info, base, changed, ctxs[1])], ctxs)
    assert torch.equal(got, want)
