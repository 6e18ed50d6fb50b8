"""MergeMethod.zero_for_zero_tasks: a method that declares it gives ΔW == 0 whenever every
expert's task vector of a tensor is zero (so a tensor no adapter changes may be written as the
base's without being merged). Checked on the method's own prepare and fuse."""

from __future__ import annotations

import pytest
import torch

from tests.builders import import_methods, method_experts, method_params

import_methods()

from esm_ray.core.layerstats import LayerStats  # noqa: E402
from esm_ray.methods import METHODS, ExpertContext, TensorInfo, build_method  # noqa: E402

DECLARED = sorted(n for n, m in METHODS.items() if m.zero_for_zero_tasks)


def test_the_task_vector_methods_declare_it():
    assert {"task_arithmetic", "ties", "dare_linear", "dare_ties", "tsvm", "esm"} <= set(DECLARED)
    assert not {"linear", "passthrough", "model_stock", "slerp"} & set(DECLARED)


@pytest.mark.parametrize("method", DECLARED)
@pytest.mark.parametrize("shape", [(7,), (12, 5), (40, 16)])
def test_zero_task_vectors_give_a_zero_update(method, shape):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    n = method_experts(method, 3)
    m = build_method(method, method_params(method), n_experts=n)
    info = TensorInfo.of("layers.0.mlp.weight", shape)
    stats = None
    if m.needs_stats and len(shape) == 2:  # ESM: each expert's input statistics of the layer
        x = torch.randn(64, shape[1], generator=g, dtype=torch.float64)
        stats = LayerStats(64, x.sum(0), x.T @ x)
    ctxs = [m.context_for(ExpertContext(i, f"e{i}", 0.5 + i, stats=stats), info) for i in range(n)]
    parts = [m.prepare(info, base, base.clone(), c) for c in ctxs]
    delta = m.fuse(info, base, parts, ctxs)
    assert delta.shape == base.shape and not bool(delta.abs().max()), method
