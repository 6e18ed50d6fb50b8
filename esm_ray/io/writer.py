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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from esm_ray.errors import OutputError
from esm_ray.io import s3 as s3io
from esm_ray.io import s3_commit as s3c
from esm_ray.io.format import CODES, encode_header, tensor_bytes
from esm_ray.io.guard import MARKER_KEY, check_replaceable, marker
from esm_ray.io.model_files import model_files
from esm_ray.io.staging import aside_path, make_staging, recover_leftovers, remove_tree
from esm_ray.io.uri import Uri, parse_uri
from esm_ray.spec import S3Options, parse_size

__all__ = ["ShardedWriter", "ShardInfo", "WriteStats", "check_writable", "is_committed",
           "save_safetensors_atomic", "INDEX_NAME", "shard_name", "pack_shards"]

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
_RESERVED = re.compile(r"^(model-([0-9a-f]{8}-)?\d+-of-\d+\.safetensors|model\.safetensors\.index\.json|"
                       r"\.partial-.*|\.esm-ray-probe-.*)$")


def shard_name(i: int, n: int) -> str:
    """The HF name of shard i (1-based) of n."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def pack_shards(sizes: Iterable[int], max_shard_bytes: int) -> list[int]:
    """Shard number (1-based) of each tensor, given their sizes in order: a shard is closed when
    the next tensor would overflow it or once it is full; a tensor larger than the limit gets a
    shard of its own. ShardedWriter packs exactly like this."""
    out, k, fill, count = [], 1, 0, 0
    for nb in sizes:
        if count and fill + nb > max_shard_bytes:
            k, fill, count = k + 1, 0, 0
        out.append(k)
        fill, count = fill + nb, count + 1
        if fill >= max_shard_bytes:
            k, fill, count = k + 1, 0, 0
    return out


@dataclass
class WriteStats:
    bytes_written: int = 0  # every byte written or uploaded: shards, files, index
    tensor_bytes: int = 0
    n_tensors: int = 0
    n_shards: int = 0
    n_files: int = 0
    seconds: float = 0.0  # from opening the writer to the end of commit
    io_seconds: float = 0.0  # time spent writing / uploading / publishing

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / self.io_seconds if self.io_seconds > 0 else 0.0


@dataclass(frozen=True)
class ShardInfo:
    """A shard that has been staged: its number (1-based), staged name, bytes and tensors."""

    index: int
    staged: str
    nbytes: int
    n_tensors: int
    parts: int = 0  # multipart parts (S3), 0 for a single PUT or a local file
    etag: str = ""


def _check_relpath(relpath: str, what: str) -> str:
    rel = str(relpath).replace("\\", "/").strip("/")
    parts = rel.split("/")
    if not rel or str(relpath).startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise OutputError(f"{what}: {relpath!r} is not a relative file path inside the output")
    return rel


def _serialize(tensors: Iterable[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None):
    """(header bytes, list of raw tensor byte views, data bytes) for one safetensors file."""
    items, views = [], []
    for name, t in tensors:
        v = tensor_bytes(t)
        items.append((name, t.dtype, tuple(t.shape), len(v)))
        views.append(v)
    header = encode_header(items, dict(metadata or {}))
    return header, views, sum(len(v) for v in views)


def _write_local(path: Path, header: bytes, views: list[memoryview], fsync: bool) -> int:
    with open(path, "wb") as f:
        f.write(header)
        for v in views:
            f.write(v)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return len(header) + sum(len(v) for v in views)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _os_errors(where: str) -> Iterator[None]:
    """OSError inside the block -> OutputError naming `where`."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"{where}: write failed: {err.strerror or err}") from None


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = torch.empty(0, dtype=dtype).element_size()
    for d in shape:
        n *= int(d)
    return n


class _OpenShard:
    """A local shard file being written tensor by tensor (streaming mode of ShardedWriter)."""

    def __init__(self, index: int, path: Path, f, fsync: bool, where: str) -> None:
        self.index, self.path, self._f, self._fsync, self._where = index, path, f, fsync, where
        self.nbytes = 0
        self.n_tensors = -1  # the header is the first write

    def write(self, data) -> None:
        with _os_errors(self._where):
            self._f.write(data)
        self.nbytes += len(data)
        self.n_tensors += 1

    def close(self) -> ShardInfo:
        with _os_errors(self._where):
            if self._fsync:
                self._f.flush()
                os.fsync(self._f.fileno())
            self._f.close()
        return ShardInfo(self.index, self.path.name, self.nbytes, self.n_tensors)

    def discard(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


def remove_stale_staging(final: Path) -> list[Path]:
    """Clean up what writers of `final` on this host left when they were killed: their staging
    directories, and old outputs their commit had moved aside (see io.staging)."""
    return recover_leftovers(final)


class _LocalTarget:
    def __init__(self, uri: Uri, overwrite: bool, fsync: bool):
        self.final = Path(uri.path)
        self.overwrite = overwrite
        self.fsync = fsync
        try:
            if self.final.parent.is_dir():
                recover_leftovers(self.final)
        except OSError as err:
            raise OutputError(f"{self.final}: cannot clean up earlier writes in {self.final.parent}: "
                              f"{err.strerror or err}") from None
        if self.final.exists() or self.final.is_symlink():
            if not overwrite:
                raise OutputError(f"{self.final}: output already exists; choose another path or pass overwrite")
            check_replaceable(self.final)
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = make_staging(self.final)
        except OSError as err:
            raise OutputError(f"{self.final}: cannot create the output's staging directory in "
                              f"{self.final.parent}: {err.strerror or err}") from None

    def _guard(self, what: str):
        return _os_errors(f"{self.final} ({what})")

    def put_shard(self, k: int, header: bytes, views: list[memoryview],
                  final: str | None) -> ShardInfo:
        p = self.tmp / (final or f"shard-{k:05d}.tmp")
        with self._guard(f"shard {k}"):
            n = _write_local(p, header, views, self.fsync)
        return ShardInfo(k, p.name, n, len(views))

    def open_shard(self, k: int, header: bytes, final: str) -> "_OpenShard":
        p = self.tmp / final
        with self._guard(f"shard {k}"):
            f = open(p, "wb")
        shard = _OpenShard(k, p, f, self.fsync, f"{self.final} (shard {k})")
        shard.write(header)
        return shard

    def put_file(self, rel: str, data) -> int:
        p = self.tmp / rel
        with self._guard(rel):
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        return len(memoryview(data).cast("B"))

    def put_tensors(self, rel: str, header: bytes, views: list[memoryview]) -> int:
        p = self.tmp / rel
        with self._guard(rel):
            p.parent.mkdir(parents=True, exist_ok=True)
            return _write_local(p, header, views, self.fsync)

    def publish(self, shards: list[ShardInfo], index: bytes) -> int:
        n = len(shards)
        with self._guard("commit"):
            for s in shards:
                if s.staged != shard_name(s.index, n):
                    os.rename(self.tmp / s.staged, self.tmp / shard_name(s.index, n))
            self.put_file(INDEX_NAME, index)  # last file of the output
            _fsync_dir(self.tmp)
            old = None
            if self.final.exists() or self.final.is_symlink():
                if not self.overwrite:
                    raise OutputError(f"{self.final}: output appeared while writing; not replacing "
                                      "it without overwrite")
                check_replaceable(self.final)  # again: something may have been put there meanwhile
                old = aside_path(self.final)  # owned by this process: a kill leaves it recoverable
                os.rename(self.final, old)
            try:
                os.rename(self.tmp, self.final)
            except OSError:
                if old is not None:
                    os.rename(old, self.final)
                raise
            _fsync_dir(self.final.parent)
            if old is not None:
                remove_tree(old)
        return len(index)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class _S3Target:
    """An S3 prefix receiving an output; the layout and commit are esm_ray.io.s3_commit's."""

    def __init__(self, uri: Uri, overwrite: bool, opts: S3Options | None, part_size: int,
                 copy_threshold: int, client=None):
        self.uri = uri
        self.overwrite = overwrite
        self.part_size = part_size
        self.copy_threshold = copy_threshold
        self.client = client or s3io.make_client(opts)
        self.bucket = uri.bucket
        self.prefix = uri.dir_prefix
        self.job = s3c.new_job()
        self.staging = s3c.staging_prefix(self.prefix, self.job)
        self.staged: dict[str, tuple[str, int]] = {}  # final relpath -> (staged key, size)
        self.created: list[str] = []  # keys outside the staging area this write created
        with s3io.s3_errors(str(uri), write=True):
            self.client.head_bucket(Bucket=self.bucket)
            state = s3c.inspect(self.client, self.bucket, self.prefix)
            s3c.check(state, str(uri), overwrite, self.bucket, self.prefix)
            s3c.clean_leftovers(self.client, self.bucket, self.prefix, state, str(uri))

    def shard_name(self, i: int, n: int) -> str:
        return s3c.shard_name(self.job, i, n)

    def _upload(self, key: str, chunks: Iterable, what: str) -> s3io.UploadResult:
        with s3io.s3_errors(str(self.uri), write=True, what=what):
            return s3io.upload_stream(self.client, self.bucket, key, chunks, self.part_size)

    def put_shard(self, k: int, header: bytes, views: list[memoryview],
                  final: str | None) -> ShardInfo:
        if final is not None:  # name known up front: upload to the final key, no copy later
            key = self.prefix + final
            self.created.append(key)
        else:
            key = f"{self.staging}shard-{k:05d}.safetensors"
        r = self._upload(key, [header, *views], f"shard {k}")
        return ShardInfo(k, key, r.size, len(views), r.parts, r.etag)

    def put_file(self, rel: str, data) -> int:
        key = f"{self.staging}files/{rel}"
        r = self._upload(key, [data], rel)
        self.staged[rel] = (key, r.size)
        return r.size

    def put_tensors(self, rel: str, header: bytes, views: list[memoryview]) -> int:
        key = f"{self.staging}files/{rel}"
        r = self._upload(key, [header, *views], rel)
        self.staged[rel] = (key, r.size)
        return r.size

    def publish(self, shards: list[ShardInfo], index: bytes) -> int:
        n = len(shards)
        moves = [(s.staged, self.shard_name(s.index, n), s.nbytes) for s in shards
                 if s.staged.startswith(self.staging)]
        direct = {s.staged[len(self.prefix):] for s in shards if not s.staged.startswith(self.staging)}
        moves += [(key, rel, size) for rel, (key, size) in self.staged.items()]
        with s3io.s3_errors(str(self.uri), write=True, what="commit"):
            s3c.publish(self.client, self.bucket, self.prefix, str(self.uri), overwrite=self.overwrite,
                        index=index, moves=moves, direct=direct, files=set(self.staged),
                        staging=self.staging, copy_threshold=self.copy_threshold, created=self.created)
        return len(index)

    def abort(self) -> None:
        try:
            s3io.abort_open_uploads(self.client, self.bucket, self.staging)
            keys = s3io.list_keys(self.client, self.bucket, self.staging) + self.created
            s3io.delete_keys(self.client, self.bucket, keys)
        except Exception as err:  # runs on error paths: never mask the original error
            log.warning("%s: abort could not clean up (%s); what is left is not part of an output "
                        "and the next write to this prefix removes it", self.uri, type(err).__name__)


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
        self._plan: list[tuple[str, int]] | None = None
        self._layout: list[tuple[torch.dtype, tuple[int, ...]]] | None = None
        self._open: _OpenShard | None = None
        if plan is not None:
            items = [tuple(p) for p in plan]
            if items and all(len(p) == 3 for p in items):
                self._layout = [(p[1], tuple(int(d) for d in p[2])) for p in items]
                items = [(p[0], _nbytes(p[1], p[2])) for p in items]
            self._plan = [(str(n), int(b)) for n, b in items]
            self._plan_shard = pack_shards([b for _, b in self._plan], self.max_shard_bytes)
            self._plan_n = self._plan_shard[-1] if self._plan else 0
        # With a plan, shards go straight to their final names (on S3 versioned by the job, so
        # an output being overwritten stays whole until the index switches).
        self._direct = self._plan is not None
        if self.uri.is_s3:
            self._target = _S3Target(self.uri, overwrite, s3, part_size, copy_threshold)
        else:
            self._target = _LocalTarget(self.uri, overwrite, fsync)
        self._stream = self._layout is not None and isinstance(self._target, _LocalTarget)

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
        if self._plan is not None:
            if i >= len(self._plan) or self._plan[i] != (name, nbytes):
                want = (f"'{self._plan[i][0]}' ({self._plan[i][1]} bytes)" if i < len(self._plan)
                        else "nothing more")
                raise OutputError(f"{self.uri}: tensor '{name}' ({nbytes} bytes) does not follow the "
                                  f"plan; expected {want} next")
        return i

    def _write_through(self, i: int, name: str, t: torch.Tensor) -> None:
        """Streaming mode: write tensor i of the plan into its shard file now."""
        assert self._plan is not None and self._layout is not None
        dtype, shape = self._layout[i]
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
        assert self._plan is not None and self._layout is not None
        k = self._plan_shard[i]
        if self._open is None or self._open.index != k:
            self._close_open()
            j = i
            while j < len(self._plan) and self._plan_shard[j] == k:
                j += 1
            header = encode_header([(self._plan[m][0], *self._layout[m], self._plan[m][1]) for m in range(i, j)],
                                   self.metadata)
            self._open = self._target.open_shard(k, header, shard_name(k, self._plan_n))
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
        i = self._next(name, dtype, _nbytes(dtype, shape))
        if self._layout[i] != (dtype, shape):
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
        final = self._shard_name(k, self._plan_n) if self._direct else None
        t0 = time.perf_counter()
        header, views, data = _serialize(self._pending, self.metadata)
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
            header, views, _ = _serialize(tensors.items(), metadata)
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
            if self.uri.is_s3:
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
        return self._target.shard_name(i, n) if self.uri.is_s3 else shard_name(i, n)

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.commit()


def is_committed(uri: str, s3: S3Options | None = None) -> bool:
    """Whether `uri` holds a finished output (its index exists). Partial writes never do."""
    try:
        u = parse_uri(uri)
    except ValueError as err:
        raise OutputError(str(err)) from None
    if u.is_s3:
        with s3io.s3_errors(str(u)):
            return s3io.head(s3io.make_client(s3), u.bucket, u.dir_prefix + INDEX_NAME) is not None
    return Path(u.path, INDEX_NAME).is_file()


def check_writable(uri: str, overwrite: bool = False, s3: S3Options | None = None) -> None:
    """Dry-run check that `uri` can receive an output; raises OutputError naming it."""
    try:
        u = parse_uri(uri)
    except ValueError as err:
        raise OutputError(str(err)) from None
    if u.is_s3:
        with s3io.s3_errors(str(u), write=True):
            s3c.check_writable(s3io.make_client(s3), u.bucket, u.dir_prefix, str(u), overwrite)
        return
    p = Path(u.path)
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise OutputError(f"{p}: output already exists; choose another path or pass overwrite")
        check_replaceable(p)
    anc = p.parent
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{p}: cannot create the output: {anc} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".esm-ray-probe-", dir=anc)
        os.rmdir(probe)
    except OSError as err:
        raise OutputError(f"{p}: cannot write in {anc}: {err.strerror or err}") from None


def save_safetensors_atomic(path_or_uri: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None,
                            s3: S3Options | None = None) -> int:
    """Write one small safetensors file atomically (temp name, then rename; an S3 PUT is atomic).
    Returns the bytes written."""
    try:
        u = parse_uri(path_or_uri)
    except ValueError as err:
        raise OutputError(str(err)) from None
    try:
        header, views, _ = _serialize(tensors.items(), metadata)
    except ValueError as err:
        raise OutputError(f"{u}: {err}") from None
    if u.is_s3:
        client = s3io.make_client(s3)
        with s3io.s3_errors(str(u), write=True):
            return s3io.upload_stream(client, u.bucket, u.key, [header, *views]).size
    p = Path(u.path)
    tmp = p.parent / f".{p.name}.tmp-{secrets.token_hex(4)}"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        n = _write_local(tmp, header, views, fsync=True)
        os.replace(tmp, p)
        return n
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{p}: write failed: {err.strerror or err}") from None
