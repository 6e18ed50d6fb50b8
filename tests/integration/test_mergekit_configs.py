"""mergekit YAML configurations run unchanged through `esm-ray merge` and `esm-ray mergekit`,
compared tensor by tensor with mergekit-yaml 0.1.5 (its own venv, tests/fixtures/mergekit.py)
on a tiny LLaMA family: gradients and filters at global, per-model and per-slice level,
frankenmerge slices with passthrough, a merged slice, a tokenizer from a named model, a hub
name refused, mergekit-yaml's flags.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from esm_ray.cli import main
from tests.methods.test_mergekit_methods import _make_family, _tensors


def _configs(fam: dict[str, Path]) -> dict[str, dict]:
    b, e0, e1, e2 = (str(fam[k]) for k in ("base", "expert_0", "expert_1", "expert_2"))
    return {
        # global gradient (density), filter with fallback (lambda), per-model gradient (weight)
        "ties-gradients": {
            "merge_method": "ties", "base_model": b, "dtype": "float32",
            "parameters": {"density": [0.3, 0.9], "lambda": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]},
            "models": [{"model": e0, "parameters": {"weight": [1.0, 0.2], "density": 0.5}},
                       {"model": e1, "parameters": {"weight": 0.6}},
                       {"model": b}]},
        # per-model filter without fallback: falls back to the global weight
        "ta-filters": {
            "merge_method": "task_arithmetic", "base_model": b, "dtype": "float32",
            "parameters": {"weight": 0.3, "normalize": False},
            "models": [{"model": e0, "parameters": {"weight": [{"filter": "self_attn", "value": [0.9, 0.1]}]}},
                       {"model": e2}]},
        # frankenmerge: layers 0-1 of expert 0, then layer 1 of expert 1 (3 output layers)
        "franken": {
            "merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": e0, "layer_range": [0, 2]}]},
                       {"sources": [{"model": e1, "layer_range": [1, 2]}]}]},
        # merged slices with slerp and the classic per-slice filtered gradients
        "slerp-slices": {
            "merge_method": "slerp", "base_model": b, "dtype": "float32",
            "slices": [{"sources": [{"model": b, "layer_range": [0, 2]}, {"model": e0, "layer_range": [0, 2]}],
                        "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]},
                                             {"filter": "mlp", "value": [0.8, 0.2]}]}}],
            "parameters": {"t": 0.5}},
    }


VIA_MERGE = {"ties-gradients", "ta-filters", "franken", "slerp-slices"}
VIA_MERGEKIT = {"ties-gradients", "franken", "slerp-slices"}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return _make_family(tmp_path_factory.mktemp("mkcfg") / "llama", "llama", seed=21)


@pytest.fixture(scope="module")
def written(family, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mkcfg_yaml")
    out = {}
    for name, cfg in _configs(family).items():
        out[name] = root / f"{name}.yml"
        out[name].write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture(scope="module")
def theirs(family, mergekit, tmp_path_factory) -> Path:
    """Every config merged by one mergekit-multi process: {root}/{name}/."""
    root = tmp_path_factory.mktemp("mkcfg_out")
    docs = [{"name": n, **c} for n, c in _configs(family).items()]
    (root / "all.yml").write_text(yaml.safe_dump_all(docs))
    r = subprocess.run([str(mergekit.parent / "mergekit-multi"), str(root / "all.yml"), "-I", str(root)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return root


def _compare(ours: Path, ref: Path, atol: float) -> None:
    a, b = _tensors(ours), _tensors(ref)
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for n in sorted(b):
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", sorted(VIA_MERGE))
def test_esm_ray_merge_runs_mergekit_yaml(name, written, theirs, tmp_path):
    out = tmp_path / "out"
    assert main(["-q", "merge", str(written[name]), "--output", str(out), "--no-progress"]) == 0
    _compare(out, theirs / name, atol=0 if name.startswith(("ties", "ta")) else 1e-5)
    if name == "franken":
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["num_hidden_layers"] == 3


@pytest.mark.parametrize("name", sorted(VIA_MERGEKIT))
def test_esm_ray_mergekit_command(name, written, theirs, tmp_path, caplog):
    out = tmp_path / "out"
    rc = main(["-q", "mergekit", str(written[name]), str(out), "--cuda" if False else "--lazy-unpickle",
               "--allow-crimes", "--copy-tokenizer", "--no-write-model-card", "--out-shard-size", "1B",
               "--no-progress"])
    assert rc == 0
    _compare(out, theirs / name, atol=0 if name.startswith("ties") else 1e-5)


def test_dry_run_prints_per_tensor_values(written, capsys, tmp_path):
    assert main(["-q", "mergekit", str(written["ties-gradients"]), str(tmp_path / "never-written"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "model.layers.1.mlp.up_proj.weight" in x)
    assert "t=1.000" in line and "density=0.9" in line and "lambda=0.5" in line and "weight=0.2" in line
    line = next(x for x in out.splitlines() if "model.layers.0.self_attn.q_proj.weight" in x)
    assert "density=0.3" in line and "lambda=1" in line and "weight=1" in line


def test_tokenizer_from_a_named_model(family, tmp_path):
    (family["expert_1"] / "tokenizer_config.json").write_text('{"from": "expert_1"}')
    (family["base"] / "tokenizer_config.json").write_text('{"from": "base"}')
    cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": str(family["expert_1"]),
           "models": [{"model": str(family["expert_0"])}, {"model": str(family["expert_1"])}]}
    path = tmp_path / "tok.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "merge", str(path), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"from": "expert_1"}
    cfg["tokenizer_source"] = "union"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "merge", str(path), "--output", str(tmp_path / "out2")]) == 2


def test_hub_name_is_refused_by_name(family, tmp_path, capsys):
    cfg = {"merge_method": "slerp", "base_model": str(family["base"]), "parameters": {"t": 0.5},
           "models": [{"model": "mistralai/Mistral-7B-v0.1"}, {"model": str(family["base"])}]}
    path = tmp_path / "hub.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "mergekit", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "mistralai/Mistral-7B-v0.1" in err and "never downloads" in err and "models.0.model" in err
    assert not (tmp_path / "out").exists()


def test_unknown_flag_is_refused_by_name(written, tmp_path, capsys):
    assert main(["-q", "mergekit", str(written["franken"]), str(tmp_path / "out"), "--frobnicate"]) == 2
    assert "--frobnicate" in capsys.readouterr().err
    assert main(["-q", "mergekit", str(written["franken"]), str(tmp_path / "out"),
                 "--unsafe-truncate-embeddings"]) == 2
    assert "--unsafe-truncate-embeddings" in capsys.readouterr().err


def test_native_spec_takes_gradients_and_filters(family, tmp_path):
    """The same resolution in a native spec: method and per-expert settings."""
    from esm_ray.runtime import run_merge
    from esm_ray.spec import spec_from_dict

    spec = {"base": str(family["base"]), "output": str(tmp_path / "a"), "dtype": "float32",
            "experts": [{"name": "a", "model": str(family["expert_0"]), "params": {"weight": [1.0, 0.0]}}],
            "method": {"name": "task_arithmetic", "params": {"lambda": [{"filter": "mlp", "value": 0.0},
                                                                         {"value": 1.0}]}}}
    run_merge(spec_from_dict(spec), progress=False)
    out, base, e0 = _tensors(tmp_path / "a"), _tensors(family["base"]), _tensors(family["expert_0"])
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"])
    torch.testing.assert_close(out["model.layers.0.self_attn.q_proj.weight"],
                               e0["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=1e-6)
