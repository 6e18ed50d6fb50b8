"""Hostile inputs that once ended in a traceback or a silently wrong output; each now fails
through the CLI with exit 2, a message naming the file, tensor or field, and nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from esm_ray.cli import main
from tests.builders import calibration_files, copy_family, merge_spec, write_spec

TENSOR = "model.layers.0.mlp.up_proj.weight"


def _nothing_written(root: Path, name: str = "out") -> None:
    assert not (root / name).exists(), "an output was written"
    left = [p.name for p in root.iterdir() if p.name.startswith(f".{name}.")]
    assert not left, f"staging left behind: {left}"


# ---- finding 4: a value that overflows the output dtype ---------------------------------------

def test_overflow_to_inf_in_the_output_dtype_fails_naming_the_tensor(tiny_llama, tmp_path, capsys):
    """float32 inputs holding 1e5, written as float16 (largest finite 65504): the cast gives
    inf; the merge must fail naming the tensor and write nothing."""
    fam = copy_family(tiny_llama, tmp_path / "m")
    for name in ("base", "expert_0", "expert_1", "expert_2"):
        f = fam[name] / "model.safetensors"
        sd = load_file(f)
        sd[TENSOR][0, 0] = 1e5
        save_file(sd, f, metadata={"format": "pt"})
    spec = write_spec(tmp_path / "s.yaml", fam, tmp_path / "out", method="linear", dtype="float16")
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


def _calibrated_spec(fam: dict[str, Path], tmp_path: Path, data: list[Path], **calibration) -> Path:
    raw = merge_spec(fam, tmp_path / "out", "esm", data=data)
    raw["calibration"].update(calibration)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cache_cases(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return {"file": a_file, "under_a_file": a_file / "cache", "read_only_dir": locked / "cache",
            "proc": Path("/proc/esm-ray-cache")}


@pytest.mark.parametrize("case", ["file", "under_a_file", "read_only_dir", "proc"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_unusable_cache_dir_names_the_field(tiny_llama, tmp_path, capsys, case, dry_run):
    if case == "read_only_dir" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    if case == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    cache = _cache_cases(tmp_path)[case]
    data = calibration_files(tmp_path / "data", 3, vocab=80)
    spec = _calibrated_spec(tiny_llama, tmp_path, data, cache_dir=str(cache))
    try:
        rc = main(["merge", str(spec), "--no-progress"] + (["--dry-run"] if dry_run else []))
    finally:
        (tmp_path / "locked").chmod(0o700)
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert "calibration.cache_dir" in err and str(cache) in err, err
    _nothing_written(tmp_path)


@pytest.mark.parametrize("dry_run", [True, False])
def test_calibration_ids_outside_the_vocabulary_name_the_file_and_line(tiny_llama, tmp_path, capsys, dry_run):
    data = calibration_files(tmp_path / "data", 3, vocab=80)
    lines = data[1].read_text().splitlines()
    lines[4] = json.dumps({"input_ids": [2, 99999, 3]})
    data[1].write_text("\n".join(lines) + "\n")
    spec = _calibrated_spec(tiny_llama, tmp_path, data, cache_dir=str(tmp_path / "cache"), samples=12)
    rc = main(["merge", str(spec), "--no-progress"] + (["--dry-run"] if dry_run else []))
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert f"{data[1]}, line 5" in err and "99999" in err and "80" in err, err
    _nothing_written(tmp_path)


def test_calibration_on_a_worker_names_the_data_line_and_the_cache_field(tiny_llama, tmp_path):
    """The same faults met where calibration runs (a remote cluster's node, where the plan could
    not look): errors naming the file and line, or the field, instead of IndexError/OSError."""
    from esm_ray.errors import InputError, SpecError
    from esm_ray.spec import CalibrationSpec
    from esm_ray.stats import calibrate_expert

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n" + json.dumps({"input_ids": [4, 80]}) + "\n")
    settings = CalibrationSpec(samples=2, max_length=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(InputError, match=rf"{data}, line 2: token id 80 is outside"):
        calibrate_expert(str(tiny_llama["expert_0"]), str(data), settings)
    data.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    (tmp_path / "a_file").write_text("x")
    settings = CalibrationSpec(samples=1, max_length=8, cache_dir=str(tmp_path / "a_file"))
    with pytest.raises(SpecError, match=r"calibration\.cache_dir.*a_file"):
        calibrate_expert(str(tiny_llama["expert_0"]), str(data), settings)
    assert (tmp_path / "a_file").read_text() == "x"


def test_calibrate_refuses_token_ids_the_embedding_has_no_row_for(tiny_llama):
    """Ids from a tokenizer of another model (text rows): InputError, not IndexError mid-forward."""
    from transformers import AutoModelForCausalLM

    from esm_ray.errors import InputError
    from esm_ray.spec import CalibrationSpec
    from esm_ray.stats import calibrate

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama["expert_0"]))
    with pytest.raises(InputError, match=r"row 1: token id 80 is outside.*80 ids"):
        calibrate(model, [{"input_ids": [1, 2]}, {"input_ids": [3, 80]}], None, CalibrationSpec(samples=2))


@pytest.mark.parametrize("where", ["header", "config", "index"])
def test_deeply_nested_json_in_a_model_names_the_file(tiny_llama, tmp_path, capsys, where):
    """JSON nested past Python's recursion limit in a model's safetensors header, config.json or
    shard index: InputError naming the file, not a RecursionError traceback."""
    fam = copy_family(tiny_llama, tmp_path / "m")
    deep = "[" * 100_000 + "]" * 100_000
    d = fam["expert_1"]
    if where == "header":
        blob = ('{"x": ' + deep + "}").encode()
        (d / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)
        name = "model.safetensors"
    elif where == "config":
        name = "config.json"
        (d / name).write_text('{"x": ' + deep + "}")
    else:
        name = "model.safetensors.index.json"
        (d / name).write_text('{"weight_map": ' + deep + "}")
    spec = write_spec(tmp_path / "s.yaml", fam, tmp_path / "out", method="linear")
    assert main(["merge", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(d / name) in err and "Traceback" not in err, err


def test_deeply_nested_spec_json_of_a_ray_job_exits_2(capsys):
    """What `esm-ray submit` sends to the cluster entrypoint, nested past the recursion limit."""
    from jobs.merge import main as job_main

    assert job_main(["--spec-json", '{"base": ' + "[" * 100_000 + "]" * 100_000 + "}"]) == 2
    assert "--spec-json" in capsys.readouterr().err
