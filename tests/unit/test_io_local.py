"""IO layer on local disk: URIs, the lazy reader, the sharded atomic writer."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from esm_ray.errors import InputError, OutputError
from esm_ray.io import (INDEX_NAME, ShardedWriter, check_finite, check_writable, is_committed, is_s3,
                        open_model, parse_uri, save_safetensors_atomic)
from esm_ray.io.writer import pack_shards


def _raw_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    return {
        "f32": x, "f16": x.half(), "bf16": x.bfloat16(), "f64": x.double(),
        "i64": torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(7, dtype=torch.int32), "i16": torch.arange(-3, 3, dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }


# ---- URIs ----------------------------------------------------------------------------------

def test_parse_uri_s3_and_local(tmp_path):
    u = parse_uri("s3://bucket/models//base/")
    assert (u.scheme, u.bucket, u.key) == ("s3", "bucket", "models/base/")
    assert str(u.join("a", "b/c.json")) == "s3://bucket/models/base/a/b/c.json"
    assert u.name == "base" and str(u.parent) == "s3://bucket/models" and u.dir_prefix == "models/base/"
    assert parse_uri("s3://bucket").dir_prefix == ""
    assert str(parse_uri("s3://bucket").join("x")) == "s3://bucket/x"
    loc = parse_uri(str(tmp_path / "m"))
    assert loc.scheme == "file" and loc.path == str(tmp_path / "m") and str(loc) == str(tmp_path / "m")
    assert parse_uri(f"file://{tmp_path}/m") == loc
    assert str(loc.join("sub", "f.json")) == str(tmp_path / "m" / "sub" / "f.json")
    assert is_s3("S3://b/k") and not is_s3(str(tmp_path))
    with pytest.raises(ValueError, match="bucket"):
        parse_uri("s3:///key")
    with pytest.raises(ValueError, match="scheme"):
        parse_uri("gs://bucket/key")
    with pytest.raises(ValueError):
        loc.join("../escape")
    with pytest.raises(InputError, match="gs://"):
        open_model("gs://bucket/key")


# ---- reading -------------------------------------------------------------------------------

def test_read_single_file_all_dtypes(tmp_path):
    tensors = _all_dtypes()
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    r = open_model(str(path))
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    by_offset = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    assert r.keys() == [k for _, k in by_offset]  # data-offset order
    for name, t in tensors.items():
        got = r.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
        meta = r.info(name)
        assert meta.dtype == t.dtype and meta.shape == tuple(t.shape)
        assert meta.nbytes == t.numel() * t.element_size() and meta.file == "w.safetensors"
    r.get("f32").add_(1)  # results are private, writable copies
    assert torch.equal(r.get("f32"), tensors["f32"])
    buf = torch.empty(3, 5, dtype=torch.bfloat16)
    assert r.get("bf16", out=buf) is buf and torch.equal(buf, tensors["bf16"])
    with pytest.raises(ValueError, match="out must be"):
        r.get("bf16", out=torch.empty(3, 5))
    assert r.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert r.config is None and r.aux_names() == []
    r.close()


def test_read_hf_dir_matches_safetensors(tiny_llama):
    base = tiny_llama["base"]
    r = open_model(str(base))
    ref = load_file(str(base / "model.safetensors"))
    assert set(r.keys()) == set(ref) and len(r) == len(ref)
    for k in r.keys():
        assert torch.equal(r.get(k), ref[k]), k
    assert r.config["model_type"] == "llama"
    assert {"config.json", "generation_config.json"} <= set(r.aux_names())
    assert r.read_aux("config.json") == (base / "config.json").read_bytes()
    assert r.weight_files == ["model.safetensors"] and r.index_file is None


def test_read_sharded_dir_with_index(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama["expert_1"])
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="30KB")  # written by transformers, not by us
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    r = open_model(str(out))
    assert set(r.keys()) == set(index["weight_map"]) and r.weight_files == shards
    files_in_order = [r.info(k).file for k in r.keys()]
    assert files_in_order == sorted(files_in_order)  # grouped shard by shard
    sd = model.state_dict()
    for k in r.keys():
        assert r.info(k).file == index["weight_map"][k]
        assert torch.equal(r.get(k), sd[k]), k
    assert r.total_bytes == index["metadata"]["total_size"]
    assert not any(n.endswith(".safetensors") for n in r.aux_names())


def test_reader_is_lazy_sparse_huge_tensor(tmp_path):
    """A 64 GiB tensor stored as a sparse hole: opening and reading the small tensor never touch it."""
    small = torch.arange(10, dtype=torch.float32)
    big_n = 16 * 2**30  # float32 elements: 64 GiB
    header = {"small": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]},
              "huge": {"dtype": "F32", "shape": [big_n], "data_offsets": [40, 40 + 4 * big_n]}}
    path = _raw_file(tmp_path / "sparse.safetensors", header, small.numpy().tobytes())
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + 4 * big_n)
    r = open_model(str(path))
    assert r.info("huge").nbytes == 4 * big_n and r.total_bytes == 40 + 4 * big_n
    assert torch.equal(r.get("small"), small)
    assert len(r.fingerprint()) == 64


def test_reader_touches_only_the_shard_it_needs(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m"
    AutoModelForCausalLM.from_pretrained(tiny_llama["base"]).save_pretrained(out, max_shard_size="30KB")
    r = open_model(str(out))
    first, last = r.weight_files[0], r.weight_files[-1]
    name_first = next(k for k in r.keys() if r.info(k).file == first)
    name_last = next(k for k in r.keys() if r.info(k).file == last)
    (out / last).unlink()  # after open: the headers are already read
    assert r.get(name_first).numel() > 0
    with pytest.raises(InputError, match=f"{last}.*{name_last}"):
        r.get(name_last)


def test_aux_files_and_fingerprint(tmp_path, tiny_llama):
    src = tmp_path / "m"
    shutil.copytree(tiny_llama["base"], src)
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / "head.safetensors").write_bytes(b"x")
    (src / "pytorch_model.bin").write_bytes(b"stale")
    (src / "checkpoint-500").mkdir()
    (src / "checkpoint-500" / "optimizer.pt").write_bytes(b"stale")
    (src / ".cache").mkdir()
    (src / ".cache" / "lock").write_text("")
    r = open_model(str(src))
    names = r.aux_names()
    assert "1_Pooling/config.json" in names and "head.safetensors" in names and "config.json" in names
    assert "pytorch_model.bin" not in names and "model.safetensors" not in names
    assert not any(n.startswith("checkpoint-500") for n in names)
    assert not any(n.startswith(".") for n in names)
    aux = r.aux_files()
    assert set(aux) == set(names) and aux["1_Pooling/config.json"] == b"{}"
    with pytest.raises(InputError, match="model.safetensors"):
        r.read_aux("model.safetensors")

    fp = r.fingerprint()
    assert open_model(str(src)).fingerprint() == fp  # stable across opens
    moved = tmp_path / "elsewhere"
    shutil.copytree(src, moved)
    assert open_model(str(moved)).fingerprint() == fp  # names are relative
    # Two experts share every header byte and size; the content sample tells them apart.
    e0, e1 = open_model(str(tiny_llama["expert_0"])), open_model(str(tiny_llama["expert_1"]))
    assert e0._headers["model.safetensors"].raw == e1._headers["model.safetensors"].raw
    assert e0.fingerprint() != e1.fingerprint()
    # Changing one value of one tensor changes it.
    meta = r.info("model.norm.weight")
    with open(moved / "model.safetensors", "r+b") as f:
        f.seek(meta.offset)
        f.write(struct.pack("<f", 123.0))
    assert open_model(str(moved)).fingerprint() != fp


def test_reader_pickles(tiny_llama):
    r = open_model(str(tiny_llama["base"]))
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.keys() == r.keys() and torch.equal(r2.get(r.keys()[0]), r.get(r.keys()[0]))


# ---- bad inputs ----------------------------------------------------------------------------

def _good_header():
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}


@pytest.mark.parametrize("case,pattern", [
    ("tiny", r"bad\.safetensors.*shorter than the 8-byte"),
    ("empty", r"bad\.safetensors.*0 bytes"),
    ("length_beyond", r"bad\.safetensors.*header length \d+ bytes goes beyond"),
    ("bad_json", r"bad\.safetensors.*invalid JSON"),
    ("not_object", r"bad\.safetensors.*expected a JSON object"),
    ("offsets_beyond", r"bad\.safetensors.*tensor 'b'.*beyond the end"),
    ("truncated_data", r"bad\.safetensors.*tensor 'b'.*beyond the end"),
    ("overlap", r"bad\.safetensors.*tensor 'b'.*overlap.*'a'"),
    ("size_mismatch", r"bad\.safetensors.*tensor 'a'.*needs 8"),
    ("unknown_dtype", r"bad\.safetensors.*tensor 'b'.*unknown dtype 'C64'"),
    ("bad_shape", r"bad\.safetensors.*tensor 'a'.*shape"),
])
def test_corrupt_single_file(tmp_path, case, pattern):
    p = tmp_path / "bad.safetensors"
    h, data = _good_header(), bytes(16)
    if case == "tiny":
        p.write_bytes(b"\x01\x02\x03")
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "length_beyond":
        _raw_file(p, h, data, length=10_000)
    elif case == "bad_json":
        _raw_file(p, b'{"a": {"dtype": "F32",', data)
    elif case == "not_object":
        _raw_file(p, b"[1, 2, 3]", data)
    elif case == "offsets_beyond":
        h["b"]["data_offsets"] = [8, 24]
        h["b"]["shape"] = [4]
        _raw_file(p, h, data)
    elif case == "truncated_data":
        _raw_file(p, h, data[:12])
    elif case == "overlap":
        h["b"]["data_offsets"] = [4, 12]
        _raw_file(p, h, data)
    elif case == "size_mismatch":
        h["a"]["data_offsets"] = [0, 6]
        _raw_file(p, h, data)
    elif case == "unknown_dtype":
        h["b"]["dtype"] = "C64"
        _raw_file(p, h, data)
    elif case == "bad_shape":
        h["a"]["shape"] = [2, "x"]
        _raw_file(p, h, data)
    with pytest.raises(InputError, match=pattern):
        open_model(str(p))


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(InputError, match=r"nope.*does not exist"):
        open_model(str(tmp_path / "nope"))
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"noweights.*no safetensors weights found"):
        open_model(str(d))
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match=r"pytorch_model\.bin.*convert"):
        open_model(str(d))
    (d / "a.safetensors").write_bytes(b"")
    (d / "b.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"several \.safetensors files"):
        open_model(str(d))


def test_bad_index_and_missing_tensor(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"x": torch.ones(2), "y": torch.zeros(3)}, str(d / "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                            "z": "model-00002-of-00002.safetensors"}}
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"index\.json.*model-00002-of-00002\.safetensors.*does not exist"):
        open_model(str(d))
    index["weight_map"]["z"] = "model-00001-of-00002.safetensors"
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"index\.json.*tensor 'z'.*no such tensor"):
        open_model(str(d))
    (d / INDEX_NAME).write_text("{not json")
    with pytest.raises(InputError, match=r"index\.json.*invalid JSON"):
        open_model(str(d))
    del index["weight_map"]["z"]
    (d / INDEX_NAME).write_text(json.dumps(index))
    r = open_model(str(d))
    assert r.keys() == ["x"]  # the index decides which tensors belong to the model
    with pytest.raises(InputError, match=r"tensor 'y' not found"):
        r.get("y")
    with pytest.raises(InputError, match=r"tensor 'xx' not found.*'x'"):
        r.info("xx")


def test_check_finite():
    check_finite("w", torch.ones(3), "model-a")
    check_finite("i", torch.arange(3), "model-a")
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")], dtype=torch.bfloat16)
    with pytest.raises(InputError, match=r"model-a: tensor 'w'.*1 NaN and 2 Inf"):
        check_finite("w", bad, "model-a")


# ---- writing -------------------------------------------------------------------------------

def _tensors(n=10, numel=256, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"layer.{i}.weight": torch.randn(numel, generator=g).to(dtype) for i in range(n)}


def test_writer_shards_and_index(tmp_path):
    tensors = _tensors(10, 256)  # 1 KiB each
    out = tmp_path / "out"
    seen = []
    with ShardedWriter(str(out), 3 * 1024, on_shard=seen.append) as w:
        for k, t in tensors.items():
            w.add(k, t)
        w.add("big", torch.ones(2048))  # 8 KiB: over the limit, gets a shard of its own
        w.add("tail", torch.ones(4))
    stats = w.stats
    expected = 10 // 3 + 1 + 1 + 1  # 3+3+3+1 small, then big alone, then tail
    files = sorted(p.name for p in out.iterdir())
    shards = [f"model-{i:05d}-of-{expected:05d}.safetensors" for i in range(1, expected + 1)]
    assert files == shards + [INDEX_NAME]
    index = json.loads((out / INDEX_NAME).read_text())
    total = sum(t.numel() * 4 for t in tensors.values()) + 8192 + 16
    assert index["metadata"]["total_size"] == total == stats.tensor_bytes
    assert set(index["weight_map"]) == set(tensors) | {"big", "tail"}
    assert index["weight_map"]["big"] == f"model-00005-of-{expected:05d}.safetensors"
    assert [s.n_tensors for s in seen] == [3, 3, 3, 1, 1, 1] and stats.n_shards == expected
    for shard in files[:-1]:  # every shard is a valid file for the reference library
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata()["format"] == "pt"
            size = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
            assert size <= 3 * 1024 or list(f.keys()) == ["big"]
            for k in f.keys():
                assert index["weight_map"][k] == shard
    r = open_model(str(out))
    for k, t in tensors.items():
        assert torch.equal(r.get(k), t)
    assert stats.bytes_written == sum(p.stat().st_size for p in out.iterdir())
    assert stats.seconds > 0 and stats.io_seconds > 0


def test_plan_mode_writes_the_same_bytes(tmp_path):
    assert pack_shards([1024] * 10 + [8192, 16], 3072) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 5, 6]
    assert pack_shards([5, 5, 5], 10) == [1, 1, 2] and pack_shards([], 10) == []
    tensors = {**_tensors(7, 300), "big": torch.ones(5000), "b16": torch.ones(9, dtype=torch.bfloat16)}
    plan = [(k, t.numel() * t.element_size()) for k, t in tensors.items()]
    for mode in ("dynamic", "plan"):
        with ShardedWriter(str(tmp_path / mode), 3000, plan=plan if mode == "plan" else None) as w:
            for k, t in tensors.items():
                w.add(k, t)
    dyn, pl = sorted((tmp_path / "dynamic").iterdir()), sorted((tmp_path / "plan").iterdir())
    assert [p.name for p in dyn] == [p.name for p in pl] and len(dyn) == 7  # 6 shards + index
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(dyn, pl))

    w = ShardedWriter(str(tmp_path / "bad"), 3000, plan=plan)
    with pytest.raises(OutputError, match=r"'layer.1.weight'.*does not follow the plan; expected 'layer.0.weight'"):
        w.add("layer.1.weight", tensors["layer.1.weight"])
    w.add("layer.0.weight", tensors["layer.0.weight"])
    with pytest.raises(OutputError, match="plan lists 9 tensors but 1 were added"):
        w.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamic", "plan"]


def test_writer_one_shard_still_has_index(tmp_path):
    out = tmp_path / "one"
    with ShardedWriter(str(out), "1MB") as w:
        w.add("a", torch.ones(3, dtype=torch.bfloat16))
        w.write_file("config.json", b"{}")
        w.write_file("sub/dir/notes.txt", "hello")
        w.write_tensors("experts/e0.safetensors", {"u": torch.eye(2)}, {"kind": "expert"})
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "experts", "model-00001-of-00001.safetensors", INDEX_NAME, "sub"]
    assert (out / "sub/dir/notes.txt").read_text() == "hello"
    e = open_model(str(out / "experts/e0.safetensors"))
    assert torch.equal(e.get("u"), torch.eye(2)) and e.metadata["kind"] == "expert"
    assert open_model(str(out)).get("a").dtype == torch.bfloat16


def test_writer_rejects_bad_names(tmp_path):
    w = ShardedWriter(str(tmp_path / "o"), 1024)
    w.add("a", torch.ones(1))
    with pytest.raises(OutputError, match="'a' was already added"):
        w.add("a", torch.ones(1))
    with pytest.raises(OutputError, match="reserved"):
        w.write_file(INDEX_NAME, b"{}")
    with pytest.raises(OutputError, match="not a relative file path"):
        w.write_file("../escape.txt", b"")
    with pytest.raises(OutputError, match="complex64"):
        w.add("c", torch.ones(2, dtype=torch.complex64))
    w.abort()
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_writer_exception_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(str(out), 1024) as w:
            for k, t in _tensors(6).items():
                w.add(k, t)
            assert len(w.shards) >= 2  # shards were written to the staging directory
            assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
            assert not is_committed(str(out))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_overwrite_rules(tmp_path):
    out = tmp_path / "out"
    with ShardedWriter(str(out), 1024) as w:
        for k, t in _tensors(4).items():
            w.add(k, t)
        w.write_file("old.txt", b"old")
    with pytest.raises(OutputError, match=r"out.*already exists"):
        ShardedWriter(str(out), 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # refused before any work
    with ShardedWriter(str(out), 1 << 20, overwrite=True) as w:
        w.add("new", torch.full((3,), 7.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # old copy removed, no leftovers
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00001.safetensors", INDEX_NAME]
    assert open_model(str(out)).keys() == ["new"] and is_committed(str(out))


def test_writer_refuses_output_that_appears_during_write(tmp_path):
    out = tmp_path / "out"
    w = ShardedWriter(str(out), 1024)
    w.add("a", torch.ones(4))
    out.mkdir()
    (out / "someone_else.txt").write_text("x")
    with pytest.raises(OutputError, match="appeared while writing"):
        w.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["someone_else.txt"]


@pytest.mark.parametrize("family,auto", [("tiny_llama", "AutoModelForCausalLM"), ("tiny_bert", "AutoModel")])
def test_transformers_loads_writer_output(tmp_path, request, family, auto):
    import transformers

    base = request.getfixturevalue(family)["expert_2"]
    r = open_model(str(base))
    out = tmp_path / "merged"
    with ShardedWriter(str(out), r.total_bytes // 3) as w:
        for k in r.keys():
            w.add(k, r.get(k))
        copied = w.copy_aux_from(r)
    assert "config.json" in copied and len(w.shards) >= 3
    model = getattr(transformers, auto).from_pretrained(out)
    sd = model.state_dict()
    for k in r.keys():
        assert torch.equal(sd[k], r.get(k)), k


def test_bf16_roundtrip_bytes_exact(tmp_path):
    t = _tensors(3, 1000, torch.bfloat16)
    with ShardedWriter(str(tmp_path / "o"), 2500) as w:
        for k, v in t.items():
            w.add(k, v)
    r = open_model(str(tmp_path / "o"))
    assert len(r.weight_files) == 3
    for k, v in t.items():
        got = r.get(k)
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), v.view(torch.int16))


def test_check_writable_local(tmp_path):
    check_writable(str(tmp_path / "a" / "b" / "out"))  # creatable parents are fine
    assert not (tmp_path / "a").exists()  # a dry run creates nothing
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="exists.*already exists"):
        check_writable(str(tmp_path / "exists"))
    check_writable(str(tmp_path / "exists"), overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a directory"):
        check_writable(str(tmp_path / "file" / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "file"]


def test_save_safetensors_atomic(tmp_path):
    p = tmp_path / "cache" / "stats.safetensors"
    n = save_safetensors_atomic(str(p), {"g": torch.eye(3, dtype=torch.float64)}, {"rows": "12"})
    assert n == p.stat().st_size
    assert torch.equal(load_file(str(p))["g"], torch.eye(3, dtype=torch.float64))
    save_safetensors_atomic(p, {"g": torch.zeros(2)}, {"rows": "13"})
    r = open_model(str(p))
    assert r.metadata == {"format": "pt", "rows": "13"} and torch.equal(r.get("g"), torch.zeros(2))
    assert os.listdir(p.parent) == ["stats.safetensors"]
    with pytest.raises(OutputError, match="strings"):
        save_safetensors_atomic(p, {"g": torch.zeros(2)}, {"rows": 13})


def test_staging_of_a_killed_writer_is_removed_by_the_next_one(tmp_path):
    """A writer killed with SIGKILL leaves its staging directory; the next writer of the same
    output removes it (its process is dead), and leaves alone what another writer still owns."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    code = ("import os, signal, torch; from esm_ray.io.writer import ShardedWriter\n"
            f"w = ShardedWriter({str(out)!r}, 100, plan=[('a', torch.float32, (64,)), ('b', torch.float32, (64,))])\n"
            "w.add('a', torch.ones(64)); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(left) == 1 and (left[0] / "model-00001-of-00002.safetensors").exists() and not out.exists()

    alive = ShardedWriter(str(out), 100)  # a writer that is still running in this process
    foreign = tmp_path / ".out.partial-foreign"  # no owner record: not ours to judge
    foreign.mkdir()
    with ShardedWriter(str(out), 100, overwrite=True) as w:
        w.add("a", torch.ones(3))
    assert not left[0].exists(), "the dead writer's staging directory is still there"
    assert alive._target.tmp.exists() and foreign.exists()
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00001.safetensors", INDEX_NAME]
    alive.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-foreign", "out"]


def test_staging_owner_pid_reused_by_another_process_counts_as_dead(tmp_path):
    import socket

    from esm_ray.io.staging import _OWNER, _owner
    from esm_ray.io.staging import dead_owner as _stale

    d = tmp_path / ".x.partial-1"
    d.mkdir()
    (d / _OWNER).write_text(json.dumps(_owner()))
    assert _stale(d) is None  # this very process: alive
    (d / _OWNER).write_text(json.dumps(dict(_owner(), start="1")))  # same pid, another start time
    assert _stale(d) == os.getpid()
    (d / _OWNER).write_text(json.dumps(dict(_owner(), start="1", host=socket.gethostname() + "-other")))
    assert _stale(d) is None  # another host's process cannot be checked from here


def test_streamed_shards_sync_in_the_background_and_report_a_failed_sync(tmp_path, monkeypatch):
    """A shard written tensor by tensor is synced on a helper thread every SYNC_EVERY bytes (the
    final fsync then only waits for the tail): the files are the same as with one sync at the
    end, and a sync that fails in the background fails the write, naming the shard, with
    nothing published."""
    from esm_ray.io import targets

    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(12)}
    plan = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]  # headers known: streamed
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(targets.os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    for every, name in ((1 << 40, "once"), (2048, "often")):
        monkeypatch.setattr(targets, "SYNC_EVERY", every)
        with ShardedWriter(str(tmp_path / name), 4096, plan=plan) as w:
            for k, t in tensors.items():
                w.add(k, t)
        if name == "once":
            assert not synced
    assert len(synced) >= 3  # 3 shards of 4 KiB: each synced at least once while it was written
    once, often = sorted((tmp_path / "once").iterdir()), sorted((tmp_path / "often").iterdir())
    assert [p.name for p in once] == [p.name for p in often]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(once, often))

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(targets.os, "fdatasync", failing)
    with pytest.raises(OutputError, match=r"failed \(shard 1\): write failed: Input/output error"):
        with ShardedWriter(str(tmp_path / "failed"), 4096, plan=plan) as w:
            for k, t in tensors.items():
                w.add(k, t)
    assert not (tmp_path / "failed").exists()
