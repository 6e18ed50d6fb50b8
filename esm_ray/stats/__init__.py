"""Calibration statistics: per-layer input moments of each expert on its task's samples.

The names below are imported on first use: planning a merge reads `stats.cache` and
`stats.data` without paying for transformers, which the hooks need.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "cache_key": "esm_ray.stats.calibrate", "cache_root": "esm_ray.stats.cache", "calibrate": "esm_ray.stats.calibrate",
    "calibrate_expert": "esm_ray.stats.calibrate", "data_hash": "esm_ray.stats.data",
    "load_calibration_rows": "esm_ray.stats.data", "ModuleStats": "esm_ray.stats.hooks",
    "StatsCollector": "esm_ray.stats.hooks", "plan_passes": "esm_ray.stats.hooks", "stats_bytes": "esm_ray.stats.hooks",
    "StatsStore": "esm_ray.stats.store",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'esm_ray.stats' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
