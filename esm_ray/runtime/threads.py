"""How many intra-op threads the per-layer math runs on: the same in every executor and process,
since reductions, SVD and eigh give different bits with different thread counts."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from esm_ray.spec import MergeSpec

__all__ = ["math_threads", "torch_threads"]


def math_threads(spec: MergeSpec) -> int:
    """Intra-op threads for the per-layer math, the same in every executor and process.

    Reductions, SVD and eigh give different bits with different thread counts, so the local
    and Ray executors must agree: the CPUs per worker (`runtime.num_cpus_per_worker`).
    """
    return max(1, int(spec.runtime.num_cpus_per_worker))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the enclosed torch math on exactly `n` intra-op threads (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
