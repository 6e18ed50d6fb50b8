"""docs/architecture.md's worked example adds a method by following the page: run it as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

from tests.fixtures.ray import merge_spec

from esm_ray.io.reader import open_model
from esm_ray.methods import METHODS
from esm_ray.runtime import run_merge
from esm_ray.spec import spec_from_dict

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_the_worked_example_adds_a_working_method(tiny_llama, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 2, "the page shows the core function and the method"
    core = types.ModuleType("esm_ray.core.clipped")
    exec(compile(blocks[0], "core/clipped.py", "exec"), core.__dict__)
    monkeypatch.setitem(sys.modules, "esm_ray.core.clipped", core)
    method = types.ModuleType("esm_ray.methods.clipped")
    try:
        exec(compile(blocks[1], "methods/clipped.py", "exec"), method.__dict__)  # registers clipped_ta
        spec = spec_from_dict(merge_spec(tiny_llama, tmp_path / "out", "clipped_ta")
                              | {"method": {"name": "clipped_ta", "params": {"c": 1.5, "lambda": 0.5}}})
        run_merge(spec, progress=False)
    finally:
        METHODS.pop("clipped_ta", None)
    name = "model.layers.0.mlp.up_proj.weight"
    w0 = open_model(str(tiny_llama["base"])).get(name).double()
    want = torch.zeros_like(w0)
    for i in range(3):
        tv = open_model(str(tiny_llama[f"expert_{i}"])).get(name).double() - w0
        bound = 1.5 * float(tv.std())
        want += tv.clamp(-bound, bound)
    got = open_model(str(tmp_path / "out")).get(name).double()
    torch.testing.assert_close(got, w0 + 0.5 * want, rtol=1e-5, atol=1e-6)
