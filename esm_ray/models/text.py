"""Text as the models read it: token ids from rows, right-padded batches with attention masks.

One implementation, used by calibration, the search, SiM's support features and the routed
model: padded positions carry the model's pad id (any valid id) and a 0 in the mask, so they
never enter a statistic or a pooled feature.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from esm_ray.errors import InputError

# The files that make up a Hugging Face tokenizer (fast and slow, BPE, WordPiece, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json")


def encode_rows(rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids per row, truncated to max_length. Rows with input_ids need no tokenizer."""
    out = []
    for i, row in enumerate(rows):
        if "input_ids" in row:
            ids = [int(t) for t in row["input_ids"]]
        elif "text" in row:
            if tokenizer is None:
                raise InputError(f"calibration row {i} is text but no tokenizer was given")
            ids = list(tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"])
        else:
            raise InputError(f"calibration row {i} has neither 'text' nor 'input_ids'")
        if not ids:
            raise InputError(f"calibration row {i} encodes to no tokens")
        out.append(ids[:max_length])
    return out


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int = 0,
              side: Literal["right", "left"] = "right") -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) of shape (B, L_max) for rows of token ids, padded with
    `pad_id` on the right (default) or on the left (prompts to generate from); mask 1 for
    tokens, 0 for padding."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        input_ids[b, cols] = torch.tensor(list(r), dtype=torch.long)
        mask[b, cols] = 1
    return input_ids, mask


def make_batches(ids: list[list[int]], batch_size: int, pad_id: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive batches of `batch_size` rows, each padded by `pad_batch`."""
    for start in range(0, len(ids), batch_size):
        yield pad_batch(ids[start:start + batch_size], pad_id)


def pad_id(model: nn.Module, tokenizer: Any) -> int:
    for src in (tokenizer, getattr(model, "config", None)):
        pid = getattr(src, "pad_token_id", None) if src is not None else None
        if isinstance(pid, int) and pid >= 0:
            return pid
    return 0  # any valid id: padded positions are masked out and never counted


def forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments every forward pass of `model` takes here: no KV cache when it has one."""
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}
