"""IO layer against a real S3 server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from esm_ray.errors import InputError, OutputError
from esm_ray.io import (INDEX_NAME, ShardedWriter, check_writable, is_committed, make_client,
                        open_model, save_safetensors_atomic)
from esm_ray.io import s3 as s3io
from esm_ray.io import s3_upload as s3up
from esm_ray.spec import S3Options

pytest_plugins = ["tests.fixtures.s3"]

MiB = 2**20


def _upload_dir(client, bucket: str, prefix: str, src: Path) -> None:
    for p in sorted(src.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(src).as_posix()}")


def _keys(client, bucket: str, prefix: str) -> list[str]:
    return sorted(o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                  for o in page.get("Contents", []))


def _index_shards(client, bucket: str, prefix: str) -> list[str]:
    """The shard names the committed index at `prefix` (ending in '/') names, sorted."""
    body = client.get_object(Bucket=bucket, Key=prefix + INDEX_NAME)["Body"].read()
    return sorted(set(json.loads(body)["weight_map"].values()))


@contextlib.contextmanager
def _recording_gets(client):
    """Record the Range of every GetObject the client sends inside the block."""
    ranges: list[str] = []

    def record(params, **kw):
        ranges.append(params.get("headers", {}).get("Range") or params["url_path"])

    events = client.meta.events
    events.register("before-call.s3.GetObject", record, unique_id="test-recording-gets")
    try:
        yield ranges
    finally:
        events.unregister("before-call.s3.GetObject", unique_id="test-recording-gets")


def test_make_client_config(s3_env, monkeypatch):
    c = make_client()
    assert c.meta.endpoint_url == s3_env.endpoint_url  # from AWS_ENDPOINT_URL
    assert c.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}  # 5 tries in all
    assert c.meta.config.s3["addressing_style"] == "path"
    c2 = make_client(S3Options(endpoint_url="http://127.0.0.1:1", max_attempts=2, addressing_style="virtual"))
    assert c2.meta.endpoint_url == "http://127.0.0.1:1"
    assert c2.meta.config.retries["total_max_attempts"] == 2
    assert c2.meta.config.s3["addressing_style"] == "virtual"
    assert make_client() is c  # cached per settings and credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "other")
    assert make_client() is not c


def test_read_model_from_s3(s3_bucket, s3_env, tiny_llama):
    base = tiny_llama["base"]
    _upload_dir(s3_env.client(), s3_bucket, "models/base", base)
    local = open_model(str(base))
    r = open_model(f"s3://{s3_bucket}/models/base")
    assert r.keys() == local.keys() and r.total_bytes == local.total_bytes
    for k in r.keys():
        assert r.info(k) == local.info(k)
        got = r.get(k)
        assert got.dtype == local.info(k).dtype and torch.equal(got, local.get(k)), k
    assert r.config == local.config and sorted(r.aux_names()) == sorted(local.aux_names())
    assert r.read_aux("config.json") == (base / "config.json").read_bytes()
    assert r.fingerprint() == open_model(f"s3://{s3_bucket}/models/base/").fingerprint()
    # one object as a model
    one = open_model(f"s3://{s3_bucket}/models/base/model.safetensors")
    assert one.keys() == local.keys() and one.aux_names() == []


def test_s3_reads_are_lazy_ranged_gets(s3_bucket, s3_env, tiny_llama):
    _upload_dir(s3_env.client(), s3_bucket, "m", tiny_llama["expert_0"])
    size = (tiny_llama["expert_0"] / "model.safetensors").stat().st_size
    with _recording_gets(make_client()) as gets:  # the cached client the reader will use
        r = open_model(f"s3://{s3_bucket}/m")
    assert gets == ["bytes=0-65543"] and size > 65544  # opening reads the header only
    assert r._store.client is make_client()
    name = "model.layers.1.mlp.down_proj.weight"
    meta = r.info(name)
    with _recording_gets(r._store.client) as gets:
        t = r.get(name)
    assert gets == [f"bytes={meta.offset}-{meta.offset + meta.nbytes - 1}"]  # one GET, just its bytes
    assert torch.equal(t, open_model(str(tiny_llama["expert_0"])).get(name))


def test_sharded_write_to_s3_and_read_back(s3_bucket, s3_env, tiny_bert):
    src = open_model(str(tiny_bert["expert_1"]))
    uri = f"s3://{s3_bucket}/out/merged"
    with ShardedWriter(uri, src.total_bytes // 4) as w:
        for k in src.keys():
            w.add(k, src.get(k))
        w.copy_aux_from(src)
        w.write_tensors("experts/e0.safetensors", {"a": torch.ones(2)})
    n = len(w.shards)
    assert n >= 4
    keys = _keys(s3_env.client(), s3_bucket, "out/merged/")
    job = w._target.job
    assert _index_shards(s3_env.client(), s3_bucket, "out/merged/") == w.shard_names
    expected = {f"out/merged/model-{job}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
    expected |= {f"out/merged/{a}" for a in src.aux_names()}
    expected |= {f"out/merged/{INDEX_NAME}", "out/merged/experts/e0.safetensors"}
    assert set(keys) == expected  # staging objects are gone
    r = open_model(uri)
    assert set(r.keys()) == set(src.keys()) and len(r.weight_files) == n
    for k in src.keys():
        assert torch.equal(r.get(k), src.get(k)), k
    index = json.loads(r._store.read_all(INDEX_NAME))
    assert index["metadata"]["total_size"] == src.total_bytes
    assert not s3_env.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_plan_mode_uploads_shards_without_copies(s3_bucket, s3_env):
    tensors = {f"t{i}": torch.full((300,), float(i)) for i in range(7)}
    plan = [(k, t.numel() * 4) for k, t in tensors.items()]
    uri = f"s3://{s3_bucket}/planned"
    calls: list[str] = []
    events = make_client().meta.events
    events.register("before-call.s3", lambda model, **kw: calls.append(model.name), unique_id="t-plan")
    try:
        with ShardedWriter(uri, 2500, plan=plan) as w:
            for k, t in tensors.items():
                w.add(k, t)
            w.write_file("config.json", b"{}")
    finally:
        events.unregister("before-call.s3", unique_id="t-plan")
    assert calls.count("CopyObject") == 1  # config.json only; the 4 shards went straight to final keys
    shards = [f"planned/model-{w._target.job}-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert [s.staged for s in w.shards] == shards
    r = open_model(uri)
    assert all(torch.equal(r.get(k), t) for k, t in tensors.items())
    assert _keys(s3_env.client(), s3_bucket, "") == sorted(
        shards
        + ["planned/config.json", f"planned/{INDEX_NAME}"])


def test_plan_mode_keeps_an_overwritten_output_whole_until_commit(s3_bucket, s3_env):
    """overwrite=True over a finished output: a job that dies half-way leaves the old output
    readable; one that commits replaces it and leaves nothing else behind."""
    old = {f"t{i}": torch.full((300,), float(i)) for i in range(7)}
    new = {k: t + 100 for k, t in old.items()}
    plan = [(k, t.numel() * 4) for k, t in old.items()]
    uri = f"s3://{s3_bucket}/over"
    with ShardedWriter(uri, 2500, plan=plan) as w:
        for k, t in old.items():
            w.add(k, t)
    before, old_job = _keys(s3_env.client(), s3_bucket, ""), w._target.job

    with pytest.raises(RuntimeError, match="killed"):
        with ShardedWriter(uri, 2500, plan=plan, overwrite=True) as w:
            for k in list(new)[:5]:  # two shards uploaded, then the job dies
                w.add(k, new[k])
            assert len(w.shards) == 2
            raise RuntimeError("killed")
    assert _keys(s3_env.client(), s3_bucket, "") == before
    r = open_model(uri)
    assert all(torch.equal(r.get(k), t) for k, t in old.items())

    with ShardedWriter(uri, 2500, plan=plan, overwrite=True) as w:
        for k, t in new.items():
            w.add(k, t)
    after = _keys(s3_env.client(), s3_bucket, "")  # the same layout under the new job's names
    assert after == [k.replace(old_job, w._target.job) for k in before] and old_job != w._target.job
    r = open_model(uri)
    assert all(torch.equal(r.get(k), t) for k, t in new.items())


def test_multipart_for_big_shards(s3_bucket, s3_env):
    big = torch.randn(3 * MiB // 2, generator=torch.Generator().manual_seed(0))  # 6 MiB of float32
    client = s3_env.client()
    etags = []

    def staged(info):
        etags.append(client.head_object(Bucket=s3_bucket, Key=info.staged)["ETag"].strip('"'))

    uri = f"s3://{s3_bucket}/mp"
    with ShardedWriter(uri, 8 * MiB, part_size=5 * MiB, on_shard=staged, copy_threshold=5 * MiB) as w:
        w.add("big", big)
        w.add("small", torch.ones(10))
    assert [s.parts for s in w.shards] == [2]
    assert etags[0].endswith("-2")  # the server saw a 2-part upload
    head = client.head_object(Bucket=s3_bucket, Key=f"mp/{w.shard_names[0]}")
    assert head["ContentLength"] == w.shards[0].nbytes
    assert head["ETag"].strip('"').endswith("-1")  # copied with UploadPartCopy (over copy_threshold)
    r = open_model(uri)
    assert torch.equal(r.get("big"), big) and torch.equal(r.get("small"), torch.ones(10))


def test_stream_upload_helpers(s3_bucket, s3_env, tmp_path):
    client = make_client()
    data = bytes(range(256)) * (45 * 1024)  # 11.25 MiB
    f = tmp_path / "blob"
    f.write_bytes(data)
    res = s3up.upload_file(client, s3_bucket, "blob", f, part_size=5 * MiB)
    assert res.parts == 3 and res.etag.endswith("-3") and res.size == len(data)
    assert s3io.get_range(client, s3_bucket, "blob", 1000, 1010) == data[1000:1010]
    assert s3io.get_object(client, s3_bucket, "blob") == data
    assert s3up.upload_stream(client, s3_bucket, "small", [b"ab", b"cd"]).parts == 0
    assert s3io.list_keys(client, s3_bucket, "") == ["blob", "small"]
    with pytest.raises(ValueError, match="minimum"):
        s3up.upload_stream(client, s3_bucket, "x", [b""], part_size=MiB)

    def failing():
        yield data[:6 * MiB]
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        s3up.upload_stream(client, s3_bucket, "aborted", failing(), part_size=5 * MiB)
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # aborted, not left open
    s3up.copy_object(client, s3_bucket, "blob", "copy", len(data), part_size=5 * MiB, threshold=5 * MiB)
    assert client.head_object(Bucket=s3_bucket, Key="copy")["ETag"].strip('"').endswith("-3")
    assert s3io.get_object(client, s3_bucket, "copy") == data
    s3io.delete_keys(client, s3_bucket, ["blob", "small", "copy"])
    assert s3io.list_keys(client, s3_bucket, "") == []


def test_s3_abort_leaves_nothing(s3_bucket, s3_env):
    uri = f"s3://{s3_bucket}/aborted"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(uri, 1024) as w:
            for i in range(5):
                w.add(f"t{i}", torch.ones(256))
            w.write_file("config.json", b"{}")
            assert len(w.shards) >= 4
            raise RuntimeError("boom")
    assert _keys(s3_env.client(), s3_bucket, "") == []
    with pytest.raises(InputError, match="does not exist"):
        open_model(uri)


def test_s3_overwrite_rules(s3_bucket, s3_env):
    uri = f"s3://{s3_bucket}/o"
    with ShardedWriter(uri, 1024) as w:
        for i in range(3):
            w.add(f"t{i}", torch.ones(256))
        w.write_file("old.txt", b"old")
    with pytest.raises(OutputError, match=rf"s3://{s3_bucket}/o.*already exists"):
        ShardedWriter(uri, 1024)
    with pytest.raises(OutputError, match="already exists"):
        check_writable(uri)
    check_writable(uri, overwrite=True)
    with ShardedWriter(uri, 1 << 20, overwrite=True) as w:
        w.add("new", torch.zeros(2))
    assert _keys(s3_env.client(), s3_bucket, "") == [f"o/model-{w._target.job}-00001-of-00001.safetensors", f"o/{INDEX_NAME}"]
    assert is_committed(uri) and not is_committed(f"s3://{s3_bucket}/other")
    assert open_model(uri).keys() == ["new"]


def test_s3_errors_are_clear(s3_bucket, s3_env, monkeypatch):
    check_writable(f"s3://{s3_bucket}/fresh")
    assert _keys(s3_env.client(), s3_bucket, "") == []  # the write probe was removed
    with pytest.raises(InputError, match=r"s3://no-such-bucket-x/m.*bucket 'no-such-bucket-x' does not exist"):
        open_model("s3://no-such-bucket-x/m")
    with pytest.raises(OutputError, match=r"no-such-bucket-x.*does not exist"):
        check_writable("s3://no-such-bucket-x/out")
    with pytest.raises(InputError, match=rf"s3://{s3_bucket}/absent.*does not exist"):
        open_model(f"s3://{s3_bucket}/absent")
    with pytest.raises(InputError, match=rf"s3://{s3_bucket}/absent\.safetensors.*not found"):
        open_model(f"s3://{s3_bucket}/absent.safetensors")
    secret = "WrongSecretValue123456"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    for call, err in [(lambda: open_model(f"s3://{s3_bucket}/m"), InputError),
                      (lambda: ShardedWriter(f"s3://{s3_bucket}/w", 1024), OutputError),
                      (lambda: check_writable(f"s3://{s3_bucket}/w"), OutputError),
                      (lambda: save_safetensors_atomic(f"s3://{s3_bucket}/x.safetensors", {"a": torch.ones(1)}), OutputError)]:
        with pytest.raises(err) as info:
            call()
        msg = str(info.value)
        assert f"s3://{s3_bucket}/" in msg and "AWS_SECRET_ACCESS_KEY" in msg, msg
        assert secret not in msg and "testkey" not in msg
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-key")
    with pytest.raises(InputError, match="rejected the credentials") as info:
        open_model(f"s3://{s3_bucket}/m")
    assert secret not in str(info.value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(InputError, match=rf"s3://{s3_bucket}/m.*no usable S3 credentials"):
        open_model(f"s3://{s3_bucket}/m")


def test_unreachable_endpoint(s3_env):
    opts = S3Options(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(InputError, match=r"s3://b/m.*cannot connect to http://127.0.0.1:9"):
        open_model("s3://b/m", s3=opts)
    with pytest.raises(OutputError, match=r"s3://b/m.*cannot connect"):
        check_writable("s3://b/m", s3=opts)


def test_save_safetensors_atomic_s3(s3_bucket, s3_env):
    uri = f"s3://{s3_bucket}/cache/stats.safetensors"
    save_safetensors_atomic(uri, {"gram": torch.eye(4, dtype=torch.float64)}, {"rows": "5"})
    r = open_model(uri)
    assert torch.equal(r.get("gram"), torch.eye(4, dtype=torch.float64)) and r.metadata["rows"] == "5"


def test_server_killed_mid_write_leaves_no_index(tmp_path, seaweedfs_factory):
    server = seaweedfs_factory(tmp_path / "sw")
    with server.environ():
        bucket = server.make_bucket("crash")
        uri = f"s3://{bucket}/model"
        killed = []

        def crash_after_first(info):
            if info.index == 1:
                server.kill()
                killed.append(info)

        with pytest.raises(OutputError, match=rf"s3://{bucket}/model.*shard 2.*cannot connect"):
            with ShardedWriter(uri, 64 * 1024, s3=S3Options(max_attempts=1), on_shard=crash_after_first) as w:
                for i in range(6):
                    w.add(f"t{i}", torch.ones(16 * 1024))  # 64 KiB: one shard each
                w.write_file("config.json", b"{}")
        assert killed and not server.running
        server = seaweedfs_factory(tmp_path / "sw", ports=server.ports, ready="list")  # same data
        keys = _keys(server.client(), bucket, "")
        assert f"model/{INDEX_NAME}" not in keys and not is_committed(uri)
        assert len(keys) == 1 and keys[0].startswith("model/.partial-")  # shard 1, staged, hidden
        with pytest.raises(InputError, match="does not exist"):
            open_model(uri)
