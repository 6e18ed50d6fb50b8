"""The routed causal-LM layout: ESM++ / SiM residual experts as standard PEFT LoRA adapters.

A routed merge of causal LMs (`method: esm_pp` or `sim` on *ForCausalLM experts) writes, beside
the merged base in HF layout (loadable by AutoModelForCausalLM):

    adapters/<task>/adapter_config.json        one PEFT LoRA adapter per task: target modules =
    adapters/<task>/adapter_model.safetensors  the routed linears, r = rank, lora_alpha = r
                                               (scaling 1), base = "../..", the merged model
                                               relative to the adapter (BASE_REF)
    router/manifest.json                       format, method, tasks, adapter dirs, router, layers
    router/router.safetensors                  "prototype.<module>" (T, d_in); "sim.mean", "sim.basis";
                                               "likelihood.gain" (T,)
    router/backbone.safetensors                SiM: the pretrained backbone for the feature pass

Task t's residual expert at a routed linear is W_m + B_t A_t with B_t (d_out, r), A_t (r, d_in):
exactly a LoRA update with lora_B = B_t, lora_A = A_t and scaling lora_alpha / r = 1. In the
adapter file they are `base_model.model.<module>.lora_A.weight` (A_t) and `...lora_B.weight` (B_t),
the names peft saves and loads. Encoders keep the routed/ layout (esm_ray.routed.format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from esm_ray.errors import InputError
from esm_ray.routed.format import SIM_BASIS_KEY, SIM_MEAN_KEY, prototype_key

LM_FORMAT = "esm-ray/routed-lm/1"
ADAPTERS_DIR = "adapters"
LM_MANIFEST_FILE = "router/manifest.json"
LM_ROUTER_FILE = "router/router.safetensors"
LM_BACKBONE_FILE = "router/backbone.safetensors"
GAIN_KEY = "likelihood.gain"  # (T,) in router.safetensors: each task's log-likelihood gain over the base
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# how a routed LM picks one adapter per sequence (written into the manifest, shown by the server)
# base_model_name_or_path of every adapter: the merged model, as a path relative to the adapter's
# directory, so the output reads the same wherever it is written, copied or cached
BASE_REF = "../.."
ROUTING_RULES = {
    "prototype": "one router pass of the merged base (no adapter) over the prompt; per sequence the "
                 "cosine of each routed layer's token-mean input with that layer's task prototypes, "
                 "summed over the routed layers; top-1 task; held for every generated token",
    "sim": "one pass of the pretrained backbone over the prompt; its mean last hidden state scored "
           "against each task's SiM subspace; top-1 task; held for every generated token",
    "likelihood": "the prototype router's pass; when its top-1 task is one whose adapter models its own "
                  "task's text better than the base (a positive gain measured at merge time), one "
                  "prefill of the prompt per such adapter (or per each of the likelihood_candidates such "
                  "adapters the prototypes rank highest) and the one giving the prompt the highest "
                  "mean token log-likelihood wins; otherwise, or when the two best such tasks' "
                  "prototype scores differ by at least likelihood_margin per routed layer, the "
                  "prototype top-1; held for every generated token",
}


def adapter_dir(task: str) -> str:
    """Relative directory of a task's adapter; the task name made safe for a path."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in task) or "task"
    return f"{ADAPTERS_DIR}/{safe}"


def adapter_name(task: str) -> str:
    """The adapter's name inside a peft model (its directory's last part)."""
    return adapter_dir(task).rsplit("/", 1)[1]


def lora_keys(module: str) -> tuple[str, str]:
    """peft's saved names of a module's LoRA factors: (lora_A, lora_B)."""
    return f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"


def adapter_config(modules: list[str], rank: int) -> dict[str, Any]:
    """A standard peft LoraConfig (as `LoraConfig.to_dict()` writes it, the fields that matter):
    the routed linears by full name (sorted), rank r, lora_alpha = r so the scaling is 1, the base BASE_REF."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": BASE_REF,
            "r": int(rank), "lora_alpha": int(rank), "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted(modules), "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def unique_dirs(tasks: list[str]) -> dict[str, str]:
    """{task: adapter dir}, made unique when two task names map to one directory."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for task in tasks:
        rel = adapter_dir(task)
        k = 1
        while rel in used:
            rel = f"{adapter_dir(task)}-{k}"
            k += 1
        used.add(rel)
        out[task] = rel
    return out


def pack_lm(tasks: list[str], experts: dict[str, tuple[Tensor, Tensor]], prototypes: dict[str, Tensor],
            sim_means: Tensor | None, sim_bases: Tensor | None, expert_dtype: torch.dtype,
            manifest: dict[str, Any], gains: Tensor | None = None) -> dict[str, dict[str, Tensor] | bytes]:
    """{relative path: tensors or JSON bytes} of the adapters and the router (not the backbone).

    experts:  {module: (B (T, d_out, r), A (T, r, d_in))}, in model order
    manifest: the routed manifest's fields (method, router, routers, rank, layers, sim, ...);
              "format" and "adapters" are set here
    gains:    (T,) each task's log-likelihood gain over the base (the likelihood router), or None
    """
    modules = list(experts)
    rank = int(next(iter(experts.values()))[0].shape[2]) if experts else 0
    dirs = unique_dirs(tasks)
    files: dict[str, dict[str, Tensor] | bytes] = {}
    cfg = json.dumps(adapter_config(modules, rank), indent=2).encode()
    for t, task in enumerate(tasks):
        tensors: dict[str, Tensor] = {}
        for module, (b, a) in experts.items():
            ka, kb = lora_keys(module)
            tensors[ka] = a[t].to(expert_dtype).contiguous()
            tensors[kb] = b[t].to(expert_dtype).contiguous()
        files[f"{dirs[task]}/{ADAPTER_WEIGHTS}"] = tensors
        files[f"{dirs[task]}/{ADAPTER_CONFIG}"] = cfg
    rt = {prototype_key(m): p.to(torch.float32).contiguous() for m, p in prototypes.items()}
    if sim_means is not None and sim_bases is not None:
        rt[SIM_MEAN_KEY] = sim_means.to(torch.float32).contiguous()
        rt[SIM_BASIS_KEY] = sim_bases.to(torch.float32).contiguous()
    if gains is not None:
        rt[GAIN_KEY] = gains.to(torch.float32).contiguous()
    files[LM_ROUTER_FILE] = rt
    man = {**manifest, "format": LM_FORMAT, "tasks": list(tasks), "adapters": dirs,
           "router_file": LM_ROUTER_FILE, "routing": {r: ROUTING_RULES[r] for r in manifest.get("routers", [])
                                                      if r in ROUTING_RULES}}
    files[LM_MANIFEST_FILE] = json.dumps(man, indent=2).encode()
    return files


def is_lm_dir(d: str | Path) -> bool:
    """Whether a directory holds the routed causal-LM layout (router/manifest.json)."""
    return (Path(d) / LM_MANIFEST_FILE).is_file()


def read_lm_manifest(d: Path) -> dict[str, Any]:
    """router/manifest.json, checked: format, tasks, an adapter directory per task. InputError
    naming the file and the field otherwise."""
    p = d / LM_MANIFEST_FILE
    try:
        man = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: not found (a routed causal-LM directory has router/manifest.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{p}: not valid JSON: {err}") from None
    if not isinstance(man, dict) or man.get("format") != LM_FORMAT:
        raise InputError(f"{p}: unsupported format {man.get('format') if isinstance(man, dict) else man!r} "
                         f"(expected {LM_FORMAT!r})")
    tasks, dirs = man.get("tasks"), man.get("adapters")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise InputError(f"{p}: field `tasks` must be a non-empty list of task names")
    if not isinstance(dirs, dict) or any(t not in dirs for t in tasks):
        raise InputError(f"{p}: field `adapters` must name an adapter directory for every task")
    for t in tasks:
        rel = dirs[t]
        if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/"):
            raise InputError(f"{p}: field `adapters.{t}`: {rel!r} is not a relative path inside the directory")
    return man


def read_router_state(d: Path, man: dict[str, Any]) -> dict[str, Tensor]:
    """router/router.safetensors (the prototypes, SiM means and bases); InputError naming it."""
    from safetensors.torch import load_file

    p = d / str(man.get("router_file", LM_ROUTER_FILE))
    if not p.is_file():
        raise InputError(f"{p}: router state not found")
    try:
        return load_file(str(p))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise InputError(f"{p}: not a readable safetensors file: {err}") from None


def read_adapter(d: Path, rel: str, modules: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """One task's {module: (B (d_out, r), A (r, d_in))} from its adapter directory; InputError
    naming the file (and the tensor) when something is missing."""
    from safetensors.torch import load_file

    cfg, weights = d / rel / ADAPTER_CONFIG, d / rel / ADAPTER_WEIGHTS
    for p in (cfg, weights):
        if not p.is_file():
            raise InputError(f"{p}: adapter file not found")
    try:
        conf = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{cfg}: not valid JSON: {err}") from None
    r, alpha = conf.get("r"), conf.get("lora_alpha")
    if conf.get("peft_type") != "LORA" or not isinstance(r, int) or alpha != r:
        raise InputError(f"{cfg}: expected a LoRA adapter with lora_alpha == r (scaling 1), got "
                         f"peft_type={conf.get('peft_type')!r}, r={r!r}, lora_alpha={alpha!r}")
    try:
        tensors = load_file(str(weights))
    except Exception as err:
        raise InputError(f"{weights}: not a readable safetensors file: {err}") from None
    out = {}
    for module in modules:
        ka, kb = lora_keys(module)
        for k in (ka, kb):
            if k not in tensors:
                raise InputError(f"{weights}: tensor {k!r} is missing")
        out[module] = (tensors[kb], tensors[ka])
    return out


def read_lm_experts(d: Path, man: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """Every task's adapter stacked per routed layer: {module: (B (T, d_out, r), A (T, r, d_in))}."""
    modules = [layer["module"] for layer in man.get("layers", [])]
    per_task = [read_adapter(d, man["adapters"][t], modules) for t in man["tasks"]]
    return {m: (torch.stack([e[m][0] for e in per_task]), torch.stack([e[m][1] for e in per_task]))
            for m in modules}


__all__ = ["ADAPTERS_DIR", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BASE_REF", "GAIN_KEY", "LM_BACKBONE_FILE", "LM_FORMAT",
           "LM_MANIFEST_FILE", "LM_ROUTER_FILE", "ROUTING_RULES", "adapter_config", "adapter_dir", "adapter_name",
           "is_lm_dir", "lora_keys", "pack_lm", "read_adapter", "read_lm_experts", "read_lm_manifest",
           "read_router_state", "unique_dirs"]
