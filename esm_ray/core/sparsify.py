"""Magnitude-rank sparsifiers of a task vector: Model Breadcrumbs (drop the largest outliers and
the smallest entries) and DELLA's MAGPRUNE (drop at random, with a keep probability that grows
with the entry's magnitude rank in its row), as mergekit 0.1.5 applies them.

    breadcrumbs_mask(τ, density, gamma)     deterministic, whole tensor
    della_keep_probability(τ, density, ε)   per-row ranks -> probabilities
    della_drop(τ, density, ε, generator)    one random draw of the pruned task vector

The merged result is then task arithmetic (breadcrumbs, della_linear) or TIES's sign consensus
(breadcrumbs_ties, della) over the sparsified task vectors (core.arithmetic, core.ties).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

from esm_ray.core.chunks import chunks_of, combine_sums
from esm_ray.core.ties import rescale_l1

DellaRescale = Literal["l1", "inverse_probability"]
_CHUNK = 1 << 22


def breadcrumbs_mask(tv: Tensor, density: float, gamma: float = 0.01) -> Tensor | None:
    """Boolean keep-mask of Model Breadcrumbs, or None when density ≥ 1 (keep everything).

    Of the N entries ordered by |τ| (ascending; equal magnitudes by index), the k = int(density·N)
    entries just below the int(gamma·N) largest are kept: the entries of rank
    [n_bot, n_bot + k) with n_bot = max(0, N − k − int(gamma·N)). So the largest outliers go
    first, and fewer of them go when that is needed to keep k.
    tv: shape S -> bool S.
    """
    if density >= 1:
        return None
    n = tv.numel()
    k = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - k - n_top)
    order = torch.sort(tv.abs().reshape(-1).float(), stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool, device=tv.device)
    keep[order[n_bot:n_bot + k]] = True
    return keep.reshape(tv.shape)


def breadcrumbs(tv: Tensor, density: float, gamma: float = 0.01, rescale: bool = False) -> Tensor:
    """τ with breadcrumbs_mask applied (+0 where dropped); rescale: to τ's L1 norm."""
    keep = breadcrumbs_mask(tv, density, gamma)
    if keep is None:
        return tv
    out = tv * keep
    return rescale_l1(tv, out) if rescale else out


def della_keep_probability(tv: Tensor, density: float, epsilon: float) -> Tensor:
    """MAGPRUNE's keep probability of each entry: p = (density − ε) + 2ε · r.

    r is the entry's magnitude rank within its row (the last dimension; a 1-D tensor is one
    row), scaled to [0, 1]: 0 for the smallest |τ|, 1 for the largest (equal magnitudes ranked
    by index). So the row's mean probability is density. Requires 0 < density ± ε < 1.
    tv: shape S -> float32 S.
    """
    if not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got density={density}, "
                         f"epsilon={epsilon}")
    rows = tv.reshape(1, -1) if tv.dim() < 2 else tv
    mags = rows.abs().float()
    n = rows.shape[-1]
    # The probability of each rank, once per row length, put in place by the sort's order (the
    # rank of entry order[j] is j + 1): the same floats as ranking every entry (argsort of the
    # argsort, then the row's min and max rank, which are 1 and n) and scaling it.
    ranks = torch.arange(1, n + 1, dtype=torch.float32, device=tv.device)
    r = torch.nan_to_num((ranks - 1.0) / float(n - 1), nan=0.0).clamp(0, 1)  # a 1-entry row: r = 0
    by_rank = (density - epsilon) + r * 2 * epsilon
    order = magnitude_order(mags)
    return mags.scatter_(-1, order, by_rank.expand(order.shape)).reshape(tv.shape)


def magnitude_order(mags: Tensor) -> Tensor:
    """argsort(mags, dim=-1, stable=True) of non-negative float32 magnitudes: the indices of
    each row's entries from the smallest to the largest, equal ones by index.

    On the CPU as one sort of unique int64 keys (the magnitude's bits, which order non-negative
    floats like their values, above the column index) by numpy's vectorised sort, in place:
    about 10x faster than torch's stable argsort of rows, the same result."""
    n = mags.shape[-1]
    shift = max(1, (n - 1).bit_length())
    if mags.device.type != "cpu" or mags.dtype != torch.float32 or n < 2 or shift > 32:
        return torch.argsort(mags, dim=-1, stable=True)
    # bits · 2^shift + column, in one pass (int32 bits promoted to the int64 columns)
    key = torch.add(torch.arange(n, dtype=torch.int64), mags.contiguous().view(torch.int32), alpha=1 << shift)
    key.numpy().sort(axis=-1)
    return key.bitwise_and_((1 << shift) - 1)


def della_seed(seed: int, expert_index: int, name: str) -> int:
    """A 63-bit seed for one tensor of one expert, from a BLAKE2b hash (stable everywhere)."""
    key = f"esm-ray/della\x00{int(seed)}\x00{int(expert_index)}\x00{name}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def della_generator(seed: int, expert_index: int, name: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(della_seed(seed, expert_index, name))


def bernoulli_mask(prob: Tensor, generator: torch.Generator) -> Tensor:
    """Boolean mask, entry j True with probability prob[j]: U_j < prob[j], U drawn on the CPU in
    flat order from `generator` (so the mask depends on the seed only, not on threads)."""
    flat = prob.reshape(-1).cpu()
    keep = torch.empty(flat.numel(), dtype=torch.bool)
    for s in range(0, flat.numel(), _CHUNK):
        n = min(_CHUNK, flat.numel() - s)
        torch.lt(torch.rand(n, generator=generator, dtype=torch.float32), flat[s:s + n], out=keep[s:s + n])
    return keep.reshape(prob.shape).to(prob.device)


def della_drop(tv: Tensor, density: float, epsilon: float, generator: torch.Generator,
               rescale: bool = True, rescale_mode: DellaRescale = "l1") -> Tensor:
    """One MAGPRUNE draw: keep entry j with probability p_j (della_keep_probability), else +0.

    rescale 'l1' scales the survivors to τ's L1 norm (mergekit's `rescale`; the norms summed in
    float64 over core.chunks' grid, l1_scale); 'inverse_probability'
    divides each survivor by its p_j (the DELLA paper; E[result] = τ). density ≥ 1 returns τ
    and draws nothing. tv: shape S -> S.
    """
    if density >= 1:
        return tv
    keep, out = della_draw(tv, density, epsilon, generator, rescale, rescale_mode)
    if not (rescale and rescale_mode == "l1"):
        return out
    scale = l1_scale(chunks_of([tv, keep]))
    return out if scale is None else out * scale.to(out.dtype)


def della_draw(tv: Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: bool = True,
               rescale_mode: DellaRescale = "l1") -> tuple[Tensor, Tensor]:
    """(keep mask, τ with the dropped entries +0) of one MAGPRUNE draw of whole rows of τ, the
    survivors divided by their keep probability with rescale 'inverse_probability' (not L1
    rescaled: see della_drop). Rows drawn one call after another from one generator draw what
    one call on all of them draws."""
    if rescale_mode not in ("l1", "inverse_probability"):
        raise ValueError(f"della: rescale_mode must be 'l1' or 'inverse_probability', got {rescale_mode!r}")
    p = della_keep_probability(tv, density, epsilon)
    keep = bernoulli_mask(p, generator)
    if rescale and rescale_mode == "inverse_probability":
        return keep, torch.where(keep, tv / p, torch.zeros((), dtype=tv.dtype, device=tv.device))
    return keep, tv * keep


def l1_scale(chunks: Iterable[Sequence[Tensor]], eps: float = 1e-7) -> Tensor | None:
    """|τ|_1 / |τ · keep|_1 in float64 (core.ties.rescale_l1's factor), from chunks of τ and of
    its keep mask in order (core.chunks: one chunk sums as the whole tensor does), or None when
    either norm is below eps (left unscaled). Each chunk is converted to float64 once: its
    |τ| summed, then masked in place and summed again (the same sums as of the two tensors)."""
    before, after = [], []
    for tv, keep in chunks:
        mags = tv.double().abs_()
        before.append(mags.sum())
        after.append(mags.mul_(keep).sum())  # |τ| · 1 or +0: |τ · keep| entry by entry
    if not before:
        return None
    b, a = combine_sums(before), combine_sums(after)
    if b < eps or a < eps:
        return None
    return b / a


def pack_bits(keep: Tensor) -> Tensor:
    """A boolean tensor as uint8 bytes, 8 entries a byte (flat order, the last byte padded)."""
    flat = keep.reshape(-1).view(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    out = groups[:, 0].clone()
    for j in range(1, 8):
        out.bitwise_or_(groups[:, j] << j)
    return out


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """The first n booleans of pack_bits' bytes (flat)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)[:n].bool()


__all__ = ["bernoulli_mask", "breadcrumbs", "breadcrumbs_mask", "della_draw", "della_drop", "della_generator",
           "della_keep_probability", "della_seed", "l1_scale", "magnitude_order", "pack_bits", "unpack_bits"]
