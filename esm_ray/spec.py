"""The job spec: pydantic models of a merge job, loaded from YAML or JSON.

Every model is frozen and rejects unknown keys, so a typo fails up front with the field's
path instead of being silently ignored. Relative local paths are resolved against the
directory of the spec file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esm_ray.errors import SpecError

DType = Literal["float32", "float16", "bfloat16"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """'500MB' -> 500_000_000; '2GiB' -> 2**31; ints pass through."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read size {value!r}; use bytes or a number with KB/MB/GB/MiB/GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Options(Frozen):
    """Where s3:// URIs point. Credentials come from the standard boto3 chain, never from here."""

    endpoint_url: str | None = None  # default: AWS_ENDPOINT_URL or AWS itself
    region: str | None = None
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    max_attempts: int = Field(default=5, ge=1, le=20)


class ExpertSpec(Frozen):
    """One fine-tuned expert: its weights, its unlabelled calibration data, its merge weight."""

    name: str
    model: str
    data: str | None = None
    weight: float = 1.0
    density: float | None = Field(default=None, gt=0.0, le=1.0)
    # This expert's own method parameters, each a value, a gradient or conditional values
    # (methods.schedule); `weight` and `density` given here may vary by tensor.
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"expert name {v!r} must be letters, digits, '_', '-' or '.'")
        return v


class MethodSpec(Frozen):
    """A merge method by registry name; params are validated by that method's own model."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class SliceSource(Frozen):
    """Layers [start, stop) of one model, as one input of a `slices` entry."""

    model: str
    layer_range: tuple[int, int]
    params: dict[str, Any] = Field(default_factory=dict)  # this input's own settings in the slice

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, stop) with 0 <= start < stop")
        return v


class SliceSpec(Frozen):
    """One run of output layers (mergekit's `slices`): output layers are numbered on from the
    previous slice's; layer k of the run comes from layer range[0] + k of each input. `experts[j]`
    stands in for expert j of the spec, `base` for the base (default: expert 0's input, which
    makes a one-expert passthrough a copy). Tensors outside the layers come from the first slice's
    inputs (embeddings) or the last's (final norm, LM head)."""

    base: SliceSource | None = None
    experts: list[SliceSource] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)  # settings of this slice, before the method's

    @model_validator(mode="after")
    def _lengths(self) -> "SliceSpec":
        n = {s.layer_range[1] - s.layer_range[0] for s in ([self.base] if self.base else []) + self.experts}
        if len(n) > 1:
            raise ValueError(f"every input of a slice must span the same number of layers, got {sorted(n)}")
        return self

    @property
    def length(self) -> int:
        return self.experts[0].layer_range[1] - self.experts[0].layer_range[0]


class PurifySpec(Frozen):
    """Task-vector purification applied before a task-vector method (PAVE)."""

    name: Literal["pave"] = "pave"
    params: dict[str, Any] = Field(default_factory=dict)


class RescaleSpec(Frozen):
    """A label-free factor on the merged update of every calibrated linear layer, after the
    method (`core.rescale`): the least-squares c that makes c·ΔW reproduce each expert's output
    shift τ_t X_t on its own calibration rows. `scope`: one c per tensor, or one for all of them."""

    rule: Literal["output_shift", "none"] = Field(
        "output_shift", description="output_shift: the least-squares factor; none: no rescale (turns off "
                                    "ESM's default on adapters)")
    scope: Literal["tensor", "global"] = Field(
        "tensor", description="one factor per linear layer's update, or one for all of them")

    @property
    def active(self) -> bool:
        return self.rule != "none"


class CalibrationSpec(Frozen):
    """How activation statistics are collected for data-aware methods."""

    samples: int = Field(default=32, ge=1)
    max_length: int = Field(default=128, ge=4)
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0
    cache_dir: str | None = None  # default: $ESM_RAY_CACHE or ~/.cache/esm-ray
    # How each Gram XᵀX is accumulated: mixed = float32 products (TF32 on GPUs where torch allows
    # it) of its lower block-triangle, summed in float32 over at most 1024 token rows, then into
    # float64, mirrored at the end; float64 = the full XᵀX, every product in float64.
    gram_precision: Literal["mixed", "float64"] = "mixed"
    # How the expert is run: full = the whole model loaded, one forward pass per batch;
    # layerwise = one block loaded at a time from the lazy reader, every batch run through it
    # (memory: one block plus the activations, whatever the depth; same statistics);
    # auto = layerwise for a LoRA adapter expert whose block list is found, full otherwise
    # (models.blocks.layerwise_blocks).
    mode: Literal["auto", "full", "layerwise"] = "auto"


class RuntimeSpec(Frozen):
    """Which executor runs the job: one process, or a Ray cluster."""

    name: Literal["local", "ray"] = "local"
    address: str | None = None  # auto | ray://host:10001 | local (start a private Ray on 127.0.0.1)
    num_cpus_per_worker: float = Field(default=1.0, gt=0)
    num_gpus_per_worker: float | None = Field(default=None, ge=0)  # None: 1 when the cluster has GPUs
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    max_restarts: int = Field(default=2, ge=0)
    # Where an expert side computes its statistics and decompositions. auto: cuda when the
    # process sees a GPU (a Ray worker sees only the GPUs Ray assigned it), else cpu.
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ServeSpec(Frozen):
    """How `esm-ray serve` hosts a routed or static model."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_batch_size: int = Field(default=32, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    max_ongoing_requests: int = Field(default=32, ge=1)
    max_inputs_per_request: int = Field(default=64, ge=1)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)  # request body bytes before 413
    max_input_chars: int = Field(default=20_000, ge=1)  # characters (or token ids) per input before 413


class PeftOutputSpec(Frozen):
    """The LoRA adapter written with `output_format: peft`. Without `rank` and `energy` each
    target keeps its merged update exactly (the concatenated factors of linear / task
    arithmetic, rank Σ r_i); with them it is re-decomposed by an SVD of the factored update."""

    rank: int | None = Field(default=None, ge=1)  # at most this rank per target
    energy: float | None = Field(default=None, gt=0.0, le=1.0)  # keep this fraction of Σ s²


class MergeSpec(Frozen):
    """A whole merge job."""

    base: str
    experts: list[ExpertSpec] = Field(min_length=1)
    method: MethodSpec
    purify: PurifySpec | None = None
    # rescale each calibrated linear layer's merged update by its output-shift least-squares
    # factor (needs calibration data; RescaleSpec)
    rescale: RescaleSpec | None = None
    output: str
    dtype: DType | None = None  # output dtype; default: the base model's
    # 'dense': a merged model; 'peft': one LoRA adapter on the base (needs LoRA experts, io.adapter)
    output_format: Literal["dense", "peft"] = "dense"
    peft: PeftOutputSpec = Field(default_factory=PeftOutputSpec)
    shard_size: int | str = "2GB"
    overwrite: bool = False
    seed: int = 0
    s3: S3Options = Field(default_factory=S3Options)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    serve: ServeSpec | None = None
    # Output layers assembled from layer ranges of several models (mergekit's `slices`).
    slices: list[SliceSpec] | None = None
    # The model whose tokenizer files the output gets (default: the base's). It must share the
    # base's vocabulary: embeddings are not re-mapped.
    tokenizer: str | None = None

    @field_validator("shard_size")
    @classmethod
    def _shard(cls, v: int | str) -> int | str:
        if parse_size(v) < 1024:
            raise ValueError("shard_size must be at least 1KB")
        return v

    @model_validator(mode="after")
    def _unique(self) -> "MergeSpec":
        names = [e.name for e in self.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"expert names must be unique; repeated: {', '.join(dup)}")
        for k, sl in enumerate(self.slices or []):
            if len(sl.experts) != len(self.experts):
                raise ValueError(f"slices.{k}.experts: {len(sl.experts)} inputs for {len(self.experts)} experts")
        return self

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)


def _is_local(uri: str) -> bool:
    return "://" not in uri


def _resolve(value: str | None, root: Path) -> str | None:
    if value is None or not _is_local(value):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def _resolve_slice(raw: Any, root: Path) -> Any:
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    if isinstance(out.get("base"), dict) and isinstance(out["base"].get("model"), str):
        out["base"] = {**out["base"], "model": _resolve(out["base"]["model"], root)}
    if isinstance(out.get("experts"), list):
        out["experts"] = [{**e, "model": _resolve(e["model"], root)} if isinstance(e, dict)
                          and isinstance(e.get("model"), str) else e for e in out["experts"]]
    return out


def resolve_paths(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    """Make every local path of a raw spec dict absolute, relative to `root`."""
    out = dict(raw)
    for key in ("base", "output", "tokenizer"):
        if isinstance(out.get(key), str):
            out[key] = _resolve(out[key], root)
    if isinstance(out.get("experts"), list):
        exps = []
        for e in out["experts"]:
            if isinstance(e, dict):
                e = dict(e)
                for key in ("model", "data"):
                    if isinstance(e.get(key), str):
                        e[key] = _resolve(e[key], root)
            exps.append(e)
        out["experts"] = exps
    if isinstance(out.get("slices"), list):
        out["slices"] = [_resolve_slice(s, root) for s in out["slices"]]
    cal = out.get("calibration")
    if isinstance(cal, dict) and isinstance(cal.get("cache_dir"), str):
        out["calibration"] = {**cal, "cache_dir": _resolve(cal["cache_dir"], root)}
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid merge spec"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  field `{loc}`: {msg}")
    return "\n".join(lines)


MAX_NESTING = 32  # levels of mappings/lists; a real spec needs about 5
MAX_VALUES = 100_000  # values counted with repeats: a YAML alias bomb expands past this


def check_nesting(raw: Any, source: str) -> None:
    """Raise SpecError naming the field where a parsed spec nests deeper than MAX_NESTING, or
    when it holds more than MAX_VALUES values; walks iteratively, so any depth is safe here."""
    stack: list[tuple[Any, int, str]] = [(raw, 0, "")]
    seen = 0
    while stack:
        node, depth, path = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise SpecError(f"{source}: the spec holds more than {MAX_VALUES} values (nested or repeated "
                            "through YAML aliases); a merge spec is small")
        if isinstance(node, dict):
            items: Any = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            continue
        if depth >= MAX_NESTING:
            raise SpecError(f"{source}: field `{path}` nests deeper than {MAX_NESTING} levels")
        stack.extend((v, depth + 1, f"{path}.{k}" if path else str(k)) for k, v in items)


def spec_from_dict(raw: Any, source: str = "spec", root: Path | None = None) -> MergeSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a merge spec must be a mapping at the top level, got {type(raw).__name__}")
    check_nesting(raw, source)
    if root is not None:
        raw = resolve_paths(raw, root)
    try:
        return MergeSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None


def load_spec(path: str | Path) -> MergeSpec:
    """Read a YAML or JSON spec file; local paths inside are relative to its directory."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: spec file not found")
    text = p.read_text()
    try:
        raw = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise SpecError(f"{p}: cannot parse spec: {err}") from None
    except RecursionError:  # the parsers recurse once per level of nesting
        raise SpecError(f"{p}: cannot parse spec: it nests too deeply (a merge spec needs about 5 levels, "
                        f"at most {MAX_NESTING} are accepted)") from None
    return spec_from_dict(raw, source=str(p), root=p.parent.resolve())


def dump_spec(spec: MergeSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False)
