"""Forward hooks that accumulate the input statistics of every linear layer.

Each hooked layer's input rows x (padding tokens removed) are accumulated into float64:
n (rows), s1 = Σ x, G = Σ x xᵀ. With precision "mixed" (the default) the rows are cut into
blocks of `BLOCK_ROWS`; each block's XᵀX and Σx are computed in float32 (a float32 GEMM, TF32
on GPUs where torch allows it) and added to the float64 accumulators, so the float32 round-off
covers one block only. With "float64" every row is upcast and multiplied in float64 (2x to 64x
slower). Low-precision activations are upcast before anything is multiplied. Layers that are called with the very same input tensor (q/k/v projections, LLaMA's
gate/up) share one accumulation: it is stored once under the first such layer and the others
map to it, which divides the memory of attention and MLP inputs by 3 and 2.

Memory: one distinct input of width d_in costs d_in² · 8 bytes (+ d_in · 8) for as long as the
pass runs, e.g. 4.7 MB for d_in = 768, 134 MB for d_in = 4096 and 970 MB for d_in = 11008
(LLaMA-7B down_proj). When all layers do not fit, `plan_passes` packs the shared-input groups
into passes under a byte budget, and calibration runs the data once per pass.
"""

from __future__ import annotations

import sys

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from esm_ray.core.layerstats import LayerStats


def _conv1d() -> type | None:
    """transformers' Conv1D (GPT-2 style layers: y = x W + b, W stored (d_in, d_out)) when
    transformers is loaded; a model holding one has loaded it, so planning a merge never has to."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None

ModuleFilter = Iterable[str] | Callable[[str], bool] | None


@dataclass(frozen=True)
class ModuleStats(LayerStats):
    """LayerStats of one module, plus whether its weight is stored transposed (d_in, d_out)."""

    transposed: bool = False


def is_hookable(module: nn.Module) -> bool:
    conv1d = _conv1d()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    return int(module.weight.shape[0])  # Conv1D


def stats_bytes(d_in: int) -> int:
    """Bytes held for one distinct input of width d_in: G (d_in²) and s1 (d_in) in float64."""
    return 8 * d_in * (d_in + 1)


def linear_modules(model: nn.Module, modules: ModuleFilter = None) -> dict[str, nn.Module]:
    """{name: module} of every nn.Linear / Conv1D, in registration order, optionally filtered."""
    if modules is None:
        keep: Callable[[str], bool] = lambda _: True  # noqa: E731
    elif callable(modules):
        keep = modules
    else:
        wanted = set(modules)
        keep = wanted.__contains__
    return {name: m for name, m in model.named_modules() if name and is_hookable(m) and keep(name)}


GramPrecision = Literal["mixed", "float64"]
BLOCK_ROWS = 1024  # token rows per float32 product in "mixed" precision


class _Acc:
    __slots__ = ("n", "s1", "gram", "precision")

    def __init__(self, d_in: int, device: torch.device, precision: GramPrecision = "mixed") -> None:
        if precision not in ("mixed", "float64"):
            raise ValueError(f"gram precision must be 'mixed' or 'float64', got {precision!r}")
        self.n = 0
        self.precision = precision
        self.s1 = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.gram = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)

    def add(self, x: Tensor) -> None:
        self.n += int(x.shape[0])
        if self.precision == "float64":
            x64 = x.to(torch.float64)
            self.s1 += x64.sum(0)
            self.gram.addmm_(x64.T, x64)
            return
        x32 = x.to(torch.float32)
        for i in range(0, int(x32.shape[0]), BLOCK_ROWS):
            blk = x32[i:i + BLOCK_ROWS]
            self.s1 += blk.sum(0)
            self.gram += blk.T @ blk


class StatsCollector:
    """Hooks on the linear layers of a model; accumulates their input statistics.

    Usage:
        with StatsCollector(model) as col:
            for batch in batches:
                col.begin_batch(batch["attention_mask"])
                model(**batch)
        stats = col.results()          # {module name: ModuleStats}; shared inputs share one object
        col.shared                     # {module name: the module its statistics are stored under}

    `begin_batch` must be called before each forward: it sets the attention mask used to drop
    padding rows ((B, L), 1 = token, 0 = padding; None = every row counts) and resets the
    input-identity table used to detect shared inputs. Inputs whose leading shape matches the
    mask (B, L, d) or whose rows match its size (B·L, d) are masked; others (e.g. a pooler's
    (B, d) first-token input) count every row.

    With `record_only=True` nothing is accumulated: one batch reveals the sharing groups.
    precision: how the Grams are accumulated ("mixed" or "float64", see the module docstring).
    """

    def __init__(self, model: nn.Module, modules: ModuleFilter = None, record_only: bool = False,
                 precision: GramPrecision = "mixed") -> None:
        self.model = model
        self.precision = precision
        self.targets = linear_modules(model, modules)
        self.record_only = record_only
        self.transposed = {n for n, m in self.targets.items() if not isinstance(m, nn.Linear)}
        self.shared: dict[str, str] = {}
        self._acc: dict[str, _Acc] = {}
        self._seen: dict[int, tuple[Tensor, str]] = {}
        self._mask: Tensor | None = None
        self._batches = 0
        self._handles: list = []

    # hooks ---------------------------------------------------------------------------------
    def attach(self) -> "StatsCollector":
        if not self._handles:
            for name, mod in self.targets.items():
                self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def __enter__(self) -> "StatsCollector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def begin_batch(self, attention_mask: Tensor | None) -> None:
        self._seen.clear()
        self._mask = None if attention_mask is None else attention_mask.detach().bool()
        self._batches += 1

    def _rows(self, x: Tensor) -> Tensor:
        m = self._mask
        if m is not None and x.dim() >= 2:
            if tuple(x.shape[:-1]) == tuple(m.shape):
                x = x[m.to(x.device)]
            elif x.dim() == 2 and x.shape[0] == m.numel():
                x = x[m.reshape(-1).to(x.device)]
        return x.reshape(-1, x.shape[-1])

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            x = args[0]
            seen = self._seen.get(id(x))
            known = self.shared.get(name)
            if seen is not None and seen[0] is x:
                canon = seen[1]
                if known is None:
                    if canon in self._acc and self._acc[canon].n and self._batches > 1:
                        raise RuntimeError(f"{name}: first called in batch {self._batches} with an input "
                                           f"already counted for {canon}; cannot share it retroactively")
                    self.shared[name] = canon
                elif known != canon:
                    raise RuntimeError(f"{name}: shares its input with {canon} now but with {known} before")
                return
            if known is None:
                self.shared[name] = known = name
            elif known != name:
                raise RuntimeError(f"{name}: shared its input with {known} before, but not in this batch")
            # Keep a reference so the id cannot be reused by another tensor within this batch.
            self._seen[id(x)] = (x, known)
            if self.record_only:
                return
            rows = self._rows(x.detach())
            acc = self._acc.get(known)
            if acc is None:
                acc = self._acc[known] = _Acc(rows.shape[-1], rows.device, self.precision)
            acc.add(rows)

        return hook

    # results -------------------------------------------------------------------------------
    def groups(self) -> dict[str, list[str]]:
        """{stored-under module: [modules reading that input]}, in call order."""
        out: dict[str, list[str]] = {}
        for name, canon in self.shared.items():
            out.setdefault(canon, []).append(name)
        return out

    def results(self) -> dict[str, ModuleStats]:
        """{module name: ModuleStats} on CPU; modules that share an input share one object."""
        by_canon = {}
        for canon, acc in self._acc.items():
            by_canon[canon] = (acc.n, acc.s1.cpu(), acc.gram.cpu())
        out: dict[str, ModuleStats] = {}
        cache: dict[tuple[str, bool], ModuleStats] = {}
        for name, canon in self.shared.items():
            if canon not in by_canon:
                continue
            t = name in self.transposed
            if (canon, t) not in cache:
                n, s1, g = by_canon[canon]
                cache[(canon, t)] = ModuleStats(n, s1, g, transposed=t)
            out[name] = cache[(canon, t)]
        return out


def plan_passes(groups: list[list[str]], widths: dict[str, int], max_bytes: int | None) -> list[list[str]]:
    """Pack shared-input groups, in order, into passes whose statistics fit in `max_bytes`.

    A group is never split (its members share one accumulation). A group larger than the
    budget gets a pass of its own. max_bytes None: one pass.
    """
    if max_bytes is None:
        return [[m for g in groups for m in g]] if groups else []
    passes: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for g in groups:
        cost = stats_bytes(widths[g[0]])
        if cur and used + cost > max_bytes:
            passes.append(cur)
            cur, used = [], 0
        cur.extend(g)
        used += cost
    if cur:
        passes.append(cur)
    return passes
