"""The classic merge methods through the MergeMethod contract (prepare on each expert, fuse on
the coordinator), against independent numpy computations."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import esm_ray.methods.dare  # noqa: F401  (registers dare_linear, dare_ties)
import esm_ray.methods.linear  # noqa: F401
import esm_ray.methods.task_arithmetic  # noqa: F401
import esm_ray.methods.ties  # noqa: F401
import esm_ray.methods.tsvm  # noqa: F401
from esm_ray.core.dare import dare_generator, dare_mask
from esm_ray.errors import SpecError
from esm_ray.methods._common import SparsePart
from esm_ray.methods.base import ExpertContext, TensorInfo
from esm_ray.methods.registry import build_method
from esm_ray.methods.tsvm import LowRankPart
from tests.oracles import ref_consensus, ref_trim, ref_tsvm


def family(shape, n, seed=0, zeros=0.0, quantize=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = []
    for _ in range(n):
        d = 0.1 * torch.randn(shape, generator=g)
        if quantize:
            d = torch.round(d * 20) / 20
        if zeros:
            d[torch.rand(shape, generator=g) < zeros] = 0.0
        experts.append(base + d)
    return base, experts


def ctxs_for(n, weights=None, densities=None):
    weights = weights or [1.0] * n
    densities = densities or [None] * n
    return [ExpertContext(index=i, name=f"e{i}", weight=weights[i], density=densities[i]) for i in range(n)]


def merge(method, name, base, experts, ctxs, seed=0):
    """What an executor does for one tensor: prepare per expert, then fuse."""
    info = TensorInfo.of(name, tuple(base.shape))
    parts = [method.prepare(info, base, e, c) for e, c in zip(experts, ctxs)]
    out = method.fuse(info, base, parts, ctxs)
    assert out.dtype == torch.float32 and out.shape == base.shape
    return out, parts


def tvs_np(base, experts):
    return [(e - base).numpy().astype(np.float64) for e in experts]


# ---- defaults and validation ------------------------------------------------------------------

def test_defaults_follow_mergekit():
    expect = {
        "linear": {"normalize": True},
        "task_arithmetic": {"normalize": False, "lambda_": 1.0},
        "ties": {"density": 1.0, "normalize": True, "rescale": False, "lambda_": 1.0, "consensus": "sum"},
        "dare_linear": {"density": 1.0, "normalize": False, "rescale": True, "lambda_": 1.0},
        "dare_ties": {"density": 1.0, "normalize": False, "rescale": True, "lambda_": 1.0, "consensus": "sum"},
        "tsvm": {"k": None, "lambda_": 1.0},
    }
    for name, fields in expect.items():
        params = build_method(name, {}, n_experts=2).params
        for key, value in fields.items():
            assert getattr(params, key) == value, (name, key)
        for fname, f in type(params).model_fields.items():
            assert f.description, (name, fname)


@pytest.mark.parametrize("name,params,field", [
    ("ties", {"density": 0}, "method.params.density"),
    ("ties", {"density": 1.5}, "method.params.density"),
    ("dare_ties", {"density": 0.0}, "method.params.density"),
    ("dare_linear", {"density": 2}, "method.params.density"),
    ("dare_linear", {"rescale_mode": "l2"}, "method.params.rescale_mode"),
    ("task_arithmetic", {"density": 0.5}, "method.params.density"),
    ("linear", {"lambda": 2.0}, "method.params.lambda"),
    ("tsvm", {"k": 0}, "method.params.k"),
    ("ties", {"consensus": "mean"}, "method.params.consensus"),
    ("ties", {"densty": 0.5}, "method.params.densty"),
])
def test_bad_params_raise_spec_error_naming_the_field(name, params, field):
    with pytest.raises(SpecError) as err:
        build_method(name, params, n_experts=2)
    assert f"`{field}`" in str(err.value)


def test_unknown_param_is_reported_as_such():
    with pytest.raises(SpecError, match="unknown parameter"):
        build_method("dare_ties", {"int8_mask": True}, n_experts=2)


def test_lambda_by_alias_and_by_name():
    assert build_method("ties", {"lambda": 0.5}, 2).params.lambda_ == 0.5
    assert build_method("ties", {"lambda_": 0.25}, 2).params.lambda_ == 0.25


# ---- linear and task arithmetic ---------------------------------------------------------------

def test_linear_is_the_weighted_average_of_expert_weights():
    base, experts = family((6, 5), 3, seed=1)
    ws = [0.5, 1.0, 2.5]
    m = build_method("linear", {}, 3)
    out, _ = merge(m, "a.weight", base, experts, ctxs_for(3, ws))
    soup = sum(w * e.numpy().astype(np.float64) for w, e in zip(ws, experts)) / sum(ws)
    np.testing.assert_allclose((base + out).numpy(), soup, atol=1e-5)


def test_linear_without_normalize_gives_the_raw_weighted_sum():
    base, experts = family((4, 3), 2, seed=2)
    ws = [0.7, 0.6]
    m = build_method("linear", {"normalize": False}, 2)
    out, _ = merge(m, "a.weight", base, experts, ctxs_for(2, ws))
    raw = sum(w * e.numpy().astype(np.float64) for w, e in zip(ws, experts))
    np.testing.assert_allclose((base + out).numpy(), raw, atol=1e-5)


def test_linear_with_weights_summing_to_zero_is_a_spec_error():
    base, experts = family((3,), 2, seed=3)
    m = build_method("linear", {}, 2)
    with pytest.raises(SpecError, match="weight"):
        merge(m, "b", base, experts, ctxs_for(2, [1.0, -1.0]))


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(normalize):
    base, experts = family((5, 4), 3, seed=4)
    ws = [1.0, 0.5, -0.3]
    m = build_method("task_arithmetic", {"lambda": 0.6, "normalize": normalize}, 3)
    out, _ = merge(m, "x.weight", base, experts, ctxs_for(3, ws))
    expect = sum(w * t for w, t in zip(ws, tvs_np(base, experts)))
    if normalize:
        expect = expect / sum(ws)
    np.testing.assert_allclose(out.numpy(), 0.6 * expect, atol=1e-6)


# ---- TIES -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(9, 7), (31,), (2, 3, 5)])
@pytest.mark.parametrize("params", [
    {"density": 0.2},
    {"density": 0.6, "normalize": False, "lambda": 1.5},
    {"density": 0.4, "consensus": "count"},
])
def test_ties_matches_reference(shape, params):
    base, experts = family(shape, 3, seed=5, zeros=0.2, quantize=True)
    ws = [1.0, 0.6, 1.4]
    m = build_method("ties", params, 3)
    out, _ = merge(m, "layer.0.w", base, experts, ctxs_for(3, ws))
    trimmed = [ref_trim(t, params["density"]) for t in tvs_np(base, experts)]
    expect = ref_consensus(trimmed, ws, params.get("normalize", True), params.get("consensus", "sum"))
    np.testing.assert_allclose(out.numpy(), params.get("lambda", 1.0) * expect, atol=2e-6)


def test_ties_hand_example_through_the_method():
    base = torch.zeros(4)
    experts = [torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([2.0, 1.0, -4.0, 0.0])]
    m = build_method("ties", {}, 2)
    out, _ = merge(m, "v", base, experts, ctxs_for(2, [1.0, 3.0]))
    assert out.tolist() == [1.75, 1.0, -4.0, 0.0]


def test_ties_parts_are_sparse_at_low_density_and_follow_per_expert_density():
    base, experts = family((40, 30), 2, seed=6)
    m = build_method("ties", {"density": 0.5}, 2)
    ctxs = ctxs_for(2, densities=[0.1, None])
    out, parts = merge(m, "w", base, experts, ctxs)
    assert isinstance(parts[0], SparsePart) and parts[0].indices.numel() == 120  # int(0.1 * 1200)
    assert parts[0].indices.dtype == torch.int64 and parts[0].nbytes < 1200 * 4
    assert isinstance(parts[1], torch.Tensor) and int((parts[1] != 0).sum()) == 600
    trimmed = [ref_trim(t, d) for t, d in zip(tvs_np(base, experts), [0.1, 0.5])]
    np.testing.assert_allclose(out.numpy(), ref_consensus(trimmed, [1.0, 1.0], True), atol=2e-6)


def test_ties_rescale_matches_the_l1_norm():
    base, experts = family((20, 10), 1, seed=7)
    m = build_method("ties", {"density": 0.2, "rescale": True}, 1)
    info = TensorInfo.of("w", (20, 10))
    part = m.prepare(info, base, experts[0], ctxs_for(1)[0])
    dense = part.to_dense() if isinstance(part, SparsePart) else part
    assert np.isclose(float(dense.abs().sum()), float((experts[0] - base).abs().sum()), rtol=1e-5)


def test_fuse_does_not_depend_on_the_order_parts_arrive_in():
    base, experts = family((8, 6), 4, seed=8)
    ws = [0.3, 1.0, 2.0, 0.7]
    for name, params in [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5}), ("tsvm", {}),
                         ("task_arithmetic", {})]:
        m = build_method(name, params, 4, seed=1)
        info = TensorInfo.of("w", (8, 6))
        ctxs = ctxs_for(4, ws)
        parts = [m.prepare(info, base, e, c) for e, c in zip(experts, ctxs)]
        ref = m.fuse(info, base, parts, ctxs)
        order = list(range(4))
        random.Random(0).shuffle(order)
        shuffled = m.fuse(info, base, [parts[i] for i in order], [ctxs[i] for i in order])
        assert torch.equal(ref, shuffled), name


# ---- DARE -------------------------------------------------------------------------------------

def dropped_np(base, experts, density, seed, name):
    out = []
    for i, t in enumerate(tvs_np(base, experts)):
        keep = dare_mask(t.shape, density, dare_generator(seed, i, name)).numpy()
        out.append(np.where(keep, t / density, 0.0))
    return out


def test_dare_linear_matches_reference():
    base, experts = family((12, 10), 3, seed=9)
    ws = [1.0, 0.5, 0.8]
    m = build_method("dare_linear", {"density": 0.2, "lambda": 0.9}, 3, seed=42)
    out, parts = merge(m, "m.layers.1.w", base, experts, ctxs_for(3, ws))
    d = dropped_np(base, experts, 0.2, 42, "m.layers.1.w")
    np.testing.assert_allclose(out.numpy(), 0.9 * sum(w * x for w, x in zip(ws, d)), atol=1e-5)
    assert all(isinstance(p, SparsePart) for p in parts)


def test_dare_ties_matches_reference():
    base, experts = family((12, 10), 3, seed=10)
    ws = [1.0, 0.5, 0.8]
    m = build_method("dare_ties", {"density": 0.6, "normalize": True}, 3, seed=7)
    out, parts = merge(m, "w", base, experts, ctxs_for(3, ws))
    d = dropped_np(base, experts, 0.6, 7, "w")
    np.testing.assert_allclose(out.numpy(), ref_consensus(d, ws, True), atol=1e-5)
    assert all(isinstance(p, torch.Tensor) for p in parts)  # 60% kept: dense ships fewer bytes


def test_dare_method_is_deterministic_per_seed_expert_and_tensor():
    base, experts = family((30, 20), 1, seed=11)

    def part(seed, name="w", index=0):
        m = build_method("dare_linear", {"density": 0.2}, 1, seed=seed)
        c = ExpertContext(index=index, name="e", weight=1.0)
        p = m.prepare(TensorInfo.of(name, (30, 20)), base, experts[0], c)
        return p.to_dense()

    assert torch.equal(part(0), part(0))
    assert not torch.equal(part(0), part(1))
    assert not torch.equal(part(0), part(0, name="v"))
    assert not torch.equal(part(0), part(0, index=1))


def test_dare_keep_rate_and_unbiasedness_through_the_method():
    base = torch.zeros(100_000)
    expert = torch.ones(100_000)
    m = build_method("dare_linear", {"density": 0.25}, 1, seed=3)
    out, _ = merge(m, "big", base, [expert], ctxs_for(1))
    keep = float((out != 0).float().mean())
    assert abs(keep - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 100_000)
    assert abs(float(out.mean()) - 1.0) < 5 * np.sqrt(0.75 / 0.25 / 100_000)


# ---- TSV-M ------------------------------------------------------------------------------------

def test_tsvm_single_expert_full_rank_reproduces_the_task_vector():
    base, experts = family((16, 11), 1, seed=12)
    m = build_method("tsvm", {}, 1)
    out, parts = merge(m, "q.weight", base, experts, ctxs_for(1))
    assert isinstance(parts[0], LowRankPart) and parts[0].s.numel() == 11
    np.testing.assert_allclose(out.numpy(), (experts[0] - base).numpy(), atol=1e-5)


@pytest.mark.parametrize("shape,params,weights", [
    ((20, 14), {}, [1.0, 1.0, 1.0]),
    ((14, 20), {"k": 2, "lambda": 0.5}, [1.0, 0.5, 2.0]),
])
def test_tsvm_matches_reference(shape, params, weights):
    base, experts = family(shape, 3, seed=13)
    m = build_method("tsvm", params, 3)
    out, _ = merge(m, "w", base, experts, ctxs_for(3, weights))
    k = params.get("k", min(shape) // 3)
    expect = params.get("lambda", 1.0) * ref_tsvm(tvs_np(base, experts), k, weights)
    np.testing.assert_allclose(out.numpy(), expect, atol=1e-5)


def test_tsvm_rank_is_at_most_t_times_k():
    base, experts = family((30, 24), 3, seed=14)
    m = build_method("tsvm", {"k": 2}, 3)
    out, parts = merge(m, "w", base, experts, ctxs_for(3))
    assert all(p.s.numel() == 2 for p in parts)
    sv = torch.linalg.svdvals(out.double())
    assert float(sv[5]) > 1e-2 * float(sv[0]) and float(sv[6]) < 1e-5 * float(sv[0])  # rank 6 = T·k up to float32


def test_tsvm_non_2d_is_the_mean_task_vector():
    base, experts = family((9,), 3, seed=15)
    m = build_method("tsvm", {}, 3)
    out, parts = merge(m, "ln.bias", base, experts, ctxs_for(3))
    assert all(isinstance(p, torch.Tensor) for p in parts)
    np.testing.assert_allclose(out.numpy(), np.mean(tvs_np(base, experts), axis=0), atol=1e-6)
    base3, experts3 = family((2, 3, 4), 2, seed=16)
    out3, _ = merge(build_method("tsvm", {}, 2), "conv", base3, experts3, ctxs_for(2))
    np.testing.assert_allclose(out3.numpy(), np.mean(tvs_np(base3, experts3), axis=0), atol=1e-6)


def test_tsvm_ignores_unchanged_and_zero_weight_experts():
    base, experts = family((18, 12), 2, seed=17)
    tv = (experts[0] - base).numpy().astype(np.float64)
    u, s, vt = np.linalg.svd(tv, full_matrices=False)
    truncated = (u[:, :6] * s[:6]) @ vt[:6]  # k = 12 // 2
    m = build_method("tsvm", {}, 2)
    frozen, _ = merge(m, "w", base, [experts[0], base.clone()], ctxs_for(2))
    np.testing.assert_allclose(frozen.numpy(), truncated, atol=1e-5)
    zero_w, _ = merge(m, "w", base, experts, ctxs_for(2, [1.0, 0.0]))
    np.testing.assert_allclose(zero_w.numpy(), truncated, atol=1e-5)


def test_compact_ships_sparse_only_below_one_nonzero_in_three():
    from esm_ray.methods._common import SparsePart, compact, dense

    t = torch.zeros(300)
    t[::10] = torch.arange(1.0, 31.0)  # 30 nonzeros: 360 bytes sparse against 1200 dense
    part = compact(t)
    assert isinstance(part, SparsePart) and part.nbytes == 30 * 12 and torch.equal(dense(part), t)
    assert compact(t, max_nonzero=30).__class__ is SparsePart
    assert compact(t, max_nonzero=100) is t  # the bound alone says dense wins: no counting
    t[:120] = 1.0
    assert compact(t) is t  # 126 nonzeros: dense is smaller
