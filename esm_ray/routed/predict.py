"""Text in, labels out for a routed model: `encode` tokenises, cuts and right-pads inputs (texts
or token ids, checked against the vocabulary and the position limit); `predict` routes them and
applies each sample's task head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from esm_ray.models.text import pad_batch

if TYPE_CHECKING:
    from esm_ray.routed.model import RoutedModel

__all__ = ["encode", "predict"]


def encode(model: RoutedModel, inputs: Sequence[str | Sequence[int]], max_length: int = 128) -> tuple[Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask) for texts (needs the tokenizer) or id lists.

    Inputs are cut at max_length tokens, and max_length at the model's position limit;
    a token id outside [0, vocab_size) is a ValueError naming the input.
    """
    limit = model.max_positions
    if limit is not None:
        max_length = min(max_length, limit)
    vocab = model.vocab_size
    ids: list[list[int]] = []
    for i, x in enumerate(inputs):
        if isinstance(x, str):
            if model.tokenizer is None:
                raise ValueError("this model has no tokenizer; send token ids instead of text")
            row = list(model.tokenizer(x, truncation=True, max_length=max_length)["input_ids"])
        else:
            row = [int(t) for t in x][:max_length]
        if not row:
            raise ValueError(f"input {i} has no tokens")
        bad = next((t for t in row if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"input {i}: token id {bad} is outside the vocabulary [0, {vocab})")
        ids.append(row)
    pad = getattr(model.tokenizer, "pad_token_id", None)
    return pad_batch(ids, pad if isinstance(pad, int) and pad >= 0 else 0)


@torch.inference_mode()
def predict(model: RoutedModel, inputs: Sequence[str | Sequence[int]], tasks: Sequence[str | None] | None = None,
            router: str | None = None, max_length: int = 128) -> list[dict[str, Any]]:
    """Per input: {"task", "label", "label_id", "scores" ({task: score} or None)}.

    tasks: per input a task name (its expert and head are used) or None (routed). A model
    without experts and with one head uses that head for every input.
    """
    if not inputs:
        return []
    tasks = list(tasks) if tasks is not None else [None] * len(inputs)
    if len(tasks) != len(inputs):
        raise ValueError(f"{len(tasks)} tasks for {len(inputs)} inputs")
    router = router or model.router
    if router == "none" or not model.routed:
        if any(t is None for t in tasks):
            if len(model.tasks) != 1:
                raise ValueError(f"this model does not route: name a task (one of {', '.join(model.tasks)})")
            tasks = [t or model.tasks[0] for t in tasks]
    task_ids = torch.tensor([-1 if t is None else model.task_index(t) for t in tasks], dtype=torch.long)
    device = next(model.model.parameters()).device
    ids, mask = encode(model, inputs, max_length)
    if router != "none" and bool((task_ids >= 0).all()) and model.routed:
        router = "oracle"
    res = model.classify(ids.to(device), mask.to(device), router, task_ids)
    scores = res.output.scores
    out = []
    for i in range(len(inputs)):
        t = int(res.task[i])
        head = model.heads[model.tasks[t]]
        lid = int(res.label_ids[i])
        out.append({"task": model.tasks[t], "label": head.labels[lid] if lid < len(head.labels) else str(lid),
                    "label_id": lid,
                    "scores": ({name: round(float(s), 6) for name, s in zip(model.tasks, scores[i].tolist())}
                               if scores is not None and int(task_ids[i]) < 0 else None)})
    return out
