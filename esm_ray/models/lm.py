"""Causal language models: loading a local directory and scoring text by perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from esm_ray.errors import InputError


def load_lm(model_dir: str | Path):
    from transformers import AutoModelForCausalLM

    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise InputError(f"{p}: not a Hugging Face model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 128, batch_size: int = 8) -> dict:
    """Token-level perplexity exp(mean NLL) over texts (each scored on its own, from its first token)."""
    nll, count = 0.0, 0
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[s:s + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:]
        tmask = mask[:, 1:].bool()
        lp = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               reduction="none").view_as(target)
        nll += float(lp[tmask].sum())
        count += int(tmask.sum())
    mean = nll / max(count, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count}
