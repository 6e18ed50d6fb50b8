"""Executors: `local` (one process) and `ray` (one actor per expert), same per-layer code."""

from __future__ import annotations

import logging

from esm_ray.runtime.job import MergeJob, MergeResult
from esm_ray.runtime.plan import MergePlan, build_plan
from esm_ray.spec import MergeSpec

log = logging.getLogger("esm_ray.runtime")


def run_merge(spec: MergeSpec, progress: bool = True, plan: MergePlan | None = None) -> MergeResult:
    """Validate and run a merge job with the executor the spec names."""
    plan = plan or build_plan(spec)
    if spec.runtime.name == "ray":
        from esm_ray.runtime.ray_executor import run_on_ray

        return run_on_ray(plan, progress=progress)
    from esm_ray.runtime.pool import LocalPool

    pool = LocalPool(spec)
    try:
        return MergeJob(plan, pool, progress=progress, executor="local").run()
    finally:
        pool.close()


__all__ = ["MergeJob", "MergePlan", "MergeResult", "build_plan", "run_merge"]
