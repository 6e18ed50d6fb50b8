"""`concrete_ta` and `concrete_adamerging`: a learned Concrete mask shared by all task vectors.

    ΔW = m̃ ⊙ Σ_i λ_i τ_i,   m̃ = m / mean(m) per tensor,  m the final mask (`final_mask` rule)

concrete_ta:         λ_i fixed (init_weight × expert weight, 0.3 by default); the mask logits
                     are learned by Adam on the summed per-task prediction entropy.
concrete_adamerging: bi-level and first order. Each step: sample a mask, reset λ to its initial
                     value, take one inner Adam step (lr `inner_lr`, state kept across steps) on
                     λ with the mask detached, re-merge with the updated λ and take one outer
                     Adam step on the logits on fresh batches. Then `adamerging_steps` of
                     AdaMerging (lr `adamerging_lr`) on the frozen final mask.

The inner gradient is taken at the reset λ, after re-merging. The published code takes it at
a merge cached from the previous step (previous mask sample, previous λ) and applies it to the
reset λ; `stale_inner_grad: true` reproduces that.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from esm_ray.core.concrete import MaskRule
from esm_ray.methods.adamerging import SearchConfig, SearchMethod, SearchParams
from esm_ray.methods.registry import register


class ConcreteParams(SearchParams):
    temperature: float = Field(0.5, gt=0, description="Concrete relaxation temperature λ")
    init_logit: float = Field(0.0, description="initial mask logit (keep probability σ(init_logit))")
    mask_scope: Literal["all", "linear"] = Field(
        "all", description="masked tensors: every floating parameter ('all') or the 2-D weights of nn.Linear "
                           "layers ('linear')")
    final_mask: MaskRule = Field(
        "expected", description="final mask: 'expected' σ(logit), 'hard' 1[logit ≥ 0], or a seeded 'sample' / "
                                "'bernoulli' draw")


def _mask_settings(p: ConcreteParams) -> dict[str, Any]:
    return {"mask": True, "temperature": p.temperature, "init_logit": p.init_logit, "mask_scope": p.mask_scope,
            "final_mask": p.final_mask}


class ConcreteAdaMergingParams(ConcreteParams):
    steps: int = Field(100, ge=0, description="outer (mask) steps; each runs an inner and an outer pass")
    granularity: Literal["task", "layer"] = Field("layer", description="coefficients per task or per (task, tensor)")
    inner_lr: float = Field(1.0, gt=0, description="Adam learning rate of the single inner step on λ")
    adamerging_steps: int = Field(100, ge=0, description="AdaMerging steps on the frozen final mask")
    adamerging_lr: float = Field(1e-3, gt=0, description="Adam learning rate of those steps")
    stale_inner_grad: bool = Field(False, description="take the inner gradient at the previous step's merge, "
                                                      "as the published code does")


@register
class ConcreteTA(SearchMethod[ConcreteParams]):
    """Concrete Task Arithmetic: fixed task weights, a learned shared mask."""

    name = "concrete_ta"
    summary = "task arithmetic through a learned Concrete mask shared by all task vectors (entropy, unlabelled data)"

    def search_config(self) -> SearchConfig:
        p = self.params
        return SearchConfig(coefficients="fixed", **_mask_settings(p), **self._common())


@register
class ConcreteAdaMerging(SearchMethod[ConcreteAdaMergingParams]):
    """Concrete AdaMerging: a learned mask (outer) and AdaMerging coefficients (inner)."""

    name = "concrete_adamerging"
    def search_config(self) -> SearchConfig:
        p = self.params
        return SearchConfig(coefficients=p.granularity, bilevel=True, inner_lr=p.inner_lr,
                            adamerging_steps=p.adamerging_steps, adamerging_lr=p.adamerging_lr,
                            stale_inner_grad=p.stale_inner_grad, **_mask_settings(p), **self._common())


__all__ = ["ConcreteAdaMerging", "ConcreteParams", "ConcreteTA"]
