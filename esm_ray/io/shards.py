"""How an output's tensors are packed into shards: the packing rule, the shard names, and the
layout of a planned write (each tensor's shard and every shard's header), computed once.

Tensors fill a shard in the order they are added; a shard is closed when the next tensor would
overflow it or once it is full, and a tensor larger than the limit gets a shard of its own.
The writer packs unplanned tensors by the same rule as it goes, so a planned write and an
unplanned one with the same tensors give the same shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from esm_ray.io.format import encode_header

__all__ = ["ShardInfo", "ShardLayout", "nbytes_of", "pack_shards", "shard_name"]


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


def nbytes_of(dtype: torch.dtype, shape: Iterable[int]) -> int:
    """Bytes of a tensor of `dtype` and `shape`."""
    n = torch.empty(0, dtype=dtype).element_size()
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True)
class ShardInfo:
    """A shard that has been staged: its number (1-based), staged name, bytes and tensors."""

    index: int
    staged: str
    nbytes: int
    n_tensors: int
    parts: int = 0  # multipart parts (S3), 0 for a single PUT or a local file
    etag: str = ""


class ShardLayout:
    """The shards of a write whose tensors are known up front, in the order they will be added.

    `plan` items are (name, nbytes), or (name, dtype, shape): then every shard's header is known
    before its first tensor (`dtypes_known`) and a local writer can stream tensors into their
    shard files as they come.
    """

    def __init__(self, plan: Iterable[tuple], max_shard_bytes: int):
        items = [tuple(p) for p in plan]
        self.layout: list[tuple[torch.dtype, tuple[int, ...]]] | None = None
        if items and all(len(p) == 3 for p in items):
            self.layout = [(p[1], tuple(int(d) for d in p[2])) for p in items]
            items = [(p[0], nbytes_of(p[1], p[2])) for p in items]
        self.items: list[tuple[str, int]] = [(str(n), int(b)) for n, b in items]
        self.shard: list[int] = pack_shards([b for _, b in self.items], max_shard_bytes)
        self.n_shards: int = self.shard[-1] if self.items else 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dtypes_known(self) -> bool:
        """Whether every tensor's dtype and shape are planned (headers known up front)."""
        return self.layout is not None

    def expected(self, i: int) -> str:
        """What the plan wants as tensor i, in words (for an error message)."""
        return f"'{self.items[i][0]}' ({self.items[i][1]} bytes)" if i < len(self.items) else "nothing more"

    def follows(self, i: int, name: str, nbytes: int) -> bool:
        """Whether tensor `name` of `nbytes` is what the plan lists as item i."""
        return i < len(self.items) and self.items[i] == (name, nbytes)

    def header(self, i: int, metadata: Mapping[str, str]) -> bytes:
        """The header of the shard that begins with item i (every item of that shard)."""
        assert self.layout is not None
        k, j = self.shard[i], i
        while j < len(self.items) and self.shard[j] == k:
            j += 1
        return encode_header([(self.items[m][0], *self.layout[m], self.items[m][1]) for m in range(i, j)],
                             dict(metadata))
