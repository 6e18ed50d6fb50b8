"""Per-tensor parameter values: gradients over the layers and name filters, as mergekit 0.1.5.

A parameter *setting* is one of
- a scalar (`0.5`, `true`, `"sum"`): the same value for every tensor;
- a *gradient*, a list of scalars (`[0, 0.5, 1]`): numbers are interpolated linearly at the
  tensor's position `t` in [0, 1] (`t * (n - 1)` between the two nearest entries); booleans and
  strings pick the entry `int(t * (n - 1))`;
- a *conditional value* `{filter: "self_attn", value: SETTING}`, or a list of them: the first
  whose `filter` is a substring of the tensor name (no filter, or `*`, matches every name) gives
  its value; none matching gives no value, and the next scope (or the default) decides.

The position of a tensor: layer i of a run of n layers (the whole model, or one `slices` entry)
sits at `t = i / (n - 1)` (`t = 1` when n is 1); tensors outside the repeated blocks
(embeddings, final norm, LM head) sit at `t = 0`. The resolution is `evaluate` below, once for
every method; methods read the result through `MergeMethod.params_for`.
"""

from __future__ import annotations

from typing import Any

Setting = Any  # scalar | list[scalar] | {filter, value} | list[{filter, value}]
_SCALAR = (bool, int, float, str)


def is_conditional(setting: Setting) -> bool:
    """Whether `setting` is a conditional value or a list of them."""
    if isinstance(setting, dict):
        return True
    return isinstance(setting, list) and bool(setting) and all(isinstance(e, dict) for e in setting)


def is_fixed(setting: Setting) -> bool:
    """Whether `setting` gives the same value to every tensor (a plain scalar or None)."""
    return setting is None or isinstance(setting, _SCALAR)


def check_setting(setting: Setting, where: str) -> None:
    """Raise ValueError naming `where` unless `setting` has one of the forms above."""
    if is_fixed(setting):
        return
    if isinstance(setting, list) and setting and all(isinstance(e, _SCALAR) for e in setting):
        return
    if is_conditional(setting):
        for k, cond in enumerate(setting if isinstance(setting, list) else [setting]):
            extra = set(cond) - {"filter", "value"}
            if extra or "value" not in cond:
                raise ValueError(f"{where}[{k}]: a conditional value is {{filter: TEXT, value: SETTING}}"
                                 + (f"; unknown key {sorted(extra)[0]!r}" if extra else "; `value` is missing"))
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise ValueError(f"{where}[{k}].filter: must be text, got {cond['filter']!r}")
            if is_conditional(cond["value"]):
                raise ValueError(f"{where}[{k}].value: must be a scalar or a gradient list")
            check_setting(cond["value"], f"{where}[{k}].value")
        return
    raise ValueError(f"{where}: expected a scalar, a gradient (a list of scalars) or conditional values "
                     f"({{filter, value}}), got {setting!r}")


def evaluate(setting: Setting, tensor_name: str, t: float) -> Any:
    """The value of `setting` for tensor `tensor_name` at position `t`, or None when no
    condition matches (mergekit's `evaluate_setting`)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, _SCALAR):
        return setting
    if not isinstance(setting, list) or not setting:
        return None
    if all(isinstance(e, _SCALAR) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate(cond["value"], tensor_name, t)
    return None


def first_value(*settings: Setting, tensor_name: str, t: float) -> Any:
    """The first of `settings` (highest precedence first) that gives a value, else None."""
    for s in settings:
        if s is None:
            continue
        v = evaluate(s, tensor_name, t)
        if v is not None:
            return v
    return None


def position(layer_index: int | None, start: int, length: int) -> float:
    """mergekit's `t` of layer `layer_index` in a run of `length` layers from `start`; 0 for a
    tensor outside the repeated blocks."""
    if layer_index is None:
        return 0.0
    if length <= 1:
        return 1.0
    return (layer_index - start) / (length - 1)


__all__ = ["Setting", "check_setting", "evaluate", "first_value", "is_conditional", "is_fixed", "position"]
