"""Accuracy and routing accuracy of a routed model per router, on labelled data of each task.

Samples of all tasks are shuffled together into mixed-task batches (routing is per sample, so
the batch composition must not matter). Two accuracies per task:
- `accuracy`: the true task's head on the routed model's features (the ESM++ protocol: the
  expert is chosen without the task id, the head is the task's own);
- `accuracy_task_unknown`: the head of the routed task, so a wrong route is a wrong answer
  (what the HTTP service does when no task is given).
`routing_accuracy` is the fraction of a task's samples routed to it (sample level: SiM's one
decision, or the prototype router's majority over layers); `layer_routing_accuracy` is the
prototype router's per-layer rate. With expert accuracies given, `normalized` = accuracy / expert.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from esm_ray.routed.model import RoutedModel

Data = Mapping[str, tuple[Sequence[Any], Sequence[int]]]


@torch.inference_mode()
def evaluate_routed(model: RoutedModel, data: Data, routers: Sequence[str] | None = None,
                    expert_accuracy: Mapping[str, float] | None = None, batch_size: int = 64,
                    max_length: int = 64, seed: int = 0) -> dict[str, Any]:
    """Per router: per-task accuracies, routing accuracy, confusion (true task x routed task).

    data: {task: (inputs (texts or token id lists), label ids)} for tasks of the model.
    """
    tasks = model.tasks
    for t in data:
        model.task_index(t)
    samples = [(tasks.index(t), x, int(y)) for t, (xs, ys) in data.items() for x, y in zip(xs, ys)]
    random.Random(seed).shuffle(samples)
    routers = list(routers or model.routers)
    device = next(model.model.parameters()).device
    out: dict[str, Any] = {"tasks": list(data), "n": len(samples), "routers": {}}
    for router in routers:
        T = len(tasks)
        conf = torch.zeros(T, T, dtype=torch.long)
        correct = torch.zeros(T)
        correct_unknown = torch.zeros(T)
        count = torch.zeros(T)
        layer_hits = torch.zeros(T)
        layer_total = torch.zeros(T)
        for s in range(0, len(samples), batch_size):
            chunk = samples[s:s + batch_size]
            truth = torch.tensor([c[0] for c in chunk])
            labels = torch.tensor([c[2] for c in chunk])
            ids, mask = model.encode([c[1] for c in chunk], max_length)
            res = model(ids.to(device), mask.to(device), router=router,
                        task_ids=truth.to(device) if router == "oracle" else None)
            routed = res.task.cpu()
            pooled = res.pooled
            for t in torch.unique(truth).tolist():
                rows = torch.nonzero(truth == t).squeeze(1)
                head = model.heads[tasks[t]].linear
                pred = head(pooled.index_select(0, rows.to(device)).to(head.weight.dtype)).argmax(-1).cpu()
                correct[t] += float((pred == labels[rows]).sum())
                count[t] += len(rows)
                if router == "none":
                    correct_unknown[t] += float((pred == labels[rows]).sum())
                    continue
                ok = routed[rows] == t
                correct_unknown[t] += float(((pred == labels[rows]) & ok).sum())
                for r_t in routed[rows].tolist():
                    conf[t, r_t] += 1
                if res.layer_choices is not None:
                    lc = res.layer_choices.cpu()[rows]
                    layer_hits[t] += float((lc == t).sum())
                    layer_total[t] += lc.numel()
        per_task = {}
        for t, name in enumerate(tasks):
            if name not in data:
                continue
            n = max(float(count[t]), 1.0)
            row: dict[str, Any] = {"n": int(count[t]), "accuracy": float(correct[t]) / n,
                                   "accuracy_task_unknown": float(correct_unknown[t]) / n}
            if router != "none":
                row["routing_accuracy"] = float(conf[t, t]) / n
            if layer_total[t] > 0:
                row["layer_routing_accuracy"] = float(layer_hits[t] / layer_total[t])
            if expert_accuracy and name in expert_accuracy and expert_accuracy[name] > 0:
                row["normalized"] = row["accuracy"] / expert_accuracy[name]
                row["normalized_task_unknown"] = row["accuracy_task_unknown"] / expert_accuracy[name]
            per_task[name] = row
        keys = {k for r in per_task.values() for k in r if k != "n"}
        avg = {k: sum(r[k] for r in per_task.values()) / len(per_task) for k in sorted(keys)}
        out["routers"][router] = {"tasks": per_task, "average": avg,
                                  "confusion": conf.tolist() if router != "none" else None}
    return out


def confusion_png(confusion: Sequence[Sequence[int]], tasks: Sequence[str], path: str | Path,
                  title: str = "") -> Path:
    """A row-normalised confusion matrix (true task x routed task) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = torch.tensor(confusion, dtype=torch.float64)
    frac = c / c.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(tasks), 0.8 + 0.7 * len(tasks)))
    im = ax.imshow(frac.numpy(), vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xlabel("routed task")
    ax.set_ylabel("true task")
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            if c[i, j] > 0:
                ax.text(j, i, f"{frac[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
