"""Calibration statistics: per-layer input moments of each expert on its task's samples."""

from esm_ray.stats.calibrate import cache_key, cache_root, calibrate, calibrate_expert
from esm_ray.stats.data import data_hash, load_calibration_rows
from esm_ray.stats.hooks import ModuleStats, StatsCollector, plan_passes, stats_bytes
from esm_ray.stats.store import StatsStore

__all__ = [
    "ModuleStats",
    "StatsCollector",
    "StatsStore",
    "cache_key",
    "cache_root",
    "calibrate",
    "calibrate_expert",
    "data_hash",
    "load_calibration_rows",
    "plan_passes",
    "stats_bytes",
]
