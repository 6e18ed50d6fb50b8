"""Whole-tensor statistics computed chunk by chunk, so that row blocks give the whole tensor's bits.

A statistic of a whole tensor (a norm, a dot product, a sum of squares) is a reduction whose
float32 result depends on the order of its additions. To get the same bits whether a tensor is
read whole or in row blocks of any size, the methods that need one (slerp, model_stock, SCE,
DELLA) reduce over a fixed grid instead: the flattened tensor cut into chunks of `CHUNK`
elements (mergekit's own slerp chunk), each chunk reduced with the whole-tensor expression,
the chunk results then combined. A tensor of at most `CHUNK` elements is one chunk, reduced
exactly as before.

`regroup` turns a stream of row blocks (of several tensors read in lockstep) into that grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

CHUNK = 1 << 20  # elements per chunk of a whole-tensor statistic


def regroup(blocks: Iterable[Sequence[Tensor]], size: int | None = None) -> Iterator[list[Tensor]]:
    """Consecutive blocks of flat entries of some tensors (each item: one block of each tensor,
    all of the same length) as consecutive chunks of `size` entries (the last one shorter;
    default `CHUNK`).

    A chunk that lies inside one block is a view of it; one that spans blocks is a copy. The
    chunks of the whole tensors given as one block are those of any cutting into blocks.
    """
    size = size or CHUNK
    pending: list[list[Tensor]] = []
    have = 0
    for item in blocks:
        flat = [t.reshape(-1) for t in item]
        n = flat[0].numel() if flat else 0
        pos = 0
        while pos < n:
            take = min(size - have, n - pos)
            piece = [f[pos:pos + take] for f in flat]
            pos += take
            if not pending and take == size:
                yield piece
                continue
            pending.append(piece)
            have += take
            if have == size:
                yield [torch.cat(ps) for ps in zip(*pending)]
                pending, have = [], 0
    if pending:
        yield [torch.cat(ps) for ps in zip(*pending)] if len(pending) > 1 else pending[0]


def chunks_of(tensors: Sequence[Tensor], size: int | None = None) -> Iterator[list[Tensor]]:
    """The chunks of whole tensors (views): `regroup` of one block each."""
    return regroup([tensors], size)


def combine_norms(norms: list[Tensor]) -> Tensor:
    """The norm of a vector from its chunks' norms: the one chunk's, else the norm of them."""
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)


def combine_sums(sums: list[Tensor]) -> Tensor:
    """A sum from its chunks' sums: the one chunk's, else the sum of them (in chunk order)."""
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum(dim=0)


__all__ = ["CHUNK", "chunks_of", "combine_norms", "combine_sums", "regroup"]
