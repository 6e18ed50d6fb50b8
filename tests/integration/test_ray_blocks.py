"""Row blocks on Ray and under resume: the Ray coordinator merges large tensors a row block at a
time with the local executor's bytes, for every blockwise method; a tensor merged in blocks is
staged for resume as its finished rows, and a resumed job (local or Ray) writes the same bytes.

The models are a tiny LLaMA family; a small `block_bytes` makes most of its tensors "large".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.models import make_family
from tests.fixtures.ray import import_methods, method_experts, output_files
from tests.fixtures.ray import test_params as method_params

import_methods()

from esm_ray.methods import METHODS, TensorInfo, build_method  # noqa: E402
from esm_ray.runtime.expert import ExpertSide  # noqa: E402
from esm_ray.runtime.job import MergeJob  # noqa: E402
from esm_ray.runtime.layout import tensor_infos  # noqa: E402
from esm_ray.core.rowblocks import row_blocks  # noqa: E402
from esm_ray.runtime.plan import build_plan  # noqa: E402
from esm_ray.runtime.pool import LocalPool  # noqa: E402
from esm_ray.spec import spec_from_dict  # noqa: E402

BLOCK = 1024  # float32 bytes: the 80x32 embedding is 10 blocks of 8 rows
INFO = TensorInfo.of("w", (4, 4))
# every registered method that may be merged in row blocks, with the parameters the tests use
BLOCKWISE = sorted(n for n, m in METHODS.items()
                   if build_method(n, method_params(n), n_experts=method_experts(n, 3)).blockwise(INFO))
CASES = [("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}), ("sce", {"select_topk": 0.4})] + \
        [(n, method_params(n)) for n in BLOCKWISE] + [("dare_linear", {"density": 0.3, "rescale": False}),
                                                      ("della", {"density": 0.5, "epsilon": 0.2})]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("fam"), "llama", 3, seed=5, dtype=torch.bfloat16)


def _spec(family, out: Path, method: str, params: dict, runtime: str = "local"):
    n = method_experts(method, 3)
    experts = [{"name": f"e{i}", "model": str(family[f"expert_{i}"]), "weight": [1.0, 0.5, 2.0][i]}
               for i in range(n)]
    return spec_from_dict({"base": str(family["base"]), "experts": experts, "output": str(out),
                           "method": {"name": method, "params": params},
                           "runtime": {"name": runtime, "num_cpus_per_worker": 0.5}})


class _Pool(LocalPool):
    """A local pool that fails once `fail_when()` is true, and counts the row blocks it makes."""

    def __init__(self, spec, fail_when=None) -> None:
        super().__init__(spec)
        self.fail_when = fail_when
        self.blocks = 0

    def block_states(self, info, blocks):
        if self.fail_when is not None and self.fail_when():
            raise RuntimeError("injected failure")
        return super().block_states(info, blocks)

    def parts(self, info, base, rows=None, states=None):
        self.blocks += rows is not None
        return super().parts(info, base, rows, states)


def _local(spec, resume: bool = False, fail_when=None, block_bytes: int = BLOCK):
    pool = _Pool(spec, fail_when)
    try:
        return MergeJob(build_plan(spec), pool, progress=False, resume=resume, block_bytes=block_bytes).run(), pool
    finally:
        pool.close()


def _same(a: Path, b: Path) -> None:
    got, want = output_files(a), output_files(b)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []


# the first three (TIES's thresholds, DARE's streams, SCE's passes over the blocks on the
# coordinator) by default; the rest are slow (Ray runs)
@pytest.mark.parametrize("method,params", [pytest.param(m, p, marks=() if i < 3 else pytest.mark.slow)
                                           for i, (m, p) in enumerate(CASES)])
def test_ray_blocks_give_the_local_bytes(method, params, family, ray_driver, tmp_path):
    from esm_ray.runtime.ray_executor import run_on_ray

    whole, _ = _local(_spec(family, tmp_path / "whole", method, params), block_bytes=1 << 30)
    local, pool = _local(_spec(family, tmp_path / "local", method, params))
    assert pool.blocks > 0 and local.report["row_blocks"]["tensors"] >= 3
    _same(tmp_path / "local", tmp_path / "whole")  # blocks change no byte

    spec = _spec(family, tmp_path / "ray", method, params, runtime="ray")
    plan, n = build_plan(spec), method_experts(method, 3)
    result = run_on_ray(plan, progress=False, block_bytes=BLOCK)
    assert result.report["executor"] == "ray"
    # the Ray coordinator merges the same tensors in blocks, each 1/T as many rows as local
    # (T parts of a block are in flight at once: their sum stays about `block_bytes`)
    want = sum(len(b) for info in tensor_infos(plan, set())
               if plan.dtypes[info.name].is_floating_point and (b := plan.in_blocks(info, BLOCK, n)))
    assert result.report["row_blocks"] == dict(local.report["row_blocks"], blocks=want, block_parts=n), \
        "the Ray coordinator did not merge in blocks of 1/T the rows"
    assert local.report["row_blocks"]["block_parts"] == 1 and (n == 1 or want > local.report["row_blocks"]["blocks"])
    _same(tmp_path / "ray", tmp_path / "local")
    assert not list(tmp_path.glob(".ray.esm-ray-resume-*")), "resume staging left behind"


def test_every_blockwise_method_is_covered():
    assert {m for m, _ in CASES} == set(BLOCKWISE)
    assert {"ties", "dare_ties", "dare_linear", "task_arithmetic", "linear"} <= set(BLOCKWISE)


@pytest.mark.parametrize("method,params", [("dare_ties", {"density": 0.5}),
                                           pytest.param("ties", {"density": 0.4}, marks=pytest.mark.slow)])
def test_blocked_tensors_are_staged_as_rows_and_resumed_with_the_same_bytes(method, params, family, ray_driver,
                                                                          tmp_path):
    """A local job killed after some groups: its blocked tensors are staged as row files; the
    job resumed locally, and resumed on Ray, writes the bytes of an uninterrupted run."""
    from esm_ray.runtime.ray_executor import run_on_ray

    clean, _ = _local(_spec(family, tmp_path / "clean", method, params))
    rows = lambda: sorted(tmp_path.glob(".out.esm-ray-resume-*/rows-*.safetensors"))  # noqa: E731
    groups = lambda: sorted(tmp_path.glob(".out.esm-ray-resume-*/group-*.safetensors"))  # noqa: E731
    spec = _spec(family, tmp_path / "out", method, params)
    with pytest.raises(RuntimeError, match="injected failure"):
        _local(spec, resume=True, fail_when=lambda: len(rows()) >= 4)
    assert len(rows()) >= 4 and groups(), "no blocked tensor was staged"
    staged = {p.name for p in tmp_path.glob(".out.esm-ray-resume-*/*")}
    assert not [n for n in staged if ".tmp-" in n], "a partial row file was left"
    assert not (tmp_path / "out").exists()

    import shutil

    staging = next(tmp_path.glob(".out.esm-ray-resume-*"))
    keep = tmp_path / "staged"
    shutil.copytree(staging, keep)
    resumed, pool = _local(spec, resume=True)
    assert resumed.report["resume"]["restored"] >= 1
    assert pool.blocks < clean.report["row_blocks"]["blocks"], "restored blocked tensors were merged again"
    _same(tmp_path / "out", tmp_path / "clean")

    # the same staging, resumed by the Ray coordinator (the job key does not name the executor)
    shutil.rmtree(tmp_path / "out")
    ray_spec = _spec(family, tmp_path / "out", method, params, runtime="ray")
    shutil.copytree(keep, staging)
    result = run_on_ray(build_plan(ray_spec), progress=False, block_bytes=BLOCK)
    assert result.report["resume"]["restored"] == resumed.report["resume"]["restored"]
    _same(tmp_path / "out", tmp_path / "clean")


def test_a_group_missing_its_rows_is_not_restored(family, tmp_path):
    spec = _spec(family, tmp_path / "out", "ties", {"density": 0.4})
    rows = lambda: sorted(tmp_path.glob(".out.esm-ray-resume-*/rows-*.safetensors"))  # noqa: E731
    with pytest.raises(RuntimeError, match="injected failure"):
        _local(spec, resume=True, fail_when=lambda: len(rows()) >= 2)
    for p in rows():
        p.unlink()
    resumed, _ = _local(spec, resume=True)
    assert resumed.report["resume"]["restored"] == 0
    clean, _ = _local(_spec(family, tmp_path / "clean", "ties", {"density": 0.4}))
    _same(tmp_path / "out", tmp_path / "clean")


@pytest.mark.parametrize("method,params", [("dare_linear", {"density": 0.5}), ("ties", {"density": 0.3})])
def test_worker_rebuilds_its_block_state_when_asked_out_of_order(method, params, family, tmp_path):
    """A restarted worker (no state) or a retried call asks for block b afresh: the state is
    rebuilt and the earlier blocks replayed, so the part is the one an in-order run makes."""
    spec = _spec(family, tmp_path / "o", method, params)
    name = "model.embed_tokens.weight"
    info = TensorInfo.of(name, build_plan(spec).shapes[name])
    blocks = row_blocks(info.shape, BLOCK)
    assert len(blocks) >= 4
    side = ExpertSide(spec, 1)
    side.block_begin(info, blocks)
    in_order = [side.prepare_rows(info, blocks, b) for b in range(len(blocks))]
    fresh = ExpertSide(spec, 1)
    assert torch.equal(fresh.prepare_rows(info, blocks, 3), in_order[3])  # restarted: no state
    assert torch.equal(fresh.prepare_rows(info, blocks, 3), in_order[3])  # retried: asked again
    assert torch.equal(fresh.prepare_rows(info, blocks, 4), in_order[4])
    if method.startswith("dare"):  # the random stream does matter: block 3 drawn first differs
        side2 = ExpertSide(spec, 1)
        side2.block_begin(info, blocks[3:])
        assert not torch.equal(side2.prepare_rows(info, blocks[3:], 0), in_order[3])


@pytest.mark.parametrize("t", [1, 2, 3, 8])
def test_block_rows_shrink_with_the_experts_in_flight(t):
    """T parts of one block held at once stay within the block budget together (one row at the
    least); which tensors are blocked does not depend on T; the rows cover the tensor."""
    rows, cols = 80, 32  # 128 bytes a row (float32): 8 rows in BLOCK
    blocks = row_blocks((rows, cols), BLOCK, t)
    assert blocks is not None and blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert max(r1 - r0 for r0, r1 in blocks) == max(1, 8 // t)
    assert t * max(r1 - r0 for r0, r1 in blocks) * cols * 4 <= max(BLOCK, t * cols * 4)
    assert row_blocks((8, cols), BLOCK, t) is None  # at most BLOCK: whole, whatever T
