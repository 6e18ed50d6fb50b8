"""End to end through `esm-ray merge`: specs, dry runs, and every bad input named clearly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from esm_ray.cli import main
from esm_ray.errors import SpecError
from esm_ray.io.reader import open_model
from esm_ray.spec import load_spec, spec_from_dict
from tests.builders import copy_family, write_spec


def _weights(d: Path) -> dict[str, torch.Tensor]:
    r = open_model(str(d))
    return {k: r.get(k) for k in r.keys()}


def test_merge_writes_loadable_model_with_report(tiny_llama, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", params={"density": 0.5})
    assert main(["merge", str(spec), "--no-progress"]) == 0
    assert str(tmp_path / "out") in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["method"] == "ties" and report["params"]["density"] == 0.5
    assert [e["name"] for e in report["experts"]] == ["e0", "e1", "e2"]
    assert all(len(e["fingerprint"]) >= 16 for e in report["experts"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    merged = _weights(tmp_path / "out")
    sd = model.state_dict()
    for k, v in merged.items():
        assert torch.equal(sd[k], v), k


def test_task_arithmetic_equals_independent_sum(tiny_llama, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", method="task_arithmetic",
                      params={"lambda": 0.5})
    assert main(["merge", str(spec), "--no-progress"]) == 0
    base = _weights(tiny_llama["base"])
    experts = [_weights(tiny_llama[f"expert_{i}"]) for i in range(3)]
    merged = _weights(tmp_path / "out")
    for k, b in base.items():
        want = b + 0.5 * sum(e[k] - b for e in experts)
        torch.testing.assert_close(merged[k], want, rtol=1e-5, atol=1e-6)


def test_sharded_output_respects_limit(tiny_llama, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", method="linear", shard_size="16KB")
    assert main(["merge", str(spec), "--no-progress"]) == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for s in shards:
        n = len(load_file(tmp_path / "out" / s))
        assert n >= 1


def test_output_dtype_and_config(tiny_llama, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", method="linear", dtype="bfloat16")
    assert main(["merge", str(spec), "--no-progress"]) == 0
    merged = _weights(tmp_path / "out")
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_dry_run_validates_and_computes_nothing(tiny_llama, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out")
    assert main(["merge", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "memory" in out
    assert not (tmp_path / "out").exists()


def test_relative_paths_resolve_against_spec_dir(tiny_llama, tmp_path):
    fam = copy_family(tiny_llama, tmp_path / "models")
    raw = {"base": "models/base", "output": "out/merged", "method": {"name": "linear"},
           "experts": [{"name": f"e{i}", "model": f"models/expert_{i}"} for i in range(3)]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.base == str(fam["base"]) and spec.output == str(tmp_path / "out" / "merged")


# ---------------------------------------------------------------- spec errors
@pytest.mark.parametrize("raw, field", [
    ({"bogus": 1}, "bogus"),
    ({"method": {"name": "ties", "params": {"densty": 0.2}}}, "method.params.densty"),
    ({"method": {"name": "tie"}}, "method.name"),
    ({"method": {"name": "ties", "params": {"density": 1.5}}}, "method.params.density"),
    ({"dtype": "float8"}, "dtype"),
    ({"experts": []}, "experts"),
    ({"experts": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]}, "unique"),
    ({"runtime": {"name": "slurm"}}, "runtime.name"),
])
def test_spec_errors_name_the_field(tiny_llama, tmp_path, raw, field):
    from esm_ray.runtime import build_plan

    spec = {"base": str(tiny_llama["base"]), "output": str(tmp_path / "o"), "method": {"name": "ties"},
            "experts": [{"name": f"e{i}", "model": str(tiny_llama[f"expert_{i}"])} for i in range(3)]}
    spec.update(raw)
    with pytest.raises(SpecError) as err:
        build_plan(spec_from_dict(spec))
    assert field in str(err.value)


def test_cli_reports_spec_error_with_exit_2(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("base: a\noutput: b\nexperts: [{name: x, model: y}]\nmethod: {name: nope}\n")
    assert main(["merge", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "method.name" in err and "ties" in err  # lists the allowed values


def test_data_required_for_data_aware_method(tiny_llama, tmp_path, capsys):
    pytest.importorskip("esm_ray.methods.esm")
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", method="esm")
    assert main(["merge", str(spec), "--dry-run"]) == 2
    assert "experts.0.data" in capsys.readouterr().err


# ---------------------------------------------------------------- bad inputs
def _break(fam: dict[str, Path], how: str) -> str:
    """Damage expert_1 in one way; return a fragment the error must contain."""
    f = fam["expert_1"] / "model.safetensors"
    if how == "missing_file":
        f.unlink()
        return "expert_1"
    if how == "corrupt_header":
        data = bytearray(f.read_bytes())
        data[8:16] = b"\x00garbage"
        f.write_bytes(bytes(data))
        return "model.safetensors"
    sd = load_file(f)
    if how == "missing_tensor":
        sd.pop("model.layers.1.mlp.up_proj.weight")
        save_file(sd, f)
        return "model.layers.1.mlp.up_proj.weight"
    if how == "shape":
        sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"][:, :-1].contiguous()
        save_file(sd, f)
        return "model.layers.0.mlp.down_proj.weight"
    if how == "dtype":
        sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.float16)
        save_file(sd, f)
        return "model.norm.weight"
    if how == "vocab":
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], sd[k][:4]]).contiguous()
        save_file(sd, f)
        return "vocabulary size mismatch"
    if how == "nan":
        sd["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
        save_file(sd, f)
        return "model.layers.0.self_attn.q_proj.weight"
    if how == "architecture":
        cfg = json.loads((fam["expert_1"] / "config.json").read_text())
        cfg["num_hidden_layers"] = 3
        (fam["expert_1"] / "config.json").write_text(json.dumps(cfg))
        return "num_hidden_layers"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing_file", "corrupt_header", "missing_tensor", "shape", "dtype", "vocab",
                                 "nan", "architecture"])
def test_bad_inputs_fail_clearly_and_write_nothing(tiny_llama, tmp_path, capsys, how):
    fam = copy_family(tiny_llama, tmp_path / "m")
    fragment = _break(fam, how)
    spec = write_spec(tmp_path / "s.yaml", fam, tmp_path / "out", method="task_arithmetic")
    assert main(["merge", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "partial output left behind"


def test_existing_output_refused_unless_overwrite(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, out, method="linear")
    assert main(["merge", str(spec), "--no-progress"]) == 2
    assert str(out) in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    # overwrite replaces only an esm-ray output: a folder with the user's data is left alone
    assert main(["merge", str(spec), "--no-progress", "--overwrite"]) == 2
    assert "not an esm-ray output" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()  # an empty folder may be used
    assert main(["merge", str(spec), "--no-progress", "--overwrite"]) == 0
    assert main(["merge", str(spec), "--no-progress", "--overwrite"]) == 0  # and an esm-ray output replaced
    assert (out / "model.safetensors.index.json").exists()


def test_methods_command_lists_parameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsvm"):
        assert name in out
    assert "density" in out and "lambda" in out


# ---------------------------------------------------------------- S3 end to end
def test_merge_from_s3_to_s3(tiny_llama, tmp_path, s3_bucket, s3_env, s3_server):
    """Base and experts read from SeaweedFS, result written there, equal to the local merge."""
    client = s3_server.client()
    for name, d in tiny_llama.items():
        for p in sorted(d.iterdir()):
            client.upload_file(str(p), s3_bucket, f"models/{name}/{p.name}")
    s3_spec = write_spec(tmp_path / "s3.yaml", {k: f"s3://{s3_bucket}/models/{k}" for k in tiny_llama},
                         f"s3://{s3_bucket}/out/merged", method="ties", params={"density": 0.4},
                         shard_size="24KB")
    local_spec = write_spec(tmp_path / "local.yaml", tiny_llama, tmp_path / "local", method="ties",
                            params={"density": 0.4})
    assert main(["merge", str(s3_spec), "--no-progress"]) == 0
    assert main(["merge", str(local_spec), "--no-progress"]) == 0
    remote = open_model(f"s3://{s3_bucket}/out/merged")
    local = _weights(tmp_path / "local")
    assert sorted(remote.keys()) == sorted(local)
    for k, v in local.items():
        assert torch.equal(remote.get(k), v), k
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/merged/")["Contents"]]
    assert "out/merged/model.safetensors.index.json" in keys and "out/merged/merge_report.json" in keys
    assert not [k for k in keys if ".partial" in k]


def test_the_command_exits_with_its_code_and_all_its_output_after_a_merge(tiny_llama, tmp_path):
    """`esm-ray` (esm_ray.cli.run) leaves without the interpreter's teardown after a local
    command: what it printed and logged still arrives, a committed output is complete, and a
    bad input still exits 2 with its message."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("PYTHONUNBUFFERED", None)  # stdout into a pipe is then block-buffered: it must be flushed
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", method="task_arithmetic")
    ok = subprocess.run([sys.executable, "-m", "esm_ray.cli", "-v", "merge", str(spec), "--no-progress"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"output: {tmp_path / 'out'}" in ok.stdout and "total" in ok.stdout
    assert "esm_ray" in ok.stderr  # the log lines
    want = _weights(tmp_path / "out")
    assert set(want) == set(_weights(tiny_llama["base"]))
    bad = write_spec(tmp_path / "bad.yaml", tiny_llama, tmp_path / "out2", method="no_such_method")
    err = subprocess.run([sys.executable, "-m", "esm_ray.cli", "merge", str(bad), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert err.returncode == 2 and "no_such_method" in err.stderr and not (tmp_path / "out2").exists()
