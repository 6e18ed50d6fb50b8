"""Hugging Face models read through esm-ray's lazy readers (local directories or s3://): the model
class for a config, loading weights into a module, the tokenizer files of a model."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esm_ray.errors import InputError
from esm_ray.models.text import TOKENIZER_FILES
from esm_ray.spec import S3Options


def is_causal_lm(config: dict[str, Any] | None) -> bool:
    """Whether a config's `architectures` name a *ForCausalLM class."""
    return any(str(a).endswith("ForCausalLM") for a in (config or {}).get("architectures") or [])


def base_model(model: nn.Module) -> nn.Module | None:
    """The base model a task wrapper holds under its `base_model_prefix` (a *ForCausalLM's
    decoder stack: its hidden states without the head), or None when it holds none."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) and inner is not model else None


def model_class(config: dict[str, Any]):
    """AutoModelForCausalLM for *ForCausalLM checkpoints, else AutoModel (encoders)."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if is_causal_lm(config) else AutoModel


def hf_config(config: dict[str, Any], uri: str):
    """The transformers config object of a config.json's contents."""
    from transformers import AutoConfig

    cfg = dict(config)
    if "model_type" not in cfg:
        raise InputError(f"{uri}: config.json has no model_type")
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def skip_init():
    """Build a transformers module without random initialisation (its weights are loaded next)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def load_into(reader: Any, module: nn.Module, prefix: str, uri: str) -> None:
    """Copy a checkpoint's tensors (`prefix` + module name) into `module`'s parameters and
    floating buffers; a parameter the checkpoint lacks is an InputError naming it."""
    keys = set(reader.keys())
    with torch.no_grad():
        for n, t in list(module.named_parameters()) + list(module.named_buffers()):
            if prefix + n in keys:
                t.copy_(reader.get(prefix + n).to(t.dtype))
            elif isinstance(t, nn.Parameter):
                raise InputError(f"{uri}: tensor {prefix + n!r} is missing")


class StoredModel:
    """A Hugging Face model in storage (local directory or s3://), read through esm_ray.io.reader."""

    def __init__(self, uri: str, s3: S3Options | None, base_uri: str | None = None) -> None:
        """`base_uri`: the merge's base, over which a LoRA adapter at `uri` is applied (io.adapter)."""
        from esm_ray.io.composite import open_input
        from esm_ray.io.reader import open_model

        self.uri = uri
        self.reader = open_input(uri, base_uri, s3) if base_uri else open_model(uri, s3)
        if self.reader.config is None:
            raise InputError(f"{uri}: no config.json (not a Hugging Face model directory)")
        self.config = dict(self.reader.config)

    def keys(self) -> set[str]:
        return set(self.reader.keys())

    @property
    def is_adapter(self) -> bool:
        """A LoRA adapter read over its base (io.adapter), not a full model."""
        from esm_ray.io.adapter import AdapterModel

        return isinstance(self.reader, AdapterModel)

    def fingerprint(self) -> str:
        return str(self.reader.fingerprint())

    def load(self, dtype: torch.dtype, device: str) -> nn.Module:
        """The HF model class chosen from `architectures`, built from config and loaded weights."""
        auto = model_class(self.config)
        config = hf_config(self.config, self.uri)
        try:
            cls = auto._model_mapping[type(config)]
        except KeyError:
            raise InputError(f"{self.uri}: {auto.__name__} does not support {type(config).__name__}") from None
        state = {k: self.reader.get(k) for k in self.reader.keys()}
        model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
        return model.to(device).eval()

    def tokenizer_dir(self, tmp: Path) -> Path | None:
        """The model's tokenizer files copied into `tmp`, or None when it has none."""
        return copy_tokenizer(self.reader, self.config, tmp)

    def close(self) -> None:
        self.reader.close()


def copy_tokenizer(reader: Any, config: dict | None, tmp: Path) -> Path | None:
    """A model's tokenizer files (top level) copied into `tmp`, or None when it has none."""
    names = [n for n in reader.aux_names() if "/" not in n and n in TOKENIZER_FILES]
    if not names:
        return None
    tmp.mkdir(parents=True, exist_ok=True)
    for n in names:
        (tmp / n).write_bytes(reader.read_aux(n))
    if config is not None:  # some tokenizers read model_type from it
        (tmp / "config.json").write_text(json.dumps(config))
    return tmp
