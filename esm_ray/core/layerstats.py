"""Calibration statistics of one linear layer's inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerStats:
    """Uncentred input statistics of one layer over n token rows (padding excluded).

    n:     number of rows (tokens) seen
    s1:    (d_in,)        float64, sum of input rows
    gram:  (d_in, d_in)   float64, X^T X
    """

    n: int
    s1: Tensor
    gram: Tensor

    @property
    def d_in(self) -> int:
        return int(self.s1.shape[0])

    def mean(self) -> Tensor:
        """First moment s1 / n, the ESM++ prototype. (d_in,) float64."""
        return self.s1 / max(self.n, 1)

    def second_moment(self) -> Tensor:
        """C = X^T X / n, PAVE's uncentred covariance. (d_in, d_in) float64."""
        return self.gram / max(self.n, 1)

    def __add__(self, other: "LayerStats") -> "LayerStats":
        return LayerStats(self.n + other.n, self.s1 + other.s1, self.gram + other.gram)

    @staticmethod
    def from_rows(x: Tensor) -> "LayerStats":
        """Statistics of a (n, d_in) block of rows, accumulated in float64."""
        x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
        return LayerStats(int(x64.shape[0]), x64.sum(0), x64.T @ x64)
