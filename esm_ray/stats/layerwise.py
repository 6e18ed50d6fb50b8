"""Layer-wise calibration: the statistics of a full forward pass with one block in memory at a time.

`calibrate_layerwise` works on a `models.blocks.BlockModel` (the model's skeleton on the meta
device, parts loaded from the lazy reader on demand), the way GPTQ-style quantisers calibrate
models larger than a device:

1. record: the parts outside the block stack are loaded except the output embedding; every
   block is replaced by a stub and the model's own forward runs once per batch. The first stub
   keeps the block stack's input (the embeddings); every stub keeps the arguments its block is
   called with: the attention mask the model built (causal, padding, sliding-window: one per
   layer where layer types differ), rotary position embeddings, position ids. Linear layers
   outside the blocks that run here (before the first block) are hooked.
2. blocks: the input embedding is freed; then for each block: load its tensors only, run every
   batch through it with the same hooks as the full pass (padding rows never enter a Gram),
   keep its outputs as the next block's inputs, free it.
3. tail: what runs after the blocks is run by the model's own forward once more per batch, the
   last stub handing over the final block's outputs; linear layers after the blocks (LM head,
   BERT pooler) are hooked there. Where the output head is the only one (a causal LM's), the
   pass ends at the head's input: the head is not loaded, and no logits are made.

Peak memory: the calibration activations (samples x length x hidden, one copy) plus the larger of
one block, the input embedding and the output embedding; independent of depth. The statistics
equal the full pass's up to float round-off (the same operations on the same batches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from esm_ray.core.routing import token_mean
from esm_ray.models.blocks import BlockModel, LayerwiseUnsupported
from esm_ray.models.features import last_hidden
from esm_ray.models.hf import base_model
from esm_ray.models.text import forward_kwargs
from esm_ray.stats.hooks import GramPrecision, ModuleStats, StatsCollector, in_features, linear_modules, plan_passes


class _Stop(Exception):
    """Raised by the last stub of a recording pass: nothing after the blocks needs to run."""


class _Stub(nn.Module):
    """Stands in for block `index` of the model's forward (see the module docstring)."""

    def __init__(self, index: int, run: "_Run") -> None:
        super().__init__()
        self.index = index
        self.run = run

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.run.stub_called(self.index, args, kwargs)


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _without_hidden(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block call's arguments less its hidden states (passed first when the block is run)."""
    if args:
        return tuple(args[1:]), kwargs
    return (), {k: v for k, v in kwargs.items() if k != "hidden_states"}


class _Run:
    """The state of one layer-wise calibration (one pass mode at a time)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.mode = "record"
        self.calls: list[tuple[tuple, dict]] = []   # this batch's block arguments, by layer
        self.entered = 0                            # stubs called in this pass
        self.final: Tensor | None = None            # tail mode: what the last stub returns
        self.events: list[str] = []                 # record mode: non-block linear layers by call

    def stub_called(self, index: int, args: tuple, kwargs: dict) -> Any:
        self.entered += 1
        if self.mode == "record":
            self.calls.append((args, kwargs))
            if index == self.depth - 1:
                raise _Stop
            return _hidden(args, kwargs)
        if index == self.depth - 1:
            return self.final
        return _hidden(args, kwargs)


class _ZeroEmbedding(nn.Module):
    """The input embedding during the tail pass: zeros of the right shape (the blocks' input
    is not used there; the last stub hands over the real final hidden states)."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim, self.dtype = dim, dtype

    def forward(self, ids: Tensor) -> Tensor:
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


def _call(model: nn.Module, method: str) -> nn.Module | None:
    """model.<method>() (get_input_embeddings, get_output_embeddings) when it has one."""
    fn = getattr(model, method, None)
    got = fn() if callable(fn) else None
    return got if isinstance(got, nn.Module) else None


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _outside(model: nn.Module, blocks_name: str, skip: set[str]) -> list[str]:
    """The largest sub-modules holding no block and none of `skip` (what is loaded first)."""
    out: list[str] = []

    def walk(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if full in skip:
                continue
            if full == blocks_name or blocks_name.startswith(full + ".") or any(s.startswith(full + ".") for s in skip):
                if any(True for _ in child.parameters(recurse=False)) or any(True for _ in child.buffers(recurse=False)):
                    raise LayerwiseUnsupported(f"{full}: holds tensors of its own beside the blocks; layer-wise "
                                               "calibration cannot load it in parts; use `calibration.mode: full`")
                if full != blocks_name:
                    walk(full, child)
                continue
            out.append(full)

    walk("", model)
    return out


def calibrate_layerwise(bm: BlockModel, batches: list[tuple[Tensor, Tensor]], modules: list[str] | None = None,
                        max_bytes: int | None = None, precision: GramPrecision = "mixed",
                        emit: Callable[[dict[str, ModuleStats]], None] | None = None,
                        pooled: list[Tensor] | None = None) -> dict[str, ModuleStats]:
    """Input statistics of the linear layers of `bm`'s model over `batches` ((ids, mask) pairs),
    loading one block at a time (module docstring). modules: restrict to these module names;
    max_bytes: budget for the statistics accumulated at once within a block (hooks.plan_passes).
    emit: called with each part's statistics as soon as it is complete (the layers before the
    blocks, each block, the tail), which are then not kept (see stats.spill).
    pooled: when given, the tail also runs for the features and each batch's mean last hidden
    state over its non-padding tokens ((B, hidden) float32, `models.features.pooled_features`
    of the whole model) is appended to it; with `modules=[]` that is all it computes (SiM's
    support features layer-wise). The output head is then not loaded unless its statistics are
    wanted: the base model runs the tail (`models.hf.base_model`), whose last hidden state is
    the whole model's.
    Returns {module name: ModuleStats} like `calibrate.calibrate` ({} when `emit` is given)."""
    model, device = bm.model, bm.device
    wanted = linear_modules(model, modules)
    blocks = bm.block_names()
    depth = len(blocks)
    in_block = {b: [n for n in wanted if n.startswith(b + ".")] for b in blocks}
    outside = [n for n in wanted if not any(n.startswith(b + ".") for b in blocks)]
    emb_in = _module_name(model, _call(model, "get_input_embeddings"))
    emb_out = _module_name(model, _call(model, "get_output_embeddings"))
    kwargs = forward_kwargs(model)
    run = _Run(depth)
    stubs = [_Stub(i, run) for i in range(depth)]
    for b, stub in zip(blocks, stubs):
        bm.replace(b, stub)
    out: dict[str, ModuleStats] = {}
    done = emit if emit is not None else out.update

    # 1. record the blocks' arguments and the embeddings; hook linear layers before the blocks
    tokens = sum(int(mask.sum()) for _ids, mask in batches)  # every token-axis input sees these
    for name in _outside(model, bm.blocks_name, {emb_out} if emb_out else set()):
        bm.load(name)
    rows_in: list[Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = []
    order: dict[str, int] = {}
    def noting(name: str):
        def hook(_module: nn.Module, _args: tuple) -> None:  # returns None: the input is left as it is
            order.setdefault(name, run.entered)
        return hook

    hooks = [m.register_forward_pre_hook(noting(n)) for n, m in linear_modules(model, outside).items()]
    try:
        with StatsCollector(model, outside, precision=precision, tokens=tokens) as pre:
            for ids, mask in batches:
                run.calls, run.entered = [], 0
                pre.begin_batch(mask.to(device))
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
                except _Stop:
                    pass
                if len(run.calls) != depth:
                    raise LayerwiseUnsupported(f"{bm.uri}: the forward pass of {bm.arch} called {len(run.calls)} "
                                               f"of its {depth} blocks; layer-wise calibration needs every block "
                                               "called once; use `calibration.mode: full`")
                rows_in.append(_hidden(*run.calls[0]))
                calls.append([_without_hidden(a, k) for a, k in run.calls])
    finally:
        for handle in hooks:
            handle.remove()
    between = sorted(n for n, at in order.items() if at > 0)
    if between:
        raise LayerwiseUnsupported(f"{bm.uri}: {bm.arch} runs linear layer {between[0]} between its blocks; "
                                   "layer-wise calibration supports blocks run one after another; use "
                                   "`calibration.mode: full`")
    done(pre.results())
    if emb_in is not None:
        weight = model.get_submodule(emb_in).get_parameter("weight")
        bm.replace(emb_in, _ZeroEmbedding(int(weight.shape[1]), weight.dtype))
        del weight  # the last reference: the embedding is freed here

    # 2. one block at a time
    h = rows_in
    for i, b in enumerate(blocks):
        block = bm.load(b)
        targets = linear_modules(model, in_block[b])
        if max_bytes is None or not targets:
            passes = [list(targets)]
        else:
            with StatsCollector(model, list(targets), record_only=True) as probe:
                probe.begin_batch(batches[0][1].to(device))
                block(h[0], *calls[0][i][0], **calls[0][i][1])
            groups = probe.groups()
            unseen = [[m] for m in targets if m not in probe.shared]
            widths = {m: in_features(mod) for m, mod in targets.items()}
            passes = plan_passes(list(groups.values()) + unseen, widths, max_bytes)
        for p, names in enumerate(passes):
            last = p == len(passes) - 1
            with StatsCollector(model, names, precision=precision, tokens=tokens) as col:
                for j, (_ids, mask) in enumerate(batches):
                    col.begin_batch(mask.to(device))
                    rest, kw = calls[j][i]
                    y = block(h[j], *rest, **kw)
                    if last:
                        h[j] = y[0] if isinstance(y, (tuple, list)) else y
            done(col.results())
        bm.replace(b, stubs[i])  # frees the block
        del block

    # 3. the tail: the output embedding and whatever runs after the blocks
    tail = [n for n in outside if n not in order]
    if tail or pooled is not None:
        # The output head alone (a causal LM's): its input is recorded by its hook and the pass
        # ends there, so the head is neither loaded nor run (no logits: a batch of 8 x 64 tokens
        # of a 49152-word vocabulary is 100 MB in float32).
        head = model.get_submodule(emb_out) if tail == [emb_out] and pooled is None else None
        if tail and emb_out is not None and head is None:
            bm.load(emb_out)
        runner = model if tail else (base_model(model) or model)
        extra = {**forward_kwargs(runner), **({"output_hidden_states": True} if pooled is not None else {})}
        run.mode = "tail"
        with StatsCollector(model, tail, precision=precision, tokens=tokens) as col:
            stop = head.register_forward_pre_hook(_stop) if head is not None else None  # after the collector's
            try:
                for j, (ids, mask) in enumerate(batches):
                    run.final, run.entered = h[j], 0
                    col.begin_batch(mask.to(device))
                    try:
                        y = runner(input_ids=ids.to(device), attention_mask=mask.to(device), **extra)
                    except _Stop:
                        continue
                    if pooled is not None:
                        pooled.append(token_mean(last_hidden(y), mask.to(device)).float())
            finally:
                if stop is not None:
                    stop.remove()
        done(col.results())
        run.final = None
    return out


def _stop(_module: nn.Module, _args: tuple) -> None:
    """A pre-hook that ends the forward pass at its module (after the hooks before it ran)."""
    raise _Stop
