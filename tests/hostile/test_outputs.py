"""Hostile cases for the output side: an output that overlaps an input, overwrite of folders
esm-ray did not write, what is copied from the base, links out of the base, the mode of new
directories, and writers killed inside the commit window."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from esm_ray.cli import main
from esm_ray.errors import OutputError
from esm_ray.io.overlap import relation
from esm_ray.io.reader import open_model
from esm_ray.io.writer import INDEX_NAME, ShardedWriter, check_writable
from tests.builders import copy_family, write_spec

# ---------------------------------------------------------------- helpers


# Every spec here: task arithmetic (lambda 0.5) of the three experts of `fam` into `out`.
_spec = functools.partial(write_spec, method="task_arithmetic", params={"lambda": 0.5})


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (links by their target, not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = b"link:" + os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def _merge(spec: Path, *args: str) -> int:
    return main(["merge", str(spec), "--no-progress", *args])


# ---------------------------------------------------------------- finding 1: overlap rule


def test_relation_compares_whole_path_segments(tmp_path):
    assert relation("s3://b", "s3://b/models/x") == "contains"
    assert relation("s3://b/models/x/", "s3://b/models/x") == "is"
    assert relation("s3://b/models/x/out", "s3://b/models/x") == "lies inside"
    assert relation("s3://b/mod", "s3://b/models") is None
    assert relation("s3://b2/models", "s3://b/models") is None
    assert relation("s3://b/x/../models", "s3://b/models/e0") == "contains"  # folded by some servers
    assert relation(str(tmp_path / "mod"), str(tmp_path / "models")) is None
    assert relation(str(tmp_path / "a" / ".." / "models"), str(tmp_path / "models" / "e")) == "contains"
    (tmp_path / "models" / "e").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "models" / "e")
    assert relation(str(tmp_path / "alias"), str(tmp_path / "models" / "e")) == "is"
    assert relation(str(tmp_path / "alias" / "out"), str(tmp_path / "models" / "e")) == "lies inside"
    assert relation(str(tmp_path / "models"), "s3://b/models") is None
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "ylink").symlink_to(tmp_path / "x" / "y")  # `..` after a link leaves the link's target
    assert relation(str(tmp_path / "ylink" / ".." / "models"), str(tmp_path / "x" / "models" / "e")) == "contains"
    assert relation(str(tmp_path / "ylink" / ".." / "models"), str(tmp_path / "models" / "e")) is None


def test_output_equal_to_an_expert_is_refused(tiny_llama, tmp_path, capsys):
    fam = copy_family(tiny_llama, tmp_path / "models")
    before = _snapshot(tmp_path / "models")
    spec = _spec(tmp_path / "s.yaml", fam, fam["expert_1"], overwrite=True)
    assert _merge(spec, "--dry-run") == 2
    err = capsys.readouterr().err
    assert "`experts.1.model`" in err and "`output`" in err and str(fam["expert_1"]) in err, err
    assert _merge(spec) == 2
    assert _snapshot(tmp_path / "models") == before


def test_output_parent_of_the_inputs_is_refused_and_nothing_is_lost(tiny_llama, tmp_path, capsys):
    fam = copy_family(tiny_llama, tmp_path / "models")
    (tmp_path / "models" / "notes.txt").write_text("unrelated user data")
    before = _snapshot(tmp_path / "models")
    spec = _spec(tmp_path / "s.yaml", fam, tmp_path / "elsewhere")
    # through the --output override, and spelled with `..` and through a link
    (tmp_path / "link").symlink_to(tmp_path / "models")
    for out in (tmp_path / "models", tmp_path / "models" / "base" / "..", tmp_path / "link"):
        assert _merge(spec, "--output", str(out), "--overwrite", "--dry-run") == 2
        err = capsys.readouterr().err
        assert "contains the input `base`" in err, err
        assert _merge(spec, "--output", str(out), "--overwrite") == 2
        capsys.readouterr()
    assert _snapshot(tmp_path / "models") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "models", "s.yaml"]


def test_output_inside_the_base_is_refused(tiny_llama, tmp_path, capsys):
    fam = copy_family(tiny_llama, tmp_path / "models")
    before = _snapshot(tmp_path / "models")
    spec = _spec(tmp_path / "s.yaml", fam, fam["base"] / "merged")
    assert _merge(spec, "--dry-run") == 2
    assert "lies inside the input `base`" in capsys.readouterr().err
    assert _merge(spec) == 2
    assert _snapshot(tmp_path / "models") == before
    assert not [p for p in fam["base"].iterdir() if "merged" in p.name]


def test_output_overlapping_calibration_data_or_cache_is_refused(tiny_llama, tmp_path, capsys):
    fam = copy_family(tiny_llama, tmp_path / "models")
    data = tmp_path / "data"
    data.mkdir()
    (data / "e0.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    raw = yaml.safe_load(_spec(tmp_path / "s.yaml", fam, data).read_text())
    raw["experts"][0]["data"] = str(data / "e0.jsonl")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert _merge(tmp_path / "s.yaml", "--dry-run", "--overwrite") == 2
    assert "contains the input `experts.0.data`" in capsys.readouterr().err
    raw["output"] = str(tmp_path / "cache" / "out")
    raw["calibration"] = {"cache_dir": str(tmp_path / "cache")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert _merge(tmp_path / "s.yaml", "--dry-run") == 2
    assert "lies inside the input `calibration.cache_dir`" in capsys.readouterr().err
    assert (data / "e0.jsonl").exists() and not (tmp_path / "cache").exists()


def test_s3_output_at_the_bucket_root_is_refused(tiny_llama, tmp_path, s3_bucket, s3_server, capsys):
    client = s3_server.client()
    for name, d in tiny_llama.items():
        for p in sorted(d.iterdir()):
            client.upload_file(str(p), s3_bucket, f"models/{name}/{p.name}")
    client.put_object(Bucket=s3_bucket, Key="other/keep.txt", Body=b"unrelated")

    def listing() -> dict[str, str]:
        return {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}

    before = listing()
    fam = {k: f"s3://{s3_bucket}/models/{k}" for k in tiny_llama}
    for out in (f"s3://{s3_bucket}", f"s3://{s3_bucket}/models", f"s3://{s3_bucket}/models/base/merged"):
        spec = _spec(tmp_path / "s.yaml", fam, out, overwrite=True)
        assert _merge(spec, "--dry-run") == 2
        err = capsys.readouterr().err
        assert "the input `base`" in err and f"field `output`: the output {out}" in err, err
        assert _merge(spec) == 2
        capsys.readouterr()
    assert listing() == before
    # a sibling prefix that only shares leading characters is not an overlap
    spec = _spec(tmp_path / "s.yaml", fam, f"s3://{s3_bucket}/mod")
    assert _merge(spec, "--dry-run") == 0


# ---------------------------------------------------------------- finding 1: what overwrite replaces


def test_overwrite_refuses_a_folder_esm_ray_did_not_write(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    spec = _spec(tmp_path / "s.yaml", tiny_llama, out, overwrite=True)
    assert _merge(spec, "--dry-run") == 2
    assert "not an esm-ray output" in capsys.readouterr().err
    assert _merge(spec) == 2
    assert "not an esm-ray output" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.yaml"]
    # a file, or a link, in the output's place is not replaced either
    (out / "thesis.tex").unlink()
    out.rmdir()
    out.write_text("a file")
    assert _merge(spec) == 2 and out.read_text() == "a file"
    out.unlink()
    (tmp_path / "mine").mkdir()
    out.symlink_to(tmp_path / "mine")
    assert _merge(spec) == 2 and out.is_symlink()


def test_overwrite_refuses_an_esm_ray_output_holding_a_foreign_file(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    spec = _spec(tmp_path / "s.yaml", tiny_llama, out, overwrite=True)
    assert _merge(spec) == 0
    index = json.loads((out / INDEX_NAME).read_text())
    mark = index["metadata"]["esm_ray"]
    assert mark["format"] == "esm-ray/output/1"
    assert set(mark["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*")
                                  if p.is_file()} - {INDEX_NAME}
    assert _merge(spec) == 0  # an esm-ray output holding only what it wrote is replaced
    (out / "sub").mkdir()
    (out / "sub" / "mine.txt").write_text("user file")
    before = _snapshot(out)
    with pytest.raises(OutputError, match=r"sub/mine.txt.*did not write"):
        check_writable(str(out), overwrite=True)
    assert _merge(spec) == 2
    assert "'sub/mine.txt'" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_writer_refuses_a_foreign_file_put_into_the_old_output_while_writing(tmp_path):
    out = tmp_path / "out"
    with ShardedWriter(str(out), 1024) as w:
        w.add("a", torch.ones(4))
    w = ShardedWriter(str(out), 1024, overwrite=True)
    w.add("a", torch.zeros(4))
    (out / "late.txt").write_text("x")
    with pytest.raises(OutputError, match="late.txt"):
        w.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(open_model(str(out)).get("a"), torch.ones(4))


# ---------------------------------------------------------------- finding 9: what is copied from the base


def test_only_model_files_are_copied_from_the_base(tiny_llama, tmp_path):
    fam = copy_family(tiny_llama, tmp_path / "models")
    base = fam["base"]
    shutil.copytree(tiny_llama["expert_0"], base / "old_output")  # a nested model folder
    (base / "notes").mkdir()
    (base / "notes" / "x.txt").write_text("x")
    (base / "README.md").write_text("readme")
    (base / "modeling_evil.py").write_text("raise SystemExit")
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    spec = _spec(tmp_path / "s.yaml", fam, tmp_path / "out")
    assert _merge(spec) == 0
    got = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*"))
    assert got == ["config.json", "generation_config.json", "merge_report.json",
                   "model-00001-of-00001.safetensors", INDEX_NAME, "tokenizer_config.json"], got


# ---------------------------------------------------------------- finding 11: links out of the base


def test_aux_link_out_of_the_base_is_refused_by_name(tiny_llama, tmp_path, capsys):
    fam = copy_family(tiny_llama, tmp_path / "models")
    secret = tmp_path / "secret.txt"
    secret.write_text("PRIVATE KEY")
    (fam["base"] / "tokenizer.json").symlink_to(secret)
    spec = _spec(tmp_path / "s.yaml", fam, tmp_path / "out")
    assert _merge(spec) == 2
    err = capsys.readouterr().err
    assert str(fam["base"] / "tokenizer.json") in err and "symbolic link" in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # a link that stays inside the model directory is read as usual
    (fam["base"] / "tokenizer.json").unlink()
    (fam["base"] / "tok").mkdir()
    (fam["base"] / "tok" / "tokenizer.json").write_text('{"version": "1.0"}')
    (fam["base"] / "tokenizer.json").symlink_to("tok/tokenizer.json")
    assert _merge(spec) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert "PRIVATE" not in "".join(p.read_text(errors="replace") for p in (tmp_path / "out").iterdir())


# ---------------------------------------------------------------- finding 12: modes


def test_output_directories_get_the_umask_mode(tiny_llama, tmp_path):
    old = os.umask(0o022)
    try:
        spec = _spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out")
        assert _merge(spec) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o755
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p


# ---------------------------------------------------------------- finding 8: kills inside the commit window

_KILLER = """
import os, shutil, signal, sys
import torch
from esm_ray.io.writer import ShardedWriter

out, moment = sys.argv[1], sys.argv[2]
real_rename, real_rmtree = os.rename, shutil.rmtree

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def rename(src, dst, *a, **k):
    if moment == "before_aside" and str(src) == out:
        die()  # index written in the staging directory, old output not yet moved
    real_rename(src, dst, *a, **k)
    if moment == "after_aside" and ".old-" in os.path.basename(str(dst)):
        die()  # old output moved aside, new one not yet renamed in

def rmtree(path, *a, **k):
    if moment == "removing_old" and ".old-" in os.path.basename(str(path)):
        for p in sorted(os.listdir(path))[:1]:
            os.unlink(os.path.join(path, p))  # half removed
        die()
    real_rmtree(path, *a, **k)

os.rename, shutil.rmtree = rename, rmtree
with ShardedWriter(out, 1024, overwrite=True) as w:
    for i in range(6):
        w.add(f"t{i}", torch.full((100,), 2.0))
"""


def _old_output(out: Path) -> None:
    with ShardedWriter(str(out), 1024) as w:
        for i in range(6):
            w.add(f"t{i}", torch.full((100,), 1.0))
        w.write_file("config.json", "{}")


def _killed_commit(out: Path, moment: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(out), moment], capture_output=True, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".out."))


@pytest.mark.parametrize("moment", ["before_aside", "after_aside", "removing_old"])
def test_kill_inside_the_commit_window_leaks_nothing(tmp_path, moment):
    out = tmp_path / "out"
    _old_output(out)
    _killed_commit(out, moment)
    assert _leftovers(tmp_path), "the kill left nothing: the hook missed the commit window"
    if moment == "after_aside":
        # the commit died with the old output moved aside: the next writer puts it back whole
        with pytest.raises(OutputError, match="already exists"):
            ShardedWriter(str(out), 1024)
        assert _leftovers(tmp_path) == []
        assert torch.equal(open_model(str(out)).get("t0"), torch.full((100,), 1.0))
    with ShardedWriter(str(out), 1024, overwrite=True) as w:
        w.add("t0", torch.full((100,), 3.0))
    assert _leftovers(tmp_path) == [], "a killed commit's directories were not removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(open_model(str(out)).get("t0"), torch.full((100,), 3.0))


def test_leftovers_of_a_live_writer_or_another_host_are_kept(tmp_path):
    out = tmp_path / "out"
    _old_output(out)
    alive = ShardedWriter(str(out), 1024, overwrite=True)  # this process: alive
    other = tmp_path / ".out.old-00000000-1-1-abcd"  # a host tag that is not this host's
    other.mkdir()
    with ShardedWriter(str(out), 1024, overwrite=True) as w:
        w.add("x", torch.ones(2))
    assert alive._target.tmp.exists() and other.exists()
    alive.abort()


def _limited_merge(spec: Path, max_file_bytes: int) -> subprocess.CompletedProcess:
    """`esm-ray merge spec` in a child that may write no file larger than `max_file_bytes`
    (RLIMIT_FSIZE, SIGXFSZ ignored): a real write error where the disk would be full."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "esm_ray.cli", "merge", str(spec), "--no-progress"],
                          capture_output=True, text=True, preexec_fn=limit, env=env, timeout=300)


def test_a_full_disk_while_writing_the_output_is_named(tiny_llama, tmp_path):
    """A shard that cannot be written: exit 2 naming the output and the error; nothing at the
    output path, no temporary directory left beside it."""
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", method="task_arithmetic")
    proc = _limited_merge(spec, 4096)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{tmp_path / 'out'}" in proc.stderr and "File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_a_full_disk_while_keeping_esms_updates_is_named(tiny_llama, tmp_path):
    """ESM keeps every fused update on disk until its layer scales are known; when that write
    fails the job ends with exit 2 naming the file, and no output appears."""
    from tests.builders import calibration_files

    data = calibration_files(tmp_path / "data", 3, vocab=80)
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "warm", method="esm", data=data,
                      calibration={"samples": 8, "max_length": 16, "cache_dir": str(tmp_path / "cache")})
    assert main(["merge", str(spec), "--no-progress"]) == 0  # the statistics are cached now
    spec.write_text(spec.read_text().replace(str(tmp_path / "warm"), str(tmp_path / "out")))
    proc = _limited_merge(spec, 1024)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot write the updates kept for layer scaling" in proc.stderr and "File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["full", "layerwise"])
def test_a_full_disk_while_calibrating_is_named_and_leaves_no_statistics(lora_family, tmp_path, mode):
    """The statistics cache cannot be written (here a real write error: the process may write
    no file larger than 2 KiB, RLIMIT_FSIZE, as on a full disk): exit 2 naming the cache
    directory and the file, no statistics entry or part left behind, no output."""
    from tests.builders import calibration_files

    data = calibration_files(tmp_path / "data", 2, vocab=80)
    experts = [{"name": f"e{i}", "model": str(lora_family[f"lora_{i}"]), "data": str(d)} for i, d in enumerate(data)]
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "base": str(lora_family["base"]), "experts": experts, "method": {"name": "esm"},
        "output": str(tmp_path / "out"),
        "calibration": {"samples": 8, "max_length": 16, "batch_size": 4, "mode": mode,
                        "cache_dir": str(tmp_path / "cache")}}))

    proc = _limited_merge(spec, 2048)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot be used as a cache directory" in proc.stderr and "File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    stats = tmp_path / "cache" / "stats"
    assert not list(stats.glob("*.json")) and not list(stats.glob("*.safetensors"))
    assert not list(stats.glob(".*")), list(stats.glob(".*"))  # no temporary file, no spill directory
    assert not (tmp_path / "out").exists()
