"""An ESM merge whose experts are calibrated layer-wise gives the tensors of the full-pass merge,
on the local executor and on Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.builders import calibration_files, import_methods, merge_spec

import_methods()

from esm_ray.runtime import run_merge  # noqa: E402
from esm_ray.spec import spec_from_dict  # noqa: E402


@pytest.fixture(scope="module")
def data(tiny_llama, tmp_path_factory) -> list[Path]:
    return calibration_files(tmp_path_factory.mktemp("calib_lw"), 3, vocab=80)


def _merge(tiny_llama, data, out: Path, cache: Path, mode: str, runtime: dict | None = None,
           method: str = "esm") -> dict:
    spec = merge_spec(tiny_llama, out, method, data=data, cache_dir=cache, runtime=runtime)
    spec["calibration"] = {**spec["calibration"], "mode": mode}
    result = run_merge(spec_from_dict(spec), progress=False)
    assert result.report["calibration"]["mode"] == mode
    return {f"{f.relative_to(out)}:{k}": v for f in sorted(out.rglob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def full_merge(tiny_llama, data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lw_full")
    return _merge(tiny_llama, data, root / "out", root / "cache", "full")


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_layerwise_esm_merge_equals_full_locally(tiny_llama, data, full_merge, tmp_path):
    _assert_same(_merge(tiny_llama, data, tmp_path / "out", tmp_path / "cache", "layerwise"), full_merge)


@pytest.mark.slow  # ~30 s of Ray actors on a 2-core box
def test_layerwise_esm_merge_equals_full_on_ray(ray_driver, tiny_llama, data, full_merge, tmp_path):
    got = _merge(tiny_llama, data, tmp_path / "out", tmp_path / "cache", "layerwise", runtime={"name": "ray"})
    _assert_same(got, full_merge)


def test_layerwise_sim_merge_equals_full_locally(tiny_llama, data, tmp_path, monkeypatch):
    """SiM's support features come from the base run one block at a time (runtime.support) in
    layer-wise mode: the routed model (experts and the SiM router's subspaces) equals the full
    pass's."""
    from esm_ray.runtime import support

    full = _merge(tiny_llama, data, tmp_path / "full", tmp_path / "cf", "full", method="sim")
    runs = []
    real = support.calibrate_layerwise
    monkeypatch.setattr(support, "calibrate_layerwise", lambda *a, **k: runs.append(k) or real(*a, **k))
    layer = _merge(tiny_llama, data, tmp_path / "layer", tmp_path / "cl", "layerwise", method="sim")
    assert len(runs) == 3 and all(k["modules"] == [] for k in runs)  # one per expert, features only
    assert any("router" in k or "sim" in k for k in full), sorted(full)[:5]
    _assert_same(layer, full)
