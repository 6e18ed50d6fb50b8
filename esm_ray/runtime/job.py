"""The coordinator's layer loop, shared by every executor.

Stages: calibration (per expert) -> purifier pre-pass (per expert) and plan (here) ->
merge: per group of tensors, the experts' parts are fused here and streamed to the writer ->
optional global rescaling pass over spilled updates -> commit (index written last).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import esm_ray
from esm_ray.errors import InputError, OutputError
from esm_ray.io.reader import check_finite, open_model
from esm_ray.io.writer import ShardedWriter
from esm_ray.methods import ExpertContext, TensorInfo
from esm_ray.runtime.expert import math_threads, read_to_float32, reuse_freed_memory, scratch, torch_threads
from esm_ray.runtime.plan import BLOCK_BYTES, MergePlan
from esm_ray.runtime.pool import ExpertPool
from esm_ray.runtime.resume import ResumeStore

log = logging.getLogger("esm_ray.job")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class MergeResult:
    output: str
    report: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _groups(infos: list[TensorInfo], max_bytes: int) -> Iterator[list[TensorInfo]]:
    """Consecutive tensors of the same block, up to max_bytes (float32) per group."""
    group: list[TensorInfo] = []
    size = 0
    for info in infos:
        nbytes = info.numel * 4
        if group and (info.layer_index != group[-1].layer_index or size + nbytes > max_bytes):
            yield group
            group, size = [], 0
        group.append(info)
        size += nbytes
    if group:
        yield group


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist: str) -> str:  # from the package metadata: importing transformers takes seconds
        try:
            return version(dist)
        except PackageNotFoundError:
            return "-"

    return {"esm_ray": esm_ray.__version__, "torch": torch.__version__, "transformers": installed("transformers"),
            "safetensors": installed("safetensors"), "python": platform.python_version()}


class MergeJob:
    """Runs one validated plan against an expert pool."""

    def __init__(self, plan: MergePlan, pool: ExpertPool, progress: bool = True, group_bytes: int = 64 << 20,
                 executor: str = "local", resume: bool = False, block_bytes: int = BLOCK_BYTES) -> None:
        self.plan = plan
        # In one process, methods that allow it (MergeMethod.blockwise) merge tensors larger
        # than this (in float32) in row blocks of about this size: peak memory then does not
        # depend on the largest tensor.
        self.block_bytes = block_bytes
        self.resume = resume  # stage finished groups so a killed job can be resumed (runtime/resume.py)
        self._store: ResumeStore | None = None
        self.on_progress: Callable[[int, int], None] | None = None  # (tensors done now, total)
        self.pool = pool
        self.progress = progress
        self.group_bytes = group_bytes
        self.executor = executor
        self.timings: dict[str, float] = {}
        self.devices: dict[str, str] = {}  # expert -> where its side computes (runtime.device)
        self._post: list[tuple[TensorInfo, torch.Tensor]] = []
        self._ctxs = [ExpertContext(i, e.name, e.weight, e.density) for i, e in enumerate(plan.spec.experts)]

    def _emit(self, writer: ShardedWriter, info: TensorInfo, merged: torch.Tensor) -> torch.Tensor:
        """Write one final merged tensor; queue it for the method's post stage if it has one."""
        out = _finish(merged, info.name, self.plan.out_dtype)
        self._emit_out(writer, info, out)
        return out

    def _emit_out(self, writer: ShardedWriter, info: TensorInfo, out: torch.Tensor) -> None:
        writer.add(info.name, out)
        m = self.plan.method
        if m.post_stage and m.post_applies(info):
            # the post stage sees exactly the tensor that was written
            self._post.append((info, out.to(torch.float32)))

    def _flush_post(self) -> None:
        if not self._post:
            return
        infos = [i for i, _ in self._post]
        merged = [t for _, t in self._post]
        parts = self.pool.call("post_prepare", infos, merged)
        for j, (info, m) in enumerate(self._post):
            self.plan.method.post_fuse(info, m, [parts[e][j] for e in range(self.plan.n_experts)], self._ctxs)
        self._post = []

    def _stage(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.perf_counter() - t0, 4)
        log.info("stage %s done in %.2fs", name, self.timings[name])

    def _advance(self, bar, n: int, total: int) -> None:
        bar.update(n)
        if self.on_progress is not None:
            self.on_progress(n, total)

    def _restore(self, writer: ShardedWriter, base, gi: int, group: list[TensorInfo], is_float: set[str],
                 norms: dict[str, float], spilled: bool) -> None:
        """Take a finished group from the resume store instead of computing it again."""
        assert self._store is not None
        tensors, group_norms = self._store.load(gi)
        norms.update(group_norms)
        if not spilled:  # staged: the exact tensors the writer got
            for info in group:
                if info.name in is_float:
                    self._emit_out(writer, info, tensors[info.name])
                else:
                    writer.add(info.name, base.get(info.name))
        self._flush_post()

    def _emit_blocks(self, writer: ShardedWriter, base, info: TensorInfo, blocks: list[tuple[int, int]],
                     local_parts, ctxs) -> None:
        """Merge one tensor a row block at a time (a blockwise method), straight into the writer:
        the same bytes as the whole-tensor path, with memory bounded by the block."""
        spec, method = self.plan.spec, self.plan.method
        states = self.pool.block_states(info, blocks)  # e.g. TIES: each expert's trim threshold

        def merged_blocks() -> Iterator[torch.Tensor]:
            for r0, r1 in blocks:
                sub = replace(info, shape=(r1 - r0, *info.shape[1:]))
                b = read_to_float32(base, info.name, spec.base, slot="base", rows=(r0, r1))
                delta = method.fuse(sub, b, local_parts(sub, b, rows=(r0, r1), states=states), ctxs)
                if tuple(delta.shape) != sub.shape:
                    raise RuntimeError(f"method {method.name!r} returned shape {tuple(delta.shape)} for rows "
                                       f"{r0}:{r1} of tensor {info.name!r} (expected {sub.shape})")
                merged = torch.add(b, delta, out=scratch("merged", sub.shape))
                yield _finish(merged, info.name, self.plan.out_dtype)
                b = delta = merged = None

        writer.add_blocks(info.name, self.plan.out_dtype, info.shape, merged_blocks())

    def run(self) -> MergeResult:
        with torch_threads(math_threads(self.plan.spec)), reuse_freed_memory():  # same bits in every executor
            return self._run()

    def _run(self) -> MergeResult:
        plan, spec, method = self.plan, self.plan.spec, self.plan.method
        t_all = time.perf_counter()
        base = open_model(spec.base, spec.s3)

        # Resolving runtime.device on every side first fails early where it cannot be used.
        self.devices = dict(zip((e.name for e in spec.experts), self.pool.call("device_name")))
        modules: set[str] = set()
        if plan.needs_stats:
            t0 = time.perf_counter()
            log.info("calibration: %d experts", plan.n_experts)
            per_expert = self.pool.call("calibrate")
            modules = set(per_expert[0])
            self._stage("calibration", t0)

        infos = [TensorInfo.of(n, plan.shapes[n], _module(n, modules)) for n in plan.names]
        floating = [i for i in infos if plan.dtypes[i.name].is_floating_point]
        is_float = {i.name for i in floating}
        by_name = {i.name: i for i in infos}

        if plan.purifier is not None and plan.purifier.has_prepass:
            t0 = time.perf_counter()
            targets = [i for i in floating if plan.purifier.applies(i)]
            summaries = self.pool.call("prepass", targets)
            table = {info.name: [summaries[e][j] for e in range(plan.n_experts)] for j, info in enumerate(targets)}
            plans = plan.purifier.plan(table, by_name)
            self.pool.call_each("set_plan", [(p,) for p in plans])
            self._stage("purify_plan", t0)

        if method.needs_support_features:
            t0 = time.perf_counter()
            method.support_fuse(self.pool.call("support_features"), self._ctxs)
            self._stage("support", t0)

        if method.search_stage:  # Concrete / AdaMerging: learn the mask and coefficients first
            from esm_ray.runtime.search import run_search

            t0 = time.perf_counter()
            run_search(method, self.pool, plan, floating, progress=self.progress)
            self._stage("search", t0)

        ctxs = [ExpertContext(i, e.name, e.weight, e.density) for i, e in enumerate(spec.experts)]
        groups = list(_groups(infos, self.group_bytes))
        store = self._store = ResumeStore.open(plan, self.group_bytes, math_threads(spec)) if self.resume else None
        staged = (store.scan([[i.name for i in g if i.name in is_float] for g in groups]) if store is not None
                  else [False] * len(groups))
        spill_dir = ((store.root if store is not None else Path(tempfile.mkdtemp(prefix="esm-ray-spill-")))
                     if method.needs_layer_scales else None)
        norms: dict[str, float] = {}
        local_parts = getattr(self.pool, "parts", None)  # LocalPool: parts on demand, see pool.LazyParts
        blockwise = local_parts is not None and store is None  # in one process, not staging groups
        t0 = time.perf_counter()
        try:
            layout = _write_order(groups, is_float, spill_dir is not None, plan)
            with ShardedWriter(spec.output, spec.shard_bytes, overwrite=spec.overwrite, s3=spec.s3,
                               plan=layout) as writer:
                bar = tqdm(total=len(infos), desc=f"merge {method.name}", unit="tensor", disable=not self.progress)
                fused: dict[str, torch.Tensor] = {}
                for gi, group in enumerate(groups):
                    if staged[gi]:
                        self._restore(writer, base, gi, group, is_float, norms, spill_dir is not None)
                        self._advance(bar, len(group), len(infos))
                        continue
                    work = [i for i in group if i.name in is_float]
                    if local_parts is None:
                        parts = self.pool.call("prepare", work) if work else [[] for _ in range(plan.n_experts)]
                    tg = time.perf_counter()
                    done: dict[str, torch.Tensor] = {}
                    for j, info in enumerate(work):
                        blocks = plan.in_blocks(info, self.block_bytes) if blockwise else None
                        if blocks is not None:
                            self._emit_blocks(writer, base, info, blocks, local_parts, ctxs)
                            continue
                        if local_parts is None:
                            b = base.get(info.name).to(torch.float32)
                            delta = method.fuse(info, b, [parts[e][j] for e in range(plan.n_experts)], ctxs)
                        else:  # in-process sides: one base read for all, parts made as fuse reads them
                            b = read_to_float32(base, info.name, spec.base, slot="base")
                            delta = method.fuse(info, b, local_parts(info, b), ctxs)
                        if tuple(delta.shape) != info.shape:
                            raise RuntimeError(f"method {method.name!r} returned shape {tuple(delta.shape)} "
                                               f"for tensor {info.name!r} of shape {info.shape}")
                        if spill_dir is not None:
                            norms[info.name] = float(torch.linalg.vector_norm(delta))
                            fused[info.name] = delta.contiguous()
                        elif b.dtype == delta.dtype == torch.float32:  # b + delta into a reused buffer
                            merged = torch.add(b, delta, out=scratch("merged", info.shape))
                            done[info.name] = self._emit(writer, info, merged)
                        else:
                            done[info.name] = self._emit(writer, info, b + delta)
                        b = delta = merged = None  # let the next tensor reuse their buffers (expert.scratch)
                    if spill_dir is not None and fused:
                        if store is not None:
                            store.save(gi, fused, {k: norms[k] for k in fused})
                        else:
                            save_file(fused, str(spill_dir / f"group-{gi:05d}.safetensors"))
                        fused = {}
                    elif store is not None and done:
                        store.save(gi, done)
                    self._flush_post()
                    if spill_dir is None:
                        for info in group:
                            if info.name not in is_float:
                                writer.add(info.name, base.get(info.name))
                    log.debug("group %s (%d tensors) fused in %.3fs", group[0].name, len(group),
                              time.perf_counter() - tg)
                    self._advance(bar, len(group), len(infos))
                bar.close()
                if spill_dir is not None:
                    self._stage("fuse", t0)
                    t0 = time.perf_counter()
                    scales = method.layer_scales(by_name, norms)
                    spilled: dict[str, Path] = {}
                    for f in sorted(spill_dir.glob("group-*.safetensors")):
                        from safetensors import safe_open
                        with safe_open(str(f), "pt") as h:
                            for k in h.keys():
                                spilled[k] = f
                    cache: dict[str, torch.Tensor] = {}
                    current: Path | None = None
                    for info in infos:
                        if info.name not in spilled:
                            writer.add(info.name, base.get(info.name))
                            continue
                        if spilled[info.name] != current:
                            current = spilled[info.name]
                            cache = load_file(str(current))
                        delta = cache.pop(info.name) * scales.get(info.name, 1.0)
                        b = base.get(info.name).to(torch.float32)
                        self._emit(writer, info, b + delta)
                        if len(self._post) >= 8:
                            self._flush_post()
                    self._flush_post()
                    self._stage("layer_scaling", t0)
                else:
                    self._stage("fuse", t0)
                for rel, data in method.artifacts().items():
                    writer.write_file(rel, data)
                report = self._report(method, time.perf_counter() - t_all)
                self._write_aux(writer, base, report)
                writer.commit()
            if store is not None:
                store.remove()  # the output is committed; staged groups are no longer needed
        finally:
            if spill_dir is not None and store is None:
                shutil.rmtree(spill_dir, ignore_errors=True)
            base.close()
        self.timings["total"] = round(time.perf_counter() - t_all, 4)
        log.info("merged %d tensors with %s into %s in %.2fs", len(infos), method.name, spec.output,
                 self.timings["total"])
        return MergeResult(spec.output, report, dict(self.timings))

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
        extra = getattr(method, "report", None)
        if callable(extra):
            rep["method_report"] = extra()
        purify_extra = getattr(plan.purifier, "report", None) if plan.purifier is not None else None
        if callable(purify_extra):
            rep["purify_report"] = purify_extra()
        return rep

    def _write_aux(self, writer: ShardedWriter, base, report: dict[str, Any]) -> None:
        out_dtype = str(self.plan.out_dtype).removeprefix("torch.")
        for name in base.aux_names():
            if name in WEIGHT_FILES or name.endswith(".safetensors") or name == "merge_report.json":
                continue
            data = base.read_aux(name)
            if name == "config.json":
                cfg = json.loads(data)
                for key in ("torch_dtype", "dtype"):
                    if key in cfg:
                        cfg[key] = out_dtype
                data = json.dumps(cfg, indent=2).encode()
            writer.write_file(name, data)
        writer.write_file("merge_report.json", json.dumps(report, indent=2).encode())


def _write_order(groups: list[list[TensorInfo]], is_float: set[str], spilled: bool,
                 plan: MergePlan) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every output tensor in the order the merge loop adds them: group by
    group, its floating tensors and then the others; with a spill pass, the model's order. With
    it the writer streams each tensor into its shard file instead of holding a whole shard."""
    def item(info: TensorInfo) -> tuple[str, torch.dtype, tuple[int, ...]]:
        return info.name, plan.out_dtype if info.name in is_float else plan.dtypes[info.name], info.shape

    if spilled:
        return [item(i) for g in groups for i in g]
    return [item(i) for g in groups for i in sorted(g, key=lambda i: i.name not in is_float)]


def _module(name: str, modules: set[str]) -> str | None:
    if name.endswith(".weight") and name[: -len(".weight")] in modules:
        return name[: -len(".weight")]
    return None


def _finish(w: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The merged tensor cast to the output dtype, checked after the cast: a NaN or Inf in the
    result raises InputError, a finite value the output dtype cannot hold (it becomes Inf)
    raises OutputError naming the tensor and the `dtype` field. Nothing reaches the writer."""
    out = w.to(dtype)
    try:
        check_finite(name, out, "merged result")
    except InputError:
        check_finite(name, w, "merged result")  # already NaN/Inf before the cast
        big = float(w.abs().max())
        kind = str(dtype).removeprefix("torch.")
        raise OutputError(f"merged result: tensor '{name}' holds values up to {big:.6g}, beyond the largest "
                          f"finite {kind} ({torch.finfo(dtype).max:.6g}); they would be written as Inf. "
                          f"Set the spec's `dtype` to float32 or bfloat16") from None
    return out
