"""Training of the zoo's experts (full fine-tune + linear head) and linear probes.

Expert: a freshly initialised linear head on the mean-pooled encoder output; encoder and head
are fine-tuned together with AdamW (a larger learning rate for the head), linear warm-up and
decay, gradient clipping at 1, for a fixed number of epochs over a seeded order. (Starting the
head from the linear probe, LP-FT, was tried: with one epoch the encoder then barely moves and
the expert ends up no better than the probe.)

Probe: multinomial logistic regression on frozen mean-pooled features of the pretrained model,
its L2 strength chosen on validation; it gives the table's "pretrained" row.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from esm_ray.models.encoder import batches, embed, features


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one expert; all of them enter the zoo hash."""

    epochs: int = 1  # multiplies each task's own epoch count (TaskDef.epochs)
    batch_size: int = 32
    max_length: int = 64
    lr: float = 1e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_steps: int | None = None  # cap on optimizer steps (the reduced CI zoo)
    probe_c: tuple[float, ...] = (0.1, 1.0, 10.0)  # inverse L2 strengths tried for probes

    def to_dict(self) -> dict:
        return asdict(self)


def accuracy(pred: torch.Tensor, labels: Sequence[int]) -> float:
    y = torch.as_tensor(list(labels))
    return float((pred == y).float().mean()) if len(y) else float("nan")


def fit_probe(x_train: torch.Tensor, y_train: Sequence[int], x_val: torch.Tensor, y_val: Sequence[int],
              n_labels: int, cs: Sequence[float]) -> tuple[torch.nn.Linear, float, float]:
    """Multinomial logistic regression on frozen features; C chosen on validation.

    Returns the head as an nn.Linear [n_labels, hidden], its validation accuracy and C.
    """
    from sklearn.linear_model import LogisticRegression

    best = None
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=2000)
        clf.fit(x_train.numpy(), list(y_train))
        acc = float(clf.score(x_val.numpy(), list(y_val)))
        if best is None or acc > best[1]:
            best = (clf, acc, c)
    clf, acc, c = best
    coef = torch.as_tensor(clf.coef_, dtype=torch.float32)
    bias = torch.as_tensor(clf.intercept_, dtype=torch.float32)
    if coef.shape[0] == 1 and n_labels == 2:  # sklearn's binary form: one logit for class 1
        coef = torch.cat([-coef / 2, coef / 2])
        bias = torch.cat([-bias / 2, bias / 2])
    head = torch.nn.Linear(x_train.shape[1], n_labels)
    with torch.no_grad():
        head.weight.copy_(coef)
        head.bias.copy_(bias)
    return head, acc, c


def train_expert(model, tokenizer, head: torch.nn.Linear, texts: Sequence[str], labels: Sequence[int],
                 cfg: TrainConfig, seed: int, on_step: Callable[[int, int, float], None] | None = None,
                 task_epochs: int = 1) -> dict:
    """Fine-tune `model` (all encoder weights) and `head` in place for task_epochs × cfg.epochs
    epochs (capped at cfg.max_steps); returns training stats."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    n = len(texts)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = task_epochs * cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warm = max(1, int(cfg.warmup * total))
    enc_params = [p for name, p in model.named_parameters() if not name.startswith("pooler.")]
    decay = [p for p in enc_params if p.ndim >= 2]
    no_decay = [p for p in enc_params if p.ndim < 2]
    opt = torch.optim.AdamW([
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {"params": list(head.parameters()), "lr": cfg.head_lr, "weight_decay": 0.0},
    ])
    base_lrs = [g["lr"] for g in opt.param_groups]
    model.train()
    head.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    step, t0, losses = 0, time.perf_counter(), []
    y_all = torch.as_tensor(list(labels))
    while step < total:
        order = list(range(n))
        rng.shuffle(order)
        shuffled = [texts[i] for i in order]
        for idx, b in batches(shuffled, tokenizer, cfg.batch_size, cfg.max_length):
            if step >= total:
                break
            scale = (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * scale
            y = y_all[[order[i] for i in idx]]
            loss = loss_fn(head(embed(model, b)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(enc_params + list(head.parameters()), 1.0)
            opt.step()
            step += 1
            losses.append(loss.item())
            if on_step:
                on_step(step, total, losses[-1])
    model.eval()
    head.eval()
    return {"steps": step, "epochs": step / steps_per_epoch, "train_seconds": time.perf_counter() - t0,
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}


def probe_features(model, tokenizer, texts: Sequence[str], cfg: TrainConfig) -> torch.Tensor:
    return features(model, tokenizer, texts, batch_size=64, max_length=cfg.max_length)
