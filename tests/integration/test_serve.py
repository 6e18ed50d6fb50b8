"""Real HTTP against a real Ray Serve application on 127.0.0.1."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.methods.test_routed import TASKS, _rows, make_family_in_memory, routed_in_memory

httpx = pytest.importorskip("httpx")

WORDS = [f"w{i}" for i in range(91)]  # ids 5..95, next to the 5 special tokens


def _tokenizer(tmp_path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return BertTokenizer(str(vocab), do_lower_case=False)


@pytest.fixture(scope="module")
def routed_dir(tmp_path_factory):
    """A routed directory (prototype + SiM routers, heads, a word-level tokenizer)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, much faster on a busy machine
    try:
        root = tmp_path_factory.mktemp("serve")
        rm = routed_in_memory(make_family_in_memory(), rank=8)
        rm.tokenizer = _tokenizer(root)
        rm.save(root / "model")
    finally:
        torch.set_num_threads(before)
    return root / "model"


@pytest.fixture(scope="module")
def ray_serve(request):
    """Serve on a free 127.0.0.1 port, on the session's Ray (tests/fixtures/ray.py) when that
    fixture is registered, else on a private loopback-only Ray for this module."""
    import ray
    from ray import serve

    from esm_ray.serve import free_port

    started = False
    try:
        request.getfixturevalue("ray_driver")
    except pytest.FixtureLookupError:
        if not ray.is_initialized():
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            ray.init(num_cpus=2, include_dashboard=False)
            started = True
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def app(ray_serve, routed_dir):
    from ray import serve

    from esm_ray.serve import ServeOptions, build
    from esm_ray.spec import ServeSpec

    spec = ServeSpec(num_cpus=0.5, max_ongoing_requests=16, max_batch_size=8, batch_wait_timeout_s=0.02)
    opts = ServeOptions(model_dir=str(routed_dir), max_inputs_per_request=4, max_batch_size=8,
                        batch_wait_timeout_s=0.02, threads=1)
    serve.run(build(opts, spec), name="main", route_prefix="/main")
    yield f"{ray_serve}/main"
    serve.delete("main")


def _ids_text(ids: list[int]) -> str:
    return " ".join(WORDS[i - 5] for i in ids)


def test_healthz_model_and_docs(app):
    with httpx.Client(timeout=30) as c:
        assert c.get(f"{app}/healthz").json() == {"status": "ok", "tasks": 3}
        info = c.get(f"{app}/v1/model").json()
        assert [t["name"] for t in info["tasks"]] == TASKS
        assert info["tasks"][2]["labels"] == ["gamma-0", "gamma-1", "gamma-2", "gamma-3"]
        assert info["router"] == "prototype" and info["routers"][:2] == ["prototype", "sim"]
        assert info["rank"] == 8 and info["routed_layers"] == 12
        assert info["sizes"]["total_bytes"] < info["sizes"]["full_experts_bytes"]
        assert info["limits"]["max_inputs_per_request"] == 4
        assert c.get(f"{app}/docs").status_code == 200
        paths = c.get(f"{app}/openapi.json").json()["paths"]
        assert {"/v1/predict", "/v1/model", "/healthz"} <= set(paths)


def test_predict_matches_the_model_run_locally(app, routed_dir):
    """Concurrent mixed-task requests are batched together; answers equal solo local runs."""
    from esm_ray.routed import load_routed

    local = load_routed(routed_dir)
    rows = [r["input_ids"] for t in range(3) for r in _rows(t, 4, seed=800 + t)]
    texts = [_ids_text(ids) for ids in rows]
    reqs = [{"inputs": texts[i:i + 2]} for i in range(0, len(texts), 2)]
    reqs += [{"inputs": texts[:3], "router": "sim"}, {"inputs": texts[3:5], "task": "beta"}]
    with httpx.Client(timeout=60) as c, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: c.post(f"{app}/v1/predict", json=body), reqs))
    for body, resp in zip(reqs, answers):
        assert resp.status_code == 200, resp.text
        got = resp.json()
        want = [local.predict([t], tasks=[body.get("task")], router=body.get("router"))[0] for t in body["inputs"]]
        assert got["router"] == body.get("router", "prototype")
        for g, w in zip(got["predictions"], want):
            assert (g["task"], g["label"], g["label_id"]) == (w["task"], w["label"], w["label_id"])
            if w["scores"] is None:
                assert g["scores"] is None
            else:
                assert g["scores"] == pytest.approx(w["scores"], abs=1e-4)
    # token ids are accepted as well
    with httpx.Client(timeout=30) as c:
        r = c.post(f"{app}/v1/predict", json={"inputs": [[c_ for c_ in rows[0]]], "task": "alpha"})
    assert r.status_code == 200 and r.json()["predictions"][0]["task"] == "alpha"


@pytest.mark.parametrize("body,status,needle", [
    ('{"inputs": ["w1 w2"', 422, "json"),                                  # malformed JSON
    ({"inputs": "w1 w2"}, 422, "inputs"),                                   # not a list
    ({"inputs": [3.5]}, 422, "inputs"),                                     # wrong element type
    ({"inputs": ["w1"], "task": 7}, 422, "task"),                           # wrong field type
    ({"inputs": ["w1"], "extra": 1}, 422, "extra"),                         # unknown field
    ({"texts": ["w1"]}, 422, "inputs"),                                     # missing field
    ({"inputs": ["w1"] * 5}, 413, "too many inputs"),
    ({"inputs": []}, 400, "empty"),
    ({"inputs": ["w1", "   "]}, 400, "inputs[1]"),
    ({"inputs": ["w1"], "task": "delta"}, 400, "unknown task"),
    ({"inputs": ["w1"], "router": "oracle"}, 400, "needs `task`"),
])
def test_bad_requests_get_clear_errors(app, body, status, needle):
    with httpx.Client(timeout=30) as c:
        if isinstance(body, str):
            r = c.post(f"{app}/v1/predict", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(f"{app}/v1/predict", json=body)
    assert r.status_code == status, r.text
    assert needle in r.text.lower() or needle in r.text


def test_overload_answers_503(ray_serve, routed_dir):
    """max_ongoing_requests=1, one queued request, slow batches: a burst of 8 gets some 503s."""
    from ray import serve

    from esm_ray.serve import ServeOptions, build
    from esm_ray.spec import ServeSpec

    spec = ServeSpec(num_cpus=0.5, max_ongoing_requests=1, max_batch_size=1)
    opts = ServeOptions(model_dir=str(routed_dir), max_batch_size=1, debug_delay_s=1.5, threads=1)
    serve.run(build(opts, spec, max_queued_requests=1), name="slow", route_prefix="/slow")
    try:
        url = f"{ray_serve}/slow/v1/predict"
        with httpx.Client(timeout=60) as c, ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: c.post(url, json={"inputs": ["w1 w2"]}).status_code, range(8)))
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
        with httpx.Client(timeout=60) as c:  # and it recovers once the burst is over
            assert c.post(url, json={"inputs": ["w1 w2"]}).status_code == 200
    finally:
        serve.delete("slow")


def test_rayservice_manifest_parses_and_names_a_buildable_app():
    """cluster/rayservice.yaml: a KubeRay RayService whose Serve config builds our application."""
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve.deployment import Application

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster" / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"  # token auth stays on in real clusters
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "esm-ray-auth"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app_cfg,) = serve_cfg["applications"]
    module, _, attr = app_cfg["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    app = builder(app_cfg["args"])
    assert isinstance(app, Application)
    dep = app._bound_deployment
    assert dep.num_replicas == app_cfg["args"]["num_replicas"]
    assert dep.max_ongoing_requests == app_cfg["args"]["max_ongoing_requests"]
    assert dep.max_queued_requests == app_cfg["args"]["max_queued_requests"]
    assert dep.ray_actor_options["num_cpus"] == app_cfg["args"]["num_cpus"]
    with pytest.raises(Exception, match="model_dirr|extra"):
        builder({**app_cfg["args"], "model_dirr": "x"})
