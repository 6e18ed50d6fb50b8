"""Many LoRA adapters on one model, one adapter per row of a batch: stacked factors per layer.

peft's mixed-adapter batch (`adapter_names=`) splits every LoRA layer's input by adapter and runs
each group through its own small modules, a handful of Python-level operations per adapter per
layer and per decoding step. With a few hundred LoRA layers and one token per step, that
overhead, not the arithmetic, sets the speed on a CPU (half of the merged model's tokens/s at
concurrency 8 in benchmarks/serve_llm.py). Here each LoRA layer's adapters are stacked once:

    A (T + 1, r, d_in)    B (T + 1, d_out, r)    s (T + 1,)

(task t's lora_A, lora_B and scaling, in peft's layout; ranks zero-padded to the largest;
slot T all zero: the merged model without an adapter). While `MultiLoRA.rows(names)` is active,
every such layer of the model is replaced by a `StackedLoRALinear` computing, for row i with
adapter t_i,

    y_i = x_i Wᵀ + b + s_{t_i} (x_i A_{t_i}ᵀ) B_{t_i}ᵀ

- every row on one adapter t: two matmuls (none when no row has an adapter);
- rows on different adapters: two batched matmuls over factors gathered for the batch once,
  when the batch starts, and kept until it ends (rows × one adapter's size of memory, up to
  `cache_bytes`; beyond it they are gathered again at each call).

peft's own lora_A / lora_B weights become views into the stacks, so the adapters are held once
and peft (the router's passes, `adapter_names=`) keeps computing with the same numbers (bit for
bit when the adapters share one rank; a lower rank's lora_B is a strided view, which may round
differently in the last place). Only vanilla LoRA on nn.Linear is stacked; `MultiLoRA.of` says
why not otherwise (DoRA and other variants, LoRA biases, embedding or conv adapters,
modules_to_save, fan_in_fan_out, merged adapters), and callers keep peft's path. Adapters in
another dtype than the base (peft keeps them in float32 on a half-precision base) are applied in
their dtype, as peft does.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MultiLoRA", "StackedLoRALinear"]


class StackedLoRALinear(nn.Module):
    """nn.Linear W, b plus the stacked adapters of one LoRA layer (see the module docstring).

    weight (d_out, d_in), bias (d_out,) or None: the base layer's own parameters (shared)
    A (T+1, r, d_in), B (T+1, d_out, r), scaling (T+1,): the stacks, slot T zero
    """

    def __init__(self, base: nn.Linear, A: Tensor, B: Tensor, scaling: Tensor) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.A, self.B, self.scaling = A, B, scaling
        self.empty = A.shape[0] - 1
        # set per batch by `select`: None (no row has an adapter here), ("one", A_t, s_t B_t),
        # ("rows", A_sel, s B_sel) gathered per row, or ("gather", slots) to gather at each call
        self.factors: tuple | None = None

    def select(self, slots: list[int], index: Tensor | None, keep: bool) -> None:
        """The batch's adapters: slots[i] for row i; index: the same as a tensor (rows differ)."""
        if index is None:
            t = slots[0]
            s = float(self.scaling[t])
            self.factors = None if t == self.empty else ("one", self.A[t], self.B[t] if s == 1.0 else self.B[t] * s)
        elif keep:
            self.factors = ("rows", self.A[index], self.B[index] * self.scaling[index][:, None, None])
        else:
            self.factors = ("gather", index)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        f = self.factors
        if f is None:
            return y
        same = x.dtype == self.A.dtype  # else (say a bf16 base, float32 adapters) as peft: in A's dtype
        xc = x if same else x.to(self.A.dtype)
        if f[0] == "one":
            delta = (xc @ f[1].T) @ f[2].T
            return y.add_(delta if same else delta.to(y.dtype))
        if f[0] == "rows":
            a, b = f[1], f[2]
        else:
            a, b = self.A[f[1]], self.B[f[1]] * self.scaling[f[1]][:, None, None]
        a, b = a.transpose(1, 2), b.transpose(1, 2)
        shape = y.shape
        x3 = xc if xc.dim() == 3 else xc.reshape(shape[0], -1, x.shape[-1])
        y3 = y if y.dim() == 3 else y.reshape(shape[0], -1, shape[-1])
        if same:
            return torch.baddbmm(y3, torch.bmm(x3, a), b).reshape(shape)
        return y3.add_(torch.bmm(torch.bmm(x3, a), b).to(y.dtype)).reshape(shape)

    def release(self) -> None:
        self.factors = None

    def extra_repr(self) -> str:
        return f"adapters={self.empty}, d_in={self.A.shape[2]}, rank={self.A.shape[1]}, d_out={self.B.shape[1]}"


def _why_not(peft_model: Any) -> str | None:
    """None when every adapter layer of the model is vanilla LoRA on nn.Linear, else why not."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for name, m in peft_model.named_modules():
        if isinstance(m, AuxiliaryTrainingWrapper):
            return f"{name} is a modules_to_save / trainable-token module"
        if not isinstance(m, BaseTunerLayer):
            continue
        if type(m) is not LoraLinear or type(m.get_base_layer()) is not nn.Linear:
            return f"{name} is a {type(m).__name__} adapter layer (only LoRA on nn.Linear is stacked)"
        if getattr(m, "fan_in_fan_out", False) or m.merged:
            return f"{name} has fan_in_fan_out set or a merged adapter"
        for n in m.lora_A:
            if n in getattr(m, "lora_variant", {}) or m.use_dora.get(n) or m.lora_bias.get(n):
                return f"{name}: adapter {n!r} is DoRA, another LoRA variant, or has a LoRA bias"
            if m.lora_A[n].weight.dtype != m.lora_B[n].weight.dtype:
                return f"{name}: adapter {n!r} has lora_A and lora_B in different dtypes"
    return None


class MultiLoRA:
    """The stacked adapters of a peft model (build with `MultiLoRA.of`).

    model: the transformers model inside the PeftModel (call it while `rows` is active)
    names: the adapters, in slot order
    """

    def __init__(self, peft_model: Any, cache_bytes: int = 1 << 30) -> None:
        from peft.tuners.lora.layer import Linear as LoraLinear

        self.model: nn.Module = peft_model.get_base_model()
        self.names = list(peft_model.peft_config)
        self.slot = {n: i for i, n in enumerate(self.names)}
        self.cache_bytes = cache_bytes
        self._swaps: list[tuple[nn.Module, str, nn.Module, StackedLoRALinear]] = []
        self.adapter_bytes = 0  # one row's share of the gathered factors, summed over the layers
        for name, m in list(self.model.named_modules()):
            if not isinstance(m, LoraLinear):
                continue
            if not any(n in m.lora_A for n in self.names):
                continue
            parent_name, _, attr = name.rpartition(".")
            stacked = self._stack(m)
            self._swaps.append((self.model.get_submodule(parent_name), attr, m, stacked))
            self.adapter_bytes += (stacked.A[0].numel() + stacked.B[0].numel()) * stacked.A.element_size()

    @classmethod
    def of(cls, peft_model: Any, cache_bytes: int = 1 << 30) -> tuple["MultiLoRA | None", str | None]:
        """(MultiLoRA, None), or (None, why this model's adapters cannot be stacked)."""
        why = _why_not(peft_model)
        return (None, why) if why is not None else (cls(peft_model, cache_bytes), None)

    def _stack(self, layer: Any) -> StackedLoRALinear:
        base: nn.Linear = layer.get_base_layer()
        d_out, d_in = base.weight.shape
        have = [n for n in self.names if n in layer.lora_A]
        ref = layer.lora_A[have[0]].weight
        r = max(layer.lora_A[n].weight.shape[0] for n in have)
        T = len(self.names)
        A = torch.zeros(T + 1, r, d_in, dtype=ref.dtype, device=ref.device)
        B = torch.zeros(T + 1, d_out, r, dtype=ref.dtype, device=ref.device)
        s = torch.zeros(T + 1, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for n in have:
                i, a, b = self.slot[n], layer.lora_A[n].weight, layer.lora_B[n].weight
                k = a.shape[0]
                A[i, :k] = a
                B[i, :, :k] = b
                s[i] = float(layer.scaling[n])
                layer.lora_A[n].weight.data = A[i, :k]  # peft computes with views of the stacks
                layer.lora_B[n].weight.data = B[i, :, :k]
        return StackedLoRALinear(base, A, B, s)

    @contextmanager
    def rows(self, adapters: Sequence[str | None]) -> Iterator[nn.Module]:
        """Within: `model` applies adapters[i] (a name, or None for none) to row i of every
        batch it is given (the rows of every call must be these rows, in this order). Not
        reentrant, and not to be mixed with peft calls on the same model meanwhile."""
        unknown = sorted({a for a in adapters if a is not None and a not in self.slot})
        if unknown:
            raise ValueError(f"unknown adapter(s) {', '.join(unknown)} (have: {', '.join(self.names)})")
        empty = len(self.names)
        slots = [self.slot[a] if a is not None else empty for a in adapters]
        index = None
        if len(set(slots)) > 1 and self._swaps:
            index = torch.tensor(slots, dtype=torch.long, device=self._swaps[0][3].A.device)
        keep = len(slots) * self.adapter_bytes <= self.cache_bytes
        try:
            for parent, attr, _, stacked in self._swaps:
                stacked.select(slots, index, keep)
                setattr(parent, attr, stacked)
            yield self.model
        finally:
            for parent, attr, layer, stacked in self._swaps:
                setattr(parent, attr, layer)
                stacked.release()
