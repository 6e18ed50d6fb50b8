"""Validate a merge job up front: every input readable and consistent, output writable.

Nothing is computed here; `esm-ray merge --dry-run` prints the plan this builds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esm_ray.core.dtypes import DTYPES
from esm_ray.core.rowblocks import row_blocks
from esm_ray.errors import InputError, SpecError
from esm_ray.io.overlap import check_no_overlap
from esm_ray.io.adapter import AdapterModel, is_adapter
from esm_ray.io.composite import open_base, open_expert
from esm_ray.io.reader import open_model
from esm_ray.io.uri import is_s3
from esm_ray.io.writer import check_writable
from esm_ray.models.blocks import layerwise_blocks
from esm_ray.models.heads import HEAD_FILE
from esm_ray.models.hf import is_causal_lm
from esm_ray.methods import MergeMethod, Needs, Purifier, TensorInfo, build_method, build_purifier
from esm_ray.spec import MergeSpec, RescaleSpec
from esm_ray.stats.cache import check_cache_dir
from esm_ray.stats.data import check_token_ids

log = logging.getLogger("esm_ray.plan")

_DTYPES = DTYPES
_ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "num_key_value_heads", "n_embd", "n_layer")
_VOCAB_HINTS = ("embed", "wte", "word_embeddings", "lm_head", "output.weight")


# Both executors merge tensors larger than this (float32 bytes) in row blocks of about
# this size, for methods that allow it (MergeMethod.blockwise). 4 MiB measured fastest on the
# simple-merge benchmark (1, 2, 4, 8, 32 MiB tried) and keeps peak memory near one block.
BLOCK_BYTES = 4 << 20


@dataclass
class MergePlan:
    """A validated job: the method objects, tensor list, and what will be computed."""

    spec: MergeSpec
    method: MergeMethod
    purifier: Purifier | None
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    out_dtype: torch.dtype
    base_fingerprint: str
    expert_fingerprints: list[str]
    input_bytes: int
    notes: list[str] = field(default_factory=list)
    blocks: str | None = None  # the block list's name when calibration runs layer-wise
    # expert name -> its LoRA adapter's facts (targets, ranks, saved tensors, factored) for the report
    adapters: dict[str, dict] = field(default_factory=dict)
    # tensors no expert changes: every expert is a LoRA adapter that neither targets nor saves them
    untouched: frozenset[str] = frozenset()
    # the output-shift rescale that runs: the spec's, or the method's default on adapters
    rescale: RescaleSpec | None = None

    def copies_base(self, name: str) -> bool:
        """Whether tensor `name` comes out as the base's own value without being merged: no
        expert changes it (`untouched`), the method's update is zero when every task vector
        is (`MergeMethod.zero_for_zero_tasks`), and no purifier runs."""
        return name in self.untouched and self.method.zero_for_zero_tasks and self.purifier is None

    @property
    def needs(self) -> Needs:
        """What the method, the purifier and the rescale need, together."""
        return plan_needs(self.spec, self.method, self.purifier)

    @property
    def spilled(self) -> bool:
        """Whether every update is kept (spilled) until a global pass has found its factor:
        the method's layer scales, or the output-shift rescale."""
        return self.method.needs_layer_scales or self.rescale is not None

    @property
    def needs_stats(self) -> bool:
        return self.needs.stats

    @property
    def n_experts(self) -> int:
        return len(self.spec.experts)

    def largest_tensor_bytes(self) -> int:
        return max((_numel(s) * 4 for s in self.shapes.values()), default=0)

    def in_blocks(self, info: TensorInfo, block_bytes: int | None = None,
                  parts: int = 1) -> list[tuple[int, int]] | None:
        """The row blocks in which one process merges `info`, or None to merge it whole: only a
        large tensor of a blockwise method, with no purifier, layer scaling or post stage.
        `parts`: the experts' parts of one block held at once (`row_blocks`)."""
        if self.purifier is not None or self.spilled or self.method.post_stage:
            return None
        blocks = row_blocks(info.shape, BLOCK_BYTES if block_bytes is None else block_bytes, parts)
        return blocks if blocks is not None and self.method.blockwise(info) else None

    def largest_unit_bytes(self) -> int:
        """float32 bytes of the largest piece merged at once: the largest tensor, or for a
        method that merges in row blocks (either executor), a block (see MergeJob). A tensor
        copied from the base unmerged (`copies_base`) is not merged."""
        out = 0
        for n, s in self.shapes.items():
            if self.copies_base(n):
                continue
            blocks = self.in_blocks(TensorInfo.of(n, s))
            rows = max(r1 - r0 for r0, r1 in blocks) if blocks else (s[0] if s else 1)
            out = max(out, rows * (_numel(s[1:]) if s else 1) * 4)
        return out

    def memory_estimate(self) -> dict[str, int]:
        """Rough peak bytes of the coordinator process, by component."""
        t = self.n_experts
        work = self.largest_unit_bytes() * (t + 3)
        est = {"Python, torch and the libraries (measured on Linux x86-64, CPU torch)": 250_000_000,
               "tensor workspace (T+3 float32 copies of the largest tensor or row block merged at once)": work}
        if is_s3(self.spec.output):  # a local output is streamed into its shard files
            est["output shard buffer"] = min(self.spec.shard_bytes, self.input_bytes // (t + 1) + 1)
        if self.needs_stats:
            grams = {n: s[1] * s[1] * 8 for n, s in self.shapes.items() if len(s) == 2 and n.endswith(".weight")}
            if self.blocks is None:
                est["calibration Gram matrices, one expert at a time (upper bound)"] = sum(grams.values())
            else:  # each block's statistics go to disk when it is done
                per: dict[str, int] = {}
                for n, b in grams.items():
                    head, _, rest = n.partition(self.blocks + ".")
                    key = rest.split(".", 1)[0] if rest else n
                    per[head + key] = per.get(head + key, 0) + b
                est["calibration Gram matrices of one block (layer-wise, upper bound)"] = max(per.values(), default=0)
        return est

    def describe(self) -> str:
        s = self.spec
        lines = [
            f"method:   {self.method.name} {self.method.params.model_dump(by_alias=True)}",
            f"purify:   {self.purifier.name + ' ' + str(self.purifier.params.model_dump()) if self.purifier else '-'}",
            f"rescale:  {self.rescale.rule + ' per ' + self.rescale.scope if self.rescale else '-'}",
            f"base:     {s.base}  ({len(self.names)} tensors, {self.input_bytes / (s.experts.__len__() + 1) / 1e6:.1f} MB)",
        ]
        for e, fp in zip(s.experts, self.expert_fingerprints):
            data = f"  data: {e.data}" if e.data else ""
            lines.append(f"expert:   {e.name}: {e.model}  weight={e.weight}{data}")
        lines.append(f"output:   {s.output}  dtype={str(self.out_dtype).removeprefix('torch.')}  shards<= {s.shard_bytes / 1e6:.0f} MB")
        lines.append(f"runtime:  {s.runtime.name}")
        needs = self.needs.describe()
        lines.append(f"needs:    {', '.join(needs) if needs else 'the weights only'}")
        if self.needs_stats:
            lines.append(f"compute:  calibration statistics for {self.n_experts} experts "
                         f"({s.calibration.samples} samples each, cached"
                         + (f"; layer-wise, one of {self.blocks} at a time)" if self.blocks else ")"))
        for k, v in self.memory_estimate().items():
            lines.append(f"memory:   {k}: {v / 1e6:.1f} MB")
        lines.extend(f"note:     {n}" for n in self.notes)
        return "\n".join(lines)


def asked_rescale(spec: MergeSpec) -> RescaleSpec | None:
    """The rescale the spec asks for: its `rescale` unless absent or `rule: none`."""
    return spec.rescale if spec.rescale is not None and spec.rescale.active else None


def plan_needs(spec: MergeSpec, method: MergeMethod, purifier: Purifier | None) -> Needs:
    """What the method, the purifier and `rescale` (calibration statistics) need, together."""
    needs = method.needs() | (purifier.needs() if purifier is not None else Needs())
    return needs | Needs(stats=True) if asked_rescale(spec) is not None else needs


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _arch(cfg: dict | None) -> dict:
    return {k: cfg.get(k) for k in _ARCH_KEYS if cfg and k in cfg}


def _check_data(uri: str, expert: str, vocab_size: object) -> None:
    if is_s3(uri):
        return  # read (and validated) when calibration runs
    if not Path(uri).is_file():
        raise InputError(f"expert {expert!r}: calibration data {uri} not found")
    if os.path.getsize(uri) == 0:
        raise InputError(f"expert {expert!r}: calibration data {uri} is empty")
    if isinstance(vocab_size, int) and vocab_size > 0:
        check_token_ids(uri, vocab_size)


def _cache_is_here(spec: MergeSpec) -> bool:
    """Whether this process sees the filesystem the cache is written on: the local executor and
    a private local Ray do; the nodes of a remote cluster check it when they calibrate."""
    return spec.runtime.name == "local" or spec.runtime.address in (None, "", "local")


def _scores_with_heads(config: dict | None) -> bool:
    """Whether a model of this config is scored through per-task heads (an encoder), rather
    than through its own LM head (a causal LM)."""
    return not is_causal_lm(config)


def check_needs(spec: MergeSpec, needs: Needs, what: str, base_config: dict | None,
                aux_names: list[list[str]]) -> None:
    """Every need of the method, checked in one place before any work: calibration or search
    data for each expert, task heads where the model is an encoder. `aux_names[i]`: the
    non-weight files of expert i. Raises SpecError / InputError naming the expert and field."""
    for i, e in enumerate(spec.experts):
        if needs.reads_data:
            if not e.data:
                kind = "unlabelled calibration data" if needs.stats else "unlabelled data for its search"
                raise SpecError(f"field `experts.{i}.data`: {what} needs {kind} for expert {e.name!r}")
            _check_data(e.data, e.name, (base_config or {}).get("vocab_size"))
        if needs.heads and _scores_with_heads(base_config) and HEAD_FILE not in aux_names[i]:
            raise InputError(f"expert {e.name!r} ({e.model}): no head.safetensors; {what} scores this encoder "
                             "through each expert's task head (weight [labels, hidden], bias [labels])")
    if needs.labels:
        raise SpecError(f"field `method.name`: {what} needs labelled data, which a merge spec cannot give")


def spec_inputs(spec: MergeSpec, needs_stats: bool) -> list[tuple[str, str]]:
    """(field, location) of everything a merge reads or keeps: base, experts, their calibration
    data and the calibration cache (when statistics are computed or the cache is named)."""
    out = [("base", spec.base)]
    for i, e in enumerate(spec.experts):
        out.append((f"experts.{i}.model", e.model))
        if e.data:
            out.append((f"experts.{i}.data", e.data))
    if needs_stats or spec.calibration.cache_dir:
        from esm_ray.stats.calibrate import cache_root

        out.append(("calibration.cache_dir", str(cache_root(spec.calibration))))
    return out


def check_tokenizer(spec: MergeSpec, base_config: dict | None) -> None:
    """The spec's `tokenizer` model must share the base's vocabulary size: its tokenizer files are
    copied, the embeddings are not re-mapped (no vocabulary union)."""
    with open_model(spec.tokenizer, spec.s3) as tok:
        theirs, ours = (tok.config or {}).get("vocab_size"), (base_config or {}).get("vocab_size")
        if theirs is not None and ours is not None and theirs != ours:
            raise InputError(f"field `tokenizer`: {spec.tokenizer} has a vocabulary of {theirs}, the base "
                             f"{ours}; esm-ray copies a tokenizer but does not re-map embeddings (no "
                             "vocabulary union): use a tokenizer of the same vocabulary")


def method_for(spec: MergeSpec) -> MergeMethod:
    """The spec's method with its per-tensor settings: the method's, each expert's and each
    slice's (methods.schedule)."""
    slices = [(sl.params, [src.params for src in sl.experts]) for sl in spec.slices or []]
    return build_method(spec.method.name, spec.method.params, n_experts=len(spec.experts), seed=spec.seed,
                        expert_params=[e.params for e in spec.experts], slices=slices)


def check_lora_inputs(spec: MergeSpec, method: MergeMethod) -> None:
    """SpecError where LoRA adapter experts or `output_format: peft` meet what they cannot take:
    slices (layer ranges of adapters), a routed output written as an adapter."""
    if spec.slices and any(is_adapter(e.model, spec.s3) for e in spec.experts):
        raise SpecError("field `slices`: an expert is a LoRA adapter; slices take whole models")
    if spec.output_format == "peft":
        if spec.slices:
            raise SpecError("field `output_format`: 'peft' writes an adapter on the base; it does not take `slices`")
        if method.output_kind != "static":
            raise SpecError(f"field `output_format`: method {method.name!r} builds a routed model, which "
                            "cannot be written as one LoRA adapter")
        if not any(is_adapter(e.model, spec.s3) for e in spec.experts):
            raise SpecError("field `output_format`: 'peft' writes a LoRA adapter, which needs LoRA adapter "
                            "experts; no expert is one")


def build_plan(spec: MergeSpec, check_output: bool = True) -> MergePlan:
    """Validate everything that can be checked without computing. Raises EsmRayError subclasses."""
    t = len(spec.experts)
    method = method_for(spec)
    purifier = None
    if spec.purify is not None:
        if not method.accepts_purifier:
            raise SpecError(f"field `purify`: method {method.name!r} does not take purified task vectors")
        purifier = build_purifier(spec.purify.name, spec.purify.params, n_experts=t, seed=spec.seed)
    needs = plan_needs(spec, method, purifier)
    what = (f"method {spec.method.name!r}" + (f" with {spec.purify.name}" if spec.purify else "")
            + (" with `rescale`" if asked_rescale(spec) is not None else ""))
    if spec.slices and (needs.reads_data or method.search_stage or method.output_kind != "static"):
        raise SpecError(f"field `slices`: {what} reads data or builds a routed model; slices take static "
                        "methods that read the weights only")
    check_no_overlap(spec.output, spec_inputs(spec, needs.stats))
    check_lora_inputs(spec, method)
    aux_names: list[list[str]] = []

    base = open_base(spec)
    method.bind_model(base.config, is_causal_lm(base.config))
    if spec.tokenizer is not None:
        check_tokenizer(spec, base.config)
    names = list(base.keys())
    shapes = {n: tuple(base.info(n).shape) for n in names}
    dtypes = {n: base.info(n).dtype for n in names}
    base_arch = _arch(base.config)
    fps = []
    adapters: list[str] = []
    facts: dict[str, dict] = {}
    untouched = set(names)  # less every adapter's targets and saved tensors; empty with a full expert
    total = sum(base.info(n).nbytes for n in names)
    for i, e in enumerate(spec.experts):
        r = open_expert(spec, i)
        fps.append(r.fingerprint())
        arch = _arch(r.config)
        if base_arch and arch and arch != base_arch:
            diff = {k: (base_arch.get(k), arch.get(k)) for k in set(base_arch) | set(arch) if base_arch.get(k) != arch.get(k)}
            raise InputError(f"expert {e.name!r} ({e.model}): architecture differs from the base: "
                             + ", ".join(f"{k}: base {a!r} vs expert {b!r}" for k, (a, b) in sorted(diff.items())))
        ekeys = set(r.keys())
        missing = [n for n in names if n not in ekeys]
        if missing:
            raise InputError(f"expert {e.name!r} ({e.model}): tensor {missing[0]!r} is missing"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(ekeys - set(names))
        if extra:
            raise InputError(f"expert {e.name!r} ({e.model}): tensor {extra[0]!r} is not in the base {spec.base}")
        for n in names:
            meta = r.info(n)
            if tuple(meta.shape) != shapes[n]:
                if any(h in n for h in _VOCAB_HINTS) and len(shapes[n]) == 2 and meta.shape[1:] == shapes[n][1:]:
                    raise InputError(
                        f"expert {e.name!r}: vocabulary size mismatch in {n!r}: base {spec.base} has "
                        f"{shapes[n][0]} rows, expert {e.model} has {meta.shape[0]}; merge only models "
                        "that share the base's tokenizer")
                raise InputError(f"expert {e.name!r} ({e.model}): tensor {n!r} has shape {tuple(meta.shape)}, "
                                 f"base has {shapes[n]}")
            if meta.dtype != dtypes[n]:
                raise InputError(f"expert {e.name!r} ({e.model}): tensor {n!r} has dtype "
                                 f"{str(meta.dtype).removeprefix('torch.')}, base has "
                                 f"{str(dtypes[n]).removeprefix('torch.')}")
            total += meta.nbytes
        aux_names.append(list(r.aux_names()) if needs.heads else [])
        if isinstance(r, AdapterModel):
            ranks = sorted({t.rank for t in r.targets().values()})
            adapters.append(f"expert {e.name!r} is a LoRA adapter ({len(r.targets())} targets, rank "
                            f"{'/'.join(map(str, ranks)) or '-'}, {len(r.saved())} saved tensors)")
            facts[e.name] = {"targets": len(r.targets()), "ranks": ranks, "saved": sorted(r.saved()),
                             "factored": method.factored}
            untouched -= set(r.targets()) | set(r.saved())
        else:
            untouched.clear()
        r.close()
    method.bind_experts([e.name in facts for e in spec.experts])
    check_needs(spec, needs, what, base.config, aux_names)
    blocks = None  # the block list when every expert calibrates layer-wise (calibration.mode)
    if needs.stats:
        try:  # the experts share the base's architecture (checked above)
            blocks = layerwise_blocks(spec.calibration.mode, len(facts) == t, base.config, names, spec.base)
        except InputError as err:
            raise InputError(f"field `calibration.mode`: {err}") from None
    if (needs.stats or (spec.runtime.name == "ray" and is_s3(spec.output))) and _cache_is_here(spec):
        check_cache_dir(spec.calibration)  # statistics, and an S3 output's resume staging, live there
    if check_output:
        check_writable(spec.output, spec.overwrite, spec.s3)
    float_dtypes = [d for d in dtypes.values() if d.is_floating_point]
    base_dtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else torch.float32
    out_dtype = _DTYPES[spec.dtype] if spec.dtype else base_dtype
    plan = MergePlan(spec, method, purifier, names, shapes, dtypes, out_dtype, base.fingerprint(), fps, total,
                     blocks=blocks, adapters=facts, untouched=frozenset(untouched))
    for line in adapters:
        how = "from its factors" if method.factored else "densified one tensor at a time"
        plan.notes.append(f"{line}: {method.name!r} merges its targets {how}")
    every_adapter = bool(adapters) and len(adapters) == len(spec.experts)
    if spec.rescale is not None:  # asked for, or turned off (`rule: none`)
        plan.rescale = asked_rescale(spec)
    elif every_adapter and method.rescales_adapters():
        plan.rescale = RescaleSpec()
        plan.notes.append(f"method {method.name!r}, every expert an adapter: each linear layer's update is "
                          "rescaled by its output-shift least-squares factor (`rescale`, on by default here; "
                          "`rescale: {rule: none}` turns it off)")
    scale_note = method.adapters_note() if every_adapter and plan.rescale is None else None
    if scale_note:
        plan.notes.append(f"method {method.name!r}, every expert an adapter: {scale_note}")
        log.warning("method %r, every expert a LoRA adapter: %s", method.name, scale_note)
    if spec.output_format == "peft":
        plan.notes.append("output_format peft: the output is one LoRA adapter on the base "
                          f"(rank {spec.peft.rank or 'exact'}{f', energy {spec.peft.energy}' if spec.peft.energy else ''})")
        if len(adapters) < len(spec.experts):
            plan.notes.append("output_format peft with full experts: a tensor the merge changes outside the "
                              "adapters' targets and saved modules fails the merge (nothing is written)")
    mem = method.memory_note(shapes)
    if mem:
        plan.notes.append(f"method {method.name!r}: {mem}")
    if not needs.reads_data and any(e.data for e in spec.experts):
        plan.notes.append(f"method {method.name!r} does not use calibration data; `data` is ignored")
    plan.notes.append("tensor values are checked for NaN/Inf in the output dtype while merging; "
                      "nothing is written on failure")
    base.close()
    return plan
