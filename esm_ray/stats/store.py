"""The saved calibration statistics of one expert: one safetensors file and a JSON manifest.

Layout of `<key>.safetensors`: for every distinct input (stored under the first module that
reads it) `<module>.s1` (d_in,) float64 and either `<module>.gram` (d_in, d_in) float64 or,
where calibration kept the rows (a wide input with fewer rows than twice its width, see
`stats.hooks`), `<module>.rows` (n, d_in) float32. `<key>.json` lists every module, the module
its statistics are stored under, n, d_in, which of the two is stored ("held": "gram" or
"rows") and whether its weight is stored transposed (GPT-2 Conv1D), plus the settings, the model
fingerprint, the data hash and the time taken. The manifest is written last: a directory
holding it holds a complete result. Both files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import uuid
import weakref
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from esm_ray.errors import InputError
from esm_ray.io.targets import write_tensors
from esm_ray.stats.hooks import ModuleStats

FORMAT_VERSION = 2  # 2: a distinct input holds its Gram or its rows (1: always the Gram)
READABLE_FORMATS = (1, 2)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def shared_of(stats: dict[str, ModuleStats]) -> dict[str, str]:
    """{module: module its statistics are stored under}, from object identity (first wins):
    modules reading one input share its s1."""
    first: dict[int, str] = {}
    out = {}
    for name, st in stats.items():
        key = id(st.s1)
        first.setdefault(key, name)
        out[name] = first[key]
    return out


def encode_stats(stats: dict[str, ModuleStats]) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """The stored form of statistics: ({"<module>.gram" / ".s1": tensor} for each distinct input,
    {module: manifest entry}); modules sharing an input are stored once, under the first."""
    shared = shared_of(stats)
    tensors: dict[str, Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, st in stats.items():
        src = shared[name]
        held = "rows" if st.rows is not None else "gram"
        if src == name:
            tensors[f"{name}.{held}"] = (st.rows if st.rows is not None else st.gram).contiguous()
            tensors[f"{name}.s1"] = st.s1.contiguous()
        modules[name] = {"stored_as": src, "n": int(st.n), "d_in": st.d_in, "held": held,
                         "transposed": bool(getattr(st, "transposed", False))}
    return tensors, modules


class StatsStore:
    """Read access to one expert's saved statistics; layers are loaded lazily, one at a time."""

    def __init__(self, path: str | Path, manifest: dict[str, Any] | None = None, cache_hit: bool = False) -> None:
        self.path = Path(path)
        self.manifest_path = self.path.with_suffix(".json")
        if manifest is None:
            try:
                manifest = json.loads(self.manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise InputError(f"{self.manifest_path}: cannot read statistics manifest ({err})") from None
        if manifest.get("format") not in READABLE_FORMATS:
            raise InputError(f"{self.manifest_path}: statistics format {manifest.get('format')!r}, "
                             f"expected one of {list(READABLE_FORMATS)}")
        self.manifest = manifest
        self.cache_hit = cache_hit
        # The last input read, while anything still holds it: modules that share it (q, k, v)
        # then get the same object, so what is derived from it (a Gram formed from rows,
        # methods.esm's factor) serves the next module. Held weakly: the store itself keeps
        # nothing once its user lets go, so T experts' stores in one process (the local pool)
        # do not hold T inputs' statistics between tensors; one released too early is read again.
        self._last: tuple[tuple[str, bool], weakref.ref[ModuleStats]] | None = None

    @property
    def key(self) -> str:
        return str(self.manifest.get("key", ""))

    def modules(self) -> set[str]:
        return set(self.manifest["modules"])

    def shared(self) -> dict[str, str]:
        """{module: module its statistics are stored under}."""
        return {m: e["stored_as"] for m, e in self.manifest["modules"].items()}

    def get(self, module: str) -> ModuleStats | None:
        """The statistics of one module (float64, CPU), or None when it was not hooked."""
        entry = self.manifest["modules"].get(module)
        if entry is None:
            return None
        key = (entry["stored_as"], bool(entry.get("transposed", False)))
        last = self._last  # read once: another thread may replace it meanwhile
        stats = last[1]() if last is not None and last[0] == key else None
        if stats is None:
            self._last = last = None  # one input's statistics held at a time (this thread's reference too)
            src, held = key[0], entry.get("held", "gram")
            with safe_open(str(self.path), framework="pt") as f:
                s1, t = f.get_tensor(f"{src}.s1"), f.get_tensor(f"{src}.{held}")
            stats = ModuleStats(int(entry["n"]), s1, *((None, t) if held == "rows" else (t, None)),
                                transposed=key[1])
            self._last = (key, weakref.ref(stats))
        return stats

    def __repr__(self) -> str:
        return f"StatsStore({self.path}, {len(self.manifest['modules'])} modules)"

    @staticmethod
    def save(stats: dict[str, ModuleStats], path: str | Path, manifest: dict[str, Any]) -> "StatsStore":
        """Write statistics and manifest atomically; returns the store."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, modules = encode_stats(stats)
        full = {**manifest, "format": FORMAT_VERSION, "modules": modules,
                "distinct_inputs": sum(1 for m, e in modules.items() if e["stored_as"] == m)}
        _atomic_write(path, lambda p: write_tensors(p, tensors, {"format": str(FORMAT_VERSION)}))
        _atomic_write(path.with_suffix(".json"), lambda p: p.write_text(json.dumps(full, indent=1, sort_keys=True)))
        return StatsStore(path, full)
