"""Which torch device an expert side computes on, and moving its results between devices.

An expert side puts two kinds of work on its device: calibration (the expert's forward passes
and Gram accumulation) and the decompositions of methods that declare ``decomposes`` or
``post_decomposes`` (ESM, ESM++, SiM, TSV-M, PAVE), besides the search stage of Concrete and
AdaMerging. The other methods (task arithmetic, linear, TIES, DARE) stay on the CPU:
their per-tensor work costs less than copying the tensor to a GPU and back. Whatever ran on
the device, parts leave the side on the CPU, so the object store, the coordinator and the
writer never see a GPU tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from esm_ray.core.layerstats import LayerStats
from esm_ray.errors import SpecError

CPU = torch.device("cpu")


def resolve_device(requested: str, where: str = "this process") -> torch.device:
    """`runtime.device` made concrete for the calling process.

    auto: cuda when torch sees a CUDA device here, else cpu. Inside a Ray worker torch sees
    only the GPUs Ray assigned to it (CUDA_VISIBLE_DEVICES), so a worker placed without a GPU
    resolves to cpu. cuda where none is visible is an error that names the field.
    """
    if requested == "cpu":
        return CPU
    available = torch.cuda.is_available()
    if requested == "auto":
        return torch.device("cuda") if available else CPU
    if requested == "cuda":
        if not available:
            raise SpecError(f"field `runtime.device`: 'cuda' requested but {where} sees no CUDA device "
                            f"(torch {torch.__version__}, cuda build {torch.version.cuda or 'none'}); "
                            f"use 'auto' or 'cpu', or give each worker a GPU (runtime.num_gpus_per_worker)")
        return torch.device("cuda")
    raise SpecError(f"field `runtime.device`: unknown device {requested!r} (auto, cpu or cuda)")


def to_device(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor inside it on `device`.

    Walks tensors, calibration statistics (`LayerStats.to`), dataclasses (rebuilt with
    `dataclasses.replace`), lists, tuples (named ones too) and dicts; anything else is returned
    as is. Objects already on `device` come back
    unchanged, so on a CPU-only run this is the identity.
    """
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, LayerStats):  # calibration statistics (Gram or rows): a class of its own
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            old = getattr(obj, f.name)
            new = to_device(old, device)
            if new is not old:
                changes[f.name] = new
        return dataclasses.replace(obj, **changes) if changes else obj
    if isinstance(obj, dict):
        items = {k: to_device(v, device) for k, v in obj.items()}
        return obj if all(items[k] is obj[k] for k in obj) else type(obj)(items)
    if isinstance(obj, (list, tuple)):
        items = [to_device(v, device) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items)
    return obj
