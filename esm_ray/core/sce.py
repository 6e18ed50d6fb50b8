"""SCE (Select, Calculate, Erase; FuseChat 2.0): keep the entries where the experts' task vectors
vary most, weight each expert by its task vector's mean square, erase entries against the elected
sign, as mergekit 0.1.5's `sce` (float32 results equal bit for bit).

    sce_merge(τ)                       the whole tensors at once, composed of:
    sce_variance_flat(blocks, numel)   the variance across experts, from (T, rows...) blocks
    sce_select(variances, topk, ties)  Select's threshold, from blocks of the variance
    sce_mask(τ, select, start)         Select's mask of the entries [start, ...) of the τ_i
    sce_weights(chunks, numel)         Calculate's c_i, from chunks of the selected τ_i (core.chunks)
    sce_fuse(τ, c)                     Erase and the weighted mean, entry by entry
The local executor merges a large tensor in row blocks through the last five: one pass over the
blocks for the variance (held whole, float32, while Select runs), one for the weights, then one
for the result, the bytes of the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from esm_ray.core import chunks as grid
from esm_ray.core.chunks import combine_sums
from esm_ray.core.ties import TrimThreshold, trim_threshold


@dataclass(frozen=True)
class SceSelect:
    """The entries Select keeps: all (select_topk ≥ 1, no mask), none, or those above a
    threshold of the variance (`top`, with the kept entries equal to it)."""

    keep: str  # "all" | "none" | "top"
    top: TrimThreshold | None = None


def sce_variance(tvs: Tensor) -> Tensor:
    """The variance across experts of each entry (population): (T, *S) -> S, the bits of
    torch.var(tvs, dim=0, unbiased=False) (mergekit's) for float32 tensors.

    torch's CPU kernel runs Welford's update in float64 one entry at a time, about 10x slower
    than elementwise work; the same updates over whole tensors give the same floats:
        δ = x_i − m,  m ← m + δ / i,  M2 ← M2 + δ (x_i − m),  var = M2 / T."""
    if tvs.dtype != torch.float32 or tvs.device.type != "cpu":
        return torch.var(tvs, dim=0, unbiased=False)
    return _entrywise(_welford, tvs, VARIANCE_SLICE)


# sce_variance's float64 updates run on slices of this many entries (their float64 temporaries,
# 512 KiB each, stay in the CPU's cache): 1.4-2.4x faster on one thread than on a 4 MiB block.
VARIANCE_SLICE = 1 << 16


def _entrywise(fn: Callable[[Tensor], Tensor], tvs: Tensor, size: int) -> Tensor:
    """fn, a function of (T, n) -> (n,) that works entry by entry, applied to (T, *S) -> S in
    slices of `size` entries: the bytes of one call on the whole, with its temporaries in cache."""
    flat = tvs.reshape(tvs.shape[0], -1)
    if flat.shape[1] <= size:
        return fn(flat).reshape(tvs.shape[1:])
    out = torch.empty(flat.shape[1], dtype=tvs.dtype)
    for s in range(0, flat.shape[1], size):
        out[s:s + size] = fn(flat[:, s:s + size])
    return out.reshape(tvs.shape[1:])


def _welford(tvs: Tensor) -> Tensor:
    """sce_variance of (T, n) float32 on CPU -> (n,)."""
    mean = tvs[0].to(torch.float64)  # the first update gives m = x_0 and M2 = +0 exactly
    m2 = torch.zeros_like(mean)
    delta, step, x = (torch.empty_like(mean) for _ in range(3))
    for i in range(1, tvs.shape[0]):
        x.copy_(tvs[i])
        torch.sub(x, mean, out=delta)
        mean.add_(torch.div(delta, i + 1, out=step))
        m2.add_(x.sub_(mean).mul_(delta))  # a product, then a sum (no fused multiply-add)
    return m2.div_(tvs.shape[0]).float()


def sce_variance_flat(blocks: Iterable[Tensor], numel: int) -> Tensor:
    """The variance across experts (sce_variance) of a tensor given as consecutive (T, rows...)
    blocks, into one flat float32 tensor (numel,): computed once, for Select's passes."""
    var = torch.empty(numel, dtype=torch.float32)
    start = 0
    for tvs in blocks:
        n = tvs[0].numel()
        var[start:start + n] = sce_variance(tvs).reshape(-1)
        start += n
    if start != numel:
        raise ValueError(f"sce: the blocks hold {start} entries, the tensor {numel}")
    return var


SelectTies = Literal["index", "topk"]


def sce_select(variances: Callable[[], Iterable[Tensor]], select_topk: float, ties: SelectTies = "index") -> SceSelect:
    """Select's entries: the k = int(nnz · select_topk) of largest variance across experts, nnz
    the number of entries whose variance is nonzero. `variances()` yields the variance in flat
    order in blocks of any sizes, and is called twice (core.ties.trim_threshold).

    When only some of the entries equal to the threshold can be kept (common with bfloat16
    experts, whose variances take few values), `ties` says which: "index" the lowest flat
    indices (as TIES's trim; what torch.topk keeps on CUDA, whose kernel gathers equal values
    in index order), "topk" those torch.topk of the whole variance keeps on CPU (mergekit's
    selection there; one more call of `variances()`, and the variance held in float32: one
    tensor's worth, plus the 12 bytes an entry of topk's result)."""
    if select_topk >= 1:
        return SceSelect("all")
    if select_topk <= 0:
        return SceSelect("none")
    nonzero: list[int] = []  # counted in the first pass

    def blocks() -> Iterable[Tensor]:
        counting = not nonzero
        nonzero.append(0)
        for v in variances():
            if counting:
                nonzero[0] += int(torch.count_nonzero(v))
            yield v

    k = lambda: int(nonzero[0] * select_topk)  # noqa: E731
    top = trim_threshold(blocks, k)
    if not k():
        return SceSelect("none")
    if ties == "topk" and top.ties.numel() < top.tied:
        # The set topk picks does not depend on `sorted` (its CPU kernel selects, then sorts the
        # selection), and leaving the selection unsorted is about 3x faster.
        flat = [v.reshape(-1) for v in variances()]
        var = flat[0] if len(flat) == 1 else torch.cat(flat)
        del flat
        picked = torch.topk(var.abs(), k=k(), largest=True, sorted=False).indices
        top = replace(top, ties=torch.sort(picked[var[picked] == top.value]).values)
    return SceSelect("top", top)


def sce_mask(tvs: Tensor, select: SceSelect, start: int = 0, var: Tensor | None = None) -> Tensor | None:
    """Select's 0/1 mask (the dtype of tvs, shape S) of the entries [start, ...) of the task
    vectors (T, *S), or None when it keeps all. `var`: their variance, when already known."""
    if select.keep == "all":
        return None
    if select.keep == "none":
        return torch.zeros_like(tvs[0])
    assert select.top is not None
    v = sce_variance(tvs) if var is None else var
    return select.top.mask(v, start).to(tvs.dtype)


def sce_selected(tvs: Tensor, mask: Tensor | None) -> Tensor:
    """The task vectors (T, *S) with Select's mask applied: entries outside it times 0 (as
    mergekit's mask does)."""
    return tvs if mask is None else tvs * mask.unsqueeze(0)


def sce_weights(chunks: Iterable[Tensor], numel: int) -> Tensor:
    """Calculate's c_i = mean(τ_i²) / Σ_j mean(τ_j²) (1/T each when that sum is < 1e-6), from the
    selected task vectors' chunks in order, each (T, n) (core.chunks: one chunk is reduced as
    mergekit reduces the whole tensor; more: their sums of squares summed, over numel)."""
    first: Tensor | None = None
    sums: list[Tensor] = []
    for x in chunks:
        sq = x.square()
        if first is None:
            first = sq
            continue
        if not sums:
            sums.append(first.sum(dim=1))
        sums.append(sq.sum(dim=1))
    if first is None:
        raise ValueError("sce: no entries")
    c = first.mean(dim=1) if not sums else combine_sums(sums) / numel
    total = torch.sum(c).item()
    return torch.ones_like(c) / c.shape[0] if abs(total) < 1e-6 else c / total


# sce_fuse works through this many entries at a time: its ten elementwise steps then run on
# (T, 2^17) slices that stay in the CPU's cache, about 2x faster than on a whole 4 MiB block.
FUSE_SLICE = 1 << 17


def sce_fuse(tvs: Tensor, c: Tensor) -> Tensor:
    """Erase and merge: e_i = [sign τ_i = elected sign], elected = sign of Σ_i τ_i (+ on a tie),
    ΔW = Σ_i c_i e_i τ_i / max(Σ_i c_i e_i, 1e-6). tvs: (T, *S) selected -> S.
    Entry by entry, so slices of FUSE_SLICE entries give the bytes of the whole."""
    return _entrywise(lambda x: _fuse(x, c), tvs, FUSE_SLICE)


def _fuse(tvs: Tensor, c: Tensor) -> Tensor:
    """sce_fuse of (T, n) -> (n,)."""
    sign = tvs.sign()
    elected = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = sign == elected
    ce = c.view(-1, 1) * erase
    return (tvs * ce).sum(dim=0) / torch.sum(ce, dim=0).clamp(min=1e-6)


def sce_merge(task_vectors: Sequence[Tensor], select_topk: float = 1.0, ties: SelectTies = "index") -> Tensor:
    """ΔW of SCE from T task vectors τ_i (shape S):

        Select:    τ_i ← τ_i · M, M the top-variance entries (sce_select, with `ties`; only
                   when select_topk < 1)
        Calculate: c_i = mean(τ_i²) / Σ_j mean(τ_j²)   (1/T each when that sum is < 1e-6)
        Erase:     e_i = [sign τ_i = elected sign], elected = sign of Σ_i τ_i (+ on a tie)
        ΔW = Σ_i c_i e_i τ_i / max(Σ_i c_i e_i, 1e-6)
    """
    tvs = torch.stack(list(task_vectors), dim=0)
    if not tvs[0].numel():
        return tvs[0].clone()
    var = sce_variance(tvs) if 0 < select_topk < 1 else None
    select = sce_select(lambda: () if var is None else (var,), select_topk, ties)
    tvs = sce_selected(tvs, sce_mask(tvs, select, 0, var))
    c = sce_weights(_chunked(tvs), tvs[0].numel())
    return sce_fuse(tvs, c)


def _chunked(tvs: Tensor) -> Iterable[Tensor]:
    """(T, n) chunks of stacked task vectors along core.chunks' grid (one chunk: all of them)."""
    flat = tvs.reshape(tvs.shape[0], -1)
    n, size = flat.shape[1], grid.CHUNK
    if n <= size:
        yield flat
        return
    for s in range(0, n, size):
        yield flat[:, s:s + size].contiguous()


__all__ = ["SceSelect", "sce_fuse", "sce_mask", "sce_merge", "sce_select", "sce_selected", "sce_variance",
           "sce_variance_flat", "sce_weights", "SelectTies"]
