"""RoutedLinear: a merged nn.Linear plus one low-rank residual expert per sample."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from esm_ray.core.routing import apply_routed, prototype_route


@dataclass
class RoutingState:
    """What one forward pass of a routed model needs, shared by all its routed layers.

    mode:    "prototype" (each layer picks per sample from its own input), "fixed" (every
             layer uses `choice`: SiM, oracle), or "none" (merged weights only)
    mask:    (N, L) attention mask of the batch, 1 = token (None: all tokens count)
    choice:  (N,) long, the fixed per-sample task ("fixed" mode); −1 = no expert
    force:   (N,) long, per-sample forced task in "prototype" mode (−1 = route this sample)
    trace:   filled during the forward: {module: (choice (N,), scores (N, T) or None)}
    """

    mode: str = "none"
    mask: Tensor | None = None
    choice: Tensor | None = None
    force: Tensor | None = None
    trace: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)

    def reset(self) -> None:
        self.mode, self.mask, self.choice, self.force = "none", None, None, None
        self.trace = {}


class RoutedLinear(nn.Module):
    """y = W_m x + b + B_c (A_c x), with c the task chosen for x's sample.

    base:        the merged nn.Linear (weight and bias as written by the merge)
    B, A:        (T, d_out, r) and (T, r, d_in) residual experts
    prototypes:  (T, d_in) mean fine-tuned inputs of this layer, or None
    """

    def __init__(self, base: nn.Linear, B: Tensor, A: Tensor, prototypes: Tensor | None,
                 state: RoutingState, name: str) -> None:
        super().__init__()
        t, d_out, r = B.shape
        if A.shape != (t, r, base.in_features) or d_out != base.out_features:
            raise ValueError(f"{name}: experts B {tuple(B.shape)} / A {tuple(A.shape)} do not fit a "
                             f"Linear({base.in_features}, {base.out_features})")
        if prototypes is not None and prototypes.shape != (t, base.in_features):
            raise ValueError(f"{name}: prototypes {tuple(prototypes.shape)} do not fit ({t}, {base.in_features})")
        self.base = base
        dtype = base.weight.dtype
        self.register_buffer("expert_B", B.to(dtype).contiguous())
        self.register_buffer("expert_A", A.to(dtype).contiguous())
        self.register_buffer("prototypes", None if prototypes is None else prototypes.to(torch.float32).contiguous())
        self.name = name
        self._state = [state]  # a list keeps the shared state out of the module tree

    @property
    def n_tasks(self) -> int:
        return int(self.expert_B.shape[0])

    @property
    def rank(self) -> int:
        return int(self.expert_B.shape[2])

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        st = self._state[0]
        if st.mode == "none":
            return y
        if st.mode == "prototype":
            if self.prototypes is None:
                raise RuntimeError(f"{self.name}: no prototypes stored; use another router")
            mask = st.mask if (st.mask is not None and x.ndim == 3 and st.mask.shape == x.shape[:2]) else None
            choice, scores = prototype_route(x.float(), mask, self.prototypes)
            if st.force is not None:
                choice = torch.where(st.force >= 0, st.force, choice)
            st.trace[self.name] = (choice, scores)
        elif st.mode == "fixed":
            if st.choice is None:
                raise RuntimeError(f"{self.name}: fixed routing without a choice")
            choice = st.choice
            st.trace[self.name] = (choice, None)
        else:
            raise ValueError(f"unknown routing mode {st.mode!r}")
        return y + apply_routed(x, self.expert_B, self.expert_A, choice.to(x.device))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tasks={self.n_tasks}, rank={self.rank}"
