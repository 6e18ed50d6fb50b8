"""Sharded safetensors writer with an atomic commit, local or S3.

Tensors are buffered until the next one would push the shard past `max_shard_bytes`; then the
shard is written (only one shard is ever held). Shard names model-0000i-of-0000N.safetensors
depend on N, known only at commit, so shards are staged under temporary names:

- local: everything goes into a sibling `.<name>.partial-<owner>-<random>` directory, renamed
  onto the final path at commit (an existing output, with overwrite=True, is moved aside to
  `.<name>.old-<owner>-<random>` and removed only after that rename succeeded; io.staging
  cleans up after a writer killed at any point, io.guard says which existing folder may be
  replaced: only an esm-ray output, marked in its index);
- S3 (esm_ray/io/s3_commit.py): shards are named after the write's job token
  (model-<job>-0000i-of-0000N.safetensors), so they never replace the old output's; other files
  are staged under `<prefix>/.partial-<job>/`. Commit copies the staged objects to their keys and
  writes model.safetensors.index.json last: that one PUT switches from the old output to the new,
  and the old output's shards are deleted only after it. A prefix without the index never counts
  as a finished output. When the tensors' names and sizes are known up front (`plan=`), shards go
  straight to their final keys (no copy).

Leaving the `with` block by an exception aborts: staged files and uploads are removed.

The parts: io.shards (the packing rule and a planned write's layout, computed once), io.targets
(the local and S3 targets behind one protocol), io.preflight (`check_writable`, `is_committed`),
io.atomic (`save_safetensors_atomic`); their public names are importable from here too.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from esm_ray.errors import OutputError
from esm_ray.io import s3 as s3io
from esm_ray.io.atomic import save_safetensors_atomic
from esm_ray.io.format import CODES, INDEX_NAME, encode_header, serialize, tensor_bytes
from esm_ray.io.guard import MARKER_KEY, marker
from esm_ray.io.model_files import model_files
from esm_ray.io.preflight import check_writable, is_committed
from esm_ray.io.shards import ShardInfo, ShardLayout, nbytes_of, pack_shards, shard_name
from esm_ray.io.targets import OpenShard, open_target
from esm_ray.io.uri import parse_uri
from esm_ray.spec import S3Options, parse_size

__all__ = ["ShardedWriter", "ShardInfo", "WriteStats", "check_writable", "is_committed",
           "save_safetensors_atomic", "INDEX_NAME", "shard_name", "pack_shards"]

_RESERVED = re.compile(r"^(model-([0-9a-f]{8}-)?\d+-of-\d+\.safetensors|model\.safetensors\.index\.json|"
                       r"\.partial-.*|\.esm-ray-probe-.*)$")


@dataclass
class WriteStats:
    bytes_written: int = 0  # every byte written or uploaded: shards, files, index
    tensor_bytes: int = 0
    n_tensors: int = 0
    n_shards: int = 0
    n_files: int = 0
    seconds: float = 0.0  # from opening the writer to the end of commit
    io_seconds: float = 0.0  # time spent writing / uploading / publishing


def _check_relpath(relpath: str, what: str) -> str:
    rel = str(relpath).replace("\\", "/").strip("/")
    parts = rel.split("/")
    if not rel or str(relpath).startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise OutputError(f"{what}: {relpath!r} is not a relative file path inside the output")
    return rel


class ShardedWriter:
    """Write a model as HF-style safetensors shards plus model.safetensors.index.json.

    Use as a context manager; a clean exit commits (if commit() was not called), an exception
    aborts. `add` keeps a reference to each tensor until its shard is written: do not modify a
    tensor in place after adding it. overwrite=True replaces, at commit, only an esm-ray output:
    locally a directory holding nothing but what esm-ray wrote (io.guard), on S3 the output under
    the prefix (its index, shards and files; nothing else there, and a prefix holding other
    objects but no esm-ray output is refused).

    Options: `metadata` goes into every shard's __metadata__; `part_size` is the S3 multipart
    part size (>= 5 MiB; shards up to one part are a single PUT); `fsync` local files before the
    rename; `on_shard(ShardInfo)` is called after each shard is staged (progress, tests);
    `copy_threshold`: staged S3 objects larger than this are copied with UploadPartCopy.

    `plan`: the (name, nbytes) of every tensor in the order they will be added, when known up
    front (e.g. from the base model). Shard names are then fixed from the start: on S3 shards go
    straight to their final keys (no server-side copy at commit; named after the write's job,
    they leave an output being overwritten whole); `add` refuses tensors that deviate from the
    plan. Items may also
    be (name, dtype, shape): every shard's header is then known before its first tensor, and a
    local writer streams each tensor into its shard file as it is added instead of holding the
    shard in memory (the files are byte for byte the same).
    """

    def __init__(self, uri: str, max_shard_bytes: int | str, overwrite: bool = False,
                 s3: S3Options | None = None, *, metadata: Mapping[str, str] | None = None,
                 part_size: int = s3io.DEFAULT_PART_SIZE, fsync: bool = True,
                 on_shard: Callable[[ShardInfo], None] | None = None,
                 copy_threshold: int = s3io.MAX_COPY_SIZE,
                 plan: Iterable[tuple[str, int]] | None = None):
        self._t0 = time.perf_counter()
        try:
            self.uri = parse_uri(uri)
        except ValueError as err:
            raise OutputError(str(err)) from None
        self.max_shard_bytes = parse_size(max_shard_bytes)
        if self.max_shard_bytes < 1:
            raise ValueError("max_shard_bytes must be positive")
        if part_size < s3io.MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {s3io.MIN_PART_SIZE} bytes (S3 rule)")
        self.metadata = dict(metadata or {})
        encode_header([], self.metadata)  # ValueError now rather than at the first shard
        self.on_shard = on_shard
        self.stats = WriteStats()
        self.shards: list[ShardInfo] = []
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._pending_bytes = 0
        self._weight_map: dict[str, int] = {}  # tensor name -> shard number
        self._names: set[str] = set()
        self._files: set[str] = set()
        self._state = "open"
        self._open: OpenShard | None = None
        # With a plan, shards go straight to their final names (on S3 versioned by the job, so
        # an output being overwritten stays whole until the index switches).
        self._plan = ShardLayout(plan, self.max_shard_bytes) if plan is not None else None
        self._target = open_target(self.uri, overwrite, s3, part_size=part_size,
                                   copy_threshold=copy_threshold, fsync=fsync)
        self._stream = self._plan is not None and self._plan.dtypes_known and self._target.streams

    # building the output
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a tensor; writes the current shard first if this one would overflow it."""
        nbytes = tensor.numel() * tensor.element_size()
        i = self._next(name, tensor.dtype, nbytes)
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if self._stream:
            self._write_through(i, name, t)
            return
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending.append((name, t))
        self._names.add(name)
        self._pending_bytes += nbytes
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _next(self, name: str, dtype: torch.dtype, nbytes: int) -> int:
        """Check that tensor `name` may be added next; its position in the output."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise OutputError(f"{self.uri}: tensor names must be non-empty strings, got {name!r}")
        if name in self._names:
            raise OutputError(f"{self.uri}: tensor '{name}' was already added")
        if dtype not in CODES:
            raise OutputError(f"{self.uri}: tensor '{name}' has dtype {dtype}, which safetensors cannot store")
        i = len(self._names)
        if self._plan is not None and not self._plan.follows(i, name, nbytes):
            raise OutputError(f"{self.uri}: tensor '{name}' ({nbytes} bytes) does not follow the "
                              f"plan; expected {self._plan.expected(i)} next")
        return i

    def _write_through(self, i: int, name: str, t: torch.Tensor) -> None:
        """Streaming mode: write tensor i of the plan into its shard file now."""
        assert self._plan is not None and self._plan.layout is not None
        dtype, shape = self._plan.layout[i]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise OutputError(f"{self.uri}: tensor '{name}' ({str(t.dtype).removeprefix('torch.')} "
                              f"{tuple(t.shape)}) does not follow the plan: expected "
                              f"{str(dtype).removeprefix('torch.')} {shape}")
        t0 = time.perf_counter()
        k = self._shard_of(i)
        v = tensor_bytes(t)
        self._open.write(v)
        self.stats.io_seconds += time.perf_counter() - t0
        self._written(name, k, len(v))

    def _shard_of(self, i: int) -> int:
        """Streaming mode: the shard of plan item i, opened (header written) if it is not yet."""
        assert self._plan is not None
        k = self._plan.shard[i]
        if self._open is None or self._open.index != k:
            self._close_open()
            header = self._plan.header(i, self.metadata)
            self._open = self._target.open_shard(k, header, shard_name(k, self._plan.n_shards))
        return k

    def _written(self, name: str, k: int, nbytes: int) -> None:
        self.stats.tensor_bytes += nbytes
        self.stats.n_tensors += 1
        self._names.add(name)
        self._weight_map[name] = k

    def add_blocks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                   blocks: Iterable[torch.Tensor]) -> None:
        """Add one tensor given as consecutive row blocks (dim 0), e.g. merged a block at a time.

        A streaming local writer writes each block into the shard as it comes, so the whole
        tensor is never in memory; otherwise the blocks are joined and added as one tensor. The
        blocks must have `dtype` and together exactly `shape`; the file is byte for byte what
        `add` of the whole tensor writes.
        """
        self._check_open()
        shape = tuple(int(d) for d in shape)
        if not self._stream:
            self.add(name, torch.cat([b.detach().cpu() for b in blocks]).reshape(shape))
            return
        i = self._next(name, dtype, nbytes_of(dtype, shape))
        assert self._plan is not None and self._plan.layout is not None
        if self._plan.layout[i] != (dtype, shape):
            raise OutputError(f"{self.uri}: tensor '{name}' ({str(dtype).removeprefix('torch.')} {shape}) "
                              "does not follow the plan")
        k = self._shard_of(i)
        rows, done = 0, 0
        for b in blocks:
            if b.dtype != dtype or tuple(b.shape[1:]) != shape[1:] or rows + b.shape[0] > shape[0]:
                raise OutputError(f"{self.uri}: tensor '{name}': block {tuple(b.shape)} {b.dtype} after "
                                  f"{rows} rows does not fit {str(dtype).removeprefix('torch.')} {shape}")
            t0 = time.perf_counter()
            v = tensor_bytes(b.detach().cpu())
            self._open.write(v)
            self.stats.io_seconds += time.perf_counter() - t0
            rows += b.shape[0]
            done += len(v)
        if rows != shape[0]:
            raise OutputError(f"{self.uri}: tensor '{name}': blocks cover {rows} of {shape[0]} rows")
        self._written(name, k, done)

    def _close_open(self) -> None:
        if self._open is None:
            return
        t0 = time.perf_counter()
        info = self._open.close()
        self._open = None
        self.stats.io_seconds += time.perf_counter() - t0
        self.stats.bytes_written += info.nbytes
        self.shards.append(info)
        if self.on_shard is not None:
            self.on_shard(info)

    def _flush(self) -> None:
        if self._stream:
            self._close_open()
        if not self._pending:
            return
        k = len(self.shards) + 1
        final = self._shard_name(k, self._plan.n_shards) if self._plan is not None else None
        t0 = time.perf_counter()
        header, views, data = serialize(self._pending, self.metadata)
        info = self._target.put_shard(k, header, views, final)
        del views
        self.stats.io_seconds += time.perf_counter() - t0
        self.stats.bytes_written += info.nbytes
        self.stats.tensor_bytes += data
        self.stats.n_tensors += len(self._pending)
        for name, _ in self._pending:
            self._weight_map[name] = k
        self._pending, self._pending_bytes = [], 0
        self.shards.append(info)
        if self.on_shard is not None:
            self.on_shard(info)

    def write_file(self, relpath: str, data: bytes | bytearray | memoryview | str) -> None:
        """Add a non-weight file (config.json, tokenizer files, reports, experts/x.safetensors).
        Writing the same path again replaces it."""
        self._check_open()
        rel = self._check_file(relpath)
        if isinstance(data, str):
            data = data.encode("utf-8")
        t0 = time.perf_counter()
        n = self._target.put_file(rel, data)
        self._account_file(rel, n, t0)

    def write_tensors(self, relpath: str, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
        """Add a standalone safetensors file (not part of the index), e.g. experts/e0.safetensors."""
        self._check_open()
        rel = self._check_file(relpath)
        try:
            header, views, _ = serialize(tensors.items(), metadata)
        except ValueError as err:
            raise OutputError(f"{self.uri}: {rel}: {err}") from None
        t0 = time.perf_counter()
        n = self._target.put_tensors(rel, header, views)
        self._account_file(rel, n, t0)

    def copy_aux_from(self, reader, skip: Iterable[str] = ()) -> list[str]:
        """Copy the files a model directory needs (io.model_files: config, tokenizer, ...) from a
        ModelReader, except `skip`; never subfolders or other files."""
        skip = set(skip)
        done = []
        for name in model_files(reader.aux_names()):
            if name not in skip:
                self.write_file(name, reader.read_aux(name))
                done.append(name)
        return done

    def _check_file(self, relpath: str) -> str:
        rel = _check_relpath(relpath, str(self.uri))
        if _RESERVED.match(rel):
            raise OutputError(f"{self.uri}: '{rel}' is reserved for the writer's shards and index")
        return rel

    def _account_file(self, rel: str, n: int, t0: float) -> None:
        self.stats.io_seconds += time.perf_counter() - t0
        self.stats.bytes_written += n
        if rel not in self._files:
            self._files.add(rel)
            self.stats.n_files += 1

    # finishing
    def commit(self, extra_metadata: Mapping[str, object] | None = None) -> WriteStats:
        """Write the last shard, name the shards, write the index last and publish the output."""
        self._check_open()
        try:
            self._flush()
            if self._plan is not None and len(self._names) != len(self._plan):
                raise OutputError(f"{self.uri}: the plan lists {len(self._plan)} tensors but "
                                  f"{len(self._names)} were added")
            n = len(self.shards)
            names = {s.index: self._shard_name(s.index, n) for s in self.shards}
            record = marker([*names.values(), *self._files])  # the marker of an esm-ray output (io.guard)
            if self._target.job is not None:
                record["job"] = self._target.job
            index = {"metadata": {**dict(extra_metadata or {}), "total_size": self.stats.tensor_bytes,
                                  MARKER_KEY: record},
                     "weight_map": {name: names[k] for name, k in self._weight_map.items()}}
            body = (json.dumps(index, indent=2) + "\n").encode("utf-8")
            t0 = time.perf_counter()
            self.stats.bytes_written += self._target.publish(self.shards, body)
            self.stats.io_seconds += time.perf_counter() - t0
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self.stats.n_shards = n
        self.stats.seconds = time.perf_counter() - self._t0
        return self.stats

    def abort(self) -> None:
        """Drop everything staged so far. Safe to call more than once; never raises."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._pending, self._pending_bytes = [], 0
        if self._open is not None:
            self._open.discard()
            self._open = None
        self._target.abort()

    def _check_open(self) -> None:
        if self._state != "open":
            raise OutputError(f"{self.uri}: writer is already {self._state}")

    @property
    def shard_names(self) -> list[str]:
        """Final shard names (known once committed)."""
        n = len(self.shards)
        return [self._shard_name(s.index, n) for s in self.shards]

    def _shard_name(self, i: int, n: int) -> str:
        """The final name of shard i of n: HF's, or on S3 the job-versioned one."""
        return self._target.shard_name(i, n)

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.commit()
