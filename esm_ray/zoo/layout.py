"""The on-disk layout of a built zoo and a reader for it.

    <zoo>/zoo.json                      manifest: kind, tasks, relative paths, metrics
    <zoo>/base/                         the pretrained model (HF layout)
    <zoo>/experts/<task>/               fine-tuned model (HF layout) [+ head.safetensors] + manifest.json
    <zoo>/probes/<task>.safetensors     linear probe on frozen pretrained features (encoder zoos)
    <zoo>/data/<task>/{train,validation,test}.jsonl   labelled rows {"text", "label"}
    <zoo>/data/<task>/calib.jsonl       unlabelled rows {"text"} drawn from validation only

`kind` is "encoder" (classification tasks, MiniLM) or "causal_lm" (domains, SmolLM2; its
rows carry only "text").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from esm_ray.errors import InputError

MANIFEST = "zoo.json"
FORMAT = 1


def default_root() -> Path:
    """$ESM_RAY_ZOO, else ~/.cache/esm-ray/zoo."""
    env = os.environ.get("ESM_RAY_ZOO")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "esm-ray" / "zoo"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class Zoo:
    """A built zoo on disk."""

    root: Path
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def task(self, name: str) -> dict:
        try:
            return self.manifest["tasks"][name]
        except KeyError:
            raise InputError(f"{self.root}: zoo has no task {name!r}; it has {', '.join(self.tasks)}") from None

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def base_dir(self) -> Path:
        return self.path(self.manifest["base"])

    def expert_dir(self, name: str) -> Path:
        return self.path(self.task(name)["expert"])

    def head_path(self, name: str) -> Path:
        return self.path(self.task(name)["head"])

    def probe_path(self, name: str) -> Path:
        return self.path(self.task(name)["probe"])

    def data_path(self, name: str, split: str) -> Path:
        return self.path(self.task(name)["data"]) / f"{split}.jsonl"

    def calib_path(self, name: str) -> Path:
        return self.path(self.task(name)["calib"])

    def rows(self, name: str, split: str) -> list[dict]:
        return read_jsonl(self.data_path(name, split))

    def labels(self, name: str) -> list[str]:
        return list(self.task(name).get("labels", []))


def open_zoo(path: str | Path) -> Zoo:
    """Read `<path>/zoo.json`; errors name the path and what is missing."""
    root = Path(path).expanduser().resolve()
    man = root / MANIFEST
    if not man.is_file():
        raise InputError(f"{root}: not a built zoo (no {MANIFEST}); build one with `esm-ray zoo build`")
    try:
        manifest = json.loads(man.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{man}: cannot parse: {err}") from None
    if manifest.get("format") != FORMAT or manifest.get("kind") not in ("encoder", "causal_lm"):
        raise InputError(f"{man}: unsupported zoo format {manifest.get('format')!r} / kind {manifest.get('kind')!r}")
    return Zoo(root, manifest)
