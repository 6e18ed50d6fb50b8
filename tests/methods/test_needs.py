"""Each method's needs are declared once and checked by the plan before any work.

The dry run states them, and a spec that lacks one (unlabelled data, a task head) fails in
`--dry-run` and before any calibration or search, naming the expert and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.family import make_family
from tests.builders import calibration_files, import_methods
from tests.builders import TEST_CALIBRATION, method_experts, method_params, write_spec

import_methods()

from esm_ray.cli import main  # noqa: E402
from esm_ray.methods import METHODS, PURIFIERS, Needs, build_method  # noqa: E402

DATA_METHODS = ("concrete_ta", "adamerging", "concrete_adamerging", "esm", "esm_pp", "sim", "regmean")


def _spec(path: Path, family: dict[str, Path], out: Path, method: str, data: list[Path] | None = None,
          **extra) -> Path:
    return write_spec(path, family, out, method, params=method_params(method), data=data,
                      calibration=TEST_CALIBRATION | {"cache_dir": str(path.parent / "cache")}, **extra)


def test_needs_are_declared_for_every_method():
    want = {"esm": Needs(stats=True), "esm_pp": Needs(stats=True), "sim": Needs(stats=True), "regmean": Needs(stats=True),
            "concrete_ta": Needs(data=True, heads=True), "adamerging": Needs(data=True, heads=True),
            "concrete_adamerging": Needs(data=True, heads=True)}
    for name, cls in METHODS.items():
        got = build_method(name, method_params(name), n_experts=method_experts(name, 3)).needs()
        assert got == want.get(name, Needs()), name
    assert PURIFIERS["pave"](PURIFIERS["pave"].Params(), 3).needs() == Needs(stats=True)
    # a routed method adds what its base method needs
    routed = build_method("esm_pp", {"base_method": "task_arithmetic"}, n_experts=3).needs()
    assert routed == Needs(stats=True)


@pytest.mark.parametrize("method", DATA_METHODS)
def test_missing_data_fails_the_dry_run_naming_expert_and_field(method, tiny_llama, tmp_path, capsys):
    spec = _spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", method)
    assert main(["merge", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "experts.0.data" in err and "'e0'" in err and method in err


@pytest.mark.parametrize("method", ["concrete_ta", "adamerging"])
def test_missing_data_fails_before_any_work(method, tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    spec = _spec(tmp_path / "s.yaml", tiny_llama, out, method)
    assert main(["merge", str(spec), "--no-progress"]) == 2
    assert "experts.0.data" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_dry_run_tells_the_search_uses_its_data(tiny_llama, tmp_path, capsys):
    data = calibration_files(tmp_path / "data", 3, vocab=80)
    spec = _spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", "concrete_ta", data=data)
    assert main(["merge", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "is ignored" not in out
    assert "needs:    unlabelled data, task heads (encoders)" in out
    spec = _spec(tmp_path / "t.yaml", tiny_llama, tmp_path / "out", "ties", data=data)
    assert main(["merge", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "`data` is ignored" in out and "needs:    the weights only" in out


def test_encoder_search_without_heads_fails_the_dry_run(tmp_path, capsys):
    fam = make_family(tmp_path / "bert", "bert", 3, seed=1)  # encoder experts without head.safetensors
    data = calibration_files(tmp_path / "data", 3, vocab=96)
    spec = _spec(tmp_path / "s.yaml", fam, tmp_path / "out", "concrete_ta", data=data)
    assert main(["merge", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "'e0'" in err and "head.safetensors" in err


def test_methods_listing_states_needs(capsys):
    assert main(["methods", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["concrete_ta"]["needs"] == ["unlabelled data", "task heads (encoders)"]
    assert listing["esm"]["needs"] == ["calibration data"] and listing["ties"]["needs"] == []
    assert listing["rescale"]["kind"] == "spec field" and listing["rescale"]["needs"] == ["calibration data"]
    assert [p["name"] for p in listing["rescale"]["params"]] == ["rule", "scope"]
