"""AdaMerging: learn the merge coefficients by minimising prediction entropy on unlabelled data.

    task-wise    θ = θ₀ + Σ_i λ_i τ_i                 λ: [T]
    layer-wise   θ_k = θ₀_k + Σ_i λ_{i,k} τ_{i,k}       λ: [T, K], one per (task, tensor k)
    objective    L = Σ_tasks mean_batch( −Σ_c p_c log(p_c + 1e-8) ),  p = softmax(logits)
                 or, with `objective: im` (information maximisation, Liang et al. 2020, SHOT),
                 L = Σ_tasks [ mean_batch H(p) − H(mean_batch p) ]: confident predictions that
                 stay diverse over the batch (entropy alone is minimised by one class for all)
                 or, with `objective: distill`, L = Σ_tasks mean_batch KL(q_t ‖ p): the merged
                 model's predictions against expert t's own on its unlabelled rows (q_t computed
                 once by the expert; no labels)

"Layer" means one state-dict tensor, as in the published code. The merge itself lives in
`core.merged_model` (merge_params); this module holds the objective and the coefficient helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Granularity = Literal["task", "layer"]
ENTROPY_EPS = 1e-8


def entropy(logits: Tensor, eps: float = ENTROPY_EPS) -> Tensor:
    """Mean over the batch of the Shannon entropy of softmax(logits): −Σ_c p log(p + eps).

    logits: [B, C] (any leading batch shape) -> scalar. Computed in the logits' dtype.
    """
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p + eps)).sum(-1).mean()


def marginal_entropy(logits: Tensor, eps: float = ENTROPY_EPS) -> Tensor:
    """Entropy of the batch's mean prediction: −Σ_c p̄_c log(p̄_c + eps), p̄ = mean_batch softmax(logits).

    logits: [B, C] (any leading batch shape) -> scalar. High when the batch is spread over the
    classes, 0 when every row predicts the same class."""
    p = torch.softmax(logits, dim=-1).reshape(-1, logits.shape[-1]).mean(0)
    return -(p * torch.log(p + eps)).sum()


def information_loss(logits: Tensor, eps: float = ENTROPY_EPS) -> Tensor:
    """The information-maximisation loss of one task's batch: mean entropy − marginal entropy
    (≥ −log C; a scalar)."""
    return entropy(logits, eps) - marginal_entropy(logits, eps)


def distillation_loss(logits: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """mean_batch KL(q ‖ p) = Σ_c q_c (log q_c − log p_c), p = softmax(logits), q = exp(teacher).

    logits, teacher_log_probs: [B, C] -> scalar ≥ 0 (0 where the predictions agree)."""
    q_log = teacher_log_probs.to(logits.dtype)
    return (q_log.exp() * (q_log - torch.log_softmax(logits, dim=-1))).sum(-1).mean()


Objective = Literal["entropy", "im", "distill"]
OBJECTIVES = {"entropy": entropy, "im": information_loss}  # of the logits alone; "distill" needs the teacher


def entropy_objective(task_logits: Sequence[Tensor], eps: float = ENTROPY_EPS) -> Tensor:
    """The AdaMerging loss: the per-task mean entropies, summed over tasks."""
    if len(task_logits) == 0:
        raise ValueError("need the logits of at least one task")
    total = entropy(task_logits[0], eps)
    for lg in task_logits[1:]:
        total = total + entropy(lg, eps)
    return total


def init_coefficients(n_tasks: int, n_tensors: int | None = None, value: float | Sequence[float] = 0.3,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Initial coefficients, a leaf that requires grad: [T] (task-wise) or [T, K] (layer-wise).

    `value` is one number for all tasks or one per task.
    """
    v = torch.as_tensor(value, dtype=dtype)
    if v.ndim == 0:
        v = v.expand(n_tasks)
    if v.shape != (n_tasks,):
        raise ValueError(f"need one initial value or {n_tasks}, got {tuple(v.shape)}")
    c = v.clone() if n_tensors is None else v[:, None].expand(n_tasks, n_tensors).clone()
    return c.requires_grad_()


def project_(coefs: Tensor, clamp: tuple[float, float] | None) -> Tensor:
    """Clamp coefficients in place into [lo, hi] after an optimiser step (projected gradient).

    The published wrappers clamp inside the merge instead; the merged model is the same, but
    a clamped-in-forward coefficient gets no gradient and cannot come back inside the box.
    """
    if clamp is not None:
        with torch.no_grad():
            coefs.clamp_(clamp[0], clamp[1])
    return coefs


def coefficient_table(coefs: Tensor, names: Sequence[str]) -> dict[str, list[float]]:
    """Layer-wise coefficients as {tensor name: [λ_1 .. λ_T]}; task-wise as {'*': [...]}."""
    c = coefs.detach().float()
    if c.ndim == 1:
        return {"*": [round(float(x), 6) for x in c]}
    if c.shape[1] != len(names):
        raise ValueError(f"{c.shape[1]} coefficient columns for {len(names)} tensors")
    return {n: [round(float(x), 6) for x in c[:, k]] for k, n in enumerate(names)}


__all__ = [
    "ENTROPY_EPS",
    "Granularity",
    "coefficient_table",
    "distillation_loss",
    "OBJECTIVES",
    "Objective",
    "entropy",
    "entropy_objective",
    "information_loss",
    "marginal_entropy",
    "init_coefficients",
    "project_",
]
