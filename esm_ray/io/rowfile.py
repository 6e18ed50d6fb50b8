"""One tensor written to a safetensors file row block by row block, and read back the same way.

A tensor merged in row blocks is never whole in memory, so it cannot be saved with
`save_file`: `tee_rows` writes the header first (dtype and shape are known) and then each
block's bytes as the blocks pass through it, under a temporary name renamed once the last row
is in (a file that exists is complete). `read_rows` yields row ranges of such a file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from esm_ray.errors import OutputError
from esm_ray.io.format import encode_header, tensor_bytes


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty(0, dtype=dtype).element_size()
    for d in shape:
        n *= int(d)
    return n


def tee_rows(path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...], blocks: Iterable[torch.Tensor],
             metadata: Mapping[str, str] | None = None) -> Iterator[torch.Tensor]:
    """Yield `blocks` unchanged while writing them, in order, as tensor `name` of a safetensors
    file at `path`. The file appears (atomic rename, fsynced) only after blocks covering
    exactly `shape` have passed; otherwise, or when the consumer stops early, nothing is left."""
    shape = tuple(int(d) for d in shape)
    header = encode_header([(name, dtype, shape, _nbytes(dtype, shape))], dict(metadata or {}))
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    done = False
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            rows = 0
            for b in blocks:
                if b.dtype != dtype or tuple(b.shape[1:]) != shape[1:]:
                    raise OutputError(f"{path}: tensor '{name}': block {tuple(b.shape)} {b.dtype} does not fit "
                                      f"{dtype} {shape}")
                f.write(tensor_bytes(b.detach().cpu()))
                rows += b.shape[0]
                yield b
            if rows != shape[0]:
                raise OutputError(f"{path}: tensor '{name}': blocks cover {rows} of {shape[0]} rows")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
    except OSError as err:
        raise OutputError(f"{path}: write failed: {err.strerror or err}") from None
    finally:
        if not done:
            tmp.unlink(missing_ok=True)


def read_rows(path: Path, name: str, blocks: Iterable[tuple[int, int]]) -> Iterator[torch.Tensor]:
    """Tensor `name` of the file at `path`, as the given [start, stop) row ranges in order."""
    with safe_open(str(path), "pt") as f:
        sl = f.get_slice(name)
        for r0, r1 in blocks:
            yield sl[r0:r1]


def file_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (empty when it has none)."""
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


__all__ = ["file_metadata", "read_rows", "tee_rows"]
