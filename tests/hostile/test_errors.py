"""Hostile inputs that once ended in a traceback or a silently wrong output; each now fails
through the CLI with exit 2, a message naming the file, tensor or field, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from esm_ray.cli import main
from tests.fixtures.ray import merge_spec
from tests.test_merge_cli import _copy_family, _write_spec

TENSOR = "model.layers.0.mlp.up_proj.weight"


def _nothing_written(root: Path, name: str = "out") -> None:
    assert not (root / name).exists(), "an output was written"
    left = [p.name for p in root.iterdir() if p.name.startswith(f".{name}.")]
    assert not left, f"staging left behind: {left}"


# ---- finding 4: a value that overflows the output dtype ---------------------------------------

def test_overflow_to_inf_in_the_output_dtype_fails_naming_the_tensor(tiny_llama, tmp_path, capsys):
    """float32 inputs holding 1e5, written as float16 (largest finite 65504): the cast gives
    inf; the merge must fail naming the tensor and write nothing."""
    fam = _copy_family(tiny_llama, tmp_path / "m")
    for name in ("base", "expert_0", "expert_1", "expert_2"):
        f = fam[name] / "model.safetensors"
        sd = load_file(f)
        sd[TENSOR][0, 0] = 1e5
        save_file(sd, f, metadata={"format": "pt"})
    spec = _write_spec(tmp_path / "s.yaml", fam, tmp_path / "out", method="linear", dtype="float16")
    assert main(["merge", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert TENSOR in err and "float16" in err, err
    assert "Traceback" not in err
    _nothing_written(tmp_path)


# ---- finding 10: tracebacks instead of clean errors -------------------------------------------

def _nested(depth: int) -> dict:
    x: object = 1
    for _ in range(depth):
        x = {"k": x}
    return x  # type: ignore[return-value]


_ALIAS_BOMB = "".join(f"{k}: &{k} [{', '.join([f'*{p}' if p else 'x'] * 10)}]\n"
                      for p, k in zip(["", "a", "b", "c", "d", "e"], "abcdef"))  # 10^6 values


@pytest.mark.parametrize("fmt, depth", [("yaml", 600), ("json", 3000), ("json", 200), ("aliases", 6)])
def test_deeply_nested_spec_is_a_clean_error(tiny_llama, tmp_path, capsys, fmt, depth):
    raw = merge_spec(tiny_llama, tmp_path / "out", "linear")
    if fmt == "aliases":
        text = yaml.safe_dump(raw) + _ALIAS_BOMB
        path = tmp_path / "s.yaml"
    elif fmt == "json":
        # written by hand: json.dumps itself cannot write this depth
        text = json.dumps(raw)[:-1] + ', "method": {"name": "linear", "params": {"p": ' + \
            '{"k": ' * depth + "1" + "}" * depth + "}}}"
        path = tmp_path / "s.json"
    else:
        text = yaml.safe_dump(raw) + "seed: " + "[" * depth + "]" * depth + "\n"
        path = tmp_path / "s.yaml"
    path.write_text(text)
    assert main(["merge", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "nest" in err, err
    _nothing_written(tmp_path)
