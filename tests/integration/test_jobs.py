"""Ray Jobs: `esm-ray submit` (SDK) and `ray job submit` (CLI) run jobs.merge on the session's
real head node and write the same bytes as the local executor; `esm-ray merge --runtime ray`
starts and stops a private Ray of its own.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.builders import merge_spec, output_files

from esm_ray.errors import SpecError  # noqa: E402
from esm_ray.runtime import run_merge  # noqa: E402
from esm_ray.runtime.cli import auth_headers, entrypoint  # noqa: E402
from esm_ray.spec import load_spec, spec_from_dict  # noqa: E402

import jobs.merge as job_merge  # noqa: E402

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ties(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jobs_ref") / "ties"
    run_merge(spec_from_dict(merge_spec(tiny_llama, out, "ties")), progress=False)
    return out


def _working_dir(tiny_llama, root: Path, output: Path) -> Path:
    """A job directory: models, and a spec with paths relative to it (output absolute)."""
    wd = root / "wd"
    for k, p in tiny_llama.items():
        shutil.copytree(p, wd / "models" / k)
    spec = merge_spec({k: Path("models") / k for k in tiny_llama}, output, "ties")
    spec["runtime"] = {"name": "ray", "num_cpus_per_worker": 0.5}
    (wd / "spec.yaml").write_text(yaml.safe_dump(spec))
    return wd


# ---- no cluster needed ----------------------------------------------------------------------

def test_entrypoint_passes_spec_by_path_inside_working_dir(tiny_llama, tmp_path):
    wd = _working_dir(tiny_llama, tmp_path, tmp_path / "out")
    cmd = shlex.split(entrypoint(str(wd / "spec.yaml"), str(wd)))
    assert cmd[:3] == ["python", "-m", "jobs.merge"] and cmd[3:] == ["--spec", "spec.yaml"]


def test_entrypoint_sends_other_specs_as_json(tiny_llama, tmp_path):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(merge_spec(tiny_llama, tmp_path / "out", "ties")))
    cmd = shlex.split(entrypoint(str(spec_file), None, output=str(tmp_path / "o2"), overwrite=True))
    assert cmd[3] == "--spec-json" and cmd[-3:] == ["--output", str(tmp_path / "o2"), "--overwrite"]
    spec = job_merge.load(job_merge.build_parser().parse_args(cmd[3:]))
    assert spec.runtime.name == "ray" and spec.runtime.address == "auto"
    assert spec.output == str(tmp_path / "o2") and spec.overwrite
    assert spec.base == load_spec(spec_file).base and len(spec.experts) == 3


def test_entrypoint_rejects_an_invalid_spec_before_submitting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: x\nexperts: []\nmethod: {name: ties}\noutput: y\nbogus: 1\n")
    with pytest.raises(SpecError, match="bogus"):
        entrypoint(str(bad), None)


def test_token_file_becomes_a_bearer_header(tmp_path):
    assert auth_headers(None) == {}
    tok = tmp_path / "auth_token"
    tok.write_text("s3cr3t\n")
    assert auth_headers(str(tok)) == {"Authorization": "Bearer s3cr3t"}
    tok.write_text("")
    with pytest.raises(SpecError, match="empty"):
        auth_headers(str(tok))


# ---- against the session's head node -------------------------------------------------------

def test_esm_ray_submit_with_working_dir_matches_local(ray_cluster, tiny_llama, local_ties, tmp_path,
                                                       monkeypatch, capsys):
    from esm_ray.cli import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out = tmp_path / "out"
    wd = _working_dir(tiny_llama, tmp_path, out)
    rc = main(["submit", str(wd / "spec.yaml"), "--address", ray_cluster.dashboard_url, "--working-dir", str(wd),
               "--submission-id", f"esm-ray-test-{tmp_path.name}"])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-4000:]
    assert f"submitted job esm-ray-test-{tmp_path.name}" in printed
    assert job_merge.RESULT_PREFIX in printed  # the job's own log was followed
    result = json.loads(printed.split(job_merge.RESULT_PREFIX, 1)[1].splitlines()[0])
    assert result["output"] == str(out) and result["method"] == "ties"
    assert output_files(out) == output_files(local_ties)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["executor"] == "ray"


@slow
def test_failed_job_gives_nonzero_exit(ray_cluster, tiny_llama, tmp_path, monkeypatch, capsys):
    """Submitting only checks the spec's syntax; the job itself finds the output taken and fails:
    submit exits 1 and the job's error is in the followed log."""
    from esm_ray.cli import main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out = tmp_path / "taken"
    out.mkdir()
    spec_file = tmp_path / "s.json"
    spec_file.write_text(json.dumps(merge_spec(tiny_llama, out, "ties")))
    rc = main(["submit", str(spec_file), "--address", ray_cluster.dashboard_url])
    printed = capsys.readouterr().out
    assert rc == 1, printed[-3000:]
    assert "already exists" in printed and "FAILED" in printed


@slow
def test_ray_job_submit_cli_matches_local(ray_cluster, tiny_llama, local_ties, tmp_path):
    out = tmp_path / "out"
    wd = _working_dir(tiny_llama, tmp_path, out)
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
           "--working-dir", str(wd), "--", "python", "-m", "jobs.merge", "--spec", "spec.yaml"]
    r = subprocess.run(cmd, env=ray_cluster.client_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    assert output_files(out) == output_files(local_ties)


@slow
def test_submit_no_wait_returns_at_once(ray_cluster, tiny_llama, local_ties, tmp_path):
    """--no-wait prints the id and returns; the job finishes on its own (ray job status)."""
    import time

    out = tmp_path / "out"
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(merge_spec(tiny_llama, out, "ties")))
    env = ray_cluster.client_env()
    r = subprocess.run([sys.executable, "-m", "esm_ray.cli", "submit", str(spec_file), "--address",
                        ray_cluster.dashboard_url, "--no-wait", "--submission-id", f"nowait-{tmp_path.name}"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"submitted job nowait-{tmp_path.name}" in r.stdout
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    t0 = time.monotonic()
    while not client.get_job_status(f"nowait-{tmp_path.name}").is_terminal():
        assert time.monotonic() - t0 < 400
        time.sleep(1)
    assert client.get_job_status(f"nowait-{tmp_path.name}") == JobStatus.SUCCEEDED
    assert output_files(out) == output_files(local_ties)


@slow
@pytest.mark.ray
def test_esm_ray_merge_runtime_ray_starts_and_stops_a_private_ray(tiny_llama, local_ties, tmp_path):
    """The laptop path: no address -> a private Ray on 127.0.0.1, shut down after the job."""
    out = tmp_path / "out"
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(merge_spec(tiny_llama, out, "ties")))
    env = {k: v for k, v in subprocess.os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, "-m", "esm_ray.cli", "merge", str(spec_file), "--runtime", "ray",
                        "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "started a private local Ray on 127.0.0.1" in log and "local Ray shut down" in log
    assert output_files(out) == output_files(local_ties)
    assert json.loads((out / "merge_report.json").read_text())["executor"] == "ray"


@slow
@pytest.mark.ray
def test_token_auth_head_script_end_to_end(tiny_llama, local_ties, tmp_path):
    """cluster/start-local-head.sh keeps token auth on: a client without the token is refused
    (exit 2, told how to get it); with --token-file, or RAY_AUTH_MODE=token, the job runs."""
    import os
    import signal
    import tempfile
    import time

    from tests.fixtures.ray import REPO, free_port, stop_head

    temp_dir = Path(tempfile.mkdtemp(prefix="esmray-tok-"))
    token = tmp_path / "auth_token"
    dash = free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base_env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO),
                    RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    head_env = dict(base_env, RAY_PORT=str(free_port()), RAY_DASHBOARD_PORT=str(dash), NUM_CPUS="4",
                    RAY_TEMP_DIR=str(temp_dir), RAY_AUTH_TOKEN_PATH=str(token))
    extra = [f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
             f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", "--block"]
    log = open(tmp_path / "head.log", "wb")
    proc = subprocess.Popen([str(REPO / "cluster" / "start-local-head.sh"), *extra], env=head_env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.monotonic()
        while not (temp_dir / "ray_current_cluster").is_file():
            assert proc.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 240
            time.sleep(0.5)
        assert token.is_file() and len(token.read_text().strip()) >= 32
        banner = (tmp_path / "head.log").read_text()
        assert "token auth ON" in banner and f"RAY_AUTH_TOKEN_PATH={token}" in banner
        spec_file = tmp_path / "s.yaml"
        address = f"http://127.0.0.1:{dash}"

        def submit(out: Path, *flags: str, env: dict) -> subprocess.CompletedProcess:
            spec_file.write_text(yaml.safe_dump(merge_spec(tiny_llama, out, "ties")))
            return subprocess.run([sys.executable, "-m", "esm_ray.cli", "submit", str(spec_file), "--address",
                                   address, *flags], env=env, capture_output=True, text=True, timeout=400)

        refused = submit(tmp_path / "o0", env=dict(base_env, RAY_AUTH_MODE="disabled"))
        assert refused.returncode == 2 and "RAY_AUTH_MODE=token" in refused.stderr, refused.stderr[-2000:]
        assert not (tmp_path / "o0").exists()

        ok = submit(tmp_path / "o1", "--token-file", str(token), env=dict(base_env, RAY_AUTH_MODE="disabled"))
        assert ok.returncode == 0, (ok.stdout + ok.stderr)[-4000:]
        assert output_files(tmp_path / "o1") == output_files(local_ties)

        via_env = submit(tmp_path / "o2", env=dict(base_env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token)))
        assert via_env.returncode == 0, (via_env.stdout + via_env.stderr)[-4000:]
        assert output_files(tmp_path / "o2") == output_files(local_ties)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        stop_head(proc, temp_dir)
