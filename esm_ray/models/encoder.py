"""Sentence encoders: loading, tokenizing, mean pooling, batching, features and predictions.

Experts and merged models are plain `BertModel` directories; a task head is a separate
`head.safetensors` with `weight` [n_labels, hidden] and `bias` [n_labels], applied to the
attention-mask-aware mean of the last hidden states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from esm_ray.errors import InputError

def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where mask == 1 (padding excluded)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def load_encoder(model_dir: str | Path, dtype: torch.dtype = torch.float32, strict: bool = False):
    """A BertModel from an HF directory, in eval mode. `strict`: fail, naming them, if encoder
    weights are missing from the checkpoint (a pooler may be absent: mean pooling does not use it)."""
    from transformers import BertModel

    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise InputError(f"{p}: not a Hugging Face model directory (no config.json)")
    model, info = BertModel.from_pretrained(str(p), dtype=dtype, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if strict and missing:
        raise InputError(f"{p}: encoder weights missing from the checkpoint: {', '.join(sorted(missing)[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    return model.eval()


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def batches(texts: Sequence[str], tokenizer, batch_size: int, max_length: int,
            sort: bool = False) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Tokenized batches padded to their own longest row; with sort=True rows are grouped by
    length (fewer pad tokens) and each batch says which input positions it holds."""
    order = list(range(len(texts)))
    if sort:
        order.sort(key=lambda i: len(texts[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        yield idx, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def embed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return mean_pool(out.last_hidden_state, batch["attention_mask"])


@torch.no_grad()
def features(model, tokenizer, texts: Sequence[str], batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
    """Mean-pooled float32 features [len(texts), hidden] in input order."""
    model.eval()
    out = torch.empty(len(texts), model.config.hidden_size)
    for idx, b in batches(texts, tokenizer, batch_size, max_length, sort=True):
        out[idx] = embed(model, b).float()
    return out


@torch.no_grad()
def predict(model, tokenizer, head: torch.nn.Linear, texts: Sequence[str], batch_size: int = 64,
            max_length: int = 64) -> torch.Tensor:
    """Predicted label ids for texts."""
    feats = features(model, tokenizer, texts, batch_size, max_length)
    if feats.shape[1] != head.in_features:
        raise InputError(f"head expects hidden size {head.in_features}, model gives {feats.shape[1]}")
    return head(feats).argmax(-1)
