"""Build a routed model in memory from a merged model, the experts' weights and their statistics.

The merge job builds routed directories through the `esm_pp` / `sim` methods; this is the same
per-layer math for callers that hold the models already (evaluation, ablations, tests).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from esm_ray.core.layerstats import LayerStats
from esm_ray.routed.format import DEFAULT_ROUTED_LAYERS, EXPERT_DTYPES
from esm_ray.core.routing import residual_expert, stack_experts
from esm_ray.routed.model import Head, RoutedModel, SimRouter


def routed_modules(model: nn.Module, layers: str | None = None) -> list[str]:
    """Names of the nn.Linear modules of `model` that the pattern routes, in model order."""
    pat = re.compile(layers or DEFAULT_ROUTED_LAYERS)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pat.search(n)]


def build_routed(merged: nn.Module, experts: Sequence[Mapping[str, Tensor]],
                 stats: Sequence[Mapping[str, LayerStats]], tasks: Sequence[str], rank: int,
                 layers: str | None = None, heads: Mapping[str, Head] | None = None,
                 sim: SimRouter | None = None, backbone: nn.Module | None = None, router: str | None = None,
                 expert_dtype: str = "float32", method: str = "esm_pp") -> RoutedModel:
    """A RoutedModel from the merged model (wrapped in place), T expert state dicts and stats.

    experts[t]: task t's weights, at least '<module>.weight' of every routed module
    stats[t]:   task t's LayerStats per module (Gram and first moment of its inputs)
    """
    if not (len(experts) == len(stats) == len(tasks)):
        raise ValueError(f"{len(experts)} experts, {len(stats)} statistics, {len(tasks)} tasks")
    dt = EXPERT_DTYPES[expert_dtype]
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    protos: dict[str, Tensor] = {}
    for module in routed_modules(merged, layers):
        w_m = merged.get_submodule(module).weight.detach()
        per_task = []
        for sd, st in zip(experts, stats):
            s = st[module]
            per_task.append(residual_expert(sd[f"{module}.weight"], w_m, s.gram, s.n, rank).to(dt))
        factors[module] = stack_experts(per_task)
        protos[module] = torch.stack([st[module].mean().float() for st in stats])
    routers = ["prototype"] + (["sim"] if sim is not None else [])
    manifest = {"method": method, "router": router or routers[0], "expert_dtype": expert_dtype}
    return RoutedModel(merged, tasks, factors, protos, sim, backbone, dict(heads or {}), router, manifest)
