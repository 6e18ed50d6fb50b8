"""A Hugging Face model held as an empty skeleton whose parts are loaded one at a time.

`BlockModel` builds the model class of a stored checkpoint on the meta device (no memory), finds
its stack of blocks (the `nn.ModuleList` of `num_hidden_layers` decoder or encoder layers:
`model.layers` in LLaMA, Mistral and Qwen2, `encoder.layer` in BERT) and materializes any
sub-module on demand from the lazy reader: `to_empty`, the model's own initialisation of
buffers the checkpoint does not hold (rotary frequencies, position ids), then the checkpoint's
tensors. Layer-wise calibration (`esm_ray.stats.layerwise`) loads one block at a time with it.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from esm_ray.core.rowblocks import row_blocks
from esm_ray.errors import InputError
from esm_ray.models.hf import StoredModel, hf_config, model_class


def architecture(config: dict[str, Any]) -> str:
    """How an error names a checkpoint's architecture: config `architectures`, else model_type."""
    archs = config.get("architectures") or []
    return ", ".join(str(a) for a in archs) or str(config.get("model_type", "unknown"))


def find_blocks(model: nn.Module, depth: int | None, arch: str, uri: str) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's block stack: the first ModuleList of `depth` modules (the
    config's num_hidden_layers) that holds parameters. InputError naming the architecture when
    there is none (layer-wise calibration cannot cut the model into blocks)."""
    if isinstance(depth, int) and depth > 0:
        for name, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) == depth and any(True for _ in mod.parameters()):
                return name, mod
    raise _unsupported(arch, depth, uri)


class LayerwiseUnsupported(InputError):
    """A model that cannot be calibrated one block at a time, by its structure (no block list,
    blocks not run one after another). With `calibration.mode: auto` the full pass runs instead."""


def _unsupported(arch: str, depth: int | None, uri: str) -> LayerwiseUnsupported:
    return LayerwiseUnsupported(f"{uri}: layer-wise calibration does not support architecture {arch}: its "
                                f"blocks are not one nn.ModuleList of num_hidden_layers ({depth}) layers; use "
                                "`calibration.mode: full`")


def skeleton(config: dict[str, Any], uri: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model class of a config.json's contents, built on the meta device (no memory, no
    initialisation), in eval mode."""
    auto = model_class(config)
    cfg = hf_config(config, uri)
    try:
        cls = auto._model_mapping[type(cfg)]
    except KeyError:
        raise InputError(f"{uri}: {auto.__name__} does not support {type(cfg).__name__}") from None
    with torch.device("meta"):
        return cls(cfg).to(dtype).eval()


_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # how configs name the depth


def stored_blocks(names: list[str], depth: int) -> str | None:
    """The checkpoint prefix P whose tensors are named P.0. ... P.(depth-1). and no other index
    (a block list as stored), the first in the checkpoint's order; None when there is none."""
    found: dict[str, set[int]] = {}
    for n in names:
        for m in re.finditer(r"\.(\d+)\.", "." + n):
            found.setdefault(n[:m.start() - 1] if m.start() else "", set()).add(int(m.group(1)))
    want = set(range(depth))
    return next((p for p, idx in found.items() if p and idx == want), None)


def check_blocks(config: dict[str, Any] | None, uri: str, names: list[str] | None = None) -> str:
    """The block list's name of the model a config describes (what a plan checks before a
    layer-wise calibration); InputError naming the architecture when it has none.

    With the checkpoint's tensor `names` and a depth in the config, the stored names answer
    (e.g. 'model.layers', a checkpoint prefix), without building the model class: importing a
    model's code costs a process about 150 MB, which a merge from cached statistics never needs.
    The calibration itself builds the model and checks its block list again (`BlockModel`)."""
    if not config:
        raise InputError(f"{uri}: no config.json; layer-wise calibration needs the model's architecture")
    depth = next((config[k] for k in _DEPTH_KEYS if isinstance(config.get(k), int)), None)
    if names is not None and depth is not None and depth > 0:
        found = stored_blocks(names, depth)
        if found is None:
            raise _unsupported(architecture(config), depth, uri)
        return found
    model = skeleton(config, uri)
    return find_blocks(model, getattr(model.config, "num_hidden_layers", None), architecture(config), uri)[0]


READ_BYTES = 4 << 20  # a tensor larger than this (in float32) is read into its parameter in row blocks


def _read_into(t: torch.Tensor, reader: Any, key: str) -> None:
    """t.copy_(stored tensor `key`), converting its dtype; a large one (an embedding) a row block
    at a time, so that it is never held a second time, in float32, beside the parameter."""
    shape = tuple(t.shape)
    blocks = row_blocks(shape, READ_BYTES) if tuple(reader.info(key).shape) == shape else None
    if blocks is None:
        t.copy_(reader.get(key))
        return
    for r0, r1 in blocks:
        t[r0:r1].copy_(reader.get(key, rows=(r0, r1)))


def layerwise_blocks(mode: str, adapter: bool, config: dict[str, Any] | None, names: list[str],
                     uri: str) -> str | None:
    """The block list's name when a calibration in `calibration.mode` runs layer-wise, None when
    it runs the whole model. "layerwise": always (InputError naming the architecture where there
    is no block list, `check_blocks`); "full": never; "auto" (the default): for a LoRA adapter
    (`adapter`) whose block list is found in the stored `names`, so that a merge of adapters
    never holds a whole model, while a full expert's statistics stay those of the whole-model
    pass that earlier results were computed with."""
    if mode == "full" or (mode == "auto" and not adapter):
        return None
    try:
        return check_blocks(config, uri, names)
    except LayerwiseUnsupported:
        if mode == "auto":
            return None
        raise


class BlockModel:
    """The skeleton of a stored model (meta device) with its parts loaded on demand.

    blocks_name: the ModuleList's name, e.g. 'model.layers'; blocks: the list (meta modules).
    `load(name)` materializes the sub-module `name` on `device` in `dtype` and puts it in place;
    `replace(name, module)` puts another module there (dropping the loaded one frees it).
    """

    def __init__(self, src: StoredModel, dtype: torch.dtype, device: torch.device) -> None:
        self.src = src
        self.uri = src.uri
        self.dtype = dtype
        self.device = device
        self.arch = architecture(src.config)
        self.model = skeleton(src.config, src.uri, dtype)
        self.blocks_name, self.blocks = find_blocks(self.model, getattr(self.model.config, "num_hidden_layers", None),
                                                    self.arch, src.uri)
        self._keys = src.keys()
        self._prefix = getattr(self.model, "base_model_prefix", "") or ""
        self._tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        self._meta: dict[str, nn.Module] = {}

    # names ----------------------------------------------------------------------------------
    def block_names(self) -> list[str]:
        return [f"{self.blocks_name}.{i}" for i in range(len(self.blocks))]

    def checkpoint_key(self, name: str) -> str | None:
        """The checkpoint key of parameter or buffer `name` of the model (None: not stored). A
        checkpoint may name tensors with or without the base model's prefix ('bert.'); a tied
        weight the checkpoint leaves out is read from the tensor it is tied to."""
        p = self._prefix
        cands = [name, f"{p}.{name}" if p else name, name[len(p) + 1:] if p and name.startswith(p + ".") else name]
        for c in cands:
            if c in self._keys:
                return c
        if name in self._tied:
            return self.checkpoint_key(self._tied[name])
        return None

    # loading --------------------------------------------------------------------------------
    def _init_buffers(self, module: nn.Module) -> None:
        """Fill the buffers of a freshly materialized module the way the model's own
        initialisation does (transformers builds models on meta and does the same): the
        checkpoint does not hold non-persistent ones (rotary frequencies, position ids)."""
        init = getattr(self.model, "_init_weights", None)
        if init is None:
            return
        for sub in module.modules():
            if sub._buffers:
                init(sub)

    def load(self, name: str) -> nn.Module:
        """Materialize sub-module `name` (e.g. 'model.layers.3') from the checkpoint, in place."""
        meta = self.model.get_submodule(name)
        self._meta.setdefault(name, meta)
        real = copy.deepcopy(self._meta[name]).to_empty(device=self.device)
        self._init_buffers(real)
        persistent = {n for n, _ in real.named_buffers()} - _non_persistent(real)
        with torch.no_grad():
            for n, t in list(real.named_parameters()) + [(n, b) for n, b in real.named_buffers() if n in persistent]:
                key = self.checkpoint_key(f"{name}.{n}")
                if key is not None:
                    _read_into(t, self.src.reader, key)
                elif isinstance(t, nn.Parameter):
                    raise InputError(f"{self.uri}: tensor {name + '.' + n!r} is missing (layer-wise calibration "
                                     f"loads it for {name})")
        self._set(name, real.eval())
        return real

    def replace(self, name: str, module: nn.Module) -> None:
        """Put `module` in place of sub-module `name` (e.g. a stub in place of a loaded block, which
        frees it); `load(name)` still builds the original from its meta version."""
        self._meta.setdefault(name, self.model.get_submodule(name))
        self._set(name, module)

    def _set(self, name: str, module: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        self.model.get_submodule(parent).register_module(leaf, module) if parent \
            else self.model.register_module(leaf, module)


def _non_persistent(module: nn.Module) -> set[str]:
    out = set()
    for mname, sub in module.named_modules():
        for b in getattr(sub, "_non_persistent_buffers_set", ()):
            out.add(f"{mname}.{b}" if mname else b)
    return out
