"""A PEFT LoRA adapter as an expert: the base model with the adapter's updates, read lazily.

An adapter directory (local or s3://) holds `adapter_config.json` and
`adapter_model.safetensors`. `AdapterModel` presents it with the reader interface of
`io.reader.ModelReader` over the base's tensor names, shapes and dtypes:

- a LoRA target (`M.lora_A.weight` / `M.lora_B.weight`, or `M.lora_embedding_A/B` for an
  embedding) reads as W_0 + s · B A, densified one tensor (or row block) at a time; its
  `factors(name)` gives (B, A, s) without densifying: ΔW = s · B A with B (d_out, r) and
  A (r, d_in) in the base's orientation (a Conv1D base with `fan_in_fan_out`, and embeddings,
  are stored transposed, so their factors are swapped and transposed);
- a `modules_to_save` tensor reads as the adapter's copy;
- every other tensor reads as the base's.

Everything is checked when the adapter is opened, against the spec's base: the config
(`io.lora_config`), every tensor name, each factor's rank against the config and its shape
against the base weight. A bad adapter fails before anything is computed or written, with the
file and tensor named.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from esm_ray.errors import InputError
from esm_ray.io.lora_config import CONFIG_NAME, WEIGHTS_NAME, LoraConfig, parse_lora_config
from esm_ray.io.reader import ModelReader, TensorMeta, open_model
from esm_ray.io.stores import open_store
from esm_ray.io.uri import parse_uri
from esm_ray.spec import S3Options

_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def is_adapter(uri: str, s3: S3Options | None = None) -> bool:
    """Whether `uri` is a directory (or prefix) holding a PEFT adapter_config.json."""
    try:
        u = parse_uri(uri)
    except ValueError:
        return False
    if u.name.endswith(".safetensors"):
        return False
    store, files = open_store(u, s3)
    store.close()
    return CONFIG_NAME in files


@dataclass(frozen=True)
class Target:
    """One LoRA target: the base weight `name` it updates and where its factors are.

    a_key, b_key: the adapter's tensor names of A and B as stored
    swap:         stored transposed (embedding, fan_in_fan_out): ΔW = s · (B A)ᵀ = s · Aᵀ Bᵀ
    rank, scale:  r and s
    embedding:    an embedding's factors (lora_embedding_A / _B)
    """

    name: str
    a_key: str
    b_key: str
    swap: bool
    rank: int
    scale: float
    embedding: bool = False


class AdapterModel:
    """The base with one LoRA adapter applied, read tensor by tensor (see the module docstring)."""

    def __init__(self, uri: str, adapter: ModelReader, base, config: LoraConfig,
                 s3: S3Options | None = None) -> None:
        self.uri = uri
        self._s3 = s3
        self._adapter = adapter
        self._base = base
        self.lora_config = config
        self.where = f"{uri.rstrip('/')}/{WEIGHTS_NAME}"
        self._targets: dict[str, Target] = {}
        self._saved: dict[str, str] = {}  # base tensor name -> adapter key (modules_to_save)
        self._scan()

    # -- checks ------------------------------------------------------------------------------
    def _scan(self) -> None:
        found: dict[str, dict[str, str]] = {}
        for key in self._adapter.keys():
            if not key.startswith(_PREFIX):
                raise InputError(f"{self.where}: tensor {key!r} is not a PEFT adapter key "
                                 f"(expected the prefix {_PREFIX!r})")
            name = key[len(_PREFIX):]
            m = _LORA.match(name)
            if m:
                found.setdefault(m.group("module"), {})[m.group("kind")] = key
            elif ".lora_magnitude_vector" in name:
                raise InputError(f"{self.where}: tensor {key!r} is a DoRA magnitude vector; DoRA adapters "
                                 "are not supported")
            elif ".lora_" in name:
                raise InputError(f"{self.where}: tensor {key!r} is not a plain LoRA factor (lora_A / lora_B "
                                 "weights); this adapter type is not supported")
            elif name.endswith(".base_layer.weight"):  # peft saves a targeted embedding whole
                self._check_shape(key, name.replace(".base_layer.weight", ".weight"), self._shape(key))
            else:
                self._check_shape(key, name, self._shape(key))
                self._saved[name] = key
        for module, kinds in found.items():
            self._targets[f"{module}.weight"] = self._target(module, kinds)
        self._check_complete(set(found))
        if not self._targets and not self._saved:
            raise InputError(f"{self.where}: holds no LoRA factors and no saved modules")

    def _check_complete(self, modules: set[str]) -> None:
        """InputError when the config targets (or saves) a base module that the file holds
        nothing for: an incomplete adapter, which peft would load with that update missing."""
        cfg = self.lora_config
        weights = [n.removesuffix(".weight") for n in self._base.keys() if n.endswith(".weight")]
        saved = {n.removesuffix(".weight") for n in self._saved}
        for names, have, what in ((cfg.target_names, modules, "LoRA factors"),
                                  (cfg.modules_to_save, saved, "weights")):
            for entry in names:
                missing = [m for m in weights if (m == entry or m.endswith("." + entry)) and m not in have]
                if missing:
                    raise InputError(f"{self.where}: holds no {what} for {missing[0]!r}, which "
                                     f"{cfg.where} names ({entry!r}); the adapter is incomplete")

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._adapter.info(key).shape)

    def _check_shape(self, key: str, name: str, shape: tuple[int, ...]) -> None:
        if name not in self._base:
            raise InputError(f"{self.where}: tensor {key!r} updates {name!r}, which the base "
                             f"{self._base.uri} does not have; the adapter belongs to another base")
        want = tuple(self._base.info(name).shape)
        if shape != want:
            raise InputError(f"{self.where}: tensor {key!r} has shape {shape}, the base's {name!r} has {want}; "
                             "the adapter belongs to another base")

    def _target(self, module: str, kinds: dict[str, str]) -> Target:
        emb = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        for k in (a_kind, b_kind):
            if k not in kinds:
                other = kinds.get(a_kind) or kinds.get(b_kind)
                raise InputError(f"{self.where}: tensor {other!r} has no matching "
                                 f"{_PREFIX}{module}.{k}; the adapter is incomplete")
        a_key, b_key = kinds[a_kind], kinds[b_kind]
        a, b = self._shape(a_key), self._shape(b_key)
        if len(a) != 2 or len(b) != 2:
            raise InputError(f"{self.where}: tensor {a_key if len(a) != 2 else b_key!r} is not 2-D "
                             f"(shapes {a} and {b}); only linear and embedding targets are supported")
        r = self.lora_config.rank_of(module)
        if a[0] != r or b[1] != r:
            bad = a_key if a[0] != r else b_key
            raise InputError(f"{self.where}: tensor {bad!r} has rank {a[0] if a[0] != r else b[1]} "
                             f"(shape {a if bad == a_key else b}), but {self.lora_config.where} says r = {r}")
        name = f"{module}.weight"
        swap = emb or self.lora_config.fan_in_fan_out
        self._check_shape(f"{b_key} x {a_key}", name, (a[1], b[0]) if swap else (b[0], a[1]))
        return Target(name, a_key, b_key, swap, r, self.lora_config.scale_of(module), emb)

    # -- LoRA views ----------------------------------------------------------------------------
    def targets(self) -> dict[str, Target]:
        """{base weight name: Target} of every LoRA factor pair."""
        return dict(self._targets)

    def saved(self) -> list[str]:
        """Base tensor names the adapter stores whole (modules_to_save)."""
        return list(self._saved)

    def factors(self, name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(B (d_out, r), A (r, d_in), s) with ΔW = s · B A in the base's orientation, or None
        when `name` is no LoRA target. Checked for NaN/Inf."""
        t = self._targets.get(name)
        if t is None:
            return None
        from esm_ray.io.reader import check_finite

        a = self._adapter.get(t.a_key)
        b = self._adapter.get(t.b_key)
        check_finite(t.a_key, a, self.where)
        check_finite(t.b_key, b, self.where)
        a, b = a.to(dtype), b.to(dtype)
        if t.swap:
            a, b = b.T.contiguous(), a.T.contiguous()
        return b, a, t.scale

    # -- the reader interface ---------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._base.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._base

    def __iter__(self) -> Iterator[str]:
        return iter(self._base.keys())

    def __len__(self) -> int:
        return len(self._base.keys())

    def info(self, name: str) -> TensorMeta:
        return self._base.info(name)

    def get_float32(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` (or its rows) in float32: W_0 + s · B A computed in float32 for a target
        (never rounded to the base's dtype), the saved copy, or the base's."""
        if name in self._saved:
            w = self._adapter.get(self._saved[name], rows=rows)
            return w.to(torch.float32)
        w = self._base.get(name, rows=rows).to(torch.float32)
        f = self.factors(name)
        if f is not None:
            b, a, s = f
            if rows is not None:
                b = b[rows[0]:rows[1]]
            w = w.addmm_(b, a, alpha=s)
        return w

    def get(self, name: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """As ModelReader.get: the tensor in the base's dtype (targets densified)."""
        w = self.get_float32(name, rows).to(self._base.info(name).dtype)
        if out is not None:
            return out.copy_(w)
        return w

    @property
    def config(self) -> dict | None:
        return self._base.config

    def aux_names(self) -> list[str]:
        return self._base.aux_names()

    def read_aux(self, name: str) -> bytes:
        return self._base.read_aux(name)

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"esm-ray-lora-v1\0")
        h.update(self._adapter.fingerprint().encode())
        h.update(self._adapter.read_aux(CONFIG_NAME))
        h.update(self._base.fingerprint().encode())
        return h.hexdigest()

    def close(self) -> None:
        self._adapter.close()
        self._base.close()

    def __enter__(self) -> "AdapterModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        return (_reopen, (self.uri, self._base.uri, self._s3))

    def __repr__(self) -> str:
        return f"AdapterModel({self.uri!r}, {len(self._targets)} LoRA targets, {len(self._saved)} saved)"


def open_adapter(uri: str, base, s3: S3Options | None = None) -> AdapterModel:
    """Open the adapter at `uri` over an opened `base` reader (which it then owns and closes)."""
    try:
        adapter = open_model(uri, s3)
    except InputError:
        base.close()
        raise
    try:
        if adapter.weight_files != [WEIGHTS_NAME]:
            raise InputError(f"{uri}: a PEFT adapter directory must hold {WEIGHTS_NAME} "
                             f"(found {', '.join(adapter.weight_files)})")
        cfg = parse_lora_config(adapter.read_aux(CONFIG_NAME), f"{uri.rstrip('/')}/{CONFIG_NAME}")
        return AdapterModel(uri, adapter, base, cfg, s3)
    except BaseException:
        adapter.close()
        base.close()
        raise


def _reopen(uri: str, base_uri: str, s3: S3Options | None) -> AdapterModel:
    """An AdapterModel opened again elsewhere (unpickling), like ModelReader's __reduce__."""
    return open_adapter(uri, open_model(base_uri, s3), s3)
