"""Routing math (esm_ray.core.routing): residual experts, prototype router, SiM router.

Oracles 9, 10, 11, 17, 18, 19 of the methods reference, plus the ESD optimality of the
residual experts and per-sample grouping.
"""

import pytest
import torch

from esm_ray.core.routing import (
    apply_routed,
    cosine_scores,
    fit_subspace,
    prototype_route,
    residual_expert,
    sim_residuals,
    sim_route,
    stack_experts,
    stack_subspaces,
    token_mean,
    vote,
)
from esm_ray.routed.layers import RoutedLinear, RoutingState


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- oracle 9: a feature equal (up to positive scale) to p_t routes to t --------------------

def test_prototype_routes_feature_to_its_prototype_and_ignores_positive_scale():
    g = _gen(0)
    protos = torch.randn(5, 16, generator=g)
    for t in range(5):
        # tokens whose mean is 3·p_t, spread around it
        noise = torch.randn(7, 16, generator=g)
        tokens = 3.0 * protos[t] + noise - noise.mean(0)
        choice, scores = prototype_route(tokens[None], None, protos)
        assert int(choice) == t
        assert scores[0, t] == pytest.approx(1.0, abs=1e-5)
    x = torch.randn(20, 9, 16, generator=g)
    c1, s1 = prototype_route(x, None, protos)
    for alpha in (1e-3, 0.5, 250.0):
        c2, s2 = prototype_route(alpha * x, None, protos)
        assert torch.equal(c1, c2)
        torch.testing.assert_close(s1, s2, atol=1e-5, rtol=0)


def test_padding_never_changes_the_routing_feature():
    g = _gen(1)
    x = torch.randn(3, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    garbage = x.clone()
    garbage[mask == 0] = 1e3 * torch.randn(int((mask == 0).sum()), 8, generator=g)
    torch.testing.assert_close(token_mean(x, mask), token_mean(garbage, mask))
    torch.testing.assert_close(token_mean(x, mask)[1], x[1, :3].mean(0))
    assert not torch.allclose(token_mean(garbage, None)[1], x[1, :3].mean(0))


# ---- oracle 10: r = d_out with n ≥ d_out gives the residual exactly -----------------------

def test_full_rank_residual_expert_restores_the_expert_weight():
    g = _gen(2)
    d_out, d_in, n = 12, 10, 64
    merged = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    expert = merged + torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    e = residual_expert(expert, merged, x.T @ x, n, rank=d_out)
    assert e.B.shape == (d_out, d_out) and e.A.shape == (d_out, d_in)
    torch.testing.assert_close(merged + e.dense(), expert, atol=1e-10, rtol=0)
    # applied as B(Ax): the same as the dense update
    v = torch.randn(4, d_in, generator=g, dtype=torch.float64)
    torch.testing.assert_close(e.apply(v), v @ (expert - merged).T, atol=1e-10, rtol=0)


def test_residual_expert_is_rank_r_optimal_on_the_calibration_outputs():
    """ESD optimality: no rank-r update (here: the SVD truncation) has a smaller output error."""
    g = _gen(3)
    d_out, d_in, n, r = 16, 12, 40, 3
    merged = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    delta = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, d_in, dtype=torch.float64)
    e = residual_expert(merged + delta, merged, x.T @ x, n, rank=r)
    torch.testing.assert_close(e.B.T @ e.B, torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)
    u, s, vh = torch.linalg.svd(delta)
    svd_r = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    err_esd = torch.linalg.norm(x @ (delta - e.dense()).T)
    err_svd = torch.linalg.norm(x @ (delta - svd_r).T)
    assert err_esd < err_svd  # strictly better here: X is anisotropic


def test_residual_expert_pads_to_the_requested_rank():
    g = _gen(4)
    merged = torch.randn(8, 6, generator=g, dtype=torch.float64)
    low = torch.randn(8, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 6, generator=g, dtype=torch.float64)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    e = residual_expert(merged + low, merged, x.T @ x, 30, rank=5)
    assert e.rank == 5
    assert int((e.A.abs().sum(1) > 0).sum()) == 1  # residual of rank 1: the rest is zero padding
    torch.testing.assert_close(e.dense(), low, atol=1e-10, rtol=0)


# ---- oracle 11: per-sample independence ------------------------------------------------------

def _routed_linear(seed: int, t: int = 4, d_in: int = 12, d_out: int = 10, r: int = 3):
    g = _gen(seed)
    base = torch.nn.Linear(d_in, d_out)
    b = torch.randn(t, d_out, r, generator=g)
    a = torch.randn(t, r, d_in, generator=g)
    protos = torch.randn(t, d_in, generator=g)
    state = RoutingState()
    return RoutedLinear(base, b, a, protos, state, "layer"), state


def test_mixed_batch_routes_each_sample_as_if_alone():
    layer, state = _routed_linear(5)
    g = _gen(6)
    protos = layer.prototypes
    # samples near different prototypes, with different lengths (padding)
    lengths = [7, 3, 5, 1, 6, 2]
    x = torch.randn(len(lengths), 7, 12, generator=g) * 0.3
    mask = torch.zeros(len(lengths), 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] += protos[i % 4]
        mask[i, :n] = 1
        x[i, n:] = 50.0  # padding content must not matter
    with torch.no_grad():
        state.mode, state.mask = "prototype", mask
        y = layer(x)
        batch_choice = state.trace["layer"][0].clone()
        state.reset()
        for i, n in enumerate(lengths):
            state.mode, state.mask = "prototype", mask[i:i + 1]
            yi = layer(x[i:i + 1])
            assert int(state.trace["layer"][0]) == int(batch_choice[i])
            torch.testing.assert_close(yi[0, :n], y[i, :n], atol=1e-5, rtol=1e-5)
            state.reset()
    assert batch_choice.tolist() == [0, 1, 2, 3, 0, 1]


def test_apply_routed_matches_dense_per_sample_updates():
    g = _gen(7)
    t, d_in, d_out, r = 3, 6, 5, 2
    experts = [residual_expert(torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
                               torch.zeros(d_out, d_in, dtype=torch.float64),
                               torch.eye(d_in, dtype=torch.float64), 10, r) for _ in range(t)]
    b, a = stack_experts(experts)
    x = torch.randn(5, 4, d_in, generator=g, dtype=torch.float64)
    choice = torch.tensor([2, -1, 0, 2, 1])
    out = apply_routed(x, b, a, choice)
    for i, c in enumerate(choice.tolist()):
        want = torch.zeros(4, d_out, dtype=torch.float64) if c < 0 else x[i] @ experts[c].dense().T
        torch.testing.assert_close(out[i], want, atol=1e-10, rtol=0)


def test_forced_tasks_override_the_router_per_sample():
    layer, state = _routed_linear(8)
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        state.mode, state.force = "prototype", torch.tensor([2, -1, 0])
        layer(x)
        forced = state.trace["layer"][0]
        state.reset()
        state.mode = "prototype"
        layer(x)
        free = state.trace["layer"][0]
    assert forced[0] == 2 and forced[2] == 0 and forced[1] == free[1]


def test_vote_takes_the_majority_and_breaks_ties_by_score():
    choices = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 1]])
    scores = torch.zeros(2, 4, 3)
    scores[1, :, 1] = 0.9
    assert vote(choices, 3).tolist() == [1, 0]
    assert vote(choices, 3, scores).tolist() == [1, 1]


# ---- SiM: oracles 17, 18, 19 -----------------------------------------------------------------

@pytest.mark.parametrize("center", [True, False])
def test_support_features_have_zero_residual_at_full_rank(center):
    g = _gen(9)
    f = torch.randn(10, 32, generator=g, dtype=torch.float64)
    k = int(torch.linalg.matrix_rank(f - f.mean(0) if center else f))
    sub = fit_subspace(f, rank=k, center=center, normalize=False)
    means, bases = stack_subspaces([sub])
    res = sim_residuals(f, means, bases, normalize=False)
    assert float(res.max()) < 1e-20 * float((f ** 2).sum()) + 1e-18
    # one direction fewer leaves a residual
    sub2 = fit_subspace(f, rank=k - 1, center=center, normalize=False)
    res2 = sim_residuals(f, *stack_subspaces([sub2]), normalize=False)
    assert float(res2.max()) > 1e-6


def _two_tasks(seed: int, n: int, d: int = 24, k: int = 3, noise: float = 0.05):
    """Two zero-mean Gaussian clusters living in different k-dim subspaces."""
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    u0, u1 = q[:, :k], q[:, k:2 * k]
    f0 = torch.randn(n, k, generator=g, dtype=torch.float64) @ u0.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    f1 = torch.randn(n, k, generator=g, dtype=torch.float64) @ u1.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return f0, f1


def test_sim_routes_well_separated_subspaces_almost_perfectly():
    f0, f1 = _two_tasks(10, 532)
    s0, s1 = f0[:32], f1[:32]  # 32 support samples per task
    t0, t1 = f0[32:], f1[32:]  # 500 fresh samples per task from the same clusters
    for normalize in (True, False):
        means, bases = stack_subspaces([fit_subspace(s, 3, center=True, normalize=normalize) for s in (s0, s1)])
        feats = torch.cat([t0, t1])
        truth = torch.cat([torch.zeros(len(t0)), torch.ones(len(t1))]).long()
        choice, scores = sim_route(feats, means, bases, normalize=normalize)
        assert float((choice == truth).float().mean()) >= 0.99
        assert scores.shape == (1000, 2) and bool((scores <= 0).all())
    # the clusters share their mean: the nearest mean alone could not separate them
    near = ((feats[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert float((near == truth).float().mean()) < 0.8


def test_sim_routing_is_invariant_to_an_orthogonal_transform():
    g = _gen(12)
    supports = [torch.randn(16, 20, generator=g, dtype=torch.float64) + 2.0 * torch.randn(20, generator=g, dtype=torch.float64)
                for _ in range(4)]
    feats = torch.randn(50, 20, generator=g, dtype=torch.float64) + 1.0
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    for kw in ({"center": True, "normalize": True}, {"center": False, "normalize": False}):
        a = stack_subspaces([fit_subspace(s, 5, **kw) for s in supports])
        b = stack_subspaces([fit_subspace(s @ q.T, 5, **kw) for s in supports])
        c1, s1 = sim_route(feats, *a, normalize=kw["normalize"])
        c2, s2 = sim_route(feats @ q.T, *b, normalize=kw["normalize"])
        assert torch.equal(c1, c2)
        torch.testing.assert_close(s1, s2, atol=1e-9, rtol=1e-9)


def test_sim_energy_keeps_fewer_directions():
    s0, _ = _two_tasks(13, 32, noise=0.01)
    full = fit_subspace(s0, 8, energy=None)
    lean = fit_subspace(s0, 8, energy=0.9)
    assert int((full.basis.abs().sum(0) > 0).sum()) == 8
    assert int((lean.basis.abs().sum(0) > 0).sum()) <= 3


def test_cosine_scores_are_cosines():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    p = torch.tensor([[3.0, 0.0], [0.0, -1.0]])
    torch.testing.assert_close(cosine_scores(f, p), torch.tensor([[1.0, 0.0], [0.0, -1.0], [2 ** -0.5, -(2 ** -0.5)]]))


def test_mean_token_loglik_equals_cross_entropy_on_real_tokens():
    from esm_ray.core.routing import mean_token_loglik

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])  # left and right padding
    got = mean_token_loglik(logits, ids, mask)
    for i in range(3):
        real = mask[i].nonzero().flatten()
        lo, hi = int(real[0]), int(real[-1])
        ce = torch.nn.functional.cross_entropy(logits[i, lo:hi], ids[i, lo + 1:hi + 1])
        assert torch.allclose(got[i], -ce, atol=1e-6), i
    assert mean_token_loglik(logits, ids, torch.tensor([[0, 0, 0, 0, 0, 1]] * 3)).eq(0).all()


def test_likelihood_route_keeps_ineligible_prototype_choices():
    from esm_ray.core.routing import likelihood_route

    proto = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.9], [0.0, 0.3, 0.2]])
    ll = torch.tensor([[-3.0, -1.0, -0.5], [-1.0, -2.0, -0.1], [-9.0, -9.0, -9.0], [-2.0, -2.5, -0.2]])
    eligible = torch.tensor([True, True, False])
    got = likelihood_route(proto, ll, eligible).argmax(-1).tolist()
    # rows 0, 1 and 3: prototype top-1 eligible -> best likelihood among tasks 0 and 1;
    # row 2: top-1 (task 2) is not eligible -> kept, whatever the likelihoods say
    assert got == [1, 0, 2, 0]
    assert likelihood_route(proto, ll, torch.zeros(3, dtype=torch.bool)).argmax(-1).tolist() == [0, 1, 2, 1]


def test_likelihood_pairs_are_the_prototypes_best_eligible_tasks():
    from esm_ray.core.routing import likelihood_pairs, likelihood_route

    g = torch.Generator().manual_seed(0)
    proto = torch.rand(40, 6, generator=g)
    proto[0] = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.5, 0.0])  # ties go to the lower index
    ll = -torch.rand(40, 6, generator=g) * 5
    eligible = torch.tensor([True, False, True, True, True, False])
    for m in (1, 2, 3, None):
        cand = likelihood_pairs(proto, eligible, m)
        got = likelihood_route(proto, ll, eligible, m).argmax(-1).tolist()
        for i in range(40):
            top = max(range(6), key=lambda t: (float(proto[i, t]), -t))
            if not eligible[top]:
                want_cand, want = [], top
            else:  # the m eligible tasks ranked highest by prototype score, then the best likelihood
                ranked = sorted((t for t in range(6) if eligible[t]), key=lambda t: (-float(proto[i, t]), t))
                want_cand = sorted(ranked if m is None else ranked[:m])
                want = max(want_cand, key=lambda t: float(ll[i, t]))
                assert top in want_cand
            assert cand[i].nonzero().flatten().tolist() == want_cand, (m, i)
            assert got[i] == want, (m, i)
    assert likelihood_pairs(proto, eligible, 2)[0].nonzero().flatten().tolist() == [0, 2]
    # m = 1 is the prototype router; m at least the eligible count is every eligible task
    assert likelihood_route(proto, ll, eligible, 1).argmax(-1).equal(proto.argmax(-1))
    assert likelihood_pairs(proto, eligible, 4).equal(likelihood_pairs(proto, eligible, None))
    with pytest.raises(ValueError, match="at least 1"):
        likelihood_pairs(proto, eligible, 0)


def test_a_likelihood_margin_skips_the_prompts_the_prototypes_are_sure_of():
    """With a margin, a sequence whose best eligible prototype score leads the second eligible
    one by at least the margin gets no pairs and routes as its prototype top-1; the others are
    as without it (checked by brute force)."""
    from esm_ray.core.routing import likelihood_pairs, likelihood_route

    g = torch.Generator().manual_seed(1)
    proto = torch.rand(60, 5, generator=g) * 4
    ll = -torch.rand(60, 5, generator=g) * 5
    eligible = torch.tensor([True, True, False, True, True])
    for margin in (0.3, 1.0):
        for m in (2, None):
            cand = likelihood_pairs(proto, eligible, m, margin)
            free = likelihood_pairs(proto, eligible, m)
            got = likelihood_route(proto, ll, eligible, m, margin).argmax(-1)
            skipped = 0
            for i in range(60):
                best = sorted((float(proto[i, t]) for t in range(5) if eligible[t]), reverse=True)
                if best[0] - best[1] >= margin:
                    skipped += bool(free[i].any())
                    assert not cand[i].any() and int(got[i]) == int(proto[i].argmax())
                else:
                    assert cand[i].equal(free[i])
                    assert int(got[i]) == int(likelihood_route(proto[i:i + 1], ll[i:i + 1], eligible, m).argmax())
            assert skipped > 0  # the margin changes which sequences are scored
    assert likelihood_pairs(proto, eligible, 2, float("inf")).equal(likelihood_pairs(proto, eligible, 2))
    one = torch.tensor([False, False, True, False, False])  # a lone eligible task: nothing to compare
    assert not likelihood_pairs(proto, one, None, 1.0).any()


def test_only_sequences_with_two_candidates_need_a_prefill_and_the_routes_stay():
    """prefilled_pairs keeps the pairs of sequences with at least two candidates; scoring only
    those (0 elsewhere) routes every sequence as scoring all of likelihood_pairs does."""
    from esm_ray.core.routing import likelihood_pairs, likelihood_route, prefilled_pairs

    g = torch.Generator().manual_seed(2)
    proto = torch.rand(60, 5, generator=g) * 4
    ll = -torch.rand(60, 5, generator=g) * 5
    eligible = torch.tensor([True, True, False, True, True])
    assert not prefilled_pairs(likelihood_pairs(proto, eligible, 1)).any()  # m = 1: no prefill at all
    for m in (1, 2, None):
        full = likelihood_pairs(proto, eligible, m)
        kept = prefilled_pairs(full)
        assert kept.equal(full & (full.sum(-1) >= 2)[:, None])
        assert kept.equal(full) == (m != 1)
        only = torch.where(kept, ll, torch.zeros_like(ll))
        assert likelihood_route(proto, only, eligible, m).argmax(-1).equal(
            likelihood_route(proto, ll, eligible, m).argmax(-1))
    one = torch.tensor([False, False, True, False, False])
    assert not prefilled_pairs(likelihood_pairs(proto, one, 2)).any()


def test_prefixed_puts_the_token_just_before_each_first_real_token():
    from esm_ray.routed.lm import _prefixed

    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 4], [3, 2, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])  # left, none, right padding
    got, m = _prefixed(ids, mask, 99)
    assert got.tolist() == [[0, 0, 99, 5, 6], [99, 7, 8, 9, 4], [99, 3, 2, 0, 0]]
    assert m.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
