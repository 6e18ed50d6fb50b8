"""The safetensors file format: dtype codes, header parsing with strict checks, header encoding.

A file is an 8-byte little-endian header length N, N bytes of JSON, then the data area. The
JSON maps each tensor name to {dtype, shape, data_offsets: [begin, end]} (offsets relative to
the data area) and may hold a "__metadata__" map of strings.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from esm_ray.errors import InputError

MAX_HEADER_BYTES = 100 * 2**20  # the limit the reference implementation enforces
INDEX_NAME = "model.safetensors.index.json"  # a sharded model's index (HF layout)
SINGLE_NAME = "model.safetensors"  # an unsharded model's one file

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _code, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives: its dtype, shape, size in bytes and the file holding it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    file: str
    offset: int = 0  # absolute byte offset of the tensor's data in `file`


@dataclass(frozen=True)
class Header:
    """A parsed and checked header. `tensors` is in data-offset order."""

    raw: bytes  # the 8 length bytes plus the JSON, as stored
    data_start: int
    tensors: dict[str, TensorMeta]
    metadata: dict[str, str]


def json_problem(err: Exception) -> str:
    """What went wrong parsing JSON, in words: the parser's message, or the nesting that ran past
    Python's recursion limit (json raises RecursionError there)."""
    return "it nests too deeply" if isinstance(err, RecursionError) else str(err)


def header_length(prefix: bytes, size: int, where: str) -> int:
    """Read N from the first 8 bytes and check that 8 + N fits in a file of `size` bytes."""
    if size < 8 or len(prefix) < 8:
        raise InputError(f"{where}: not a safetensors file: it is {size} bytes, shorter than the "
                         "8-byte header length (truncated or empty file)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise InputError(f"{where}: corrupt safetensors header: header length {n} bytes exceeds the "
                         f"{MAX_HEADER_BYTES}-byte limit (not a safetensors file?)")
    if 8 + n > size:
        raise InputError(f"{where}: corrupt safetensors header: header length {n} bytes goes beyond "
                         f"the end of the {size}-byte file (truncated file?)")
    return n


def parse_header(raw: bytes, size: int, where: str, file: str | None = None) -> Header:
    """Check a header (`raw` = 8 length bytes + JSON) against a file of `size` bytes.

    Every problem raises InputError naming `where` and, where it applies, the tensor. The
    tensors' `file` is `file` (default: `where`).
    """
    n = header_length(raw, size, where)
    if len(raw) < 8 + n:
        raise InputError(f"{where}: corrupt safetensors header: got {len(raw) - 8} of {n} header bytes")
    try:
        doc = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise InputError(f"{where}: corrupt safetensors header: invalid JSON ({json_problem(err)})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{where}: corrupt safetensors header: expected a JSON object, got "
                         f"{type(doc).__name__}")
    data_start = 8 + n
    data_size = size - data_start
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise InputError(f"{where}: corrupt safetensors header: __metadata__ is not an object")
    entries = []
    for name, e in doc.items():
        at = f"{where}: tensor '{name}'"
        if not isinstance(e, dict):
            raise InputError(f"{at}: corrupt header entry (expected an object)")
        code, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if code not in DTYPES:
            raise InputError(f"{at}: unknown dtype {code!r}; supported: {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise InputError(f"{at}: corrupt header entry: shape {shape!r} is not a list of sizes")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise InputError(f"{at}: corrupt header entry: data_offsets {offs!r} is not [begin, end]")
        begin, end = offs
        if not 0 <= begin <= end:
            raise InputError(f"{at}: corrupt header entry: data_offsets [{begin}, {end}] are not ordered")
        if end > data_size:
            raise InputError(f"{at}: data_offsets [{begin}, {end}] go beyond the end of the file "
                             f"(data area is {data_size} bytes; truncated file?)")
        dtype = DTYPES[code]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise InputError(f"{at}: data_offsets [{begin}, {end}] hold {end - begin} bytes but "
                             f"{code}{shape} needs {nbytes}")
        entries.append((begin, end, name, dtype, tuple(shape)))
    entries.sort(key=lambda x: (x[0], x[1]))
    prev_end, prev_name = 0, None
    for begin, end, name, _, _ in entries:
        if begin < prev_end:
            raise InputError(f"{where}: tensor '{name}': data_offsets overlap those of '{prev_name}'")
        if end > begin:
            prev_end, prev_name = end, name
    tensors = {name: TensorMeta(dtype, shape, end - begin, file or where, data_start + begin)
               for begin, end, name, dtype, shape in entries}
    return Header(bytes(raw[:data_start]), data_start, tensors,
                  {str(k): str(v) for k, v in meta.items()})


def encode_header(items: list[tuple[str, torch.dtype, tuple[int, ...], int]],
                  metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length + JSON padded to 8 bytes) for tensors stored back to back in order.

    `items` are (name, dtype, shape, nbytes). Raises ValueError for an unsupported dtype or a
    non-string metadata value.
    """
    doc: dict = {}
    meta = {"format": "pt", **(metadata or {})}
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"safetensors metadata must map strings to strings; got {k!r}: {v!r}")
    doc["__metadata__"] = meta
    pos = 0
    for name, dtype, shape, nbytes in items:
        if dtype not in CODES:
            raise ValueError(f"tensor '{name}': dtype {dtype} cannot be stored in safetensors")
        doc[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy where it is contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def serialize(tensors: Iterable[tuple[str, torch.Tensor]],
              metadata: Mapping[str, str] | None) -> tuple[bytes, list[memoryview], int]:
    """(header bytes, raw byte views of the tensors in order, data bytes) of one safetensors file.
    Raises ValueError as `encode_header` does."""
    items, views = [], []
    for name, t in tensors:
        v = tensor_bytes(t)
        items.append((name, t.dtype, tuple(t.shape), len(v)))
        views.append(v)
    header = encode_header(items, dict(metadata or {}))
    return header, views, sum(len(v) for v in views)


def safetensors_header(data: bytes) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({tensor: shape}, metadata) from a safetensors file's bytes, without loading tensors."""
    if len(data) < 8:
        raise ValueError("not a safetensors file (shorter than its header length)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("not a safetensors file (header longer than the file)")
    try:
        header = json.loads(data[8:8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ValueError("not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    shapes = {k: tuple(int(d) for d in v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}
    return shapes, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
