"""Row-block merging of elementwise methods: the same bytes as whole tensors, less memory.

The local executor merges a tensor larger than `block_bytes` (in float32) a row block at a
time for methods that declare `elementwise` (task arithmetic, linear). Each check compares
the output files byte for byte with a run that merges every tensor whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from esm_ray.errors import OutputError
from esm_ray.io.reader import open_model
from esm_ray.io.writer import ShardedWriter
from esm_ray.core.ties import magnitude_trim, sparse_nonzero, trim_threshold
from esm_ray.methods import METHODS, TensorInfo, build_method
from tests.builders import method_experts, method_params
from esm_ray.runtime.job import MergeJob
from esm_ray.runtime.plan import build_plan
from esm_ray.runtime.pool import LocalPool
from esm_ray.spec import spec_from_dict
from tests.fixtures.family import make_family
from tests.builders import output_files

SHAPES = {"embed.weight": (97, 13), "odd.weight": (37, 11), "vec.bias": (1001,), "cube.weight": (9, 7, 5),
          "one_row.weight": (1, 300), "small.weight": (2, 3)}


def _odd_family(root: Path, dtype: torch.dtype) -> dict[str, Path]:
    """A base and 3 experts with odd shapes (no row is a multiple of a vector width)."""
    g = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    out = {}
    for name in ("base", "expert_0", "expert_1", "expert_2"):
        d = root / name
        d.mkdir(parents=True)
        sd = base if name == "base" else {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
        out[name] = d
    return out


def _run(fam, out: Path, method: str, params: dict, block_bytes: int, weights=(1.0, 0.5, 2.0)) -> Path:
    experts = [{"name": f"e{i}", "model": str(fam[f"expert_{i}"]), "weight": w} for i, w in enumerate(weights)]
    spec = spec_from_dict({"base": str(fam["base"]), "experts": experts, "output": str(out),
                           "method": {"name": method, "params": params}})
    pool = LocalPool(spec)
    try:
        MergeJob(build_plan(spec), pool, progress=False, block_bytes=block_bytes).run()
    finally:
        pool.close()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lambda": 0.7}),
                                           ("task_arithmetic", {"normalize": True}),
                                           ("linear", {"normalize": False}), ("linear", {}),
                                           ("ties", {"density": 0.3}),
                                           ("ties-reread", {"density": 0.3}),
                                           ("ties", {"density": 0.5, "consensus": "count", "normalize": False}),
                                           ("ties", {"density": 1.0, "lambda": 0.5}),
                                           ("dare_linear", {"density": 0.4}),
                                           ("dare_ties", {"density": 0.6, "lambda": 0.8}),
                                           ("dare_ties", {"density": 0.5, "rescale": False})])
def test_blocks_give_the_bytes_of_whole_tensors(method, params, dtype, tmp_path, monkeypatch):
    from esm_ray.methods import _common

    if method.endswith("-reread"):  # the threshold passes read the blocks again instead of keeping τ
        method = method.removesuffix("-reread")
        monkeypatch.setattr(_common, "PASS_CACHE_BYTES", 0)
    fam = _odd_family(tmp_path / "fam", dtype)
    whole = _run(fam, tmp_path / "whole", method, params, block_bytes=1 << 30)
    seen = []
    real = MergeJob._merged_blocks
    monkeypatch.setattr(MergeJob, "_merged_blocks", lambda self, o, *a: (seen.append(o.info.name),
                                                                         real(self, o, *a))[1])
    blocks = _run(fam, tmp_path / "blocks", method, params, block_bytes=200)  # a few rows per block
    # every tensor over 200 bytes in float32 with more than one row went through the blocks
    assert sorted(seen) == ["cube.weight", "embed.weight", "odd.weight", "vec.bias"]
    a, b = output_files(whole), output_files(blocks)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    # and the merge is right: against an independent computation of one tensor
    r = open_model(str(blocks))
    t = {n: open_model(str(fam[n])).get("embed.weight").double() for n in fam}
    w = (1.0, 0.5, 2.0)
    tv = sum(wi * (t[f"expert_{i}"] - t["base"]) for i, wi in enumerate(w))
    if method in ("ties", "dare_linear", "dare_ties"):
        return  # their own oracles are in test_core_baselines; here only blocks vs whole
    if method == "task_arithmetic":
        want = t["base"] + params.get("lambda", 1.0) * tv / (sum(w) if params.get("normalize") else 1.0)
    else:
        want = (sum(wi * t[f"expert_{i}"] for i, wi in enumerate(w)) / (sum(w) if params.get("normalize", True) else 1))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(r.get("embed.weight").double(), want.to(dtype).double(), rtol=tol, atol=tol)


def test_blocks_on_a_real_model_in_bfloat16(tmp_path):
    fam = make_family(tmp_path / "fam", "llama", 3, seed=3, dtype=torch.bfloat16)
    whole = _run(fam, tmp_path / "whole", "task_arithmetic", {}, block_bytes=1 << 30)
    blocks = _run(fam, tmp_path / "blocks", "task_arithmetic", {}, block_bytes=1024)
    a, b = output_files(whole), output_files(blocks)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_which_methods_are_merged_in_blocks():
    info = TensorInfo.of("w", (4, 4))
    blockwise = {n for n, m in METHODS.items()
                 if build_method(n, method_params(n), n_experts=method_experts(n, 2)).blockwise(info)}
    assert blockwise == {"task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "nearswap", "passthrough",
                         "slerp", "model_stock", "sce", "della", "della_linear"}
    vec = TensorInfo.of("b", (16,))  # one row: DELLA ranks in it, model_stock per row takes its angle
    assert not build_method("della", {"density": 0.5}, n_experts=2).blockwise(vec)
    assert not build_method("model_stock", {"filter_wise": True}, n_experts=2).blockwise(vec)
    assert build_method("model_stock", {}, n_experts=2).blockwise(vec)
    assert not build_method("ties", {"rescale": True}, n_experts=2).blockwise(info)  # L1 sums over the tensor
    assert not build_method("dare_ties", {"rescale_mode": "l1"}, n_experts=2).blockwise(info)


@pytest.mark.parametrize("trim_slice,keep", [(None, None), (64, None), (64, 0)])
@pytest.mark.parametrize("seed", range(4))
def test_streamed_trim_threshold_equals_the_whole_one(seed, trim_slice, keep, monkeypatch):
    """Blocks of any sizes give the whole vector's threshold and tie set (many ties: few values),
    whatever the second pass's slices (64: many per block, and short ones at block ends) and
    whether it keeps the first pass's high bits or computes them again (keep 0)."""
    import esm_ray.core.ties as core_ties
    if trim_slice is not None:
        monkeypatch.setattr(core_ties, "TRIM_SLICE", trim_slice)
    if keep is not None:
        monkeypatch.setattr(core_ties, "TRIM_KEEP_BYTES", keep)
    g = torch.Generator().manual_seed(seed)
    tv = (torch.randint(-6, 7, (5003,), generator=g) / 4).float()
    k = int(torch.randint(1, 5000, (1,), generator=g))
    cuts = sorted(set(torch.randint(1, 5003, (6,), generator=g).tolist())) + [5003]
    blocks = [tv[a:b] for a, b in zip([0] + cuts[:-1], cuts)]
    whole, streamed = trim_threshold(lambda: (tv,), k), trim_threshold(lambda: iter(blocks), k)
    assert whole.value == streamed.value and torch.equal(whole.ties, streamed.ties)
    trimmed = torch.cat([streamed.apply(b, a) for b, a in zip(blocks, [0] + cuts[:-1])])
    assert torch.equal(trimmed, magnitude_trim(tv, k / tv.numel() + 1e-9))
    assert int((trimmed != 0).sum()) == min(k, int((tv != 0).sum()))
    kth = tv.abs().kthvalue(tv.numel() - k + 1).values
    assert streamed.value == float(kth)


def test_blocks_read_only_their_rows(tmp_path):
    fam = _odd_family(tmp_path / "fam", torch.bfloat16)
    r = open_model(str(fam["base"]))
    full = r.get("odd.weight")
    assert torch.equal(r.get("odd.weight", rows=(5, 12)), full[5:12])
    assert r.get("odd.weight", rows=(3, 3)).shape == (0, 11)
    assert torch.equal(r.get("cube.weight", rows=(8, 9)), r.get("cube.weight")[8:9])
    with pytest.raises(ValueError, match=r"'odd.weight': rows 30:40 outside"):
        r.get("odd.weight", rows=(30, 40))


def test_writer_blocks_equal_add_and_bad_blocks_leave_nothing(tmp_path):
    t = {"a": torch.randn(10, 3), "b": torch.arange(7.0).to(torch.bfloat16)}
    plan = [(k, v.dtype, tuple(v.shape)) for k, v in t.items()]
    for mode in ("add", "blocks", "blocks-no-plan"):
        with ShardedWriter(str(tmp_path / mode), 1 << 20, plan=None if mode.endswith("no-plan") else plan) as w:
            if mode == "add":
                w.add("a", t["a"])
            else:
                w.add_blocks("a", torch.float32, (10, 3), [t["a"][:4], t["a"][4:9], t["a"][9:]])
            w.add("b", t["b"])
    ref = output_files(tmp_path / "add")
    assert output_files(tmp_path / "blocks") == ref == output_files(tmp_path / "blocks-no-plan")

    for blocks, msg in [([t["a"][:4]], "cover 4 of 10 rows"), ([t["a"], t["a"][:1]], r"after 10 rows does not fit"),
                        ([t["a"].double()], "does not fit")]:
        out = tmp_path / "bad"
        with pytest.raises(OutputError, match=msg):
            with ShardedWriter(str(out), 1 << 20, plan=plan) as w:
                w.add_blocks("a", torch.float32, (10, 3), iter(blocks))
        assert not out.exists() and not list(tmp_path.glob(".bad.partial-*"))


def test_dry_run_estimate_counts_blocks_where_they_are_used(tmp_path):
    fam = _odd_family(tmp_path / "fam", torch.float32)

    def workspace(method: str, runtime: str) -> int:
        spec = spec_from_dict({"base": str(fam["base"]), "output": str(tmp_path / "o"),
                               "experts": [{"name": f"e{i}", "model": str(fam[f"expert_{i}"])} for i in range(3)],
                               "method": {"name": method}, "runtime": {"name": runtime}})
        plan = build_plan(spec)
        return plan.largest_unit_bytes(), plan.largest_tensor_bytes()

    # the toy tensors are far below a block: every piece is a whole tensor
    unit, largest = workspace("ties", "local")
    assert unit == largest == 97 * 13 * 4
    from esm_ray.runtime import plan as plan_mod

    old = plan_mod.BLOCK_BYTES
    plan_mod.BLOCK_BYTES = 200
    try:
        assert workspace("ties", "local")[0] == 4 * 300  # one_row.weight: a single row is never split
        assert workspace("task_arithmetic", "ray")[0] == 4 * 300  # the Ray coordinator merges in blocks too
        assert workspace("tsvm", "local")[0] == 97 * 13 * 4  # not blockwise
    finally:
        plan_mod.BLOCK_BYTES = old


@pytest.mark.parametrize("numel,depth", [(1000, 2), (2 * (4 << 20), 1)])  # whole tensors
def test_stream_holds_a_bounded_number_of_parts_whatever_t(numel, depth):
    """The fuse reads parts in order; the thread makes them ahead, never more than `depth`."""
    import threading
    import time
    import weakref
    from concurrent.futures import ThreadPoolExecutor

    from esm_ray.runtime.pool import LazyParts

    alive, peak, made = set(), [0], []
    lock = threading.Lock()

    class Side:
        def __init__(self, i):
            self.i = i

        def prepare_with_base(self, info, base, rows, state):
            part = torch.full((4,), float(self.i))
            with lock:
                made.append(self.i)
                alive.add(self.i)
                peak[0] = max(peak[0], len(alive))
            weakref.finalize(part, lambda i=self.i: alive.discard(i))
            return part

    sides = [Side(i) for i in range(8)]
    with ThreadPoolExecutor(1) as ahead:
        lazy = LazyParts(sides, TensorInfo.of("w", (numel,)), torch.zeros(4), ahead)
        got = []
        for part in lazy.stream(list(range(8))):
            time.sleep(0.02)  # a slow fuse: the thread runs ahead as far as it may
            got.append(int(part[0]))
            del part
    assert got == list(range(8)) and sorted(made) == list(range(8))
    assert peak[0] <= depth + 1, f"{peak[0]} parts alive at once"
    assert peak[0] == depth + 1, "the thread did not work ahead"


def test_chained_row_blocks_run_ahead_into_the_next_block_within_the_same_bound():
    """Row blocks of one pass are chained: once a block's last parts are under way, the thread
    starts the next block's first ones (so it is busy while the fuse adds and writes a block),
    never holding more than AHEAD_BLOCK parts ahead; the parts still come in order, and one
    expert's blocks are made one after another, never two at once."""
    import threading
    import time
    import weakref
    from concurrent.futures import ThreadPoolExecutor

    from esm_ray.runtime.pool import AHEAD_BLOCK, LazyParts

    alive, peak, made, busy = set(), [0], [], set()
    lock = threading.Lock()

    class Side:
        def __init__(self, i):
            self.i = i

        def prepare_with_base(self, info, base, rows, state):
            with lock:
                assert self.i not in busy, f"expert {self.i}: two blocks made at once"
                busy.add(self.i)
            # a part made on the fuse's own thread is slow: it widens any window in which the
            # thread could start the same expert's next block meanwhile
            time.sleep(0.1 if threading.current_thread() is threading.main_thread() else 0.01)
            part = torch.full((4,), float(rows[0] * 10 + self.i))
            with lock:
                busy.discard(self.i)
                made.append((rows[0], self.i))
                alive.add((rows[0], self.i))
                peak[0] = max(peak[0], len(alive))
            weakref.finalize(part, lambda k=(rows[0], self.i): alive.discard(k))
            return part

    sides, t = [Side(i) for i in range(3)], 3
    states = [None] * t
    with ThreadPoolExecutor(1) as ahead:
        blocks = [LazyParts(sides, TensorInfo.of("w", (1, 4)), torch.zeros(4), ahead, (r, r + 1), states)
                  for r in range(3)]
        assert blocks[0].continues_to(blocks[1]) and not blocks[1].continues_to(blocks[0])
        blocks[0].follow(blocks[1])
        blocks[1].follow(blocks[2])
        got = []
        for lazy in blocks:
            for part in lazy.stream(list(range(t))):
                time.sleep(0.02)
                got.append(int(part[0]))
                del part
            if lazy is blocks[0]:  # the thread went on with block 1 while block 0 was fused
                assert all(j in blocks[1]._pending or j in blocks[1]._done for j in range(min(AHEAD_BLOCK - 1, t)))
    assert got == [r * 10 + i for r in range(3) for i in range(t)]
    assert sorted(made) == [(r, i) for r in range(3) for i in range(t)]
    for i in range(t):  # each expert's blocks in order (DELLA's and DARE's random streams)
        assert [r for r, j in made if j == i] == [0, 1, 2]
    assert peak[0] <= AHEAD_BLOCK + 1, f"{peak[0]} parts alive at once"


def test_an_abandoned_block_stream_cancels_what_it_started_of_the_next_block():
    from concurrent.futures import ThreadPoolExecutor

    from esm_ray.runtime.pool import LazyParts

    gate = threading_event = __import__("threading").Event()

    class Side:
        def __init__(self, i):
            self.i = i

        def prepare_with_base(self, info, base, rows, state):
            gate.wait(5)
            return torch.full((2,), float(self.i))

    sides = [Side(i) for i in range(2)]
    with ThreadPoolExecutor(1) as ahead:
        a = LazyParts(sides, TensorInfo.of("w", (1, 2)), torch.zeros(2), ahead, (0, 1), [None, None])
        b = LazyParts(sides, TensorInfo.of("w", (1, 2)), torch.zeros(2), ahead, (1, 2), [None, None])
        a.follow(b)
        it = a.stream([0, 1])
        next(it)  # part 0 made here; part 1 and b's first parts under way
        assert b._pending
        futures = list(b._pending.values())
        it.close()  # the fuse gave up on block a
        threading_event.set()
    assert not b._pending and all(f.cancelled() or f.done() for f in futures)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,params,weights", [
    ("slerp", {"t": 0.3}, (1.0,)),
    ("slerp-reread", {"t": 0.3}, (1.0,)),
    ("model_stock", {}, (1.0, 1.0, 1.0)),
    ("model_stock-reread", {}, (1.0, 1.0, 1.0)),
    ("model_stock", {"filter_wise": True}, (1.0, 1.0)),
    ("sce", {}, (1.0, 1.0, 1.0)),
    ("sce", {"select_topk": 0.3}, (1.0, 1.0, 1.0)),
    ("sce-reread", {"select_topk": 0.3}, (1.0, 1.0, 1.0)),
    ("sce", {"select_topk": 0.3, "select_ties": "topk"}, (1.0, 1.0, 1.0)),
    ("sce-reread", {"select_topk": 0.3, "select_ties": "topk"}, (1.0, 1.0, 1.0)),
    ("della", {"density": 0.5, "epsilon": 0.2}, (1.0, 0.5, 2.0)),
    ("della", {"density": 0.4, "rescale_mode": "inverse_probability"}, (1.0, 0.5, 2.0)),
    ("della_linear", {"density": 0.6, "rescale": False}, (1.0, 0.5, 2.0)),
])
def test_blocks_of_whole_tensor_statistics_give_the_bytes_of_whole_tensors(method, params, weights, dtype,
                                                                           tmp_path, monkeypatch):
    """Methods that need a statistic of the whole tensor (a norm, a cosine, a variance threshold,
    an L1 norm) get it from passes over the row blocks: the same bytes as whole tensors, with
    blocks of a few rows and with chunks of the statistics' grid that span blocks."""
    from esm_ray.core import chunks, slerp
    from esm_ray.methods import _common

    if method.endswith("-reread"):  # the blocks read again on every pass instead of kept
        method = method.removesuffix("-reread")
        monkeypatch.setattr(_common, "PASS_CACHE_BYTES", 0)
    monkeypatch.setattr(chunks, "CHUNK", 64)  # several chunks per tensor, cut across the blocks
    monkeypatch.setattr(slerp, "_SLERP_CHUNK", 64)
    fam = _odd_family(tmp_path / "fam", dtype)
    whole = _run(fam, tmp_path / "whole", method, params, block_bytes=1 << 30, weights=weights)
    seen = []
    real = MergeJob._merged_blocks
    monkeypatch.setattr(MergeJob, "_merged_blocks", lambda self, o, *a: (seen.append(o.info.name),
                                                                         real(self, o, *a))[1])
    blocks = _run(fam, tmp_path / "blocks", method, params, block_bytes=200, weights=weights)
    # model_stock per row and DELLA's per-row ranks: a 1-D tensor is one row, merged whole
    one_row = params.get("filter_wise") or method.startswith("della")
    assert sorted(seen) == ["cube.weight", "embed.weight", "odd.weight"] + ([] if one_row else ["vec.bias"])
    a, b = output_files(whole), output_files(blocks)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64, 1001])
@pytest.mark.parametrize("share", [0.0, 0.002, 0.3, 1.0])
def test_sparse_nonzero_is_torch_nonzero(n, share):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n + 3, generator=g) < share
    for m in (mask[:n], mask[3:]):  # a view at an offset that is not a multiple of 8 too
        assert torch.equal(sparse_nonzero(m), torch.nonzero(m).squeeze(1))


def test_local_states_read_the_base_once_for_all_experts(tmp_path, monkeypatch):
    """The local pool's block_states (TIES's thresholds) read each row block of the base once,
    not once per expert, and give the bytes of whole tensors (test above)."""
    from esm_ray.runtime import expert as expert_mod, pool as pool_mod

    reads: list[tuple[str, str | None]] = []
    for mod in (expert_mod, pool_mod):
        real = mod.read_to_float32
        monkeypatch.setattr(mod, "read_to_float32", lambda reader, name, source, slot=None, rows=None, _r=real:
                            (reads.append((source, slot, name, rows)), _r(reader, name, source, slot=slot, rows=rows))[1])
    fam = _odd_family(tmp_path / "fam", torch.bfloat16)
    _run(fam, tmp_path / "blocks", "ties", {"density": 0.3}, block_bytes=200)
    base_reads = [(n, r) for src, slot, n, r in reads if src == str(fam["base"]) and slot is None and r is not None]
    assert ("embed.weight" in {n for n, _ in base_reads}
            and len(base_reads) == len(set(base_reads)))  # each block of the base once
    assert not [r for r in reads if r[1] == "state-base"]  # no side read the base itself


def test_a_bad_tensor_found_by_early_states_fails_the_job_by_name(tmp_path, monkeypatch):
    """A NaN in a tensor whose TIES thresholds are found early (while an earlier tensor is
    merged, LocalPool.expect_blocks) fails the job with the input error naming that tensor,
    and leaves no output."""
    import threading

    from esm_ray.errors import InputError
    from esm_ray.runtime.expert import ExpertSide

    fam = _odd_family(tmp_path / "fam", torch.float32)
    r = open_model(str(fam["expert_1"]))
    sd = {k: r.get(k).clone() for k in r.keys()}
    sd["vec.bias"][500] = float("nan")  # the last tensor merged in blocks
    save_file(sd, str(fam["expert_1"] / "model.safetensors"))
    threads = []
    real = ExpertSide.block_state
    monkeypatch.setattr(ExpertSide, "block_state", lambda self, info, *a: (
        threads.append((info.name, threading.current_thread().name)), real(self, info, *a))[1])
    with pytest.raises(InputError, match=r"vec\.bias.*1 NaN"):
        _run(fam, tmp_path / "out", "ties", {"density": 0.3}, block_bytes=200)
    assert {n for name, n in threads if name == "vec.bias"} and all(
        n.startswith("esm-ray-state") for name, n in threads if name == "vec.bias")  # found early
    assert not list(tmp_path.glob("out/*.safetensors"))


def _fuse_state_threads(monkeypatch, method: str) -> list[tuple[str, str]]:
    """(tensor, thread name) of every fuse_state of `method`, as they are made."""
    import threading

    kind = type(build_method(method, {}, n_experts=3))
    seen: list[tuple[str, str]] = []
    real = kind.fuse_state
    monkeypatch.setattr(kind, "fuse_state", lambda self, info, *a: (
        seen.append((info.name, threading.current_thread().name)), real(self, info, *a))[1])
    return seen


@pytest.mark.parametrize("method", ["model_stock", "sce"])
def test_the_next_tensors_fuse_state_is_made_early_with_the_same_bytes(method, tmp_path, monkeypatch):
    """The local executor makes the next blocked tensor's fuse_state (model_stock's cosines,
    SCE's variance) on a thread of its own while this tensor's blocks are merged
    (runtime.early): every blocked tensor but the first gets it there, and the output is byte
    for byte the one made with every state made in place (and the whole tensors'; test above)."""
    fam = _odd_family(tmp_path / "fam", torch.bfloat16)
    monkeypatch.setattr(LocalPool, "early_states", False)
    in_place = _run(fam, tmp_path / "in_place", method, {}, block_bytes=200, weights=(1.0, 1.0, 1.0))
    monkeypatch.setattr(LocalPool, "early_states", True)
    seen = _fuse_state_threads(monkeypatch, method)
    early = _run(fam, tmp_path / "early", method, {}, block_bytes=200, weights=(1.0, 1.0, 1.0))
    assert sorted(n for n, _ in seen) == ["cube.weight", "embed.weight", "odd.weight", "vec.bias"]  # once each
    assert seen[0][1] == "MainThread" and all(t.startswith("esm-ray-fuse-state") for _, t in seen[1:])
    a, b = output_files(in_place), output_files(early)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_a_bad_tensor_found_by_an_early_fuse_state_fails_the_job_by_name(tmp_path, monkeypatch):
    """A NaN in the last blocked tensor, whose model_stock cosines are computed early while an
    earlier tensor is merged, fails the job with the input error naming it and leaves no
    output; the early thread is finished when the job returns."""
    import threading

    from esm_ray.errors import InputError

    fam = _odd_family(tmp_path / "fam", torch.float32)
    r = open_model(str(fam["expert_2"]))
    sd = {k: r.get(k).clone() for k in r.keys()}
    sd["vec.bias"][500] = float("nan")  # the last tensor merged in blocks
    save_file(sd, str(fam["expert_2"] / "model.safetensors"))
    seen = _fuse_state_threads(monkeypatch, "model_stock")
    with pytest.raises(InputError, match=r"vec\.bias.*1 NaN"):
        _run(fam, tmp_path / "out", "model_stock", {}, block_bytes=200, weights=(1.0, 1.0, 1.0))
    assert ("vec.bias" in {n for n, _ in seen}
            and all(t.startswith("esm-ray-fuse-state") for n, t in seen if n == "vec.bias"))
    assert not list(tmp_path.glob("out/*.safetensors"))
    assert not [t for t in threading.enumerate() if t.name.startswith("esm-ray-fuse-state")]


def test_slerp_reads_each_block_of_a_small_tensor_once(tmp_path, monkeypatch):
    """slerp's expert side keeps a small tensor's (base, expert) blocks from its coefficient
    passes (methods._common.pair_blocks) and interpolates the merge's blocks from them: each row
    block of the expert is read once, not three times (two passes, then the merge)."""
    from esm_ray.runtime import expert as expert_mod

    reads: list[tuple[str, tuple[int, int] | None]] = []
    real = expert_mod.read_to_float32
    monkeypatch.setattr(expert_mod, "read_to_float32", lambda reader, name, source, slot=None, rows=None:
                        (reads.append((source, name, rows)), real(reader, name, source, slot=slot, rows=rows))[1])
    fam = _odd_family(tmp_path / "fam", torch.bfloat16)
    _run(fam, tmp_path / "out", "slerp", {"t": 0.3}, block_bytes=200, weights=(1.0,))
    mine = [(n, r) for src, n, r in reads if src == str(fam["expert_0"]) and r is not None]
    assert ("embed.weight" in {n for n, _ in mine}) and len(mine) == len(set(mine))


@pytest.mark.parametrize("keep", [True, False])
def test_slerp_coordinator_reads_no_base_rows_and_writes_the_slerped_rows(tmp_path, monkeypatch, keep):
    """slerp's merged rows come whole from the expert side (`fuse_gives_weights`,
    `fuse_block_base` False): the coordinator reads none of the base's row blocks, and the
    output equals the whole-tensor merge bit for bit, whether the expert side kept its blocks
    from the coefficient passes or (PASS_CACHE_BYTES 0) reads the base rows itself."""
    from esm_ray.methods import _common
    from esm_ray.runtime import job as job_mod

    if not keep:
        monkeypatch.setattr(_common, "PASS_CACHE_BYTES", 0)
    reads: list[tuple[str, tuple[int, int] | None]] = []
    real = job_mod.read_to_float32
    monkeypatch.setattr(job_mod, "read_to_float32", lambda reader, name, source, slot=None, rows=None:
                        (reads.append((name, rows)), real(reader, name, source, slot=slot, rows=rows))[1])
    fam = _odd_family(tmp_path / "fam", torch.bfloat16)
    blocked = _run(fam, tmp_path / "blocks", "slerp", {"t": 0.3}, block_bytes=200, weights=(1.0,))
    assert reads and not [r for r in reads if r[1] is not None]  # whole small tensors only
    whole = _run(fam, tmp_path / "whole", "slerp", {"t": 0.3}, block_bytes=1 << 30, weights=(1.0,))
    a, b = output_files(whole), output_files(blocked)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
