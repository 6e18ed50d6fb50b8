"""TIES merging: trim each task vector, elect a sign per entry, average the agreeing entries.

Written as a composition, as in the paper and in mergekit's generalized task arithmetic:
    trimmed_i = magnitude_trim(τ_i, density_i)
    sign      = elect_sign([w_i · trimmed_i])
    ΔW        = λ · disjoint_merge(trimmed, w, sign, normalize)
Every tensor is handled the same way whatever its number of dimensions (it is flattened).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
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


def elect_sign(weighted_tvs: Sequence[Tensor], method: Consensus = "sum") -> Tensor:
    """The majority sign per entry, +1 or -1 (a tie, including all zeros, elects +1).

    'sum': the sign of Σ_i w_i τ_i (TIES); 'count': the sign of Σ_i sign(w_i τ_i).
    weighted_tvs: T tensors of shape S -> S of ±1 in float32 (float64 for float64 inputs)
    """
    check_group(weighted_tvs, [1.0] * len(weighted_tvs))
    if method not in ("sum", "count"):
        raise ValueError(f"consensus method must be 'sum' or 'count', got {method!r}")
    dtype = work_dtype(weighted_tvs)
    total = torch.zeros(weighted_tvs[0].shape, dtype=dtype, device=weighted_tvs[0].device)
    for t in weighted_tvs:
        total += t.to(dtype) if method == "sum" else t.sign().to(dtype)
    return torch.where(total >= 0, 1.0, -1.0).to(dtype)


def disjoint_merge(tvs: Sequence[Tensor], weights: Sequence[float], sign: Tensor,
                   normalize: bool = True) -> Tensor:
    """Σ_i w_i τ_i over the entries where sign(w_i τ_i) equals the elected sign.

    With normalize, each entry is divided by the sum of the weights of the experts that
    contributed to it; an entry nobody contributed to (divisor exactly 0) is divided by 1.
    Zero entries never contribute (their sign is 0).
    tvs: T tensors of shape S, weights: T floats, sign: S of ±1 -> S
    """
    check_group(tvs, weights)
    dtype = work_dtype(tvs)
    acc = torch.zeros(tvs[0].shape, dtype=dtype, device=tvs[0].device)
    divisor = torch.zeros_like(acc)
    zero = torch.zeros((), dtype=dtype, device=acc.device)
    for tv, w in zip(tvs, weights):
        wt = tv.to(dtype) * float(w)
        agree = wt.sign() == sign
        acc += torch.where(agree, wt, zero)
        divisor += agree.to(dtype) * float(w)
    if normalize:
        divisor[divisor == 0] = 1.0
        acc /= divisor
    return acc


def sign_consensus_merge(tvs: Sequence[Tensor], weights: Sequence[float], lam: float = 1.0,
                         normalize: bool = True, method: Consensus = "sum") -> Tensor:
    """The coordinator half of TIES / DARE-TIES: elect signs over w_i τ_i, disjoint merge, × λ.

    tvs: T (already trimmed or dropped) task vectors of shape S -> S
    """
    check_group(tvs, weights)
    sign = elect_sign([tv * float(w) for tv, w in zip(tvs, weights)], method)
    out = disjoint_merge(tvs, weights, sign, normalize)
    if lam != 1.0:
        out *= lam
    return out


def ties(task_vectors: Sequence[Tensor], weights: Sequence[float], density: float | Sequence[float],
         lam: float = 1.0, normalize: bool = True, method: Consensus = "sum",
         rescale: bool = False) -> Tensor:
    """TIES: magnitude_trim each τ_i (L1-rescaled if `rescale`), then sign_consensus_merge.

    density: one value for all, or one per task vector.
    task_vectors: T tensors of shape S -> S
    """
    check_group(task_vectors, weights)
    trimmed = []
    for tv, d in zip(task_vectors, densities_for(density, len(task_vectors))):
        t = magnitude_trim(tv, d)
        trimmed.append(rescale_l1(tv, t) if rescale and t is not tv else t)
    return sign_consensus_merge(trimmed, weights, lam, normalize, method)


__all__ = [
    "Consensus",
    "check_density",
    "densities_for",
    "disjoint_merge",
    "elect_sign",
    "kept_count",
    "magnitude_trim",
    "rescale_l1",
    "sign_consensus_merge",
    "ties",
]
