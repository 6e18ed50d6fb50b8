"""A PEFT LoRA adapter's `adapter_config.json`, read and checked.

Only plain LoRA is accepted: `peft_type: LORA` without DoRA (`use_dora`), LoRA biases
(`lora_bias`), layer replication or parameter targets (`target_parameters`). Everything else
is refused by name, so an adapter esm-ray cannot reproduce exactly is never merged as if it were
plain LoRA. The scale of a module's update is `lora_alpha / r` (`lora_alpha / sqrt(r)` with
`use_rslora`), with `rank_pattern` / `alpha_pattern` overriding r and alpha per module as
peft matches them (a key matches a module name that ends with it, after a dot).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from esm_ray.errors import InputError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Config fields that change the math beyond B·A; a true / non-empty value is refused by name.
_REFUSED = {
    "use_dora": "DoRA (use_dora: true) adapters",
    "lora_bias": "LoRA bias adapters (lora_bias: true)",
    "layer_replication": "adapters with layer_replication",
    "target_parameters": "adapters on parameters (target_parameters)",
    "use_qalora": "QA-LoRA adapters (use_qalora: true)",
}


@dataclass(frozen=True)
class LoraConfig:
    """What the merge needs of an adapter's config.

    r, alpha:        the default rank and lora_alpha
    rslora:          scale alpha / sqrt(r) instead of alpha / r
    fan_in_fan_out:  the base stores its weights (d_in, d_out) (GPT-2 Conv1D)
    rank_pattern, alpha_pattern: per-module overrides {pattern: value}
    modules_to_save: modules stored whole in the adapter
    task_type:       peft's task type (e.g. CAUSAL_LM), passed on to a written adapter
    target_names:    the target_modules list, when every base module it names must have factors
    where:           the config file, for messages
    """

    r: int
    alpha: float
    rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    task_type: str | None = None
    # target_modules when it is a list of names and every matching module must carry factors
    # (no layers_to_transform / exclude_modules narrowing it); () when it cannot be checked
    target_names: tuple[str, ...] = ()
    where: str = CONFIG_NAME

    def _match(self, pattern: dict[str, Any], module: str) -> Any:
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return None

    def rank_of(self, module: str) -> int:
        """The rank the config gives `module` (rank_pattern first, else r)."""
        got = self._match(self.rank_pattern, module)
        return int(got) if got is not None else self.r

    def scale_of(self, module: str) -> float:
        """The factor s of ΔW = s · B A for `module`."""
        r = self.rank_of(module)
        got = self._match(self.alpha_pattern, module)
        alpha = float(got) if got is not None else self.alpha
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _positive_int(doc: dict, key: str, where: str) -> int:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"{where}: field `{key}` must be a positive integer, got {v!r}")
    return v


def parse_lora_config(data: bytes, where: str) -> LoraConfig:
    """The checked config of one adapter from the bytes of its adapter_config.json."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{where}: invalid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{where}: not a JSON object")
    kind = doc.get("peft_type")
    if kind != "LORA":
        raise InputError(f"{where}: peft_type {kind!r} is not supported; esm-ray merges LoRA adapters "
                         "(peft_type 'LORA') only")
    for key, what in _REFUSED.items():
        if doc.get(key):
            raise InputError(f"{where}: {what} are not supported (field `{key}` is {doc[key]!r}); "
                             "only plain LoRA adapters are merged")
    r = _positive_int(doc, "r", where)
    alpha = doc.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError(f"{where}: field `lora_alpha` must be a number, got {alpha!r}")
    patterns: dict[str, dict] = {}
    for key in ("rank_pattern", "alpha_pattern"):
        v = doc.get(key) or {}
        if not isinstance(v, dict) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              for x in v.values()):
            raise InputError(f"{where}: field `{key}` must map module patterns to numbers, got {v!r}")
        patterns[key] = v
    save = doc.get("modules_to_save") or []
    if not isinstance(save, list) or not all(isinstance(m, str) for m in save):
        raise InputError(f"{where}: field `modules_to_save` must be a list of module names, got {save!r}")
    targets = doc.get("target_modules")
    narrowed = any(doc.get(k) not in (None, [], "") for k in ("layers_to_transform", "exclude_modules"))
    names = tuple(targets) if isinstance(targets, list) and all(isinstance(t, str) for t in targets) \
        and not narrowed else ()
    return LoraConfig(target_names=names, r=r, alpha=float(alpha), rslora=bool(doc.get("use_rslora", False)),
                      fan_in_fan_out=bool(doc.get("fan_in_fan_out", False)),
                      rank_pattern={k: int(v) for k, v in patterns["rank_pattern"].items()},
                      alpha_pattern={k: float(v) for k, v in patterns["alpha_pattern"].items()},
                      modules_to_save=tuple(save), task_type=doc.get("task_type") if isinstance(
                          doc.get("task_type"), str) else None, where=where)
