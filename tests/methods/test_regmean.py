"""RegMean against an independent dense least-squares solution.

The Grams are taken here from the calibration rows with forward hooks on the tiny LLaMA experts
(not from the statistics cache), and the least squares min Σ_i ||X_i Wᵀ − X_i W_iᵀ||² is solved
with numpy's lstsq on the stacked rows, never through the normal equations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from esm_ray.core.regmean import reduce_off_diagonal, regmean, regmean_solve
from esm_ray.errors import InputError, SpecError
from esm_ray.methods import build_method
from esm_ray.methods.base import ExpertContext, TensorInfo
from esm_ray.runtime import run_merge
from esm_ray.spec import spec_from_dict
from esm_ray.stats.data import load_calibration_rows

ROWS = (5, 9, 14)  # calibration rows per expert: unequal, so `normalize` matters
LENGTH = 7
LINEARS = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj",
           "model.layers.0.mlp.down_proj", "lm_head")


def _data(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    out = []
    for i, n in enumerate(ROWS):
        p = root / f"task_{i}.jsonl"
        ids = torch.randint(1, 80, (n, LENGTH), generator=g).tolist()
        p.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids))
        out.append(p)
    return out


def _inputs(model_dir: Path, data: Path, modules: tuple[str, ...]) -> dict[str, np.ndarray]:
    """{module: X (tokens, d_in) float64}: the inputs of each linear layer over all rows of `data`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = load_calibration_rows(str(data), 1000, 0)
    ids = torch.tensor([r["input_ids"] for r in rows])
    got: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    hooks = [mods[m].register_forward_hook(lambda mod, inp, out, m=m: got.__setitem__(m, inp[0].detach()))
             for m in modules]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    for h in hooks:
        h.remove()
    return {m: got[m].reshape(-1, got[m].shape[-1]).double().numpy() for m in modules}


def _weight(model_dir: Path, key: str) -> np.ndarray:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return f.get_tensor(key).double().numpy()


def _lstsq(xs: list[np.ndarray], ws: list[np.ndarray], normalize: bool) -> np.ndarray:
    """argmin_W Σ_i c_i ||X_i Wᵀ − X_i W_iᵀ||² (c_i = 1/n_i when normalize) by dense lstsq."""
    a = np.concatenate([x / np.sqrt(len(x) if normalize else 1.0) for x in xs])
    b = np.concatenate([x @ w.T / np.sqrt(len(x) if normalize else 1.0) for x, w in zip(xs, ws)])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    data = _data(tmp_path_factory.mktemp("regmean_data"))
    xs = [_inputs(tiny_llama[f"expert_{i}"], data[i], LINEARS) for i in range(3)]
    return data, xs


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("normalize", [True, False])
def test_core_equals_dense_least_squares_at_alpha_one(tiny_llama, setup, normalize):
    _, xs = setup
    for m in LINEARS:
        ws = [_weight(tiny_llama[f"expert_{i}"], f"{m}.weight") for i in range(3)]
        grams = [torch.from_numpy(x[m].T @ x[m] / (len(x[m]) if normalize else 1.0)) for x in xs]
        got = regmean([torch.from_numpy(w) for w in ws], grams, alpha=1.0).numpy()
        want = _lstsq([x[m] for x in xs], ws, normalize)
        assert _rel(got, want) < 1e-8, m


def test_alpha_below_one_matches_the_numpy_formula():
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((5, 4)) for _ in range(3)]
    grams = [(lambda x: x.T @ x)(rng.standard_normal((6, 4))) for _ in range(3)]
    scales = [1.0, 0.5, 2.0]
    alpha = 0.7
    red = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    want = sum(s * w @ r for s, w, r in zip(scales, ws, red)) @ np.linalg.inv(sum(s * r for s, r in zip(scales, red)))
    got = regmean([torch.from_numpy(w) for w in ws], [torch.from_numpy(g) for g in grams], alpha, scales)
    assert _rel(got.numpy(), want) < 1e-12
    g = torch.from_numpy(grams[0])
    assert torch.equal(reduce_off_diagonal(g, 0.0), torch.diag(torch.diag(g)))
    assert torch.equal(reduce_off_diagonal(g, 1.0), g)


def test_singular_system_falls_back_to_minimum_norm_least_squares():
    g = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64))  # the second feature never seen
    w, exact = regmean_solve(torch.tensor([[4.0, 0.0]], dtype=torch.float64), g)
    assert not exact and torch.allclose(w, torch.tensor([[2.0, 0.0]], dtype=torch.float64))


def _merge(tiny_llama, data, out: Path, params: dict, weights=(1.0, 1.0, 1.0), runtime: dict | None = None,
           gram_precision: str = "float64"):
    """A RegMean merge of the tiny LLaMA experts. The tests compare against exact solves, so the
    statistics are float64 by default (a solve amplifies the mixed Gram's ~1e-7 error by the
    summed Gram's condition number; see docs/methods-subspace.md)."""
    experts = [{"name": f"e{i}", "model": str(tiny_llama[f"expert_{i}"]), "data": str(data[i]),
                "weight": weights[i]} for i in range(3)]
    spec = {"base": str(tiny_llama["base"]), "experts": experts, "output": str(out),
            "method": {"name": "regmean", "params": params},
            "calibration": {"samples": 100, "max_length": 16, "batch_size": 4,
                            "cache_dir": str(out.parent / "cache"), "gram_precision": gram_precision},
            "runtime": {"name": "local"} | (runtime or {})}
    return run_merge(spec_from_dict(spec), progress=False)


@pytest.mark.parametrize("normalize", [True, False])
def test_merged_model_equals_dense_least_squares(tiny_llama, setup, tmp_path, normalize):
    """End to end through the statistics cache: every calibrated linear weight is the least-squares
    solution (to float32 output precision); norms, embeddings and biases the mean of the experts."""
    data, xs = setup
    result = _merge(tiny_llama, data, tmp_path / "out", {"alpha": 1.0, "normalize": normalize})
    rep = result.report["method_report"]
    assert rep["singular"] == [] and rep["solved"] == 15 and rep["averaged"] == 6  # 7 linears × 2 layers + lm_head; 4 norms, final norm, embedding
    out = tmp_path / "out"
    merged = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            merged.update({k: st.get_tensor(k).double().numpy() for k in st.keys()})
    for m in LINEARS:
        ws = [_weight(tiny_llama[f"expert_{i}"], f"{m}.weight") for i in range(3)]
        assert _rel(merged[f"{m}.weight"], _lstsq([x[m] for x in xs], ws, normalize)) < 2e-6, m
    for key in ("model.norm.weight", "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"):
        mean = np.mean([_weight(tiny_llama[f"expert_{i}"], key) for i in range(3)], axis=0)
        assert np.allclose(merged[key], mean, rtol=0, atol=1e-6), key


def test_weights_scale_grams_and_means(tiny_llama, setup, tmp_path):
    data, xs = setup
    w = (1.0, 0.0, 3.0)
    _merge(tiny_llama, data, tmp_path / "out", {"alpha": 1.0}, weights=w)
    with safe_open(str(next((tmp_path / "out").glob("*.safetensors"))), "pt") as st:
        got = st.get_tensor("lm_head.weight").double().numpy()
        norm = st.get_tensor("model.norm.weight").double().numpy()
    keep = [0, 2]
    xs_w = [xs[i]["lm_head"] * np.sqrt(w[i]) for i in keep]
    ws = [_weight(tiny_llama[f"expert_{i}"], "lm_head.weight") for i in keep]
    assert _rel(got, _lstsq(xs_w, ws, True)) < 2e-6
    mean = sum(w[i] * _weight(tiny_llama[f"expert_{i}"], "model.norm.weight") for i in range(3)) / sum(w)
    assert np.allclose(norm, mean, atol=1e-6)


def test_bad_weights_and_mixed_statistics_are_named():
    method = build_method("regmean", {}, n_experts=2)
    info = TensorInfo.of("layer.0.dense.weight", (3, 4), "layer.0.dense")
    from esm_ray.core.layerstats import LayerStats

    x = torch.randn(8, 4)
    base, e = torch.zeros(3, 4), torch.ones(3, 4)
    with_stats = method.prepare(info, base, e, ExpertContext(0, "a", stats=LayerStats.from_rows(x)))
    without = method.prepare(info, base, e, ExpertContext(1, "b"))
    with pytest.raises(InputError, match="layer.0.dense.weight"):
        method.fuse(info, base, [with_stats, without], [ExpertContext(0, "a"), ExpertContext(1, "b")])
    with pytest.raises(SpecError, match="weight"):
        method.fuse(info, base, [without, without], [ExpertContext(0, "a", weight=-1.0), ExpertContext(1, "b")])
    part = with_stats
    assert part.nbytes == 8 * 4 * (3 + 4)  # 8 · d_in · (d_out + d_in)


def test_dry_run_states_its_needs(tiny_llama, setup, tmp_path, capsys):
    from esm_ray.cli import main

    data, _ = setup
    experts = [{"name": f"e{i}", "model": str(tiny_llama[f"expert_{i}"]), "data": str(data[i])} for i in range(3)]
    spec = {"base": str(tiny_llama["base"]), "experts": experts, "output": str(tmp_path / "out"),
            "method": {"name": "regmean"}, "calibration": {"cache_dir": str(tmp_path / "cache")}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "s.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "needs:    calibration data" in out and "regmean" in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    del spec["experts"][1]["data"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "s.yaml"), "--dry-run"]) == 2
    assert "experts.1.data" in capsys.readouterr().err
