"""Where an output is written: a local directory or an S3 prefix, behind one protocol.

The writer (io.writer) decides what goes into which shard; a target stages shards and files and
publishes them at commit, atomically for readers. Local staging hygiene is io.staging's, the
overwrite guard io.guard's, the S3 layout and commit io.s3_commit's. These mirror the reader's
stores (io.reader).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch

from esm_ray.errors import OutputError
from esm_ray.io import s3 as s3io
from esm_ray.io import s3_commit as s3c
from esm_ray.io.format import INDEX_NAME, serialize
from esm_ray.io.guard import check_replaceable
from esm_ray.io.s3_upload import UploadResult, upload_stream
from esm_ray.io.shards import ShardInfo, shard_name
from esm_ray.io.staging import aside_path, make_staging, recover_leftovers, remove_tree
from esm_ray.io.uri import Uri
from esm_ray.spec import S3Options

__all__ = ["LocalTarget", "OpenShard", "S3Target", "Target", "fsync_dir", "open_target", "os_errors",
           "write_local"]

log = logging.getLogger("esm_ray.io.writer")


class Target(Protocol):
    """What the writer needs of a place receiving an output."""

    streams: bool  # whether `open_shard` is offered (shards written tensor by tensor)

    @property
    def job(self) -> str | None:
        """The write's job token (S3), recorded in the index; None locally."""

    def shard_name(self, i: int, n: int) -> str:
        """The final name of shard i (1-based) of n."""

    def put_shard(self, k: int, header: bytes, views: list[memoryview], final: str | None) -> ShardInfo:
        """Stage shard k whole (under its final name when known); its ShardInfo."""

    def open_shard(self, k: int, header: bytes, final: str) -> OpenShard:
        """Open shard k under its final name for writing tensor by tensor (only if `streams`)."""

    def put_file(self, rel: str, data) -> int:
        """Stage a non-weight file; bytes written."""

    def put_tensors(self, rel: str, header: bytes, views: list[memoryview]) -> int:
        """Stage a standalone safetensors file; bytes written."""

    def publish(self, shards: list[ShardInfo], index: bytes) -> int:
        """Name the shards, write the index last and make the output visible; bytes written."""

    def abort(self) -> None:
        """Remove everything staged. Never raises."""


def open_target(uri: Uri, overwrite: bool, s3: S3Options | None, *, part_size: int, copy_threshold: int,
                fsync: bool) -> Target:
    """The target for `uri`: checks that it may receive an output (refusing an existing one
    without overwrite) and cleans up what killed writes left there."""
    if uri.is_s3:
        return S3Target(uri, overwrite, s3, part_size, copy_threshold)
    return LocalTarget(uri, overwrite, fsync)


def write_local(path: Path, header: bytes, views: list[memoryview], fsync: bool) -> int:
    with open(path, "wb") as f:
        f.write(header)
        for v in views:
            f.write(v)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return len(header) + sum(len(v) for v in views)


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """One local safetensors file of `tensors` in order (io.format), not atomic and not synced:
    a scratch file (statistics parts, spilled updates). A failed write (a full disk) raises an
    OSError whose message names the file."""
    header, views, _ = serialize(tensors.items(), metadata)
    try:
        return write_local(path, header, views, fsync=False)
    except OSError as err:
        raise OSError(err.errno, f"{path}: {err.strerror or err}") from None


def fsync_dir(path: Path) -> None:
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
def os_errors(where: str) -> Iterator[None]:
    """OSError inside the block -> OutputError naming `where`."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"{where}: write failed: {err.strerror or err}") from None


# A shard being written is synced in the background every SYNC_EVERY bytes, so that the kernel
# writes it out while the merge computes and the final fsync at close only waits for the tail
# (for a 2 GB shard it otherwise takes about a second, all at the end).
SYNC_EVERY = 256 << 20


class _BackgroundSync:
    """fdatasync of one file on a helper thread, one call at a time; `wait` joins it and raises
    the OSError it met (a later fsync need not report a writeback error again)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def _run(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as err:
            self._error = self._error or err

    def start(self) -> None:
        """Start a sync unless one is still running."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="esm-ray-sync", daemon=True)
            self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error


class OpenShard:
    """A local shard file being written tensor by tensor (streaming mode of ShardedWriter)."""

    def __init__(self, index: int, path: Path, f, fsync: bool, where: str) -> None:
        self.index, self.path, self._f, self._fsync, self._where = index, path, f, fsync, where
        self.nbytes = 0
        self.n_tensors = -1  # the header is the first write
        self._sync = _BackgroundSync(f.fileno()) if fsync else None
        self._synced_at = 0

    def write(self, data) -> None:
        with os_errors(self._where):
            self._f.write(data)
        self.nbytes += len(data)
        self.n_tensors += 1
        if self._sync is not None and self.nbytes - self._synced_at >= SYNC_EVERY:
            self._synced_at = self.nbytes
            self._f.flush()  # what the buffer holds reaches the kernel first
            self._sync.start()

    def close(self) -> ShardInfo:
        with os_errors(self._where):
            if self._sync is not None:
                self._f.flush()
                self._sync.wait()
                os.fsync(self._f.fileno())
            self._f.close()
        return ShardInfo(self.index, self.path.name, self.nbytes, self.n_tensors)

    def discard(self) -> None:
        try:
            if self._sync is not None:
                self._sync.wait()
        except OSError:
            pass
        try:
            self._f.close()
        except OSError:
            pass


class LocalTarget:
    """A local directory receiving an output: staged in a hidden sibling directory (io.staging),
    renamed onto the final path at commit; an existing output is replaced only if io.guard allows.
    Shard files can be written tensor by tensor (`open_shard`)."""

    streams = True
    job: str | None = None

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

    def shard_name(self, i: int, n: int) -> str:
        return shard_name(i, n)

    def _guard(self, what: str):
        return os_errors(f"{self.final} ({what})")

    def put_shard(self, k: int, header: bytes, views: list[memoryview],
                  final: str | None) -> ShardInfo:
        p = self.tmp / (final or f"shard-{k:05d}.tmp")
        with self._guard(f"shard {k}"):
            n = write_local(p, header, views, self.fsync)
        return ShardInfo(k, p.name, n, len(views))

    def open_shard(self, k: int, header: bytes, final: str) -> OpenShard:
        p = self.tmp / final
        with self._guard(f"shard {k}"):
            f = open(p, "wb")
        shard = OpenShard(k, p, f, self.fsync, f"{self.final} (shard {k})")
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
            return write_local(p, header, views, self.fsync)

    def publish(self, shards: list[ShardInfo], index: bytes) -> int:
        n = len(shards)
        with self._guard("commit"):
            for s in shards:
                if s.staged != shard_name(s.index, n):
                    os.rename(self.tmp / s.staged, self.tmp / shard_name(s.index, n))
            self.put_file(INDEX_NAME, index)  # last file of the output
            fsync_dir(self.tmp)
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
            fsync_dir(self.final.parent)
            if old is not None:
                remove_tree(old)
        return len(index)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class S3Target:
    """An S3 prefix receiving an output; the layout and commit are esm_ray.io.s3_commit's."""

    streams = False

    def open_shard(self, k: int, header: bytes, final: str) -> OpenShard:
        raise NotImplementedError("an S3 target takes whole shards (put_shard)")

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

    def _upload(self, key: str, chunks: Iterable, what: str) -> UploadResult:
        with s3io.s3_errors(str(self.uri), write=True, what=what):
            return upload_stream(self.client, self.bucket, key, chunks, self.part_size)

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
