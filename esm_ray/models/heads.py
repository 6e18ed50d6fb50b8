"""Task heads: a linear layer `head.safetensors` (weight [labels, hidden], bias [labels]) beside an
encoder expert, with its labels in the file's metadata (a JSON list or tab-separated) or in the
expert's manifest.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from esm_ray.errors import InputError
from esm_ray.io.format import safetensors_header

HEAD_FILE = "head.safetensors"


def parse_labels(text: str) -> list[str]:
    """Labels kept in a head file's metadata: a JSON list (`["2012", "2016"]`) or tab-separated."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            got = json.loads(stripped)
        except json.JSONDecodeError:
            got = None
        if isinstance(got, list):
            return [str(x) for x in got]
    return text.split("\t")


def head_labels(weight_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None,
                metadata: dict[str, str] | None, labels: list[str] | None = None) -> list[str]:
    """A head's labels, checked against its tensors: `labels` if given, else the metadata's
    "labels" (parse_labels), else the label ids. ValueError when weight [labels, hidden],
    bias [labels] and the label count disagree."""
    if len(weight_shape) != 2 or bias_shape is None or tuple(bias_shape) != (weight_shape[0],):
        raise ValueError(f"head weight {tuple(weight_shape)} and bias "
                         f"{None if bias_shape is None else tuple(bias_shape)} do not agree "
                         "(need weight [labels, hidden], bias [labels])")
    n = int(weight_shape[0])
    if labels is None and (metadata or {}).get("labels"):
        labels = parse_labels(str(metadata["labels"]))  # type: ignore[index]
    labels = [str(x) for x in labels] if labels else [str(i) for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for a head with {n} outputs")
    return labels


def save_head(head: torch.nn.Linear, path: str | Path, labels: Sequence[str]) -> None:
    save_file({"weight": head.weight.detach().float().contiguous(), "bias": head.bias.detach().float().contiguous()},
              str(path), metadata={"labels": "\t".join(labels)})


def load_head(path: str | Path) -> torch.nn.Linear:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: task head not found")
    sd = load_file(str(p))
    if set(sd) != {"weight", "bias"} or sd["weight"].ndim != 2:
        raise InputError(f"{p}: a head needs exactly 'weight' [labels, hidden] and 'bias' [labels]")
    head = torch.nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
    head.load_state_dict(sd)
    return head.eval()


def read_expert_head(reader: Any) -> tuple[bytes | None, list[str] | None]:
    """An expert's head.safetensors bytes and its labels (manifest.json's "labels", else the
    head's metadata: a JSON list or tab-separated), checked here, when the merge reads them:
    InputError naming the file if weight, bias and labels disagree."""
    names = set(reader.aux_names())
    if HEAD_FILE not in names:
        return None, None
    head = reader.read_aux(HEAD_FILE)
    labels = None
    if "manifest.json" in names:
        try:
            got = json.loads(reader.read_aux("manifest.json")).get("labels")
            labels = [str(x) for x in got] if isinstance(got, list) else None
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            labels = None
    where = f"{str(getattr(reader, 'uri', 'expert')).rstrip('/')}/head.safetensors"
    try:
        shapes, meta = safetensors_header(head)
        if "weight" not in shapes or "bias" not in shapes:
            raise ValueError(f"a head needs 'weight' and 'bias' (has {', '.join(sorted(shapes)) or 'nothing'})")
        labels = head_labels(shapes["weight"], shapes["bias"], meta, labels)
    except ValueError as err:
        raise InputError(f"{where}: {err}") from None
    return head, labels
