"""Everything that happens on one expert's side of a merge.

An ``ExpertSide`` owns lazy readers of the base and of one expert, that expert's calibration
statistics, and its own instances of the method and purifier. The local executor holds T of
them in one process; the Ray executor wraps the very same class in one actor per expert.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor

from esm_ray.io.reader import check_finite, open_model
from esm_ray.methods import ExpertContext, TensorInfo, build_method, build_purifier
from esm_ray.spec import MergeSpec

log = logging.getLogger("esm_ray.expert")


class ExpertSide:
    def __init__(self, spec: MergeSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        e = spec.experts[index]
        self.expert = e
        t = len(spec.experts)
        self.method = build_method(spec.method.name, spec.method.params, n_experts=t, seed=spec.seed)
        self.purifier = (build_purifier(spec.purify.name, spec.purify.params, n_experts=t, seed=spec.seed)
                         if spec.purify else None)
        self._base = None
        self._model = None
        self._stats = None
        self._plan: Any = None

    # -- readers ---------------------------------------------------------------------------
    @property
    def base(self):
        if self._base is None:
            self._base = open_model(self.spec.base, self.spec.s3)
        return self._base

    @property
    def model(self):
        if self._model is None:
            self._model = open_model(self.expert.model, self.spec.s3)
        return self._model

    def ping(self) -> int:
        return self.index

    # -- stages ----------------------------------------------------------------------------
    def calibrate(self) -> list[str]:
        """Compute (or load from cache) this expert's statistics; return the hooked modules."""
        from esm_ray.stats.calibrate import calibrate_expert

        t0 = time.perf_counter()
        self._stats = calibrate_expert(self.expert.model, self.expert.data, self.spec.calibration,
                                       s3=self.spec.s3, tokenizer_uri=self.spec.base)
        log.info("expert %s: statistics for %d layers ready in %.1fs", self.expert.name,
                 len(self._stats.modules()), time.perf_counter() - t0)
        return sorted(self._stats.modules())

    def set_plan(self, plan: Any) -> None:
        self._plan = plan

    def _ctx(self, info: TensorInfo) -> ExpertContext:
        stats = self._stats.get(info.module) if (self._stats is not None and info.module) else None
        return ExpertContext(self.index, self.expert.name, self.expert.weight, self.expert.density,
                             stats, self._plan)

    def _tensors(self, info: TensorInfo) -> tuple[Tensor, Tensor]:
        b = self.base.get(info.name)
        w = self.model.get(info.name)
        check_finite(info.name, b, self.spec.base)
        check_finite(info.name, w, self.expert.model)
        return b.to(torch.float32), w.to(torch.float32)

    def prepass(self, infos: list[TensorInfo]) -> list[Any]:
        assert self.purifier is not None
        out = []
        for info in infos:
            b, w = self._tensors(info)
            out.append(self.purifier.prepass(info, b, w, self._ctx(info)))
        return out

    def prepare(self, infos: list[TensorInfo]) -> list[Any]:
        """This expert's parts for a group of tensors (purified first when a purifier is set)."""
        out = []
        for info in infos:
            b, w = self._tensors(info)
            ctx = self._ctx(info)
            if self.purifier is not None and self.purifier.applies(info):
                w = self.purifier.purify(info, b, w, ctx)
            out.append(self.method.prepare(info, b, w, ctx))
        return out

    def post_prepare(self, infos: list[TensorInfo], merged: list[Tensor]) -> list[Any]:
        """This expert's post-stage parts against the final merged tensors."""
        out = []
        for info, m in zip(infos, merged):
            w = self.model.get(info.name).to(torch.float32)
            out.append(self.method.post_prepare(info, m, w, self._ctx(info)))
        return out

    def close(self) -> None:
        for r in (self._base, self._model):
            if r is not None:
                r.close()
        self._base = self._model = None
