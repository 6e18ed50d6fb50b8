"""Everything that happens on one expert's side of a merge.

An ``ExpertSide`` owns lazy readers of the base and of one expert, that expert's calibration
statistics, and its own instances of the method and purifier. The local executor holds T of
them in one process; the Ray executor wraps the very same class in one actor per expert.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor

from esm_ray.core.lora import LoraFactors
from esm_ray.core.rescale import Thin, shift_products
from esm_ray.io.composite import open_base, open_expert
from esm_ray.io.reader import check_finite
from esm_ray.methods import ExpertContext, TensorInfo, build_purifier
from esm_ray.methods.base import SupportInputs
from esm_ray.runtime.device import CPU, resolve_device, to_device
from esm_ray.runtime.memory import read_stored, read_to_float32
from esm_ray.runtime.threads import math_threads, torch_threads
from esm_ray.spec import MergeSpec

log = logging.getLogger("esm_ray.expert")


def _row_start(info: TensorInfo, rows: tuple[int, int]) -> int:
    """The first flat index of row block `rows` of a tensor (`info` the tensor's or the block's:
    rows have the same length)."""
    return rows[0] * (info.numel // info.shape[0] if info.shape[0] else 0)


class ExpertSide:
    # Calls that change the side's state; an executor replays them on a restarted side.
    STATE_CALLS: ClassVar[tuple[str, ...]] = ("bind_experts", "calibrate", "set_plan", "search_begin",
                                              "search_end")

    def __init__(self, spec: MergeSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        e = spec.experts[index]
        self.expert = e
        t = len(spec.experts)
        from esm_ray.runtime.plan import method_for

        self.method = method_for(spec)
        self.purifier = (build_purifier(spec.purify.name, spec.purify.params, n_experts=t, seed=spec.seed)
                         if spec.purify else None)
        self._base = None
        self._model = None
        self._stats = None
        self._plan: Any = None
        self._adapters_only = False  # every expert of the job a LoRA adapter (bind_experts)
        self._search: Any = None  # runtime.search.TaskSearcher, built on first use
        self._search_fixed: dict[str, Any] | None = None
        self._device: torch.device | None = None
        self._cursors: dict[str, list[Any]] = {}  # tensor -> [block state, next block] (prepare_rows)

    @property
    def device(self) -> torch.device:
        """Where calibration and declared decompositions run (`runtime.device`, resolved here)."""
        if self._device is None:
            self._device = resolve_device(self.spec.runtime.device, f"the process of expert {self.expert.name!r}")
        return self._device

    def device_name(self) -> str:
        """The resolved device, e.g. 'cpu' or 'cuda:0' (resolving it fails early when unusable)."""
        d = self.device
        if d.type == "cuda":
            return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
        return str(d)

    def _on(self, device: torch.device, fn, info: TensorInfo, tensors: tuple[Tensor, ...], ctx: ExpertContext):
        """fn(info, *tensors, ctx) computed on `device`; whatever it returns comes back on the CPU."""
        if device.type == "cpu":
            return fn(info, *tensors, ctx)
        ctx = dataclasses.replace(ctx, stats=to_device(ctx.stats, device))
        return to_device(fn(info, *(t.to(device) for t in tensors), ctx), CPU)

    def _device_if(self, flag: bool) -> torch.device:
        return self.device if flag else CPU

    # -- readers ---------------------------------------------------------------------------
    @property
    def base(self):
        if self._base is None:
            self._base = open_base(self.spec)
        return self._base

    @property
    def model(self):
        if self._model is None:
            self._model = open_expert(self.spec, self.index)
        return self._model

    def ping(self) -> int:
        return self.index

    # -- stages ----------------------------------------------------------------------------
    def calibrate(self) -> list[str]:
        """Compute (or load from cache) this expert's statistics; return the hooked modules."""
        from esm_ray.stats.calibrate import calibrate_expert

        t0 = time.perf_counter()
        self._stats = calibrate_expert(self.expert.model, self.expert.data, self.spec.calibration,
                                       s3=self.spec.s3, tokenizer_uri=self.spec.base, name=self.expert.name,
                                       device=str(self.device), base_uri=self.spec.base)
        log.info("expert %s: statistics for %d layers ready in %.1fs on %s", self.expert.name,
                 len(self._stats.modules()), time.perf_counter() - t0, self.device)
        return sorted(self._stats.modules())

    def bind_experts(self, adapters: list[bool]) -> None:
        """The method's `bind_experts` on this side (which experts of the job are LoRA adapters)."""
        self.method.bind_experts(adapters)
        self._adapters_only = bool(adapters) and all(adapters)

    def set_plan(self, plan: Any) -> None:
        self._plan = plan

    def _ctx(self, info: TensorInfo) -> ExpertContext:
        stats = self._stats.get(info.module) if (self._stats is not None and info.module) else None
        return self.method.context_for(ExpertContext(self.index, self.expert.name, self.expert.weight,
                                                     self.expert.density, stats, self._plan), info)

    def _tensors(self, info: TensorInfo) -> tuple[Tensor, Tensor]:
        b = self.base.get(info.name)
        check_finite(info.name, b, self.spec.base)
        return b.to(torch.float32), self._expert_float32(info.name)

    def _expert_float32(self, name: str) -> Tensor:
        """This expert's tensor as float32 (a LoRA adapter's W_0 + s·BA, never rounded), checked."""
        m = self.model
        w = m.get_float32(name) if hasattr(m, "get_float32") else m.get(name)
        check_finite(name, w, self.expert.model)
        return w.to(torch.float32)

    def _lora(self, info: TensorInfo) -> LoraFactors | None:
        """This expert's LoRA factors of `info` when the method merges them factored: the expert
        is an adapter (io.adapter), `info` one of its targets, the method `factored`, and no
        purifier rewrites the tensor. None otherwise (the tensor is then read densified)."""
        if not self.method.factored or (self.purifier is not None and self.purifier.applies(info)):
            return None
        return self._factors(info)

    def _factors(self, info: TensorInfo) -> LoraFactors | None:
        """This expert's LoRA factors of `info`: None unless the expert is an adapter and `info`
        a 2-D target of it."""
        m = self.model
        if not hasattr(m, "factors") or info.ndim != 2:
            return None
        f = m.factors(info.name)
        return None if f is None else LoraFactors(*f)

    def _lora_part(self, info: TensorInfo, lora: LoraFactors) -> Any:
        """The method's `prepare_lora` of these factors (on the worker's device when it decomposes)."""
        def run(info: TensorInfo, b: Tensor, a: Tensor, ctx: ExpertContext) -> Any:
            return self.method.prepare_lora(info, LoraFactors(b, a, lora.scale), ctx)

        return self._on(self._device_if(self.method.decomposes), run, info, (lora.b, lora.a), self._ctx(info))

    def prepass(self, infos: list[TensorInfo]) -> list[Any]:
        assert self.purifier is not None
        out = []
        for info in infos:
            b, w = self._tensors(info)
            dev = self._device_if(self.purifier.decomposes)
            out.append(self._on(dev, self.purifier.prepass, info, (b, w), self._ctx(info)))
        return out

    def prepare(self, infos: list[TensorInfo]) -> list[Any]:
        """This expert's parts for a group of tensors (purified first when a purifier is set)."""
        out = []
        for info in infos:
            lora = self._lora(info)
            if lora is not None:
                out.append(self._lora_part(info, lora))
                continue
            b, w = self._tensors(info)
            out.append(self._part(info, b, w))
        return out

    def prepare_with_base(self, info: TensorInfo, base: Tensor | None, rows: tuple[int, int] | None = None,
                          state: Any = None) -> Any:
        """This expert's part of one tensor against a float32 base that the caller has read and
        checked: the local executor reads and converts the base once for all T sides.
        `rows`: a row block of the tensor (`info.shape` is then the block's), prepared with the
        method's `prepare_block` and this side's `block_state` of the tensor; `base` None (a
        method whose fuse_block reads no base rows): the rows are read here when needed."""
        if rows is None:
            lora = self._lora(info)
            if lora is not None:
                return self._lora_part(info, lora)
            return self._part(info, base, read_to_float32(self.model, info.name, self.expert.model, slot="expert"))
        start = _row_start(info, rows)
        kept = self.method.state_block(state, start)  # kept by block_state: nothing to read
        return kept if kept is not None else self._block_part(info, base, rows, state, start)

    def _block_part(self, info: TensorInfo, base: Tensor | None, rows: tuple[int, int], state: Any,
                    start: int) -> Any:
        """The method's `prepare_block` of these rows (`info.shape` the block's), read here, the
        base rows too when `base` is None."""
        if base is None:
            base = read_to_float32(self.base, info.name, self.spec.base, slot="base", rows=rows)
        w = (read_stored(self.model, info.name, self.expert.model, rows=rows) if self.method.stored_dtype_blocks
             else read_to_float32(self.model, info.name, self.expert.model, slot="expert", rows=rows))
        return self.method.prepare_block(info, base, w, self._ctx(info), state, start)

    def block_state(self, info: TensorInfo, blocks: list[tuple[int, int]],
                    base_rows: Callable[[int], Tensor] | None = None) -> Any:
        """The method's whole-tensor state for merging `info` in these row blocks.
        `base_rows(j)`: the base's float32 rows of block j, read and checked by the caller (the
        local pool reads them once for all sides); by default this side reads them."""
        def read() -> Iterator[tuple[Tensor, Tensor]]:
            for j, rows in enumerate(blocks):
                b = (base_rows(j) if base_rows is not None
                     else read_to_float32(self.base, info.name, self.spec.base, slot="state-base", rows=rows))
                w = read_to_float32(self.model, info.name, self.expert.model, slot="state-expert", rows=rows)
                yield b, w
                b = w = None

        return self.method.block_state(info, read, self._ctx(info))

    # -- row blocks asked for one at a time (the Ray pool): the state stays on this side -----
    def block_begin(self, info: TensorInfo, blocks: list[tuple[int, int]]) -> None:
        """Compute and keep this side's `block_state` of `info` (TIES's trim threshold, DARE's
        random stream, which need not and may not travel), for `prepare_rows` calls in order."""
        self._cursors[info.name] = [self.block_state(info, blocks), 0]

    def prepare_rows(self, info: TensorInfo, blocks: list[tuple[int, int]], b: int) -> Any:
        """This side's part of row block `b` of `info` (the blocks of `block_begin`), against the
        base rows read here: the part the local pool makes from the coordinator's base rows.

        Blocks come in order; when this side has no state for block `b` (its process was
        restarted, or a retried call asks again) the state is rebuilt deterministically and
        the earlier blocks are prepared again and dropped (DARE's stream advances as before)."""
        cursor = self._cursors.get(info.name)
        if cursor is None or cursor[1] != b:
            if cursor is not None or b:
                log.warning("expert %s: rebuilding the block state of %r for block %d", self.expert.name,
                            info.name, b)
            cursor = self._cursors[info.name] = [self.block_state(info, blocks), 0]
            while cursor[1] < b:
                self._rows_part(info, blocks[cursor[1]], cursor[0])
                cursor[1] += 1
        part = self._rows_part(info, blocks[b], cursor[0])
        if isinstance(part, Tensor) and part.untyped_storage().nbytes() > part.nbytes:
            part = part.clone()  # a view of a reused buffer (expert.scratch): ship only its rows
        cursor[1] += 1
        if cursor[1] == len(blocks):
            del self._cursors[info.name]
        return part

    def _rows_part(self, info: TensorInfo, rows: tuple[int, int], state: Any) -> Any:
        start = _row_start(info, rows)
        kept = self.method.state_block(state, start)
        if kept is not None:  # kept by block_state: neither the base rows nor the expert's are read
            return kept
        sub = dataclasses.replace(info, shape=(rows[1] - rows[0], *info.shape[1:]))
        return self._block_part(sub, None, rows, state, start)

    def _part(self, info: TensorInfo, b: Tensor, w: Tensor) -> Any:
        ctx = self._ctx(info)
        if self.purifier is not None and self.purifier.applies(info):
            w = self._on(self._device_if(self.purifier.decomposes), self.purifier.purify, info, (b, w), ctx)
        return self._on(self._device_if(self.method.decomposes), self.method.prepare, info, (b, w), ctx)

    def post_prepare(self, infos: list[TensorInfo], merged: list[Tensor]) -> list[Any]:
        """This expert's post-stage parts against the final merged tensors."""
        out = []
        for info, m in zip(infos, merged):
            lora = self._factors(info)
            part = None if lora is None else self.method.post_prepare_lora(info, m, lora, self._ctx(info))
            if part is None:
                w = self._expert_float32(info.name)
                dev = self._device_if(self.method.post_decomposes)
                part = self._on(dev, self.method.post_prepare, info, (m, w), self._ctx(info))
            out.append(part)
        return out

    def shift_products(self, infos: list[TensorInfo], deltas: list[Tensor | Thin]) -> list[tuple[float, float]]:
        """For each merged update ΔW (dense, or `core.rescale.Thin`), this expert's
        (⟨ΔW C, τ⟩, ⟨ΔW C, ΔW⟩) from its own statistics C and update τ (`rescale`,
        core.rescale): an adapter's τ as its factors, a full expert's read one tensor at a time;
        (0, 0) without statistics."""
        out = []
        for info, delta in zip(infos, deltas):
            stats = self._stats.get(info.module) if (self._stats is not None and info.module) else None
            if stats is None:
                out.append((0.0, 0.0))
                continue
            lora = self._factors(info)
            if lora is not None:
                tau: Tensor | tuple[Tensor, Tensor] = (lora.scale * lora.b, lora.a)
            else:
                b, w = self._tensors(info)
                tau = w.to(torch.float64) - b.to(torch.float64)
            if getattr(stats, "transposed", False):  # stored (d_in, d_out): GPT-2 Conv1D
                delta = (delta.q @ delta.p if isinstance(delta, Thin) else delta).T
                tau = (tau[1].T, tau[0].T) if isinstance(tau, tuple) else tau.T
            out.append(shift_products(delta, tau, stats))
        return out

    def support_features(self) -> Any:
        """Before the merge loop (methods with needs_support_features): this expert's support
        part, from its task head and, when the method asks, pooled backbone features of its rows."""
        from esm_ray.models.heads import read_expert_head
        from esm_ray.models.hf import is_causal_lm
        from esm_ray.runtime.support import base_input_means, likelihood_gain, support_features

        ctx = ExpertContext(self.index, self.expert.name, self.expert.weight, self.expert.density)
        head, labels = read_expert_head(self.model)
        n = self.method.support_samples()
        feats = support_features(self.spec, self.index, n, adapters_only=self._adapters_only) if n else None
        g = self.method.support_gain_samples() if is_causal_lm(self.base.config) else 0
        gain = likelihood_gain(self.spec, self.index, g) if g else None
        if gain is not None:
            log.info("expert %s: log-likelihood gain over the base on %d of its rows: %+.3f nats/token",
                     self.expert.name, g, gain)
        means = None
        if self.method.support_base_means():
            t0 = time.perf_counter()
            means = base_input_means(self.spec, self.index)
            log.info("expert %s: the base's mean inputs of %d layers on its calibration rows in %.1fs",
                     self.expert.name, len(means), time.perf_counter() - t0)
        base_bytes = sum(self.base.info(k).nbytes for k in self.base.keys())
        return self.method.support_part(ctx, SupportInputs(head, labels, feats, self.spec.base, base_bytes, gain,
                                                           means))

    # -- search stage (Concrete, AdaMerging): this expert's task entropy and its gradient ---
    def _searcher(self):
        if self._search is None:
            from esm_ray.runtime.search_expert import TaskSearcher

            self._search = TaskSearcher(self.spec, self.index, self.method.params, self.base, self.model)
        if self._search_fixed is not None:
            self._search.begin(self._search_fixed)
            self._search_fixed = None
        return self._search

    def search_layout(self) -> dict[str, list[str]]:
        """The parameter names of this expert's task model, and which are nn.Linear weights."""
        return self._searcher().layout()

    def search_begin(self, fixed: dict[str, Any]) -> None:
        """The merged values of the tensors that stay constant during the search."""
        self._search_fixed = fixed

    def entropy_grad(self, merged: dict[str, Any], step_seed: int) -> tuple[float, dict[str, Any]]:
        """(H, ∂H/∂θ): this task's mean prediction entropy on its batch for `step_seed`."""
        with torch_threads(math_threads(self.spec)):
            return self._searcher().entropy_grad(merged, step_seed)

    def search_end(self) -> None:
        self._search = self._search_fixed = None

    def close(self) -> None:
        for r in (self._base, self._model):
            if r is not None:
                r.close()
        self._base = self._model = None
