"""`output_format: peft`: the merge written as one PEFT LoRA adapter on the original base.

The targets of the written adapter are the union of the input adapters' LoRA targets; its
`modules_to_save` the union of theirs. For each target the method's update is kept factored
(`MergeMethod.fuse_lowrank`: the exact concatenation of linear / task arithmetic, TSV-M's and
ESM's polar factors) or, for a method without a factored update, taken from the thin SVD of its
dense update (one tensor at a time). `peft.rank` / `peft.energy` then re-decompose each update
(core.lora.truncate). A tensor outside the targets and the saved modules must come out equal to
the base's: an adapter cannot carry it, and the job fails naming it (merge to a dense model
instead). Every update's scale is folded into its B factor, so the config says
lora_alpha = r (scale 1) per target, with `rank_pattern` / `alpha_pattern` where a target's rank
differs from the most common one.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from esm_ray.core.arithmetic import is_zero
from esm_ray.core.lora import LowRank, lowrank_of_dense, truncate
from esm_ray.errors import SpecError
from esm_ray.io.adapter import AdapterModel
from esm_ray.io.composite import open_expert
from esm_ray.io.lora_config import CONFIG_NAME, WEIGHTS_NAME
from esm_ray.io.writer import ShardedWriter
from esm_ray.methods import ExpertContext, Parts, TensorInfo
from esm_ray.runtime.layout import OutTensor
from esm_ray.runtime.memory import read_to_float32
from esm_ray.spec import MergeSpec

if TYPE_CHECKING:
    from esm_ray.runtime.job import MergeJob

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class OutTarget:
    """How one target is stored: `swap` for embeddings and fan_in_fan_out (ΔW stored = (BA)ᵀ)."""

    swap: bool
    embedding: bool


@dataclass
class AdapterLayout:
    targets: dict[str, OutTarget]
    saved: set[str]
    task_type: str | None


def adapter_layout(spec: MergeSpec) -> AdapterLayout:
    """The written adapter's targets and saved modules from the experts (SpecError without any
    adapter)."""
    targets: dict[str, OutTarget] = {}
    saved: set[str] = set()
    task_types: list[str] = []
    for i in range(len(spec.experts)):
        r = open_expert(spec, i)
        try:
            if not isinstance(r, AdapterModel):
                continue
            for name, t in r.targets().items():
                targets[name] = OutTarget(t.swap, t.embedding)
            saved.update(r.saved())
            if r.lora_config.task_type:
                task_types.append(r.lora_config.task_type)
        finally:
            r.close()
    if not targets and not saved:
        raise SpecError("field `output_format`: 'peft' writes a LoRA adapter, which needs LoRA adapter "
                        "experts; no expert is one")
    return AdapterLayout(targets, saved, task_types[0] if task_types else None)


def merge_to_adapter(job: "MergeJob", infos: list[TensorInfo], t_start: float) -> None:
    """Fuse the adapter's tensors, apply the method's layer scales, write and commit
    (`t_start`: when the job began, time.perf_counter(), for the report's total)."""
    plan, spec, method = job.plan, job.plan.spec, job.plan.method
    layout = adapter_layout(spec)
    updates: dict[str, LowRank] = {}
    deltas: dict[str, Tensor] = {}
    # Without layer scales (a pass over all updates) each update is truncated (peft.rank /
    # energy) and put into its written form at once: memory holds the output adapter, not the
    # float32 factors of every target.
    final = not plan.spilled
    truncating = spec.peft.rank is not None or spec.peft.energy is not None
    lora_out: dict[str, Tensor] = {}
    saved_out: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    with job._stage("fuse"):
        for info in infos:
            name = info.name  # every tensor: a method may change one no expert changed (passthrough's scale)
            if name not in layout.targets and name not in layout.saved:
                if not plan.copies_base(name) and not _comes_out_as_base(job, info):
                    raise SpecError(f"field `output_format`: tensor {name!r} changes in the merge but is no LoRA "
                                    "target and no saved module of any adapter, so an adapter cannot hold it; "
                                    "merge to a dense model (output_format: dense)")
                continue
            base, parts, ctxs = _whole(job, info)
            if name in layout.targets:
                low = method.fuse_lowrank(info, base, parts, ctxs)
                updates[name] = low if low is not None else lowrank_of_dense(method.update_of(info, base, parts, ctxs))
            else:
                deltas[name] = method.update_of(info, base, parts, ctxs)
            if final:
                if truncating and name in updates:
                    updates[name] = truncate(updates[name], spec.peft.rank, spec.peft.energy)
                _written(updates, deltas, layout, job, plan.out_dtype, lora_out, saved_out, ranks)
    if method.needs_layer_scales:
        with job._stage("layer_scaling"):
            norms = {n: u.norm() for n, u in updates.items()} | {n: float(d.norm()) for n, d in deltas.items()}
            scales = method.layer_scales({i.name: i for i in infos}, norms)
            updates = {n: u.scaled(scales.get(n, 1.0)) for n, u in updates.items()}
            deltas = {n: d * scales.get(n, 1.0) for n, d in deltas.items()}
    if plan.rescale is not None:  # each update's output-shift factor, from its dense form
        with job._stage("rescale"):
            order = [i.name for i in infos if i.name in updates or i.name in deltas]
            factors = job.rescale_factors({i.name: i for i in infos}, order, lambda names: (
                updates[n].dense() if n in updates else deltas[n] for n in names))
            updates = {n: u.scaled(factors.get(n, 1.0)) for n, u in updates.items()}
            deltas = {n: d * factors.get(n, 1.0) for n, d in deltas.items()}
    if truncating:
        updates = {n: truncate(u, spec.peft.rank, spec.peft.energy) for n, u in updates.items()}
    _written(updates, deltas, layout, job, plan.out_dtype, lora_out, saved_out, ranks)
    tensors = {**lora_out, **saved_out}
    saved_names = sorted(k.removeprefix(_PREFIX).removesuffix(".weight") for k in saved_out)
    config = _config(ranks, layout, saved_names, spec)
    with ShardedWriter(spec.output, spec.shard_bytes, overwrite=spec.overwrite, s3=spec.s3) as writer:
        writer.write_tensors(WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        writer.write_file(CONFIG_NAME, json.dumps(config, indent=2).encode())
        job._report_data = job._report(method, time.perf_counter() - t_start)
        job._report_data["output"] = {"format": "peft", "targets": len(ranks), "ranks": ranks,
                                      "modules_to_save": config["modules_to_save"]}
        writer.write_file("merge_report.json", json.dumps(job._report_data, indent=2).encode())
        writer.commit()


def _whole(job: "MergeJob", info: TensorInfo) -> tuple[Tensor, Parts, list[ExpertContext]]:
    """What the method fuses of a whole tensor: the float32 base, the experts' parts, their contexts."""
    method = job.plan.method
    base = job._base.get(info.name).to(torch.float32)
    return base, job.pool.group_parts([info]).of(0, info, base), [method.context_for(c, info) for c in job.ctxs]


def _comes_out_as_base(job: "MergeJob", info: TensorInfo) -> bool:
    """Whether the merge leaves tensor `info` (no LoRA target, no saved module) equal to the
    base's, entry by entry. A large tensor of a blockwise method is merged in row blocks as the
    dense output would be (the embedding of an adapter merge is never held whole in float32);
    otherwise whole, ΔW == 0."""
    plan, method = job.plan, job.plan.method
    blocks = plan.in_blocks(info, job.block_bytes, job.pool.block_parts) if job.pool.blockwise else None
    if not blocks:
        delta = method.update_of(info, *_whole(job, info))
        return is_zero(delta)
    o = OutTensor(info, plan.out_dtype, 0, 0, "blocks", tuple(blocks))
    merged = job._merged_blocks(o, job.pool.group_parts([]))
    for rows, block in zip(blocks, merged):
        b = read_to_float32(job._base, info.name, plan.spec.base, slot="unchanged", rows=rows)
        if not torch.equal(block, b):
            merged.close()
            return False
    return True


def _written(updates: dict[str, LowRank], deltas: dict[str, Tensor], layout: AdapterLayout, job: "MergeJob",
             dtype: torch.dtype, lora_out: dict[str, Tensor], saved_out: dict[str, Tensor],
             ranks: dict[str, int]) -> None:
    """Move the updates and deltas into the adapter's tensors under peft's names (`lora_out`,
    `saved_out`, in dtype) and each written target's rank (`ranks`); empties both inputs."""
    for name, u in updates.items():
        if u.rank == 0:
            continue  # no update: the module is left out
        module = name.removesuffix(".weight")
        t = layout.targets[name]
        b, a = (u.a.T, u.b.T) if t.swap else (u.b, u.a)  # peft's B (d_out, R), A (R, d_in)
        keys = ("lora_embedding_A", "lora_embedding_B") if t.embedding else ("lora_A.weight", "lora_B.weight")
        lora_out[f"{_PREFIX}{module}.{keys[0]}"] = a.to(dtype).contiguous()
        lora_out[f"{_PREFIX}{module}.{keys[1]}"] = b.to(dtype).contiguous()
        ranks[module] = u.rank
    for name, d in deltas.items():
        saved_out[f"{_PREFIX}{name}"] = (job._base.get(name).to(torch.float32) + d).to(dtype).contiguous()
    updates.clear()
    deltas.clear()


def _config(ranks: dict[str, int], layout: AdapterLayout, saved_modules: list[str], spec: MergeSpec) -> dict:
    """adapter_config.json: plain LoRA, scale 1 on every target (lora_alpha = r)."""
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    linear_swap = any(t.swap and not t.embedding for n, t in layout.targets.items()
                      if n.removesuffix(".weight") in ranks)
    return {"peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "modules_to_save": sorted(saved_modules) or None,
            "use_rslora": False, "use_dora": False, "fan_in_fan_out": linear_swap, "bias": "none",
            "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": spec.base, "task_type": layout.task_type}
