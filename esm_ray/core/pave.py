"""PAVE: purify a fine-tuned weight in the subspace its task's inputs use.

With C = Xᵀ X / n the uncentred second moment of the layer's fine-tuned inputs and
C_reg = C + ε I, the purified weight is

    W̃_t = SVD_r(W_t C_reg) · C_reg⁻¹,

the context-oriented SVD of the *fine-tuned* weight truncated to rank r, mapped back. The
purified task vector is W̃_t − W_0. The per-model rank ratio comes from a spectral allocation
across models, layer by layer (`allocate_ranks`), collapsed to one ratio per model.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

DampingMode = Literal["relative", "absolute"]
DEFAULT_INIT: dict[str, float] = {"relative": 0.01, "absolute": 0.1}


@dataclass(frozen=True)
class Damped:
    """A damped second moment C_reg = C + ε I with its Cholesky factor.

    eps:      the final ε added to the diagonal
    delta:    ε in the units of the mode (relative: ε / mean(diag C); absolute: ε)
    residual: ||C_reg⁻¹ C_reg − I||_F of the accepted ε
    steps:    number of doublings taken
    """

    c_reg: Tensor
    chol: Tensor
    eps: float
    delta: float
    residual: float
    steps: int


def inverse_residual(c_reg: Tensor, chol: Tensor | None = None) -> float:
    """||C_reg⁻¹ C_reg − I||_F, with C_reg⁻¹ C_reg computed by a solve (no inverse).

    With `chol` (the Cholesky factor of C_reg) the solve goes through it, i.e. through the very
    factor `purify_weight` uses; without it, an LU solve.
    """
    eye = torch.eye(c_reg.shape[0], dtype=c_reg.dtype, device=c_reg.device)
    try:
        x = torch.cholesky_solve(c_reg, chol) if chol is not None else torch.linalg.solve(c_reg, c_reg)
    except RuntimeError:  # exactly singular
        return math.inf
    r = float(torch.linalg.matrix_norm(x - eye))
    return r if math.isfinite(r) else math.inf


def damp(c: Tensor, mode: DampingMode = "relative", init: float | None = None, tol: float = 0.05,
         max_steps: int = 64, check: bool = True) -> Damped:
    """Add ε I to C, doubling ε until C_reg is positive definite and ||C_reg⁻¹ C_reg − I||_F < tol.

    relative: ε = δ · mean(diag C), δ starting at `init` (default 0.01); scale-free.
    absolute: ε starting at `init` (default 0.1), as in the reference code.
    check=False accepts the first positive-definite ε without the residual (use it to rebuild a
    C_reg whose `init` is a δ already accepted). Works in float64.
    """
    if mode not in DEFAULT_INIT:
        raise ValueError(f"damping mode must be 'relative' or 'absolute', got {mode!r}")
    c64 = c.to(torch.float64)
    c64 = 0.5 * (c64 + c64.T)
    delta = DEFAULT_INIT[mode] if init is None else float(init)
    if delta <= 0:
        raise ValueError(f"damping init must be > 0, got {delta}")
    unit = 1.0
    if mode == "relative":
        unit = float(torch.diagonal(c64).mean())
        if not unit > 0:  # C = 0: nothing was seen; fall back to absolute units
            unit = 1.0
    eye = torch.eye(c64.shape[0], dtype=torch.float64, device=c64.device)
    for step in range(max_steps + 1):
        eps = delta * unit
        c_reg = c64 + eps * eye
        chol, info = torch.linalg.cholesky_ex(c_reg)
        if int(info) == 0:
            res = inverse_residual(c_reg, chol) if check else math.nan
            if not check or res < tol:
                return Damped(c_reg, chol, eps, delta, res, step)
        delta *= 2.0
    raise ValueError(f"damping did not converge after {max_steps} doublings (last ε = {eps:.3g})")


def context_svd(weight: Tensor, c_reg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of W C_reg in float64: U (d_out, R), S (R,), Vh (R, d_in)."""
    return torch.linalg.svd(weight.to(torch.float64) @ c_reg.to(torch.float64), full_matrices=False)


def context_spectrum(weight: Tensor, c_reg: Tensor) -> Tensor:
    """Singular values of W C_reg divided by the largest (ŝ_1 = 1), descending. (R,) float64"""
    s = torch.linalg.svdvals(weight.to(torch.float64) @ c_reg.to(torch.float64))
    return s / s[0] if s.numel() and s[0] > 0 else s


def pave_rank(shape: tuple[int, int], ratio: float) -> int:
    """Kept rank r = max(1, round(min(d_out, d_in) · q))."""
    return max(1, min(min(shape), _round(min(shape) * ratio)))


def purify_weight(weight: Tensor, damped: Damped, rank: int) -> Tensor:
    """W̃ = (U_r S_r V_rᵀ) C_reg⁻¹, the right division done by a Cholesky solve. float64 (d_out, d_in)"""
    u, s, vh = context_svd(weight, damped.c_reg)
    r = max(0, min(rank, s.shape[0]))
    low = (u[:, :r] * s[:r]) @ vh[:r]
    # X C = B with C symmetric  <=>  C Xᵀ = Bᵀ
    return torch.cholesky_solve(low.T.contiguous(), damped.chol).T


def _round(x: float) -> int:
    """Round half up (not to even), so the floors and ranks do not depend on parity."""
    return int(math.floor(x + 0.5))


def rank_floor(size: int, rho: float) -> int:
    """f = R − round(1.5 · (R − round(ρ R))), at least 1: no model drops 1.5× the average."""
    return max(1, size - _round(1.5 * (size - _round(rho * size))))


def allocate_ranks(spectra: list[Tensor], rho: float) -> list[int]:
    """Spectral rank allocation of one layer across M models.

    spectra: per model, the normalised singular values ŝ (length R, descending) of W_m C_m,reg.
    Greedy: while the kept fraction Σ r_m / (M R) is ≥ ρ, drop the component with the smallest
    normalised singular value among the models still above the floor. Stops just below ρ.
    Returns r_m per model.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if not spectra:
        return []
    size = int(spectra[0].shape[0])
    if any(int(s.shape[0]) != size for s in spectra):
        raise ValueError("all models of a layer must have spectra of the same length")
    ranks = [size] * len(spectra)
    if rho >= 1.0 or size == 0:
        return ranks
    floor = rank_floor(size, rho)
    vals = [s.to(torch.float64).tolist() for s in spectra]
    heap = [(vals[m][size - 1], m) for m in range(len(spectra)) if size > floor]
    heapq.heapify(heap)
    total, budget = size * len(spectra), size * len(spectra)
    while heap and total / budget >= rho:
        _, m = heapq.heappop(heap)
        ranks[m] -= 1
        total -= 1
        if ranks[m] > floor:
            heapq.heappush(heap, (vals[m][ranks[m] - 1], m))
    return ranks


def collapse_ratios(ranks: list[list[int]], sizes: list[int]) -> list[float]:
    """One ratio per model, q_m = Σ_l r_{m,l} / Σ_l R_l, from per-layer ranks[l][m]."""
    if not ranks:
        return []
    total = sum(sizes)
    n_models = len(ranks[0])
    return [sum(layer[m] for layer in ranks) / total for m in range(n_models)]
