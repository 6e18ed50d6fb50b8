"""The cluster files parse and declare what the code relies on (no cluster is started)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
RAY_MM = ".".join(ray.__version__.split(".")[:2])


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _kind(name: str, kind: str) -> dict:
    found = [d for d in _docs(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}"
    return found[0]


def _major_minor(version: str) -> str:
    m = re.search(r"(\d+)\.(\d+)", version)
    assert m, version
    return f"{m.group(1)}.{m.group(2)}"


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["template"]["spec"]["containers"]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert _major_minor(spec["rayVersion"]) == RAY_MM, f"{where}: rayVersion {spec['rayVersion']} vs ray {ray.__version__}"
    head = _containers(spec["headGroupSpec"])[0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265, where
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in _containers(g))]
    assert gpu_groups, f"{where}: no worker group declares nvidia.com/gpu"
    for c in [head] + [c for g in spec["workerGroupSpecs"] for c in _containers(g)]:
        assert _major_minor(c["image"].rsplit("ray", 1)[-1]) == RAY_MM, f"{where}: image {c['image']}"
        env = _env(c)
        assert env.get("RAY_AUTH_MODE") == "token", f"{where}: {c['name']} without token auth"
        assert "RAY_AUTH_TOKEN" in env, f"{where}: {c['name']} gets no token"


def test_local_head_script_is_executable_loopback_and_token_auth():
    script = CLUSTER / "start-local-head.sh"
    assert script.stat().st_mode & stat.S_IXUSR, "start-local-head.sh is not executable"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "--node-ip-address=127.0.0.1" in text and "--dashboard-host=127.0.0.1" in text
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in text
    assert "export RAY_AUTH_MODE=token" in text and "RAY_AUTH_MODE=disabled" not in text
    assert "0.0.0.0" not in text
    # it tells clients how to get the token
    assert "RAY_AUTH_TOKEN_PATH" in text and "--token-file" in text


def test_launcher_config_declares_gpu_workers_and_installs_esm_ray():
    cfg = _docs("ray-cluster.yaml")[0]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [n for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu and gpu[0] != cfg["head_node_type"], "no GPU worker node type"
    assert types[gpu[0]]["max_workers"] >= 1
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "esm-ray" in setup
    assert cfg["file_mounts"].get("~/esm-ray") == ".", "the checkout is not synced to the nodes"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--port=6379" in head and "--dashboard-port=8265" in head and "RAY_AUTH_MODE=token" in head
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    assert "~/.ray/auth_token" in cfg["file_mounts"], "workers would have no token"
    assert _major_minor(cfg["docker"]["image"].split(":")[1]) == RAY_MM


def test_kuberay_raycluster():
    rc = _kind("raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(rc["spec"], "raycluster.yaml")


def test_kuberay_rayjob_runs_jobs_merge_on_a_mounted_spec():
    rj = _kind("rayjob.yaml", "RayJob")
    _check_ray_cluster_spec(rj["spec"]["rayClusterSpec"], "rayjob.yaml")
    argv = shlex.split(rj["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.merge"]
    assert importlib.util.find_spec(argv[2]) is not None, "entrypoint module does not exist"
    spec_path = Path(argv[argv.index("--spec") + 1])
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    (name, mount), = [(n, m) for n, m in mounts.items() if spec_path.parent == Path(m)]
    cm = _kind("rayjob.yaml", "ConfigMap")
    assert volumes[name]["configMap"]["name"] == cm["metadata"]["name"]
    # the mounted spec is a valid merge spec for the Ray executor
    from esm_ray.spec import spec_from_dict

    spec = spec_from_dict(yaml.safe_load(cm["data"][spec_path.name]), source="rayjob.yaml")
    assert spec.runtime.name == "ray"
    gpu_group = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert gpu_group["minReplicas"] * (spec.runtime.num_gpus_per_worker or 1) >= len(spec.experts), \
        "fewer GPUs than expert workers"


@pytest.mark.parametrize("name", sorted(p.name for p in CLUSTER.glob("*.yaml") if p.name != "ray-cluster.yaml"))
def test_every_kuberay_manifest_matches_the_installed_ray(name):
    for doc in _docs(name):
        spec = doc.get("spec", {})
        rc = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or (spec if "rayVersion" in spec else None)
        if rc is not None:
            assert _major_minor(rc["rayVersion"]) == RAY_MM, f"{name}: rayVersion {rc['rayVersion']}"


def test_dockerfile_builds_on_the_installed_ray_and_installs_esm_ray():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M).group(1)
    assert _major_minor(base.split(":")[1]) == RAY_MM
    assert "pip install" in text and "COPY --chown=ray:users jobs ./jobs" in text
    for src in re.findall(r"^COPY \S+ (.+) \./\S*$", text, re.M):
        for f in src.split():
            if f != "README.md":  # written by the release step
                assert (ROOT / f).exists(), f"Dockerfile copies missing {f}"


def test_example_job_specs_are_valid_ray_specs():
    from esm_ray.spec import load_spec

    examples = sorted((ROOT / "jobs").glob("*.yaml"))
    assert examples, "no example job specs in jobs/"
    for f in examples:
        spec = load_spec(f)
        assert spec.runtime.name == "ray", f"{f.name}: runtime is not ray"
        uris = [spec.base, spec.output] + [e.model for e in spec.experts]
        assert all(u.startswith("s3://") for u in uris), f"{f.name}: cluster jobs should read and write s3:// URIs"
