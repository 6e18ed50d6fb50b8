"""One expert's side of the search stage (see runtime/search.py): its task model, its unlabelled
rows, and the entropy of its predictions with its gradient at the parameters it is sent."""

from __future__ import annotations

import hashlib
import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from esm_ray.core.adamerging import OBJECTIVES, distillation_loss
from esm_ray.errors import InputError, SpecError
from esm_ray.models.task import SearchInputs, task_model_factory
from esm_ray.runtime.device import resolve_device

log = logging.getLogger("esm_ray.search")


def as_tensor(x: Any) -> Tensor:
    """A tensor view of a tensor or a (possibly read-only, shared-memory) numpy array."""
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(x)
    return torch.as_tensor(x)


def as_array(t: Tensor) -> np.ndarray:
    return t.detach().float().contiguous().cpu().numpy()


def step_seed(seed: int, phase: str, step: int) -> int:
    """The seed of one step's batches (each expert mixes in its own index)."""
    key = f"esm-ray/search\x00{int(seed)}\x00{phase}\x00{int(step)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def _batch_seed(seed: int, index: int) -> int:
    key = f"esm-ray/batch\x00{int(seed)}\x00{int(index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


class TaskSearcher:
    """One expert's side of the search: its task model, its unlabelled rows, its gradients."""

    def __init__(self, spec, index: int, params, base, expert) -> None:
        from esm_ray.stats.data import load_calibration_rows

        e = spec.experts[index]
        if not e.data:
            raise SpecError(f"field `experts.{index}.data`: method {spec.method.name!r} needs unlabelled "
                            f"data for expert {e.name!r}")
        self.index = index
        self.batch_size = int(params.batch_size)
        self.objective_name = getattr(params, "objective", "entropy")
        max_length = int(getattr(params, "max_length", None) or spec.calibration.max_length)
        src = SearchInputs(base, expert, spec.base, e.model, max_length)
        self.task = task_model_factory(src.config())(src)
        seed = params.seed if params.seed is not None else spec.seed
        raw = load_calibration_rows(e.data, int(params.samples), int(seed))
        self.rows = [self.task.encode(r) for r in raw]
        if not self.rows:
            raise InputError(f"{e.data}: no rows")
        self.device = resolve_device(spec.runtime.device, f"the process of expert {e.name!r}")
        self.task.module.to(self.device)
        self.fixed: dict[str, Tensor] = {}
        self.teacher: Tensor | None = None  # the expert's own log-probabilities of every row ("distill")
        if self.objective_name == "distill":
            self.teacher = self._teacher(expert)
        log.info("expert %s: search ready (%d rows, %s, objective %s)", e.name, len(self.rows),
                 type(self.task).__name__, self.objective_name)

    def _teacher(self, expert) -> Tensor:
        """log softmax of the expert's own logits on every row, (rows, classes): one pass of the
        expert's weights, once; the targets of the `distill` objective (no labels involved)."""
        p = len(self.task.prefix)
        params = {n[p:]: expert.get(n).float().to(self.device) for n in self.task.param_names()}
        out = []
        with torch.no_grad():
            for i in range(0, len(self.rows), self.batch_size):
                ids, mask = self.task.collate(self.rows[i:i + self.batch_size])
                out.append(torch.log_softmax(self.task.logits(params, ids.to(self.device),
                                                              mask.to(self.device)).float(), -1))
        return torch.cat(out)

    def layout(self) -> dict[str, list[str]]:
        return {"params": self.task.param_names(), "linear": self.task.linear_weights()}

    def begin(self, fixed: dict[str, Any]) -> None:
        """Tensors that stay constant during the search, already merged (by checkpoint name)."""
        self.fixed = {n: as_tensor(t).to(self.device) for n, t in fixed.items()}

    def batch(self, seed: int) -> tuple[Tensor, Tensor, list[int]]:
        """The ids, mask and row indices of this task's batch of step `seed`."""
        g = torch.Generator().manual_seed(_batch_seed(seed, self.index))
        idx = torch.randperm(len(self.rows), generator=g)[: self.batch_size].tolist()
        ids, mask = self.task.collate([self.rows[i] for i in idx])
        return ids.to(self.device), mask.to(self.device), idx

    def _loss(self, logits: Tensor, idx: list[int]) -> Tensor:
        if self.teacher is None:
            return OBJECTIVES[self.objective_name](logits)
        return distillation_loss(logits, self.teacher[idx])

    def entropy_grad(self, merged: dict[str, Any], seed: int) -> tuple[float, dict[str, np.ndarray]]:
        """(L, ∂L/∂θ) for this task's batch of step `seed` at merged parameters θ, L the search
        objective (`objective`: the mean prediction entropy, the information-maximisation loss, or
        the divergence from the expert's own predictions).

        θ and the gradients travel as float32 numpy arrays: Ray hands numpy to an actor on the
        same node without a copy (read-only, and never written here), torch tensors it copies.
        """
        p = len(self.task.prefix)
        params = {n[p:]: t for n, t in self.fixed.items()}
        leaves = {}
        for n, t in merged.items():
            leaf = as_tensor(t).to(self.device).detach().requires_grad_()
            leaves[n] = leaf
            params[n[p:]] = leaf
        ids, mask, idx = self.batch(seed)
        with torch.enable_grad():
            loss = self._loss(self.task.logits(params, ids, mask).float(), idx)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        out = {n: (g.detach().float().cpu() if g is not None else torch.zeros(leaves[n].shape)).numpy()
               for n, g in zip(leaves, grads)}
        return float(loss.detach()), out
