"""RegMean: each calibrated linear layer merged in closed form from the experts' input Grams.

Expert side (`prepare`): for the weight of a linear layer with calibration statistics, the
two terms of the normal equations, τ_i G̃_i (d_out, d_in) and G̃_i (d_in, d_in), both float64:
8 · d_in · (d_out + d_in) bytes per expert and tensor (q/k/v share one Gram in the statistics
cache, and each of them ships it). Any other tensor (biases, norms, embeddings, linears without
statistics) ships its task vector τ_i. Coordinator (`fuse`): sums the terms as they arrive and
solves (Σ G̃_i) Xᵀ = (Σ τ_i G̃_i)ᵀ once; other tensors get the mean of the task vectors.

Conventions, as FusionBench's `RegMeanAlgorithm`: `alpha` is its `reduce_non_diagonal_ratio`,
each Gram is divided by its row count (`normalize`), and every tensor that is not the weight
of a calibrated linear layer (biases included) is the plain mean of the experts. The statistics
are the cached calibration statistics ESM and PAVE read: one pass serves all three.

Per-model weights (`experts[i].weight`, default 1) generalise both rules: expert i's Gram is
multiplied by w_i (weighted least squares) and other tensors take Σ w_i τ_i / Σ w_i. With the
default weights this is FusionBench's merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from esm_ray.core.regmean import regmean_solve, regmean_terms
from esm_ray.errors import InputError, SpecError
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, Parts, TensorInfo
from esm_ray.methods.esm import oriented
from esm_ray.methods.registry import register


class RegMeanParams(MethodParams):
    alpha: float = Field(0.9, ge=0, le=1, description="off-diagonal scaling of each Gram, G̃ = αG + (1−α)diag(G) "
                                                       "(FusionBench's reduce_non_diagonal_ratio; 1 = exact least squares)")
    normalize: bool = Field(True, description="divide each Gram by its row count (FusionBench), so every task "
                                              "counts alike; false: raw sums XᵀX, one row one vote")


@dataclass(frozen=True)
class RegMeanPart:
    """One expert's normal-equation terms for a linear weight: w·τG̃ (d_out, d_in) and w·G̃ (d_in, d_in), float64."""

    wg: Tensor
    gram: Tensor
    transposed: bool = False

    @property
    def nbytes(self) -> int:
        return self.wg.numel() * 8 + self.gram.numel() * 8


def _weights(ctxs: list[ExpertContext]) -> list[float]:
    ws = [float(c.weight) for c in ctxs]
    bad = [c.name for c in ctxs if not float(c.weight) >= 0.0]
    if bad:
        raise SpecError(f"field `experts[*].weight`: regmean needs weights >= 0 (experts {bad})")
    if sum(ws) <= 0.0:
        raise SpecError("field `experts[*].weight`: the weights sum to 0, which regmean cannot divide by")
    return ws


@register
class RegMean(MergeMethod[RegMeanParams]):
    name = "regmean"
    summary = "RegMean: closed-form least-squares merge of each linear layer from its input Grams"
    needs_stats = True

    def __init__(self, params: RegMeanParams, n_experts: int, seed: int = 0) -> None:
        super().__init__(params, n_experts, seed)
        self._solved: list[str] = []
        self._lstsq: list[str] = []
        self._mean = 0

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        p = self.params
        tau = expert.to(torch.float64) - base.to(torch.float64)
        if tau.ndim == 2 and ctx.stats is not None and ctx.stats.n > 0:
            t = oriented(info, ctx.stats)
            gram = ctx.stats.second_moment() if p.normalize else ctx.stats.gram
            wg, g = regmean_terms(tau.T if t else tau, gram, p.alpha, float(ctx.weight))
            return RegMeanPart(wg, g, t)
        return tau.float()

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        order = sorted(range(len(ctxs)), key=lambda i: ctxs[i].index)
        ws = _weights([ctxs[i] for i in order])
        acc: list[Tensor] = []
        kind: type | None = None
        transposed = False
        for w, part in zip(ws, Parts.of(parts).stream(order)):
            if kind is None:
                kind = type(part)
                transposed = getattr(part, "transposed", False)
            elif type(part) is not kind:
                raise InputError(f"{info.name}: calibration statistics exist for some experts and not others; "
                                 f"regmean needs them for all experts or for none")
            terms = (part.wg, part.gram) if isinstance(part, RegMeanPart) else (part.to(torch.float64) * w,)
            acc = list(terms) if not acc else [a + b for a, b in zip(acc, terms)]
        if kind is RegMeanPart:
            dw, exact = regmean_solve(acc[0], acc[1])
            (self._solved if exact else self._lstsq).append(info.name)
            if transposed:
                dw = dw.T
        else:
            dw = acc[0] / sum(ws)
            self._mean += 1
        return dw.reshape(base.shape).to(torch.float32)

    def report(self) -> dict[str, Any]:
        """α, how many tensors were solved and averaged, and where Σ G̃ was singular (least squares)."""
        p = self.params
        return {"method": self.name, "alpha": p.alpha, "normalize": p.normalize,
                "solved": len(self._solved), "averaged": self._mean, "singular": sorted(self._lstsq)}
