"""Lazy safetensors reader: one tensor at a time from a local directory / file (mmap) or from
an S3 prefix / object (one ranged GET per tensor), never the whole model.

Layouts: a directory with model.safetensors; a directory with shards and
model.safetensors.index.json (which names them); a single .safetensors file. Shards without the
index are an unfinished write (the index is written last) and are refused. Every header is read
and checked when the model is opened, so a bad input fails up front with the file and tensor
named. Where the bytes come from (local files or S3 objects) is io.stores'.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from esm_ray.errors import InputError
from esm_ray.io.format import (INDEX_NAME, SINGLE_NAME, Header, TensorMeta, header_length, json_problem,
                               parse_header)
from esm_ray.io.stores import Store, open_store
from esm_ray.io.uri import parse_uri
from esm_ray.spec import S3Options

__all__ = ["ModelReader", "TensorMeta", "open_model", "check_finite"]

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")
# Whole-model weights in other formats and trainer state: never copied as auxiliary files.
_FOREIGN = re.compile(
    r"^(pytorch_model.*\.bin|pytorch_model\.bin\.index\.json|tf_model.*\.h5|tf_model\.h5\.index\.json|"
    r"flax_model.*\.msgpack|flax_model\.msgpack\.index\.json|.*\.safetensors\.index\.json|"
    r"model-([0-9a-f]{8}-)?\d+-of-\d+\.safetensors|training_args\.bin|optimizer\.pt|scheduler\.pt|rng_state.*\.pth)$")
# Top-level folders of training runs and exports that hold stale copies of the weights.
_SKIP_DIRS = re.compile(r"^(checkpoint-\d+|runs|onnx|openvino)$")
_PREFETCH = 64 * 1024  # header bytes fetched with the length, to save a round trip on S3


def _foreign(rel: str) -> bool:
    top, _, rest = rel.partition("/")
    return bool(_SKIP_DIRS.match(top)) if rest else bool(_FOREIGN.match(rel))


def _row_meta(name: str, meta: TensorMeta, rows: tuple[int, int]) -> TensorMeta:
    """The TensorMeta of rows [start, stop) of a row-major tensor."""
    start, stop = (int(r) for r in rows)
    if not meta.shape or not 0 <= start <= stop <= meta.shape[0]:
        raise ValueError(f"tensor '{name}': rows {start}:{stop} outside its shape {meta.shape}")
    row = meta.nbytes // meta.shape[0] if meta.shape[0] else 0
    return dataclasses.replace(meta, shape=(stop - start, *meta.shape[1:]), nbytes=(stop - start) * row,
                               offset=meta.offset + start * row)


class ModelReader:
    """A model opened for lazy, per-tensor reads. Thread-safe for concurrent `get` calls."""

    def __init__(self, uri: str, store: Store, files: dict[str, int], weight_files: list[str],
                 index_file: str | None, headers: dict[str, Header], tensors: dict[str, TensorMeta],
                 s3: S3Options | None):
        self.uri = uri
        self._store = store
        self._files = files
        self.weight_files = weight_files
        self.index_file = index_file
        self._headers = headers
        self._tensors = tensors
        self._s3 = s3
        self._config: dict | None = None
        self._config_read = False
        self._fingerprint: str | None = None
        skip = set(weight_files) | ({index_file} if index_file else set())
        self._aux = [] if store.single else [rel for rel in files if rel not in skip and not _foreign(rel)]

    # tensors
    def keys(self) -> list[str]:
        """Tensor names in file order (shard by shard, by data offset within a shard)."""
        return list(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def _meta(self, name: str) -> TensorMeta:
        meta = self._tensors.get(name)
        if meta is None:
            close = difflib.get_close_matches(name, self._tensors, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise InputError(f"{self.uri}: tensor '{name}' not found among {len(self._tensors)} "
                             f"tensors{hint}")
        return meta

    def info(self, name: str) -> TensorMeta:
        return self._meta(name)

    def get(self, name: str, out: torch.Tensor | None = None,
            rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor in its stored dtype, as a fresh writable CPU tensor (one copy out of the
        page cache or the HTTP body). `out`: a contiguous CPU tensor of the same dtype and shape
        to fill instead, e.g. a buffer reused across calls. `rows=(start, stop)`: only those
        rows (along dim 0), read straight from their bytes, shape (stop - start, *shape[1:])."""
        meta = self._meta(name)
        if rows is not None:
            meta = _row_meta(name, meta, rows)
        raw = None
        if out is not None:
            if out.dtype != meta.dtype or tuple(out.shape) != meta.shape or out.device.type != "cpu" \
                    or not out.is_contiguous():
                raise ValueError(f"tensor '{name}': out must be a contiguous CPU {meta.dtype} tensor of "
                                 f"shape {meta.shape}, got {out.dtype} {tuple(out.shape)} on {out.device}")
            raw = out.reshape(-1).view(torch.uint8) if out.numel() else torch.empty(0, dtype=torch.uint8)
        raw = self._store.tensor_bytes(meta.file, meta, f"tensor '{name}'", raw)
        return out if out is not None else raw.view(meta.dtype).reshape(meta.shape)

    @property
    def total_bytes(self) -> int:
        """Sum of the tensors' sizes in bytes (the index's total_size)."""
        return sum(m.nbytes for m in self._tensors.values())

    @property
    def metadata(self) -> dict[str, str]:
        """The __metadata__ map of the first weight file."""
        return dict(self._headers[self.weight_files[0]].metadata) if self.weight_files else {}

    # everything else in the directory
    @property
    def config(self) -> dict | None:
        """config.json parsed, or None when the model has none."""
        if not self._config_read:
            if "config.json" in self._aux:
                where = self._store.where("config.json")
                try:
                    cfg = json.loads(self._store.read_all("config.json").decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
                    raise InputError(f"{where}: invalid JSON ({json_problem(err)})") from None
                if not isinstance(cfg, dict):
                    raise InputError(f"{where}: expected a JSON object")
                self._config = cfg
            self._config_read = True
        return self._config

    def aux_names(self) -> list[str]:
        """Relative names of every non-weight file (config, tokenizer, heads, subfolders)."""
        return list(self._aux)

    def read_aux(self, name: str) -> bytes:
        self._check_aux(name)
        return self._store.read_all(name)

    def aux_files(self) -> Mapping[str, bytes]:
        """The auxiliary files as a mapping that reads each file when it is accessed."""
        return _AuxFiles(self)

    def _check_aux(self, name: str) -> None:
        if name not in self._aux:
            have = ", ".join(self._aux) or "none"
            raise InputError(f"{self.uri}: no auxiliary file '{name}' (have: {have})")

    def fingerprint(self) -> str:
        """sha256 over file names and sizes, every weight header, and a content sample (local:
        bytes at the start, middle and end of each tensor; S3: the objects' ETags). Cheap and
        stable while the files are unchanged; not a full content hash."""
        if self._fingerprint is None:
            h = hashlib.sha256(b"esm-ray-model-v1\0")
            for rel, size in sorted(self._files.items()):
                h.update(f"{rel}\0{size}\0".encode())
            for rel in self.weight_files:
                h.update(self._headers[rel].raw)
                h.update(self._store.sample(rel, self._headers[rel]))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        return (open_model, (self.uri, self._s3))

    def __repr__(self) -> str:
        return f"ModelReader({self.uri!r}, {len(self._tensors)} tensors, {len(self.weight_files)} files)"


class _AuxFiles(Mapping):
    def __init__(self, reader: ModelReader):
        self._r = reader

    def __getitem__(self, name: str) -> bytes:
        if name not in self._r._aux:
            raise KeyError(name)
        return self._r.read_aux(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._r._aux)

    def __len__(self) -> int:
        return len(self._r._aux)


# ---- opening -------------------------------------------------------------------------------

def _pick_weights(store: Store, files: dict[str, int], uri: str) -> tuple[list[str], str | None, dict | None]:
    """Which files hold the weights: (weight files in order, index file or None, weight_map)."""
    if store.single:
        return list(files), None, None
    top = [rel for rel in files if "/" not in rel]
    indexes = [rel for rel in top if rel.endswith(".safetensors.index.json")]
    if indexes:
        index = INDEX_NAME if INDEX_NAME in indexes else (indexes[0] if len(indexes) == 1 else None)
        if index is None:
            raise InputError(f"{uri}: several safetensors indexes ({', '.join(indexes)}) and none is "
                             f"{INDEX_NAME}; point the URI at one model")
        where = store.where(index)
        try:
            doc = json.loads(store.read_all(index).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise InputError(f"{where}: invalid JSON in the shard index ({json_problem(err)})") from None
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise InputError(f"{where}: the shard index has no valid 'weight_map' object")
        shards = sorted(set(wmap.values()))
        for shard in shards:
            if "/" in shard or shard.startswith("."):
                raise InputError(f"{where}: shard name {shard!r} is not a file in the model directory")
            if shard not in files:
                n = sum(1 for v in wmap.values() if v == shard)
                raise InputError(f"{where}: names shard '{shard}' ({n} tensors) but "
                                 f"{store.where(shard)} does not exist")
        return shards, index, wmap
    if SINGLE_NAME in files:
        return [SINGLE_NAME], None, None
    st = sorted(rel for rel in top if rel.endswith(".safetensors"))
    shards = [rel for rel in st if _SHARD.match(rel)]
    if shards:
        more = f" and {len(shards) - 3} more" if len(shards) > 3 else ""
        raise InputError(f"{uri}: holds shard files ({', '.join(shards[:3])}{more}) but no {INDEX_NAME}: "
                         "an unfinished write (the index is written last) or an incomplete copy, not "
                         "a model")
    if len(st) == 1:
        return st, None, None
    if st:
        raise InputError(f"{uri}: several .safetensors files ({', '.join(st)}) but no "
                         f"{INDEX_NAME} saying which hold the model")
    other = [rel for rel in top if _FOREIGN.match(rel) or rel.endswith((".bin", ".pt", ".pth"))]
    hint = f"; found {', '.join(other)}: convert them to safetensors" if other else ""
    raise InputError(f"{uri}: no safetensors weights found (looked for {SINGLE_NAME}, or shards "
                     f"with {INDEX_NAME}){hint}")


def _read_header(store: Store, rel: str, size: int) -> Header:
    where = store.where(rel)
    first = store.read(rel, 0, min(size, 8 + _PREFETCH)) if size >= 8 else b""
    n = header_length(first, size, where)
    if len(first) < 8 + n:
        first += store.read(rel, len(first), 8 + n)
    return parse_header(first, size, where, file=rel)


def open_model(uri: str, s3: S3Options | None = None) -> ModelReader:
    """Open a model directory, a sharded directory, or one .safetensors file, local or s3://."""
    try:
        u = parse_uri(uri)
    except ValueError as err:
        raise InputError(str(err)) from None
    store, files = open_store(u, s3)
    try:
        weights, index, wmap = _pick_weights(store, files, str(u))
        if len(weights) > 1 and u.is_s3:
            with ThreadPoolExecutor(min(8, len(weights))) as pool:
                headers = dict(zip(weights, pool.map(lambda r: _read_header(store, r, files[r]), weights)))
        else:
            headers = {rel: _read_header(store, rel, files[rel]) for rel in weights}
        tensors: dict[str, TensorMeta] = {}
        if wmap is not None:
            order = {rel: i for i, rel in enumerate(weights)}
            for name, shard in wmap.items():
                if name not in headers[shard].tensors:
                    raise InputError(f"{store.where(index)}: names tensor '{name}' in {shard}, but "
                                     f"{store.where(shard)} has no such tensor")
            for name in sorted(wmap, key=lambda k: (order[wmap[k]], headers[wmap[k]].tensors[k].offset)):
                tensors[name] = headers[wmap[name]].tensors[name]
        else:
            for rel in weights:
                for name, meta in headers[rel].tensors.items():
                    if name in tensors:
                        raise InputError(f"{store.where(rel)}: tensor '{name}' also appears in "
                                         f"{store.where(tensors[name].file)}")
                    tensors[name] = meta
        return ModelReader(str(u), store, files, weights, index, headers, tensors, s3)
    except BaseException:
        store.close()
        raise


_MINMAX_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_finite(name: str, t: torch.Tensor, source: str) -> None:
    """Raise InputError naming the tensor and its source when `t` holds NaN or Inf."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return
    if t.dtype in _MINMAX_DTYPES:
        # One reduction pass, no temporary: NaN propagates to min and max, ±Inf shows in one.
        # isfinite(t).all() writes a bool tensor first and is 10-20x slower on CPU.
        lo, hi = torch.aminmax(t)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return
    elif bool(torch.isfinite(t).all()):
        return
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    raise InputError(f"{source}: tensor '{name}' holds {n_nan} NaN and {n_inf} Inf values "
                     f"(of {t.numel()}); the model is corrupt or diverged")
