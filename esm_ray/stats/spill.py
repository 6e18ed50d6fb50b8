"""Statistics written part by part, so a layer-wise calibration never holds more than one
block's Grams (a 7B LLaMA's float64 Grams are ~44 GB, three times its bf16 weights).

`StatsSpill.add` writes one part (e.g. one block's statistics) to a safetensors file in a
temporary directory next to the cache entry and keeps only the manifest entries; `save` writes
the cache entry (`<key>.safetensors` + `<key>.json`, the layout of `esm_ray.stats.store`) by
streaming the parts' bytes into one safetensors file, a few MB at a time, removing each part
once copied (the disk holds the statistics about once, plus one part).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from esm_ray.io.targets import write_tensors
from esm_ray.stats.hooks import ModuleStats
from esm_ray.stats.store import FORMAT_VERSION, StatsStore, _atomic_write, encode_stats

_CHUNK = 1 << 22


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data, header) of a safetensors file."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


class StatsSpill:
    """Statistics of one expert gathered in parts on disk (see the module docstring)."""

    def __init__(self, near: Path) -> None:
        near.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".esm-ray-spill-", dir=near))
        self.parts: list[Path] = []
        self.modules: dict[str, dict[str, Any]] = {}
        self.distinct = 0
        self.tokens = 0

    def add(self, stats: dict[str, ModuleStats]) -> None:
        """Write one part's statistics; modules sharing an input share one stored pair, as in
        StatsStore.save (sharing never crosses parts: a block's inputs are its own)."""
        if not stats:
            return
        tensors, modules = encode_stats(stats)
        self.modules.update(modules)
        self.distinct += sum(1 for m, e in modules.items() if e["stored_as"] == m)
        self.tokens = max([self.tokens, *(int(st.n) for st in stats.values())])
        part = self.dir / f"part-{len(self.parts):05d}.safetensors"
        write_tensors(part, tensors)
        self.parts.append(part)

    def _write(self, out: Path) -> None:
        """One safetensors file holding every part's tensors, streamed from the parts."""
        header: dict[str, Any] = {"__metadata__": {"format": str(FORMAT_VERSION)}}
        copies: list[tuple[Path, int, int, int]] = []  # (part, from, to, at): byte ranges in output order
        off = 0
        for part in self.parts:
            start, h = _header(part)
            items = sorted(((m["data_offsets"], k, m) for k, m in h.items() if k != "__metadata__"),
                           key=lambda x: x[0][0])
            for (a, b), name, meta in items:
                header[name] = {"dtype": meta["dtype"], "shape": meta["shape"], "data_offsets": [off, off + b - a]}
                copies.append((part, start + a, start + b, off))
                off += b - a
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        last = {part: k for k, (part, *_) in enumerate(copies)}
        with out.open("wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for k, (part, a, b, _) in enumerate(copies):
                with part.open("rb") as src:
                    src.seek(a)
                    left = b - a
                    while left:
                        block = src.read(min(left, _CHUNK))
                        if not block:
                            raise OSError(f"{part}: truncated statistics part")
                        f.write(block)
                        left -= len(block)
                if last[part] == k:  # copied: the disk holds the statistics about once, not twice
                    part.unlink()

    def save(self, path: Path, manifest: dict[str, Any]) -> StatsStore:
        """Write the cache entry at `path` (+ its .json manifest, last) and remove the parts."""
        try:
            full = {**manifest, "format": FORMAT_VERSION, "modules": self.modules, "distinct_inputs": self.distinct}
            _atomic_write(path, self._write)
            _atomic_write(path.with_suffix(".json"),
                          lambda p: p.write_text(json.dumps(full, indent=1, sort_keys=True)))
            return StatsStore(path, full)
        finally:
            self.close()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
