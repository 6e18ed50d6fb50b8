"""Readable reference implementations that the tests hold production code against.

Two kinds, one copy of each:
- numpy, element by element (ref_trim, ref_consensus, ref_tsvm): independent of torch and of
  the production code, written as the papers state them;
- torch, written as the formulas read (elect_sign, disjoint_merge, ties; MergedModel): TIES as
  the paper's composition trim -> elect -> disjoint merge, which production computes in one pass
  (`core.ties.sign_consensus_merge`, tested equal bit for bit), and a module evaluated at the
  merged parameters θ(λ, m̃) = θ₀ + m̃ ⊙ Σ_i λ_i τ_i, which the search runs split across workers
  (`core.merged_model.merge_params` on the coordinator).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from esm_ray.core.adamerging import Granularity, init_coefficients, project_
from esm_ray.core.arithmetic import check_group, work_dtype
from esm_ray.core.merged_model import merge_params
from esm_ray.core.ties import Consensus, densities_for, magnitude_trim, rescale_l1

# ---- numpy, element by element --------------------------------------------------------------


def ref_trim(v: np.ndarray, density: float) -> np.ndarray:
    """Keep the k = max(1, int(density · n)) largest |entries| (ties by position), zero the rest."""
    flat = v.reshape(-1)
    k = flat.size if density >= 1 else max(1, int(density * flat.size))
    order = np.argsort(-np.abs(flat), kind="stable")  # largest first, ties by position
    out = np.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.reshape(v.shape)


def ref_consensus(tvs: list[np.ndarray], weights: list[float], normalize: bool, method: str = "sum") -> np.ndarray:
    """TIES' sign election and disjoint (weighted) mean, one entry at a time, in float64."""
    shape = tvs[0].shape
    flats = [t.reshape(-1).astype(np.float64) for t in tvs]
    out = np.zeros(flats[0].size)
    for j in range(out.size):
        vals = [w * f[j] for f, w in zip(flats, weights)]
        score = sum(vals) if method == "sum" else sum(np.sign(v) for v in vals)
        elected = 1.0 if score >= 0 else -1.0
        num = sum(v for v in vals if np.sign(v) == elected)
        den = sum(w for v, w in zip(vals, weights) if np.sign(v) == elected)
        out[j] = num / (den if den != 0 else 1.0) if normalize else num
    return out.reshape(shape)


def np_polar(m: np.ndarray) -> np.ndarray:
    """The orthogonal polar factor U Vᵀ of m = U S Vᵀ."""
    a, _, bt = np.linalg.svd(m, full_matrices=False)
    return a @ bt


def ref_tsvm(tvs: list[np.ndarray], k: int, weights: list[float]) -> np.ndarray:
    """TSV-Merge: the top-k singular triplets of each w_i τ_i, bases decorrelated by polar factors."""
    us, ss, vs = [], [], []
    for t, w in zip(tvs, weights):
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        us.append(u[:, :k])
        ss.append(w * s[:k])
        vs.append(vt[:k].T)
    return np_polar(np.concatenate(us, 1)) @ np.diag(np.concatenate(ss)) @ np_polar(np.concatenate(vs, 1)).T


# ---- torch, as the formulas read ------------------------------------------------------------


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


def ties(task_vectors: Sequence[Tensor], weights: Sequence[float], density: float | Sequence[float],
         lam: float = 1.0, normalize: bool = True, method: Consensus = "sum", rescale: bool = False) -> Tensor:
    """TIES as the paper composes it: trimmed_i = magnitude_trim(τ_i, density_i) (L1-rescaled if
    `rescale`), sign = elect_sign([w_i · trimmed_i]), ΔW = λ · disjoint_merge(trimmed, w, sign)."""
    check_group(task_vectors, weights)
    trimmed = []
    for tv, d in zip(task_vectors, densities_for(density, len(task_vectors))):
        t = magnitude_trim(tv, d)
        trimmed.append(rescale_l1(tv, t) if rescale and t is not tv else t)
    dtype = work_dtype(trimmed)
    sign = elect_sign([t.to(dtype) * float(w) for t, w in zip(trimmed, weights)], method)
    out = disjoint_merge(trimmed, weights, sign, normalize)
    return out * lam if lam != 1.0 else out


def stack_task_vectors(task_vectors: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """[{name: τ_i}] for T tasks -> {name: [T, *shape]} (names of the first task, in its order)."""
    if not task_vectors:
        raise ValueError("need at least one task vector")
    names = list(task_vectors[0])
    for i, tv in enumerate(task_vectors[1:], 1):
        if set(tv) != set(names):
            raise ValueError(f"task vector {i} has different tensors than task vector 0")
    return {n: torch.stack([tv[n] for tv in task_vectors]) for n in names}


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
