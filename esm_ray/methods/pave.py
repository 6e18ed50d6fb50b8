"""PAVE as a purifier: each expert's linear weights are replaced before any task-vector method
sees them, by W̃_t = W_0 + SVD_r(τ_t C_reg) C_reg⁻¹, τ_t = W_t − W_0 (`subject: task_vector`, the
default: the base is never touched), or by W̃_t = SVD_r(W_t C_reg) C_reg⁻¹ (`subject: weight`, the
published form, which on every zoo we measured removes base-model structure and lowers the merge;
docs/methods-subspace.md).

Flow: `prepass` (expert side) returns the normalised context spectrum of every calibrated
linear weight; `plan` (coordinator) allocates ranks layer by layer across experts and collapses
them to one ratio q_m per expert; `purify` (expert side) truncates every layer of expert m to
r = round(q_m · min(d_out, d_in)). With `rank_ratio` set, the search is skipped and q is fixed.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from esm_ray.core.pave import (Damped, allocate_ranks, collapse_ratios, context_spectrum, damp, pave_rank,
                               purify_weight)
from esm_ray.methods.base import ExpertContext, MethodParams, Purifier, TensorInfo
from esm_ray.methods.esm import oriented
from esm_ray.methods.registry import register

log = logging.getLogger(__name__)


class PAVEParams(MethodParams):
    rho: float = Field(0.96875, gt=0, le=1, description="target kept-rank fraction of the allocation (31/32)")
    rank_ratio: float | None = Field(None, gt=0, le=1, description="fixed ratio q for every expert (no search)")
    damping: Literal["relative", "absolute"] = Field(
        "relative", description="ε = δ·mean(diag C) (relative) or ε itself (absolute, as the reference code)")
    damping_init: float | None = Field(None, gt=0, description="initial δ or ε; default 0.01 relative, 0.1 absolute")
    tol: float = Field(0.05, gt=0, description="accept ε once ||C_reg⁻¹ C_reg − I||_F < tol")
    subject: Literal["weight", "task_vector"] = Field(
        "task_vector", description="what is truncated: the task vector W_t − W_0 (default; the base is never "
                                   "changed) or the fine-tuned weight W_t (as published)")


@register
class PAVE(Purifier[PAVEParams]):
    name = "pave"
    summary = "Purify task vectors: context-oriented SVD truncation of the fine-tuned weights"
    needs_stats = True
    decomposes = True

    def __init__(self, params: PAVEParams, n_experts: int, seed: int = 0) -> None:
        super().__init__(params, n_experts, seed)
        self._ratios: list[float] | None = None
        self._layers = 0
        # Expert side: the accepted δ per (expert, module), so purify does not repeat the
        # residual solves of the pre-pass (one float per layer).
        self._delta: dict[tuple[int, str], tuple[float, int, float]] = {}

    @property
    def has_prepass(self) -> bool:
        return self.params.rank_ratio is None

    def _prepared(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext):
        p = self.params
        stats = ctx.stats
        if stats is None or stats.n == 0 or expert.ndim != 2:
            return None
        t = oriented(info, stats)
        w = expert.to(torch.float64)
        if p.subject == "task_vector":
            w = w - base.to(torch.float64)
        key = (ctx.index, str(info.module))
        if key in self._delta:
            delta, steps, res = self._delta[key]
            d = damp(stats.second_moment(), p.damping, delta, p.tol, check=False)
            damped = Damped(d.c_reg, d.chol, d.eps, d.delta, res, steps)
        else:
            damped = damp(stats.second_moment(), p.damping, p.damping_init, p.tol)
            self._delta[key] = (damped.delta, damped.steps, damped.residual)
        return (w.T if t else w), t, damped

    def prepass(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        """Normalised singular values of W_t C_reg (of τ_t C_reg for subject task_vector; float32,
        length min(d_out, d_in)), or None."""
        got = self._prepared(info, base, expert, ctx)
        if got is None:
            return None
        w, _, damped = got
        return context_spectrum(w, damped.c_reg).float()

    def plan(self, summaries: dict[str, list[Any]], infos: dict[str, TensorInfo]) -> list[Any]:
        """Per-expert ratio q_m = Σ_l r_{m,l} / Σ_l R_l from the per-layer allocation."""
        p = self.params
        if p.rank_ratio is not None:
            self._ratios = [p.rank_ratio] * self.n_experts
            return list(self._ratios)
        ranks, sizes = [], []
        for name in sorted(summaries):
            spectra = summaries[name]
            if len(spectra) != self.n_experts or any(s is None for s in spectra):
                continue
            ranks.append(allocate_ranks(list(spectra), p.rho))
            sizes.append(int(spectra[0].shape[0]))
        self._layers = len(sizes)
        self._ratios = collapse_ratios(ranks, sizes) if ranks else [1.0] * self.n_experts
        log.info("pave plan over %d layers (rho=%g): ratios %s", self._layers, p.rho,
                 ", ".join(f"{q:.5f}" for q in self._ratios))
        return list(self._ratios)

    def purify(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Tensor:
        p = self.params
        got = self._prepared(info, base, expert, ctx)
        if got is None:
            return expert
        q = ctx.plan if ctx.plan is not None else p.rank_ratio
        if q is None:
            raise RuntimeError(f"{info.name}: PAVE has no rank ratio for expert {ctx.name!r}; run plan() first")
        w, t, damped = got
        r = pave_rank(tuple(w.shape), float(q))
        # Every layer's final ε is logged; at INFO only when the damping had to grow.
        log.log(logging.INFO if damped.steps else logging.DEBUG,
                "pave %s [%s]: eps=%.4g (delta=%.4g, %d doublings, residual %.2g), rank %d/%d",
                info.name, ctx.name, damped.eps, damped.delta, damped.steps, damped.residual, r, min(w.shape))
        out = purify_weight(w, damped, r)
        out = out.T if t else out
        if p.subject == "task_vector":
            out = out + base.to(torch.float64)
        return out.contiguous().to(torch.float32)

    def report(self) -> dict[str, Any]:
        p = self.params
        return {"purifier": self.name, "rho": p.rho, "rank_ratio": p.rank_ratio, "damping": p.damping,
                "damping_init": p.damping_init, "tol": p.tol, "ratios": self._ratios, "layers_planned": self._layers}
