"""ESD and ESM against the oracles of the method notes (§5, items 1-8), on random matrices in
float64 and on the tiny BERT fixture with real calibration rows."""

from __future__ import annotations

import math

import pytest
import torch

from esm_ray.core.esd import ESD, auto_route, esd_from_gram, esd_from_rows, esd_rank, gram_factor
from esm_ray.core.esm import PRESETS, eigen_scales, esm_fuse, inter_layer_scales
from esm_ray.core.layerstats import LayerStats
from esm_ray.core.linalg import polar, polar_gram
from esm_ray.core.tsvm import tsv_truncate, tsvm_fuse
from esm_ray.methods.base import ExpertContext, TensorInfo
from esm_ray.methods.esm import ESM, ESDPart, ESMParams, TSVPart

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    # correlated, non-centred rows: a shared mean plus a low-rank-ish mix
    mix = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    return torch.randn(n, d, generator=g, dtype=F64) @ mix + 0.5 * torch.randn(d, generator=g, dtype=F64)


def _align(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|cosine| between matching columns (eigenvectors are defined up to sign)."""
    return (a * b).sum(0).abs()


# ---- ESD --------------------------------------------------------------------------------------

def test_gram_route_equals_svd_route_and_eigenvalue_definition():  # oracle 1
    g = _gen(1)
    d_out, d_in, n = 12, 20, 50
    delta = torch.randn(d_out, d_in, generator=g, dtype=F64)
    x = _rows(n, d_in, g)
    st = LayerStats.from_rows(x)
    a = esd_from_gram(delta, st.gram, st.n, k=d_out)
    b = esd_from_rows(delta, x, k=d_out)
    dO = x @ delta.T
    sv = torch.linalg.svdvals(dO)
    assert a.rank == b.rank == d_out
    torch.testing.assert_close(a.eigenvalues, sv.square() / (n - 1), rtol=1e-10, atol=0)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-10, atol=0)
    assert float(a.eigenvalues.sum()) == pytest.approx(float(dO.square().sum()) / (n - 1), rel=1e-12)
    assert bool((a.eigenvalues[:-1] >= a.eigenvalues[1:]).all())
    assert float((_align(a.basis, b.basis) - 1).abs().max()) < 1e-8
    torch.testing.assert_close(a.basis.T @ a.basis, torch.eye(d_out, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape,n", [((12, 20), 50), ((20, 12), 50), ((20, 12), 6), ((9, 9), 4), ((256, 256), 40)])
def test_gram_and_factor_routes_agree(shape, n):
    g = _gen(15)
    delta = torch.randn(*shape, generator=g, dtype=F64)
    x = _rows(n, shape[1], g)
    st = LayerStats.from_rows(x)
    ref = esd_from_rows(delta, x, k=shape[0])
    for route in ("gram", "factor"):
        e = esd_from_gram(delta, st.gram, st.n, k=shape[0], route=route)
        assert e.rank == ref.rank == min(shape[1], n, shape[0])
        torch.testing.assert_close(e.eigenvalues, ref.eigenvalues, rtol=1e-9, atol=1e-12 * float(ref.eigenvalues[0]))
        torch.testing.assert_close(e.basis.T @ e.basis, torch.eye(e.rank, dtype=F64), atol=1e-12, rtol=0)
        torch.testing.assert_close(e.basis @ e.basis.T, ref.basis @ ref.basis.T, atol=1e-8, rtol=0)


def test_thin_factor_of_a_gram_of_fewer_rows_than_inputs():
    x = _rows(7, 20, _gen(16))
    gram = x.T @ x
    full, thin = gram_factor(gram), gram_factor(gram, 7)
    assert full.shape == (20, 20) and thin.shape == (20, 7)  # rank 7: the other 13 columns are round-off
    for f in (full, thin):
        torch.testing.assert_close(f @ f.T, gram, atol=1e-10 * float(gram.abs().max()), rtol=0)
    spd = gram + torch.eye(20, dtype=F64)  # positive definite: Cholesky, thin or not
    torch.testing.assert_close(gram_factor(spd, 7), torch.linalg.cholesky(spd))
    # float32 round-off (a "mixed" Gram) lifts about half of the 13 null eigenvalues above the
    # float64 threshold: the factor still keeps only the top 7
    noise = 1e-7 * float(gram.abs().max()) * _rows(20, 20, _gen(17))
    noisy = gram + noise + noise.T
    assert int((torch.linalg.eigvalsh(noisy) > 20 * 2.3e-16 * float(gram.abs().max())).sum()) > 7
    thin = gram_factor(noisy, 7)
    assert thin.shape == (20, 7)
    torch.testing.assert_close(thin @ thin.T, gram, atol=1e-5 * float(gram.abs().max()), rtol=0)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_esd_from_the_rows_themselves_equals_the_output_shift_svd(shape):
    """Statistics that hold X (no Gram): ESD by L = Xᵀ, whatever the layer's shape (auto picks
    the factor route), equals the SVD of the output shift X ΔWᵀ; the gram route forms G from
    the factor and agrees; the row-block route takes the same factor."""
    from esm_ray.core.esd import esd_from_task_rows
    from esm_ray.core.rowblocks import TaskRows

    g = _gen(23)
    d_out, d_in = shape
    n = 30
    delta = torch.randn(d_out, d_in, generator=g, dtype=F64)
    x = _rows(n, d_in, g)
    assert auto_route(d_out, d_in, n, rows=True) == "factor"
    ref = esd_from_rows(delta, x)
    for route in ("auto", "gram"):
        e = esd_from_gram(delta, None, n, route=route, factor=x.T)
        assert e.rank == ref.rank
        torch.testing.assert_close(e.eigenvalues, ref.eigenvalues, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(e.reconstruct(), ref.reconstruct(), rtol=0, atol=1e-10)
    base = torch.randn(d_out, d_in, generator=g)
    tv = TaskRows.of((base.double() + delta).float(), base)
    e = esd_from_task_rows(tv, None, n, factor=x.T)
    ref = esd_from_rows(tv.dense(), x)
    torch.testing.assert_close(e.reconstruct(), ref.reconstruct(), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="shapes do not match"):
        esd_from_gram(delta, None, n, factor=x.T[:-1])


def test_square_layers_with_fewer_rows_than_inputs_take_the_thin_factor_shared_by_q_k_v():
    assert [auto_route(*a) for a in [(256, 256, 40), (256, 256, 300), (32, 32, 12), (512, 256, 900),
                                     (256, 512, 40)]] == ["factor", "gram", "gram", "factor", "gram"]
    g = _gen(17)
    d, n = 256, 40
    base = torch.randn(d, d, generator=g)
    x = _rows(n, d, g).float()
    gram_held = LayerStats.from_rows(x)  # one input, read by three modules
    rows_held = LayerStats(n, x.double().sum(0), rows=x)  # the same input, as calibration keeps it
    for stats in (gram_held, rows_held):
        m = ESM(ESMParams(), n_experts=2)
        for name in ("q", "k", "v"):
            info = TensorInfo.of(f"layers.0.attn.{name}.weight", (d, d), module=f"layers.0.attn.{name}")
            delta = 0.01 * torch.randn(d, d, generator=g, dtype=F64)
            part = m.prepare(info, base, (base.double() + delta).float(), ExpertContext(0, "a", stats=stats))
            assert m._last_factor[0] is stats and m._last_factor[1].shape == (d, n)
            ref = esd_from_gram((base.double() + delta).float().double() - base.double(), gram_held.gram, n,
                                n_tasks=2, route="gram")
            assert part.esd.rank == ref.rank == n
            torch.testing.assert_close(part.esd.basis.double() @ part.esd.basis.double().T,
                                       ref.basis @ ref.basis.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(m._last_factor[1], x.double().T, atol=0, rtol=0)  # Xᵀ itself
    assert rows_held._gram is None  # and G was never formed


def test_energy_kept_and_residual_are_the_singular_value_tails():  # oracle 2
    g = _gen(2)
    delta = torch.randn(16, 24, generator=g, dtype=F64)
    x = _rows(64, 24, g)
    st = LayerStats.from_rows(x)
    dO = x @ delta.T
    s2 = torch.linalg.svdvals(dO).square()
    for k in (1, 4, 9):
        e = esd_from_gram(delta, st.gram, st.n, k=k).basis
        proj = dO @ e @ e.T
        assert float(proj.square().sum()) == pytest.approx(float(s2[:k].sum()), rel=1e-10)
        assert float((dO - proj).square().sum()) == pytest.approx(float(s2[k:].sum()), rel=1e-9)


def test_esd_never_worse_than_svd_truncation_on_the_calibration_rows():  # oracle 3
    g = _gen(3)
    d_out, d_in = 14, 18
    delta = torch.randn(d_out, d_in, generator=g, dtype=F64)
    x = _rows(40, d_in, g) * torch.linspace(0.1, 3.0, d_in, dtype=F64)  # anisotropic inputs
    st = LayerStats.from_rows(x)
    strict = 0
    for k in range(1, d_out):
        esd = esd_from_gram(delta, st.gram, st.n, k=k)
        u, s, vh = tsv_truncate(delta, k)
        err_esd = float(torch.linalg.matrix_norm(x @ (delta - esd.reconstruct()).T))
        err_tsv = float(torch.linalg.matrix_norm(x @ (delta - (u * s) @ vh).T))
        rand_q, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=F64))
        err_rand = float(torch.linalg.matrix_norm(x @ (delta - rand_q @ rand_q.T @ delta).T))
        assert err_esd <= err_tsv * (1 + 1e-10)
        assert err_esd <= err_rand * (1 + 1e-10)
        strict += err_esd < err_tsv * (1 - 1e-3)
    assert strict > 0  # the inputs are anisotropic, so ESD is strictly better somewhere


def test_full_rank_reconstructs_the_update_exactly():  # oracle 4
    g = _gen(4)
    delta = torch.randn(10, 7, generator=g, dtype=F64)
    x = _rows(30, 7, g)
    st = LayerStats.from_rows(x)
    # ΔO has rank ≤ d_in = 7 < d_out, so the cap keeps 7; a square ΔW reaches the identity
    sq = torch.randn(7, 7, generator=g, dtype=F64)
    e = esd_from_gram(sq, st.gram, st.n, k=7)
    torch.testing.assert_close(e.basis @ e.basis.T, torch.eye(7, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(e.reconstruct(), sq, atol=1e-12, rtol=0)
    e2 = esd_from_gram(delta, st.gram, st.n, k=10)
    assert e2.rank == 7


def test_rank_capped_at_data_rank_and_basis_orthonormal_without_padding():
    g = _gen(5)
    d_out, d_in, n = 24, 16, 5  # fewer rows than d_out: the reference code padded with identity columns
    delta = torch.randn(d_out, d_in, generator=g, dtype=F64)
    x = _rows(n, d_in, g)
    st = LayerStats.from_rows(x)
    e = esd_from_gram(delta, st.gram, st.n, k=d_out)
    assert e.rank == n
    torch.testing.assert_close(e.basis.T @ e.basis, torch.eye(n, dtype=F64), atol=1e-12, rtol=0)
    assert bool((e.eigenvalues > 0).all())
    # the kept part explains the whole output shift on these rows
    torch.testing.assert_close(x @ e.reconstruct().T, x @ delta.T, atol=1e-9, rtol=1e-9)
    # default rank floor(d_out / T), and an energy threshold caps it further
    assert esd_from_gram(delta, st.gram, st.n, n_tasks=8).rank == min(esd_rank(d_out, 8), n) == 3
    lam = esd_from_gram(delta, st.gram, st.n, k=d_out).eigenvalues
    k90 = int((torch.cumsum(lam, 0) / lam.sum() < 0.9).sum()) + 1
    assert esd_from_gram(delta, st.gram, st.n, k=d_out, energy=0.9).rank == k90
    assert esd_from_gram(torch.zeros(d_out, d_in, dtype=F64), st.gram, st.n).rank == 0


# ---- ESM ----------------------------------------------------------------------------------------

def _parts(T: int, d_out: int, d_in: int, k: int, seed: int) -> tuple[list[ESD], list[float]]:
    g = _gen(seed)
    parts, norms = [], []
    for _ in range(T):
        delta = torch.randn(d_out, d_in, generator=g, dtype=F64)
        st = LayerStats.from_rows(_rows(60, d_in, g))
        parts.append(esd_from_gram(delta, st.gram, st.n, k=k))
        norms.append(float(delta.norm()))
    return parts, norms


@pytest.mark.parametrize("preset,shape,k", [("vit", (12, 20), 4), ("roberta", (12, 20), 4),
                                             ("vit", (30, 8), 5), ("roberta", (16, 16), 5)])
def test_esm_merged_update_has_a_flat_spectrum(preset, shape, k):  # oracle 5
    T = 3
    d_out, d_in = shape
    parts, norms = _parts(T, d_out, d_in, k, seed=7)
    dw = esm_fuse(parts, PRESETS[preset], norms)
    sv = torch.linalg.svdvals(dw)
    u = torch.cat([p.basis * eigen_scales(p.eigenvalues) for p in parts], 1)
    _, msu = polar(u)
    assert T * k <= d_out
    rank = min(T * k, d_in)
    nonzero = sv[:rank]
    tail = sv[rank:]
    assert tail.numel() == 0 or float(tail.max()) < 1e-9 * float(sv[0])
    assert float((nonzero.max() - nonzero.min()) / nonzero.max()) < 1e-10
    # the common value is multiplier · ms(U) · ms(V): recompute ms(V) from the scaled stack
    from esm_ray.core.esm import stack_factors

    uc, vc = stack_factors(parts, PRESETS[preset], norms)
    _, msu2 = polar(uc)
    _, msv = polar(vc)
    torch.testing.assert_close(msu, msu2)
    multiplier = {"vit": 2.0, "roberta": 1.0}[preset]  # the papers' codes: ×2 on ViT, none on RoBERTa
    assert float(nonzero[0]) == pytest.approx(multiplier * float(msu2) * float(msv), rel=1e-10)


def test_presets_follow_the_reference_recipes():
    vit, rob = PRESETS["vit"], PRESETS["roberta"]
    assert (vit.eigen_exponent, vit.inter_task_power, vit.inter_column_power, vit.multiplier) == (0.15, 2, 2, 2)
    assert (rob.eigen_exponent, rob.inter_task_power, rob.inter_column_power, rob.multiplier) == (0.15, 0, 0, 1)
    assert vit.inter_layer_power == rob.inter_layer_power == 2


def test_inter_task_and_column_scalings_by_hand():
    from esm_ray.core.esm import stack_factors

    parts, norms = _parts(2, 6, 5, 2, seed=14)
    u, v = stack_factors(parts, PRESETS["vit"], norms)
    mean_n = sum(norms) / 2
    rows = []
    for p, n in zip(parts, norms):
        s = eigen_scales(p.eigenvalues)
        rows.append(p.coords * s[:, None] * (n / mean_n) ** 2)
    ref = torch.cat(rows)
    c = ref.norm(dim=0)
    ref = ref * (c / c.mean()) ** 2
    torch.testing.assert_close(v, ref)
    torch.testing.assert_close(u, torch.cat([p.basis * eigen_scales(p.eigenvalues) for p in parts], 1))


def test_float32_fusion_matches_float64():
    parts, norms = _parts(3, 12, 20, 4, seed=16)
    a = esm_fuse(parts, PRESETS["vit"], norms)
    b = esm_fuse(parts, PRESETS["vit"], norms, dtype=torch.float32)
    assert b.dtype == torch.float32
    torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (30, 30)])
def test_polar_through_the_gram_equals_the_svd_polar(shape):
    g = _gen(21)
    m = torch.randn(*shape, generator=g, dtype=F64) @ torch.diag(torch.linspace(0.05, 3, shape[1], dtype=F64))
    p_svd, ms_svd = polar(m)
    p_gram, ms_gram = polar_gram(m)
    torch.testing.assert_close(p_gram, p_svd, rtol=0, atol=1e-10)
    torch.testing.assert_close(ms_gram, ms_svd, rtol=1e-12, atol=0)
    # rank-deficient: the partial isometry on the range (the SVD completes it arbitrarily)
    low = torch.randn(40, 5, generator=g, dtype=F64) @ torch.randn(5, 12, generator=g, dtype=F64)
    p_low, _ = polar_gram(low)
    assert int(torch.linalg.matrix_rank(p_low)) == 5
    torch.testing.assert_close(p_low @ p_low.T @ low, low)


@pytest.mark.parametrize("preset", ["vit", "roberta"])
def test_fuse_gram_route_matches_the_svd_route(preset):
    parts, norms = _parts(3, 24, 16, 5, seed=17)
    a = esm_fuse(parts, PRESETS[preset], norms, route="svd")
    b = esm_fuse(parts, PRESETS[preset], norms)  # default: gram
    assert float((b - a).norm() / a.norm()) < 1e-9
    with pytest.raises(ValueError, match="route"):
        esm_fuse(parts, PRESETS[preset], norms, route="qr")  # type: ignore[arg-type]


def test_vit_and_roberta_recipes_pick_different_directions():
    parts, norms = _parts(3, 12, 20, 3, seed=8)
    a = esm_fuse(parts, PRESETS["vit"], norms)
    b = esm_fuse(parts, PRESETS["roberta"], norms)
    pa, pb = a / torch.linalg.svdvals(a)[0], b / torch.linalg.svdvals(b)[0]
    assert float((pa - pb).norm()) > 1e-3  # inter-task/column scalings change the subspace


def test_eigen_scales_mean_one_and_monotone():
    lam = torch.tensor([9.0, 4.0, 1.0, 0.25], dtype=F64)
    s = eigen_scales(lam, 0.15)
    assert float(s.mean()) == pytest.approx(1.0, rel=1e-12)
    assert bool((s[:-1] > s[1:]).all())
    torch.testing.assert_close(s[0] / s[1], (lam[0] / lam[1]) ** 0.15)
    torch.testing.assert_close(eigen_scales(torch.full((5,), 3.0, dtype=F64)), torch.ones(5, dtype=F64))


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (7, 7)])
def test_polar_factor_is_the_nearest_partial_isometry(shape):  # oracle 6
    g = _gen(9)
    m = torch.randn(*shape, generator=g, dtype=F64)
    q, ms = polar(m)
    small = min(shape)
    gram = q.T @ q if shape[0] >= shape[1] else q @ q.T
    torch.testing.assert_close(gram, torch.eye(small, dtype=F64), atol=1e-12, rtol=0)
    assert float(ms) == pytest.approx(float(torch.linalg.svdvals(m).mean()), rel=1e-12)
    best = float((m - q).norm())
    for _ in range(20):
        z, _ = torch.linalg.qr(torch.randn(max(shape), small, generator=g, dtype=F64))
        other = z if shape[0] >= shape[1] else z.T
        assert best <= float((m - other).norm()) + 1e-12


def test_inter_layer_scaling_cubes_the_norm_ratio():  # oracle 7
    names = [f"encoder.layer.{i}.attention.self.query.weight" for i in range(4)]
    names += [f"encoder.layer.{i}.output.dense.weight" for i in range(4)]
    infos = {n: TensorInfo.of(n, (8, 8), module=n[: -len(".weight")]) for n in names}
    infos["embeddings.word_embeddings.weight"] = TensorInfo.of("embeddings.word_embeddings.weight", (50, 8))
    infos["encoder.layer.0.output.dense.bias"] = TensorInfo.of("encoder.layer.0.output.dense.bias", (8,), "x")
    pre = {n: 0.5 + i for i, n in enumerate(infos)}
    m = ESM(ESMParams(), n_experts=3)
    f = m.layer_scales(infos, pre)
    assert set(f) == set(names)  # embeddings and 1-D tensors are not rescaled across depth
    post = {n: pre[n] * f[n] for n in f}
    for grp in (names[:4], names[4:]):
        for a in grp:
            for b in grp:
                assert post[a] / post[b] == pytest.approx((pre[a] / pre[b]) ** 3, rel=1e-12)
    assert inter_layer_scales({"a": 2.0}, {"a": "t"}, 2.0) == {"a": 1.0}
    assert ESM(ESMParams(inter_layer_power=0), 3).layer_scales(infos, pre) == {}


def test_tsvm_fallback_with_one_task_reproduces_the_update():  # oracle 8
    g = _gen(10)
    delta = torch.randn(9, 6, generator=g, dtype=F64)
    u, s, vh = tsv_truncate(delta, 6)
    torch.testing.assert_close(tsvm_fuse([u], [s], [vh]), delta, atol=1e-12, rtol=0)
    # and through the method: a 2-D tensor without statistics, T = 1, k = min(d_out, d_in)
    m = ESM(ESMParams(), n_experts=1)
    info = TensorInfo.of("embeddings.word_embeddings.weight", (9, 6))
    base = torch.randn(9, 6, generator=g).float()
    part = m.prepare(info, base, base + delta.float(), ExpertContext(0, "a"))
    assert isinstance(part, TSVPart)
    torch.testing.assert_close(m.fuse(info, base, [part], [ExpertContext(0, "a")]), delta.float(),
                               atol=1e-5, rtol=1e-5)


def test_method_parts_alpha_and_report():
    g = _gen(11)
    T, d_out, d_in = 3, 12, 10
    base = torch.randn(d_out, d_in, generator=g)
    experts = [base + 0.1 * torch.randn(d_out, d_in, generator=g) for _ in range(T)]
    stats = [LayerStats.from_rows(_rows(40, d_in, g)) for _ in range(T)]
    info = TensorInfo.of("encoder.layer.0.attention.self.query.weight", (d_out, d_in),
                         module="encoder.layer.0.attention.self.query")
    binfo = TensorInfo.of("encoder.layer.0.attention.self.query.bias", (d_out,))

    def run(**kw):
        m = ESM(ESMParams(**kw), n_experts=T)
        ctxs = [ExpertContext(i, f"e{i}", stats=stats[i]) for i in range(T)]
        parts = [m.prepare(info, base, e, c) for e, c in zip(experts, ctxs)]
        dw = m.fuse(info, base, parts, ctxs)
        bparts = [m.prepare(binfo, base[:, 0], e[:, 0], ExpertContext(i, f"e{i}")) for i, e in enumerate(experts)]
        db = m.fuse(binfo, base[:, 0], bparts, ctxs)
        return m, parts, dw, db

    m, parts, dw, db = run(preset="roberta")
    assert all(isinstance(p, ESDPart) and p.esd.rank == d_out // T for p in parts)
    assert all(p.esd.basis.shape == (d_out, 4) and p.esd.coords.shape == (4, d_in) for p in parts)
    torch.testing.assert_close(db, torch.stack([e[:, 0] - base[:, 0] for e in experts]).mean(0))
    rep = m.report()
    assert rep["alpha"] == 1.0 and set(rep["alpha_keys"]) == {info.name, binfo.name}  # roberta: all keys
    assert rep["esd_keys"] == [info.name] and rep["esd_ranks"][info.name] == [4, 4, 4]
    m2, _, dw2, db2 = run(preset="roberta", alpha=0.5)
    torch.testing.assert_close(dw2, 0.5 * dw)
    torch.testing.assert_close(db2, 0.5 * db)
    m3, _, dw3, db3 = run(preset="roberta", alpha=0.5, alpha_scope="esd")
    torch.testing.assert_close(dw3, 0.5 * dw)
    torch.testing.assert_close(db3, db)  # the mean is not an α key in 'esd' scope
    assert m3.report()["alpha_keys"] == [info.name]
    m4, _, _, _ = run()  # auto: a text model gets the RoBERTa recipe
    assert m4.report()["presets"] == {"roberta": 1}
    assert ESM(ESMParams(), 3).preset_of(TensorInfo.of("vision_model.encoder.layers.0.mlp.fc1.weight", (4, 4))) == "vit"


def test_method_handles_conv1d_orientation():
    g = _gen(12)
    T, d_in, d_out = 2, 6, 9
    base_t = torch.randn(d_in, d_out, generator=g)  # stored (d_in, d_out), GPT-2 Conv1D
    experts_t = [base_t + 0.1 * torch.randn(d_in, d_out, generator=g) for _ in range(T)]
    from esm_ray.stats.hooks import ModuleStats

    raw = [LayerStats.from_rows(_rows(30, d_in, g)) for _ in range(T)]
    st_t = [ModuleStats(s.n, s.s1, s.gram, transposed=True) for s in raw]
    m = ESM(ESMParams(), n_experts=T)
    info_t = TensorInfo.of("h.0.mlp.c_fc.weight", (d_in, d_out), module="h.0.mlp.c_fc")
    info = TensorInfo.of("h.0.mlp.c_fc.weight", (d_out, d_in), module="h.0.mlp.c_fc")
    ctx_t = [ExpertContext(i, str(i), stats=st_t[i]) for i in range(T)]
    ctx = [ExpertContext(i, str(i), stats=raw[i]) for i in range(T)]
    a = m.fuse(info_t, base_t, [m.prepare(info_t, base_t, e, c) for e, c in zip(experts_t, ctx_t)], ctx_t)
    b = m.fuse(info, base_t.T, [m.prepare(info, base_t.T, e.T, c) for e, c in zip(experts_t, ctx)], ctx)
    assert a.shape == (d_in, d_out)
    torch.testing.assert_close(a, b.T)


# ---- on the tiny BERT, with real calibration rows ----------------------------------------------

@pytest.fixture(scope="module")
def bert_calibrated(tiny_bert):
    """Per expert: the loaded model, its statistics, and the captured (unpadded) input rows."""
    from transformers import AutoModel

    from esm_ray.spec import CalibrationSpec
    from esm_ray.models.text import make_batches
    from esm_ray.stats.calibrate import calibrate
    from esm_ray.stats.hooks import linear_modules

    g = _gen(13)
    rows = [{"input_ids": torch.randint(1, 90, (int(torch.randint(3, 15, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(10)]
    settings = CalibrationSpec(samples=10, max_length=16, batch_size=4, gram_precision="float64")
    out = []
    base = AutoModel.from_pretrained(str(tiny_bert["base"]))
    for i in range(3):
        model = AutoModel.from_pretrained(str(tiny_bert[f"expert_{i}"]))
        stats = calibrate(model, rows, None, settings)
        captured: dict[str, list[torch.Tensor]] = {}
        mask_box: list[torch.Tensor] = []

        def grab(name):
            def hook(mod, args):
                x = args[0]
                captured.setdefault(name, []).append(x[mask_box[0].bool()].double() if x.dim() == 3 else x.double())
            return hook

        hs = [m.register_forward_pre_hook(grab(n)) for n, m in linear_modules(model).items()]
        with torch.inference_mode():
            for ids, mask in make_batches([r["input_ids"] for r in rows], 4):
                mask_box[:] = [mask]
                model(input_ids=ids, attention_mask=mask)
        for h in hs:
            h.remove()
        out.append((model, stats, {k: torch.cat(v) for k, v in captured.items()}))
    return base, out


def test_tiny_bert_stats_match_captured_rows_and_esd_beats_tsv(bert_calibrated):
    base, experts = bert_calibrated
    bsd = base.state_dict()
    model, stats, rows = experts[0]
    sd = model.state_dict()
    checked = 0
    for name, x in rows.items():
        st = stats[name]
        assert st.n == x.shape[0]
        torch.testing.assert_close(st.gram, x.T @ x, rtol=1e-9, atol=1e-9)
        if not name.startswith("encoder."):
            continue
        delta = (sd[f"{name}.weight"] - bsd[f"{name}.weight"]).double()
        for k in (1, 3, delta.shape[0] // 3):
            esd = esd_from_gram(delta, st.gram, st.n, k=k)
            u, s, vh = tsv_truncate(delta, esd.rank)
            e1 = float(torch.linalg.matrix_norm(x @ (delta - esd.reconstruct()).T))
            e2 = float(torch.linalg.matrix_norm(x @ (delta - (u * s) @ vh).T))
            assert e1 <= e2 * (1 + 1e-9)
        checked += 1
    assert checked == 12


def test_tiny_bert_esm_end_to_end(bert_calibrated):
    base, experts = bert_calibrated
    bsd = base.state_dict()
    T = len(experts)
    m = ESM(ESMParams(), n_experts=T)
    fused, infos, norms = {}, {}, {}
    for name, w0 in bsd.items():
        if not w0.is_floating_point():
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        has = module is not None and module in experts[0][1]
        info = TensorInfo.of(name, tuple(w0.shape), module if has else None)
        ctxs = [ExpertContext(i, f"e{i}", stats=experts[i][1][module] if has else None) for i in range(T)]
        parts = [m.prepare(info, w0, experts[i][0].state_dict()[name], ctxs[i]) for i in range(T)]
        if has:
            assert isinstance(parts[0], ESDPart)
            assert parts[0].esd.basis.numel() + parts[0].esd.coords.numel() < w0.numel()
        dw = m.fuse(info, w0, parts, ctxs)
        assert dw.shape == w0.shape and dw.dtype == torch.float32 and bool(torch.isfinite(dw).all())
        if has:
            sv = torch.linalg.svdvals(dw.double())
            r = sum(p.esd.rank for p in parts)
            assert float((sv[:r].max() - sv[:r].min()) / sv[0]) < 1e-4  # flat (float32 output)
        fused[name], infos[name] = dw, info
        norms[name] = float(dw.norm())
    scales = m.layer_scales(infos, norms)
    assert set(scales) == {n for n, i in infos.items() if i.module and i.layer_index is not None and i.ndim == 2}
    rep = m.report()
    assert rep["branches"]["esd"] == 13 and rep["branches"]["tsv"] == 3  # word/position/type embeddings
    assert set(rep["alpha_keys"]) == set(fused)  # roberta recipe: α scales every key


def test_auto_preset_doubles_the_roberta_scalings_and_named_presets_stay_published():
    """`auto`: RoBERTa's scalings with ×2 outside vision towers, the ViT recipe inside them;
    `roberta` stays the published ×1, and `multiplier` overrides both (docs/ablations.md)."""
    from esm_ray.methods.base import TensorInfo
    from esm_ray.methods.esm import ESM, ESMParams

    text = TensorInfo.of("model.layers.0.self_attn.q_proj.weight", (8, 8))
    vision = TensorInfo.of("vision_model.encoder.layers.0.mlp.fc1.weight", (8, 8))
    auto = ESM(ESMParams(), 2)
    r = auto.recipe(text)
    assert (r.name, r.inter_task_power, r.inter_column_power, r.multiplier) == ("roberta", 0, 0, 2.0)
    assert auto.recipe(vision) == ESM(ESMParams(preset="vit"), 2).recipe(vision)
    assert ESM(ESMParams(preset="roberta"), 2).recipe(text).multiplier == 1.0
    assert ESM(ESMParams(multiplier=3.0), 2).recipe(text).multiplier == 3.0


def test_shrinkage_is_checked_by_the_spec():
    from pydantic import ValidationError

    from esm_ray.methods.esm import ESMParams

    assert ESMParams(shrinkage="oas").shrinkage == "oas"
    assert ESMParams(shrinkage=0.25).shrinkage == 0.25
    for bad in (1.5, -0.1, "ledoit"):
        with pytest.raises(ValidationError):
            ESMParams(shrinkage=bad)
