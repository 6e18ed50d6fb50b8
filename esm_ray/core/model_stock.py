"""Model Stock (Jang et al. 2024): interpolate between the base and the experts' average by a
factor set from the angle between the experts' task vectors, as mergekit 0.1.5's `model_stock`.

    model_stock(W_0, W)                  the whole tensors at once
    StockStats / stock_factor            the cosines' inputs chunk by chunk (core.chunks), then t
    stock_apply(t, W_0, W)               t · mean(W_i) + (1 − t) W_0, on any rows
The local executor merges a large tensor in row blocks through the last three: one pass for the
statistics, one for the result, the same bytes as the whole tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from esm_ray.core import chunks as grid
from esm_ray.core.chunks import combine_norms, combine_sums

Stats = tuple[list[Tensor], list[Tensor]]  # (|τ_i| per expert, τ_i · τ_j per pair i < j)


def stock_stats(chunks: Iterable[Sequence[Tensor]]) -> Stats:
    """The norms of the task vectors and their pairwise dots over the last dimension, from
    their chunks in order (each item: the same entries of every τ_i): each chunk reduced as one
    whole tensor is, the chunks combined (core.chunks)."""
    norms: list[list[Tensor]] = []
    dots: list[list[Tensor]] = []
    for tvs in chunks:
        n = [torch.norm(a, dim=-1) for a in tvs]
        d = [(a * b).sum(dim=-1) for i, a in enumerate(tvs) for b in tvs[i + 1:]]
        norms = [[x] for x in n] if not norms else [acc + [x] for acc, x in zip(norms, n)]
        dots = [[x] for x in d] if not dots else [acc + [x] for acc, x in zip(dots, d)]
    return [combine_norms(x) for x in norms], [combine_sums(x) for x in dots]


class StockStats:
    """`stock_stats` of the flattened task vectors τ_i = W_i − W_0, fed as consecutive flat
    pieces of the base and the experts (`add`, any cutting, e.g. row blocks): τ is formed a
    2^20-entry chunk at a time (core.chunks' grid) in one buffer reused from chunk to chunk, so
    the norms and dots are those of `stock_stats(chunks_of([W_i − W_0]))`, bit for bit, without
    a task vector or a chunk copy per piece. Experts in a narrower dtype than the buffer's
    (bfloat16 rows) are converted into it, then subtracted.
    n: the number of experts; numel: the entries of one tensor (sizes the buffer)."""

    def __init__(self, n: int, numel: int, dtype: torch.dtype = torch.float32, chunk: int | None = None) -> None:
        size = max(1, min(chunk or grid.CHUNK, numel))
        self._tv = torch.empty(n, size, dtype=dtype)  # τ of the chunk being filled, one row per expert
        self._prod = torch.empty(size, dtype=dtype)  # τ_i ⊙ τ_j, summed for one dot
        self._fill = 0
        self._norms: list[list[Tensor]] = [[] for _ in range(n)]
        self._dots: list[list[Tensor]] = [[] for _ in range(n * (n - 1) // 2)]

    def add(self, base: Tensor, experts: Sequence[Tensor]) -> None:
        """The next entries of the flattened tensors: base (m,) or any shape of m entries, and
        each expert's same entries."""
        b = base.reshape(-1)
        ws = [w.reshape(-1) for w in experts]
        size, m, pos = self._tv.shape[1], b.numel(), 0
        while pos < m:
            take = min(size - self._fill, m - pos)
            end = self._fill + take
            for i, w in enumerate(ws):
                tv = self._tv[i, self._fill:end]
                if w.dtype == tv.dtype:
                    torch.sub(w[pos:pos + take], b[pos:pos + take], out=tv)
                else:  # converted, then subtracted: a mixed-dtype sub is 4x slower on CPU
                    tv.copy_(w[pos:pos + take]).sub_(b[pos:pos + take])
            self._fill, pos = end, pos + take
            if self._fill == size:
                self._reduce()

    def _reduce(self) -> None:
        """Norms and pairwise dots of the chunk in the buffer, each reduced as one tensor."""
        k, n = self._fill, self._tv.shape[0]
        tv, prod = self._tv[:, :k], self._prod[:k]
        for i in range(n):
            self._norms[i].append(torch.norm(tv[i], dim=-1))
        p = 0
        for i in range(n):
            for j in range(i + 1, n):
                self._dots[p].append(torch.mul(tv[i], tv[j], out=prod).sum(dim=-1))
                p += 1
        self._fill = 0

    def result(self) -> Stats:
        """(norms, dots) of everything added, as `stock_stats` gives them."""
        if self._fill:
            self._reduce()
        return [combine_norms(x) for x in self._norms], [combine_sums(x) for x in self._dots]


def stock_factor(stats: Stats) -> Tensor:
    """t = N cos θ / (1 + (N − 1) cos θ), cos θ the mean of the pairwise cosines (each clamped to
    [-1, 1], the norms' product floored at 1e-6); t = 0 where |1 + (N − 1) cos θ| < 1e-6.
    Shape: that of a norm with a trailing 1 (one per row, or (1,) for a flattened tensor)."""
    norms, dots = stats
    n = len(norms)
    cosines = []
    k = 0
    for i in range(n):
        for j in range(i + 1, n):
            denom = (norms[i] * norms[j]).clamp(min=1e-6)
            cosines.append((dots[k] / denom).clamp(-1, 1))
            k += 1
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos),
                       (n * cos) / torch.where(singular, torch.ones_like(denom), denom))


def stock_apply(t: Tensor, base: Tensor, experts: Sequence[Tensor], minus_base: bool = False) -> Tensor:
    """t · mean_i(W_i) + (1 − t) · W_0, entry by entry (t broadcast over the rows); with
    `minus_base`, that minus W_0 (the update a merge returns), in the same buffer. Experts in
    a narrower dtype than the base (bfloat16 rows beside a float32 base) are computed in the
    base's dtype, with the bits of converting them first."""
    # sum(experts) / n, t · mean + (1 − t) W_0 with fewer fresh tensors: the same operations
    # (Python's sum starts at 0, which turns -0 entries into +0)
    dtype = torch.promote_types(base.dtype, experts[0].dtype)
    acc = experts[0] + 0 if experts[0].dtype == dtype else experts[0].to(dtype).add_(0)
    for w in experts[1:]:
        acc.add_(w)
    acc.div_(len(experts)).mul_(t).add_(torch.mul(1 - t, base))
    return acc.sub_(base) if minus_base else acc


def model_stock(base: Tensor, experts: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """W = t · mean_i(W_i) + (1 − t) · W_0,  t = N cos θ / (1 + (N − 1) cos θ).

    cos θ is the mean over the N(N−1)/2 pairs of experts of the cosine between their task
    vectors τ_i = W_i − W_0 (each cosine clamped to [-1, 1], norms' product floored at 1e-6):
    one angle for the whole (flattened) tensor, or one per row with filter_wise (a 1-D tensor is
    then one row). Where |1 + (N − 1) cos θ| < 1e-6, t = 0 (the base is kept). The whole
    tensor's norms and dots are reduced in 2^20-entry chunks (core.chunks; one chunk, as
    mergekit, up to that size).
    base: shape S, experts: N ≥ 2 tensors of shape S -> S.
    """
    ws = list(experts)
    if len(ws) < 2:
        raise ValueError(f"model_stock needs at least 2 experts, got {len(ws)}")
    shape = base.shape
    if not base.numel():
        return base.clone()
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in ws]
        t = stock_factor(stock_stats([[w - w0 for w in ws]]))
    else:
        w0 = base.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
        stats = StockStats(len(ws), w0.numel(), torch.result_type(w0, ws[0]))
        stats.add(w0, ws)
        t = stock_factor(stats.result())
    return stock_apply(t, w0, ws).reshape(shape)


__all__ = ["StockStats", "model_stock", "stock_apply", "stock_factor", "stock_stats"]
