"""What the runtime reads on an expert's side for a method's support stage (routed methods): the
task head and, for SiM, pooled features of the pretrained backbone on the expert's rows."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import Tensor

from esm_ray.errors import InputError
from esm_ray.models.features import pooled_features
from esm_ray.models.hf import StoredModel
from esm_ray.models.text import encode_rows, make_batches
from esm_ray.spec import MergeSpec
from esm_ray.stats.data import load_calibration_rows


def support_features(spec: MergeSpec, index: int, samples: int, batch_size: int = 16) -> Tensor:
    """Pooled pretrained-backbone features (n, d) of expert `index`'s first `samples` rows.

    The rows are drawn like calibration rows (same file, same seed, same max_length); text rows
    are tokenized with the base model's tokenizer.
    """
    expert = spec.experts[index]
    if not expert.data:
        raise InputError(f"expert {expert.name!r}: SiM needs support samples (`data`)")
    rows = load_calibration_rows(expert.data, samples, spec.calibration.seed)
    src = StoredModel(spec.base, spec.s3)
    tokenizer = None
    with tempfile.TemporaryDirectory(prefix="esm-ray-sim-") as tmp:
        if any("input_ids" not in r for r in rows):
            tok_dir = src.tokenizer_dir(Path(tmp))
            if tok_dir is None:
                raise InputError(f"{expert.data}: rows are text but the base {spec.base} has no tokenizer")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        ids = encode_rows(rows, tokenizer, spec.calibration.max_length)
    model = src.load(torch.float32, "cpu")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and pad >= 0 else 0
    feats = [pooled_features(model, b_ids, b_mask) for b_ids, b_mask in make_batches(ids, batch_size, pad)]
    return torch.cat(feats).float()
