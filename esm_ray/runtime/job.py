"""One merge job as a pipeline of named stages, shared by every executor.

    calibrate -> purify_plan -> support -> search -> fuse -> layer_scales -> commit

`calibrate` runs on the expert sides (their statistics, cached); `purify_plan` plans the
purifier from the sides' pre-pass summaries; `support` gathers what a routed method needs
before merging; `search` learns a mask or coefficients (Concrete, AdaMerging); `fuse` merges
group after group of tensors (runtime/layout.py decides each tensor's strategy once) into a
sink: the writer with the post stage and resume as tees (runtime/sinks.py), or a spill
directory when `layer_scales` must see every update before anything is written; `commit`
writes the method's files, the auxiliary files and the report, and commits the output.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

import esm_ray
from esm_ray.core.rescale import Thin, least_squares_factor, thin
from esm_ray.core.rowblocks import row_blocks
from esm_ray.io.model_files import is_tokenizer_file, model_files
from esm_ray.io.composite import open_base
from esm_ray.io.reader import open_model
from esm_ray.io.writer import ShardedWriter
from esm_ray.methods import ExpertContext, TensorInfo
from esm_ray.methods.base import BaseWeights
from esm_ray.runtime.early import EarlyStates, early_state_applies
from esm_ray.runtime.memory import read_to_float32, reuse_freed_memory, scratch
from esm_ray.runtime.threads import math_threads, torch_threads
from esm_ray.runtime.layout import Group, OutTensor, layer_groups, plan_groups, tensor_infos, write_order
from esm_ray.runtime.plan import BLOCK_BYTES, MergePlan
from esm_ray.runtime.pool import EARLY_STATE_BYTES, ExpertPool, GroupParts, on_threads
from esm_ray.runtime.resume import ResumeStore
from esm_ray.runtime.sinks import OutputSink, PostStage, SpillSink

log = logging.getLogger("esm_ray.job")

RESCALE_BATCH_BYTES = 16 << 20  # float32 updates sent to the expert sides at once for `rescale`


@dataclass
class MergeResult:
    output: str
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist: str) -> str:  # from the package metadata: importing transformers takes seconds
        try:
            return version(dist)
        except PackageNotFoundError:
            return "-"

    return {"esm_ray": esm_ray.__version__, "torch": torch.__version__, "transformers": installed("transformers"),
            "safetensors": installed("safetensors"), "python": platform.python_version()}


# The base's float32 rows of a blocked tensor that its fuse_state pass read are kept for the
# merge pass when the tensor takes at most this many bytes in float32 (a method that keeps the
# experts' blocks between its passes, model_stock or SCE, holds the same row tensors already:
# methods._common.PASS_CACHE_BYTES); a larger tensor's base is read again.
STATE_BASE_BYTES = 64 << 20


class MergeJob:
    """Runs one validated plan against an expert pool."""

    def __init__(self, plan: MergePlan, pool: ExpertPool, progress: bool = True, group_bytes: int = 64 << 20,
                 executor: str = "local", resume: bool = False, block_bytes: int = BLOCK_BYTES) -> None:
        self.plan = plan
        self.pool = pool
        # Methods that allow it (MergeMethod.blockwise) merge tensors larger than this (in
        # float32) in row blocks of about this size, in both executors: the coordinator's peak
        # memory then does not depend on the largest tensor.
        self.block_bytes = block_bytes
        self.resume = resume  # stage finished groups so a killed job can be resumed (runtime/resume.py)
        self.progress = progress
        self.group_bytes = group_bytes
        self.executor = executor
        self.on_progress: Callable[[int, int], None] | None = None  # (tensors done now, total)
        self.timings: dict[str, float] = {}
        self.devices: dict[str, str] = {}  # expert -> where its side computes (runtime.device)
        self.ctxs = [ExpertContext(i, e.name, e.weight, e.density) for i, e in enumerate(plan.spec.experts)]
        self._store: ResumeStore | None = None
        self._base: Any = None
        self._report_data: dict[str, Any] = {}
        self._row_blocks: dict[str, int] | None = None
        self._rescaled: dict[str, Any] | None = None  # spec `rescale`: the factors found (report)
        self._early: EarlyStates | None = None  # the next blocked tensor's fuse_state (runtime.early)
        self._next_blocked: dict[str, OutTensor] = {}

    def run(self) -> MergeResult:
        with torch_threads(math_threads(self.plan.spec)), reuse_freed_memory():  # same bits in every executor
            return self._run()

    # -- the pipeline ----------------------------------------------------------------------
    def _run(self) -> MergeResult:
        plan, spec = self.plan, self.plan.spec
        t_all = time.perf_counter()
        self._base = open_base(spec)
        try:
            # Resolving runtime.device on every side first fails early where it cannot be used.
            self.devices = dict(zip((e.name for e in spec.experts), self.pool.call("device_name")))
            self.pool.call("bind_experts", [e.name in plan.adapters for e in spec.experts])
            infos = tensor_infos(plan, self.calibrate())
            floating = [i for i in infos if plan.dtypes[i.name].is_floating_point]
            self.purify_plan(floating)
            self.support()
            self.search(floating)
            if spec.output_format == "peft":  # one LoRA adapter instead of a model (runtime.peft_output)
                from esm_ray.runtime.peft_output import merge_to_adapter

                merge_to_adapter(self, floating, t_all)
                self.timings["total"] = round(time.perf_counter() - t_all, 4)
                return MergeResult(spec.output, self._report_data, dict(self.timings))
            groups = self.plan_tensors(infos)
            spilled = plan.spilled
            layout = [o.entry for o in write_order(groups, spilled)]
            with ShardedWriter(spec.output, spec.shard_bytes, overwrite=spec.overwrite, s3=spec.s3,
                               plan=layout) as writer:
                # Spilled updates are staged for resume by the SpillSink; the layer-scaled tensors
                # written from them are not (a resumed job scales them again), so that pass writes
                # without the store, which would otherwise keep every written tensor.
                out = OutputSink(writer, PostStage(plan.method, self.pool, self.ctxs),
                                 None if spilled else self._store)
                if spilled:
                    with self._spill_dir() as root:
                        spill = SpillSink(root, self._store)
                        self.fuse(groups, spill)
                        self.layer_scales(groups, spill, out)
                else:
                    self.fuse(groups, out)
                self.commit(writer, time.perf_counter() - t_all)
            if self._store is not None:
                self._store.remove()  # the output is committed; staged groups are no longer needed
        finally:
            self._base.close()
        self.timings["total"] = round(time.perf_counter() - t_all, 4)
        log.info("merged %d tensors with %s into %s in %.2fs", len(infos), plan.method.name, spec.output,
                 self.timings["total"])
        return MergeResult(spec.output, self._report_data, dict(self.timings))

    # -- stages ----------------------------------------------------------------------------
    def calibrate(self) -> set[str]:
        """Every expert side computes (or loads) its statistics; returns the hooked modules."""
        if not self.plan.needs_stats:
            return set()
        with self._stage("calibration"):
            log.info("calibration: %d experts", self.plan.n_experts)
            return set(self.pool.call("calibrate")[0])

    def purify_plan(self, floating: list[TensorInfo]) -> None:
        """The purifier's per-expert plans from the sides' pre-pass summaries (PAVE's ranks)."""
        purifier = self.plan.purifier
        if purifier is None or not purifier.has_prepass:
            return
        with self._stage("purify_plan"):
            targets = [i for i in floating if purifier.applies(i)]
            summaries = self.pool.call("prepass", targets)
            table = {info.name: [summaries[e][j] for e in range(self.plan.n_experts)]
                     for j, info in enumerate(targets)}
            plans = purifier.plan(table, {i.name: i for i in floating})
            self.pool.call_each("set_plan", [(p,) for p in plans])

    def support(self) -> None:
        """What a routed method needs from each expert before merging (heads, SiM features)."""
        if self.plan.method.needs_support_features:
            with self._stage("support"):
                self.plan.method.support_fuse(self.pool.call("support_features"), self.ctxs)

    def search(self, floating: list[TensorInfo]) -> None:
        """Concrete / AdaMerging: learn the mask and coefficients before merging."""
        if self.plan.method.search_stage:
            from esm_ray.runtime.search import run_search

            with self._stage("search"):
                run_search(self.plan.method, self.pool, self.plan, floating, progress=self.progress)

    def plan_tensors(self, infos: list[TensorInfo]) -> list[Group]:
        """Groups of tensors with each tensor's strategy; with resume, which groups are done."""
        plan = self.plan
        groups = list(layer_groups(infos, self.group_bytes))
        restored = [False] * len(groups)
        if self.resume:
            self._store = ResumeStore.open(plan, self.group_bytes, math_threads(plan.spec))
            restored = self._store.scan([[i.name for i in g if plan.dtypes[i.name].is_floating_point]
                                         for g in groups])
        parts = self.pool.block_parts
        out = plan_groups(plan, groups, restored, blockwise=self.pool.blockwise, block_bytes=self.block_bytes,
                          block_parts=parts)
        blocked = [o for g in out for o in g.tensors if o.how == "blocks"]
        if blocked:
            self._row_blocks = {"tensors": len(blocked), "blocks": sum(len(o.blocks) for o in blocked),
                                "block_bytes": self.block_bytes, "block_parts": parts}
        return out

    def fuse(self, groups: list[Group], sink: OutputSink | SpillSink) -> None:
        """Merge group after group into `sink`: parts from the pool, fused here."""
        total = sum(len(g.tensors) for g in groups)
        bar = tqdm(total=total, desc=f"merge {self.plan.method.name}", unit="tensor", disable=not self.progress)
        blocked = [o for g in groups if not g.restored for o in g.merged if o.how == "blocks"]
        self.pool.expect_blocks([(o.info, list(o.blocks)) for o in blocked])
        if self.pool.early_states and early_state_applies(self.plan.method):
            self._early = EarlyStates()
            self._next_blocked = {o.info.name: nxt for o, nxt in zip(blocked, blocked[1:])}
        try:
            self._fuse_groups(groups, sink, bar, total)
        finally:
            if self._early is not None:
                self._early.close()
                self._early = None
        bar.close()

    def _fuse_groups(self, groups: list[Group], sink: OutputSink | SpillSink, bar: Any, total: int) -> None:
        with self._stage("fuse"):
            for g in groups:
                t0 = time.perf_counter()
                if g.restored:
                    self._restore(g, sink)
                else:
                    whole = [o for o in g.merged if o.how == "whole"]  # the parts a pool may fetch at once
                    parts = self.pool.group_parts([o.info for o in whole])
                    j = 0
                    for o in g.merged:
                        self._fuse_tensor(o, j, parts, sink)
                        j += o.how == "whole"
                    if isinstance(sink, OutputSink):
                        for o in g.tensors:
                            if o.how == "copy":
                                sink.copy(o, self._base_copy(o))
                sink.end_group(g.index)
                log.debug("group %s (%d tensors) fused in %.3fs", g.tensors[0].info.name, len(g.tensors),
                          time.perf_counter() - t0)
                self._advance(bar, len(g.tensors), total)

    def layer_scales(self, groups: list[Group], spill: SpillSink, out: OutputSink) -> None:
        """The method's global per-tensor factors from every update's norm; then every tensor is
        written, in the model's order, as base + factor · ΔW."""
        with self._stage("layer_scaling"):
            by_name = {o.info.name: o.info for g in groups for o in g.tensors}
            scales = self.plan.method.layer_scales(by_name, spill.norms)
            where = spill.spilled()
            if self.plan.rescale is not None:
                def spilled_deltas(names: list[str]) -> Iterator[torch.Tensor]:
                    for n in names:
                        with safe_open(str(where[n]), framework="pt") as f:
                            yield f.get_tensor(n) * scales.get(n, 1.0)

                factors = self.rescale_factors(by_name, [n for n in by_name if n in where], spilled_deltas)
                scales = {n: scales.get(n, 1.0) * factors.get(n, 1.0) for n in set(scales) | set(factors)}
            for o in write_order(groups, spilled=True):
                name = o.info.name
                if name not in where:
                    out.copy(o, self._base_copy(o))
                    continue
                scale = scales.get(name, 1.0)
                # one update read at a time; a large one (an LM head) a row block at a time, so
                # the stage holds about one block beside the writer (no post stage reads it)
                rows = row_blocks(o.info.shape, BLOCK_BYTES)
                if out.post.active and self.plan.method.post_applies(o.info):
                    rows = None
                with safe_open(str(where[name]), framework="pt") as f:
                    if rows is None:
                        delta = f.get_tensor(name) * scale
                        out.add(o, self._base.get(name).to(torch.float32) + delta)
                    else:
                        stored = f.get_slice(name)
                        out.add_blocks(o, (self._base.get(name, rows=(r0, r1)).to(torch.float32)
                                           + stored[r0:r1] * scale for r0, r1 in rows))
                if len(out.post) >= 8:
                    out.post.flush()
            out.post.flush()

    def rescale_factors(self, infos: dict[str, TensorInfo], names: list[str],
                        deltas: Callable[[list[str]], Iterator[torch.Tensor]]) -> dict[str, float]:
        """The output-shift least-squares factor (`MergePlan.rescale`, core.rescale) of each
        update in `names` (the model's order) that is 2-D and has calibration statistics, taken
        as `deltas(those names)` yields it (after the method's own layer scales): each expert
        side returns its two products per update, a batch of updates at a time."""
        rs = self.plan.rescale
        # in the model's order: the modules that read one input (q, k, v) follow each other, so
        # each side reads that input's statistics once (stats.store hands them the same object)
        names = [n for n in names if infos[n].module is not None and len(infos[n].shape) == 2]
        sums: dict[str, tuple[float, float]] = {}
        batch: list[tuple[str, torch.Tensor | Thin]] = []
        held = 0  # float32 entries in the batch

        # every expert a LoRA adapter: the update's rank is at most the sum of theirs (for the
        # factored methods), so it travels and multiplies in thin form (checked, core.rescale.thin)
        adapters = self.plan.adapters
        bound = (sum(max(adapters[e.name]["ranks"], default=0) for e in self.plan.spec.experts)
                 if len(adapters) == len(self.plan.spec.experts) else None)

        def flush() -> None:
            nonlocal held
            if not batch:
                return
            per = self.pool.call("shift_products", [infos[n] for n, _ in batch], [d for _, d in batch])
            for j, (n, _) in enumerate(batch):
                sums[n] = (sum(p[j][0] for p in per), sum(p[j][1] for p in per))
            batch.clear()
            held = 0

        t0 = time.perf_counter()
        for n, d in zip(names, deltas(names)):
            sent = d if bound is None else (thin(d, bound + 8) or d)
            batch.append((n, sent))
            held += sent.numel()
            if held * 4 >= RESCALE_BATCH_BYTES:
                flush()
        flush()
        if rs.scope == "global":
            c = least_squares_factor([sums[n] for n in names])
            factors = {n: c for n in names}
        else:
            factors = {n: least_squares_factor([sums[n]]) for n in names}
        vals = sorted(factors.values())
        self._rescaled = {"rule": rs.rule, "scope": rs.scope, "factors": factors,
                          "min": vals[0] if vals else None, "median": vals[len(vals) // 2] if vals else None,
                          "max": vals[-1] if vals else None}
        log.info("rescale (%s per %s): %d updates, factors %s to %s (median %s) in %.1fs", rs.rule, rs.scope,
                 len(vals), *(f"{v:.4g}" if v is not None else "-" for v in
                              (self._rescaled["min"], self._rescaled["max"], self._rescaled["median"])),
                 time.perf_counter() - t0)
        return factors

    def commit(self, writer: ShardedWriter, elapsed: float) -> None:
        """The method's files, the base's auxiliary files and the report; then the commit."""
        for rel, data in self.plan.method.artifacts().items():
            if isinstance(data, BaseWeights):  # a copy of the base's tensors
                data = st_save({k: self._base.get(k).contiguous() for k in self._base.keys()})
            writer.write_file(rel, data)
        self._report_data = self._report(self.plan.method, elapsed)
        self._write_aux(writer, self._base, self._report_data)
        writer.commit()

    # -- one tensor ------------------------------------------------------------------------
    def _fuse_tensor(self, o: OutTensor, j: int, parts: GroupParts, sink: OutputSink | SpillSink) -> None:
        spec, method, info = self.plan.spec, self.plan.method, o.info
        if o.how == "blocks":
            assert isinstance(sink, OutputSink)
            sink.add_blocks(o, self._merged_blocks(o, parts))
            return
        b = read_to_float32(self._base, info.name, spec.base, slot="base")
        delta = method.fuse(info, b, parts.of(j, info, b), [method.context_for(c, info) for c in self.ctxs])
        _check_shape(method.name, info, delta)
        if method.fuse_gives_weights:  # the merged weights themselves; a spill keeps updates
            if isinstance(sink, SpillSink):
                sink.add_delta(o, delta - b)
            else:
                sink.add(o, delta)
        elif isinstance(sink, SpillSink):
            sink.add_delta(o, delta)
        elif b.dtype == delta.dtype == torch.float32:  # b + delta into a reused buffer
            sink.add(o, torch.add(b, delta, out=scratch("merged", info.shape)))
        else:
            sink.add(o, b + delta)
        b = delta = None  # let the next tensor reuse their buffers (memory.scratch)

    def _merged_blocks(self, o: OutTensor, parts: GroupParts) -> Iterator[torch.Tensor]:
        """Merge one tensor a row block at a time (a blockwise method): the same bytes as the
        whole-tensor path, with memory bounded by the block."""
        method, info = self.plan.method, o.info
        ctxs = [method.context_for(c, info) for c in self.ctxs]
        # e.g. model_stock: the experts' cosines over the whole tensor, from a first pass, made
        # early (runtime.early) or now
        early = self._early.take(info.name) if self._early is not None else None
        state, base_rows = early.result() if early is not None else self._fuse_state(o, parts, ctxs, None)
        nxt = self._next_blocked.get(info.name)
        if nxt is not None and self._early is not None and (method.small_fuse_state
                                                            or nxt.info.numel * 4 <= EARLY_STATE_BYTES):
            threads, group = torch.get_num_threads(), self.pool.group_parts([])
            nxt_ctxs = [method.context_for(c, nxt.info) for c in self.ctxs]
            self._early.start(nxt.info.name, lambda: on_threads(threads, self._fuse_state, nxt, group, nxt_ctxs,
                                                                "early-base"))
        for sub, b, block_parts, start in self._blocks(o, parts, base_rows=base_rows,
                                                       read_base=method.fuse_block_base):
            delta = method.fuse_block(sub, b, block_parts, ctxs, state, start)
            _check_shape(method.name, sub, delta)
            yield delta if method.fuse_gives_weights else torch.add(b, delta, out=scratch("merged", sub.shape))
            del b, delta, block_parts

    def _fuse_state(self, o: OutTensor, parts: GroupParts, ctxs: list[ExpertContext],
                    slot: str | None) -> tuple[Any, dict[int, torch.Tensor] | None]:
        """The method's fuse_state of one blocked tensor, and the base's float32 rows its first
        pass read (by first flat index) when the tensor takes at most STATE_BASE_BYTES in
        float32, for the merge pass to use instead of reading them again (None otherwise, or
        when the method read nothing). `slot`: None on the merging thread; a base slot name on
        the early thread, whose parts need no sides' block states."""
        keep = o.info.numel * 4 <= STATE_BASE_BYTES
        kept: dict[int, torch.Tensor] = {}

        def passes() -> Iterator[tuple[torch.Tensor, Any]]:
            blocks = (self._blocks(o, parts) if slot is None
                      else self._blocks(o, parts, [None] * len(self.ctxs), slot))
            for _, b, p, start in blocks:
                if keep:
                    kept.setdefault(start, b)
                yield b, p

        state = self.plan.method.fuse_state(o.info, passes, ctxs)
        return state, (kept if len(kept) == len(o.blocks) else None)

    def _blocks(self, o: OutTensor, parts: GroupParts, states: list[Any] | None = None, slot: str = "base",
                base_rows: dict[int, torch.Tensor] | None = None,
                read_base: bool = True) -> Iterator[tuple[TensorInfo, torch.Tensor | None, Any, int]]:
        """(block info, base rows, parts, first flat index), block after block: one pass.
        `states`: the sides' block states, asked of the pool when None; `base_rows`: the base's
        rows by first flat index, read here when None; `read_base` False: none read, the base
        rows are None (the method's fuse_block reads none, `fuse_block_base`)."""
        spec, info = self.plan.spec, o.info
        row = info.numel // info.shape[0] if info.shape[0] else 0
        if states is None:
            states = self.pool.block_states(info, list(o.blocks))  # e.g. TIES: each expert's trim threshold

        def block(k: int) -> tuple[TensorInfo, torch.Tensor | None, Any, int]:
            r0, r1 = o.blocks[k]
            sub = replace(info, shape=(r1 - r0, *info.shape[1:]))
            if base_rows is not None:
                b = base_rows[r0 * row]
            elif read_base:
                b = read_to_float32(self._base, info.name, spec.base, slot=f"{slot}{k % 2}", rows=(r0, r1))
            else:
                b = None
            return sub, b, parts.rows(sub, b, (r0, r1), states), r0 * row

        # One block ahead: the next block's parts exist before this one is fused, so the
        # pool may start them while this thread fuses, adds and writes (LocalPool).
        cur = block(0) if o.blocks else None
        for k in range(1, len(o.blocks) + 1):
            nxt = block(k) if k < len(o.blocks) else None
            assert cur is not None
            yield cur
            cur = nxt

    def _restore(self, g: Group, sink: OutputSink | SpillSink) -> None:
        """A group finished by an earlier run of this job, from the resume store."""
        assert self._store is not None
        tensors, norms = self._store.load(g.index)
        if isinstance(sink, SpillSink):  # its updates stay in the store, read by layer_scales
            sink.restored(norms)
            return
        for o in g.tensors:
            if o.how == "copy":
                sink.copy(o, self._base_copy(o))
            elif o.info.name in tensors:
                sink.add_final(o, tensors[o.info.name])
            else:  # staged as row blocks: read back the same way
                blocks = list(o.blocks) or [(0, o.info.shape[0])]
                sink.add_restored_blocks(o, self._store.rows(g.index, o.info.name, blocks))

    # -- helpers ---------------------------------------------------------------------------
    def _base_copy(self, o: OutTensor) -> Iterator[torch.Tensor]:
        """A `copy` tensor's value: the base's, in the output dtype (a tensor not floating, or
        one no expert changes, MergePlan.copies_base), as row blocks of about `block_bytes`
        (in float32) read one at a time: a large one (an embedding) is never held whole."""
        name = o.info.name
        blocks = row_blocks(o.info.shape, self.block_bytes)
        if blocks is None:
            yield self._base.get(name).to(o.dtype)
            return
        for rows in blocks:
            yield self._base.get(name, rows=rows).to(o.dtype)

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 4)
        log.info("stage %s done in %.2fs", name, self.timings[name])

    @contextmanager
    def _spill_dir(self) -> Iterator[Path]:
        """The resume store's directory, or a temporary one removed afterwards."""
        if self._store is not None:
            yield self._store.root
            return
        root = Path(tempfile.mkdtemp(prefix="esm-ray-spill-"))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _advance(self, bar, n: int, total: int) -> None:
        bar.update(n)
        if self.on_progress is not None:
            self.on_progress(n, total)

    def _report(self, method, elapsed: float) -> dict[str, Any]:
        spec, plan = self.plan.spec, self.plan
        rep: dict[str, Any] = {
            "format": "esm-ray/merge-report/1",
            "method": method.name,
            "params": method.params.model_dump(mode="json", by_alias=True),
            "purify": ({"name": plan.purifier.name, "params": plan.purifier.params.model_dump(mode="json")}
                       if plan.purifier else None),
            "base": {"uri": spec.base, "fingerprint": plan.base_fingerprint},
            "experts": [{"name": e.name, "uri": e.model, "fingerprint": fp, "weight": e.weight,
                         "density": e.density, "data": e.data}
                        | ({"lora": plan.adapters[e.name]} if e.name in plan.adapters else {})
                        for e, fp in zip(spec.experts, plan.expert_fingerprints)],
            "dtype": str(plan.out_dtype).removeprefix("torch."),
            "seed": spec.seed,
            "executor": self.executor,
            "devices": dict(self.devices),
            "calibration": spec.calibration.model_dump(mode="json") if plan.needs_stats else None,
            "tensors": len(plan.names),
            "timings_s": dict(self.timings, total=round(elapsed, 4)),
            "versions": _versions(),
        }
        if self._store is not None:
            rep["resume"] = {"groups": self._store.total, "restored": self._store.restored}
        if self._rescaled is not None:
            rep["rescale"] = self._rescaled
        if self._row_blocks is not None:  # tensors merged in row blocks (this run)
            rep["row_blocks"] = dict(self._row_blocks)
        extra = method.report()
        if extra is not None:
            rep["method_report"] = extra
        purify_extra = plan.purifier.report() if plan.purifier is not None else None
        if purify_extra is not None:
            rep["purify_report"] = purify_extra
        return rep

    def _write_aux(self, writer: ShardedWriter, base, report: dict[str, Any]) -> None:
        out_dtype = str(self.plan.out_dtype).removeprefix("torch.")
        tok = None
        if self.plan.spec.tokenizer is not None:  # tokenizer files from that model, the rest from the base
            tok = open_model(self.plan.spec.tokenizer, self.plan.spec.s3)
        try:
            names = model_files(base.aux_names())
            if tok is not None:
                names = [n for n in names if not is_tokenizer_file(n)] + \
                        [n for n in model_files(tok.aux_names()) if is_tokenizer_file(n)]
            for name in names:
                src = tok if tok is not None and is_tokenizer_file(name) else base
                self._write_one_aux(writer, name, src.read_aux(name), out_dtype)
        finally:
            if tok is not None:
                tok.close()
        writer.write_file("merge_report.json", json.dumps(report, indent=2).encode())

    @staticmethod
    def _write_one_aux(writer: ShardedWriter, name: str, data: bytes, out_dtype: str) -> None:
        if name == "config.json":
            cfg = json.loads(data)
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = out_dtype
            data = json.dumps(cfg, indent=2).encode()
        writer.write_file(name, data)


def _check_shape(method: str, info: TensorInfo, delta: torch.Tensor) -> None:
    if tuple(delta.shape) != info.shape:
        raise RuntimeError(f"method {method!r} returned shape {tuple(delta.shape)} for tensor {info.name!r} "
                           f"(expected {info.shape})")
