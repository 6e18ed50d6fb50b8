"""A routed model written as a routed directory (esm_ray.routed.format): the merged base in HF
layout, then routed/*, heads/* and the manifest; a causal LM's as one PEFT LoRA adapter per task
and router/* (esm_ray.routed.lm_format), as the esm_pp / sim methods write them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from esm_ray.models.hf import is_causal_lm
from esm_ray.routed.lm_format import LM_BACKBONE_FILE, pack_lm
from esm_ray.routed.format import (BACKBONE_FILE, EXPERT_DTYPES, MANIFEST_FILE, head_file, pack_routed,
                                   routed_manifest)

if TYPE_CHECKING:
    from esm_ray.routed.model import RoutedModel

__all__ = ["save", "state_files"]


def save(model: RoutedModel, path: str | Path, expert_dtype: str | None = None) -> Path:
    """Write the routed directory: merged base (HF layout), routed/*, heads/*."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with model.unwrapped() as plain:
        plain.save_pretrained(str(out))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    files = state_files(model, expert_dtype)
    for rel, data in files.items():
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            p.write_bytes(data)
        else:
            save_file(data, str(p))
    return out


def state_files(model: RoutedModel, expert_dtype: str | None = None) -> dict[str, dict[str, Tensor] | bytes]:
    """{relative path: tensors or bytes} of everything but the merged base."""
    dt = expert_dtype or model.manifest.get("expert_dtype", "float32")
    experts = {m: (r.expert_B, r.expert_A) for m, r in model.routed.items()}
    protos = {m: r.prototypes for m, r in model.routed.items() if r.prototypes is not None}
    if is_causal_lm({"architectures": getattr(model.model.config, "architectures", None)}) and experts:
        return _lm_files(model, dt, experts, protos)
    files: dict[str, Any] = dict(pack_routed(experts, protos, model.sim.means if model.sim else None,
                                             model.sim.bases if model.sim else None, EXPERT_DTYPES[dt]))
    heads_meta = {}
    for task, h in model.heads.items():
        rel = head_file(task)
        files[rel] = {"weight": h.linear.weight.detach().float().contiguous(),
                      "bias": h.linear.bias.detach().float().contiguous()}
        heads_meta[task] = {"file": rel, "labels": list(h.labels)}
    sim_meta = dict(model.manifest.get("sim") or {}) if model.sim is not None else None
    if sim_meta is not None and model.backbone is not None:
        files[BACKBONE_FILE] = {k: v.contiguous() for k, v in model.backbone.state_dict().items()}
        sim_meta.update(backbone=BACKBONE_FILE, normalize=model.sim.normalize, relative=model.sim.relative)
    extra = {k: v for k, v in model.manifest.items()
             if k not in ("format", "method", "tasks", "router", "routers", "rank", "expert_dtype", "layers",
                          "sim", "heads")}
    man = routed_manifest(method=model.manifest.get("method", "routed"), tasks=model.tasks, router=model.router,
                          rank=model.rank, expert_dtype=dt,
                          layers={m: (r.out_features, r.in_features) for m, r in model.routed.items()},
                          routers=[r for r in model.routers if r in ("prototype", "sim")], sim=sim_meta,
                          heads=heads_meta, **extra)
    files[MANIFEST_FILE] = json.dumps(man, indent=2).encode()
    return files


def _lm_files(model: RoutedModel, dt: str, experts: dict[str, tuple[Tensor, Tensor]],
              protos: dict[str, Tensor]) -> dict[str, dict[str, Tensor] | bytes]:
    """A causal LM's adapters/<task>/* and router/* (with the SiM backbone when it has one)."""
    sim_meta = dict(model.manifest.get("sim") or {}) if model.sim is not None else None
    files: dict[str, dict[str, Tensor] | bytes] = {}
    if sim_meta is not None and model.backbone is not None:
        files[LM_BACKBONE_FILE] = {k: v.contiguous() for k, v in model.backbone.state_dict().items()}
        sim_meta.update(backbone=LM_BACKBONE_FILE, normalize=model.sim.normalize, relative=model.sim.relative)
    extra = {k: v for k, v in model.manifest.items()
             if k not in ("format", "method", "tasks", "router", "routers", "rank", "expert_dtype", "layers",
                          "sim", "heads", "adapters", "router_file", "routing")}
    man = routed_manifest(method=model.manifest.get("method", "routed"), tasks=model.tasks, router=model.router,
                          rank=model.rank, expert_dtype=dt,
                          layers={m: (r.out_features, r.in_features) for m, r in model.routed.items()},
                          routers=[r for r in model.routers if r in ("prototype", "sim")], sim=sim_meta, **extra)
    files.update(pack_lm(model.tasks, experts, protos, model.sim.means if model.sim else None,
                         model.sim.bases if model.sim else None, EXPERT_DTYPES[dt], man))
    return files
