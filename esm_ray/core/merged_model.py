"""A module that runs with merged parameters, differentiably in the coefficients and the mask.

    θ_k = θ₀_k + m̃_k ⊙ Σ_i λ_{i,k} τ_{i,k}

for every merged tensor k; λ is task-wise ([T], shared by all tensors) or layer-wise ([T, K]),
m̃ an optional rescaled mask (shared by the tasks, see `core.concrete`). The forward pass is
`torch.func.functional_call` on the frozen module with the merged dictionary, so gradients of
any loss reach λ and the mask logits through θ.

`merge_params` is the formula alone; it is what the search coordinator uses, since there the
forward pass happens elsewhere (on the expert sides) and only ∂L/∂θ comes back:
`torch.autograd.backward(θ, ∂L/∂θ)` then chains to λ and the logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from esm_ray.core.adamerging import Granularity, init_coefficients, project_


def stack_task_vectors(task_vectors: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """[{name: τ_i}] for T tasks -> {name: [T, *shape]} (names of the first task, in its order)."""
    if not task_vectors:
        raise ValueError("need at least one task vector")
    names = list(task_vectors[0])
    for i, tv in enumerate(task_vectors[1:], 1):
        if set(tv) != set(names):
            raise ValueError(f"task vector {i} has different tensors than task vector 0")
    return {n: torch.stack([tv[n] for tv in task_vectors]) for n in names}


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


class MergedModel(nn.Module):
    """A frozen `module` evaluated at merged parameters with learnable coefficients.

    module:        any nn.Module whose parameter names include the merged tensors' names
    base:          {name: θ₀} for the merged tensors
    task_vectors:  {name: [T, *shape]} (see `stack_task_vectors`)
    granularity:   'task' (λ: [T]) or 'layer' (λ: [T, K], one per merged tensor)
    init:          initial λ (one value or one per task); 0.3 in AdaMerging
    clamp:         (lo, hi) applied by `project()` after each optimiser step, or None
    learn_coefficients: False keeps λ fixed (Concrete Task Arithmetic)

    `forward(*args, mask=m̃, **kwargs)` merges and calls the module; `mask` maps tensor names to
    rescaled masks (e.g. `ConcreteMask.sample(...)`), for a subset of the merged tensors.
    """

    def __init__(self, module: nn.Module, base: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor],
                 granularity: Granularity = "task", init: float | Sequence[float] = 0.3,
                 clamp: tuple[float, float] | None = None, learn_coefficients: bool = True) -> None:
        super().__init__()
        own = dict(module.named_parameters())
        unknown = [n for n in task_vectors if n not in own]
        if unknown:
            raise ValueError(f"merged tensor {unknown[0]!r} is not a parameter of the module")
        for p in module.parameters():
            p.requires_grad_(False)
        self.module = module
        self.names = list(task_vectors)
        self.base = {n: base[n].detach() for n in self.names}
        self.task_vectors = {n: t.detach() for n, t in task_vectors.items()}
        first = next(iter(self.task_vectors.values()))
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
        self.granularity = granularity
        c = init_coefficients(first.shape[0], len(self.names) if granularity == "layer" else None, init,
                              dtype=first.dtype)
        self.coefficients = nn.Parameter(c.detach(), requires_grad=learn_coefficients)
        self.clamp = clamp

    @property
    def n_tasks(self) -> int:
        return int(self.coefficients.shape[0])

    def merged_params(self, mask: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        return merge_params(self.base, self.task_vectors, self.coefficients, mask, self.names)

    def project(self) -> None:
        """Apply the clamp to the coefficients (call after each optimiser step)."""
        project_(self.coefficients, self.clamp)

    def forward(self, *args: Any, mask: Mapping[str, Tensor] | None = None, **kwargs: Any) -> Any:
        return functional_call(self.module, self.merged_params(mask), args, kwargs)


__all__ = ["MergedModel", "combine", "merge_params", "stack_task_vectors"]
