"""Hostile cases that held when first tried; kept here so they keep holding.

Covered elsewhere, not repeated here:
- unknown keys and bad values of a spec, by field, at the plan: tests/integration/test_merge_cli.py::test_spec_errors_name_the_field
- a non-JSON safetensors header through the CLI: tests/integration/test_merge_cli.py::test_bad_inputs_fail_clearly_and_write_nothing[corrupt_header]
- every kind of corrupt header, at the reader: tests/unit/test_io_local.py::test_corrupt_single_file
- a directory holding only pytorch_model.bin: tests/unit/test_io_local.py::test_missing_and_empty_inputs
- a NaN in an expert, named, nothing written: tests/integration/test_merge_cli.py::test_bad_inputs_fail_clearly_and_write_nothing[nan]
- a killed writer's staging removed by the next one: tests/unit/test_io_local.py::test_staging_of_a_killed_writer_is_removed_by_the_next_one
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from esm_ray.cli import main
from tests.builders import copy_family, merge_spec, output_files, write_spec
from tests.fixtures.ray import REPO
from tests.hostile.test_errors import _nothing_written


# ---- specs: wrong types and unknown keys, through the CLI -------------------------------------

@pytest.mark.parametrize("change, field", [
    ({"overwrite": "perhaps"}, "overwrite"),
    ({"seed": "abc"}, "seed"),
    ({"experts": "e0"}, "experts"),
    ({"shard_size": "lots"}, "shard_size"),
    ({"calibration": {"samples": 0}}, "calibration.samples"),
    ({"runtime": {"num_cpus_per_worker": "two"}}, "runtime.num_cpus_per_worker"),
    ({"experts": [{"name": "e0", "modle": "x"}]}, "experts.0.modle"),
    ({"method": {"name": "ties", "params": {"density": "half"}}}, "method.params.density"),
    ({"s3": {"secret_access_key": "hunter2-secret"}}, "s3.secret_access_key"),
])
def test_bad_spec_fields_exit_2_naming_the_field(tiny_llama, tmp_path, capsys, change, field):
    raw = merge_spec(tiny_llama, tmp_path / "out", "ties")
    raw.update(change)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["merge", str(tmp_path / "s.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err and "hunter2" not in err, err
    _nothing_written(tmp_path)


def test_a_spec_that_is_not_a_mapping_exits_2(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("- just\n- a list\n")
    assert main(["merge", str(tmp_path / "s.yaml")]) == 2
    assert "mapping" in capsys.readouterr().err


# ---- corrupt safetensors, through the CLI ------------------------------------------------------

@pytest.mark.parametrize("how", ["truncated_to_3_bytes", "cut_in_the_data", "header_length_beyond_file"])
def test_corrupt_safetensors_exit_2_naming_the_file(tiny_llama, tmp_path, capsys, how):
    fam = copy_family(tiny_llama, tmp_path / "m")
    f = fam["expert_2"] / "model.safetensors"
    blob = f.read_bytes()
    if how == "truncated_to_3_bytes":
        f.write_bytes(blob[:3])
    elif how == "cut_in_the_data":
        f.write_bytes(blob[: len(blob) // 2])
    else:
        f.write_bytes((len(blob) * 4).to_bytes(8, "little") + blob[8:])
    spec = write_spec(tmp_path / "s.yaml", fam, tmp_path / "out", method="task_arithmetic")
    assert main(["merge", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "Traceback" not in err, err
    _nothing_written(tmp_path)


# ---- pickle checkpoints are never unpickled ----------------------------------------------------

class _Trap:
    """Unpickling this creates `marker` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoints_are_never_loaded(tiny_llama, tmp_path, capsys):
    fam = copy_family(tiny_llama, tmp_path / "m")
    marker = tmp_path / "unpickled"
    trap = pickle.dumps({"model.norm.weight": _Trap(marker)})
    # an expert with only a pickle checkpoint: refused by name, not loaded
    (fam["expert_0"] / "model.safetensors").unlink()
    (fam["expert_0"] / "pytorch_model.bin").write_bytes(trap)
    spec = write_spec(tmp_path / "s.yaml", fam, tmp_path / "out", method="linear")
    assert main(["merge", str(spec), "--no-progress"]) == 2
    assert "pytorch_model.bin" in capsys.readouterr().err
    assert not marker.exists(), "a pickle checkpoint was unpickled"
    _nothing_written(tmp_path)
    # a pickle beside safetensors weights: ignored, not copied into the output
    fam = copy_family(tiny_llama, tmp_path / "m2")
    for name in ("base", "expert_1"):
        (fam[name] / "pytorch_model.bin").write_bytes(trap)
        (fam[name] / "training_args.bin").write_bytes(trap)
    spec = write_spec(tmp_path / "s2.yaml", fam, tmp_path / "out2", method="linear")
    assert main(["merge", str(spec), "--no-progress"]) == 0
    assert not marker.exists(), "a pickle checkpoint was unpickled"
    assert not [p.name for p in (tmp_path / "out2").iterdir() if p.suffix == ".bin"]


# ---- SIGKILL mid-merge, then the same merge again: the bytes of an uninterrupted run -----------

_KILL_AFTER = """
import os, signal, sys
from esm_ray.io import writer
seen = [0]
_next = writer.ShardedWriter._next
def killing_next(self, *args, **kwargs):
    seen[0] += 1
    if seen[0] > {after}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _next(self, *args, **kwargs)
writer.ShardedWriter._next = killing_next
from esm_ray.cli import main
sys.exit(main(["merge", {spec!r}, "--no-progress"]))
"""


@pytest.mark.parametrize("after", [pytest.param(2, marks=pytest.mark.slow), 12])
def test_sigkill_mid_merge_then_rerun_gives_the_uninterrupted_bytes(tiny_llama, tmp_path, after):
    ref = write_spec(tmp_path / "ref.yaml", tiny_llama, tmp_path / "ref", method="ties", shard_size="16KB",
                     params={"density": 0.5})
    assert main(["merge", str(ref), "--no-progress"]) == 0
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", method="ties", shard_size="16KB",
                      params={"density": 0.5})
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER.format(after=after, spec=str(spec))],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists(), "a killed merge left an output"
    staged = [p.name for d in tmp_path.glob(".out.partial-*") for p in d.iterdir()]
    assert any(n.endswith(".safetensors") for n in staged), f"the kill came before any shard: {staged}"
    assert main(["merge", str(spec), "--no-progress"]) == 0
    assert output_files(tmp_path / "out") == output_files(tmp_path / "ref")
    assert not list(tmp_path.glob(".out.*")), "the killed merge's staging is still there"
