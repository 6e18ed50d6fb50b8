"""Load a routed directory (or a static merged one) into a RoutedModel.

    DIR/config.json, model*.safetensors, tokenizer files   the merged base (HF layout)
    DIR/routed/manifest.json                               method, tasks, layers, rank, routers
    DIR/routed/experts.safetensors                         B, A per routed layer (T stacked)
    DIR/routed/router.safetensors                          prototypes, SiM means and bases
    DIR/routed/backbone.safetensors                        SiM only: the pretrained backbone
    DIR/heads/<task>.safetensors                           task heads (weight, bias)

A routed causal LM has adapters/<task>/ (PEFT LoRA) and router/ instead of routed/ and heads/
(esm_ray.routed.lm_format); it loads into the same RoutedModel, its experts stacked from the
adapters. A directory with neither manifest is a static merge: it loads with no experts and the
heads found under heads/ or given by the caller.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from esm_ray.routed.format import (
    EXPERTS_FILE,
    HEADS_DIR,
    MANIFEST_FILE,
    ROUTED_FORMAT,
    ROUTER_FILE,
    SIM_BASIS_KEY,
    SIM_MEAN_KEY,
    prototype_key,
    unpack_routed,
)
from esm_ray.routed.lm_format import is_lm_dir, read_lm_experts, read_lm_manifest, read_router_state
from esm_ray.models.heads import head_labels
from esm_ray.errors import InputError
from esm_ray.models.heads import HEAD_FILE
from esm_ray.models.hf import model_class
from esm_ray.models.text import TOKENIZER_FILES
from esm_ray.routed.model import Head, RoutedModel, SimRouter

log = logging.getLogger(__name__)

def read_head(path: str | Path, labels: list[str] | None = None) -> Head:
    """A head file (weight [labels, hidden], bias [labels]); labels from the argument, else the
    file's metadata ("labels": a JSON list or tab-separated), else the label ids."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: task head not found")
    with safe_open(str(p), "pt") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        if not {"weight", "bias"} <= keys:
            raise InputError(f"{p}: a head needs 'weight' and 'bias' (has {', '.join(sorted(keys))})")
        w, b = f.get_tensor("weight").float(), f.get_tensor("bias").float()
    try:
        labels = head_labels(tuple(w.shape), tuple(b.shape), meta, labels)
    except ValueError as err:
        raise InputError(f"{p}: {err}") from None
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return Head(lin.eval(), labels)


def expert_labels(expert_dir: str | Path) -> list[str] | None:
    """Labels from an expert's manifest.json ("labels": [...]), if it has them."""
    p = Path(expert_dir) / "manifest.json"
    if not p.is_file():
        return None
    try:
        labels = json.loads(p.read_text()).get("labels")
    except (json.JSONDecodeError, AttributeError):
        return None
    return [str(x) for x in labels] if isinstance(labels, list) else None


def head_from(path: str | Path) -> Head:
    """A head from an expert directory (head.safetensors + manifest.json) or a head file."""
    p = Path(path)
    if p.is_dir():
        return read_head(p / HEAD_FILE, expert_labels(p))
    return read_head(p)


_DONE = ".complete"  # in a cache directory: every object of the prefix was downloaded


def _plain(rel: str) -> bool:
    return (bool(rel) and not rel.startswith("/") and "\0" not in rel
            and all(p not in ("", ".", "..") for p in rel.split("/")))


def cache_paths(uri: str, prefix: str, keys: list[str], root: Path) -> dict[str, Path]:
    """Where each object key listed under `prefix` goes in the cache directory `root`.

    A key must name a plain relative path below the prefix: one with an empty, '.' or '..'
    segment (e.g. 'a//b', 'a/../b'), an absolute or empty remainder, or a NUL byte is refused
    by name (InputError) before anything is written, so no download lands outside `root`.
    Folder markers (the prefix itself, or a plain path ending in '/') hold nothing and are left out."""
    out: dict[str, Path] = {}
    base = root.resolve()
    for key in keys:
        if key == prefix or (key.endswith("/") and key.startswith(prefix) and _plain(key[len(prefix):-1])):
            continue
        rel = key[len(prefix):] if key.startswith(prefix) else ""
        dst = root / rel if _plain(rel) and rel != _DONE else None
        if dst is None or not dst.resolve().is_relative_to(base):
            raise InputError(f"{uri}: object key {key!r} is not a plain relative path under "
                             f"'{prefix}' (empty, '.' or '..' segments, or absolute); refusing to "
                             "download it")
        out[key] = dst
    return out


def local_dir(uri: str, s3=None, cache: str | Path | None = None) -> Path:
    """A local directory holding `uri`: the path itself, or a cached download of an s3:// prefix."""
    from esm_ray.io.uri import parse_uri

    u = parse_uri(uri)
    if not u.is_s3:
        p = Path(u.path).expanduser()
        if not p.is_dir():
            raise InputError(f"{uri}: not a directory")
        return p
    from esm_ray.io import s3 as s3io

    client = s3io.make_client(s3)
    prefix = u.dir_prefix
    with s3io.s3_errors(uri, what="list"):
        objects = s3io.list_objects(client, u.bucket, prefix)
    if not objects:
        raise InputError(f"{uri}: no objects under this prefix")
    tag = hashlib.sha256("".join(f"{o.key}:{o.etag}" for o in objects).encode()).hexdigest()[:16]
    root = Path(cache or Path.home() / ".cache" / "esm-ray" / "routed").expanduser() / tag
    done = root / _DONE
    if not done.is_file():
        paths = cache_paths(uri, prefix, [o.key for o in objects], root)
        for key, dst in paths.items():
            dst.parent.mkdir(parents=True, exist_ok=True)
            with s3io.s3_errors(uri, what=key[len(prefix):]):
                dst.write_bytes(s3io.get_object(client, u.bucket, key))
        done.write_text(uri)
    return root


def load_routed(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                router: str | None = None, heads: dict[str, str | Path] | None = None,
                s3=None) -> RoutedModel:
    """Load a routed or static merged directory (local or s3://).

    heads:  extra {task: expert dir or head file}, e.g. for a static merge without heads/
    router: override the default router
    """
    d = local_dir(str(path), s3)
    if not (d / "config.json").is_file():
        raise InputError(f"{d}: not a Hugging Face model directory (no config.json)")
    config = json.loads((d / "config.json").read_text())
    cls = model_class(config)
    model = cls.from_pretrained(str(d), dtype=dtype)
    manifest: dict[str, Any] = {}
    experts: dict = {}
    protos: dict = {}
    sim = None
    backbone = None
    head_map: dict[str, Head] = {}
    if is_lm_dir(d):  # a causal LM: the experts are the PEFT adapters (routed.lm_format)
        manifest = read_lm_manifest(d)
        tasks = list(manifest["tasks"])
        experts = read_lm_experts(d, manifest)
        router_state = read_router_state(d, manifest)
        protos = {m: router_state[prototype_key(m)] for m in experts if prototype_key(m) in router_state}
        means, bases = router_state.get(SIM_MEAN_KEY), router_state.get(SIM_BASIS_KEY)
        sim, backbone = sim_router(d, manifest, means, bases, model, dtype, s3)
    elif (d / MANIFEST_FILE).is_file():
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        if manifest.get("format") != ROUTED_FORMAT:
            raise InputError(f"{d / MANIFEST_FILE}: unsupported format {manifest.get('format')!r}")
        tasks = list(manifest["tasks"])
        modules = [layer["module"] for layer in manifest.get("layers", [])]
        try:
            experts, protos, means, bases = unpack_routed(modules, load_file(str(d / EXPERTS_FILE)),
                                                          load_file(str(d / ROUTER_FILE)))
        except (KeyError, FileNotFoundError) as err:
            raise InputError(f"{d}: routed files are incomplete: {err}") from None
        sim, backbone = sim_router(d, manifest, means, bases, model, dtype, s3)
        for task, h in (manifest.get("heads") or {}).items():
            head_map[task] = read_head(d / h["file"], h.get("labels"))
    else:
        tasks = []
        if (d / HEADS_DIR).is_dir():
            for p in sorted((d / HEADS_DIR).glob("*.safetensors")):
                head_map[p.stem] = read_head(p)
                tasks.append(p.stem)
    for task, src in (heads or {}).items():
        head_map[task] = head_from(src)
        if task not in tasks:
            if manifest:
                raise InputError(f"head for task {task!r}, but the routed model's tasks are {', '.join(tasks)}")
            tasks.append(task)
    tokenizer = None
    if any((d / n).is_file() for n in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(d))
    rm = RoutedModel(model, tasks, experts, protos, sim, backbone, head_map, router, manifest, tokenizer)
    rm.source_dir = d
    return rm.to(device)


def sim_router(d: Path, manifest: dict[str, Any], means: torch.Tensor | None, bases: torch.Tensor | None,
               model: nn.Module, dtype: torch.dtype, s3) -> tuple[SimRouter | None, nn.Module | None]:
    """The SiM router and its backbone, when the manifest and the router state hold them."""
    sim_meta = manifest.get("sim") or None
    if not (sim_meta and means is not None and bases is not None):
        return None, None
    sim = SimRouter(means.to(torch.float64), bases.to(torch.float64), bool(sim_meta.get("normalize", True)),
                    bool(sim_meta.get("relative", False)))
    return sim, _load_backbone(d, sim_meta.get("backbone"), model, dtype, s3)


def _load_backbone(d: Path, ref: Any, model: nn.Module, dtype: torch.dtype, s3) -> nn.Module | None:
    if ref is None:
        return None
    if isinstance(ref, str):
        state = load_file(str(d / ref))
    elif isinstance(ref, dict) and ref.get("uri"):
        from esm_ray.io.reader import open_model

        with open_model(ref["uri"], s3) as reader:
            state = {k: reader.get(k) for k in reader.keys()}
    else:
        raise InputError(f"{d / MANIFEST_FILE}: bad SiM backbone reference {ref!r}")
    bb = type(model).from_pretrained(None, config=model.config, state_dict=state, dtype=dtype)
    return bb.eval()


__all__ = ["cache_paths", "expert_labels", "head_from", "load_routed", "local_dir", "model_class",
           "read_head", "sim_router"]
