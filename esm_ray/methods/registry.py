"""The registry of merge methods and purifiers, by name."""

from __future__ import annotations

import typing
from typing import Any, TypeVar

from pydantic import ValidationError

from esm_ray.errors import SpecError
from esm_ray.methods.base import MergeMethod, MethodParams, Purifier
from esm_ray.methods.schedule import check_setting, is_fixed

METHODS: dict[str, type[MergeMethod]] = {}
PURIFIERS: dict[str, type[Purifier]] = {}

M = TypeVar("M", type[MergeMethod[Any]], type[Purifier[Any]])


def register(cls: M) -> M:
    """Class decorator: add a MergeMethod or Purifier subclass under its `name`."""
    table: dict[str, Any] = PURIFIERS if issubclass(cls, Purifier) else METHODS
    if cls.name in table:
        raise ValueError(f"method {cls.name!r} registered twice")
    table[cls.name] = cls
    return cls


def _params(cls: type[MergeMethod[Any]] | type[Purifier[Any]], raw: dict[str, Any], where: str) -> MethodParams:
    try:
        return cls.Params.model_validate(raw)
    except ValidationError as err:
        lines = [f"invalid parameters for {cls.name!r}:"]
        allowed = ", ".join(sorted(f.alias or n for n, f in cls.Params.model_fields.items())) or "(none)"
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = "unknown parameter" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  field `{where}.params.{loc}`: {msg} (allowed: {allowed})")
        raise SpecError("\n".join(lines)) from None


def method_class(name: str) -> type[MergeMethod]:
    if name not in METHODS:
        raise SpecError(f"field `method.name`: unknown method {name!r} (allowed: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def _leaves(setting: Any) -> list[Any]:
    """Every scalar a setting can give (to validate each against the parameter's type)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        return [x for e in setting for x in (_leaves(e["value"]) if isinstance(e, dict) else [e])]
    return [setting]


def _structured(cls: type[MergeMethod[Any]]) -> set[str]:
    """Parameters whose value is itself a mapping (e.g. a routed method's `base_params`): they
    are given whole, never as a gradient or a filter."""
    out = set()
    for n, f in cls.Params.model_fields.items():
        if typing.get_origin(f.annotation) is dict or f.annotation is dict:
            out.update({n, f.alias or n})
    return out


def _split(params: dict[str, Any], where: str, structured: set[str] = frozenset()) -> tuple[dict[str, Any], dict[str, Any]]:  # noqa: E501
    """(fixed, varying) parameters; each varying setting checked for its form."""
    fixed, varying = {}, {}
    for k, v in params.items():
        if is_fixed(v) or k in structured:
            fixed[k] = v
            continue
        try:
            check_setting(v, f"field `{where}.{k}`")
        except ValueError as err:
            raise SpecError(str(err)) from None
        varying[k] = v
    return fixed, varying


def _check_leaves(cls: type[MergeMethod[Any]], fixed: dict[str, Any], varying: dict[str, Any], where: str) -> None:
    for k, setting in varying.items():
        for leaf in _leaves(setting):
            _params(cls, {**fixed, k: leaf}, where)


def build_method(name: str, params: dict[str, Any], n_experts: int, seed: int = 0,
                 expert_params: list[dict[str, Any]] | None = None,
                 slices: list[tuple[dict[str, Any], list[dict[str, Any]]]] | None = None) -> MergeMethod:
    """The method `name` with its parameters validated. A parameter may be a gradient or a
    filter (methods.schedule): each value it can take is validated here, and the method resolves
    it per tensor (`params_for`). `expert_params`: each expert's own settings (spec
    `experts[i].params`); `slices`: per `slices` entry, its shared settings and its experts'."""
    cls = method_class(name)
    fixed, varying = _split(params, "method.params", _structured(cls))
    first = {k: _leaves(v)[0] for k, v in varying.items()}
    _check_leaves(cls, fixed, varying, "method")
    method = cls(_params(cls, {**fixed, **first}, "method"), n_experts=n_experts, seed=seed)
    method.fixed, method.varying = fixed, varying
    fields = method._fields()
    for s, (shared, per_expert) in enumerate(slices or []):
        for k in shared:
            if k not in fields:
                raise SpecError(f"field `slices.{s}.params.{k}`: unknown parameter of {name!r} "
                                f"(allowed: {', '.join(sorted(fields)) or '(none)'})")
        sf, sv = _split(shared, f"slices.{s}.params")
        _check_leaves(cls, {**fixed, **first}, {**{k: v for k, v in sf.items()}, **sv}, f"slices.{s}")
        for j, own in enumerate(per_expert):
            _split(own, f"slices.{s}.experts.{j}.params")
    method.slice_params = [dict(shared) for shared, _ in (slices or [])]
    method.slice_expert_params = [[dict(o) for o in per] for _, per in (slices or [])]
    method.expert_params = [dict(e) for e in (expert_params or [])]
    for i, own in enumerate(method.expert_params):
        _split(own, f"experts.{i}.params")
        for k, setting in own.items():
            if k in ("weight", "density"):
                continue
            if k not in fields:
                raise SpecError(f"field `experts.{i}.params.{k}`: unknown parameter of {name!r} "
                                f"(allowed: weight, density, {', '.join(sorted(fields)) or '(none)'})")
            for leaf in _leaves(setting):
                _params(cls, {**fixed, **first, k: leaf}, f"experts.{i}")
    return method


def build_purifier(name: str, params: dict[str, Any], n_experts: int, seed: int = 0) -> Purifier:
    if name not in PURIFIERS:
        raise SpecError(f"field `purify.name`: unknown purifier {name!r} (allowed: {', '.join(sorted(PURIFIERS))})")
    cls = PURIFIERS[name]
    return cls(_params(cls, params, "purify"), n_experts=n_experts, seed=seed)
