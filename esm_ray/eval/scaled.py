"""A merged model whose update can be rescaled in place, to choose a merge's scale on
validation without merging again (task arithmetic's λ, ESM's α):

    W(f) = round_to_stored_dtype(W₀ + f (W_merged − W₀))   on the scaled keys,

merged values elsewhere. Rounding to the dtype the merge was stored in makes the chosen model
the one a merge at that scale would write, up to that rounding (a no-op for float32 files)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from esm_ray.errors import InputError
from esm_ray.models.heads import HEAD_FILE


def stored_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor as stored) for every tensor of the safetensors files of an HF directory
    (the task-head file left out)."""
    from safetensors import safe_open

    files = [f for f in sorted(Path(model_dir).glob("*.safetensors")) if f.name != HEAD_FILE]
    if not files:
        raise InputError(f"{model_dir}: no .safetensors weights")
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                yield k, st.get_tensor(k)


def _floating(model_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.dtype]]:
    """Every floating tensor of a model directory as float32, with the dtype it is stored in."""
    return {k: (t.float(), t.dtype) for k, t in stored_tensors(model_dir) if t.is_floating_point()}


class ScaledUpdate:
    """`model` (loaded from `merged_dir`) with its update over the base on `keys` (None: every
    floating tensor the model has) rescalable in place by `set_factor(f)`."""

    def __init__(self, model: nn.Module, base_dir: str | Path, merged_dir: str | Path,
                 keys: Sequence[str] | None = None) -> None:
        self.model = model
        params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        base, merged = _floating(base_dir), _floating(merged_dir)
        self.keys = list(keys) if keys is not None else [k for k in merged if k in params]
        bad = [k for k in self.keys if k not in params or k not in base or k not in merged]
        if bad:
            raise InputError(f"{merged_dir}: keys to scale not found in the model, the merge or the base: "
                             f"{', '.join(bad[:5])}")
        self.params = {k: params[k] for k in self.keys}
        self.w0 = {k: base[k][0] for k in self.keys}
        self.delta = {k: merged[k][0] - base[k][0] for k in self.keys}
        self.dtype = {k: merged[k][1] for k in self.keys}

    @torch.no_grad()
    def set_factor(self, f: float) -> None:
        for k in self.keys:
            self.params[k].copy_((self.w0[k] + f * self.delta[k]).to(self.dtype[k]).to(self.params[k].dtype))
