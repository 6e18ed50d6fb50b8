"""Pooled features of a Hugging Face backbone: what SiM's router and the zoo's probes read."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from esm_ray.core.routing import token_mean


def last_hidden(output: Any) -> Tensor:
    """The last hidden state of a Hugging Face model output (encoders and causal LMs)."""
    h = getattr(output, "last_hidden_state", None)
    if h is None:
        hs = getattr(output, "hidden_states", None)
        if not hs:
            raise ValueError("model output has neither last_hidden_state nor hidden_states")
        h = hs[-1]
    return h


@torch.no_grad()
def pooled_features(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the last hidden state over each sample's non-padding tokens. (N, hidden) float32."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return token_mean(last_hidden(out), attention_mask).float()


# ---- the sample-level task of a layer-wise routed forward ----------------------------------
