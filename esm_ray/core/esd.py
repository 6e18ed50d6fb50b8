"""ESD: essential subspace decomposition of a task update, from calibration statistics.

For a linear layer with task update ΔW (d_out, d_in) and fine-tuned inputs X (n, d_in), the
output shift is ΔO = X ΔWᵀ. Its principal directions (uncentred: no mean is removed) are the
eigenvectors of

    M = ΔO ᵀ ΔO = ΔW G ΔWᵀ,     G = Xᵀ X   (d_out, d_out)

with eigenvalues λ_i = eig_i(M) / (n − 1), sorted descending. Only G is needed, so the rows
can be streamed once and forgotten. The essential part of rank k is E_k E_kᵀ ΔW = E_k C_k with
C_k = E_kᵀ ΔW: the rank-k update with the smallest output-shift error on the calibration rows.

Two exact routes to the same eigenpairs (float64):
- `gram`:   eigh of M (d_out × d_out), for d_out ≤ d_in;
- `factor`: with G = L Lᵀ, M = B Bᵀ for B = ΔW L (d_out × d_in), so E and λ come from the thin
  SVD of B. For wide-output layers (d_out > d_in, e.g. up/gate projections) this avoids an
  eigendecomposition of size d_out: O(d_out d_in²) instead of O(d_out³). L is the Cholesky factor
  of G, or Q diag(√g) from eigh(G) when G is singular (fewer rows than d_in), or Xᵀ itself when
  the statistics hold the rows (`LayerStats.rows`): then B = ΔW Xᵀ is the output shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from esm_ray.core.rowblocks import TaskRows


@dataclass(frozen=True)
class ESD:
    """Rank-k essential factors of one task update.

    basis:       (d_out, k)  E_k, orthonormal columns
    coords:      (k, d_in)   C_k = E_kᵀ ΔW
    eigenvalues: (k,)        λ_1 ≥ … ≥ λ_k, eig(ΔW G ΔWᵀ) / (n − 1)
    """

    basis: Tensor
    coords: Tensor
    eigenvalues: Tensor

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.shape[0])

    def reconstruct(self) -> Tensor:
        """E_k C_k = E_k E_kᵀ ΔW, the essential part of the update. (d_out, d_in)"""
        return self.basis @ self.coords

    def to(self, dtype: torch.dtype) -> "ESD":
        return ESD(self.basis.to(dtype), self.coords.to(dtype), self.eigenvalues.to(dtype))


def esd_rank(d_out: int, n_tasks: int) -> int:
    """Default per-task rank k = max(1, floor(d_out / T)): T tasks together fill about d_out."""
    return max(1, d_out // max(n_tasks, 1))


def energy_rank(eigenvalues: Tensor, energy: float) -> int:
    """Smallest k whose top-k eigenvalues hold at least `energy` of the total (0 < energy ≤ 1)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    lam = eigenvalues.clamp_min(0)
    total = lam.sum()
    if total <= 0:
        return 0
    frac = torch.cumsum(lam, 0) / total
    hit = torch.nonzero(frac >= energy - 1e-12)
    return int(hit[0, 0]) + 1 if hit.numel() else int(lam.shape[0])


def numerical_rank(eigenvalues: Tensor, size: int, rtol: float | None = None) -> int:
    """Eigenvalues of a PSD matrix above rtol · λ_max (default rtol = size · eps(float64))."""
    if eigenvalues.numel() == 0:
        return 0
    top = float(eigenvalues.max())
    if top <= 0:
        return 0
    tol = (size * torch.finfo(torch.float64).eps if rtol is None else rtol) * top
    return int((eigenvalues > tol).sum())


def oas_shrinkage(gram: Tensor, n: int) -> float:
    """Oracle-approximating shrinkage intensity ρ ∈ [0, 1] of S = G / n toward (tr S / d) I.

    Chen, Wiesel, Eldar & Hero (2010), in the form scikit-learn uses (the paper's 2/p terms
    dropped), with p = d_in:

        ρ = min(1, (tr(S²) + tr(S)²) / ((n + 1) (tr(S²) − tr(S)² / p)))

    Label-free and closed-form: a few rows in a wide layer give ρ near 1 (the Gram says little
    about most directions), many rows give ρ near 0. Rows are treated as independent, which
    tokens of one sample are not, so ρ is, if anything, too small. gram: (d, d) = Σ x xᵀ.
    """
    if n <= 0:
        return 1.0
    s = gram.to(torch.float64) / n
    p = s.shape[0]
    tr = float(torch.diagonal(s).sum())
    tr2 = float((s * s).sum())
    den = (n + 1) * (tr2 - tr * tr / p)
    if den <= 0:
        return 1.0
    return float(min(1.0, (tr2 + tr * tr) / den))


def shrink_gram(gram: Tensor, beta: float) -> Tensor:
    """(1 − β) G + β (tr G / d) I: the Gram pulled toward isotropic inputs of the same energy.

    β = 0 keeps G; β = 1 weighs every input direction alike, so the ESD of ΔW becomes the top
    singular directions of ΔW itself (the TSV truncation). (d, d) float64.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {beta}")
    g = gram.to(torch.float64)
    if beta == 0.0:
        return g
    d = g.shape[0]
    iso = float(torch.diagonal(g).sum()) / d
    out = (1.0 - beta) * g
    out.diagonal().add_(beta * iso)
    return out


def _select_rank(eig: Tensor, d_out: int, d_in: int, n: int, k: int | None, n_tasks: int,
                 energy: float | None, rtol: float | None) -> int:
    target = esd_rank(d_out, n_tasks) if k is None else int(k)
    if target < 0:
        raise ValueError(f"rank k must be ≥ 0, got {k}")
    # Never beyond the numerical rank of ΔO: the rest of the spectrum is round-off, and the
    # directions that go with it are arbitrary (the reference code padded them with identity
    # columns that are not even orthogonal to the computed ones).
    cap = min(numerical_rank(eig, max(d_out, d_in), rtol), n, d_out)
    if energy is not None:
        cap = min(cap, energy_rank(eig[:cap], energy) if cap else 0)
    return min(target, cap)


def gram_factor(gram: Tensor, rows: int | None = None) -> Tensor:
    """L with L Lᵀ = G (float64): Cholesky when G is positive definite, else Q diag(√max(g, 0)),
    (d, d); when G comes from `rows` < d rows, only the r ≤ rows columns of the top eigenvalues
    that are above d · eps · g_max, (d, r).

    A Gram of n < d rows has rank at most n: its thin factor has at most n columns, and the
    columns it leaves out carry round-off, so ΔW L shrinks from d_out × d to d_out × r (on a
    2048-wide input with 1024 rows, half the SVD that follows; fewer rows, less still). The cap
    at n matters for Grams summed from float32 products (`gram_precision: mixed`): their
    round-off puts about half of the other d − n eigenvalues above the threshold (1149 columns
    instead of 256 on a 2048-wide input calibrated on 256 tokens)."""
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return chol
    w, q = torch.linalg.eigh(g)
    if rows is None or rows >= g.shape[0]:
        return q * w.clamp_min(0).sqrt()
    keep = w > (float(w.max()) * g.shape[0] * torch.finfo(torch.float64).eps if w.numel() else 0.0)
    keep[: g.shape[0] - rows] = False  # eigh sorts ascending: at most the top `rows` survive
    return q[:, keep] * w[keep].sqrt()


THIN_MIN_WIDTH = 256  # below this width both routes take microseconds; the gram route is kept


def auto_route(d_out: int, d_in: int, n: int, rows: bool = False) -> str:
    """The cheaper exact route for a (d_out, d_in) ΔW and a Gram of n rows: 'factor' when
    the rows themselves are at hand (`rows`: L = Xᵀ, so B = ΔW Xᵀ is the output shift itself,
    d_out × n with n < d_in, and no G or eigh of it is formed), when d_out > d_in (the SVD of
    the d_out × d_in ΔW L, O(d_out d_in²), against an eigh of size d_out), or when a square
    layer at least THIN_MIN_WIDTH wide has fewer rows than inputs (the thin factor has at most
    n columns, and layers reading the same input share it: one eigh of G for q, k and v
    instead of three of ΔW G ΔWᵀ); else 'gram'."""
    if rows:
        return "factor"
    return "factor" if d_out > d_in or (d_out == d_in >= THIN_MIN_WIDTH and n < d_in) else "gram"


def _gram_shape(gram: Tensor | None, factor: Tensor | None) -> tuple[int, ...] | None:
    """The shape of G, held or implied by its factor L (d_in, r); None when neither is given."""
    if gram is not None:
        return tuple(gram.shape)
    return None if factor is None else (int(factor.shape[0]),) * 2


def _eigenpairs(d: Tensor, gram: Tensor | None, route: str, n: int,
                factor: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of ΔW G ΔWᵀ, by the chosen route (G from n
    rows; with gram None, G = L Lᵀ for the given factor L)."""
    if route == "auto":
        route = auto_route(d.shape[0], d.shape[1], n, rows=gram is None)
    if gram is None:
        if factor is None:
            raise ValueError("ESD needs the Gram or a factor of it")
        if route == "gram":
            gram = factor @ factor.T
    if route == "gram":
        g = gram.to(torch.float64)
        m = d @ g @ d.T
        m = 0.5 * (m + m.T)
        eig, vec = torch.linalg.eigh(m)
        return eig.flip(0), vec.flip(1)
    if route == "factor":
        if factor is None:
            factor = gram_factor(gram, n)
        u, s, _ = torch.linalg.svd(d @ factor, full_matrices=False)
        return s.square(), u
    raise ValueError(f"route must be 'auto', 'gram' or 'factor', got {route!r}")


def esd_from_gram(delta: Tensor, gram: Tensor | None, n: int, k: int | None = None, n_tasks: int = 1,
                  energy: float | None = None, rtol: float | None = None,
                  route: Literal["auto", "gram", "factor"] = "auto", factor: Tensor | None = None) -> ESD:
    """ESD of ΔW from the uncentred Gram matrix of the layer's fine-tuned inputs.

    Args:
        delta:   (d_out, d_in) task update ΔW = W_t − W_0
        gram:    (d_in, d_in) G = Σ x xᵀ over the n calibration rows; None when `factor` is
                 given and G is not at hand (e.g. L = Xᵀ, the rows themselves)
        n:       number of rows behind `gram`
        k:       rank to keep; None = max(1, floor(d_out / n_tasks))
        n_tasks: T, used by the default rank
        energy:  optional energy threshold; k is further capped at the smallest rank whose
                 eigenvalues hold this fraction of the total
        rtol:    relative tolerance of the numerical-rank cap (default d · eps)
        route:   'gram' (eigh of ΔW G ΔWᵀ), 'factor' (SVD of ΔW L), or 'auto' (`auto_route`)
        factor:  L (d_in, r) with L Lᵀ = G: gram_factor(gram, n) when the caller has it (layers
                 reading the same input share it), or Xᵀ; used by the factor route
    Returns:
        ESD in float64 with k ≤ numerical rank of ΔO (k = 0 when ΔO vanishes).
    """
    g_shape = _gram_shape(gram, factor)
    if delta.ndim != 2 or g_shape != (delta.shape[1], delta.shape[1]):
        raise ValueError(f"shapes do not match: ΔW {tuple(delta.shape)}, G {g_shape}")
    d = delta.to(torch.float64)
    eig, vec = _eigenpairs(d, gram, route, n, factor)
    r = _select_rank(eig, d.shape[0], d.shape[1], n, k, n_tasks, energy, rtol)
    basis = vec[:, :r].contiguous()
    lam = eig[:r].clamp_min(0) / max(n - 1, 1)
    return ESD(basis, basis.T @ d, lam)


def esd_from_task_rows(tv: TaskRows, gram: Tensor | None, n: int, k: int | None = None, n_tasks: int = 1,
                       energy: float | None = None, rtol: float | None = None,
                       factor: Tensor | None = None) -> ESD:
    """`esd_from_gram` by the factor route on a task vector read in row blocks (core.rowblocks),
    never whole in float64: B = ΔW L and C_k = E_kᵀ ΔW are summed or stacked block by block,
    E_k and λ come from the thin SVD of B (d_out, r). The same ESD up to round-off.

    tv: ΔW (d_out, d_in) by rows; gram (d_in, d_in) from n rows, or None with a factor;
    factor: L with L Lᵀ = G (gram_factor(gram, n), or Xᵀ) when the caller has it.
    -> ESD in float64
    """
    d_out, d_in = tv.shape
    g_shape = _gram_shape(gram, factor)
    if g_shape != (d_in, d_in):
        raise ValueError(f"shapes do not match: ΔW {tv.shape}, G {g_shape}")
    if factor is None:
        factor = gram_factor(gram, n)
    u, s, _ = torch.linalg.svd(tv.times(factor), full_matrices=False)
    eig = s.square()
    r = _select_rank(eig, d_out, d_in, n, k, n_tasks, energy, rtol)
    basis = u[:, :r].contiguous()
    del u
    return ESD(basis, tv.rmatmul_t(basis), eig[:r].clamp_min(0) / max(n - 1, 1))


def esd_from_rows(delta: Tensor, x: Tensor, k: int | None = None, n_tasks: int = 1,
                  energy: float | None = None, rtol: float | None = None) -> ESD:
    """Reference route: thin SVD of the output shift ΔO = X ΔWᵀ (for tests and small layers).

    x: (n, d_in) calibration rows. Same rank rule as `esd_from_gram`.
    """
    d = delta.to(torch.float64)
    x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    n = int(x64.shape[0])
    _, s, vh = torch.linalg.svd(x64 @ d.T, full_matrices=False)
    eig = s.square()
    r = _select_rank(eig, d.shape[0], d.shape[1], n, k, n_tasks, energy, rtol)
    basis = vh[:r].T.contiguous()
    return ESD(basis, basis.T @ d, eig[:r] / max(n - 1, 1))
