"""Where a model is read from: a local directory or file, or an S3 prefix or object, behind one
protocol (mirrored on the write side by io.targets). The model reader (io.reader) asks a store
for its files, byte ranges and tensors; a store knows nothing of the safetensors layout beyond
a tensor's offset and size.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import Protocol

import torch

from esm_ray.errors import InputError
from esm_ray.io import s3 as s3io
from esm_ray.io.format import Header, TensorMeta
from esm_ray.io.model_files import check_link
from esm_ray.io.uri import Uri
from esm_ray.spec import S3Options

__all__ = ["LocalStore", "S3Store", "Store", "open_store"]

_SAMPLE = 64  # bytes hashed at the start, middle and end of each tensor for the fingerprint


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


class Store(Protocol):
    """What the model reader needs of the place a model is stored."""

    single: bool  # one file (or object), not a directory (or prefix)

    def where(self, rel: str) -> str:
        """File `rel` named for a message (path or s3:// URI)."""

    def files(self) -> dict[str, int]:
        """{relative name: bytes} of every file, hidden ones left out."""

    def read(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of file `rel`."""

    def read_all(self, rel: str) -> bytes:
        """The whole of file `rel`."""

    def tensor_bytes(self, rel: str, meta: TensorMeta, what: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The raw bytes of a tensor of file `rel`, into `out` (uint8) when given."""

    def sample(self, rel: str, header: Header) -> bytes:
        """A few bytes that change when file `rel` changes (for the fingerprint)."""

    def close(self) -> None:
        """Release open files and maps."""


class LocalStore:
    """Files of a local directory (or one file); tensors are read with pread into their buffer.

    pread, not a copy out of an mmap: the page cache is copied straight into the tensor, and no
    mapped input pages pile up in this process's resident set (an mmap keeps every page it has
    touched resident until it is closed, so a merge's RSS would grow with the bytes of all T+1
    inputs). The fingerprint's few sampled bytes still come from an mmap.
    """

    def __init__(self, root: Path, single: bool):
        self.root = root
        self.single = single
        self._maps: dict[str, mmap.mmap] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def where(self, rel: str) -> str:
        return str(self.root if self.single else self.root / rel)

    def files(self) -> dict[str, int]:
        if self.single:
            return {self.root.name: self.root.stat().st_size}
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                p = Path(dirpath, fn)
                rel = p.relative_to(self.root).as_posix()
                if not _hidden(rel) and p.is_file():
                    out[rel] = p.stat().st_size
        return out

    def _path(self, rel: str) -> Path:
        return self.root if self.single else self.root / rel

    def read(self, rel: str, start: int, end: int) -> bytes:
        try:
            with open(self._path(rel), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        except OSError as err:
            raise InputError(f"{self.where(rel)}: cannot read: {err.strerror or err}") from None

    def read_all(self, rel: str) -> bytes:
        if not self.single:
            check_link(self.root, rel)  # a link out of the model directory is never read
        try:
            return self._path(rel).read_bytes()
        except OSError as err:
            raise InputError(f"{self.where(rel)}: cannot read: {err.strerror or err}") from None

    def _map(self, rel: str) -> mmap.mmap:
        mm = self._maps.get(rel)
        if mm is None:
            with self._lock:
                mm = self._maps.get(rel)
                if mm is None:
                    with open(self._path(rel), "rb") as f:
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    self._maps[rel] = mm
        return mm

    def _fd(self, rel: str) -> int:
        fd = self._fds.get(rel)
        if fd is None:
            with self._lock:
                fd = self._fds.get(rel)
                if fd is None:
                    fd = self._fds[rel] = os.open(self._path(rel), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return fd

    def tensor_bytes(self, rel: str, meta: TensorMeta, what: str,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty(meta.nbytes, dtype=torch.uint8) if out is None else out
        if meta.nbytes:
            view = memoryview(out.numpy())
            got = 0
            try:
                fd = self._fd(rel)
                while got < meta.nbytes:  # pread is positional: safe from several threads at once
                    n = (os.preadv(fd, [view[got:]], meta.offset + got) if hasattr(os, "preadv")
                         else _pread_into(fd, view[got:], meta.offset + got))
                    if n <= 0:
                        size = os.fstat(fd).st_size
                        raise InputError(f"{self.where(rel)}: {what} ends at byte {meta.offset + meta.nbytes} "
                                         f"but the file now has {size} bytes (changed since it was opened?)")
                    got += n
            except OSError as err:
                raise InputError(f"{self.where(rel)}: cannot read {what}: {err.strerror or err}") from None
            finally:
                view.release()
        return out

    def sample(self, rel: str, header: Header) -> bytes:
        mm = self._map(rel)
        parts = []
        for meta in header.tensors.values():
            a, n = meta.offset, meta.nbytes
            if n <= 3 * _SAMPLE:
                parts.append(mm[a:a + n])
            else:
                mid = a + n // 2
                parts += [mm[a:a + _SAMPLE], mm[mid:mid + _SAMPLE], mm[a + n - _SAMPLE:a + n]]
        return b"".join(parts)

    def close(self) -> None:
        with self._lock:
            for mm in self._maps.values():
                try:
                    mm.close()
                except BufferError:  # a concurrent get still holds a view; GC closes it
                    pass
            self._maps.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """pread(2) into `view` where os.preadv is missing (one extra copy)."""
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


class S3Store:
    """Objects under an S3 prefix (or one object); tensors via one ranged GET each."""

    def __init__(self, uri: Uri, opts: S3Options | None, single: bool, client=None):
        self.uri = uri
        self.opts = opts or S3Options()
        self.client = client or s3io.make_client(self.opts)
        self.single = single
        self.prefix = uri.key if single else uri.dir_prefix
        self._objects: dict[str, s3io.S3Object] = {}

    def key(self, rel: str) -> str:
        return self.prefix if self.single else self.prefix + rel

    def where(self, rel: str) -> str:
        return s3io.s3_uri(self.uri.bucket, self.key(rel))

    def files(self) -> dict[str, int]:
        b = self.uri.bucket
        with s3io.s3_errors(str(self.uri)):
            if self.single:
                obj = s3io.head(self.client, b, self.prefix)
                if obj is None:
                    raise InputError(f"{self.uri}: model file not found (no such S3 object)")
                self._objects = {self.uri.name: obj}
            else:
                objs = s3io.list_objects(self.client, b, self.prefix)
                self._objects = {o.key[len(self.prefix):]: o for o in objs
                                 if not o.key.endswith("/") and not _hidden(o.key[len(self.prefix):])}
        return {rel: o.size for rel, o in self._objects.items()}

    def read(self, rel: str, start: int, end: int) -> bytes:
        with s3io.s3_errors(self.where(rel)):
            return s3io.get_range(self.client, self.uri.bucket, self.key(rel), start, end)

    def read_all(self, rel: str) -> bytes:
        with s3io.s3_errors(self.where(rel)):
            return s3io.get_object(self.client, self.uri.bucket, self.key(rel))

    def tensor_bytes(self, rel: str, meta: TensorMeta, what: str,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty(meta.nbytes, dtype=torch.uint8) if out is None else out
        if meta.nbytes:
            with s3io.s3_errors(self.where(rel), what=what):
                s3io.read_range_into(self.client, self.uri.bucket, self.key(rel), meta.offset,
                                     memoryview(out.numpy()), attempts=self.opts.max_attempts)
        return out

    def sample(self, rel: str, header: Header) -> bytes:
        # The ETag is derived from the content by the server: no extra request needed.
        return self._objects[rel].etag.encode() if rel in self._objects else b""

    def close(self) -> None:
        pass


def open_store(u: Uri, s3: S3Options | None) -> tuple[Store, dict[str, int]]:
    """The store holding model `u` (a directory or prefix, or one file or object) and its
    files {relative name: bytes}, hidden ones left out."""
    store: Store
    if u.is_s3:
        single = u.key.endswith(".safetensors")
        store = S3Store(u, s3, single)
        files = store.files()
        if not single and not files:
            with s3io.s3_errors(str(u)):
                size = s3io.head_size(store.client, u.bucket, u.key) if u.key else None
            if size is None:
                raise InputError(f"{u}: path does not exist (no objects under this prefix)")
            store = S3Store(u, s3, True, client=store.client)
            files = store.files()
        return store, files
    p = Path(u.path)
    if not p.exists():
        raise InputError(f"{u}: path does not exist")
    if p.is_dir():
        store = LocalStore(p, single=False)
    else:
        store = LocalStore(p, single=True)
    try:
        return store, store.files()
    except OSError as err:
        raise InputError(f"{u}: cannot list files: {err}") from None
