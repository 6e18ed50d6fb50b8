"""Faults on the Ray path: an expert worker killed in the last layer group, the driver killed
when the output is being staged or committed. Each ends with the right output (the local
executor's bytes) or with the old output / none, never a half-finished one.

Runs against the session's real Ray head (tests/fixtures/ray.py); the kill helpers are those of
tests/integration/test_ray_runtime.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from esm_ray.io.writer import INDEX_NAME
from esm_ray.methods import TensorInfo
from esm_ray.runtime import run_merge
from esm_ray.runtime.layout import layer_groups as _groups
from esm_ray.runtime.plan import build_plan
from esm_ray.runtime.ray_executor import NAMESPACE, TEST_SLOW_ENV
from esm_ray.spec import spec_from_dict
from tests.builders import merge_spec, output_files
from tests.integration.test_ray_runtime import _coordinator, _existing, _named, _start_job

METHOD = "ties"


def _local(tiny_llama, out: Path, method: str = METHOD) -> dict[str, bytes]:
    """The local executor's output (and its files) for the same job."""
    run_merge(spec_from_dict(merge_spec(tiny_llama, out, method)), progress=False)
    return output_files(out)


def _groups_of(spec) -> int:
    plan = build_plan(spec, check_output=False)
    infos = [TensorInfo.of(n, plan.shapes[n], None) for n in plan.names]
    return len(list(_groups(infos, 64 << 20)))  # MergeJob's default group size


def _staged(root: Path, out: Path) -> list[Path]:
    return sorted(root.glob(f".{out.name}.esm-ray-resume-*/group-*.safetensors"))


def _complete_or_absent(out: Path, want: dict[str, bytes], old: dict[str, bytes] | None = None) -> str:
    """'absent', 'old' or 'new'; fails on anything half-finished."""
    if not out.exists():
        return "absent"
    got = output_files(out)
    if old is not None and got == old:
        return "old"
    index = json.loads((out / INDEX_NAME).read_text())
    missing = sorted({f for f in index["weight_map"].values() if not (out / f).is_file()})
    assert not missing, f"the output's index names shards that are not there: {missing}"
    assert got == want, "the output is complete but not the merge's bytes"
    return "new"


def _wait_gone(pids: list[int], timeout: float = 90.0) -> None:
    t0 = time.monotonic()
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() - t0 < timeout, f"processes {pids} outlived their driver"
        time.sleep(0.2)


def test_worker_killed_in_the_last_layer_group(ray_driver, tiny_llama, tmp_path, monkeypatch):
    """SIGKILL an expert worker while the job works on its last layer group, over an old output
    with overwrite: the job ends with the local bytes, or fails and leaves the old output."""
    import ray

    want = _local(tiny_llama, tmp_path / "ref")
    out = tmp_path / "out"
    old = _local(tiny_llama, out, method="linear")  # the output a previous job left
    assert old != want
    spec = spec_from_dict(merge_spec(tiny_llama, out, METHOD, runtime={"name": "ray"}, overwrite=True))
    last = _groups_of(spec) - 1
    assert last >= 1
    monkeypatch.setenv(TEST_SLOW_ENV, "1.0")  # each worker sleeps in every prepare call
    before = _existing()
    th, box = _start_job(spec)
    job, _ = _coordinator(before, th)
    worker = ray.get_actor(job.replace("-coordinator", "-expert-1"), namespace=NAMESPACE)
    pid = ray.get(worker.ping.remote(), timeout=120)["pid"]
    t0 = time.monotonic()
    while len(_staged(tmp_path, out)) < last:
        assert th.is_alive() and time.monotonic() - t0 < 240, f"the job ended early: {box}"
        time.sleep(0.05)
    assert th.is_alive(), "the job finished before the kill"
    os.kill(pid, signal.SIGKILL)
    th.join(timeout=300)
    assert not th.is_alive(), "the job did not end"
    _wait_gone([pid])
    state = _complete_or_absent(out, want, old)
    if "error" in box:
        assert state == "old", f"a failed job replaced the old output ({state}): {box['error']!r}"
    else:
        assert state == "new", "the job reported success but the output is not the new one"
    assert not [p for p in tmp_path.glob(".out.partial-*") if (p / INDEX_NAME).exists()]


def _start_driver(ray_driver, spec_file: Path, slow_s: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "esm_ray.cli", "merge", str(spec_file), "--runtime", "ray",
           "--address", ray_driver.gcs_address, "--no-progress"]
    return subprocess.Popen(cmd, env=ray_driver.client_env(**{TEST_SLOW_ENV: slow_s}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["staging", "commit"])
def test_driver_killed_while_the_output_is_written(ray_driver, tiny_llama, tmp_path, when):
    """SIGKILL the `esm-ray merge --runtime ray` process while its coordinator writes the output:
    as soon as the staging directory appears (shards being written), or inside the commit. For
    the commit a FIFO waits where the index goes (a filesystem that hangs), so the coordinator is
    held in the commit, after the shards are final and before the index exists, when its driver
    dies. The coordinator and workers die with their driver; the output path then holds nothing
    (a complete output would also do), and a rerun ends with the local executor's bytes and no
    staging left behind."""
    want = _local(tiny_llama, tmp_path / "ref")
    out = tmp_path / "out"
    raw = merge_spec(tiny_llama, out, METHOD, overwrite=True)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(raw))
    before = _existing()
    first = _start_driver(ray_driver, spec_file, "0.5")
    coordinator, fifo, t0 = None, None, time.monotonic()
    try:
        while True:
            assert first.poll() is None, f"the merge ended before the kill:\n{first.stdout.read()[-3000:]}"
            assert time.monotonic() - t0 < 240, "the merge never reached the point to kill it"
            if coordinator is None and _named("-coordinator", before):
                coordinator = _pid_of(_named("-coordinator", before))
            staging = list(tmp_path.glob(".out.partial-*"))
            if staging and when == "staging":
                break
            if staging and fifo is None:
                fifo = staging[0] / INDEX_NAME
                os.mkfifo(fifo)
            if fifo is not None and (fifo.parent / "merge_report.json").exists():
                time.sleep(1.0)  # the commit is now waiting on the FIFO
                assert first.poll() is None and not out.exists()
                break
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=60)
    assert coordinator is not None, "the job's coordinator was never seen"
    _wait_gone([coordinator])  # the coordinator (the writer) dies with its driver
    assert _complete_or_absent(out, want) == "absent"
    result = run_merge(spec_from_dict(dict(raw, runtime=dict(raw["runtime"], name="ray"))), progress=False)
    assert result.report["executor"] == "ray"
    if when == "commit":  # every group was staged before the commit: none is computed again
        assert result.report["resume"]["restored"] == result.report["resume"]["groups"]
    assert output_files(out) == want
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert not left, f"staging left behind after the rerun: {left}"


def _pid_of(coordinator: str) -> int:
    """The process of a job's coordinator (it answers while the job runs: max_concurrency=2)."""
    import ray

    return ray.get(ray.get_actor(coordinator, namespace=NAMESPACE).pid.remote(), timeout=60)
