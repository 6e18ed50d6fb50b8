"""Golden output hashes: every method's output tensors, byte for byte, on tiny LLaMA and BERT experts.

A guard for refactoring: the sha256 of every tensor that a merge writes (shards and routed
artefacts), for every registered method, PAVE on each task-vector method and the routed methods,
recorded in tests/golden/hashes.json. A change that moves code without meaning to change the
math must keep every hash. The Ray executor must give the same hashes (slow for most cases;
the default run keeps one Ray case).

Re-record after an intended change of output (and say why in the commit):

    ESM_RAY_RECORD_GOLDEN=1 python -m pytest -q tests/methods/test_golden.py -m ''

Float64 eigen/SVD results differ in the last bits between CPU instruction sets and between CPU
vendors (the BLAS takes other kernels on AMD than on Intel at the same AVX-512 level), so the
file holds one set of hashes per CPU (torch's capability and the vendor), and the test compares
with the set of this machine's CPU; where none was recorded it skips, saying so. Recording
writes this CPU's set and keeps the others: after an intended change of output, re-record on
every CPU the file holds (or drop the sets that cannot be re-recorded, and say so).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.fixtures.family import make_family
from tests.builders import calibration_files, import_methods, merge_spec

import_methods()

from esm_ray.methods import METHODS  # noqa: E402
from esm_ray.runtime import run_merge  # noqa: E402
from esm_ray.spec import spec_from_dict  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "hashes.json"
RECORD = os.environ.get("ESM_RAY_RECORD_GOLDEN") == "1"
PAVE_ON = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "tsvm")
CASES = sorted(METHODS) + [f"{m}+pave" for m in PAVE_ON]
ARCHS = {"llama": 80, "bert": 96}  # vocabulary sizes of the tiny families
RAY_DEFAULT = {("llama", "esm")}  # Ray runs cost 10-30 s each; the rest are slow


def _cpu() -> dict[str, str]:
    """What the hashes depend on: torch's CPU capability and the CPU vendor."""
    vendor = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"capability": torch.backends.cpu.get_cpu_capability(), "vendor": vendor}


def tensor_hashes(out: Path) -> dict[str, str]:
    """{file:tensor: sha256 of dtype, shape and bytes} for every safetensors file under `out`."""
    hashes = {}
    for f in sorted(out.rglob("*.safetensors")):
        rel = f.relative_to(out).as_posix()
        if rel.startswith("model-"):
            rel = "model"  # shard numbering is layout, not math
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                t = st.get_tensor(name).contiguous()
                h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                hashes[f"{rel}:{name}"] = h.hexdigest()
    return hashes


def _sets() -> list[dict]:
    """[{"cpu": {...}, "cases": {case: {tensor: sha256}}}, ...], one set per CPU recorded."""
    return json.loads(GOLDEN.read_text())["sets"] if GOLDEN.is_file() else []


@pytest.fixture(scope="module")
def golden():
    sets, cpu = _sets(), _cpu()
    mine = next((s for s in sets if s["cpu"] == cpu), None)
    if mine is None:
        if not RECORD:
            pytest.skip(f"no golden hashes were recorded on this CPU ({cpu}); the file holds "
                        f"{[s['cpu'] for s in sets]}")
        mine = {"cpu": cpu, "cases": {}}
        sets.append(mine)
    yield mine
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"sets": sets}, indent=1, sort_keys=True) + "\n")


def _bert_with_heads(root: Path) -> dict[str, Path]:
    """The tiny BERT family, each expert with a seeded 2-label task head (the searches need one)."""
    from safetensors.torch import save_file

    fam = make_family(root, "bert", 3, seed=1)
    g = torch.Generator().manual_seed(11)
    for i in range(3):
        save_file({"weight": torch.randn(2, 32, generator=g), "bias": torch.randn(2, generator=g)},
                  str(fam[f"expert_{i}"] / "head.safetensors"), metadata={"labels": "no\tyes"})
    return fam


@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("golden_data")
    fams = {"llama": tiny_llama, "bert": _bert_with_heads(root / "bert_family")}
    return {arch: (fam, calibration_files(root / arch, 3, vocab=ARCHS[arch])) for arch, fam in fams.items()}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _merge(families, arch: str, case: str, out: Path, runtime: dict | None = None) -> dict[str, str]:
    method, _, purify = case.partition("+")
    fam, data = families[arch]
    spec = spec_from_dict(merge_spec(fam, out, method, purify=purify or None, data=data,
                                     cache_dir=out.parent / f"cache-{arch}-{case}", runtime=runtime, seed=7))
    run_merge(spec, progress=False)
    return tensor_hashes(out)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("case", CASES)
def test_local_output_matches_golden_hashes(golden, families, arch, case, tmp_path):
    hashes = _merge(families, arch, case, tmp_path / "out")
    key = f"{arch}/{case}"
    if RECORD:
        golden["cases"][key] = hashes
        return
    assert key in golden["cases"], f"no golden hashes for {key}: record them (see the module docstring)"
    want = golden["cases"][key]
    changed = sorted(k for k in set(want) | set(hashes) if want.get(k) != hashes.get(k))
    assert not changed, f"{key}: {len(changed)} of {len(want)} tensors changed, first: {changed[:5]}"


@pytest.mark.parametrize("arch,case", [
    (a, c) if (a, c) in RAY_DEFAULT else pytest.param(a, c, marks=pytest.mark.slow)
    for a in sorted(ARCHS) for c in CASES])
def test_ray_output_matches_golden_hashes(golden, families, arch, case, ray_driver, tmp_path):
    if RECORD:
        pytest.skip("recording uses the local executor")
    hashes = _merge(families, arch, case, tmp_path / "out",
                    runtime={"name": "ray"})
    assert hashes == golden["cases"][f"{arch}/{case}"]
