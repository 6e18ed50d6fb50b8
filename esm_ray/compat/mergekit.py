"""mergekit configurations as esm-ray merge specs, read unchanged.

A mergekit YAML (it has `merge_method`) becomes a MergeSpec: `models:` entries become experts
(the `base_model` is the base and, when listed among the models, not an expert), per-model
`parameters` become each expert's `weight`, `density` and `params`, global `parameters` the
method's, `dtype` the dtype the inputs are read in (esm-ray computes in float32 whatever it is),
`out_dtype` (else `dtype`) the output dtype. Gradients and `filter:` values are kept as they are
(methods.schedule resolves them per tensor with mergekit's rule). mergekit's precedence (a
model's own setting, then the slice's, then the global one; the first that gives a value) is
folded into one setting per place: a model's conditional values followed by the global ones.

`slices:` become the spec's slices: in each slice the source whose model is the base model is
the base, the others the experts (the same number in every slice); without a base model a
single-source slice (passthrough) reads its source as base and expert alike.

References are local paths (relative to the config file) or s3:// URIs; anything else is taken
for a model hub name and refused, since esm-ray never downloads.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from esm_ray.errors import SpecError
from esm_ray.methods.registry import METHODS
from esm_ray.methods.schedule import is_conditional
from esm_ray.spec import MergeSpec, spec_from_dict

log = logging.getLogger("esm_ray.mergekit")

_TOP = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
        "tokenizer_source", "tokenizer", "chat_template", "name", "modules"}
# mergekit parameters bound per input model (its per-model `parameters`), not shared.
PER_INPUT = ("weight", "density", "epsilon", "gamma", "scale")
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}
_HUB = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_mergekit_config(raw: Any) -> bool:
    """Whether a parsed YAML document is a mergekit configuration (it names `merge_method`)."""
    return isinstance(raw, dict) and "merge_method" in raw


def _ref(value: Any, field: str, root: Path, source: str) -> str:
    """A model reference as a URI: s3:// as is, a local path resolved against the config's folder."""
    if isinstance(value, dict):  # mergekit's {model: ..., lora: ...} form
        if set(value) - {"model"}:
            raise SpecError(f"{source}: field `{field}`: only `model` is supported in a model reference "
                            f"(got {', '.join(sorted(value))}); LoRA references are not")
        value = value.get("model")
    if not isinstance(value, str) or not value:
        raise SpecError(f"{source}: field `{field}`: expected a model path or s3:// URI, got {value!r}")
    if value.startswith("s3://"):
        return value
    if "://" in value:
        raise SpecError(f"{source}: field `{field}`: {value!r}: only local paths and s3:// URIs are read")
    if "+" in value and not (root / value).exists():
        raise SpecError(f"{source}: field `{field}`: {value!r} looks like a model with a LoRA; not supported")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else (root / p)
    if not p.exists():
        if _HUB.match(value):
            raise SpecError(f"{source}: field `{field}`: {value!r} is not a local path; it looks like a model "
                            "hub name, and esm-ray never downloads models: download it first and give its "
                            "local path, or an s3:// URI")
        raise SpecError(f"{source}: field `{field}`: model {value!r} not found ({p})")
    return str(p.resolve())


def chain(*settings: Any) -> Any:
    """One setting equal to mergekit's lookup through `settings` (highest precedence first, None
    for absent): conditional values are concatenated until a setting that always gives a value."""
    present = [s for s in settings if s is not None]
    if not present:
        return None
    if not is_conditional(present[0]):
        return present[0]
    out: list[Any] = []
    for s in present:
        if is_conditional(s):
            out.extend(s if isinstance(s, list) else [s])
        else:
            out.append({"value": s})
            break
    return out


def _params(raw: Any, field: str, source: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: field `{field}`: expected a mapping of parameters, got {type(raw).__name__}")
    return dict(raw)


def _method_fields(method: str) -> set[str]:
    cls = METHODS[method]
    return {f.alias or n for n, f in cls.Params.model_fields.items()}


def _expert(name: str, model: str, settings: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    """An expert entry: scalar weight / density as fields, the rest (and varying ones) in params."""
    e: dict[str, Any] = {"name": name, "model": model}
    params: dict[str, Any] = {}
    for k, v in settings.items():
        if v is None:
            continue
        if k in ("weight", "density") and isinstance(v, (int, float)) and not isinstance(v, bool):
            e[k] = float(v)
        elif k in ("weight", "density") or k in fields:
            params[k] = v
        else:  # mergekit ignores parameters a method does not take; so does esm-ray, saying so
            log.warning("expert %s: parameter %r is not one of this method's; ignored", name, k)
    if params:
        e["params"] = params
    return e


def _names(models: list[str]) -> list[str]:
    """Expert names from the models' folder names, made unique."""
    out: list[str] = []
    for m in models:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(m.rstrip("/")).name or "model").lstrip("-_.") or "model"
        name, k = stem, 2
        while name in out:
            name, k = f"{stem}-{k}", k + 1
        out.append(name)
    return out


def _split_params(params: dict[str, Any], fields: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shared, per-input) global parameters: per-input ones are pushed down to every model."""
    shared = {k: v for k, v in params.items() if k in fields and k not in ("weight",)}
    per_input = {k: v for k, v in params.items() if k in PER_INPUT}
    return shared, per_input


def translate(raw: dict[str, Any], output: str, source: str = "config", root: Path | None = None,
              overrides: dict[str, Any] | None = None) -> MergeSpec:
    """The MergeSpec of a mergekit configuration. Raises SpecError naming the field."""
    root = root or Path.cwd()
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise SpecError(f"{source}: field `{unknown[0]}`: unknown in a mergekit configuration")
    for unsupported in ("modules", "chat_template"):
        if raw.get(unsupported) is not None:
            raise SpecError(f"{source}: field `{unsupported}`: not supported by esm-ray's mergekit reader")
    method = raw["merge_method"]
    if method not in METHODS:
        raise SpecError(f"{source}: field `merge_method`: unknown method {method!r} "
                        f"(esm-ray has: {', '.join(sorted(METHODS))})")
    if bool(raw.get("models")) == bool(raw.get("slices")):
        raise SpecError(f"{source}: exactly one of `models` and `slices` must be given")
    fields = _method_fields(method)
    glob = _params(raw.get("parameters"), "parameters", source)
    bad = [k for k in glob if k not in fields and k not in PER_INPUT]
    if bad:
        raise SpecError(f"{source}: field `parameters.{bad[0]}`: not a parameter of {method!r} "
                        f"(allowed: {', '.join(sorted(fields | set(PER_INPUT)))})")
    shared, per_input = _split_params(glob, fields)
    base = _ref(raw["base_model"], "base_model", root, source) if raw.get("base_model") is not None else None

    spec: dict[str, Any] = {"method": {"name": method, "params": shared}, "output": output}
    out_dtype = raw.get("out_dtype") or raw.get("dtype")
    if out_dtype is not None:
        if out_dtype not in _DTYPES:
            raise SpecError(f"{source}: field `{'out_dtype' if raw.get('out_dtype') else 'dtype'}`: "
                            f"{out_dtype!r} is not one of {', '.join(sorted(_DTYPES))}")
        spec["dtype"] = _DTYPES[out_dtype]
    if raw.get("dtype") is not None and raw["dtype"] not in _DTYPES:
        raise SpecError(f"{source}: field `dtype`: {raw['dtype']!r} is not one of {', '.join(sorted(_DTYPES))}")

    try:
        if raw.get("models"):
            _models(raw, spec, base, per_input, fields, root, source)
        else:
            _slices(raw, spec, base, per_input, fields, root, source)
    except SpecError as err:
        msg = str(err)
        raise SpecError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    tok = _tokenizer(raw, spec, root, source)
    if tok is not None:
        spec["tokenizer"] = tok
    spec.update(overrides or {})
    return spec_from_dict(spec, source=source)


def _models(raw: dict, spec: dict, base: str | None, per_input: dict, fields: set[str], root: Path,
            source: str) -> None:
    entries = raw["models"]
    if not isinstance(entries, list):
        raise SpecError("field `models`: expected a list")
    refs, settings = [], []
    for i, m in enumerate(entries):
        if not isinstance(m, dict) or "model" not in m:
            raise SpecError(f"field `models.{i}`: expected {{model: PATH, parameters: {{...}}}}")
        ref = _ref(m["model"], f"models.{i}.model", root, source)
        own = _params(m.get("parameters"), f"models.{i}.parameters", source)
        if base is not None and ref == base:
            continue  # the base model takes no part as an expert (its input-scoped parameters are unused)
        refs.append(ref)
        settings.append({k: chain(own.get(k), per_input.get(k)) for k in set(own) | set(per_input)})
    if base is None:
        if len(refs) < 2 and method_needs_base(spec["method"]["name"]):
            raise SpecError("field `base_model`: this method needs a base model")
        base = refs[0]  # methods without a base (linear, karcher, ...) never read its values
    if not refs:
        raise SpecError("field `models`: no model besides the base model")
    spec["base"] = base
    spec["experts"] = [_expert(n, r, s, fields) for n, r, s in zip(_names(refs), refs, settings)]


def method_needs_base(method: str) -> bool:
    return method not in ("linear", "karcher", "passthrough", "nuslerp", "multislerp", "model_stock")


def _slices(raw: dict, spec: dict, base: str | None, per_input: dict, fields: set[str], root: Path,
            source: str) -> None:
    slices = []
    n_experts = None
    expert_models: list[str] = []
    for k, sl in enumerate(raw["slices"]):
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise SpecError(f"field `slices.{k}`: expected {{sources: [{{model, layer_range}}, ...]}}")
        extra = set(sl) - {"sources", "parameters", "base_model"}
        if extra:
            raise SpecError(f"field `slices.{k}.{sorted(extra)[0]}`: not supported")
        sbase = _ref(sl["base_model"], f"slices.{k}.base_model", root, source) if sl.get("base_model") else base
        sp = _params(sl.get("parameters"), f"slices.{k}.parameters", source)
        bad = [p for p in sp if p not in fields and p not in PER_INPUT]
        if bad:
            raise SpecError(f"field `slices.{k}.parameters.{bad[0]}`: not a parameter of this method")
        shared = {p: chain(v, spec["method"]["params"].get(p)) for p, v in sp.items() if p in fields and p != "weight"}
        base_src, experts = None, []
        for j, src in enumerate(sl["sources"]):
            where = f"slices.{k}.sources.{j}"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise SpecError(f"field `{where}`: expected {{model: PATH, layer_range: [start, stop]}}")
            ref = _ref(src["model"], f"{where}.model", root, source)
            own = _params(src.get("parameters"), f"{where}.parameters", source)
            entry = {"model": ref, "layer_range": list(src["layer_range"])}
            if sbase is not None and ref == sbase and base_src is None:
                base_src = entry
                continue
            names = set(own) | {p for p in sp if p in PER_INPUT} | set(per_input)
            params = {p: chain(own.get(p), sp.get(p), per_input.get(p)) for p in names}
            entry["params"] = {p: v for p, v in params.items()
                               if v is not None and (p in fields or p in ("weight", "density"))}
            experts.append(entry)
        if sbase is not None and base_src is None:
            raise SpecError(f"field `slices.{k}.sources`: the base model {sbase} is not among the sources")
        if n_experts is None:
            n_experts = len(experts)
            expert_models = [e["model"] for e in experts]
        elif len(experts) != n_experts:
            raise SpecError(f"field `slices.{k}.sources`: {len(experts)} non-base sources, the first slice has "
                            f"{n_experts}; esm-ray needs the same number in every slice")
        entry_slice: dict[str, Any] = {"experts": experts, "params": shared}
        if base_src is not None:
            entry_slice["base"] = base_src
        slices.append(entry_slice)
    if not n_experts:
        raise SpecError("field `slices`: every slice needs a source besides the base model")
    spec["base"] = base or slices[0]["experts"][0]["model"]
    spec["experts"] = [{"name": n, "model": m} for n, m in zip(_names(expert_models), expert_models)]
    spec["slices"] = slices


def _tokenizer(raw: dict, spec: dict, root: Path, source: str) -> str | None:
    src = raw.get("tokenizer_source")
    field = "tokenizer_source"
    tok = raw.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, dict):
            raise SpecError(f"{source}: field `tokenizer`: expected a mapping with `source`")
        if tok.get("tokens") or tok.get("pad_to_multiple_of"):
            raise SpecError(f"{source}: field `tokenizer`: `tokens` and `pad_to_multiple_of` are not supported")
        src, field = tok.get("source"), "tokenizer.source"
    if src is None or src == "base":
        return None
    if src == "union":
        raise SpecError(f"{source}: field `{field}`: a vocabulary union is not supported: esm-ray merges models "
                        "that share one vocabulary; use `base` or a model's path")
    ref = _ref(src, field, root, source)
    return None if ref == spec["base"] else ref


def load_config(path: str | Path, output: str | None, overrides: dict[str, Any] | None = None) -> MergeSpec:
    """A mergekit YAML file as a MergeSpec writing to `output` (required: mergekit configs name none)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: cannot parse config: {err}") from None
    if not is_mergekit_config(raw):
        raise SpecError(f"{p}: not a mergekit configuration (no `merge_method`)")
    if not output:
        raise SpecError(f"{p}: a mergekit configuration names no output: give one (`--output DIR`, or "
                        "`esm-ray mergekit CONFIG OUT_DIR`)")
    out = output if "://" in output else str(Path(output).expanduser().resolve())
    return translate(raw, out, source=str(p), root=p.parent.resolve(), overrides=overrides)


__all__ = ["load_config", "PER_INPUT", "chain", "is_mergekit_config", "translate"]
