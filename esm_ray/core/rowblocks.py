"""A task vector read in row blocks: τ = W_t − W_0 formed in float64 a block of rows at a time.

In float64 a (p, q) task vector takes twice its float32 weights: 524 MB for a 32000 × 2048
vocabulary matrix, beside the base and the expert it comes from. The decompositions of a tall
matrix need only products with τ (τᵀτ, τ W, Eᵀ τ, ||τ||²), and each of them sums or stacks
over row blocks, so τ is never whole: each block is formed exactly (float64 subtraction of the
float32 rows) and dropped after use.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

# A 2-D task vector above this size in float64 is decomposed from row blocks (the methods'
# policy: below it the whole float64 matrix is small beside the worker, and the dense routes
# keep their bytes); each block holds about BLOCK_BYTES.
ROWS_MIN_BYTES = 256 << 20
BLOCK_BYTES = 16 << 20


def row_blocks(shape: tuple[int, ...], block_bytes: int, parts: int = 1) -> list[tuple[int, int]] | None:
    """[start, stop) row ranges covering a tensor of `shape`, or None when it is at most
    `block_bytes` in float32 or has fewer than two rows (taken whole).

    `parts`: how many such blocks (e.g. the experts' parts of one block) are held at once; the
    `parts` blocks together are then about `block_bytes` (float32), and at least one row each."""
    numel = math.prod(shape)
    if not shape or shape[0] < 2 or numel * 4 <= block_bytes:
        return None
    step = max(1, block_bytes // (4 * max(1, parts) * max(1, numel // shape[0])))
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def in_row_blocks(t: Tensor) -> bool:
    """Whether a 2-D tensor's float64 task vector is over ROWS_MIN_BYTES (decompose it by rows)."""
    return t.ndim == 2 and 8 * t.numel() > ROWS_MIN_BYTES


class _RowBlocks:
    """Products of a (p, q) matrix M that subclasses hand out as float64 row blocks."""

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def blocks(self) -> Iterator[tuple[int, Tensor]]:
        """(first row, M[first row : first row + rows]) in float64, in order."""
        raise NotImplementedError

    def gram(self) -> Tensor:
        """Mᵀ M = Σ_b M_bᵀ M_b. (q, q) float64"""
        q = self.shape[1]
        out = torch.zeros(q, q, dtype=torch.float64, device=self.device)
        for _, block in self.blocks():
            out.addmm_(block.T, block)
        return out

    def times(self, w: Tensor, scale: float | Tensor = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
        """scale · M W, formed a row block at a time in float64 and stored in `dtype`.
        w: (q, r) -> (p, r)"""
        w = w.to(torch.float64)
        out = torch.empty(self.shape[0], w.shape[1], dtype=dtype, device=self.device)
        for i, block in self.blocks():
            prod = block @ w
            prod *= scale  # exact when scale is 1
            out[i:i + block.shape[0]] = prod
        return out


@dataclass(frozen=True)
class TaskRows(_RowBlocks):
    """τ = expert − base, (p, q), in float64 row blocks of `rows` rows.

    expert, base: (p, q) tensors of any floating dtype (not copied); rows ≥ 1.
    """

    expert: Tensor
    base: Tensor
    rows: int

    def __post_init__(self) -> None:
        if self.expert.ndim != 2 or self.expert.shape != self.base.shape:
            raise ValueError(f"shapes do not match: expert {tuple(self.expert.shape)}, base {tuple(self.base.shape)}")
        if self.rows < 1:
            raise ValueError(f"rows per block must be ≥ 1, got {self.rows}")

    @classmethod
    def of(cls, expert: Tensor, base: Tensor, block_bytes: int = BLOCK_BYTES) -> TaskRows:
        """τ = expert − base in blocks of about `block_bytes` of float64 (at least one row)."""
        return cls(expert, base, max(1, block_bytes // (8 * max(int(expert.shape[-1]), 1))))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.expert.shape[0]), int(self.expert.shape[1])

    @property
    def device(self) -> torch.device:
        return self.expert.device

    def blocks(self) -> Iterator[tuple[int, Tensor]]:
        """(first row, τ[first row : first row + rows]) in float64, in order."""
        for i in range(0, self.shape[0], self.rows):
            block = self.expert[i:i + self.rows].to(torch.float64, copy=True)
            block -= self.base[i:i + self.rows]
            yield i, block

    def rmatmul_t(self, e: Tensor) -> Tensor:
        """Eᵀ τ = Σ_b E_bᵀ τ_b. e: (p, r) -> (r, q) float64"""
        e = e.to(torch.float64)
        out = torch.zeros(e.shape[1], self.shape[1], dtype=torch.float64, device=self.expert.device)
        for i, block in self.blocks():
            out.addmm_(e[i:i + block.shape[0]].T, block)
        return out

    def sq_norm(self) -> float:
        """||τ||_F², summed over the blocks in float64."""
        return float(sum(float(block.square().sum()) for _, block in self.blocks()))

    def dense(self) -> Tensor:
        """τ whole, float64 (p, q): for the routes that need it."""
        out = self.expert.to(torch.float64, copy=True)
        out -= self.base
        return out


@dataclass(frozen=True)
class StackedRows(_RowBlocks):
    """U = [U_1 diag(c_1) … U_T diag(c_T)] (p, Σk) kept as its parts and read in float64 row
    blocks: the stacked factor of a tall fusion is never whole.

    parts: (p, k_t) tensors of any floating dtype; scales: None or, per part, (k_t,) column
    factors; rows ≥ 1.
    """

    parts: list[Tensor]
    scales: list[Tensor] | None
    rows: int

    @classmethod
    def of(cls, parts: list[Tensor], scales: list[Tensor] | None = None,
           block_bytes: int = BLOCK_BYTES) -> StackedRows:
        width = max(sum(int(u.shape[1]) for u in parts), 1)
        return cls(list(parts), scales, max(1, block_bytes // (8 * width)))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.parts[0].shape[0]), sum(int(u.shape[1]) for u in self.parts)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def blocks(self) -> Iterator[tuple[int, Tensor]]:
        """(first row, U[first row : first row + rows]) in float64, in order."""
        for i in range(0, self.shape[0], self.rows):
            cols = [u[i:i + self.rows].to(torch.float64) for u in self.parts]
            if self.scales is not None:
                cols = [c * s.to(torch.float64) for c, s in zip(cols, self.scales)]
            yield i, torch.cat(cols, dim=1)
