"""The inputs of a merge as readers: the models themselves, or, for a spec with `slices`, a
model assembled from layer ranges of several models (mergekit's frankenmerges and merged
slices), read lazily tensor by tensor like any other.

`open_base(spec)` and `open_expert(spec, i)` are what the runtime opens. With slices, output
layer k of slice s is layer `layer_range[0] + (k - first output layer of s)` of that slice's
input; tensors outside the repeated blocks come from the first slice's input when they are
embeddings (names with `embed`, `wte`, `wpe`) and from the last slice's otherwise (final norm,
LM head), as mergekit plans them. The config is the first input's with `num_hidden_layers` set to
the output's layer count.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator

import torch

from esm_ray.errors import InputError
from esm_ray.io.reader import ModelReader, TensorMeta, open_model
from esm_ray.spec import MergeSpec, SliceSource, SliceSpec

_INDEX = re.compile(r"\.(\d+)\.")
_PRE = ("embed", "wte", "wpe")


def is_pre(name: str) -> bool:
    """Whether a tensor outside the blocks comes before them (embeddings)."""
    return any(p in name for p in _PRE)


def slice_bounds(slices: list[SliceSpec]) -> list[tuple[int, int]]:
    """[start, stop) output layer indices of each slice."""
    out, k = [], 0
    for s in slices:
        out.append((k, k + s.length))
        k += s.length
    return out


def _source(sl: SliceSpec, role: int | None) -> SliceSource:
    """The input of slice `sl` standing in for expert `role` (None: the base)."""
    if role is None:
        return sl.base if sl.base is not None else sl.experts[0]
    return sl.experts[role]


class SlicedModel:
    """A read-only model whose tensors are other models' tensors under new names (the subset of
    ModelReader's interface the merge uses)."""

    def __init__(self, spec: MergeSpec, role: int | None) -> None:
        assert spec.slices
        self.uri = f"slices of {'the base' if role is None else 'expert ' + repr(spec.experts[role].name)}"
        self._readers: dict[str, ModelReader] = {}
        self._map: dict[str, tuple[str, str]] = {}  # output name -> (model uri, source name)
        sources = [_source(sl, role) for sl in spec.slices]
        try:
            first = self._open(sources[0].model, spec)
            last = self._open(sources[-1].model, spec)
            layered = [n for n in first.keys() if _INDEX.search(n)]
            pre = [n for n in first.keys() if not _INDEX.search(n) and is_pre(n)]
            post = [n for n in last.keys() if not _INDEX.search(n) and not is_pre(n)]
            for n in pre:
                self._map[n] = (sources[0].model, n)
            for (start, _), src in zip(slice_bounds(spec.slices), sources):
                r = self._open(src.model, spec)
                have = {int(m.group(1)) for n in r.keys() if (m := _INDEX.search(n))}
                lo, hi = src.layer_range
                if hi > (max(have) + 1 if have else 0):
                    raise InputError(f"{src.model}: layer_range {[lo, hi]} reaches past its "
                                     f"{len(have)} layers")
                templates = [n for n in layered if int(_INDEX.search(n).group(1)) == 0]
                for k in range(hi - lo):
                    for tmpl in templates:
                        out = _INDEX.sub(f".{start + k}.", tmpl, count=1)
                        self._map[out] = (src.model, _INDEX.sub(f".{lo + k}.", tmpl, count=1))
            for n in post:
                self._map[n] = (sources[-1].model, n)
            self._layers = sum(sl.length for sl in spec.slices)
            self._first = first
        except BaseException:
            self.close()
            raise

    def _open(self, uri: str, spec: MergeSpec) -> ModelReader:
        if uri not in self._readers:
            self._readers[uri] = open_model(uri, spec.s3)
        return self._readers[uri]

    def _where(self, name: str) -> tuple[ModelReader, str]:
        if name not in self._map:
            raise InputError(f"{self.uri}: tensor '{name}' not found among {len(self._map)} tensors")
        uri, src = self._map[name]
        return self._readers[uri], src

    def keys(self) -> list[str]:
        return list(self._map)

    def __contains__(self, name: object) -> bool:
        return name in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def info(self, name: str) -> TensorMeta:
        r, src = self._where(name)
        return r.info(src)

    def get(self, name: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        r, src = self._where(name)
        return r.get(src, out=out, rows=rows)

    @property
    def config(self) -> dict | None:
        cfg = self._first.config
        if cfg is None:
            return None
        return {**cfg, "num_hidden_layers": self._layers} if "num_hidden_layers" in cfg else dict(cfg)

    def aux_names(self) -> list[str]:
        return self._first.aux_names()

    def read_aux(self, name: str) -> bytes:
        data = self._first.read_aux(name)
        if name == "config.json" and self.config is not None:
            return json.dumps(self.config, indent=2).encode()
        return data

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"esm-ray-slices-v1\0")
        for uri in sorted(self._readers):
            h.update(f"{uri}\0{self._readers[uri].fingerprint()}\0".encode())
        h.update(json.dumps(self._map, sort_keys=True).encode())
        return h.hexdigest()

    def close(self) -> None:
        for r in self._readers.values():
            r.close()

    def __enter__(self) -> "SlicedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_base(spec: MergeSpec):
    """The base as the merge reads it (a SlicedModel when the spec has slices)."""
    return SlicedModel(spec, None) if spec.slices else open_model(spec.base, spec.s3)


def open_expert(spec: MergeSpec, index: int):
    """Expert `index` as the merge reads it: a SlicedModel when the spec has slices, an
    AdapterModel (the base with the adapter applied, io.adapter) for a PEFT LoRA adapter."""
    if spec.slices:
        return SlicedModel(spec, index)
    return open_input(spec.experts[index].model, spec.base, spec.s3)


def open_input(uri: str, base_uri: str, s3=None):
    """A model, or a LoRA adapter over the base at `base_uri`, opened for lazy reads."""
    from esm_ray.io.adapter import is_adapter, open_adapter

    if is_adapter(uri, s3):
        return open_adapter(uri, open_model(base_uri, s3), s3)
    return open_model(uri, s3)
