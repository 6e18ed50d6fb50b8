"""Concrete subspace masks: one shared, learned keep-mask over every entry of the task vectors.

    logits ℓ            one real number per scalar parameter, shared by all tasks, init 0
    relaxed sample      m = σ((ℓ + log u − log(1 − u)) / λ),  u ~ U(0, 1),  λ = 0.5
    rescaling           m̃ = m / mean(m)            (mean over one tensor)
    masked merge        θ = θ₀ + Σ_i w_i (τ_i ⊙ m̃) = θ₀ + m̃ ⊙ Σ_i w_i τ_i

The sample is reparameterised: gradients reach ℓ through m. The uniform noise of one tensor
at one step comes from `mask_seed(seed, step, name)`, a stable hash, so a search draws the
same masks in any executor and in any tensor order.

The final mask (`final_mask`) is chosen by a rule:
- 'expected'  m = σ(ℓ), the keep probabilities (deterministic). The merged model is, to first
              order, the mean of the merges over mask draws, i.e. what the objective was
              minimised for. A tensor the search did not touch (ℓ = 0) gets m̃ = 1 exactly and
              merges as task arithmetic.
- 'hard'      m = 1[ℓ ≥ 0], the mode of each Bernoulli(σ(ℓ)) (deterministic, binary). Fragile
              after short searches: m̃ = m / mean(m) couples all entries of a tensor, so entries
              without a gradient of their own (unseen vocabulary rows, unused positions) still get
              a small common gradient through mean(m), which Adam turns into full-size steps; their
              logits drift together to ±lr·steps and the threshold drops (or keeps) them en masse,
              and the rescaling then inflates the survivors.
- 'sample'    one more seeded relaxed sample at λ (the published code's default, made
              reproducible); 'bernoulli' a seeded Bernoulli(σ(ℓ)) draw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

MaskRule = Literal["hard", "expected", "sample", "bernoulli"]
MASK_RULES: tuple[str, ...] = ("hard", "expected", "sample", "bernoulli")
_EPS = 1e-6


def mask_seed(seed: int, step: int, name: str) -> int:
    """A 63-bit seed for the noise of tensor `name` at search step `step` (BLAKE2b, not hash())."""
    key = f"esm-ray/concrete\x00{int(seed)}\x00{int(step)}\x00{name}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def logistic_noise(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """log u − log(1 − u) with u ~ U(ε, 1 − ε), drawn on the CPU from `generator`."""
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float32).clamp_(_EPS, 1.0 - _EPS)
    return u.div_(1.0 - u).log_().to(dtype)  # log(u / (1 − u)), in place: masks are model-sized


def relaxed_bernoulli(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """A reparameterised binary-Concrete sample in (0, 1) of the shape of `logits`.

    Same distribution as torch.distributions.RelaxedBernoulli(temperature, logits=logits).rsample().
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    noise = logistic_noise(logits.shape, generator, logits.dtype).to(logits.device)
    return torch.sigmoid((logits + noise) / temperature)


def sample_mask(logits: Mapping[str, Tensor], temperature: float, seed: int, step: int) -> dict[str, Tensor]:
    """A relaxed sample of every tensor's mask for one search step (differentiable in the logits)."""
    return {n: relaxed_bernoulli(l, temperature, torch.Generator().manual_seed(mask_seed(seed, step, n)))
            for n, l in logits.items()}


def normalize_mask(m: Tensor) -> Tensor:
    """m / mean(m) over the whole tensor, so the masked tensor keeps its expected magnitude.

    An all-zero mask stays all zero (the tensor's task vectors are dropped entirely).
    """
    mean = m.mean()
    if float(mean.detach()) == 0.0:
        return torch.zeros_like(m)
    return m / mean


def normalize_masks(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: normalize_mask(m) for n, m in masks.items()}


def final_mask(logits: Mapping[str, Tensor], rule: MaskRule = "expected", temperature: float = 0.5,
               seed: int = 0) -> dict[str, Tensor]:
    """The deterministic (or seeded) mask the merged model is built with, before rescaling.

    rule 'expected': σ(ℓ); 'hard': 1[ℓ ≥ 0]; 'sample': a relaxed sample at `temperature`
    seeded by (seed, step −1); 'bernoulli': a seeded Bernoulli(σ(ℓ)) draw. float32, no grad.
    """
    out = {}
    for n, l in logits.items():
        l = l.detach().float()
        if rule == "hard":
            out[n] = (l >= 0).float()
        elif rule == "expected":
            out[n] = torch.sigmoid(l)
        elif rule == "sample":
            out[n] = relaxed_bernoulli(l, temperature, torch.Generator().manual_seed(mask_seed(seed, -1, n)))
        elif rule == "bernoulli":
            g = torch.Generator().manual_seed(mask_seed(seed, -2, n))
            out[n] = (torch.rand(l.shape, generator=g) < torch.sigmoid(l)).float()
        else:
            raise ValueError(f"unknown mask rule {rule!r} (allowed: {', '.join(MASK_RULES)})")
    return out


def masked_merge(base: Tensor, task_vectors: Sequence[Tensor], weights: Sequence[float] | Tensor,
                 mask: Tensor | None) -> Tensor:
    """θ = θ₀ + Σ_i w_i (τ_i ⊙ m̃) for one tensor; `mask` is already rescaled (or None: all ones).

    Computed as θ₀ + m̃ ⊙ Σ_i w_i τ_i (the mask is shared), summing tasks in the order given.
    Differentiable in `weights` (a tensor) and `mask`.
    """
    if len(task_vectors) != len(weights):
        raise ValueError(f"got {len(weights)} weights for {len(task_vectors)} task vectors")
    delta = torch.zeros_like(base)
    for t, w in zip(task_vectors, weights):
        delta = delta + t * w
    if mask is not None:
        delta = delta * mask
    return base + delta


def density(mask: Tensor) -> float:
    """Mean of an unrescaled mask: the fraction kept for a binary mask, the mean keep probability else."""
    return float(mask.float().mean())


def densities(masks: Mapping[str, Tensor]) -> dict[str, float]:
    return {n: density(m) for n, m in masks.items()}


class ConcreteMask(torch.nn.Module):
    """The mask logits of a set of tensors as one module (for optimisers and state dicts).

    Parameters are stored in a ParameterList in `names` order (state-dict keys contain dots,
    which ParameterDict does not allow).
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], init_logit: float = 0.0, temperature: float = 0.5,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.names = list(shapes)
        self.temperature = float(temperature)
        self.logits = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.full(tuple(shapes[n]), float(init_logit), dtype=dtype)) for n in self.names])

    def logit_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.logits))

    def sample(self, seed: int, step: int) -> dict[str, Tensor]:
        """Rescaled relaxed sample m̃ for one step, differentiable in the logits."""
        return normalize_masks(sample_mask(self.logit_dict(), self.temperature, seed, step))

    def final(self, rule: MaskRule = "expected", seed: int = 0) -> dict[str, Tensor]:
        """The final mask before rescaling (see `final_mask`)."""
        return final_mask(self.logit_dict(), rule, self.temperature, seed)


__all__ = [
    "MASK_RULES",
    "ConcreteMask",
    "MaskRule",
    "density",
    "densities",
    "final_mask",
    "logistic_noise",
    "mask_seed",
    "masked_merge",
    "normalize_mask",
    "normalize_masks",
    "relaxed_bernoulli",
    "sample_mask",
]
