"""The Ray executor: the same output bytes as the local executor, restarts, resume, placement.

Runs against the session's real Ray head (tests/fixtures/ray.py). Every comparison is between
all output files (shards, index, config, artifacts) except merge_report.json, whose timings and
executor name differ by design.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.builders import calibration_files, import_methods, merge_spec, output_files

import_methods()

from esm_ray.errors import InputError  # noqa: E402
from esm_ray.methods import METHODS, PURIFIERS, TensorInfo  # noqa: E402
from esm_ray.runtime import run_merge  # noqa: E402
from esm_ray.runtime.job import MergeJob  # noqa: E402
from esm_ray.runtime.layout import linear_module as _module  # noqa: E402
from esm_ray.runtime.plan import build_plan  # noqa: E402
from esm_ray.runtime.pool import LocalPool  # noqa: E402
from esm_ray.runtime.ray_executor import (  # noqa: E402
    NAMESPACE, TEST_SLOW_ENV, ExpertWorker, shortfall, worker_options)
from esm_ray.spec import RuntimeSpec, spec_from_dict  # noqa: E402

slow = pytest.mark.slow
CASES = sorted(METHODS) + (["ties+pave"] if "pave" in PURIFIERS else [])
# Ray runs cost ~10-30 s each on a 2-core box. By default the equality test runs the purifier
# path (calibration, pre-pass, per-expert plans) and the worker-kill test the subspace path
# (calibration, spill and layer scaling); every other method is in the slow set.
DEFAULT_RAY = {"ties+pave"}
# Local resume runs are cheap; by default: plain, spill (esm), purifier, post stage (sim).
DEFAULT_RESUME = {"ties", "esm", "ties+pave", "sim"}


def _case(case: str) -> tuple[str, str | None]:
    method, _, purify = case.partition("+")
    return method, purify or None


@pytest.fixture(scope="session")
def data(tiny_llama, tmp_path_factory) -> list[Path]:
    return calibration_files(tmp_path_factory.mktemp("calib"), 3, vocab=80)


@pytest.fixture(scope="session")
def local_output(tiny_llama, data, tmp_path_factory):
    """The local executor's output for a case, computed once per session."""
    done: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("local_ref")

    def get(case: str) -> Path:
        if case not in done:
            method, purify = _case(case)
            out = root / case
            spec = spec_from_dict(merge_spec(tiny_llama, out, method, purify=purify, data=data,
                                             cache_dir=root / f"cache-{case}"))
            try:
                run_merge(spec, progress=False)
            except Exception as err:  # another module's method that does not run yet
                pytest.skip(f"{case} does not run on the local executor: {type(err).__name__}: {err}")
            done[case] = out
        return done[case]

    return get


def _spec(tiny_llama, data, out: Path, case: str, cache: Path, **runtime):
    method, purify = _case(case)
    return spec_from_dict(merge_spec(tiny_llama, out, method, purify=purify, data=data, cache_dir=cache,
                                     runtime=runtime or None))


# ---- placement ------------------------------------------------------------------------------

def test_worker_options_gpu_default_and_pass_through():
    rt = RuntimeSpec(name="ray")
    assert worker_options(rt, {"CPU": 64, "GPU": 8})["num_gpus"] == 1
    assert worker_options(rt, {"CPU": 64})["num_gpus"] == 0
    rt = RuntimeSpec(name="ray", num_cpus_per_worker=2.5, num_gpus_per_worker=0.5, max_restarts=3,
                     resources_per_worker={"accelerator_type:A100": 0.001, "nvme": 1})
    opts = worker_options(rt, {"CPU": 64, "GPU": 8})
    assert opts["num_cpus"] == 2.5 and opts["num_gpus"] == 0.5
    assert opts["resources"] == {"accelerator_type:A100": 0.001, "nvme": 1}
    assert opts["max_restarts"] == 3 and opts["max_task_retries"] == 3
    assert worker_options(RuntimeSpec(name="ray", num_gpus_per_worker=0), {"GPU": 8})["num_gpus"] == 0


def test_shortfall_names_the_missing_resource():
    opts = worker_options(RuntimeSpec(name="ray", resources_per_worker={"fake_gpu": 0.5}), {"CPU": 4})
    assert shortfall(opts, 4, {"CPU": 4, "fake_gpu": 2}) == []
    short = shortfall(opts, 5, {"CPU": 8, "fake_gpu": 2})
    assert len(short) == 1 and short[0].startswith("fake_gpu: 2.5 needed")
    gpu = worker_options(RuntimeSpec(name="ray", num_gpus_per_worker=1), {"CPU": 4})
    assert any(s.startswith("GPU") for s in shortfall(gpu, 2, {"CPU": 4}))


def test_fractional_custom_resources_are_scheduled(ray_driver):
    """Options from worker_options really place actors: 0.75 fake_gpu each, 2 available -> 2 fit."""
    import ray

    opts = worker_options(RuntimeSpec(name="ray", num_cpus_per_worker=0.1, num_gpus_per_worker=0,
                                      resources_per_worker={"fake_gpu": 0.75}), ray.cluster_resources())
    assert opts["num_gpus"] == 0  # the session cluster has no GPU

    @ray.remote
    class Probe:
        def assigned(self):
            return ray.get_runtime_context().get_assigned_resources()

    actors = [Probe.options(**opts).remote() for _ in range(3)]
    try:
        refs = [a.assigned.remote() for a in actors]
        ready, pending = ray.wait(refs, num_returns=2, timeout=120)
        assert len(ready) == 2, "two actors with 0.75 fake_gpu each should fit in 2"
        late, _ = ray.wait(pending, num_returns=1, timeout=3)
        assert not late, "a third actor was placed although 3 x 0.75 > 2 fake_gpu"
        for r in ready:
            assert ray.get(r)["fake_gpu"] == pytest.approx(0.75)
        assert shortfall(opts, 3, ray.cluster_resources())
    finally:
        for a in actors:
            ray.kill(a)


# ---- the worker replays its state after a restart -------------------------------------------

def test_restarted_worker_replays_state_calls(ray_driver, tiny_llama, data, tmp_path):
    """A fresh ExpertWorker given the pool's journal gets calibration and purifier plan back."""
    import ray

    if "pave" not in PURIFIERS:
        pytest.skip("needs the pave purifier")
    spec = _spec(tiny_llama, data, tmp_path / "o", "ties+pave", tmp_path / "cache")
    plan = build_plan(spec)
    first = ExpertWorker(spec, 1, threads=1)
    mods = first.call("calibrate", "pool-a", [], ())
    assert mods, "calibration found no linear layers"
    job_infos = [TensorInfo.of(n, plan.shapes[n], _module(n, set(mods))) for n in plan.names]
    targets = [i for i in job_infos if plan.purifier.applies(i)]
    summaries = first.call("prepass", "pool-a", [("calibrate", ray.put(()))], (targets,))
    side_plan = plan.purifier.plan({i.name: [s] * 3 for i, s in zip(targets, summaries)},
                                   {i.name: i for i in job_infos})[1]
    first.call("set_plan", "pool-a", [("calibrate", ray.put(()))], (side_plan,))
    journal = [("calibrate", ray.put(())), ("set_plan", ray.put((side_plan,)))]
    want = first.call("prepare", "pool-a", journal, (targets[:2],))

    restarted = ExpertWorker(spec, 1, threads=1)  # what Ray builds after the process died
    got = restarted.call("prepare", "pool-a", journal, (targets[:2],))
    assert restarted._applied == 2
    assert _same_parts(got, want)
    bare = ExpertWorker(spec, 1, threads=1)  # the same restart without the journal
    try:
        stateless = bare.call("prepare", "pool-b", [], (targets[:2],))
    except Exception:
        return  # no statistics: the purifier refuses
    assert not _same_parts(stateless, want), "the journal made no difference; the test proves nothing"


def _same_parts(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_parts(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_parts(a[k], b[k]) for k in a)
    if hasattr(a, "__dict__"):
        return type(a) is type(b) and _same_parts(vars(a), vars(b))
    return a == b


# ---- bit-for-bit equality with the local executor -------------------------------------------

@pytest.mark.parametrize("case", [c if c in DEFAULT_RAY else pytest.param(c, marks=slow) for c in CASES])
def test_ray_output_equals_local_bytes(case, ray_driver, tiny_llama, data, local_output, tmp_path):
    ref = local_output(case)
    out = tmp_path / "ray"
    result = run_merge(_spec(tiny_llama, data, out, case, tmp_path / "cache", name="ray"), progress=False)
    assert result.report["executor"] == "ray"
    assert result.report["resume"] == {"groups": result.report["resume"]["groups"], "restored": 0}
    got, want = output_files(out), output_files(ref)
    assert got.keys() == want.keys()
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"files differ between the ray and local executors: {_diff(out, ref, differ)}"
    assert not list(tmp_path.glob(".ray.esm-ray-resume-*")), "resume staging left behind"


def _diff(a: Path, b: Path, files: list[str]) -> list[str]:
    """Which tensors of differing safetensors files differ, and by how much."""
    import torch
    from safetensors.torch import load_file

    out = []
    for f in files:
        if not f.endswith(".safetensors"):
            out.append(f)
            continue
        x, y = load_file(str(a / f)), load_file(str(b / f))
        out += [f"{f}:{k} max|d|={(x[k].float() - y[k].float()).abs().max().item():.3g}"
                for k in x if k in y and not torch.equal(x[k], y[k])]
    return out


# ---- resume (local executor, every method): a failed job picks up its staged groups ---------

class _Pool(LocalPool):
    """A local pool that counts the tensors it prepares and fails once `fail_when()` is true.

    The local executor asks for parts either per group (`call("prepare", infos)`) or per tensor
    (`parts(info, base)`); both are counted.
    """

    def __init__(self, spec, fail_when=None) -> None:
        super().__init__(spec)
        self.prepared = 0
        self.fail_when = fail_when

    def _count(self, n: int) -> None:
        if self.fail_when is not None and self.fail_when():
            raise RuntimeError("injected failure")
        self.prepared += n

    def call(self, method, *args):
        if method == "prepare":
            self._count(len(args[0]))
        return super().call(method, *args)

    def parts(self, info, base):
        self._count(1)
        return super().parts(info, base)


def _run(spec, resume: bool, fail_when=None):
    pool = _Pool(spec, fail_when)
    try:
        return MergeJob(build_plan(spec), pool, progress=False, resume=resume).run(), pool.prepared
    finally:
        pool.close()


def _tensors_in(files: list[Path]) -> int:
    from safetensors import safe_open

    n = 0
    for f in files:
        with safe_open(str(f), "pt") as h:
            n += len(list(h.keys()))
    return n


@pytest.mark.parametrize("case", [c if c in DEFAULT_RESUME else pytest.param(c, marks=slow) for c in CASES])
def test_resume_after_failure_gives_same_bytes(case, tiny_llama, data, tmp_path):
    clean, n_clean = _run(_spec(tiny_llama, data, tmp_path / "clean", case, tmp_path / "cache"), resume=False)
    out = tmp_path / "out"
    spec = _spec(tiny_llama, data, out, case, tmp_path / "cache")
    staged = lambda: sorted(tmp_path.glob(".out.esm-ray-resume-*/group-*.safetensors"))  # noqa: E731
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(spec, resume=True, fail_when=lambda: len(staged()) >= 2)
    assert not out.exists(), "a failed job must not leave an output"
    assert not list(tmp_path.glob(".out.partial-*")), "the writer's staging was not cleaned up"
    assert len(staged()) == 2
    skipped = _tensors_in(staged())

    result, n_resumed = _run(spec, resume=True)
    groups = result.report["resume"]["groups"]
    assert result.report["resume"]["restored"] == 2 and groups > 2
    assert n_resumed == n_clean - skipped, "restored groups were computed again"
    assert output_files(out) == output_files(tmp_path / "clean")
    assert not list(tmp_path.glob(".out.esm-ray-resume-*")), "staging is removed once the output is committed"


def test_layer_scaling_writes_rows_and_keeps_nothing_it_wrote(tiny_llama, data, tmp_path, monkeypatch):
    """ESM's layer-scaling pass writes a large tensor a row block at a time (the same bytes as
    whole), and with resume on it holds none of the tensors it wrote (they are not staged: a
    resumed job scales the staged updates again)."""
    from esm_ray.runtime import job as job_mod
    from esm_ray.runtime import sinks

    _run(_spec(tiny_llama, data, tmp_path / "whole", "esm", tmp_path / "cache"), resume=False)
    monkeypatch.setattr(job_mod, "BLOCK_BYTES", 256)  # every tiny matrix counts as large
    held, by_rows = [], []
    add_final, add_blocks = sinks.OutputSink.add_final, sinks.OutputSink.add_blocks

    def spy_final(self, out, value):
        add_final(self, out, value)
        held.append(len(self._group))

    def spy_blocks(self, out, blocks):
        by_rows.append(out.info.name)
        add_blocks(self, out, blocks)

    monkeypatch.setattr(sinks.OutputSink, "add_final", spy_final)
    monkeypatch.setattr(sinks.OutputSink, "add_blocks", spy_blocks)
    _run(_spec(tiny_llama, data, tmp_path / "rows", "esm", tmp_path / "cache"), resume=True)
    assert by_rows and held and max(held) == 0
    assert output_files(tmp_path / "rows") == output_files(tmp_path / "whole")


def test_resume_ignores_groups_of_another_job(tiny_llama, data, tmp_path):
    """A changed spec gets a different job key: nothing is reused."""
    out = tmp_path / "out"
    spec = _spec(tiny_llama, data, out, "ties", tmp_path / "cache")
    with pytest.raises(RuntimeError):
        _run(spec, resume=True, fail_when=lambda: bool(list(tmp_path.glob(".out.esm-ray-resume-*/group-*"))))
    raw = merge_spec(tiny_llama, out, "ties", data=data)
    raw["method"]["params"] = {"density": 0.5}
    result, prepared = _run(spec_from_dict(raw), resume=True)
    assert result.report["resume"]["restored"] == 0
    assert prepared == result.report["tensors"]  # every tensor computed again (all are floating point)


# ---- faults on Ray ----------------------------------------------------------------------------

def _named(suffix: str, exclude: set[str]) -> str | None:
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == NAMESPACE and a["name"].endswith(suffix) and a["name"] not in exclude:
            return a["name"]
    return None


def _existing() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}


def _start_job(spec) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["result"] = run_merge(spec, progress=False)
        except BaseException as err:  # reported by the test
            box["error"] = err

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, box


def _coordinator(before: set[str], th: threading.Thread, timeout: float = 240.0):
    import ray

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and th.is_alive():
        name = _named("-coordinator", before)
        if name:
            return name, ray.get_actor(name, namespace=NAMESPACE)
        time.sleep(0.2)
    raise AssertionError("the job's coordinator never appeared")


def _wait_progress(coord, th, groups_done: int, store_glob: Path, timeout: float = 240.0) -> dict:
    """Wait until the job has staged `groups_done` groups; return the coordinator's progress."""
    import ray

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and th.is_alive():
        staged = [p for d in store_glob.parent.glob(store_glob.name) for p in d.glob("group-*.safetensors")]
        if len(staged) >= groups_done:
            return ray.get(coord.progress.remote(), timeout=30)
        time.sleep(0.1)
    raise AssertionError("the job did not reach the point to interrupt it")


def test_killed_worker_is_restarted_and_output_is_unchanged(ray_driver, tiny_llama, data, local_output,
                                                            tmp_path, monkeypatch):
    """SIGKILL an expert worker's process mid-merge: Ray restarts it, the pool replays its
    calibration, the call is retried, and the bytes match the local run."""
    import ray

    case = "esm"
    ref = local_output(case)
    monkeypatch.setenv(TEST_SLOW_ENV, "1.0")
    out = tmp_path / "ray"
    before = _existing()
    th, box = _start_job(_spec(tiny_llama, data, out, case, tmp_path / "cache", name="ray"))
    job, coord = _coordinator(before, th)
    state = _wait_progress(coord, th, 1, tmp_path / ".ray.esm-ray-resume-*")
    assert state["done"] < state["total"]
    worker = ray.get_actor(job.replace("-coordinator", "-expert-1"), namespace=NAMESPACE)
    pid = ray.get(worker.ping.remote(), timeout=60)["pid"]
    os.kill(pid, signal.SIGKILL)
    th.join(timeout=300)
    assert not th.is_alive(), "job did not finish"
    assert "error" not in box, f"job failed after a worker restart: {box.get('error')!r}"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert output_files(out) == output_files(ref)


@slow
def test_killed_coordinator_restarts_and_resumes(ray_driver, tiny_llama, data, local_output, tmp_path,
                                                 monkeypatch):
    import ray

    ref = local_output("esm")
    monkeypatch.setenv(TEST_SLOW_ENV, "1.0")
    out = tmp_path / "ray"
    before = _existing()
    th, box = _start_job(_spec(tiny_llama, data, out, "esm", tmp_path / "cache", name="ray"))
    _, coord = _coordinator(before, th)
    _wait_progress(coord, th, 1, tmp_path / ".ray.esm-ray-resume-*")
    pid = ray.get(coord.pid.remote(), timeout=30)
    os.kill(pid, signal.SIGKILL)
    th.join(timeout=300)
    assert "error" not in box, f"job failed after a coordinator restart: {box.get('error')!r}"
    assert box["result"].report["resume"]["restored"] >= 1
    assert output_files(out) == output_files(ref)
    for partial in tmp_path.glob(".ray.partial-*"):  # what the killed coordinator was writing
        assert not (partial / "model.safetensors.index.json").exists()


@slow
def test_killed_driver_then_resubmitted_resumes(ray_driver, tiny_llama, data, local_output, tmp_path):
    """Kill the driver process (its coordinator and workers die with it), run again: the second
    run restores the staged groups and writes the same bytes."""
    ref = local_output("ties")
    out = tmp_path / "ray"
    spec_file = tmp_path / "spec.json"
    import json

    spec_file.write_text(json.dumps(merge_spec(tiny_llama, out, "ties", data=data, cache_dir=tmp_path / "c",
                                               runtime={"name": "ray"})))
    cmd = [sys.executable, "-m", "esm_ray.cli", "merge", str(spec_file), "--address", ray_driver.gcs_address,
           "--no-progress"]
    first = subprocess.Popen(cmd, env=ray_driver.client_env(**{TEST_SLOW_ENV: "1.5"}), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    while not list(tmp_path.glob(".ray.esm-ray-resume-*/group-*.safetensors")):
        assert first.poll() is None, f"first run ended early:\n{first.stdout.read()}"
        assert time.monotonic() - t0 < 240
        time.sleep(0.1)
    first.kill()
    first.communicate(timeout=60)
    assert not (out / "model.safetensors.index.json").exists(), "a killed job looks finished"
    time.sleep(2)  # let the cluster reap the dead driver's actors
    second = subprocess.run(cmd, env=ray_driver.client_env(), capture_output=True, text=True, timeout=400)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    import re

    m = re.search(r"resuming: (\d+) of (\d+) groups already done", log)
    assert m and int(m.group(1)) >= 1, log[-4000:]
    assert output_files(out) == output_files(ref)


# ---- unreadable inputs fail early with the expert named ---------------------------------------

def test_unreadable_expert_fails_before_ray_starts(tiny_llama, data, tmp_path):
    bad = tmp_path / "broken_expert"
    shutil.copytree(tiny_llama["expert_1"], bad)
    (bad / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    fam = dict(tiny_llama, expert_1=bad)
    spec = spec_from_dict(merge_spec(fam, tmp_path / "out", "ties", runtime={"name": "ray", "address": "auto"}))
    t0 = time.monotonic()
    with pytest.raises(InputError, match="broken_expert"):
        run_merge(spec, progress=False)
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "out").exists()


@slow
def test_expert_broken_after_planning_fails_the_ray_job_with_its_name(ray_driver, tiny_llama, data, tmp_path):
    from esm_ray.runtime.ray_executor import run_on_ray

    bad = tmp_path / "late_broken"
    shutil.copytree(tiny_llama["expert_2"], bad)
    fam = dict(tiny_llama, expert_2=bad)
    spec = spec_from_dict(merge_spec(fam, tmp_path / "out", "ties", runtime={"name": "ray"}))
    plan = build_plan(spec)
    blob = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated after validation
    with pytest.raises(InputError, match="e2"):
        run_on_ray(plan, progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))
