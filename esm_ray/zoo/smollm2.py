"""SmolLM2-135M from its packaged GGUF, as a Hugging Face safetensors directory.

Conversion: transformers dequantizes the GGUF (needs `gguf` and `accelerate`), but refuses to
`save_pretrained` a model that carries a quantization config; so a fresh LlamaForCausalLM is
built from the config without it, the dequantized state dict is loaded into it, and the result
is saved in bfloat16 with the tokenizer. The output is cached under a hash of the GGUF bytes.

The domain and task experts built on it are in `esm_ray.zoo.lm_zoo` (`esm-ray zoo lm`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from esm_ray.errors import InputError
from esm_ray.zoo.layout import default_root, write_json
from esm_ray.zoo.sources import file_digest, smollm2_gguf

log = logging.getLogger("esm_ray.zoo")

CONVERT_VERSION = 1


# ---------------------------------------------------------------- conversion


def convert_smollm2(out: str | Path | None = None, gguf: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Convert the packaged SmolLM2 GGUF to an HF safetensors directory; cached by content hash.

    Returns `<root>/smollm2/<hash>/` (config.json, model.safetensors, tokenizer files).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf) if gguf else smollm2_gguf()
    root = Path(out).expanduser() if out else default_root()
    key = hashlib.sha256(f"{file_digest(str(src))}:{dtype}:{CONVERT_VERSION}".encode()).hexdigest()[:16]
    dest = root / "smollm2" / key
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    t0 = time.perf_counter()
    log.info("converting %s (dequantizing; about 20 s)", src.name)
    q = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise InputError(f"{src}: converted state dict does not match the config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    del q
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    tmp = dest.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(str(tmp))
    write_json(tmp / "conversion.json", {"source": src.name, "source_sha256": file_digest(str(src)),
                                         "dtype": dtype, "seconds": round(time.perf_counter() - t0, 1)})
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (or copy) the files of src into dst."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def build_lm_zoo(*args, **kwargs) -> Path:
    """The LM zoo (kept under its old name): see `esm_ray.zoo.lm_zoo.build_lm_zoo`."""
    from esm_ray.zoo.lm_zoo import build_lm_zoo as build

    return build(*args, **kwargs)


def truncated_smollm2(root: Path, layers: int) -> Path:
    """The converted model cut to its first `layers` decoder blocks (same embeddings, final
    norm, tokenizer): a real but cheap base for reduced (CI) zoos; cached next to the full one."""
    from safetensors.torch import load_file, save_file

    conv = convert_smollm2(root)
    dest = conv.with_name(f"{conv.name}-L{layers}")
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    cfg = json.loads((conv / "config.json").read_text())
    if not 0 < layers <= cfg["num_hidden_layers"]:
        raise InputError(f"{conv}: cannot keep {layers} of {cfg['num_hidden_layers']} decoder blocks")
    keep = {f"model.layers.{i}." for i in range(layers)}
    sd = {k: v for k, v in load_file(str(conv / "model.safetensors")).items()
          if not k.startswith("model.layers.") or any(k.startswith(p) for p in keep)}
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in conv.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, tmp / f.name)
    cfg["num_hidden_layers"] = layers
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:layers]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
