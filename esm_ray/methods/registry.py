"""The registry of merge methods and purifiers, by name."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ValidationError

from esm_ray.errors import SpecError
from esm_ray.methods.base import MergeMethod, MethodParams, Purifier

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


def build_method(name: str, params: dict[str, Any], n_experts: int, seed: int = 0) -> MergeMethod:
    cls = method_class(name)
    return cls(_params(cls, params, "method"), n_experts=n_experts, seed=seed)


def build_purifier(name: str, params: dict[str, Any], n_experts: int, seed: int = 0) -> Purifier:
    if name not in PURIFIERS:
        raise SpecError(f"field `purify.name`: unknown purifier {name!r} (allowed: {', '.join(sorted(PURIFIERS))})")
    cls = PURIFIERS[name]
    return cls(_params(cls, params, "purify"), n_experts=n_experts, seed=seed)
