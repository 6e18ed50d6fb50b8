"""The routed directory's on-disk format: written by the routed methods (esm_pp, sim), read by
`esm_ray.routed.load`. Beside the merged base in HF layout:

    routed/manifest.json          tasks, routers, rank, routed layers, heads, SiM settings
    routed/experts.safetensors    "<module>.B" (T, d_out, r), "<module>.A" (T, r, d_in)
    routed/router.safetensors     "prototype.<module>" (T, d_in); "sim.mean", "sim.basis"
    routed/backbone.safetensors   SiM: the pretrained backbone for the feature pass
    heads/<task>.safetensors      each task's head: weight, bias

A causal LM's routed directory holds PEFT adapters and router/ instead (esm_ray.routed.lm_format).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from esm_ray.core.dtypes import DTYPES

# Routed linears by default: every attention and MLP linear of a block, as in the RoBERTa
# recipe of ESM++ (BERT/RoBERTa: query, key, value, attention output, intermediate, output;
# LLaMA: q/k/v/o projections, gate, up, down). Matched with re.search on module names.
DEFAULT_ROUTED_LAYERS = (
    r"(^|\.)(encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
    r"|layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj)))$"
)

RouterKind = Literal["prototype", "sim", "oracle", "none"]
ROUTER_KINDS: tuple[str, ...] = ("prototype", "sim", "oracle", "none")

# ---- the routed directory (written by the esm_pp / sim methods, read by esm_ray.routed) -----

ROUTED_FORMAT = "esm-ray/routed/1"
MANIFEST_FILE = "routed/manifest.json"
EXPERTS_FILE = "routed/experts.safetensors"   # "<module>.B" (T, d_out, r), "<module>.A" (T, r, d_in)
ROUTER_FILE = "routed/router.safetensors"     # "prototype.<module>" (T, d_in); "sim.mean", "sim.basis"
BACKBONE_FILE = "routed/backbone.safetensors"  # SiM: the pretrained backbone for the feature pass
HEADS_DIR = "heads"                            # "heads/<task>.safetensors": weight, bias
EXPERT_DTYPES = DTYPES  # the dtypes experts may be stored in, by name
SIM_MEAN_KEY = "sim.mean"
SIM_BASIS_KEY = "sim.basis"


def expert_keys(module: str) -> tuple[str, str]:
    """Keys of a layer's stacked factors in EXPERTS_FILE: (B, A)."""
    return f"{module}.B", f"{module}.A"


def prototype_key(module: str) -> str:
    return f"prototype.{module}"


def head_file(task: str) -> str:
    """Relative path of a task's head; the task name is made safe for a file name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task).lstrip(".") or "task"
    return f"{HEADS_DIR}/{safe}.safetensors"


def pack_routed(experts: dict[str, tuple[Tensor, Tensor]], prototypes: dict[str, Tensor] | None = None,
                sim_means: Tensor | None = None, sim_bases: Tensor | None = None,
                expert_dtype: torch.dtype = torch.float16) -> dict[str, dict[str, Tensor]]:
    """The tensors of the routed files: {EXPERTS_FILE: {...}, ROUTER_FILE: {...}}.

    experts:    {module: (B (T, d_out, r), A (T, r, d_in))}, stored in expert_dtype
    prototypes: {module: (T, d_in)}, stored in float32
    sim_means, sim_bases: (T, d) and (T, d, k), stored in float32
    """
    ex: dict[str, Tensor] = {}
    for module, (b, a) in experts.items():
        kb, ka = expert_keys(module)
        ex[kb] = b.to(expert_dtype).contiguous()
        ex[ka] = a.to(expert_dtype).contiguous()
    rt: dict[str, Tensor] = {}
    for module, p in (prototypes or {}).items():
        rt[prototype_key(module)] = p.to(torch.float32).contiguous()
    if sim_means is not None and sim_bases is not None:
        rt[SIM_MEAN_KEY] = sim_means.to(torch.float32).contiguous()
        rt[SIM_BASIS_KEY] = sim_bases.to(torch.float32).contiguous()
    return {EXPERTS_FILE: ex, ROUTER_FILE: rt}


def unpack_routed(modules: list[str], experts: dict[str, Tensor], router: dict[str, Tensor]
                  ) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor], Tensor | None, Tensor | None]:
    """Inverse of pack_routed for the listed modules: (experts, prototypes, sim_means, sim_bases)."""
    ex: dict[str, tuple[Tensor, Tensor]] = {}
    protos: dict[str, Tensor] = {}
    for module in modules:
        kb, ka = expert_keys(module)
        if kb not in experts or ka not in experts:
            raise KeyError(f"routed experts of layer {module!r} are missing")
        ex[module] = (experts[kb], experts[ka])
        pk = prototype_key(module)
        if pk in router:
            protos[module] = router[pk]
    return ex, protos, router.get(SIM_MEAN_KEY), router.get(SIM_BASIS_KEY)


def routed_manifest(*, method: str, tasks: list[str], router: str, rank: int, expert_dtype: str,
                    layers: dict[str, tuple[int, int]], routers: list[str], sim: dict[str, Any] | None = None,
                    heads: dict[str, dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """The JSON manifest of a routed directory (MANIFEST_FILE).

    layers: {module: (d_out, d_in)} of the routed linears, in model order
    routers: the routers the stored state supports, e.g. ["prototype", "sim"]
    sim:    SiM settings (rank, center, normalize, relative, samples, backbone)
    heads:  {task: {"file": relative path, "labels": [...]}}
    """
    return {"format": ROUTED_FORMAT, "method": method, "tasks": list(tasks), "router": router,
            "routers": list(routers), "rank": int(rank), "expert_dtype": expert_dtype,
            "layers": [{"module": m, "d_out": int(o), "d_in": int(i)} for m, (o, i) in layers.items()],
            "sim": sim, "heads": heads or {}, **extra}
