"""Core math of the classic merges (linear, task arithmetic, TIES, DARE) against plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from esm_ray.core.arithmetic import linear, task_arithmetic
from esm_ray.core.dare import dare_drop, dare_generator, dare_linear, dare_mask, dare_ties, tensor_seed
from esm_ray.core.ties import kept_count, magnitude_trim, rescale_l1, sign_consensus_merge
from esm_ray.core.tsvm import drop_null_triplets
from tests.oracles import disjoint_merge, elect_sign, ref_consensus, ref_trim, ties


def _tvs(shape, n, seed, quantize=False, zeros=0.0):
    """Random task vectors; `quantize` makes many ties in |value|; `zeros` sets a fraction to 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randn(shape, generator=g)
        if quantize:
            t = torch.round(t * 2) / 2
        if zeros:
            t[torch.rand(shape, generator=g) < zeros] = 0.0
        out.append(t)
    return out


def _ties(tvs, weights, density, lam=1.0, normalize=True, method="sum"):
    """TIES as production runs it: magnitude_trim on each expert, sign_consensus_merge on the coordinator."""
    ds = density if isinstance(density, list) else [density] * len(tvs)
    return sign_consensus_merge([magnitude_trim(t, d) for t, d in zip(tvs, ds)], weights, lam, normalize, method)


# ---- linear and task arithmetic ---------------------------------------------------------------

def test_linear_matches_weighted_average_and_raw_sum():
    ws = [0.5, 2.0, -0.25]
    ts = _tvs((7, 5), 3, seed=1)
    avg = sum(w * t.numpy().astype(np.float64) for w, t in zip(ws, ts)) / sum(ws)
    np.testing.assert_allclose(linear(ws, ts).numpy(), avg, rtol=0, atol=1e-5)
    raw = sum(w * t.numpy().astype(np.float64) for w, t in zip(ws, ts))
    np.testing.assert_allclose(linear(ws, ts, normalize=False).numpy(), raw, rtol=0, atol=1e-5)


def test_linear_rejects_zero_weight_sum_and_bad_groups():
    ts = _tvs((3,), 2, seed=2)
    with pytest.raises(ValueError, match="nonzero sum"):
        linear([1.0, -1.0], ts)
    with pytest.raises(ValueError, match="2 tensors"):
        linear([1.0], ts)
    with pytest.raises(ValueError, match="shape"):
        linear([1.0, 1.0], [torch.zeros(3), torch.zeros(4)])


def test_task_arithmetic_matches_loop_and_mergekit_zero_divisor():
    ws = [0.3, 0.9]
    ts = _tvs((4, 6), 2, seed=3)
    expect = 0.7 * sum(w * t.numpy().astype(np.float64) for w, t in zip(ws, ts))
    np.testing.assert_allclose(task_arithmetic(ts, ws, lam=0.7).numpy(), expect, atol=1e-6)
    np.testing.assert_allclose(task_arithmetic(ts, ws, lam=0.7, normalize=True).numpy(), expect / 1.2, atol=1e-6)
    # weights summing to zero: mergekit divides by 1 instead
    a = task_arithmetic(ts, [1.0, -1.0], normalize=True)
    assert torch.equal(a, ts[0] - ts[1])


# ---- TIES pieces ------------------------------------------------------------------------------

@pytest.mark.parametrize("numel,density,k", [(10, 0.25, 2), (100, 0.29, 28), (3, 0.1, 1), (7, 1.0, 7), (50, 0.999, 49)])
def test_kept_count_uses_mergekit_rounding(numel, density, k):
    # int(density * numel), at least one: 0.29 * 100 is 28.999999999999996 in floating point
    assert kept_count(numel, density) == k


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_density_out_of_range_raises(bad):
    t = torch.ones(5)
    with pytest.raises(ValueError, match="density"):
        magnitude_trim(t, bad)
    with pytest.raises(ValueError, match="density"):
        dare_drop(t, bad, torch.Generator().manual_seed(0))


def test_magnitude_trim_keeps_the_largest_and_breaks_ties_by_position():
    t = torch.tensor([1.0, -3.0, 2.0, -2.0, 2.0, 0.5, 0.0, 3.0])
    # k = int(0.5 * 8) = 4: |3| at 1 and 7, then two of the three |2| at 2, 3, 4 -> positions 2, 3
    out = magnitude_trim(t, 0.5)
    assert out.tolist() == [0.0, -3.0, 2.0, -2.0, 0.0, 0.0, 0.0, 3.0]
    assert magnitude_trim(t, 1.0) is t


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9])
def test_magnitude_trim_matches_stable_sort_reference(density):
    (t,) = _tvs((13, 11), 1, seed=4, quantize=True, zeros=0.2)
    out = magnitude_trim(t, density)
    np.testing.assert_array_equal(out.numpy(), ref_trim(t.numpy(), density))
    assert int((out != 0).sum()) <= kept_count(t.numel(), density)
    # the entries kept are never smaller in magnitude than the ones dropped
    kept, dropped = out != 0, (out == 0) & (t != 0)
    if dropped.any():
        assert float(t[kept].abs().min()) >= float(t[dropped].abs().max())


def test_trim_of_a_3d_tensor_is_over_all_entries():
    (t,) = _tvs((2, 3, 4), 1, seed=5)
    out = magnitude_trim(t, 0.25)
    assert out.shape == t.shape and int((out != 0).sum()) == 6
    np.testing.assert_array_equal(out.numpy(), ref_trim(t.numpy(), 0.25))


def test_elect_sign_sum_versus_count_and_tie():
    a = torch.tensor([3.0, 0.0, -1.0])
    b = torch.tensor([-1.0, 0.0, 0.5])
    c = torch.tensor([-1.0, 0.0, 0.5])
    assert elect_sign([a, b, c], "sum").tolist() == [1.0, 1.0, 1.0]   # 1, 0 (tie -> +), 0 (tie -> +)
    assert elect_sign([a, b, c], "count").tolist() == [-1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="consensus"):
        elect_sign([a], "mean")  # type: ignore[arg-type]


def test_ties_by_hand_two_experts():
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
    t2 = torch.tensor([2.0, 1.0, -4.0, 0.0])
    # equal weights: sums 3, -1, -1, 0 -> signs +, -, -, + ; mean over the agreeing entries
    assert sign_consensus_merge([t1, t2], [1.0, 1.0]).tolist() == [1.5, -2.0, -4.0, 0.0]
    # weights 1 and 3: w·τ2 = 6, 3, -12, 0; sums 7, 1, -9, 0 -> +, +, -, +
    # divide by the weights of the agreeing experts: (1 + 6) / 4, 3 / 3, -12 / 3, 0 / 1
    assert sign_consensus_merge([t1, t2], [1.0, 3.0]).tolist() == [1.75, 1.0, -4.0, 0.0]
    assert sign_consensus_merge([t1, t2], [1.0, 3.0], normalize=False).tolist() == [7.0, 3.0, -12.0, 0.0]
    assert sign_consensus_merge([t1, t2], [1.0, 3.0], lam=2.0).tolist() == [3.5, 2.0, -8.0, 0.0]
    # with trimming to one entry each (k = int(0.25 * 4) = 1): t1 keeps 3, t2 keeps -4
    assert _ties([t1, t2], [1.0, 1.0], 0.25).tolist() == [0.0, 0.0, -4.0, 0.0]
    assert ties([t1, t2], [1.0, 1.0], 0.25).tolist() == [0.0, 0.0, -4.0, 0.0]


def test_disjoint_merge_signature_with_given_sign():
    t1 = torch.tensor([1.0, -1.0])
    t2 = torch.tensor([-3.0, -2.0])
    sign = torch.tensor([1.0, 1.0])  # imposed, not elected: only positive entries count
    assert disjoint_merge([t1, t2], [1.0, 1.0], sign).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("density,weights,normalize,method", [
    (1.0, [1.0, 1.0, 1.0], True, "sum"),
    (0.3, [0.5, 1.0, 2.0], True, "sum"),
    (0.3, [0.5, -1.0, 2.0], True, "sum"),
    ([0.2, 0.7, 0.5], [1.0, 0.4, 0.8], False, "sum"),
    (0.5, [1.0, 1.0, 1.0], True, "count"),
])
def test_ties_matches_elementwise_reference(density, weights, normalize, method):
    tvs = _tvs((9, 8), 3, seed=6, quantize=True, zeros=0.15)
    ds = density if isinstance(density, list) else [density] * 3
    expect = ref_consensus([ref_trim(t.numpy(), d) for t, d in zip(tvs, ds)], weights, normalize, method)
    out = _ties(tvs, weights, density, lam=0.9, normalize=normalize, method=method)
    np.testing.assert_allclose(out.numpy(), 0.9 * expect, rtol=1e-6, atol=1e-6)
    # the one-pass merge is the paper's trim -> elect -> disjoint merge, bit for bit
    assert torch.equal(out, ties(tvs, weights, density, lam=0.9, normalize=normalize, method=method))


@pytest.mark.parametrize("n_tvs", [1, 3, 7])
@pytest.mark.parametrize("weights_kind,normalize,method", [
    ("unit", True, "sum"), ("mixed", True, "sum"), ("mixed", False, "sum"), ("unit", True, "count"),
])
def test_ties_is_the_same_whatever_its_slices_and_groups(monkeypatch, n_tvs, weights_kind, normalize, method):
    """The coordinator's slices and groups of vectors (CONSENSUS_*) change no bit: tiny ones
    (several slices, a last short one, several groups with whole-tensor sums) against the
    paper's composition."""
    import esm_ray.core.ties as core_ties
    tvs = _tvs((37, 29), n_tvs, seed=11, quantize=True, zeros=0.1)
    weights = [1.0] * n_tvs if weights_kind == "unit" else [0.5 + 0.75 * i for i in range(n_tvs)]
    expect = ties(tvs, weights, 0.4, lam=0.7, normalize=normalize, method=method)
    for group, group_bytes, slice_ in ((2, 1 << 30, 100), (8, 37 * 29 * 4 * 3, 1000), (8, 1 << 30, 1 << 18)):
        monkeypatch.setattr(core_ties, "CONSENSUS_GROUP", group)
        monkeypatch.setattr(core_ties, "CONSENSUS_GROUP_BYTES", group_bytes)
        monkeypatch.setattr(core_ties, "CONSENSUS_SLICE", slice_)
        trimmed = (magnitude_trim(t, 0.4) for t in tvs)  # a lazy stream, as the executor hands them over
        out = sign_consensus_merge(trimmed, weights, 0.7, normalize, method)
        assert torch.equal(out, expect), (group, group_bytes, slice_)


def test_rescale_l1_restores_the_norm():
    (t,) = _tvs((20, 10), 1, seed=7)
    trimmed = magnitude_trim(t, 0.2)
    out = rescale_l1(t, trimmed)
    assert math.isclose(float(out.abs().sum()), float(t.abs().sum()), rel_tol=1e-5)
    assert torch.equal(out != 0, trimmed != 0)
    z = torch.zeros(4)
    assert rescale_l1(z, z) is z


# ---- DARE -------------------------------------------------------------------------------------

def test_tensor_seed_is_a_stable_hash():
    # pinned: changing the derivation would silently change every DARE merge already made
    assert tensor_seed(0, 0, "model.layers.0.mlp.up_proj.weight") == tensor_seed(0, 0, "model.layers.0.mlp.up_proj.weight")
    assert tensor_seed(0, 0, "w") == 5642238315354465153
    seeds = {tensor_seed(s, i, n) for s in (0, 1) for i in (0, 1) for n in ("a", "b")}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_dare_is_deterministic_for_a_seed_and_differs_across_seeds():
    (t,) = _tvs((30, 40), 1, seed=8)
    a = dare_drop(t, 0.3, dare_generator(5, 1, "x.weight"))
    b = dare_drop(t, 0.3, dare_generator(5, 1, "x.weight"))
    assert torch.equal(a, b)
    for other in (dare_generator(6, 1, "x.weight"), dare_generator(5, 2, "x.weight"), dare_generator(5, 1, "y.weight")):
        assert not torch.equal(a, dare_drop(t, 0.3, other))


def test_dare_mask_independent_of_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dare_mask((700, 900), 0.4, dare_generator(0, 0, "t"))
        torch.set_num_threads(2)
        two = dare_mask((700, 900), 0.4, dare_generator(0, 0, "t"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_dare_keep_rate_matches_density():
    n = 200_000
    for density in (0.1, 0.5, 0.9):
        rate = float(dare_mask((n,), density, dare_generator(1, 0, "rate")).float().mean())
        sigma = math.sqrt(density * (1 - density) / n)
        assert abs(rate - density) < 5 * sigma, (density, rate)


def test_dare_rescale_preserves_the_expected_value():
    t = torch.linspace(-2.0, 2.0, 9)
    n = 4000
    draws = torch.stack([dare_drop(t, 0.4, dare_generator(s, 0, "ev")) for s in range(n)])
    sigma = t.abs() * math.sqrt((1 - 0.4) / 0.4 / n)
    assert torch.all((draws.mean(0) - t).abs() <= 5 * sigma + 1e-6)
    # survivors are exactly tv / density; the rest are zero
    kept = draws != 0
    assert torch.allclose(draws[kept], (t.expand_as(draws) / 0.4)[kept])


def test_dare_without_rescale_and_with_l1():
    (t,) = _tvs((50, 20), 1, seed=9)
    plain = dare_drop(t, 0.3, dare_generator(0, 0, "p"), rescale=False)
    kept = plain != 0
    assert torch.equal(plain[kept], t[kept])
    l1 = dare_drop(t, 0.3, dare_generator(0, 0, "p"), rescale_mode="l1")
    assert torch.equal(l1 != 0, kept)
    assert math.isclose(float(l1.abs().sum()), float(t.abs().sum()), rel_tol=1e-5)
    assert dare_drop(t, 1.0, dare_generator(0, 0, "p")) is t


def test_dare_linear_and_dare_ties_are_the_compositions():
    tvs = _tvs((6, 7), 2, seed=10, zeros=0.1)
    ws = [0.8, 1.2]
    gens = lambda: [dare_generator(3, i, "c") for i in range(2)]  # noqa: E731
    masks = [dare_mask(t.shape, 0.5, g).numpy() for t, g in zip(tvs, gens())]
    dropped = [np.where(m, t.numpy() / 0.5, 0.0) for t, m in zip(tvs, masks)]
    lin = dare_linear(tvs, ws, 0.5, gens(), lam=0.5)
    np.testing.assert_allclose(lin.numpy(), 0.5 * (ws[0] * dropped[0] + ws[1] * dropped[1]), atol=1e-6)
    tie = dare_ties(tvs, ws, 0.5, gens(), normalize=True)
    np.testing.assert_allclose(tie.numpy(), ref_consensus(dropped, ws, True), atol=1e-6)
    # density 1 draws nothing and is plain task arithmetic
    assert torch.equal(dare_linear(tvs, ws, 1.0, gens()), task_arithmetic(tvs, ws))
    with pytest.raises(ValueError, match="generators"):
        dare_linear(tvs, ws, 0.5, gens()[:1])


# ---- TSV-M helper ------------------------------------------------------------------------------

def test_drop_null_triplets_keeps_the_numerical_rank():
    g = torch.Generator().manual_seed(11)
    m = torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 9, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    u2, s2, vh2 = drop_null_triplets(u, s, vh)
    assert s2.numel() == 2 and u2.shape == (12, 2) and vh2.shape == (2, 9)
    assert torch.allclose((u2 * s2) @ vh2, m, atol=1e-12)
    z = torch.zeros(4, 3, dtype=torch.float64)
    assert drop_null_triplets(*torch.linalg.svd(z, full_matrices=False))[1].numel() == 0


def test_multislerp_of_tensors_no_expert_changed_is_zero():
    """Three zero task vectors (a frozen tensor): the result is zero, the formula's limit
    (Σ w_i n_i = 0), not the antipodal error; a zero among changed vectors is just one more."""
    from esm_ray.core.slerp import multislerp

    zeros = [torch.zeros(4, 3) for _ in range(3)]
    out = multislerp(zeros, [1.0, 2.0, 3.0])
    assert torch.equal(out, torch.zeros(4, 3))
    v = torch.arange(12.0).reshape(4, 3)
    torch.testing.assert_close(multislerp([v, torch.zeros(4, 3), v], [1.0, 1.0, 1.0]), v * 2 / 3)
    with pytest.raises(ValueError, match="cancel"):
        multislerp([v, -v, torch.zeros(4, 3)], [1.0, 1.0, 1.0])


def test_is_zero_agrees_with_any_nonzero():
    from esm_ray.core.arithmetic import is_zero

    z = torch.zeros(7, 5)
    assert is_zero(z) and is_zero(-z) and is_zero(torch.zeros(0, 3)) and is_zero(z.bfloat16())
    for value in (1e-38, -1e-45, float("nan"), float("inf"), -3.0):
        t = z.clone()
        t[6, 4] = value
        assert not is_zero(t), value
        assert is_zero(t) == (not bool((t != 0).any()))
