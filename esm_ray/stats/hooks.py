"""Forward hooks that accumulate the input statistics of every linear layer.

Each hooked layer's input rows x (padding tokens removed) are accumulated into float64:
n (rows), s1 = Σ x, G = Σ x xᵀ. With precision "mixed" (the default) only the lower
block-triangle of G is computed (`tri_blocks`: about half the flops of XᵀX), by float32 GEMMs
(TF32 on GPUs where torch allows it) summed into float32 buffers that are added into the
float64 accumulators every `BLOCK_ROWS` rows, so the float32 round-off covers at most that
many rows; the Gram is mirrored from its lower triangle at the end (exactly symmetric). With
"float64" every row is upcast and multiplied in float64 (2x to 64x slower). Low-precision
activations are upcast before anything is multiplied. Layers that are called with the very
same input tensor (q/k/v projections, LLaMA's gate/up) share one accumulation: it is stored
once under the first such layer and the others map to it, which divides the memory of
attention and MLP inputs by 3 and 2.

Few rows on a wide input: an input at least `ROWS_MIN_WIDTH` (256) wide keeps its rows
themselves (float32) while it has seen fewer than 2 · d_in of them; its statistics are then
(n, s1, X) instead of (n, s1, G) (`LayerStats.rows`). X then takes fewer bytes than the
float64 G, is exact, and costs no multiply-adds: on MiniLM calibrated on 32-64 samples
(700-1600 tokens) the six 1536-wide inputs are 80% of the Gram flops. The batch that would
reach 2 · d_in rows turns the kept rows into a Gram, and accumulation goes on as above.

Memory: one distinct input of width d_in costs about d_in² · 8 bytes (`stats_bytes`) for as
long as the pass runs, e.g. 4.7 MB for d_in = 768, 134 MB for d_in = 4096 and 970 MB for d_in = 11008
(LLaMA-7B down_proj). When all layers do not fit, `plan_passes` packs the shared-input groups
into passes under a byte budget, and calibration runs the data once per pass.
"""

from __future__ import annotations

import sys

from collections.abc import Callable, Iterable
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


class ModuleStats(LayerStats):
    """LayerStats of one module, plus whether its weight is stored transposed (d_in, d_out)."""

    __slots__ = ("transposed",)

    def __init__(self, n: int, s1: Tensor, gram: Tensor | None = None, rows: Tensor | None = None,
                 transposed: bool = False) -> None:
        super().__init__(n, s1, gram, rows)
        self.transposed = bool(transposed)


def is_hookable(module: nn.Module) -> bool:
    conv1d = _conv1d()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    return int(module.weight.shape[0])  # Conv1D


def stats_bytes(d_in: int) -> int:
    """Bytes held for one distinct input of width d_in while a pass runs, in either precision:
    "float64" holds G (d_in²) and s1 (d_in) in float64; "mixed" holds the lower block-triangle
    of G (`tri_blocks`) and s1 in float64 and again in float32 (more than float64 for
    d_in < 384, less above), and G whole (float64) when the pass ends; an input at least
    ROWS_MIN_WIDTH wide adds its kept rows (fewer than 2 · d_in, float32), held while they are
    turned into the Gram."""
    full = 8 * d_in * (d_in + 1)
    tri = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tri_blocks(d_in))
    kept = 8 * d_in * d_in if d_in >= ROWS_MIN_WIDTH else 0  # rows kept, while they become a Gram
    return max(full, 12 * (tri + d_in)) + kept


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
BLOCK_ROWS = 1024  # token rows summed in float32 before they are added in float64 ("mixed")
ROWS_MIN_WIDTH = 256  # inputs this wide keep their rows, not a Gram, while fewer than twice their width
TRI_BASE = 192  # "mixed": Gram blocks on the diagonal are at most this wide (see tri_blocks)


def tri_blocks(d: int, base: int = TRI_BASE) -> list[tuple[int, int, int, int]]:
    """The lower block-triangle of a d x d Gram as blocks (r0, r1, c0, c1), r0 >= c0.

    The columns are halved recursively until a part is at most `base` wide: each halving
    gives one off-diagonal block (the lower half's rows against the upper half's columns),
    the parts at the bottom give the diagonal blocks (square, computed whole). Their GEMMs
    cost (1 + base/d)/2 of the full XᵀX (d = 1536: 0.56; d = 384: 0.75), in few, squarish
    products; torch has no symmetric rank-k update (BLAS syrk).
    """
    out: list[tuple[int, int, int, int]] = []

    def split(lo: int, hi: int) -> None:
        if hi - lo <= base:
            out.append((lo, hi, lo, hi))
            return
        mid = (lo + hi) // 2
        out.append((mid, hi, lo, mid))
        split(lo, mid)
        split(mid, hi)

    split(0, d)
    return out


class _Acc:
    """n, Σx and XᵀX of one input.

    An input at least ROWS_MIN_WIDTH wide first keeps its rows themselves (float32 copies):
    while it has seen fewer than 2 · d_in rows, X takes fewer bytes than the float64 G and
    costs no multiply-adds (`LayerStats.rows`). The batch that would reach 2 · d_in turns it
    into a Gram: the kept rows are accumulated, one batch at a time, and the accumulation goes
    on as below. (Where the collector knows that the pass feeds at least 2 · d_in token rows,
    the Gram starts at once: `keep_rows=False`.)
    "float64": every row upcast, XᵀX by one float64 GEMM per call.
    "mixed": only the Gram's lower block-triangle (`tri_blocks`) is computed: each block is a
    float32 GEMM added (addmm) into a float32 buffer, and the buffer is added into a float64
    accumulator of the same block, then zeroed, whenever BLOCK_ROWS more rows would be summed
    in it; float32 round-off thus covers at most BLOCK_ROWS rows. `result()` mirrors the lower
    block-triangle, so the Gram is exactly symmetric. On CPU the float64 accumulators are
    blocks of the result itself (a d x d float64 tensor whose pages above the block-triangle
    are first written by the mirror), so no second Gram is allocated at the end; on other
    devices, which take memory whole when it is allocated, they are blocks of their own,
    copied into the Gram at the end. Memory per input: (1 + 192/d)/2 · d² · (8 + 4) bytes
    while rows are added, 6.75 · d² at d = 1536 (a full float64 Gram: 8 · d²) and 9 · d² at
    384; the Gram (8 · d²) at the end; plus up to 8 · d² of kept rows while they are turned
    into the Gram (see `stats_bytes`).
    """

    __slots__ = ("n", "d", "s1", "gram", "precision", "blocks", "buf", "acc", "s1_buf", "rows_buf", "rows",
                 "inplace")

    def __init__(self, d_in: int, device: torch.device, precision: GramPrecision = "mixed",
                 keep_rows: bool = True) -> None:
        if precision not in ("mixed", "float64"):
            raise ValueError(f"gram precision must be 'mixed' or 'float64', got {precision!r}")
        self.n = 0
        self.d = d_in
        self.precision = precision
        self.inplace = torch.device(device).type == "cpu"
        self.s1 = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.rows: list[Tensor] | None = [] if keep_rows and d_in >= ROWS_MIN_WIDTH else None
        if self.rows is None:
            self._start_gram()

    def _start_gram(self) -> None:
        d_in, device = self.d, self.s1.device
        if self.precision == "float64":
            self.gram = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
            return
        self.blocks = tri_blocks(d_in)
        self.buf = [torch.zeros(r1 - r0, c1 - c0, dtype=torch.float32, device=device)
                    for r0, r1, c0, c1 in self.blocks]
        self.acc: list[Tensor] | None = None  # float64 blocks, made by the first flush
        if self.inplace:  # the result's own blocks; nothing else of it is written until the mirror
            self.gram = torch.empty(d_in, d_in, dtype=torch.float64, device=device)
            self.acc = [self.gram[r0:r1, c0:c1] for r0, r1, c0, c1 in self.blocks]
            for a in self.acc:
                a.zero_()
        self.s1_buf = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.rows_buf = 0

    def add(self, x: Tensor) -> None:
        m = int(x.shape[0])
        if self.rows is not None:
            if self.n + m < 2 * self.d:  # float32 X smaller than float64 G
                self.rows.append(x.to(torch.float32, copy=True))
                self.n += m
                return
            kept, self.rows = self.rows, None  # 2 · d_in reached: from now on a Gram
            self._start_gram()
            while kept:
                self._accumulate(kept.pop(0))  # each batch freed once counted
        self.n += m
        self._accumulate(x)

    def _accumulate(self, x: Tensor) -> None:
        if self.precision == "float64":
            x64 = x.to(torch.float64)
            self.s1 += x64.sum(0)
            self.gram.addmm_(x64.T, x64)
            return
        x32 = x.to(torch.float32)
        for i in range(0, int(x32.shape[0]), BLOCK_ROWS):
            blk = x32[i:i + BLOCK_ROWS]
            if self.rows_buf + int(blk.shape[0]) > BLOCK_ROWS:
                self._flush()
            for (r0, r1, c0, c1), buf in zip(self.blocks, self.buf):
                buf.addmm_(blk[:, r0:r1].T, blk[:, c0:c1])
            self.s1_buf += blk.sum(0)
            self.rows_buf += int(blk.shape[0])

    def _flush(self) -> None:
        if not self.rows_buf:
            return
        if self.acc is None:
            self.acc = [b.to(torch.float64) for b in self.buf]
        else:
            for a, b in zip(self.acc, self.buf):
                a += b
        self.s1 += self.s1_buf
        for b in self.buf:
            b.zero_()
        self.s1_buf.zero_()
        self.rows_buf = 0

    def result(self) -> tuple[int, Tensor, Tensor | None, Tensor | None]:
        """(n, Σx, XᵀX, None) in float64, on the accumulators' device ("mixed" Grams are
        exactly symmetric), or (n, Σx, None, X) while the rows are kept (X float32, Σx summed
        in float64). Call once, after the last `add`: the blocks or rows are handed over."""
        if self.rows is not None:
            kept, self.rows = self.rows, []
            x = torch.cat(kept) if kept else torch.zeros(0, self.d, dtype=torch.float32, device=self.s1.device)
            return self.n, x.to(torch.float64).sum(0), None, x
        if self.precision == "float64":
            return self.n, self.s1, self.gram, None
        # accumulators made in inference mode can only be updated in it (results() may run after)
        with torch.inference_mode(self.s1.is_inference()):
            if self.inplace:
                self._flush()
                gram, self.gram, self.buf, self.acc = self.gram, None, [], None
                return self.n, self.s1, self._mirror(gram), None
            if self.acc is None:  # never flushed: the float32 buffers hold every row
                self.s1 += self.s1_buf
                return (*self._assemble(self.buf), None)
            self._flush()
            return (*self._assemble(self.acc), None)

    def _assemble(self, acc: list[Tensor]) -> tuple[int, Tensor, Tensor]:
        """The Gram's lower block-triangle `acc` (float32 or float64 blocks) as one symmetric
        float64 Gram; the accumulators are freed."""
        self.buf, self.acc = [], None
        d, dev = self.d, self.s1.device
        if not self.n:
            return self.n, self.s1, torch.zeros(d, d, dtype=torch.float64, device=dev)
        gram = torch.empty(d, d, dtype=torch.float64, device=dev)  # every entry is written below
        for (r0, r1, c0, c1), a in zip(self.blocks, acc):
            gram[r0:r1, c0:c1] = a
        del acc
        return self.n, self.s1, self._mirror(gram)

    def _mirror(self, gram: Tensor) -> Tensor:
        """`gram` (float64) made exactly symmetric, in place, from its lower block-triangle
        (`tri_blocks`): each diagonal block (computed whole) averaged with its transpose, each
        block below the diagonal copied, transposed, above it."""
        for r0, r1, c0, c1 in self.blocks:
            if r0 == c0:
                a = gram[r0:r1, c0:c1].clone()
                gram[r0:r1, c0:c1] = (a + a.T) * 0.5
                continue
            for i in range(0, r1 - r0, TRI_BASE):  # in row strips (cache-friendlier)
                e = min(i + TRI_BASE, r1 - r0)
                gram[c0:c1, r0 + i:r0 + e] = gram[r0 + i:r0 + e, c0:c1].T
        return gram


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
    tokens: the token rows (padding excluded) the pass will feed, when the caller knows them:
    an input with a token axis that will see at least 2 · d_in of them starts its Gram at once
    instead of keeping rows it would turn into one (the same statistics, without the copies).
    """

    def __init__(self, model: nn.Module, modules: ModuleFilter = None, record_only: bool = False,
                 precision: GramPrecision = "mixed", tokens: int | None = None) -> None:
        self.model = model
        self.precision = precision
        self.tokens = tokens
        self.targets = linear_modules(model, modules)
        self.record_only = record_only
        self.transposed = {n for n, m in self.targets.items() if not isinstance(m, nn.Linear)}
        self.shared: dict[str, str] = {}
        self._acc: dict[str, _Acc] = {}
        self._seen: dict[int, tuple[Tensor, str]] = {}
        self._mask: Tensor | None = None
        self._keep_all = True
        self._index: dict[torch.device, Tensor] = {}  # kept token rows of this batch, per device
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
        self._keep_all = self._mask is None or bool(self._mask.all())
        self._index = {}
        self._batches += 1

    def feed(self, name: str, module: nn.Module, x: Tensor) -> None:
        """Count `x` as the input of target `name` (`module`) without running the module: what
        its hook would record had it been called on x. No-op for a module outside the targets."""
        if name in self.targets:
            self._hook(name)(module, (x,))

    def _rows(self, x: Tensor) -> tuple[Tensor, bool]:
        """(x's rows, (tokens, d), without padding; whether x has a token axis). When x has the
        mask's (B, L) leading shape or its B·L rows, the kept rows are gathered with the batch's
        token indices (made once per batch and device; nothing is gathered when the mask keeps
        every token)."""
        m = self._mask
        rows = x.reshape(-1, x.shape[-1])
        if m is None or x.dim() < 2:
            return rows, False
        if not (tuple(x.shape[:-1]) == tuple(m.shape) or (x.dim() == 2 and x.shape[0] == m.numel())):
            return rows, False
        if self._keep_all:
            return rows, True
        idx = self._index.get(x.device)
        if idx is None:
            idx = self._index[x.device] = m.reshape(-1).nonzero().squeeze(1).to(x.device)
        return rows.index_select(0, idx), True

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
            rows, token_axis = self._rows(x.detach())
            acc = self._acc.get(known)
            if acc is None:
                d = int(rows.shape[-1])
                gram_now = token_axis and self.tokens is not None and self.tokens >= 2 * d
                acc = self._acc[known] = _Acc(d, rows.device, self.precision, keep_rows=not gram_now)
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
            n, s1, g, x = acc.result()
            by_canon[canon] = (n, s1.cpu(), None if g is None else g.cpu(), None if x is None else x.cpu())
        out: dict[str, ModuleStats] = {}
        cache: dict[tuple[str, bool], ModuleStats] = {}
        for name, canon in self.shared.items():
            if canon not in by_canon:
                continue
            t = name in self.transposed
            if (canon, t) not in cache:
                n, s1, g, x = by_canon[canon]
                cache[(canon, t)] = ModuleStats(n, s1, g, x, transposed=t)
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
