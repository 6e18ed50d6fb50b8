"""Fine-tuning a causal LM on token sequences whose loss covers only their last k tokens.

A domain example is (prefix token + text, all text tokens); a label-task example is
(prompt + " " + answer, the answer's tokens), split as lm-eval splits it, so training and
scoring see the same tokens. Every parameter of the decoder blocks (attention, MLP, RMSNorm
weights) and the final norm is trained in float32; the tied token embeddings / LM head stay
frozen. AdamW, linear warm-up then linear decay, gradient clipping at 1.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from esm_ray.models.lm_items import encode_pair, prefix_token_id

Example = tuple[list[int], int]  # token ids, number of trailing ids that carry the loss


@dataclass(frozen=True)
class LMTrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 20

    def scaled(self, **kw) -> "LMTrainConfig":
        return LMTrainConfig(**{**self.__dict__, **{k: v for k, v in kw.items() if v is not None}})


def domain_examples(tokenizer, texts: Sequence[str], max_length: int) -> list[Example]:
    pre = prefix_token_id(tokenizer)
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:max_length]
        out.append(([pre, *ids], len(ids)))
    return out


def answer_examples(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int) -> list[Example]:
    out = []
    for p, a in zip(prompts, answers):
        ctx, cont = encode_pair(tokenizer, p, " " + a)
        ctx = ctx[-max(1, max_length - len(cont)):]
        out.append((ctx + cont, len(cont)))
    return out


def trainable(model) -> list[torch.nn.Parameter]:
    """Decoder blocks and the final norm require grad; everything else is frozen."""
    out = []
    for name, p in model.named_parameters():
        train = name.startswith("model.layers.") or name == "model.norm.weight"
        p.requires_grad_(train)
        if train:
            out.append(p)
    return out


def batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels (-100 off the loss tokens)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (seq, k) in enumerate(examples):
        n = len(seq)
        ids[i, :n] = torch.tensor(seq)
        mask[i, :n] = 1
        labels[i, n - k:n] = ids[i, n - k:n]
    return ids, mask, labels


def loss_on_labels(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (labels != -100), as the HF model's
    own loss, with the LM head run only on the positions that predict them (the prompt of a
    label task and the padding carry no loss, so their logits are never formed)."""
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, target[keep])


def train_lm(model, examples: Sequence[Example], cfg: LMTrainConfig, seed: int, pad_id: int,
             on_step: Callable[[int, int, float], None] | None = None,
             params: Sequence[torch.nn.Parameter] | None = None) -> dict:
    """Train `model` in place (float32) for cfg.steps steps over shuffled epochs of the examples.
    params: the parameters to train (already requiring grad, e.g. LoRA factors); default
    `trainable(model)`."""
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = list(params) if params is not None else trainable(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    order: list[int] = []
    t0, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        warm = max(1, cfg.warmup)
        scale = (step + 1) / warm if step < warm else max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * scale
        while len(order) < cfg.batch_size:
            nxt = list(range(len(examples)))
            rng.shuffle(nxt)
            order += nxt
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        ids, mask, labels = batch([examples[i] for i in idx], pad_id)
        loss = loss_on_labels(model, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, cfg.steps, losses[-1])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    secs = time.perf_counter() - t0
    return {"steps": cfg.steps, "train_seconds": secs, "seconds_per_step": secs / max(cfg.steps, 1),
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}
