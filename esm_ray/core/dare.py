"""DARE: drop each task-vector entry with probability 1 − density, rescale the survivors.

    dropped_i = dare_drop(τ_i, density_i, generator_i)          (keep ~ Bernoulli(density))
    DARE-linear: ΔW = λ · Σ_i w_i dropped_i  (/ Σ w_i when normalize)
    DARE-TIES:   ΔW = λ · sign_consensus_merge(dropped, w)   (TIES' sign election and disjoint mean)

The random stream of one tensor of one expert comes from `tensor_seed(seed, expert, name)`, a
stable hash, so a spec gives the same masks on any machine, in any executor and in any
order of tensors. Masks are drawn on the CPU with `torch.rand`, whose CPU kernel is serial,
so they do not depend on the thread count either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from esm_ray.core.arithmetic import check_group, task_arithmetic
from esm_ray.core.ties import Consensus, check_density, densities_for, rescale_l1, sign_consensus_merge

RescaleMode = Literal["inverse_density", "l1"]
_CHUNK = 1 << 22


def tensor_seed(seed: int, expert_index: int, name: str) -> int:
    """A 63-bit seed from (global seed, expert index, tensor name) by BLAKE2b (not hash())."""
    key = f"esm-ray/dare\x00{int(seed)}\x00{int(expert_index)}\x00{name}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def dare_generator(seed: int, expert_index: int, name: str) -> torch.Generator:
    """A CPU generator seeded with tensor_seed(seed, expert_index, name)."""
    return torch.Generator(device="cpu").manual_seed(tensor_seed(seed, expert_index, name))


def dare_mask(shape: Sequence[int], density: float, generator: torch.Generator) -> Tensor:
    """Boolean keep-mask, each entry True with probability `density` (drawn on the CPU)."""
    check_density(density)
    keep = torch.empty(tuple(shape), dtype=torch.bool).reshape(-1)
    for start in range(0, keep.numel(), _CHUNK):  # bounded scratch memory; same stream as one call
        n = min(_CHUNK, keep.numel() - start)
        keep[start:start + n] = torch.rand(n, generator=generator, dtype=torch.float32) < density
    return keep.reshape(tuple(shape))


def dare_drop(tv: Tensor, density: float, generator: torch.Generator, rescale: bool = True,
              rescale_mode: RescaleMode = "inverse_density") -> Tensor:
    """Randomly drop entries of a task vector, keeping each with probability `density`.

    rescale with 'inverse_density' divides the survivors by density (DARE; unbiased:
    E[result] = tv); with 'l1' it matches the L1 norm of `tv` instead (mergekit's `rescale`).
    density = 1 returns `tv` itself and draws nothing.
    tv: any shape S -> S
    """
    check_density(density)
    if rescale_mode not in ("inverse_density", "l1"):
        raise ValueError(f"rescale_mode must be 'inverse_density' or 'l1', got {rescale_mode!r}")
    if density >= 1.0:
        return tv
    keep = dare_mask(tv.shape, density, generator).to(tv.device)
    zero = torch.zeros((), dtype=tv.dtype, device=tv.device)
    if rescale and rescale_mode == "inverse_density":
        return torch.where(keep, tv / density, zero)
    dropped = torch.where(keep, tv, zero)
    return rescale_l1(tv, dropped) if rescale else dropped


def _drop_all(task_vectors: Sequence[Tensor], density: float | Sequence[float],
              generators: Sequence[torch.Generator], rescale: bool, rescale_mode: RescaleMode) -> list[Tensor]:
    if len(generators) != len(task_vectors):
        raise ValueError(f"got {len(generators)} generators for {len(task_vectors)} task vectors")
    ds = densities_for(density, len(task_vectors))
    return [dare_drop(tv, d, g, rescale, rescale_mode) for tv, d, g in zip(task_vectors, ds, generators)]


def dare_linear(task_vectors: Sequence[Tensor], weights: Sequence[float], density: float | Sequence[float],
                generators: Sequence[torch.Generator], lam: float = 1.0, normalize: bool = False,
                rescale: bool = True, rescale_mode: RescaleMode = "inverse_density") -> Tensor:
    """DARE then task arithmetic: λ · Σ w_i dare_drop(τ_i) (/ Σ w_i when normalize).

    task_vectors: T tensors of shape S, one generator each -> S
    """
    check_group(task_vectors, weights)
    dropped = _drop_all(task_vectors, density, generators, rescale, rescale_mode)
    return task_arithmetic(dropped, weights, lam, normalize)


def dare_ties(task_vectors: Sequence[Tensor], weights: Sequence[float], density: float | Sequence[float],
              generators: Sequence[torch.Generator], lam: float = 1.0, normalize: bool = False,
              rescale: bool = True, rescale_mode: RescaleMode = "inverse_density",
              method: Consensus = "sum") -> Tensor:
    """DARE then TIES sign consensus: sign_consensus_merge(dare_drop(τ_i), w).

    task_vectors: T tensors of shape S, one generator each -> S
    """
    check_group(task_vectors, weights)
    dropped = _drop_all(task_vectors, density, generators, rescale, rescale_mode)
    return sign_consensus_merge(dropped, weights, lam, normalize, method)


__all__ = ["RescaleMode", "dare_drop", "dare_generator", "dare_linear", "dare_mask", "dare_ties", "tensor_seed"]
