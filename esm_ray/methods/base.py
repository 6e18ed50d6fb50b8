"""The contract between a merge method and the executors.

A merge runs tensor by tensor. For each tensor the executor calls, on each expert's side
(in-process or inside that expert's Ray actor), ``prepare`` with the base tensor and that
expert's tensor, and ships the returned *part* (a compact object: a task vector, sparse
trimmed values, low-rank factors) to the coordinator, which calls ``fuse`` with the parts of
all experts and gets the merged update ΔW back. The executor writes ``base + scale * ΔW``.
Both executors call the same methods in the same order, so they produce the same bytes.

Optional stages:
- ``needs_stats``: the expert side receives the calibration statistics (LayerStats) of the
  linear layer the tensor belongs to, computed once per expert and cached.
- ``layer_scales``: a global pass after all ΔW are known (ESM's inter-layer scaling). The
  executor spills the ΔW to disk, hands over their Frobenius norms, and applies the returned
  per-tensor factors when writing.
- A ``Purifier`` (PAVE) replaces each expert tensor by a purified one before ``prepare``; it
  may run a pre-pass whose small per-expert summaries are planned on the coordinator.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from collections.abc import Sequence
from typing import Any, Callable, ClassVar, Generic, Iterator, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from esm_ray.core.layerstats import LayerStats
from esm_ray.core.lora import LoraFactors, LowRank
from esm_ray.methods.schedule import Setting, first_value

_INDEX = re.compile(r"\.(\d+)\.")


class MethodParams(BaseModel):
    """Base of every method's parameter model: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


P = TypeVar("P", bound=MethodParams)


def _params_of(cls: type) -> type[MethodParams] | None:
    """The Params model a class names as its generic argument (`class Ties(MergeMethod[TiesParams])`)."""
    for base in getattr(cls, "__orig_bases__", ()):
        for arg in get_args(base):
            if isinstance(arg, type) and issubclass(arg, MethodParams):
                return arg
    return None


@dataclass(frozen=True)
class TensorInfo:
    """What the executor knows about one tensor before reading it.

    name:        state-dict key, e.g. 'encoder.layer.3.attention.self.query.weight'
    shape:       its shape
    module:      owning nn.Linear's name when calibration statistics exist for it, else None
    layer_type:  the key with the block index replaced by '*', e.g.
                 'encoder.layer.*.attention.self.query.weight' (groups tensors across depth)
    layer_index: the block index, or None for tensors outside the repeated blocks
    position:    where gradients are read (methods.schedule): i / (n - 1) for layer i of a
                 run of n layers, 0 outside the blocks
    slice:       the index of the spec's `slices` entry the tensor belongs to (0 without slices)
    """

    name: str
    shape: tuple[int, ...]
    module: str | None = None
    layer_type: str = ""
    layer_index: int | None = None
    position: float = 0.0
    slice: int = 0

    @staticmethod
    def of(name: str, shape: tuple[int, ...], module: str | None = None) -> "TensorInfo":
        m = _INDEX.search(name)
        idx = int(m.group(1)) if m else None
        ltype = _INDEX.sub(".*.", name, count=1) if m else name
        return TensorInfo(name, tuple(int(s) for s in shape), module, ltype, idx)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ExpertContext:
    """Per-expert facts handed to ``prepare``.

    index:   position of the expert in the spec (0-based), T = n_experts
    name:    the expert's name from the spec
    weight:  its per-model weight (spec `experts[i].weight`, default 1.0)
    density: its per-model density override, or None to use the method's
    stats:   calibration statistics of this tensor's layer in this expert, when the
             method needs them and the tensor belongs to a hooked linear layer
    plan:    the purifier's plan for this expert (PAVE rank ratio), if any
    params:  this expert's own values of other method parameters for this tensor (spec
             `experts[i].params`, e.g. gamma, epsilon), resolved by `MergeMethod.context_for`;
             `params_for(info, ctx)` lays them over the method's
    """

    index: int
    name: str
    weight: float = 1.0
    density: float | None = None
    stats: LayerStats | None = None
    plan: Any = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SupportInputs:
    """What the runtime reads on an expert's side for a method's support stage.

    head:       the expert's head.safetensors bytes, checked (None when it has none)
    labels:     the head's labels
    features:   pooled pretrained-backbone features (n, d) of the expert's first
                `support_samples()` unlabelled rows, when the method asks for them
    base_uri:   where the base model is
    base_bytes: the bytes of the base's tensors
    gain:       a causal LM expert's mean next-token log-likelihood gain over the base on its
                first `support_gain_samples()` rows (nats per token), when the method asks
    base_means: the pretrained base's mean input of every linear layer over the expert's
                calibration rows, {module: (d_in,)}, when `support_base_means()` asks
    """

    head: bytes | None = None
    labels: list[str] | None = None
    features: Tensor | None = None
    base_uri: str = ""
    base_bytes: int = 0
    gain: float | None = None
    base_means: dict[str, Tensor] | None = None


class BaseWeights:
    """An artifact value meaning "a safetensors copy of the base model's tensors": the runtime
    writes it, so a method never opens a model itself."""

    def __repr__(self) -> str:
        return "BASE_WEIGHTS"


BASE_WEIGHTS = BaseWeights()


class Parts(Sequence):
    """The experts' parts of one tensor, as `fuse` receives them: part i is expert i's.

    Indexing keeps what it returns (a method may read a part several times). `stream(order)`
    yields the parts in that order without keeping them, for methods that fuse in one pass: an
    executor that makes parts on demand (the local one) then holds only a few at a time.
    """

    def __init__(self, items: Sequence[Any] = ()) -> None:
        self._items = list(items)

    @staticmethod
    def of(parts: Sequence[Any]) -> "Parts":
        """`parts` itself when it is a Parts, else a Parts over the given list."""
        return parts if isinstance(parts, Parts) else Parts(parts)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):  # type: ignore[override]
        return self._items[i]

    def stream(self, order: list[int]) -> Iterator[Any]:
        for i in order:
            yield self[i]


@dataclass(frozen=True)
class Needs:
    """What a method or purifier needs beyond the base and the experts' weights. The plan
    checks every need once, before any work (`runtime.plan.check_needs`).

    stats:  calibration statistics of each expert's linear layers (read from its `data`)
    data:   unlabelled samples per expert (`experts[i].data`), read directly (the searches)
    heads:  each expert's task head (`head.safetensors`) where the model has no output layer of
            its own (encoders; a causal LM scores with its LM head)
    labels: labelled samples (no registered method needs them)
    """

    stats: bool = False
    data: bool = False
    heads: bool = False
    labels: bool = False

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(self.stats or other.stats, self.data or other.data, self.heads or other.heads,
                     self.labels or other.labels)

    @property
    def reads_data(self) -> bool:
        """Whether every expert needs its unlabelled `data`."""
        return self.stats or self.data

    def describe(self) -> list[str]:
        """Human words for `esm-ray methods` and the dry run."""
        out = ["calibration data"] if self.stats else (["unlabelled data"] if self.data else [])
        return out + (["task heads (encoders)"] if self.heads else []) + (["labels"] if self.labels else [])


class Parametrised(ABC, Generic[P]):
    """A method or purifier with its own parameter model: `class Ties(MergeMethod[TiesParams])`
    sets `Params` (what the registry validates a spec's `params` with) and types `self.params`."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    params: P

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = _params_of(cls)
        if params is not None and "Params" not in cls.__dict__:
            cls.Params = params

    def __init__(self, params: P, n_experts: int, seed: int = 0) -> None:
        self.params = params
        self.n_experts = n_experts
        self.seed = seed
        # Per-tensor parameters (methods.schedule), set by registry.build_method: the scalar
        # parameters as given, the varying ones (gradients, filters) by name, each slice's own
        # settings, and each expert's (per slice) settings.
        self.fixed: dict[str, Any] = params.model_dump(by_alias=True, exclude_unset=True)
        self.varying: dict[str, Setting] = {}
        self.slice_params: list[dict[str, Setting]] = []
        self.expert_params: list[dict[str, Setting]] = []
        self.slice_expert_params: list[list[dict[str, Setting]]] = []
        self._resolved: dict[tuple, Any] = {}

    @property
    def per_tensor(self) -> bool:
        """Whether any parameter may differ from tensor to tensor or from expert to expert."""
        return bool(self.varying or any(self.slice_params) or any(self.expert_params)
                    or any(any(s) for s in self.slice_expert_params))

    def params_for(self, info: "TensorInfo", ctx: "ExpertContext | None" = None) -> P:
        """The parameters for one tensor: gradients and filters resolved at its name and
        position (its slice's settings first), and with `ctx`, that expert's own values laid
        over them. `self.params` itself when nothing varies. Cached by the resolved values."""
        own = {k: v for k, v in (ctx.params.items() if ctx is not None else ()) if k in self._fields()}
        sp = self.slice_params[info.slice] if info.slice < len(self.slice_params) else {}
        if not self.varying and not sp and not own:
            return self.params
        raw = dict(self.fixed)
        for name in set(self.varying) | set(sp):
            v = first_value(sp.get(name), self.varying.get(name), self.fixed.get(name),
                            tensor_name=info.name, t=info.position)
            if v is None:
                raw.pop(name, None)
            else:
                raw[name] = v
        raw.update(own)
        key = tuple(sorted((k, repr(v)) for k, v in raw.items()))
        got = self._resolved.get(key)
        if got is None:
            from pydantic import ValidationError

            from esm_ray.errors import SpecError

            try:
                got = self._resolved[key] = type(self.params).model_validate(raw)
            except ValidationError as err:
                e = err.errors()[0]
                raise SpecError(f"tensor {info.name!r}: parameter `{'.'.join(map(str, e['loc']))}` of "
                                f"{self.name!r} resolves to {e.get('input')!r}: {e['msg']}") from None
        return got

    def _fields(self) -> set[str]:
        return {f.alias or n for n, f in type(self.params).model_fields.items()}

    def context_for(self, ctx: "ExpertContext", info: "TensorInfo") -> "ExpertContext":
        """`ctx` with this expert's per-tensor settings resolved for `info`: `weight` and
        `density` replaced where a setting gives them, other parameters in `ctx.params`."""
        own = self.expert_params[ctx.index] if ctx.index < len(self.expert_params) else {}
        per_slice = self.slice_expert_params[info.slice] if info.slice < len(self.slice_expert_params) else []
        sl = per_slice[ctx.index] if ctx.index < len(per_slice) else {}
        if not own and not sl:
            return ctx
        values: dict[str, Any] = {}
        for name in set(own) | set(sl):
            v = first_value(sl.get(name), own.get(name), tensor_name=info.name, t=info.position)
            if v is not None:
                values[name] = v
        weight = float(values.pop("weight", ctx.weight))
        density = values.pop("density", ctx.density)
        return replace(ctx, weight=weight, density=None if density is None else float(density),
                       params=values)


class MergeMethod(Parametrised[P]):
    """A merge method, generic over its own parameter model. Set the class attributes,
    implement `fuse` (and the optional stages below), register with @register."""
    summary: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    output_kind: ClassVar[Literal["static", "routed"]] = "static"
    accepts_purifier: ClassVar[bool] = True
    needs_layer_scales: ClassVar[bool] = False
    # prepare / post_prepare run decompositions: worth the worker's device (runtime.device).
    # Left False, they run on the CPU, where elementwise work is cheaper than a round trip.
    decomposes: ClassVar[bool] = False
    post_decomposes: ClassVar[bool] = False
    # fuse on the same rows of every input gives those rows of ΔW, bit for bit (no reduction
    # over a tensor, no per-tensor randomness): the local executor may then merge a large
    # tensor in row blocks and never hold it whole in float32.
    elementwise: ClassVar[bool] = False
    # ΔW == 0 (entry by entry) whenever every expert's task vector of the tensor is zero: a
    # tensor that no expert changes (every expert a LoRA adapter that neither targets nor saves
    # it) is then written as the base's, without being read into float32 and merged
    # (MergePlan.copies_base). Not for methods on the weights themselves (linear without
    # normalisation scales them) or that may change such a tensor (passthrough's scale).
    zero_for_zero_tasks: ClassVar[bool] = False
    # prepare_block gets the expert's rows in their stored dtype when that is float32, bfloat16
    # or float16 (every value exact in float32) instead of a float32 copy, and returns them as
    # its part: the method computes in float32 from them (model_stock keeps a tensor's blocks
    # between its two passes: half the bytes to make, keep and read for bfloat16 experts).
    stored_dtype_blocks: ClassVar[bool] = False
    # fuse_state holds a few numbers per tensor besides the blocks it keeps (at most
    # PASS_CACHE_BYTES): the local executor may then make it ahead for a tensor of any size
    # (runtime.early); otherwise only for tensors up to EARLY_STATE_BYTES (SCE's state of an
    # embedding holds its variance and Select's indices).
    small_fuse_state: ClassVar[bool] = False
    # LoRA experts (io.adapter): a `factored` method makes its part of a LoRA target from the
    # factors (`prepare_lora`, never densifying ΔW = s·BA), and `fuse_lowrank` may return the
    # merged update factored (for `output_format: peft`). Other methods get the densified
    # expert tensor, one tensor at a time on the expert's side.
    factored: ClassVar[bool] = False
    # `fuse` and `fuse_block` return the merged weights W, not the update ΔW: the coordinator
    # writes them as they are instead of adding them to the base rows. For methods on the
    # weights themselves (slerp writes c0 · W_0 + c1 · W_1, as mergekit does; W_0 + (that − W_0)
    # differs in the last bit, and the add is one more pass over every weight on the
    # coordinator). `update_of` gives ΔW whichever a method returns.
    fuse_gives_weights: ClassVar[bool] = False
    # `fuse_block` reads the base's rows. False (slerp, whose expert side makes the merged rows
    # whole): the coordinator reads none for the merge pass and passes None as `base`; an
    # expert side that needs the rows for `prepare_block` reads them itself.
    fuse_block_base: ClassVar[bool] = True

    def update_of(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        """ΔW of one whole tensor: `fuse`, less the base where it gives the weights."""
        out = self.fuse(info, base, parts, ctxs)
        return out - base if self.fuse_gives_weights else out

    def needs(self) -> Needs:
        """Everything this method needs, from its declarations (checked once by the plan)."""
        return Needs(stats=self.needs_stats, data=self.needs_data, heads=self.needs_heads,
                     labels=self.needs_labels)

    def bind_model(self, config: dict[str, Any] | None, causal_lm: bool = False) -> None:
        """Told once by the plan, before any work: the base's config.json and whether it is a
        causal LM. The default ignores both; a routed method writes a causal LM's experts as
        PEFT adapters."""

    def bind_experts(self, adapters: list[bool]) -> None:
        """Told once by the plan after it has opened every expert: which of them (in spec order)
        are LoRA adapters (io.adapter). The default ignores it; a routed method routes adapter
        experts as themselves."""

    # -- row blocks (the local executor, tensors over MergeJob.block_bytes) -------------------
    def blockwise(self, info: TensorInfo) -> bool:
        """Whether the local executor may merge this tensor in row blocks: fuse on blocks must
        give the same bytes as on the whole tensor. True for `elementwise` methods; a method
        whose prepare needs a statistic of the whole tensor (TIES's trim threshold) returns
        True and computes it in `block_state`, one whose fuse needs one across experts
        (model_stock's cosines) in `fuse_state`."""
        return self.elementwise

    def block_state(self, info: TensorInfo, blocks: Callable[[], Iterator[tuple[Tensor, Tensor]]],
                    ctx: ExpertContext) -> Any:
        """Expert side, before a tensor's row blocks: what `prepare_block` needs of the whole
        tensor. `blocks()` yields (base, expert) float32 row blocks in order, and may be called
        more than once (each call reads them again). Default: nothing."""
        return None

    def state_block(self, state: Any, start: int) -> Any:
        """Expert side, before a row block is read: the block's part from `block_state`'s
        state alone, when the state kept what the block needs (TIES keeps a small tensor's task
        vector from its threshold passes), else None: the block is then read and
        `prepare_block` makes the part. A kept block is given once. Default: None."""
        return None

    def prepare_block(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext,
                      state: Any, start: int) -> Any:
        """`prepare` of rows of a tensor: `info.shape` is the block's, `start` the block's first
        flat index in the whole tensor, `state` what `block_state` returned."""
        return self.prepare(info, base, expert, ctx)

    def fuse_state(self, info: TensorInfo, passes: Callable[[], Iterator[tuple[Tensor, "Parts"]]],
                   ctxs: list[ExpertContext]) -> Any:
        """Coordinator side, before a tensor's row blocks: what `fuse_block` needs of the whole
        tensor across experts (model_stock's cosines, SCE's variance threshold). `passes()`
        yields (float32 base rows, the experts' parts of those rows) block after block, each
        valid until the next, and may be called more than once (each call reads the blocks
        again). Default: nothing, without reading."""
        return None

    def fuse_block(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext],
                   state: Any, start: int) -> Tensor:
        """`fuse` of rows of a tensor: `info.shape` is the block's, `start` the block's first
        flat index in the whole tensor, `state` what `fuse_state` returned."""
        return self.fuse(info, base, parts, ctxs)

    def prepare(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        """Expert side: turn (base, expert) float32 tensors into this expert's part.

        The default is the task vector τ = W_t − W_0.
        """
        return expert - base

    def prepare_lora(self, info: TensorInfo, lora: LoraFactors, ctx: ExpertContext) -> Any:
        """Expert side of a `factored` method for a LoRA target: this expert's part from its
        factors (ΔW = lora.scale · lora.b lora.a, b (d_out, r), a (r, d_in)). Default: the
        factors themselves, which `fuse` may read densely (`methods._common.dense`)."""
        return lora

    def fuse_lowrank(self, info: TensorInfo, base: Tensor, parts: list[Any],
                     ctxs: list[ExpertContext]) -> LowRank | None:
        """Coordinator: the merged update kept factored, when the parts allow it (all of them
        made by `prepare_lora`); None otherwise. `fuse` must equal its `dense()`."""
        return None

    @abstractmethod
    def fuse(self, info: TensorInfo, base: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> Tensor:
        """Coordinator side: the merged update ΔW (float32, shape of base) from all parts.

        `ctxs` carry the per-expert weights and densities (without stats).
        """

    def layer_scales(self, infos: dict[str, TensorInfo], norms: dict[str, float]) -> dict[str, float]:
        """Global pass: per-tensor factors applied to ΔW before writing (default: none)."""
        return {}

    # -- optional post stage (routed models): runs after a tensor's merged value is final ---
    post_stage: ClassVar[bool] = False

    def post_applies(self, info: TensorInfo) -> bool:
        """Whether the post stage runs for this tensor (e.g. the routed layers)."""
        return False

    def post_prepare(self, info: TensorInfo, merged: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        """Expert side: a part computed against the final merged tensor (e.g. residual experts)."""
        raise NotImplementedError

    def post_prepare_lora(self, info: TensorInfo, merged: Tensor, lora: LoraFactors, ctx: ExpertContext) -> Any:
        """Expert side of the post stage for a LoRA target of an adapter expert, from its factors
        (ΔW = lora.scale · lora.b lora.a, never densified). None (the default): the runtime reads
        the expert densified and calls `post_prepare`."""
        return None

    def post_fuse(self, info: TensorInfo, merged: Tensor, parts: list[Any], ctxs: list[ExpertContext]) -> None:
        """Coordinator: consume the experts' post parts (kept in the method's state)."""
        raise NotImplementedError

    def artifacts(self) -> dict[str, bytes | BaseWeights]:
        """Extra files written into the output next to the weights, {relative path: bytes, or
        BASE_WEIGHTS for a copy of the base's tensors}."""
        return {}

    # -- optional support stage (routed models): once per expert, before the merge loop ------
    needs_support_features: ClassVar[bool] = False

    def support_samples(self) -> int:
        """How many of each expert's unlabelled rows the runtime turns into pooled backbone
        features for `support_part` (0: none)."""
        return 0

    def support_gain_samples(self) -> int:
        """On a causal LM, how many of each expert's rows the runtime scores under the expert and
        under the base for `SupportInputs.gain` (0: none)."""
        return 0

    def support_base_means(self) -> bool:
        """Whether the runtime runs the base over each expert's calibration rows for
        `SupportInputs.base_means` (prototypes in the base's feature space)."""
        return False

    def support_part(self, ctx: ExpertContext, inputs: SupportInputs) -> Any:
        """Expert side: what the coordinator needs from this expert before merging (the task
        head, SiM's support features), from what the runtime read for it."""
        raise NotImplementedError

    def support_fuse(self, parts: list[Any], ctxs: list[ExpertContext]) -> None:
        """Coordinator: consume the experts' support parts (kept in the method's state)."""
        raise NotImplementedError

    # -- optional search stage (Concrete, AdaMerging): before the merge loop, the executor runs
    # `runtime.search.run_search`, which reads `search_config()` and calls `set_search_result`;
    # `fuse` then applies what was found. `needs_data`: every expert needs unlabelled `data`.
    search_stage: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False
    needs_heads: ClassVar[bool] = False  # the search scores encoders through each expert's head

    def memory_note(self, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """One line for the dry run about memory beyond the tensor workspace (default: none)."""
        return None

    def adapters_note(self) -> str | None:
        """One line for the plan when every expert is a LoRA adapter and these parameters are
        known to suit adapters badly (default: none)."""
        return None

    def rescales_adapters(self) -> bool:
        """Whether, when every expert is a LoRA adapter and the spec leaves `rescale` unset, the
        merge rescales each update by its output-shift least-squares factor (core.rescale) by
        default (default: no)."""
        return False

    def report(self) -> dict[str, Any] | None:
        """What the method found, for merge_report.json's `method_report` (default: nothing)."""
        return None


class Purifier(Parametrised[P]):
    """Replaces an expert tensor by a purified one before the method's ``prepare``; generic over
    its parameter model like MergeMethod."""
    summary: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = True
    decomposes: ClassVar[bool] = False  # prepass / purify run on the worker's device

    def needs(self) -> Needs:
        return Needs(stats=self.needs_stats)

    def applies(self, info: TensorInfo) -> bool:
        """Whether this tensor is purified (default: 2-D weights of hooked linear layers)."""
        return info.ndim == 2 and info.module is not None

    def prepass(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Any:
        """Expert side, optional pre-pass over all applicable tensors (small summary)."""
        return None

    def plan(self, summaries: dict[str, list[Any]], infos: dict[str, TensorInfo]) -> list[Any]:
        """Coordinator: per-expert plans from {tensor name: [summary per expert]}."""
        return [None] * self.n_experts

    @property
    def has_prepass(self) -> bool:
        return type(self).prepass is not Purifier.prepass

    @abstractmethod
    def purify(self, info: TensorInfo, base: Tensor, expert: Tensor, ctx: ExpertContext) -> Tensor:
        """Expert side: the purified expert weight (float32, shape of expert)."""

    def report(self) -> dict[str, Any] | None:
        """What the purifier decided, for merge_report.json's `purify_report` (default: nothing)."""
        return None


@dataclass
class ParamDoc:
    name: str
    type: str
    default: Any
    description: str = ""


def describe_params(params: type[MethodParams]) -> list[ParamDoc]:
    out = []
    for fname, f in params.model_fields.items():
        ann = f.annotation
        tname = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        out.append(ParamDoc(f.alias or fname, tname, "required" if f.is_required() else f.default,
                            f.description or ""))
    return out


__all__ = [
    "ExpertContext",
    "MergeMethod",
    "MethodParams",
    "Needs",
    "ParamDoc",
    "Purifier",
    "TensorInfo",
    "describe_params",
    "field",
]
