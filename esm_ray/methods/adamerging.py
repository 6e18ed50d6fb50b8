"""`adamerging`: merge coefficients learned by entropy minimisation on unlabelled data.

Also the shared machinery of the search methods (this module and `methods.concrete`): the
search configuration, its result, and a MergeMethod base whose `fuse` applies the result.

The executor runs the search stage (`runtime.search.run_search`) before the merge loop; then,
per tensor, ΔW = m̃ ⊙ Σ_i λ_i τ_i with the learned λ (task-wise or per tensor) and, for the
Concrete methods, the rescaled final mask m̃.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import Field
from torch import Tensor

from esm_ray.core.adamerging import Objective, coefficient_table
from esm_ray.core.arithmetic import weighted_sum
from esm_ray.core.concrete import normalize_mask
from esm_ray.methods._common import dense, in_expert_order
from esm_ray.methods.base import ExpertContext, MergeMethod, MethodParams, TensorInfo
from esm_ray.methods.registry import register

_BLOCK = "layer."  # per-layer aggregation key: the name up to the block index


@dataclass(frozen=True)
class SearchConfig:
    """What one search learns and how (built by each search method from its parameters).

    mask:          learn a Concrete mask over `mask_scope` ('all' floating parameters, or
                   'linear': only the 2-D weights of nn.Linear modules)
    coefficients:  'fixed' (w_i = init_weight × expert weight), 'task' ([T]) or 'layer' ([T, K])
    bilevel:       Concrete AdaMerging (see `methods.concrete`)
    stale_inner_grad: reproduce the published code's inner gradient, taken at the previous
                   step's merge instead of at the reset coefficients
    """

    mask: bool
    coefficients: Literal["fixed", "task", "layer"]
    steps: int
    lr: float = 1e-3
    temperature: float = 0.5
    init_weight: float = 0.3
    init_logit: float = 0.0
    clamp: tuple[float, float] | None = None
    seed: int = 0
    mask_scope: Literal["all", "linear"] = "all"
    final_mask: str = "expected"
    bilevel: bool = False
    inner_lr: float = 1.0
    adamerging_steps: int = 0
    adamerging_lr: float = 1e-3
    stale_inner_grad: bool = False


@dataclass
class SearchResult:
    """What the search found: the final mask (before rescaling) and the coefficients.

    names:        the searched tensors; column order of layer-wise coefficients
    weights:      the fixed (Concrete TA) or initial per-expert weights
    coefficients: learned λ, [T] or [T, K]; None when the weights are fixed
    mask:         {tensor name: final mask in [0, 1]} for the masked tensors
    history:      one {'phase', 'step', 'objective'} per step (objective = Σ_tasks entropy)
    """

    names: list[str]
    weights: list[float]
    coefficients: Tensor | None = None
    mask: dict[str, Tensor] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    expert_seconds_per_step: float = 0.0  # of which waiting for the experts' gradients
    steps_run: int = 0

    def __post_init__(self) -> None:
        self._column = {n: k for k, n in enumerate(self.names)}

    def weights_for(self, name: str) -> list[float] | Tensor:
        """The per-expert coefficients of one tensor (the fixed weights outside the search)."""
        c = self.coefficients
        if c is None:
            return self.weights
        if c.ndim == 1:
            return c
        k = self._column.get(name)
        return self.weights if k is None else c[:, k]


class SearchParams(MethodParams):
    """Parameters shared by the search methods."""

    steps: int = Field(200, ge=0, description="optimisation steps (one batch per task each)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the searched variables")
    batch_size: int = Field(16, ge=1, description="unlabelled rows per task and step")
    samples: int = Field(256, ge=1, description="rows read per task (batches are drawn from them)")
    max_length: int | None = Field(None, ge=4, description="token limit per row (default: calibration.max_length)")
    init_weight: float = Field(0.3, description="task weight (fixed in Concrete TA, initial otherwise), "
                                                "times the expert's own `weight`")
    clamp: bool = Field(False, description="keep learned coefficients in [0, 1]")
    seed: int | None = Field(None, description="seed of masks and batches (default: the spec's seed)")
    objective: Objective = Field(
        "entropy", description="per task batch: `entropy` (mean prediction entropy, as published), `im` "
                               "(information maximisation: mean entropy minus the entropy of the mean "
                               "prediction, which keeps the batch from collapsing onto one class) or "
                               "`distill` (KL divergence from the expert's own predictions on its rows)")


SP = TypeVar("SP", bound=SearchParams)


class SearchMethod(MergeMethod[SP], Generic[SP]):
    """A method whose merge depends on a search stage run before the merge loop."""

    search_stage: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True
    needs_heads: ClassVar[bool] = True
    mask_artifact: ClassVar[str] = "concrete/mask.safetensors"

    def __init__(self, params: SP, n_experts: int, seed: int = 0) -> None:
        super().__init__(params, n_experts, seed)
        self.result: SearchResult | None = None

    def search_config(self) -> SearchConfig:
        raise NotImplementedError

    def _common(self) -> dict[str, Any]:
        """The SearchConfig fields every search method shares, from its parameters."""
        p = self.params
        return {"steps": p.steps, "lr": p.lr, "init_weight": p.init_weight, "clamp": (0.0, 1.0) if p.clamp else None,
                "seed": p.seed if p.seed is not None else self.seed}

    def set_search_result(self, result: SearchResult) -> None:
        self.result = result

    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        if self.result is None:
            raise RuntimeError(f"method {self.name!r}: fuse called before the search stage ran")
        parts, ctxs = in_expert_order(parts, ctxs)
        w = self.result.weights_for(info.name)
        weights = [float(x) for x in w]
        delta = weighted_sum([dense(p).float() for p in parts], weights).float()
        m = self.result.mask.get(info.name)
        if m is not None:
            delta = delta * normalize_mask(m.float())
        return delta

    # -- outputs ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        r = self.result
        if r is None:
            return {}
        hist = [h["objective"] for h in r.history]
        every = max(1, len(hist) // 25)
        out: dict[str, Any] = {
            "search": {"steps": r.steps_run, "seconds": round(r.seconds, 3),
                       "seconds_per_step": round(r.seconds_per_step, 4),
                       "expert_seconds_per_step": round(r.expert_seconds_per_step, 4),
                       "objective_first": hist[0] if hist else None, "objective_last": hist[-1] if hist else None,
                       "objective_curve": [r.history[i] for i in sorted({*range(0, len(hist), every), len(hist) - 1})
                                           if i >= 0]},
        }
        if r.mask:
            out["mask"] = mask_report(r.mask, self.search_config())
        if r.coefficients is not None:
            out["coefficients"] = coefficient_table(r.coefficients, r.names)
        return out

    def artifacts(self) -> dict[str, bytes]:
        r = self.result
        if r is None:
            return {}
        files: dict[str, bytes] = {}
        if r.mask:
            from safetensors.torch import save

            cfg = self.search_config()
            binary = all(bool(((m == 0) | (m == 1)).all()) for m in r.mask.values())
            tensors = {n: (m.bool() if binary else m.float()).contiguous() for n, m in r.mask.items()}
            meta = {"rule": cfg.final_mask, "temperature": cfg.temperature, "scope": cfg.mask_scope,
                    "seed": cfg.seed, "steps": cfg.steps,
                    "apply": "tau_i * m / mean(m) per tensor, m shared by all tasks"}
            # one metadata key: safetensors does not keep the order of several, and the bytes must repeat
            files[self.mask_artifact] = save(tensors, metadata={"esm_ray.concrete": json.dumps(meta, sort_keys=True)})
        if r.coefficients is not None:
            files["adamerging/coefficients.json"] = json.dumps(
                {"granularity": "task" if r.coefficients.ndim == 1 else "layer",
                 "coefficients": coefficient_table(r.coefficients, r.names)}, indent=1).encode()
        return files

    def memory_note(self, shapes: dict[str, tuple[int, ...]]) -> str:
        """What the search holds on the coordinator, in model sizes and MB (for the dry run).

        Counted for every tensor; with mask_scope 'linear' and fixed weights only the masked
        tensors are held, so this is an upper bound.
        """
        cfg = self.search_config()
        size = sum(_numel(s) for s in shapes.values()) * 4
        t = self.n_experts
        held = {"θ₀": 1, "merged θ and ∂L/∂θ": 2}
        if cfg.mask:
            held["mask logits, their gradient and 2 Adam moments"] = 4
        if cfg.coefficients == "fixed":
            held["Σ w_i τ_i"] = 1
        else:
            held[f"the {t} task vectors"] = t
        mult = sum(held.values())
        parts = ", ".join(f"{k} {v}×" for k, v in held.items())
        return (f"{self.name} search: the coordinator holds about {mult}× the model ({mult * size / 1e6:.0f} MB: "
                f"{parts}), plus the {t} experts' gradients ({t}×) while they are summed")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layer_key(name: str) -> str:
    """'encoder.layer.3.attention.self.query.weight' -> 'encoder.layer.3'; other names unchanged."""
    i = name.find(_BLOCK)
    if i < 0:
        return name.rsplit(".", 1)[0]
    j = name.find(".", i + len(_BLOCK))
    return name if j < 0 else name[:j]


def mask_report(mask: dict[str, Tensor], cfg: SearchConfig) -> dict[str, Any]:
    """Sparsity (1 − mean of the unrescaled mask) overall, per layer (block) and per tensor."""
    per_layer: dict[str, list[float]] = {}
    total = kept = 0.0
    per_tensor = {}
    for n, m in mask.items():
        s = float(m.float().sum())
        per_tensor[n] = round(1.0 - s / m.numel(), 6)
        acc = per_layer.setdefault(layer_key(n), [0.0, 0.0])
        acc[0] += s
        acc[1] += m.numel()
        kept += s
        total += m.numel()
    return {"rule": cfg.final_mask, "scope": cfg.mask_scope, "temperature": cfg.temperature,
            "sparsity": round(1.0 - kept / total, 6) if total else 0.0,
            "sparsity_per_layer": {k: round(1.0 - a / b, 6) for k, (a, b) in per_layer.items()},
            "sparsity_per_tensor": per_tensor}


class AdaMergingParams(SearchParams):
    granularity: Literal["task", "layer"] = Field(
        "layer", description="one coefficient per task ('task') or per (task, tensor) ('layer')")


@register
class AdaMerging(SearchMethod[AdaMergingParams]):
    """AdaMerging: task-wise or layer-wise coefficients, Adam on the summed prediction entropy."""

    name = "adamerging"
    summary = "merge coefficients (task- or layer-wise) learned by entropy minimisation on unlabelled data"

    def search_config(self) -> SearchConfig:
        p = self.params
        return SearchConfig(mask=False, coefficients=p.granularity, **self._common())


__all__ = ["AdaMerging", "SearchConfig", "SearchMethod", "SearchParams", "SearchResult", "layer_key", "mask_report"]
