"""The merged parameters, differentiably in the coefficients and the mask.

    θ_k = θ₀_k + m̃_k ⊙ Σ_i λ_{i,k} τ_{i,k}

for every merged tensor k; λ is task-wise ([T], shared by all tensors) or layer-wise ([T, K]),
m̃ an optional rescaled mask (shared by the tasks, see `core.concrete`).

`merge_params` is the formula alone; it is what the search coordinator uses, since there the
forward pass happens elsewhere (on the expert sides) and only ∂L/∂θ comes back:
`torch.autograd.backward(θ, ∂L/∂θ)` then chains to λ and the logits. (The tests hold it
against a module evaluated at θ with `torch.func.functional_call`: tests/oracles.MergedModel.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def combine(coefs: Tensor, stacked: Tensor) -> Tensor:
    """Σ_i c_i τ_i for c: [T] and stacked: [T, *shape], without a [T, *shape] temporary."""
    if coefs.shape != stacked.shape[:1]:
        raise ValueError(f"{tuple(coefs.shape)} coefficients for {stacked.shape[0]} task vectors")
    return torch.tensordot(coefs.to(stacked.dtype), stacked, dims=([0], [0]))


def merge_params(base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor], coefs: Tensor,
                 masks: Mapping[str, Tensor] | None = None, names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The merged tensors θ_k = θ₀_k + m̃_k ⊙ Σ_i λ_{i,k} τ_{i,k} for every k in `task_vectors`.

    base:         {name: θ₀} (at least every name of task_vectors)
    task_vectors: {name: [T, *shape]} stacked task vectors
    coefs:        [T] task-wise, or [T, K] layer-wise with column k for names[k]
    masks:        {name: m̃} rescaled masks for the masked subset of names (others unmasked)
    names:        the column order of layer-wise coefs (default: task_vectors' order)
    Returns {name: θ} for the names of task_vectors; differentiable in coefs and masks.
    """
    order = list(task_vectors) if names is None else list(names)
    if coefs.ndim == 2 and coefs.shape[1] != len(order):
        raise ValueError(f"layer-wise coefficients have {coefs.shape[1]} columns for {len(order)} tensors")
    col = {n: k for k, n in enumerate(order)}
    out = {}
    for n, stacked in task_vectors.items():
        c = coefs if coefs.ndim == 1 else coefs[:, col[n]]
        delta = combine(c, stacked)
        if masks is not None and n in masks:
            delta = delta * masks[n]
        out[n] = base[n] + delta
    return out


__all__ = ["combine", "merge_params"]
