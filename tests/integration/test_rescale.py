"""Spec `rescale`: the output-shift least-squares factor of each calibrated update, checked
against an independent computation from the cached statistics and the experts' weights, and
Ray against local bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esm_ray.core.rescale import thin as rescale_thin
from esm_ray.errors import SpecError
from esm_ray.io.reader import open_model
from esm_ray.runtime import build_plan, run_merge
from esm_ray.spec import spec_from_dict
from esm_ray.stats.store import StatsStore
from tests.builders import calibration_files, output_files


def _spec(family: dict[str, Path], names: list[str], out: Path, data: list[Path], method: str = "task_arithmetic",
          rescale: dict | None = None, **extra) -> dict:
    experts = [{"name": n, "model": str(family[n]), "data": str(d)} for n, d in zip(names, data)]
    return {"base": str(family["base"]), "experts": experts, "method": {"name": method, "params": {}},
            "output": str(out), "runtime": {"name": "local"}, "dtype": "float32",
            "calibration": {"samples": 8, "max_length": 16, "batch_size": 4, "cache_dir": str(out.parent / "cache")},
            **({"rescale": rescale} if rescale is not None else {}), **extra}


def _weights(d: Path) -> dict[str, torch.Tensor]:
    r = open_model(str(d))
    return {k: r.get(k).to(torch.float64) for k in r.keys()}


def _stats_of(cache: Path) -> dict[str, StatsStore]:
    """{expert model path: its statistics} from the cache's manifests."""
    out = {}
    for m in (cache / "stats").glob("*.json"):
        out[json.loads(m.read_text())["model"]] = StatsStore(m.with_suffix(".safetensors"))
    return out


def _densified(family: dict[str, Path], name: str, tmp: Path) -> dict[str, torch.Tensor]:
    """An expert's weights as a full model (a LoRA adapter merged by the package's own one-expert
    task arithmetic at λ 1, which equals peft's merge: tests/integration/test_lora_merge.py)."""
    out = tmp / f"dense-{name}"
    if not out.exists():
        spec = {"base": str(family["base"]), "experts": [{"name": name, "model": str(family[name])}],
                "method": {"name": "task_arithmetic", "params": {"lambda": 1.0}}, "output": str(out),
                "dtype": "float32"}
        run_merge(spec_from_dict(spec), progress=False)
    return _weights(out)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_factors_equal_an_independent_least_squares_fit(scope, lora_family, tmp_path):
    names = ["full_0", "lora_0", "lora_2"]
    data = calibration_files(tmp_path / "data", 3, vocab=80)
    plain = _spec(lora_family, names, tmp_path / "plain", data)
    scaled = _spec(lora_family, names, tmp_path / "scaled", data, rescale={"scope": scope})
    run_merge(spec_from_dict(plain), progress=False)
    rep = run_merge(spec_from_dict(scaled), progress=False).report["rescale"]
    assert rep["scope"] == scope and rep["rule"] == "output_shift"

    base = _weights(lora_family["base"])
    merged, out = _weights(tmp_path / "plain"), _weights(tmp_path / "scaled")
    stats = _stats_of(tmp_path / "cache")
    experts = {n: _densified(lora_family, n, tmp_path) for n in names}
    nums, dens = {}, {}
    for key in rep["factors"]:
        module = key.removesuffix(".weight")
        m = merged[key] - base[key]
        nums[key] = dens[key] = 0.0
        for n in names:
            st = stats[str(lora_family[n])].get(module)
            c = st.gram / st.n
            tau = experts[n][key] - base[key]
            nums[key] += float(((m @ c) * tau).sum())
            dens[key] += float(((m @ c) * m).sum())
    linear = [k for k in base if k.endswith("proj.weight") or k == "lm_head.weight"]
    assert sorted(rep["factors"]) == sorted(linear)  # every linear layer's weight, the LM head too
    for key, got in rep["factors"].items():
        want = sum(nums.values()) / sum(dens.values()) if scope == "global" else nums[key] / dens[key]
        assert got == pytest.approx(want, rel=1e-6), key
        assert torch.allclose(out[key] - base[key], got * (merged[key] - base[key]), rtol=1e-5, atol=1e-7), key
    for key in base:  # tensors without statistics (norms, embeddings) are the method's own
        if key not in rep["factors"]:
            assert torch.equal(out[key], merged[key]), key
    assert len(set(rep["factors"].values())) == (1 if scope == "global" else len(rep["factors"]))


def test_rescale_needs_calibration_data(lora_family, tmp_path):
    spec = _spec(lora_family, ["lora_0", "lora_2"], tmp_path / "out", [tmp_path / "a", tmp_path / "b"],
                 rescale={})
    for e in spec["experts"]:
        del e["data"]
    with pytest.raises(SpecError, match=r"experts\.0\.data.*rescale"):
        build_plan(spec_from_dict(spec))
    assert not (tmp_path / "out").exists()
    spec["rescale"] = {"rule": "none"}  # off: task arithmetic reads no data
    assert build_plan(spec_from_dict(spec)).rescale is None


@pytest.mark.parametrize("names, rescale", [(["full_0", "lora_0", "lora_2"], {}),  # dense updates
                                            (["lora_0", "lora_1", "lora_2"], None)])  # ESM's default: thin
def test_ray_equals_local_bytes_for_esm_rescaled(names, rescale, lora_family, ray_driver, tmp_path):
    """ESM's own layer scales, then the rescale, on the Ray expert actors as in one process;
    with adapters only, the updates travel in thin form (core.rescale.Thin)."""
    data = calibration_files(tmp_path / "data", 3, vocab=80)
    for runtime in ("local", "ray"):
        spec = _spec(lora_family, names, tmp_path / runtime, data, "esm", rescale=rescale, runtime={"name": runtime})
        rep = run_merge(spec_from_dict(spec), progress=False).report
        assert rep["executor"] == runtime and rep["rescale"]["factors"]
    assert output_files(tmp_path / "ray") == output_files(tmp_path / "local")


@pytest.mark.parametrize("method", ["tsvm", "esm"])
def test_no_adapter_scale_note_once_rescaled(method, lora_family, tmp_path):
    """The plan's note on the default scale of adapters proposes `rescale`; with it set, none."""
    names = ["lora_0", "lora_1", "lora_2"]
    data = calibration_files(tmp_path / "data", 3, vocab=80)
    notes = build_plan(spec_from_dict(_spec(lora_family, names, tmp_path / "o", data, method))).notes
    assert [n for n in notes if "every expert an adapter" in n and "rescale" in n]
    notes = build_plan(spec_from_dict(_spec(lora_family, names, tmp_path / "o", data, method, rescale={}))).notes
    assert not [n for n in notes if "every expert an adapter" in n]
    assert any(line.startswith("rescale:  output_shift per tensor")
               for line in build_plan(spec_from_dict(_spec(lora_family, names, tmp_path / "o", data, method,
                                                           rescale={}))).describe().splitlines())


def test_esm_rescales_adapters_by_default(lora_family, tmp_path, monkeypatch):
    """ESM at alpha 1 on adapters only: the rescale runs unasked (plan note, report), its wide
    updates sent in thin form; `rule: none` or a full expert among them: no rescale."""
    import esm_ray.runtime.job as job

    thinned = []
    monkeypatch.setattr(job, "thin", lambda m, k: thinned.append(t := rescale_thin(m, k)) or t)
    data = calibration_files(tmp_path / "data", 2, vocab=80)
    adapters = _spec(lora_family, ["lora_0", "lora_2"], tmp_path / "ad", data, "esm")
    plan = build_plan(spec_from_dict(adapters))
    assert plan.rescale is not None and [n for n in plan.notes if "rescaled by its output-shift" in n]
    assert run_merge(spec_from_dict(adapters), progress=False).report["rescale"]["scope"] == "tensor"
    assert any(t is not None for t in thinned)  # rank 2 + 3 of 48-wide up_proj outputs: thin
    off = _spec(lora_family, ["lora_0", "lora_2"], tmp_path / "off", data, "esm", rescale={"rule": "none"})
    assert "rescale" not in run_merge(spec_from_dict(off), progress=False).report
    assert any(not torch.equal(a, b) for a, b in zip(_weights(tmp_path / "ad").values(),
                                                       _weights(tmp_path / "off").values()))
    mixed = _spec(lora_family, ["full_0", "lora_0"], tmp_path / "mixed", data, "esm")
    assert build_plan(spec_from_dict(mixed)).rescale is None
    alpha = _spec(lora_family, ["lora_0", "lora_2"], tmp_path / "alpha", data, "esm")
    alpha["method"]["params"] = {"alpha": 0.5}
    assert build_plan(spec_from_dict(alpha)).rescale is None
