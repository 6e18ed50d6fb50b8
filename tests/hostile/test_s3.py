"""S3 outputs under attack and accident, on a real SeaweedFS: overwrite killed at every step of
the commit, overwrite of foreign objects, unfinished prefixes read as models, and object keys
that would lead a download out of its cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from esm_ray.cli import main
from esm_ray.errors import InputError, OutputError
from esm_ray.io import INDEX_NAME, ShardedWriter, check_writable, open_model
from esm_ray.routed.load import local_dir
from esm_ray.spec import S3Options

pytest_plugins = ["tests.fixtures.s3"]

ONE_TRY = S3Options(max_attempts=1)
_MUTATING = {"PutObject", "CopyObject", "DeleteObject", "DeleteObjects", "UploadPartCopy",
             "CompleteMultipartUpload"}


def _listing(client, bucket: str, prefix: str = "") -> dict[str, str]:
    """key -> ETag of every object under `prefix`."""
    return {o["Key"]: o["ETag"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])}


def _tensors(offset: float) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((300,), float(i) + offset) for i in range(7)}


def _write(uri: str, tensors: dict[str, torch.Tensor], *, overwrite: bool = False, files=None,
           hook=None, s3: S3Options | None = None) -> ShardedWriter:
    """A write as a merge job does it: a plan (shards straight to their keys), files, commit.
    `hook(writer)` runs just before the commit."""
    plan = [(k, t.numel() * 4) for k, t in tensors.items()]
    with ShardedWriter(uri, 2500, plan=plan, overwrite=overwrite, s3=s3) as w:
        for k, t in tensors.items():
            w.add(k, t)
        for rel, data in (files or {"config.json": b"{}"}).items():
            w.write_file(rel, data)
        if hook is not None:
            hook(w)
        w.commit()
    return w


def _state(uri: str, old: dict, new: dict) -> str:
    """'old' or 'new': which whole model the prefix holds now (fails on anything else)."""
    r = open_model(uri)
    got = {k: r.get(k) for k in r.keys()}
    assert set(got) == set(old), sorted(got)
    for name, want in (("old", old), ("new", new)):
        if all(torch.equal(got[k], want[k]) for k in want):
            return name
    raise AssertionError(f"{uri} holds neither the old nor the new model")


# ------------------------------------------------------------------- finding 6: kill in commit
def test_overwrite_killed_at_each_step_of_the_commit_keeps_old_or_new(tmp_path, seaweedfs_factory):
    """Kill the S3 server right after each write of an overwrite's commit (the old code deleted
    the old index first: killed there, neither model was left). Every time, the old or the new
    model must be readable whole; the next write removes what the killed one left."""
    server = seaweedfs_factory(tmp_path / "sw")
    with server.environ():
        bucket = server.make_bucket("commit")
        uri = f"s3://{bucket}/model"
        old, new = _tensors(0.0), _tensors(100.0)
        _write(uri, old)
        seen = []
        for k in range(1, 12):
            calls = []

            def kill_after_kth_write(w, k=k):
                def after(model, **kw):
                    if model.name in _MUTATING:
                        calls.append(model.name)
                        if len(calls) == k:
                            server.kill()
                w._target.client.meta.events.register("after-call.s3", after, unique_id="kill-k")

            try:
                _write(uri, new, overwrite=True, s3=ONE_TRY, hook=kill_after_kth_write)
                finished = True
            except OutputError as err:
                assert "cannot connect" in str(err) or "S3" in str(err), err
                finished = False
            finally:
                from esm_ray.io import make_client

                make_client(ONE_TRY).meta.events.unregister("after-call.s3", unique_id="kill-k")
            if server.running:
                assert finished and len(calls) < k  # the commit has fewer writes than k
                break
            server = seaweedfs_factory(tmp_path / "sw", ports=server.ports)  # same data
            state = _state(uri, old, new)  # the old code lost both after its DeleteObject(index)
            assert state == ("new" if finished else "old"), (calls, finished, state)
            seen.append((calls[-1], state))
        assert seen and seen[0][1] == "old" and seen[-1][1] == "new", seen
        assert any(name == "PutObject" for name, _ in seen)
        # a last, undisturbed overwrite leaves exactly one output and no leftovers
        w = _write(uri, old, overwrite=True)
        assert _state(uri, old, new) == "old"
        keys = set(_listing(server.client(), bucket))
        want = {f"model/{s}" for s in w.shard_names} | {f"model/{INDEX_NAME}", "model/config.json"}
        assert keys == want, sorted(keys ^ want)
        assert not server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_leftovers_of_a_killed_overwrite_are_hidden_then_removed(tmp_path, seaweedfs_factory):
    """An overwrite killed while uploading leaves shards under its own names and a staging
    area: the old output stays the model readers see (the stale shards are not copied as
    auxiliary files), and the next write to the prefix removes them and open uploads."""
    server = seaweedfs_factory(tmp_path / "sw")
    with server.environ():
        bucket = server.make_bucket("left")
        uri = f"s3://{bucket}/out"
        old, new = _tensors(0.0), _tensors(100.0)
        _write(uri, old, files={"config.json": b"{}", "merge_report.json": b"{}"})
        plan = [(k, t.numel() * 4) for k, t in new.items()]
        with pytest.raises(OutputError):
            with ShardedWriter(uri, 2500, plan=plan, overwrite=True, s3=ONE_TRY) as w:
                w.write_file("config.json", b'{"new": 1}')  # staged under .partial-<job>/
                for i, (k, t) in enumerate(new.items()):
                    if i == 4:
                        server.kill()
                    w.add(k, t)
        server = seaweedfs_factory(tmp_path / "sw", ports=server.ports)
        client = server.client()
        # a multipart upload a killed process never finished (made here: tiny shards need none)
        up = client.create_multipart_upload(Bucket=bucket, Key=f"out/model-{w._target.job}-00004-of-00004.safetensors")
        left = [k for k in _listing(client, bucket) if w._target.job in k]
        assert any(".partial-" in k for k in left) and any(k.endswith(".safetensors") and "/model-" in k for k in left)
        r = open_model(uri)
        assert _state(uri, old, new) == "old" and sorted(r.aux_names()) == ["config.json", "merge_report.json"]
        client.put_object(Bucket=bucket, Key="out/README.md", Body=b"mine")  # beside the output
        w2 = _write(uri, new, overwrite=True)
        keys = set(_listing(client, bucket))
        assert keys == ({f"out/{s}" for s in w2.shard_names}
                        | {f"out/{INDEX_NAME}", "out/config.json", "out/README.md"}), sorted(keys)
        assert up["UploadId"] not in [u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
        assert _state(uri, old, new) == "new"


def test_unfinished_prefix_is_not_a_model(tmp_path, seaweedfs_factory):
    """A write killed just before its index leaves every shard and no index: esm-ray's reader
    refuses it by name (the old reader opened it as a model), also at the CLI (exit 2)."""
    server = seaweedfs_factory(tmp_path / "sw")
    with server.environ():
        bucket = server.make_bucket("unfinished")
        uri = f"s3://{bucket}/half"

        def kill_before_index(w):
            def before(params, **kw):
                if params.get("Key", "").endswith(INDEX_NAME):
                    server.kill()
            w._target.client.meta.events.register("before-parameter-build.s3.PutObject", before,
                                                  unique_id="kill-index")

        try:
            with pytest.raises(OutputError):
                _write(uri, _tensors(0.0), s3=ONE_TRY, hook=kill_before_index)
        finally:
            from esm_ray.io import make_client

            make_client(ONE_TRY).meta.events.unregister("before-parameter-build.s3.PutObject",
                                                        unique_id="kill-index")
        server = seaweedfs_factory(tmp_path / "sw", ports=server.ports)
        keys = _listing(server.client(), bucket)
        assert sum(k.endswith(".safetensors") and "/model-" in k for k in keys) == 4, keys
        assert f"half/{INDEX_NAME}" not in keys
        with pytest.raises(InputError, match=rf"{uri}: holds shard files .* but no {INDEX_NAME}.*unfinished"):
            open_model(uri)
        spec = tmp_path / "s.yaml"
        spec.write_text(yaml.safe_dump({"base": uri, "experts": [{"name": "e0", "model": uri}],
                                        "method": {"name": "task_arithmetic"},
                                        "output": str(tmp_path / "out")}))
        assert main(["merge", str(spec), "--dry-run", "--no-progress"]) == 2


def test_local_shards_without_index_are_refused(tmp_path):
    d = tmp_path / "half"
    d.mkdir()
    save_file({"x": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"y": torch.ones(2)}, str(d / "model-00002-of-00002.safetensors"))
    with pytest.raises(InputError, match=rf"{d}: holds shard files \(model-00001-of-00002.safetensors, "
                                         rf"model-00002-of-00002.safetensors\) but no {INDEX_NAME}"):
        open_model(str(d))
    single = tmp_path / "single"
    single.mkdir()
    save_file({"x": torch.ones(2)}, str(single / "model.safetensors"))
    assert open_model(str(single)).keys() == ["x"]  # one file is a whole model


def test_versioned_output_loads_with_transformers(tiny_bert, tmp_path, s3_bucket, s3_env):
    """The index may name any shard files: a local copy of an S3 output loads with
    from_pretrained, before and after an overwrite."""
    from transformers import AutoModel

    src = open_model(str(tiny_bert["expert_1"]))
    uri = f"s3://{s3_bucket}/bert"
    for overwrite in (False, True):
        with ShardedWriter(uri, src.total_bytes // 3, overwrite=overwrite) as w:
            for k in src.keys():
                w.add(k, src.get(k))
            w.copy_aux_from(src)
    d = local_dir(uri, cache=tmp_path / "cache")
    assert len(w.shard_names) >= 3 and all(w._target.job in s for s in w.shard_names)
    sd = AutoModel.from_pretrained(str(d)).state_dict()
    names = {k: k.removeprefix("bert.") for k in src.keys() if k.removeprefix("bert.") in sd}
    assert len(names) >= len(src.keys()) - 2, sorted(set(src.keys()) - set(names))
    for k, name in names.items():
        assert torch.equal(sd[name], src.get(k)), k


# ------------------------------------------------------------- finding 1: foreign objects on S3
def test_overwrite_into_a_bucket_root_with_inputs_is_refused(tmp_path, s3_bucket, s3_env, tiny_llama):
    """`output: s3://bucket` with the inputs under models/ and overwrite: refused by name, and
    every object stays (the old code deleted the whole bucket at commit)."""
    client = s3_env.client()
    for name in ("base", "expert_0"):
        for p in sorted(tiny_llama[name].iterdir()):
            client.upload_file(str(p), s3_bucket, f"models/{name}/{p.name}")
    client.put_object(Bucket=s3_bucket, Key="notes.txt", Body=b"unrelated")
    before = _listing(client, s3_bucket)
    root = f"s3://{s3_bucket}"
    for call in (lambda: ShardedWriter(root, 1 << 20, overwrite=True),
                 lambda: ShardedWriter(root, 1 << 20),
                 lambda: check_writable(root, overwrite=True)):
        with pytest.raises(OutputError, match=rf"{root}.*not an esm-ray output \(s3://{s3_bucket}/notes.txt, "
                                              rf"s3://{s3_bucket}/models/\)"):
            call()
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "base": f"s3://{s3_bucket}/models/base",
        "experts": [{"name": "e0", "model": f"s3://{s3_bucket}/models/expert_0"}],
        "method": {"name": "task_arithmetic"}, "output": root}))
    assert main(["merge", str(spec), "--overwrite", "--no-progress"]) == 2
    assert _listing(client, s3_bucket) == before


def test_overwrite_replaces_only_the_esm_ray_output(s3_bucket, s3_env):
    """An esm-ray output at the bucket root with foreign objects beside and below it: overwrite
    replaces the output's index, shards and files, and leaves every other object."""
    client = s3_env.client()
    root = f"s3://{s3_bucket}"
    _write(root, _tensors(0.0), files={"config.json": b"{}", "old-only.txt": b"x",
                                        "experts/e0.safetensors": b"1"})
    foreign = {"models/base/model.safetensors": b"w", "notes.txt": b"n", "experts/mine.txt": b"m"}
    for key, body in foreign.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    w = _write(root, _tensors(1.0), overwrite=True, files={"config.json": b"{}"})
    keys = set(_listing(client, s3_bucket))
    assert keys == set(foreign) | {INDEX_NAME, "config.json", *w.shard_names}, sorted(keys)
    assert _state(root, _tensors(0.0), _tensors(1.0)) == "new"


def test_foreign_index_and_foreign_files_are_never_replaced(s3_bucket, s3_env):
    client = s3_env.client()
    # a model uploaded by another tool: its index has no esm-ray record
    save = {"weight_map": {"x": "model-00001-of-00001.safetensors"}, "metadata": {}}
    client.put_object(Bucket=s3_bucket, Key=f"hf/{INDEX_NAME}", Body=json.dumps(save).encode())
    client.put_object(Bucket=s3_bucket, Key="hf/model-00001-of-00001.safetensors", Body=b"w")
    before = _listing(client, s3_bucket)
    with pytest.raises(OutputError, match=rf"s3://{s3_bucket}/hf: holds a {INDEX_NAME} that esm-ray did not write"):
        ShardedWriter(f"s3://{s3_bucket}/hf", 1024, overwrite=True)
    with pytest.raises(OutputError, match="esm-ray did not write"):
        check_writable(f"s3://{s3_bucket}/hf", overwrite=True)
    assert _listing(client, s3_bucket) == before
    # a file someone put beside an esm-ray output, at a name the next write also writes
    uri = f"s3://{s3_bucket}/o"
    _write(uri, _tensors(0.0))
    client.put_object(Bucket=s3_bucket, Key="o/tokenizer.json", Body=b"theirs")
    with pytest.raises(OutputError, match=rf"s3://{s3_bucket}/o/tokenizer.json: already exists and is not part"):
        _write(uri, _tensors(1.0), overwrite=True, files={"config.json": b"{}", "tokenizer.json": b"ours"})
    assert client.get_object(Bucket=s3_bucket, Key="o/tokenizer.json")["Body"].read() == b"theirs"
    assert _state(uri, _tensors(0.0), _tensors(1.0)) == "old"


# ------------------------------------------------------------ finding 3: keys out of the cache
def test_download_keys_that_leave_the_cache_are_refused(tmp_path):
    """SeaweedFS refuses keys with '..' or '.' segments and folds '//' and a leading '/' (checked
    against the real server below), so the keys other servers store are tried on the function
    that maps listed keys to cache paths."""
    from esm_ray.routed.load import cache_paths

    root = tmp_path / "cache" / "tag"
    ok = cache_paths("s3://b/m", "m/", ["m/", "m/config.json", "m/heads/", "m/heads/a.safetensors"], root)
    assert ok == {"m/config.json": root / "config.json", "m/heads/a.safetensors": root / "heads/a.safetensors"}
    for key in ["m/../x", "m/a/../../x", "m//etc/passwd", "m/a//b", "m/./a", "m/.", "m/..",
                "m/a/..", "m/a//", "m//", "m/.complete", "m/a\0b", "other/x"]:
        with pytest.raises(InputError, match=rf"s3://b/m: object key {re.escape(repr(key))}"):
            cache_paths("s3://b/m", "m/", ["m/config.json", key], root)
        assert not (tmp_path / "x").exists() and not root.exists()
    with pytest.raises(InputError, match=r"s3://b/m: object key 'm/\.\./x' is not a plain relative path"):
        cache_paths("s3://b/m", "m/", ["m/../x"], root)


def test_seaweedfs_folds_odd_keys_and_downloads_stay_in_the_cache(tmp_path, s3_bucket, s3_env):
    client = s3_env.client()
    for key in ("p/../evil.txt", "p/./d.txt"):
        with pytest.raises(Exception, match="InvalidRequest"):
            client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="p//c.txt", Body=b"c")
    client.put_object(Bucket=s3_bucket, Key="p/sub/", Body=b"")
    assert sorted(_listing(client, s3_bucket)) == ["p/c.txt", "p/sub/"]
    d = local_dir(f"s3://{s3_bucket}/p", cache=tmp_path / "cache")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        sorted([f"cache/{d.name}/c.txt", f"cache/{d.name}/.complete"])
    assert Path(d, "c.txt").read_bytes() == b"c"
