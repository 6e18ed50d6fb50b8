"""`breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`: task vectors sparsified by
magnitude rank, then summed or merged by TIES's sign consensus, as mergekit 0.1.5."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import Field
from torch import Tensor

from esm_ray.core.arithmetic import task_arithmetic
from esm_ray.core.sparsify import DellaRescale, breadcrumbs, della_drop, della_generator
from esm_ray.core.ties import sign_consensus_merge
from esm_ray.methods._common import compact, dense_in_order, density_field, expert_density, lambda_field, weights_of
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register

_INT8 = Field(False, description="accepted for mergekit configs; no effect on the result")


class SparsifiedParams(MethodParams):
    """What the fuse of every sparsified method reads."""

    normalize: bool = Field(False, description="divide by the sum of the weights of the contributing experts")
    lambda_: float = lambda_field()


class BreadcrumbsParams(SparsifiedParams):
    density: float = density_field(1.0)
    gamma: float = Field(0.01, ge=0.0, le=1.0, description="fraction of the largest |τ| entries dropped as outliers")
    normalize: bool = Field(False, description="divide by the sum of the weights of the contributing experts")
    rescale: bool = Field(False, description="rescale each sparsified task vector to its original L1 norm")
    lambda_: float = lambda_field()
    int8_mask: bool = _INT8


class DellaParams(SparsifiedParams):
    density: float = density_field(1.0)
    epsilon: float = Field(0.15, ge=0.0, lt=1.0,
                           description="keep probabilities span density ± epsilon by magnitude rank in the row")
    normalize: bool = Field(True, description="divide by the sum of the weights of the contributing experts")
    rescale: bool = Field(True, description="rescale the surviving entries (see rescale_mode)")
    rescale_mode: DellaRescale = Field(
        "l1", description="'l1': match the task vector's L1 norm (mergekit); "
                         "'inverse_probability': divide each survivor by its keep probability (DELLA paper)")
    lambda_: float = lambda_field()
    int8_mask: bool = _INT8


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide by the sum of the expert weights")


SP = TypeVar("SP", bound=SparsifiedParams)
DP = TypeVar("DP", bound=DellaParams)


class _Sparsified(MergeMethod[SP], Generic[SP]):
    """Expert side: sparsify τ_i (a sparse part when smaller). Coordinator: λ Σ w_i τ̃_i (divided
    by Σ w_i with normalize), or with `ties` TIES's sign election and disjoint mean."""

    ties: bool = False

    def sparsify(self, info: TensorInfo, tv: Tensor, ctx: ExpertContext) -> Tensor:
        raise NotImplementedError

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        return compact(self.sparsify(info, expert.float() - base.float(), ctx))

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        tvs, ctxs = dense_in_order(parts, ctxs)
        p = self.params_for(info)
        if self.ties:
            return sign_consensus_merge(tvs, weights_of(ctxs), lam=p.lambda_, normalize=p.normalize,
                                        method="sum").float()
        return task_arithmetic(tvs, weights_of(ctxs), lam=p.lambda_, normalize=p.normalize).float()


class _Breadcrumbs(_Sparsified[BreadcrumbsParams]):
    def sparsify(self, info: TensorInfo, tv: Tensor, ctx: ExpertContext) -> Tensor:
        p = self.params_for(info, ctx)
        return breadcrumbs(tv, expert_density(ctx, p), p.gamma, p.rescale)


@register
class Breadcrumbs(_Breadcrumbs):
    """Model Breadcrumbs: drop the gamma largest and the smallest |τ| entries, then sum."""

    name = "breadcrumbs"
    summary = "Model Breadcrumbs: drop outliers and small entries, then task arithmetic"


@register
class BreadcrumbsTies(_Breadcrumbs):
    """Model Breadcrumbs, then TIES's sign consensus."""

    name = "breadcrumbs_ties"
    summary = "Model Breadcrumbs, then TIES sign consensus"
    ties = True


class _Della(_Sparsified[DP], Generic[DP]):
    """MAGPRUNE: keep τ entries at random with probabilities density ± epsilon by magnitude rank
    in the row. The random stream of a tensor of an expert is seeded from (job seed, expert
    index, tensor name), so a spec gives the same masks anywhere."""

    def sparsify(self, info: TensorInfo, tv: Tensor, ctx: ExpertContext) -> Tensor:
        p = self.params_for(info, ctx)
        return della_drop(tv, expert_density(ctx, p), p.epsilon, della_generator(self.seed, ctx.index, info.name),
                          rescale=p.rescale, rescale_mode=p.rescale_mode)


@register
class Della(_Della[DellaParams]):
    """DELLA: MAGPRUNE, then TIES's sign consensus (normalized by default)."""

    name = "della"
    summary = "DELLA: magnitude-ranked random drop, then TIES sign consensus"
    ties = True


@register
class DellaLinear(_Della[DellaLinearParams]):
    """DELLA's MAGPRUNE, then task arithmetic."""

    name = "della_linear"
    summary = "DELLA magnitude-ranked random drop, then task arithmetic"
