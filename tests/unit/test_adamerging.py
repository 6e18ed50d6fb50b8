"""AdaMerging: the entropy objective, the functional_call merged-model wrapper (task- and
layer-wise), and the `adamerging` method end to end on tiny BERT and LLaMA families."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import esm_ray.methods.adamerging  # noqa: F401  (registers adamerging)
from esm_ray.core.adamerging import (coefficient_table, entropy, entropy_objective, information_loss, init_coefficients,
                                     marginal_entropy, project_)
from esm_ray.methods.adamerging import SearchResult
from esm_ray.runtime import run_merge
from tests.oracles import MergedModel, stack_task_vectors
from tests.unit.test_concrete import search_family, search_spec, separable_tasks, task_entropy


def test_entropy_definition():
    assert entropy(torch.zeros(5, 4)).item() == pytest.approx(math.log(4), abs=1e-6)
    assert entropy(torch.tensor([[30.0, 0.0, 0.0]])).item() < 1e-9
    logits = torch.randn(6, 3, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    ref = sum(-(p[b] * torch.log(p[b] + 1e-8)).sum() for b in range(6)) / 6  # mean over the batch
    assert entropy(logits).item() == pytest.approx(ref.item(), rel=1e-12)
    a, b = torch.randn(2, 3), torch.randn(4, 5)
    assert entropy_objective([a, b]).item() == pytest.approx((entropy(a) + entropy(b)).item(), rel=1e-6)
    with pytest.raises(ValueError):
        entropy_objective([])


def test_information_loss_definition():
    """mean entropy − entropy of the mean prediction: 0 for uniform predictions and for one
    confident class everywhere (the collapse entropy alone rewards), −log C for confident
    predictions spread evenly over the C classes; ≤ 0 always (the entropy is concave)."""
    assert information_loss(torch.zeros(6, 3)).item() == pytest.approx(0.0, abs=1e-6)
    one_class = torch.tensor([[40.0, 0.0]] * 4)
    assert abs(information_loss(one_class).item()) < 1e-6 and entropy(one_class).item() < 1e-9
    spread = torch.tensor([[40.0, 0.0], [0.0, 40.0]] * 2)
    assert information_loss(spread).item() == pytest.approx(-math.log(2), abs=1e-6)
    logits = torch.randn(8, 5, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    pbar = p.mean(0)
    assert marginal_entropy(logits).item() == pytest.approx(float(-(pbar * torch.log(pbar + 1e-8)).sum()), rel=1e-12)
    assert information_loss(logits).item() == pytest.approx(
        (entropy(logits) - marginal_entropy(logits)).item(), rel=1e-12)
    assert all(information_loss(torch.randn(7, 4) * s).item() <= 1e-7 for s in (0.1, 1.0, 10.0))


def test_coefficients_init_projection_and_table():
    c = init_coefficients(3, None, 0.3)
    assert c.shape == (3,) and c.requires_grad and torch.allclose(c, torch.full((3,), 0.3))
    c = init_coefficients(2, 4, [0.1, 0.5])
    assert c.shape == (2, 4) and torch.equal(c[:, 2], torch.tensor([0.1, 0.5]))
    with torch.no_grad():
        c[0, 0], c[1, 1] = -0.4, 1.7
    project_(c, (0.0, 1.0))
    assert float(c.min()) == 0.0 and float(c.max()) == 1.0
    project_(c, None)  # no clamp: unchanged
    assert coefficient_table(c, ["a", "b", "c", "d"])["c"] == [0.1, 0.5]
    assert coefficient_table(torch.tensor([0.2, 0.4]), [])["*"] == [0.2, 0.4]
    with pytest.raises(ValueError):
        init_coefficients(3, None, [0.1, 0.2])


def _mlp(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).to(dtype)
    base = {n: torch.randn(p.shape, generator=g, dtype=dtype) for n, p in net.named_parameters()}
    tv = stack_task_vectors([{n: 0.2 * torch.randn(b.shape, generator=g, dtype=dtype) for n, b in base.items()}
                             for _ in range(3)])
    return net, base, tv


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_merged_model_forward_is_the_module_at_the_merged_weights(granularity):
    net, base, tv = _mlp()
    mm = MergedModel(net, base, tv, granularity=granularity, init=[0.3, 0.5, 0.2])
    with torch.no_grad():
        mm.coefficients.add_(0.05 * torch.arange(mm.coefficients.numel(), dtype=torch.float64)
                             .reshape(mm.coefficients.shape))
    x = torch.randn(5, 3, dtype=torch.float64)
    names = list(tv)
    c = mm.coefficients.detach()
    ref_net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).to(torch.float64)
    sd = {}
    for k, n in enumerate(names):
        lam = c if c.ndim == 1 else c[:, k]
        sd[n] = base[n] + sum(lam[i] * tv[n][i] for i in range(3))
    ref_net.load_state_dict(sd)
    torch.testing.assert_close(mm(x), ref_net(x))
    # a mask on one tensor multiplies that tensor's merged update only
    mask = {names[0]: torch.rand(tv[names[0]].shape[1:], dtype=torch.float64)}
    merged = mm.merged_params(mask)
    lam0 = c if c.ndim == 1 else c[:, 0]
    torch.testing.assert_close(merged[names[0]], base[names[0]] + mask[names[0]] * sum(lam0[i] * tv[names[0]][i]
                                                                                         for i in range(3)))
    torch.testing.assert_close(merged[names[1]], sd[names[1]])


def test_merged_model_coefficient_gradient_matches_finite_differences():
    net, base, tv = _mlp()
    mm = MergedModel(net, base, tv, granularity="layer")
    x = torch.randn(7, 3, dtype=torch.float64)
    loss = lambda: entropy(mm(x))  # noqa: E731
    loss().backward()
    g = mm.coefficients.grad.clone()
    assert all(p.grad is None for p in net.parameters())  # the wrapped module stays frozen
    eps = 1e-6
    for idx in [(0, 0), (1, 1), (2, 3)]:
        with torch.no_grad():
            mm.coefficients[idx] += eps
            up = loss().item()
            mm.coefficients[idx] -= 2 * eps
            down = loss().item()
            mm.coefficients[idx] += eps
        assert g[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-10)
    fixed = MergedModel(net, base, tv, learn_coefficients=False)
    assert not fixed.coefficients.requires_grad
    with pytest.raises(ValueError, match="not a parameter"):
        MergedModel(net, base, {"nope.weight": tv["0.weight"]})


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_lowers_the_entropy_on_a_separable_problem(granularity):
    net, base, tv, heads, xs, ys = separable_tasks(seed=0)
    mm = MergedModel(net, base, tv, granularity=granularity, clamp=(0.0, 1.0))
    opt = torch.optim.Adam([mm.coefficients], lr=0.02)
    curve = []
    for _ in range(12):
        loss = task_entropy(net, mm.merged_params(), heads, xs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mm.project()
        curve.append(loss.item())
    assert curve[-1] < 0.8 * curve[0]
    assert all(b <= a + 1e-6 for a, b in zip(curve, curve[1:]))  # full batch, small steps: monotone
    assert float(mm.coefficients.min()) >= 0.0 and float(mm.coefficients.max()) <= 1.0


def test_search_result_weights_for():
    r = SearchResult(names=["a", "b"], weights=[0.3, 0.3])
    assert r.weights_for("a") == [0.3, 0.3]
    r = SearchResult(names=["a", "b"], weights=[0.3, 0.3], coefficients=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert r.weights_for("b").tolist() == [2.0, 4.0] and r.weights_for("other") == [0.3, 0.3]
    r = SearchResult(names=["a"], weights=[0.3, 0.3], coefficients=torch.tensor([0.5, 0.75]))
    assert r.weights_for("zzz").tolist() == [0.5, 0.75]


# ---- end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_fam(tmp_path_factory):
    return search_family(tmp_path_factory.mktemp("adamerging_bert"), rows=12)


def _sd(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_adamerging_layer_wise_end_to_end(bert_fam, tmp_path):
    # the whole unlabelled set as the batch: a deterministic objective that must go down
    p = {"steps": 6, "batch_size": 12, "lr": 0.05, "granularity": "layer"}
    res = run_merge(search_spec(bert_fam, tmp_path / "o", "adamerging", p), progress=False)
    curve = [h["objective"] for h in res.report["method_report"]["search"]["objective_curve"]]
    assert len(curve) == 6 and curve[-1] < curve[0]
    table = json.loads((tmp_path / "o" / "adamerging" / "coefficients.json").read_text())
    assert table["granularity"] == "layer"
    merged, base = _sd(tmp_path / "o"), _sd(bert_fam["base"])
    experts = [_sd(bert_fam[f"expert_{i}"]) for i in range(3)]
    assert set(table["coefficients"]) == {k for k in base if base[k].is_floating_point()}
    moved = [k for k, v in table["coefficients"].items() if any(abs(c - 0.3) > 1e-4 for c in v)]
    assert len(moved) > len(table["coefficients"]) // 2
    for k in ("encoder.layer.0.attention.self.query.weight", "embeddings.LayerNorm.weight"):
        lam = table["coefficients"][k]
        want = base[k] + sum(lam[i] * (experts[i][k] - base[k]) for i in range(3))
        torch.testing.assert_close(merged[k], want, atol=2e-6, rtol=1e-5)
    assert not (tmp_path / "o" / "concrete").exists()  # no mask for plain AdaMerging


def test_adamerging_task_wise_on_a_causal_lm(tmp_path):
    fam = search_family(tmp_path / "llama", arch="llama", n=2, rows=8, heads=False)
    p = {"steps": 2, "batch_size": 4, "granularity": "task", "clamp": True}
    res = run_merge(search_spec(fam, tmp_path / "o", "adamerging", p, n=2), progress=False)
    rep = res.report["method_report"]
    assert rep["search"]["steps"] == 2
    # first-token entropy over an 80-token vocabulary, summed over 2 tasks
    assert 0.0 < rep["search"]["objective_first"] <= 2 * math.log(80) + 1e-4
    assert len(rep["coefficients"]["*"]) == 2


def test_each_objective_reaches_the_expert_sides(bert_fam, tmp_path):
    """`objective` is what every expert side computes: the summed information loss is ≤ 0
    (each task's mean entropy is at most the entropy of its mean prediction), where the
    default entropy objective of the same search is > 0; the distillation objective is ≥ 0 and
    falls; every search moves the coefficients."""
    first, last = {}, {}
    for objective in ("entropy", "im", "distill"):
        p = {"steps": 2, "batch_size": 12, "lr": 0.05, "granularity": "task", "objective": objective}
        res = run_merge(search_spec(bert_fam, tmp_path / objective, "adamerging", p), progress=False)
        rep = res.report["method_report"]
        first[objective], last[objective] = rep["search"]["objective_first"], rep["search"]["objective_last"]
        assert any(abs(c - 0.3) > 1e-4 for c in rep["coefficients"]["*"])
    assert first["entropy"] > 0 > first["im"]
    assert first["distill"] > last["distill"] >= 0


def test_distillation_loss_is_the_kl_divergence_from_the_teacher():
    from esm_ray.core.adamerging import distillation_loss

    logits, teacher = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    q, p = torch.softmax(teacher, -1), torch.softmax(logits, -1)
    ref = float((q * (q.log() - p.log())).sum(-1).mean())
    assert distillation_loss(logits, torch.log_softmax(teacher, -1)).item() == pytest.approx(ref, rel=1e-12)
    assert abs(distillation_loss(teacher, torch.log_softmax(teacher, -1)).item()) < 1e-12
