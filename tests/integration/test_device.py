"""runtime.device: resolving it per process, moving parts between devices, placement, reports.

The CUDA paths run only where a GPU is visible (tests marked by `needs_cuda`); everything
else checks the CPU behaviour, the errors and the tree walk that brings parts back to the CPU
(against the `meta` device, a real second device that every torch build has).
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from tests.builders import calibration_files, import_methods, merge_spec, output_files

import_methods()

from esm_ray.errors import SpecError  # noqa: E402
from esm_ray.methods import METHODS, PURIFIERS  # noqa: E402
from esm_ray.runtime import run_merge  # noqa: E402
from esm_ray.runtime.device import CPU, resolve_device, to_device  # noqa: E402
from esm_ray.runtime.ray_executor import worker_options  # noqa: E402
from esm_ray.spec import RuntimeSpec, spec_from_dict  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device visible")
needs_no_cuda = pytest.mark.skipif(CUDA, reason="checks the behaviour without a GPU")


@dataclass(frozen=True)
class _Part:
    u: torch.Tensor
    s: torch.Tensor
    norm: float
    extra: dict


_Pair = namedtuple("_Pair", "a b")


def test_cpu_is_always_cpu_and_auto_follows_visibility():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")


@needs_no_cuda
def test_cuda_without_a_gpu_names_the_field_and_the_expert():
    with pytest.raises(SpecError, match=r"runtime\.device.*expert 'e1'"):
        resolve_device("cuda", "the process of expert 'e1'")


def test_spec_rejects_an_unknown_device():
    with pytest.raises(SpecError, match="runtime.device"):
        spec_from_dict({"base": "b", "experts": [{"name": "a", "model": "m"}], "method": {"name": "ties"},
                        "output": "o", "runtime": {"device": "gpu"}})


def test_to_device_walks_parts_and_keeps_what_is_already_there():
    part = _Part(torch.ones(3, 2), torch.arange(2.0), 1.5,
                 {"pair": _Pair(torch.zeros(1), [torch.ones(2), "label"]), "n": 4})
    assert to_device(part, CPU) is part  # identity on a CPU-only run: no copies
    moved = to_device(part, torch.device("meta"))
    assert isinstance(moved, _Part) and moved.norm == 1.5 and moved.extra["n"] == 4
    assert moved.u.device.type == "meta" and moved.u.shape == (3, 2) and moved.s.dtype == torch.float32
    pair = moved.extra["pair"]
    assert isinstance(pair, _Pair) and pair.a.device.type == "meta"
    assert isinstance(pair.b, list) and pair.b[0].device.type == "meta" and pair.b[1] == "label"
    assert part.u.device == CPU, "the input was changed in place"
    assert to_device(None, CPU) is None and to_device(3.0, CPU) == 3.0


@pytest.mark.parametrize("held", ["gram", "rows"])
def test_to_device_moves_calibration_statistics_whichever_they_hold(held):
    """ModuleStats is no dataclass: to_device moves its tensors (the Gram or the kept rows, s1,
    a Gram already formed from rows) and keeps its class, n and orientation; on their own
    device it hands back the same object (the ESM factor memo keys on it)."""
    from esm_ray.stats.hooks import ModuleStats

    x = torch.randn(5, 300)
    st = (ModuleStats(5, x.double().sum(0), x.double().T @ x.double(), transposed=True) if held == "gram"
          else ModuleStats(5, x.double().sum(0), rows=x, transposed=True))
    if held == "rows":
        st.gram  # formed on the CPU: it travels too
    assert to_device(st, CPU) is st
    moved = to_device({"stats": st}, torch.device("meta"))["stats"]
    assert type(moved) is ModuleStats and moved.n == 5 and moved.transposed
    assert moved.s1.device.type == "meta" and moved.gram.device.type == "meta"
    assert (moved.rows is None) == (held == "gram")
    if held == "rows":
        assert moved.rows.device.type == "meta" and moved.factor().device.type == "meta"
    assert st.s1.device == CPU, "the input was changed in place"


def test_only_decompositions_are_declared_for_the_device():
    """Elementwise methods stay on the CPU; the subspace methods run their math on the device."""
    on_device = {n for n, m in METHODS.items() if m.decomposes}
    assert {"esm", "tsvm"} <= on_device
    assert not on_device & {"task_arithmetic", "ties", "dare_ties", "dare_linear", "linear"}
    assert METHODS["esm_pp"].post_decomposes and not METHODS["ties"].post_decomposes
    if "pave" in PURIFIERS:
        assert PURIFIERS["pave"].decomposes


def test_cpu_device_reserves_no_gpu():
    assert worker_options(RuntimeSpec(name="ray", device="cpu"), {"CPU": 64, "GPU": 8})["num_gpus"] == 0
    assert worker_options(RuntimeSpec(name="ray", device="cuda"), {"CPU": 64, "GPU": 8})["num_gpus"] == 1
    assert worker_options(RuntimeSpec(name="ray", device="cpu", num_gpus_per_worker=1), {"GPU": 8})["num_gpus"] == 1


@pytest.fixture(scope="module")
def data(tiny_llama, tmp_path_factory):
    return calibration_files(tmp_path_factory.mktemp("calib_dev"), 3, vocab=80)


def _spec(tiny_llama, data, out, method, cache, **runtime):
    return spec_from_dict(merge_spec(tiny_llama, out, method, data=data, cache_dir=cache, runtime=runtime or None))


def test_report_names_each_experts_device(tiny_llama, data, tmp_path):
    r = run_merge(_spec(tiny_llama, data, tmp_path / "out", "esm", tmp_path / "c", device="cpu"), progress=False)
    assert r.report["devices"] == {"e0": "cpu", "e1": "cpu", "e2": "cpu"}


@needs_no_cuda
def test_cuda_request_fails_before_any_work(tiny_llama, data, tmp_path):
    spec = _spec(tiny_llama, data, tmp_path / "out", "esm", tmp_path / "c", device="cuda")
    with pytest.raises(SpecError, match="runtime.device"):
        run_merge(spec, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert not (tmp_path / "c").exists(), "calibration ran although the device is unusable"


@needs_no_cuda
def test_ray_cuda_without_gpus_fails_before_starting_workers(ray_driver, tiny_llama, data, tmp_path):
    spec = _spec(tiny_llama, data, tmp_path / "out", "esm", tmp_path / "c", name="ray", device="cuda")
    with pytest.raises(SpecError, match="no GPU"):
        run_merge(spec, progress=False)
    assert not (tmp_path / "out").exists()


# ---- on a GPU machine -------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("method", ["esm", "tsvm", "esm_pp"])
def test_cuda_merge_matches_cpu(method, tiny_llama, data, tmp_path):
    """Calibration and decompositions on the GPU give the CPU's result up to round-off."""
    from safetensors.torch import load_file

    outs = {}
    for dev in ("cpu", "cuda"):
        r = run_merge(_spec(tiny_llama, data, tmp_path / dev, method, tmp_path / f"c-{dev}", device=dev),
                      progress=False)
        assert all(v.startswith(dev) for v in r.report["devices"].values()), r.report["devices"]
        outs[dev] = output_files(tmp_path / dev)
    assert outs["cpu"].keys() == outs["cuda"].keys()
    for f in outs["cpu"]:
        if f.endswith(".safetensors"):
            a, b = load_file(str(tmp_path / "cpu" / f)), load_file(str(tmp_path / "cuda" / f))
            for k in a:
                torch.testing.assert_close(b[k].float(), a[k].float(), rtol=2e-3, atol=2e-4, msg=f"{f}:{k}")


@needs_cuda
def test_ray_workers_compute_on_their_gpu(ray_driver, tiny_llama, data, tmp_path):
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the session's Ray has no GPU")
    spec = _spec(tiny_llama, data, tmp_path / "out", "esm", tmp_path / "c", name="ray",
                 num_gpus_per_worker=1 / 3, device="cuda")
    r = run_merge(spec, progress=False)
    assert all(v.startswith("cuda") for v in r.report["devices"].values()), r.report["devices"]
