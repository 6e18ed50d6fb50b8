"""Merge specs for the tests, built in one place.

A family is {"base": dir, "expert_0": dir, ...} (tests/fixtures/family.py). `spec_dict` is the
plain spec (base, experts, method, output, plus any top-level field); `merge_spec` adds the
small calibration and local-runtime settings and each method's small test parameters that the
runtime tests share; `write_spec` puts one in a YAML file for the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

# Small settings for methods whose defaults are sized for real models; unknown keys are dropped
# so the tests follow the methods' parameter models.
METHOD_TEST_PARAMS: dict[str, dict] = {
    "adamerging": {"steps": 2, "samples": 8, "batch_size": 4},
    "concrete_ta": {"steps": 2, "samples": 8, "batch_size": 4},
    "concrete_adamerging": {"steps": 2, "adamerging_steps": 2, "samples": 8, "batch_size": 4},
    "esm_pp": {"rank": 4},
    "sim": {"subspace_rank": 2, "support_samples": 8},
    "slerp": {"t": 0.5},
    "nearswap": {"t": 0.01},
}
# Methods that take a fixed number of experts besides the base (the rest take any number).
METHOD_EXPERTS: dict[str, int] = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1, "passthrough": 1, "nuslerp": 2}
# The calibration settings of merge_spec: a few short rows.
TEST_CALIBRATION: dict = {"samples": 8, "max_length": 16, "batch_size": 4}


def method_experts(method: str, default: int) -> int:
    """How many experts a generic test should give `method`."""
    return METHOD_EXPERTS.get(method, default)


def import_methods() -> None:
    """Register every method module (until esm_ray.methods imports them all itself)."""
    import importlib
    import pkgutil

    import esm_ray.methods as m

    for mod in pkgutil.iter_modules(m.__path__):
        if not mod.name.startswith("_") and mod.name not in ("base", "registry"):
            importlib.import_module(f"esm_ray.methods.{mod.name}")


def method_params(method: str) -> dict:
    """METHOD_TEST_PARAMS[method], reduced to the fields the method's Params has."""
    from esm_ray.methods import METHODS

    fields = {f.alias or n for n, f in METHODS[method].Params.model_fields.items()}
    return {k: v for k, v in METHOD_TEST_PARAMS.get(method, {}).items() if k in fields}


def calibration_files(root: Path, n: int, vocab: int, rows: int = 12, length: int = 10, seed: int = 0) -> list[Path]:
    """One JSONL of {"input_ids": [...]} rows per expert (different tokens per expert)."""
    import random

    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rng = random.Random(seed * 1000 + i)
        p = root / f"task_{i}.jsonl"
        p.write_text("".join(json.dumps({"input_ids": [rng.randrange(1, vocab) for _ in range(length)]}) + "\n"
                             for _ in range(rows)))
        out.append(p)
    return out


def spec_dict(family: dict[str, Path] | dict[str, str], output: Path | str, method: str = "ties", *,
              params: dict | None = None, n_experts: int = 3, data: list[Path] | None = None, **extra) -> dict:
    """A raw spec dict: the base and experts e0..e{n-1} of `family` (with data[i] if given),
    `method` with `params`, `output`, and every other top-level field of `extra`."""
    experts = [{"name": f"e{i}", "model": str(family[f"expert_{i}"])} | ({"data": str(data[i])} if data else {})
               for i in range(n_experts)]
    return {"base": str(family["base"]), "experts": experts, "method": {"name": method, "params": params or {}},
            "output": str(output), **extra}


def merge_spec(family: dict[str, Path], output: Path, method: str, *, purify: str | None = None,
               runtime: dict | None = None, data: list[Path] | None = None, cache_dir: Path | None = None,
               **extra) -> dict:
    """spec_dict with every expert of `family` (as many as `method` takes), the method's test
    parameters, TEST_CALIBRATION (and cache_dir) and a local runtime updated by `runtime`."""
    n = method_experts(method, sum(1 for k in family if k.startswith("expert_")))
    spec = spec_dict(family, output, method, params=method_params(method), n_experts=n, data=data,
                     calibration=TEST_CALIBRATION | ({"cache_dir": str(cache_dir)} if cache_dir else {}),
                     runtime={"name": "local", "num_cpus_per_worker": 0.5} | (runtime or {}))
    if purify:
        spec["purify"] = {"name": purify}
    spec.update(extra)
    return spec


def write_spec(path: Path, family: dict[str, Path] | dict[str, str], output: Path | str, method: str = "ties",
               **fields) -> Path:
    """spec_dict(family, output, method, **fields) written to `path` as YAML; returns path."""
    path.write_text(yaml.safe_dump(spec_dict(family, output, method, **fields)))
    return path


def copy_family(family: dict[str, Path], root: Path) -> dict[str, Path]:
    """A copy of every directory of `family` under root/<name> (to break or move safely)."""
    out = {}
    for name, p in family.items():
        shutil.copytree(p, root / name)
        out[name] = root / name
    return out


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of a merged output except merge_report.json (timings and executor differ)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "merge_report.json"}
