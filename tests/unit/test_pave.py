"""PAVE against the oracles of the method notes (§5, items 12-16), and the purifier on the tiny
BERT with real calibration statistics."""

from __future__ import annotations

import math

import pytest
import torch

from esm_ray.core.layerstats import LayerStats
from esm_ray.core.pave import (allocate_ranks, collapse_ratios, damp, inverse_residual, pave_rank, purify_weight,
                               rank_floor)
from esm_ray.methods.base import ExpertContext, TensorInfo
from esm_ray.methods.pave import PAVE, PAVEParams

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _second_moment(n: int, d: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    x = (torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
         + 0.3) * scale
    return LayerStats.from_rows(x).second_moment()


# ---- purification ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_full_rank_returns_the_weight(mode):  # oracle 12
    g = _gen(1)
    w = torch.randn(10, 14, generator=g, dtype=F64)
    d = damp(_second_moment(40, 14, g), mode)
    out = purify_weight(w, d, rank=10)
    torch.testing.assert_close(out, w, rtol=1e-10, atol=1e-10)


def test_truncation_error_in_the_context_norm_is_the_spectral_tail():  # oracle 13
    g = _gen(2)
    w = torch.randn(12, 9, generator=g, dtype=F64)
    d = damp(_second_moment(30, 9, g))
    s = torch.linalg.svdvals(w @ d.c_reg)
    for r in (1, 4, 8):
        err = float(torch.linalg.matrix_norm((purify_weight(w, d, r) - w) @ d.c_reg))
        assert err == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-9)


def test_identity_context_is_plain_truncated_svd():  # oracle 14
    g = _gen(3)
    w = torch.randn(8, 11, generator=g, dtype=F64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for mode in ("relative", "absolute"):
        d = damp(torch.eye(11, dtype=F64), mode)
        for r in (1, 3, 8):
            torch.testing.assert_close(purify_weight(w, d, r), (u[:, :r] * s[:r]) @ vh[:r], rtol=1e-10, atol=1e-10)


def test_cholesky_solve_agrees_with_an_explicit_inverse():
    g = _gen(4)
    w = torch.randn(6, 10, generator=g, dtype=F64)
    d = damp(_second_moment(50, 10, g))
    u, s, vh = torch.linalg.svd(w @ d.c_reg, full_matrices=False)
    ref = ((u[:, :3] * s[:3]) @ vh[:3]) @ torch.linalg.inv(d.c_reg)
    torch.testing.assert_close(purify_weight(w, d, 3), ref, rtol=1e-9, atol=1e-9)


def test_damping_doubles_until_the_inverse_is_accurate():  # oracle 15
    g = _gen(5)
    # rank-deficient C with a huge scale: ε = 0.1 leaves C_reg numerically singular
    x = torch.randn(3, 12, generator=g, dtype=F64) * 1e9
    c = LayerStats.from_rows(x).second_moment()
    d = damp(c, "absolute", tol=0.05)
    j = math.log2(d.eps / 0.1)
    assert d.steps > 0 and j == pytest.approx(round(j), abs=1e-9) and round(j) == d.steps
    assert d.residual < 0.05
    assert inverse_residual(d.c_reg, d.chol) == pytest.approx(d.residual)
    first = c + 0.1 * torch.eye(12, dtype=F64)
    chol, info = torch.linalg.cholesky_ex(first)
    assert int(info) != 0 or inverse_residual(first, chol) >= 0.05  # the first ε really failed
    half = d.c_reg - 0.5 * d.eps * torch.eye(12, dtype=F64)  # nor did the ε before the last
    chol, info = torch.linalg.cholesky_ex(half)
    assert int(info) != 0 or inverse_residual(half, chol) >= 0.05
    # relative damping: ε = δ · mean(diag C), δ = 0.01 · 2^j, scale-free
    r = damp(c, "relative")
    assert r.residual < 0.05
    assert r.eps == pytest.approx(r.delta * float(torch.diagonal(c).mean()))
    jj = math.log2(r.delta / 0.01)
    assert jj == pytest.approx(round(jj), abs=1e-9)
    r2 = damp(c * 1e-6, "relative")
    assert r2.delta == r.delta  # the same relative damping at any activation scale
    # well-conditioned C: the first ε is accepted
    ok = damp(_second_moment(80, 12, g), "absolute")
    assert ok.steps == 0 and ok.eps == pytest.approx(0.1)


# ---- rank allocation --------------------------------------------------------------------------------

def _spectra(m: int, size: int, seed: int) -> list[torch.Tensor]:
    g = _gen(seed)
    out = []
    for i in range(m):
        s = torch.sort(torch.rand(size, generator=g, dtype=F64) ** (1 + 2 * i), descending=True).values
        out.append(s / s[0])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocation_stops_just_below_rho_and_respects_the_floor(seed):  # oracle 16
    size, m = 64, 4
    spectra = _spectra(m, size, seed)
    prev = None
    for rho in (0.99, 0.984375, 0.96875, 0.9, 0.875, 0.8):
        ranks = allocate_ranks(spectra, rho)
        kept = sum(ranks) / (m * size)
        assert rho - 1 / (m * size) <= kept < rho
        f = rank_floor(size, rho)
        assert all(r >= f for r in ranks)
        if prev is not None:  # lowering ρ never raises any r_m
            assert all(a <= b for a, b in zip(ranks, prev))
        prev = ranks


def test_flatter_spectrum_keeps_more_rank():
    size = 40
    steep = torch.linspace(1, 0, size, dtype=F64) ** 4
    flat = torch.linspace(1, 0.5, size, dtype=F64)
    r_steep, r_flat = allocate_ranks([steep, flat], 0.9)
    assert r_flat > r_steep
    assert allocate_ranks([flat, flat], 1.0) == [size, size]
    assert rank_floor(64, 0.875) == 64 - round(1.5 * 8) == 52


def test_collapse_to_one_ratio_per_model_and_rank_rule():
    ranks = [[60, 50], [30, 32]]  # layer 0 (R = 64), layer 1 (R = 32)
    q = collapse_ratios(ranks, [64, 32])
    assert q == pytest.approx([90 / 96, 82 / 96])
    assert pave_rank((768, 3072), 0.96875) == 744
    assert pave_rank((10, 10), 0.01) == 1


# ---- the purifier on the tiny BERT ------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_stats(tiny_bert):
    from transformers import AutoModel

    from esm_ray.spec import CalibrationSpec
    from esm_ray.stats.calibrate import calibrate

    g = _gen(6)
    rows = [{"input_ids": torch.randint(1, 90, (int(torch.randint(4, 16, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(8)]
    base = AutoModel.from_pretrained(str(tiny_bert["base"])).state_dict()
    experts = []
    for i in range(3):
        model = AutoModel.from_pretrained(str(tiny_bert[f"expert_{i}"]))
        experts.append((model.state_dict(), calibrate(model, rows, None, CalibrationSpec(batch_size=3))))
    return base, experts


def _infos(base, stats):
    out = {}
    for name, w in base.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        out[name] = TensorInfo.of(name, tuple(w.shape), module if module in stats else None)
    return out


def test_purifier_plans_and_purifies_the_tiny_bert(bert_stats):
    base, experts = bert_stats
    infos = _infos(base, experts[0][1])
    pave = PAVE(PAVEParams(rho=0.875, subject="weight"), n_experts=3)  # the published form
    assert pave.has_prepass
    summaries = {}
    for name, info in infos.items():
        if not pave.applies(info):
            continue
        spectra = []
        for i, (sd, st) in enumerate(experts):
            ctx = ExpertContext(i, f"e{i}", stats=st[info.module])
            s = pave.prepass(info, base[name], sd[name], ctx)
            assert s.shape == (min(info.shape),) and float(s[0]) == pytest.approx(1.0)
            assert bool((s[:-1] >= s[1:]).all())
            spectra.append(s)
        summaries[name] = spectra
    assert len(summaries) == 13
    q = pave.plan(summaries, infos)
    assert len(q) == 3 and all(0.8 < x < 0.875 + 1e-9 for x in q)
    assert 0.875 - 1 / 96 - 1e-12 <= sum(q) / 3 < 0.875  # every layer has R = 32: each stops in [ρ − 1/(MR), ρ)
    name = "encoder.layer.1.intermediate.dense.weight"
    for i, (sd, st) in enumerate(experts):
        ctx = ExpertContext(i, f"e{i}", stats=st[infos[name].module], plan=q[i])
        w = sd[name]
        out = pave.purify(infos[name], base[name], w, ctx)
        assert out.shape == w.shape and out.dtype == torch.float32
        r = pave_rank(tuple(w.shape), q[i])
        d = damp(st[infos[name].module].second_moment())
        s = torch.linalg.svdvals(w.double() @ d.c_reg)
        err = float(torch.linalg.matrix_norm((out.double() - w.double()) @ d.c_reg))
        assert err == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-3)
        assert int(torch.linalg.matrix_rank(out.double(), rtol=1e-5)) == r
    # tensors without statistics pass through untouched
    b = "encoder.layer.0.output.dense.bias"
    assert not pave.applies(infos[b])
    assert pave.report()["ratios"] == q


def test_fixed_ratio_one_leaves_the_experts_as_they_are(bert_stats):
    base, experts = bert_stats
    infos = _infos(base, experts[0][1])
    pave = PAVE(PAVEParams(rank_ratio=1.0, damping="absolute"), n_experts=3)
    assert not pave.has_prepass and pave.plan({}, infos) == [1.0, 1.0, 1.0]
    name = "encoder.layer.0.attention.self.key.weight"
    sd, st = experts[1]
    out = pave.purify(infos[name], base[name], sd[name], ExpertContext(1, "e1", stats=st[infos[name].module], plan=1.0))
    torch.testing.assert_close(out, sd[name], rtol=1e-5, atol=1e-6)


def test_task_vector_subject_truncates_the_update_and_keeps_the_base(bert_stats):
    """subject="task_vector": W̃_t = W_0 + SVD_r(τ_t C_reg) C_reg⁻¹; the context-norm error is the
    tail of τ_t C_reg's spectrum, the purified update has rank r, and a base-only expert stays the base."""
    base, experts = bert_stats
    infos = _infos(base, experts[0][1])
    pave = PAVE(PAVEParams(rank_ratio=0.5, subject="task_vector"), n_experts=3)
    name = "encoder.layer.1.intermediate.dense.weight"
    sd, st = experts[2]
    stats = st[infos[name].module]
    ctx = ExpertContext(2, "e2", stats=stats, plan=0.5)
    w, w0 = sd[name], base[name]
    tau = w.double() - w0.double()
    out = pave.purify(infos[name], w0, w, ctx)
    r = pave_rank(tuple(w.shape), 0.5)
    d = damp(stats.second_moment())
    s = torch.linalg.svdvals(tau @ d.c_reg)
    err = float(torch.linalg.matrix_norm((out.double() - w.double()) @ d.c_reg))
    assert err == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-3)
    assert int(torch.linalg.matrix_rank(out.double() - w0.double(), rtol=1e-5)) == r
    same = pave.purify(infos[name], w0, w0.clone(), ctx)
    torch.testing.assert_close(same, w0, rtol=0, atol=1e-6)
    # the default subject is the task vector; the published one truncates W_t itself: a different result
    assert PAVEParams().subject == "task_vector"
    whole = PAVE(PAVEParams(rank_ratio=0.5, subject="weight"), n_experts=3).purify(infos[name], w0, w, ctx)
    assert float((whole - out).abs().max()) > 1e-3
