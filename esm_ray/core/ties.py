"""TIES merging: trim each task vector, elect a sign per entry, average the agreeing entries.

As in the paper and in mergekit's generalized task arithmetic:
    trimmed_i = magnitude_trim(τ_i, density_i)
    sign      = elect_sign([w_i · trimmed_i])
    ΔW        = λ · disjoint_merge(trimmed, w, sign, normalize)
Production trims on each expert side (`magnitude_trim`, or `trim_threshold` over row blocks)
and elects and merges in one pass on the coordinator (`sign_consensus_merge`); the readable
composition above is kept in the tests (tests/oracles.py), which hold these functions against it.
Every tensor is handled the same way whatever its number of dimensions (it is flattened).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from esm_ray.core.arithmetic import check_group, work_dtype

Consensus = Literal["sum", "count"]


def check_density(density: float) -> None:
    """Raise ValueError unless 0 < density <= 1."""
    if not isinstance(density, (int, float)) or math.isnan(density) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")


def densities_for(density: float | Sequence[float], n: int) -> list[float]:
    """One density per task vector from a scalar or a per-vector list."""
    out = [float(density)] * n if isinstance(density, (int, float)) else [float(d) for d in density]
    if len(out) != n:
        raise ValueError(f"got {len(out)} densities for {n} task vectors")
    return out


def kept_count(numel: int, density: float) -> int:
    """How many entries magnitude_trim keeps: max(1, int(density · numel)), as mergekit."""
    check_density(density)
    return min(numel, max(1, int(density * numel))) if numel else 0


@dataclass(frozen=True)
class TrimThreshold:
    """Where magnitude_trim cuts one float32 task vector.

    value: the k-th largest |entry| (float32), entries above it are kept
    ties:  (m,) int64 ascending flat indices of the entries with |entry| == value that are kept
           (the lowest ones, enough to keep k entries in all)
    tied:  how many entries have |entry| == value (m of them are kept)
    """

    value: float
    ties: Tensor
    tied: int = 0

    def apply(self, block: Tensor, start: int = 0) -> Tensor:
        """The trimmed copy of `block`, the flat entries [start, start + block.numel()) of the
        task vector: entries with |x| > value, plus the kept ties among them, else +0."""
        flat = block.reshape(-1)
        out = F.hardshrink(flat, self.value)  # x where |x| > value, else +0 (one vectorized pass)
        if self.ties.numel():
            lo, hi = torch.searchsorted(self.ties, torch.tensor([start, start + flat.numel()])).tolist()
            at = self.ties[lo:hi] - start
            if at.numel():
                out[at] = flat[at]
        return out.reshape(block.shape)

    def mask(self, block: Tensor, start: int = 0) -> Tensor:
        """Boolean mask of the kept entries of `block` (flat entries [start, start + numel))."""
        flat = block.reshape(-1)
        keep = flat.abs() > self.value
        if self.ties.numel():
            lo, hi = torch.searchsorted(self.ties, torch.tensor([start, start + flat.numel()])).tolist()
            keep[self.ties[lo:hi] - start] = True
        return keep.reshape(block.shape)


def sparse_nonzero(mask: Tensor) -> Tensor:
    """The ascending indices of the True entries of a 1-D bool mask: torch.nonzero(mask)[:, 0],
    about 3x faster on CPU where few are True (a trim threshold's bucket holds ~0.2% of the
    entries). The mask is scanned as 8-byte words; only words holding a True are expanded.
    mask: (n,) bool -> (m,) int64
    """
    n = mask.numel()
    full = n // 8 * 8
    if full == 0 or mask.storage_offset() % 8 or not mask.is_contiguous():
        return torch.nonzero(mask).squeeze(1)
    words = torch.nonzero(mask[:full].view(torch.int64)).squeeze(1)
    candidates = (words.unsqueeze(1) * 8 + torch.arange(8, device=mask.device)).reshape(-1)
    found = candidates[mask[candidates]]
    if full < n:
        found = torch.cat([found, torch.nonzero(mask[full:]).squeeze(1).add_(full)])
    return found


TRIM_SLICE = 1 << 18  # entries per slice of trim_threshold's second pass
TRIM_KEEP_BYTES = 64 << 20  # trim_threshold keeps the first pass's high bits up to this size


def trim_threshold(blocks: Callable[[], Iterable[Tensor]], k: int | Callable[[], int]) -> TrimThreshold:
    """The TrimThreshold keeping k entries of a float32 task vector given as consecutive blocks.

    `blocks()` yields the vector's entries in flat order, in float32 blocks of any sizes, and is
    called twice (two passes); `k` may be a function, called after the first pass (SCE counts
    its entries there). The result is that of the whole vector at once, whatever the
    blocks: exactly the k-th largest |entry| that kthvalue of the magnitudes gives, ties kept
    from the lowest flat index.

    Radix select on the bit patterns, which order magnitudes like their values: a histogram of
    the high 15 bits of |x| finds the bucket holding v, a histogram of the low 16 bits of that
    bucket's entries finds v itself. Two counting passes over 2-byte halves instead of a
    partial sort (5-10x faster than kthvalue on a 49152 x 576 tensor), and no magnitude tensor.
    The first pass keeps the high bits it computed (2 bytes an entry, up to TRIM_KEEP_BYTES);
    the second, whose blocks are no longer in cache, runs over cache-sized slices of each block
    (TRIM_SLICE entries) and finds the bucket's few entries with `sparse_nonzero`.
    """
    def high_bits(flat: Tensor, out: Tensor | None = None) -> Tensor:
        halves = flat.view(torch.int16)
        return torch.bitwise_and(halves[1::2] if sys.byteorder == "little" else halves[0::2], 0x7FFF, out=out)

    counts = None
    kept: list[Tensor] | None = []
    kept_bytes = 0
    for block in blocks():
        h = high_bits(block.reshape(-1))
        c = torch.bincount(h, minlength=1 << 15)
        counts = c if counts is None else counts.add_(c)
        kept_bytes += 2 * h.numel()
        if kept_bytes > TRIM_KEEP_BYTES:
            kept = None  # a vector this large computes them again
        elif kept is not None:
            kept.append(h)
    if counts is None:
        raise ValueError("no entries to trim")
    k = k() if callable(k) else k
    counts = counts.flip(0).cumsum(0)  # [j]: entries with high >= 0x7FFF - j
    j = int(torch.searchsorted(counts, torch.tensor(k)))
    top = 0x7FFF - j
    greater = int(counts[j - 1]) if j else 0
    where, lows, start = [], [], 0
    high, hit = torch.empty(0, dtype=torch.int16), torch.empty(0, dtype=torch.bool)
    for bi, block in enumerate(blocks()):
        flat = block.reshape(-1)
        for a in range(0, flat.numel(), TRIM_SLICE):
            part = flat[a:a + TRIM_SLICE]
            m = part.numel()
            if high.numel() < m:
                high = torch.empty(m, dtype=torch.int16, device=flat.device)
                hit = torch.empty(m, dtype=torch.bool, device=flat.device)
            h = kept[bi][a:a + m] if kept is not None else high_bits(part, out=high[:m])
            in_top = sparse_nonzero(torch.eq(h, top, out=hit[:m]))  # ascending
            lows.append(part.view(torch.int32)[in_top].bitwise_and_(0xFFFF))
            where.append(in_top.add_(start + a))
        start += flat.numel()
    in_top, low = torch.cat(where), torch.cat(lows)
    counts = torch.bincount(low, minlength=1 << 16).flip(0).cumsum(0)
    j = int(torch.searchsorted(counts, torch.tensor(k - greater)))
    greater += int(counts[j - 1]) if j else 0
    value = torch.tensor((top << 16) | (0xFFFF - j), dtype=torch.int32).view(torch.float32)
    tied = in_top[low == 0xFFFF - j]
    return TrimThreshold(float(value), tied[:k - greater], tied.numel())


def magnitude_trim(tv: Tensor, density: float) -> Tensor:
    """Keep the k = max(1, int(density · numel)) entries of largest |value|, zero the rest.

    Ties in |value| at the threshold are broken by position (lower flat index first), so the
    result is deterministic. density = 1 returns `tv` itself.
    tv: any shape S -> S
    """
    k = kept_count(tv.numel(), density)
    n = tv.numel()
    if k >= n:
        return tv
    flat = tv.reshape(-1)
    if flat.dtype == torch.float32:
        return trim_threshold(lambda: (flat,), k).apply(tv)
    mag = flat.abs()
    if mag.dtype in (torch.float16, torch.bfloat16):
        mag = mag.float()
    threshold = torch.kthvalue(mag, n - k + 1).values  # the k-th largest magnitude
    keep = mag > threshold
    short = k - int(keep.sum())
    if short > 0:
        at = torch.nonzero(mag == threshold).squeeze(1)[:short]
        keep[at] = True
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)).reshape(tv.shape)


def rescale_l1(original: Tensor, sparse: Tensor, eps: float = 1e-7) -> Tensor:
    """Scale `sparse` so that its L1 norm equals that of `original` (mergekit's `rescale`).

    Left unscaled when either norm is below eps. The norms are summed in float64.
    original, sparse: shape S -> S
    """
    before = original.double().abs().sum()
    after = sparse.double().abs().sum()
    if before < eps or after < eps:
        return sparse
    return sparse * (before / after).to(sparse.dtype)


# The coordinator's fuse runs over cache-sized slices: up to CONSENSUS_GROUP task vectors are
# taken together, and each slice of the sums is updated by every one of them before the next
# slice, so the elementwise passes run on data in cache instead of streaming whole tensors
# through memory for every operation (about 2x faster on CPU). When every vector fits in one
# group (T ≤ CONSENSUS_GROUP and at most CONSENSUS_GROUP_BYTES in all) the sums themselves are
# slice-sized and reused, and each result slice is written as soon as it is complete; otherwise
# whole-tensor sums carry over from group to group (large whole tensors go one at a time).
# Additions per entry keep the experts' order, so the bytes do not depend on the slicing. On an
# accelerator a slice is the whole tensor (one kernel launch per operation).
CONSENSUS_GROUP = 8
CONSENSUS_GROUP_BYTES = 64 << 20
CONSENSUS_SLICE = 1 << 18


def sign_consensus_merge(tvs: Iterable[Tensor], weights: Sequence[float], lam: float = 1.0,
                         normalize: bool = True, method: Consensus = "sum") -> Tensor:
    """The coordinator half of TIES / DARE-TIES: elect signs over w_i τ_i, disjoint merge, × λ.

    Equal bit for bit to disjoint_merge(tvs, w, elect_sign([w_i τ_i], method), normalize) · λ
    (the paper's composition, tests/oracles.py),
    but computed in one pass: next to the election score it keeps the running sums of the
    positive entries of w_i τ_i and of the negative ones (and of the weights of each), in the
    same order of additions, and takes the elected side at the end. So memory does not grow
    with T (at most CONSENSUS_GROUP vectors are held at once), and `tvs` may be a lazy iterable
    whose tensors are used once and not kept (its working dtype is then that of the first:
    float64 stays float64, anything else float32).
    tvs: T (already trimmed or dropped) task vectors of shape S -> S
    """
    if method not in ("sum", "count"):
        raise ValueError(f"consensus method must be 'sum' or 'count', got {method!r}")
    if isinstance(tvs, Sequence):
        check_group(tvs, weights)
        dtype: torch.dtype | None = work_dtype(tvs)
    else:
        dtype = None
    # With unit weights the divisors are counts, kept packed in one float sum (exact, and equal
    # to the float sums of 1.0 that the general path accumulates; _Consensus).
    counts = normalize and len(weights) < 4096 and all(float(w) == 1.0 for w in weights)
    acc: _Consensus | None = None
    group: list[tuple[Tensor, float]] = []
    n = 0
    for tv in tvs:
        if n >= len(weights):
            raise ValueError(f"got {len(weights)} weights for more than {n} tensors")
        w = float(weights[n])
        n += 1
        if acc is None:
            dtype = dtype or (torch.float64 if tv.dtype == torch.float64 else torch.float32)
            acc = _Consensus(tv, dtype, normalize, counts, method, len(weights))
        elif tv.shape != acc.shape:
            raise ValueError(f"tensors differ in shape: {sorted({tuple(acc.shape), tuple(tv.shape)})}")
        if len(group) == acc.group_size:  # a vector beyond the first group: sums over the whole tensor
            acc.add(group)
            group.clear()
        group.append((tv.reshape(-1), w))
    if acc is None:
        raise ValueError("need at least one tensor")
    if n != len(weights):
        raise ValueError(f"got {len(weights)} weights for {n} tensors")
    return acc.finish(group, lam)


class _Consensus:
    """sign_consensus_merge's running sums over one tensor's entries (flat), updated by groups
    of weighted task vectors slice by slice."""

    def __init__(self, first: Tensor, dtype: torch.dtype, normalize: bool, counts: bool,
                 method: Consensus, n: int) -> None:
        self.shape, self.dtype, self.normalize, self.counts, self.method = first.shape, dtype, normalize, counts, method
        self.radix = float(n + 1)  # counts packed as cp + radix · cn (both at most n)
        self.numel, self.device = first.numel(), first.device
        self.step = max(1, CONSENSUS_SLICE if self.device.type == "cpu" else self.numel)
        self.group_size = max(1, min(CONSENSUS_GROUP,
                                     CONSENSUS_GROUP_BYTES // max(1, self.numel * first.element_size())))
        width = min(self.step, self.numel)
        self.tmp = torch.empty(width, dtype=dtype, device=self.device)
        self.side = torch.empty(width, dtype=torch.bool, device=self.device)
        self.wbuf: Tensor | None = None
        self.sums: list[Tensor] | None = None  # whole-tensor sums, once a second group comes

    def _zeros(self, numel: int) -> list[Tensor]:
        # score, pos, neg, and the divisors: with unit weights (`counts`) one sum of f(sign(τ_i)),
        # f(s) = a·s + b·s² with f(1) = 1 and f(−1) = radix, i.e. cp + radix · cn (small
        # integers, exact in floating point; float ops are several times faster than
        # comparisons into bool on CPU), else each side's weights.
        n = 3 + (0 if not self.normalize else 1 if self.counts else 2)
        return [torch.zeros(numel, dtype=self.dtype, device=self.device) for _ in range(n)]

    def _slices(self) -> Iterator[tuple[int, int]]:
        for a in range(0, self.numel, self.step):
            yield a, min(self.numel, a + self.step)

    def _add(self, sums: list[Tensor], group: list[tuple[Tensor, float]], a: int, b: int) -> None:
        """Add entries [a, b) of the group's vectors (flat, in expert order) to `sums` (b − a long)."""
        m = b - a
        score, pos, neg = sums[:3]
        tmp, side = self.tmp[:m], self.side[:m]
        for tv, w in group:
            wt = tv[a:b].to(self.dtype)
            if w != 1.0:  # wt * 1.0 is wt bit for bit
                if self.wbuf is None:
                    self.wbuf = torch.empty_like(self.tmp)
                wt = torch.mul(wt, w, out=self.wbuf[:m])
            score += wt if self.method == "sum" else torch.sign(wt, out=tmp)
            # pos += where(wt > 0, wt, 0) and neg += where(wt < 0, wt, 0), as clamps (4x faster
            # than where): they add ±0 instead of +0 elsewhere, which changes nothing, as pos and
            # neg start at +0 and only ever add values of their own sign, so they are never -0.
            pos += torch.clamp(wt, min=0.0, out=tmp)
            neg += torch.clamp(wt, max=0.0, out=tmp)
            if not self.normalize:
                continue
            if self.counts:  # += a·s + b·s², s = sign(w_i τ_i): 1 for cp, radix for cn
                s = torch.sign(wt, out=tmp)
                sums[3].addcmul_(s, s, value=(self.radix + 1) / 2).add_(s, alpha=(1 - self.radix) / 2)
                continue
            for total, in_side in ((sums[3], torch.gt), (sums[4], torch.lt)):
                in_side(wt, 0, out=side)  # the entries whose sign(w_i τ_i) is this side's sign
                tmp.copy_(side)
                total += tmp if w == 1.0 else tmp.mul_(w)

    def _elect(self, sums: list[Tensor], lam: float) -> Tensor:
        """The elected side's mean (or sum) × λ from slice-long sums, in place in `pos`."""
        # The elected side, + on a tie (as the paper's sign election). Picked with arithmetic,
        # not torch.where (whose CPU kernel branches on the random mask, 5x slower): a·u +
        # (b - b·u) for u in {0, 1} is a or b exactly here, as none of the sums is -0 (see
        # above; the same holds for the weights). (A sum that overflowed to ±inf would give
        # NaN instead, which the executor reports.)
        score, pos, neg = sums[:3]
        m = score.numel()
        # u = 1 where score ≥ 0 (−0 included), else 0: min(sign(score) + 1, 1), float ops
        up = torch.sign(score, out=self.tmp[:m]).add_(1.0).clamp_(max=1.0)
        pos.mul_(up).add_(neg.addcmul_(neg, up, value=-1.0))
        if self.normalize:
            if self.counts:  # the elected side's count: cn + u (cp − cn), cn = ⌊packed / radix⌋
                packed = sums[3]
                cn = score.copy_(packed).div_(self.radix).floor_()
                cp = packed.sub_(cn, alpha=self.radix)
                pos.div_(cp.sub_(cn).mul_(up).add_(cn).clamp_(min=1.0))
            else:
                first, second = sums[3:]
                divisor = first.mul_(up).add_(second.addcmul_(second, up, value=-1.0))
                divisor[divisor == 0] = 1.0
                pos.div_(divisor)
        if lam != 1.0:
            pos.mul_(lam)
        return pos

    def add(self, group: list[tuple[Tensor, float]]) -> None:
        """Add a group's vectors to whole-tensor sums (made on the first call)."""
        if self.sums is None:
            self.sums = self._zeros(self.numel)
        for a, b in self._slices():
            self._add([s[a:b] for s in self.sums], group, a, b)

    def finish(self, group: list[tuple[Tensor, float]], lam: float) -> Tensor:
        """Add the last group and return the merged tensor, in the shape of the task vectors."""
        if self.sums is not None:  # several groups: add the last one, then elect slice by slice
            self.add(group)
            for a, b in self._slices():
                self._elect([s[a:b] for s in self.sums], lam)
            return self.sums[1].reshape(self.shape)
        out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        sums = self._zeros(min(self.step, self.numel))
        for a, b in self._slices():
            part = [s[:b - a] for s in sums]
            if a:
                for s in part:
                    s.zero_()
            self._add(part, group, a, b)
            out[a:b] = self._elect(part, lam)
        return out.reshape(self.shape)


__all__ = [
    "Consensus",
    "check_density",
    "densities_for",
    "kept_count",
    "magnitude_trim",
    "rescale_l1",
    "sign_consensus_merge",
]
