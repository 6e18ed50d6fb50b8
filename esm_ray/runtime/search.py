"""The search stage: learn a Concrete mask and/or merge coefficients by entropy minimisation.

Who does what in one step:

    coordinator                                   expert side i (in-process or a Ray actor)
    -----------                                   -----------------------------------------
    holds logits ℓ, coefficients λ, Adam states
    samples m̃ (seeded), builds θ(ℓ, λ) with autograd
    sends θ (one dict, the same for every expert) ──>  batch of its task's unlabelled rows
                                                       (seeded by step and expert index),
                                                       H_i = entropy(logits_i(θ; batch)),
                                   <── (H_i, ∂H_i/∂θ)   via functional_call on its frozen copy
    G = Σ_i ∂H_i/∂θ (expert order)                      of the architecture and its own head
    backward(θ, G) -> ∂L/∂ℓ, ∂L/∂λ (the merge formula)
    Adam step

Shipping ∂H_i/∂θ (one model-size dict per expert) is the cheapest exact choice: the
gradients w.r.t. the mask and the coefficients need the task vectors of every task, which
only the coordinator has together. The coordinator therefore holds, for the searched tensors,
θ₀ and either the fixed weighted sum Σ w_i τ_i (Concrete TA: one model size) or the T task
vectors (learned coefficients), plus the logits, their gradient and two Adam moments.
θ and the gradients travel as float32 numpy arrays, which Ray passes between processes on one
node without copies (RayPool puts θ in the object store once for all experts).

The task-specific "unlabelled batch → logits" map is pluggable (esm_ray/models/task.py); the
expert side is runtime/search_expert.py; this module is the coordinator.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from esm_ray.core.adamerging import init_coefficients, project_
from esm_ray.core.concrete import ConcreteMask, normalize_masks
from esm_ray.core.merged_model import merge_params
from esm_ray.errors import InputError
from esm_ray.methods.adamerging import SearchConfig, SearchResult
from esm_ray.runtime.search_expert import as_array, as_tensor, step_seed

log = logging.getLogger("esm_ray.search")


def _dense(part: Any) -> Tensor:
    from esm_ray.methods._common import dense

    return dense(part).float()


class _Problem:
    """The coordinator's tensors: θ₀, the task vectors (or their fixed sum) of the searched set."""

    def __init__(self, cfg: SearchConfig, pool, plan, infos, weights: list[float]) -> None:
        from esm_ray.core.arithmetic import weighted_sum
        from esm_ray.io.reader import open_model

        self.cfg, self.pool, self.weights = cfg, pool, weights
        layouts = pool.call("search_layout")
        layout = layouts[0]
        for e, other in enumerate(layouts[1:], 1):
            if other["params"] != layout["params"]:
                raise InputError(f"expert {e}: its architecture's parameters differ from expert 0's")
        params = set(layout["params"])
        by_name = {i.name: i for i in infos}
        self.names = [n for n in plan.names if n in params and n in by_name]
        if not self.names:
            raise InputError("no floating-point parameter of the model is in the checkpoint; nothing to search")
        linear = set(layout["linear"])
        self.masked = ([n for n in self.names if cfg.mask_scope == "all" or (n in linear and len(plan.shapes[n]) == 2)]
                       if cfg.mask else [])
        masked = set(self.masked)
        learn = cfg.coefficients != "fixed"
        self.dynamic = list(self.names) if learn else list(self.masked)
        base = open_model(plan.spec.base, plan.spec.s3)
        try:
            self.base = {n: base.get(n).to(torch.float32) for n in self.names}
        finally:
            base.close()
        # task vectors, streamed in groups: stacked [T, ...] when λ is learned, else Σ w_i τ_i
        self.tv: dict[str, Tensor] = {}
        fixed: dict[str, Tensor] = {}
        group, size = [], 0
        for n in self.names + [None]:  # type: ignore[list-item]
            if n is not None:
                group.append(by_name[n])
                size += by_name[n].numel * 4 * max(1, plan.n_experts)
            if group and (n is None or size > (256 << 20)):
                parts = pool.call("prepare", group)
                for j, info in enumerate(group):
                    tvs = [_dense(parts[e][j]) for e in range(plan.n_experts)]
                    if learn:
                        self.tv[info.name] = torch.stack(tvs)
                    else:
                        s = weighted_sum(tvs, weights).float()
                        if info.name in masked:
                            self.tv[info.name] = s.unsqueeze(0)
                        else:
                            fixed[info.name] = self.base[info.name] + s
                group, size = [], 0
        self.base = {n: self.base[n] for n in self.dynamic}  # the constant ones are merged already
        self.ones = torch.ones(1)
        self.expert_seconds = 0.0  # wall time spent waiting for the experts' gradients
        pool.call("search_begin", {n: as_array(t) for n, t in fixed.items()})
        log.info("search: %d tensors change (%d masked), %d constant", len(self.dynamic), len(self.masked), len(fixed))

    def merge(self, coefs: Tensor | None, masks: dict[str, Tensor] | None) -> dict[str, Tensor]:
        c = self.ones if coefs is None else coefs
        tv = {n: self.tv[n] for n in self.dynamic}
        return merge_params(self.base, tv, c, masks, self.dynamic if c.ndim == 2 else None)

    def grads(self, theta: dict[str, Tensor], seed: int) -> tuple[float, dict[str, Tensor]]:
        """Σ_i H_i and Σ_i ∂H_i/∂θ over the experts, summed in expert order."""
        payload = {n: as_array(t) for n, t in theta.items()}
        t0 = time.perf_counter()
        res = self.pool.call("entropy_grad", payload, seed)
        self.expert_seconds += time.perf_counter() - t0
        loss = float(sum(r[0] for r in res))
        total = {}
        for n in payload:
            acc = as_tensor(res[0][1][n]).clone()
            for r in res[1:]:
                acc += as_tensor(r[1][n])
            total[n] = acc
        return loss, total

    def backward(self, theta: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
        names = [n for n in theta if theta[n].requires_grad]
        if names:
            torch.autograd.backward([theta[n] for n in names], [grads[n] for n in names])


def run_search(method, pool, plan, infos, progress: bool = True) -> SearchResult:
    """Run the method's search on the expert pool; stores and returns the SearchResult."""
    cfg: SearchConfig = method.search_config()
    t = plan.n_experts
    log.info("%s", method.memory_note(plan.shapes))
    weights = [cfg.init_weight * float(e.weight) for e in plan.spec.experts]
    t0 = time.perf_counter()
    prob = _Problem(cfg, pool, plan, infos, weights)
    result = SearchResult(names=list(prob.dynamic), weights=weights)
    total_steps = cfg.steps + (cfg.adamerging_steps if cfg.bilevel else 0)
    bar = tqdm(total=total_steps, desc=f"search {method.name}", unit="step", disable=not progress)
    t_steps = time.perf_counter()

    def record(phase: str, step: int, objective: float) -> None:
        result.history.append({"phase": phase, "step": step, "objective": round(objective, 6)})
        bar.set_postfix(objective=f"{objective:.4f}")
        bar.update(1)

    mask = ConcreteMask({n: prob.base[n].shape for n in prob.masked}, cfg.init_logit, cfg.temperature) \
        if cfg.mask else None
    coefs = None
    if cfg.coefficients != "fixed":
        k = len(prob.dynamic) if cfg.coefficients == "layer" else None
        coefs = init_coefficients(t, k, weights)
    init = coefs.detach().clone() if coefs is not None else None
    try:
        if mask is not None and not cfg.bilevel:
            # Concrete TA (or a mask learned jointly with fixed λ): one outer level
            opt = torch.optim.Adam(mask.parameters(), lr=cfg.lr)
            for step in range(cfg.steps):
                theta = prob.merge(coefs, mask.sample(cfg.seed, step))
                loss, g = prob.grads(theta, step_seed(cfg.seed, "mask", step))
                prob.backward(theta, g)
                opt.step()
                opt.zero_grad(set_to_none=True)
                record("mask", step, loss)
        elif mask is not None:
            _bilevel(cfg, prob, mask, coefs, init, record)
        if coefs is not None:
            final = normalize_masks(mask.final(cfg.final_mask, cfg.seed)) if mask is not None else None
            with torch.no_grad():
                coefs.copy_(init)
            steps = cfg.adamerging_steps if cfg.bilevel else cfg.steps
            lr = cfg.adamerging_lr if cfg.bilevel else cfg.lr
            opt = torch.optim.Adam([coefs], lr=lr)
            for step in range(steps):
                theta = prob.merge(coefs, final)
                loss, g = prob.grads(theta, step_seed(cfg.seed, "coefficients", step))
                prob.backward(theta, g)
                opt.step()
                opt.zero_grad(set_to_none=True)
                project_(coefs, cfg.clamp)
                record("coefficients", step, loss)
    finally:
        bar.close()
        pool.call("search_end")
    n_steps = len(result.history)
    result.steps_run = n_steps
    result.seconds = time.perf_counter() - t0
    result.seconds_per_step = (time.perf_counter() - t_steps) / n_steps if n_steps else 0.0
    result.expert_seconds_per_step = prob.expert_seconds / n_steps if n_steps else 0.0
    if mask is not None:
        result.mask = mask.final(cfg.final_mask, cfg.seed)
    if coefs is not None:
        result.coefficients = coefs.detach().clone()
    method.set_search_result(result)
    return result


def _bilevel(cfg: SearchConfig, prob: _Problem, mask: ConcreteMask, coefs: Tensor, init: Tensor, record) -> None:
    """Concrete AdaMerging, first order: per step reset λ, one inner step on λ, one outer on ℓ."""
    outer = torch.optim.Adam(mask.parameters(), lr=cfg.lr)
    inner = torch.optim.Adam([coefs], lr=cfg.inner_lr)  # its state persists across steps
    prev: tuple[Tensor, dict[str, Tensor]] | None = None
    for step in range(cfg.steps):
        m = mask.sample(cfg.seed, step)
        with torch.no_grad():
            coefs.copy_(init)
        # inner: ∂L/∂λ with the mask detached, at the reset λ (or, reproducing the published
        # code, at the previous step's merge), applied to the reset λ
        at, at_mask = (prev if (cfg.stale_inner_grad and prev is not None)
                       else (coefs.detach(), {n: v.detach() for n, v in m.items()}))
        leaf = at.clone().requires_grad_()
        theta = prob.merge(leaf, at_mask)
        loss_in, g = prob.grads(theta, step_seed(cfg.seed, "inner", step))
        prob.backward(theta, g)
        coefs.grad = leaf.grad
        inner.step()
        inner.zero_grad(set_to_none=True)
        project_(coefs, cfg.clamp)
        # outer: re-merge with the updated λ (fixed) and the live mask, fresh batches
        theta = prob.merge(coefs.detach(), m)
        loss, g = prob.grads(theta, step_seed(cfg.seed, "outer", step))
        prob.backward(theta, g)
        outer.step()
        outer.zero_grad(set_to_none=True)
        prev = (coefs.detach().clone(), {n: v.detach() for n, v in m.items()})
        record("mask", step, loss)


__all__ = ["run_search"]
