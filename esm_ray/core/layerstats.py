"""Calibration statistics of one linear layer's inputs."""

from __future__ import annotations

import torch
from torch import Tensor


class LayerStats:
    """Uncentred input statistics of one layer over n token rows (padding excluded).

    n:     number of rows (tokens) seen
    s1:    (d_in,)        float64, sum of input rows
    gram:  (d_in, d_in)   float64, G = XᵀX
    rows:  (n, d_in)      float32, the rows X themselves, or None

    The Gram is held either as G or as X. Calibration keeps X for a wide input that saw fewer
    than 2 · d_in rows (`stats.hooks.ROWS_MIN_WIDTH`): n · d_in float32 values in fewer bytes
    than G's d_in² float64, and none of G's d_in² multiply-adds per row. Then `gram` is formed from X in float64 (exact) on
    first use and kept, and `factor()` gives Xᵀ, a thin factor of G (G = Xᵀ X = L Lᵀ with
    L = Xᵀ), which ESD uses without ever forming G.
    """

    __slots__ = ("n", "s1", "_gram", "rows", "__weakref__")

    def __init__(self, n: int, s1: Tensor, gram: Tensor | None = None, rows: Tensor | None = None) -> None:
        if gram is None and rows is None:
            raise ValueError("LayerStats needs the Gram or the rows")
        if rows is not None and (rows.ndim != 2 or int(rows.shape[0]) != int(n)
                                 or int(rows.shape[1]) != int(s1.shape[0])):
            raise ValueError(f"rows of shape {tuple(rows.shape)} do not match n={n}, d_in={int(s1.shape[0])}")
        self.n = int(n)
        self.s1 = s1
        self._gram = gram
        self.rows = rows

    @property
    def d_in(self) -> int:
        return int(self.s1.shape[0])

    @property
    def gram(self) -> Tensor:
        """G = XᵀX, (d_in, d_in) float64; formed from the rows on first use when only they are held."""
        g = self._gram
        if g is None:
            x = self.rows.to(torch.float64)
            g = x.T @ x
            self._gram = g  # another thread may form it too: the same values, one of them kept
        return g

    def factor(self) -> Tensor | None:
        """Xᵀ, (d_in, n) float64, when the rows are held (G = Xᵀ X); else None."""
        return None if self.rows is None else self.rows.to(torch.float64).T

    def to(self, device: torch.device | str) -> "LayerStats":
        """The same statistics (same class, every slot) with their tensors on `device`; self
        when they are all there already."""
        slots = [n for c in type(self).__mro__ for n in getattr(c, "__slots__", ()) if n != "__weakref__"]
        values = {n: getattr(self, n) for n in slots}
        moved = {n: v.to(device) if isinstance(v, Tensor) and v.device != torch.device(device) else v
                 for n, v in values.items()}
        if all(moved[n] is values[n] for n in slots):
            return self
        out = object.__new__(type(self))
        for n, v in moved.items():
            setattr(out, n, v)
        return out

    def mean(self) -> Tensor:
        """First moment s1 / n, the ESM++ prototype. (d_in,) float64."""
        return self.s1 / max(self.n, 1)

    def second_moment(self) -> Tensor:
        """C = X^T X / n, PAVE's uncentred covariance. (d_in, d_in) float64."""
        return self.gram / max(self.n, 1)

    def __add__(self, other: "LayerStats") -> "LayerStats":
        if self.rows is not None and other.rows is not None:
            rows = torch.cat([self.rows, other.rows])
            return LayerStats(self.n + other.n, self.s1 + other.s1, rows=rows)
        return LayerStats(self.n + other.n, self.s1 + other.s1, self.gram + other.gram)

    def __repr__(self) -> str:
        held = "rows" if self.rows is not None else "gram"
        return f"{type(self).__name__}(n={self.n}, d_in={self.d_in}, {held})"

    @staticmethod
    def from_rows(x: Tensor) -> "LayerStats":
        """Statistics of a (n, d_in) block of rows, accumulated in float64 (G held)."""
        x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
        return LayerStats(int(x64.shape[0]), x64.sum(0), x64.T @ x64)
