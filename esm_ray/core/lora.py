"""Merging LoRA task vectors without forming them: ΔW = s · B A is already low-rank.

Shapes: B (d_out, r), A (r, d_in). Every function here costs O((d_out + d_in) · R²) for a total
rank R, never O(d_out · d_in · R), and forms no d_out x d_in matrix except `dense()`:

- `concat`: task arithmetic / linear of T adapters is the LoRA of rank Σ r_i
  [w_1 s_1 B_1 … w_T s_T B_T] · [A_1; …; A_T] (the weights folded into the B blocks);
- `svd_of_product`: the thin SVD of B A from thin QRs B = Q_b R_b, Aᵀ = Q_a R_a and the SVD
  of the (R, R) core R_b R_aᵀ: B A = (Q_b U') S (Q_a V')ᵀ;
- `esd_from_factors`: ESD (core.esd) of ΔW = s B A with Gram G: ΔW G ΔWᵀ =
  Q (s² R A G Aᵀ Rᵀ) Qᵀ for B = Q R, so the eigenpairs come from an eigh of an (r, r) core;
- `truncate`: a low-rank update re-decomposed to a given rank or energy (for a written adapter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from esm_ray.core.esd import ESD, _select_rank, energy_rank


@dataclass(frozen=True)
class LoraFactors:
    """One expert's LoRA update of one weight: ΔW = scale · b a.

    b: (d_out, r), a: (r, d_in), scale: lora_alpha / r (or / sqrt(r) with rsLoRA)
    """

    b: Tensor
    a: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.b.shape[0]), int(self.a.shape[1])

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """scale · b a as a (d_out, d_in) tensor."""
        return (self.b.to(dtype) @ self.a.to(dtype)) * self.scale

    def float(self) -> Tensor:
        """The dense float32 update (what a part that is not factored would be)."""
        return self.dense(torch.float32)

    def lowrank(self, dtype: torch.dtype = torch.float64) -> "LowRank":
        """The same update as a LowRank (scale folded into b)."""
        return LowRank(self.b.to(dtype) * self.scale, self.a.to(dtype))


@dataclass(frozen=True)
class LowRank:
    """A merged update kept factored: ΔW = b a, b (d_out, R), a (R, d_in)."""

    b: Tensor
    a: Tensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """b a as a (d_out, d_in) tensor (computed in the factors' dtype, then cast)."""
        return (self.b @ self.a).to(dtype)

    def scaled(self, c: float) -> "LowRank":
        return LowRank(self.b * c, self.a)

    def norm(self) -> float:
        """||b a||_F from the (R, R) Grams: trace((bᵀb)(a aᵀ))."""
        if self.rank == 0:
            return 0.0
        return float(((self.b.T @ self.b) * (self.a @ self.a.T)).sum().clamp_min(0).sqrt())


def concat(factors: list[LoraFactors], weights: list[float], dtype: torch.dtype = torch.float64) -> LowRank:
    """Σ_i w_i s_i B_i A_i as one LowRank of rank Σ r_i (exact; experts of weight 0 left out)."""
    keep = [(f, w) for f, w in zip(factors, weights) if w != 0.0 and f.rank > 0]
    if not keep:
        d_out, d_in = factors[0].shape
        return LowRank(torch.zeros(d_out, 0, dtype=dtype), torch.zeros(0, d_in, dtype=dtype))
    b = torch.cat([f.b.to(dtype) * (w * f.scale) for f, w in keep], dim=1)
    a = torch.cat([f.a.to(dtype) for f, _ in keep], dim=0)
    return LowRank(b, a)


def svd_of_product(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of b a without forming it: U (d_out, R'), S (R',), Vh (R', d_in), R' = min(R, d_out, d_in).

    b (d_out, R), a (R, d_in). Singular values descending, as torch.linalg.svd gives them.
    """
    qb, rb = torch.linalg.qr(b)          # (d_out, m), (m, R)
    qa, ra = torch.linalg.qr(a.T)        # (d_in, n), (n, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def lora_svd(f: LoraFactors, k: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets of scale · B A (the TSV-M part of a LoRA expert):
    U (d_out, k'), S (k',), Vh (k', d_in), k' = min(k, r)."""
    u, s, vh = svd_of_product(f.b.to(dtype) * f.scale, f.a.to(dtype))
    k = max(0, min(k, s.shape[0]))
    return u[:, :k], s[:k], vh[:k]


ROWS_CHUNK = 512  # rows of X upcast to float64 at a time by esd_from_factors (6.3 MB at d_in 1536)


def esd_from_factors(f: LoraFactors, gram: Tensor | None, n: int, k: int | None = None, n_tasks: int = 1,
                     energy: float | None = None, rtol: float | None = None, rows: Tensor | None = None) -> ESD:
    """`core.esd.esd_from_gram` of ΔW = s B A, through the factors (float64).

    gram: (d_in, d_in) G over n rows; or None with rows: X (n, d_in), G = Xᵀ X never formed.
    With B = Q R (Q (d_out, r)), the output-shift matrix is ΔW G ΔWᵀ = Q K Qᵀ with
    K = s² R (A G Aᵀ) Rᵀ (r, r), where A G Aᵀ = Σ_c (A X_cᵀ)(A X_cᵀ)ᵀ from rows, over chunks X_c
    of ROWS_CHUNK rows upcast one at a time (r · d_in · n multiply-adds instead of d_in² · n);
    its eigenvectors are Q W for the eigenvectors W of K, and C = Eᵀ ΔW = s Wᵀ R A. Same rank
    rule as esd_from_gram (the spectrum beyond r is zero).
    """
    b = f.b.to(torch.float64)
    a = f.a.to(torch.float64)
    d_out, d_in = b.shape[0], a.shape[1]
    if gram is None:
        if rows is None or rows.ndim != 2 or rows.shape[1] != d_in:
            raise ValueError(f"shapes do not match: A {tuple(a.shape)}, "
                             f"rows {None if rows is None else tuple(rows.shape)}")
        aga = a.new_zeros(a.shape[0], a.shape[0])  # A G Aᵀ, (r, r), summed over row chunks
        for i in range(0, int(rows.shape[0]), ROWS_CHUNK):
            ax = a @ rows[i:i + ROWS_CHUNK].to(torch.float64).T
            aga += ax @ ax.T
    else:
        if gram.shape != (d_in, d_in):
            raise ValueError(f"shapes do not match: A {tuple(a.shape)}, G {tuple(gram.shape)}")
        aga = (a @ gram.to(torch.float64)) @ a.T
    q, r = torch.linalg.qr(b)
    core = (r @ aga @ r.T) * (f.scale ** 2)
    eig, vec = torch.linalg.eigh(0.5 * (core + core.T))
    eig, vec = eig.flip(0), vec.flip(1)
    keep = _select_rank(eig, d_out, d_in, n, k, n_tasks, energy, rtol)
    w = vec[:, :keep]
    basis = (q @ w).contiguous()
    coords = (w.T @ r @ a) * f.scale
    return ESD(basis, coords, eig[:keep].clamp_min(0) / max(n - 1, 1))


def truncate(update: LowRank, rank: int | None = None, energy: float | None = None,
             rtol: float | None = None) -> LowRank:
    """The best approximation of `update` of rank ≤ `rank` (and holding ≥ `energy` of Σ s²),
    from `svd_of_product`; numerically null directions (s ≤ rtol · s_max, default
    max(d_out, d_in) · eps) are always dropped. Returned as b = U diag(√S), a = diag(√S) Vh."""
    if update.rank == 0:
        return update
    u, s, vh = svd_of_product(update.b, update.a)
    if rtol is None:
        rtol = max(update.b.shape[0], update.a.shape[1]) * torch.finfo(s.dtype).eps
    keep = int((s > rtol * s.max()).sum()) if float(s.max()) > 0 else 0
    if rank is not None:
        keep = min(keep, rank)
    if energy is not None and keep:
        keep = min(keep, energy_rank(s[:keep].square(), energy))
    root = s[:keep].sqrt()
    return LowRank(u[:, :keep] * root, root[:, None] * vh[:keep])


def lowrank_of_dense(delta: Tensor, rtol: float | None = None) -> LowRank:
    """A dense update (d_out, d_in) as a LowRank of its numerical rank, from its thin SVD in
    float64 (for methods that give no factored update): b = U √S, a = √S Vh."""
    d = delta.to(torch.float64)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    if rtol is None:
        rtol = max(d.shape) * torch.finfo(torch.float32).eps
    keep = int((s > rtol * s.max()).sum()) if s.numel() and float(s.max()) > 0 else 0
    root = s[:keep].sqrt()
    return LowRank(u[:, :keep] * root, root[:, None] * vh[:keep])
