"""How many bytes a routed model takes, part by part, against T full fine-tuned experts
(served at /v1/model and printed by the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from esm_ray.routed.format import BACKBONE_FILE, EXPERT_DTYPES, EXPERTS_FILE, ROUTER_FILE
from esm_ray.routed.lm_format import ADAPTERS_DIR, LM_BACKBONE_FILE, LM_ROUTER_FILE, is_lm_dir

if TYPE_CHECKING:
    from esm_ray.routed.model import RoutedModel

__all__ = ["sizes"]


def sizes(model: RoutedModel) -> dict[str, Any]:
    """Bytes of each part and of T full experts (the merged model's weights, T times, plus
    the heads). From the files when the model was loaded from a directory."""
    merged = sum(p.numel() * p.element_size() for n, p in model.merged_state().items())
    experts = sum(r.expert_A.numel() + r.expert_B.numel() for r in model.routed.values())
    exp_bytes = experts * EXPERT_DTYPES.get(model.manifest.get("expert_dtype", "float32"), torch.float32).itemsize
    router = sum(r.prototypes.numel() * 4 for r in model.routed.values() if r.prototypes is not None)
    if model.sim is not None:
        router += (model.sim.means.numel() + model.sim.bases.numel()) * 4
    backbone = (sum(p.numel() * p.element_size() for p in model.backbone.state_dict().values())
                if model.backbone is not None else 0)
    heads = sum(h.linear.weight.numel() + h.linear.bias.numel() for h in model.heads.values()) * 4
    d = model.source_dir
    if d is not None:
        merged = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        lm = is_lm_dir(d)  # a causal LM: the experts are the adapters, the router under router/
        exp_bytes = (sum(p.stat().st_size for p in (d / ADAPTERS_DIR).rglob("*.safetensors")) if lm
                     else _size(d / EXPERTS_FILE))
        router = _size(d / (LM_ROUTER_FILE if lm else ROUTER_FILE))
        bb = d / (LM_BACKBONE_FILE if lm else BACKBONE_FILE)
        backbone = _size(bb) if model.backbone is not None and bb.is_file() else 0
        heads = sum(p.stat().st_size for p in (d / "heads").glob("*.safetensors")) if (d / "heads").is_dir() else 0
    total = merged + exp_bytes + router + backbone + heads
    full = len(model.tasks) * merged + heads
    return {"tasks": len(model.tasks), "routed_layers": len(model.routed), "rank": model.rank,
            "merged_bytes": merged, "experts_bytes": exp_bytes, "router_bytes": router,
            "backbone_bytes": backbone, "heads_bytes": heads, "total_bytes": total,
            "full_experts_bytes": full, "ratio_to_full_experts": round(total / full, 4) if full else None}


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else 0
