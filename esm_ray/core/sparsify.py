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
from typing import Literal

import torch
from torch import Tensor

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
    ranks = torch.argsort(torch.argsort(mags, dim=-1, stable=True), dim=-1).float() + 1
    lo = ranks.min(dim=-1, keepdim=True).values
    hi = ranks.max(dim=-1, keepdim=True).values
    r = torch.nan_to_num((ranks - lo) / (hi - lo), nan=0.0).clamp(0, 1)  # a 1-entry row: r = 0
    return ((density - epsilon) + r * 2 * epsilon).reshape(tv.shape)


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
        keep[s:s + n] = torch.rand(n, generator=generator, dtype=torch.float32) < flat[s:s + n]
    return keep.reshape(prob.shape).to(prob.device)


def della_drop(tv: Tensor, density: float, epsilon: float, generator: torch.Generator,
               rescale: bool = True, rescale_mode: DellaRescale = "l1") -> Tensor:
    """One MAGPRUNE draw: keep entry j with probability p_j (della_keep_probability), else +0.

    rescale 'l1' scales the survivors to τ's L1 norm (mergekit's `rescale`); 'inverse_probability'
    divides each survivor by its p_j (the DELLA paper; E[result] = τ). density ≥ 1 returns τ
    and draws nothing. tv: shape S -> S.
    """
    if density >= 1:
        return tv
    if rescale_mode not in ("l1", "inverse_probability"):
        raise ValueError(f"della: rescale_mode must be 'l1' or 'inverse_probability', got {rescale_mode!r}")
    p = della_keep_probability(tv, density, epsilon)
    keep = bernoulli_mask(p, generator)
    if rescale and rescale_mode == "inverse_probability":
        return torch.where(keep, tv / p, torch.zeros((), dtype=tv.dtype, device=tv.device))
    out = tv * keep
    return rescale_l1(tv, out) if rescale else out


__all__ = ["bernoulli_mask", "breadcrumbs", "breadcrumbs_mask", "della_drop", "della_generator",
           "della_keep_probability", "della_seed"]
