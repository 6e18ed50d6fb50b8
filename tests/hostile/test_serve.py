"""Hostile requests against a real Ray Serve application on 127.0.0.1, over real HTTP, and the
processes `esm-ray serve` / `merge --runtime ray` start.

- bad inputs are answered 4xx naming `inputs[i]` before they join a batch; a batch that fails
  anyway is rerun one input at a time, so a bad request never changes another's answer;
- body bytes and characters per input are limited (413), tokens cut at the model's limit;
- every listener of the private Ray that `esm-ray serve` and `merge --runtime ray` start is on
  loopback;
- a head from another tool (labels as a JSON list) is read; a bad head fails the merge by name
  (exit 2) and `esm-ray serve` at once with the cause in one line;
- a bounded soak: mixed valid and invalid requests, every valid answer correct, replica RSS flat.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.methods.test_routed import TASKS, _rows
from tests.integration.test_serve import WORDS, _ids_text, ray_serve, routed_dir  # noqa: F401 - shared fixtures

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parents[2]
VOCAB = 96       # tests/fixtures/family.py: bert_config
POSITIONS = 64   # its max_position_embeddings
FAIL_TEXT = "w7 w7 w7 w7"  # the isolation app's debug_fail_input: any batch holding it raises


def _deploy(ray_serve, routed_dir, name: str, **opts):  # noqa: F811
    from ray import serve

    from esm_ray.serve import ServeOptions, build
    from esm_ray.spec import ServeSpec

    spec = ServeSpec(num_cpus=0.5, max_ongoing_requests=64, max_batch_size=16, batch_wait_timeout_s=0.05)
    options = ServeOptions(model_dir=str(routed_dir), max_batch_size=16, batch_wait_timeout_s=0.05, threads=1,
                           **opts)
    serve.run(build(options, spec, max_queued_requests=-1), name=name, route_prefix=f"/{name}")
    return f"{ray_serve}/{name}"


@pytest.fixture(scope="module")
def app(ray_serve, routed_dir):  # noqa: F811
    """The model with default limits and a test-only input whose batch raises."""
    from ray import serve

    url = _deploy(ray_serve, routed_dir, "hostile", debug_fail_input=FAIL_TEXT)
    yield url
    serve.delete("hostile")


@pytest.fixture(scope="module")
def local(routed_dir):  # noqa: F811
    from esm_ray.routed import load_routed

    return load_routed(routed_dir)


def _post(c, url: str, body) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return c.post(f"{url}/v1/predict", content=body, headers={"content-type": "application/json"})
    return c.post(f"{url}/v1/predict", json=body)


def _same(got: dict, want: dict) -> bool:
    if (got["task"], got["label"], got["label_id"]) != (want["task"], want["label"], want["label_id"]):
        return False
    if want["scores"] is None:
        return got["scores"] is None
    return all(abs(got["scores"][k] - v) <= 1e-4 for k, v in want["scores"].items())


# ---- finding 2: every input checked before it joins a batch ---------------------------------

@pytest.mark.parametrize("bad,needle", [
    ([2, 99999, 3], "outside the vocabulary"),
    ([2, VOCAB, 3], "outside the vocabulary"),
    ([2, -5, 3], "outside the vocabulary"),
    ([2, 2 ** 70, 3], "outside the vocabulary"),
    ("\ud800", "not valid unicode"),
])
def test_a_bad_input_is_422_naming_its_index(app, bad, needle):
    body = json.dumps({"inputs": ["w1 w2", bad]})  # ensure_ascii: the lone surrogate travels as \ud800
    with httpx.Client(timeout=60) as c:
        r = _post(c, app, body)
    assert r.status_code == 422, r.text
    assert "inputs[1]" in r.text and needle in r.text.lower(), r.text


def test_inputs_longer_than_the_positions_are_cut_not_500(app, local):
    long_ids = [5 + (i % 90) for i in range(3 * POSITIONS)]
    long_text = " ".join(WORDS[i % 90] for i in range(3 * POSITIONS))
    with httpx.Client(timeout=60) as c:
        info = c.get(f"{app}/v1/model").json()
        r = _post(c, app, {"inputs": [long_ids, long_text], "task": "alpha"})
    assert info["limits"]["max_length"] == POSITIONS and info["limits"]["vocab_size"] == VOCAB
    assert r.status_code == 200, r.text
    want = local.predict([long_ids, long_text], tasks=["alpha", "alpha"], max_length=POSITIONS)
    assert all(_same(g, w) for g, w in zip(r.json()["predictions"], want))


def test_one_bad_request_never_changes_another_answer(app, local):
    """Many concurrent valid requests with bad ones among them: every valid answer equals its
    answer alone, every bad one is 4xx (none 500). The FAIL_TEXT request passes validation but
    makes its batch raise: its batch is rerun one input at a time."""
    texts = [_ids_text(r["input_ids"]) for t in range(3) for r in _rows(t, 8, seed=900 + t)]
    want = {x: local.predict([x])[0] for x in texts}
    good = [{"inputs": [x]} for x in texts] + [{"inputs": texts[i:i + 3]} for i in range(0, 18, 3)]
    bad = [{"inputs": [[2, 99999, 3]]}, {"inputs": [texts[0], [2, -5, 3]]}, {"inputs": [[2, 2 ** 70]]},
           json.dumps({"inputs": [texts[1], "\ud800"]}), {"inputs": [FAIL_TEXT]}, {"inputs": [texts[2], FAIL_TEXT]}]
    reqs = [(True, b) for b in good]
    for k, b in enumerate(bad):  # spread the bad ones through the valid ones
        reqs.insert(3 + 6 * k, (False, b))
    with httpx.Client(timeout=120) as c, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda rb: _post(c, app, rb[1]), reqs * 2))
    for (ok, body), r in zip(reqs * 2, answers):
        if not ok:
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            continue
        assert r.status_code == 200, (body, r.status_code, r.text)
        got = r.json()["predictions"]
        assert all(_same(g, want[x]) for g, x in zip(got, body["inputs"])), (body, got)
    fail = [r for (ok, b), r in zip(reqs, answers) if not ok and FAIL_TEXT in json.dumps(b)]
    assert all(r.status_code == 422 and "could not be processed" in r.text for r in fail)
    assert "inputs[1]" in fail[1].text


# ---- finding 5: request size limits ------------------------------------------------------------

def test_a_10mb_body_is_413_at_once(app):
    body = json.dumps({"inputs": ["w1 " * (10 * 2 ** 20 // 3)]})
    with httpx.Client(timeout=60) as c:
        t0 = time.monotonic()
        r = _post(c, app, body)
        took = time.monotonic() - t0
        assert c.post(f"{app}/v1/predict", json={"inputs": ["w1 w2"]}).status_code == 200
    assert r.status_code == 413 and "over the limit of 1048576 bytes" in r.text, r.text
    assert took < 5, took


def test_a_long_input_is_413_naming_it(app):
    with httpx.Client(timeout=60) as c:
        t0 = time.monotonic()
        r = _post(c, app, {"inputs": ["w1 w2", "w3 " * 10_000]})
        took = time.monotonic() - t0
        r_ids = _post(c, app, {"inputs": [[5] * 30_000]})
    assert r.status_code == 413 and "inputs[1]" in r.text and "30000 characters" in r.text, r.text
    assert took < 5, took
    assert r_ids.status_code == 413 and "inputs[0]" in r_ids.text, r_ids.text


def test_limits_come_from_the_spec(ray_serve, routed_dir):  # noqa: F811
    from ray import serve

    url = _deploy(ray_serve, routed_dir, "small", max_body_bytes=2048, max_input_chars=50)
    try:
        with httpx.Client(timeout=60) as c:
            assert c.get(f"{url}/v1/model").json()["limits"]["max_body_bytes"] == 2048
            assert _post(c, url, {"inputs": ["w1 " * 16]}).status_code == 200
            assert _post(c, url, {"inputs": ["w1 " * 17]}).status_code == 413
            assert _post(c, url, {"inputs": ["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13"] * 4}).status_code == 200
            r = _post(c, url, {"inputs": ["w1"] * 700})
            assert r.status_code == 413 and "bytes" in r.text
    finally:
        serve.delete("small")


def test_the_spec_and_cli_carry_the_limits():
    from esm_ray.spec import ServeSpec

    assert ServeSpec().max_body_bytes == 1 << 20 and ServeSpec().max_input_chars == 20_000
    with pytest.raises(Exception, match="max_body_bytes"):
        ServeSpec(max_body_bytes=10)


# ---- finding 7: the private Ray on loopback ----------------------------------------------------

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _private_env(tmp: Path) -> dict[str, str]:
    """The environment a user has: nothing that already keeps Ray on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=str(tmp), RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return env


def _tree(pid: int, tmp: Path) -> list:
    """The process and its descendants, plus any process naming the private temp dir."""
    procs = {}
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            procs[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(tmp) in a for a in (p.info["cmdline"] or [])):
                procs[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(procs.values())


def _listeners(procs: list) -> list[tuple[int, str, str, int]]:
    out = []
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((p.pid, p.name(), c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _end(proc: subprocess.Popen, tmp: Path) -> None:
    left = _tree(proc.pid, tmp)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    for p in left:
        try:
            if p.is_running() and p.pid != proc.pid:
                p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.serve
def test_esm_ray_serve_listens_on_loopback_only(routed_dir):  # noqa: F811
    from esm_ray.serve import free_port

    tmp = Path(tempfile.mkdtemp(prefix="esmsrv-"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "esm_ray.cli", "serve", str(routed_dir), "--port", str(port),
                             "--num-cpus", "1"], env=_private_env(tmp), cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        t0 = time.monotonic()
        while not any(line.startswith("serving ") for line in lines):
            assert proc.poll() is None and time.monotonic() - t0 < 240, "".join(lines)[-3000:]
            time.sleep(0.5)
        with httpx.Client(timeout=60) as c:
            assert c.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": ["w1 w2"]}).status_code == 200
        found = _listeners(_tree(proc.pid, tmp))
        names = {n for _, n, _, _ in found}
        assert len(found) >= 5 and {"gcs_server", "raylet"} <= names, found
        assert any(n.startswith("ray::ServeReplica") for n in names), found
        exposed = [x for x in found if x[2] not in LOOPBACK]
        assert not exposed, f"listening beyond loopback: {exposed}"
    finally:
        _end(proc, tmp)


@pytest.mark.slow
@pytest.mark.ray
def test_merge_ray_session_listens_on_loopback_only(tmp_path):
    """The private Ray of `merge --runtime ray` (ray_session) comes from the same helper."""
    tmp = Path(tempfile.mkdtemp(prefix="esmmrg-"))
    script = (
        "import json, os, psutil, ray\n"
        "from esm_ray.runtime.ray_executor import ray_session\n"
        "from esm_ray.spec import RuntimeSpec\n"
        "with ray_session(RuntimeSpec(name='ray'), 1):\n"
        "    @ray.remote\n"
        "    def f(): return os.getpid()\n"
        "    ray.get(f.remote())\n"
        "    print(json.dumps(os.getpid()), flush=True)\n"
        "    input()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=_private_env(tmp), cwd=tmp, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == str(proc.pid)
        time.sleep(2)  # the dashboard agent opens its ports a little after the workers
        found = _listeners(_tree(proc.pid, tmp))
        assert {"gcs_server", "raylet"} <= {n for _, n, _, _ in found}, found
        assert not [x for x in found if x[2] not in LOOPBACK], found
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        _end(proc, tmp)


# ---- finding 13: heads from other tools, bad heads, a replica that cannot start --------------

def _relabel(head: Path, labels: str) -> None:
    tensors = load_file(str(head))
    save_file(tensors, str(head), metadata={"labels": labels})


def test_head_labels_as_a_json_list_are_read(tmp_path, routed_dir):  # noqa: F811
    from esm_ray.routed import head_from, read_head

    w = {"weight": torch.randn(2, 32), "bias": torch.zeros(2)}
    save_file(w, str(tmp_path / "json.safetensors"), metadata={"labels": json.dumps(["2012", "2016"])})
    save_file(w, str(tmp_path / "tabs.safetensors"), metadata={"labels": "neg\tpos"})
    assert read_head(tmp_path / "json.safetensors").labels == ["2012", "2016"]
    assert read_head(tmp_path / "tabs.safetensors").labels == ["neg", "pos"]
    assert head_from(tmp_path / "json.safetensors").n_labels == 2


def _esm_pp_spec(tiny_bert, root: Path, head_labels: str) -> Path:
    import shutil

    experts = []
    for t in range(2):
        d = root / f"expert_{t}"
        shutil.copytree(tiny_bert[f"expert_{t}"], d)
        save_file({"weight": torch.randn(2, 32), "bias": torch.zeros(2)}, str(d / "head.safetensors"),
                  metadata={"labels": head_labels})
        data = root / f"calib_{t}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in _rows(t, 8, seed=700 + t)))
        experts.append({"name": TASKS[t], "model": str(d), "data": str(data)})
    spec = {"base": str(tiny_bert["base"]), "experts": experts, "output": str(root / "out"),
            "method": {"name": "esm_pp", "params": {"base_method": "task_arithmetic", "rank": 4,
                                                    "base_params": {"lambda": 0.4}}},
            "calibration": {"samples": 8, "batch_size": 8, "cache_dir": str(root / "cache")}}
    p = root / "spec.json"
    p.write_text(json.dumps(spec))
    return p


def test_merge_reads_json_labels_and_rejects_a_bad_head_by_name(tiny_bert, tmp_path, capsys):
    from esm_ray.cli import main
    from esm_ray.routed import load_routed

    good = _esm_pp_spec(tiny_bert, tmp_path / "good", json.dumps(["2012", "2016"]))
    assert main(["-q", "merge", str(good)]) == 0
    man = json.loads((tmp_path / "good" / "out" / "routed" / "manifest.json").read_text())
    assert [h["labels"] for h in man["heads"].values()] == [["2012", "2016"]] * 2
    assert load_routed(tmp_path / "good" / "out").heads["alpha"].labels == ["2012", "2016"]

    bad = _esm_pp_spec(tiny_bert, tmp_path / "bad", json.dumps(["2012", "2016", "2020"]))
    capsys.readouterr()
    assert main(["-q", "merge", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "expert_0/head.safetensors" in err and "3 labels for a head with 2 outputs" in err, err
    assert not (tmp_path / "bad" / "out").exists()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.serve
def test_serve_ends_at_once_when_the_replica_cannot_start(routed_dir, tmp_path):  # noqa: F811
    import shutil

    from esm_ray.serve import free_port

    broken = tmp_path / "broken"
    shutil.copytree(routed_dir, broken)
    _relabel(broken / "heads" / "alpha.safetensors", "a\tb\tc\td\te")
    man = json.loads((broken / "routed" / "manifest.json").read_text())
    man["heads"]["alpha"]["labels"] = None  # labels from the head file, as a head from another tool has
    (broken / "routed" / "manifest.json").write_text(json.dumps(man))
    tmp = Path(tempfile.mkdtemp(prefix="esmbad-"))
    proc = subprocess.Popen([sys.executable, "-m", "esm_ray.cli", "serve", str(broken), "--port", str(free_port()),
                             "--num-cpus", "1"], env=_private_env(tmp), cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=240)
        took = time.monotonic() - t0
    finally:
        _end(proc, tmp)
    assert proc.returncode == 2, (out, err)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "alpha.safetensors" in lines[0] and "5 labels for a head with 2 outputs" in lines[0], err
    assert "Traceback" not in err.split(lines[0])[-1]
    assert took < 120, took


# ---- a bounded soak ------------------------------------------------------------------------------

SOAK_S = 90
RSS_TOLERANCE = 64 * 2 ** 20  # replica RSS after the soak may exceed its level after warm-up by 64 MiB


@pytest.mark.slow
def test_soak_mixed_requests_stay_correct_and_memory_flat(app, local):
    """Six threads for SOAK_S seconds: valid requests (answers checked against the local model),
    out-of-vocabulary ids, lone surrogates, oversized inputs and bodies, malformed JSON, and
    inputs whose batch raises. Replica RSS (psutil on the replica's pid, from /v1/model) is taken
    after a warm-up and at the end; it may grow by at most RSS_TOLERANCE."""
    texts = [_ids_text(r["input_ids"]) for t in range(3) for r in _rows(t, 10, seed=950 + t)]
    want = {x: local.predict([x])[0] for x in texts}
    bad = [{"inputs": [[2, 99999]]}, json.dumps({"inputs": ["\ud800 w1"]}), {"inputs": ["w1 " * 8000]},
           {"inputs": [FAIL_TEXT]}, '{"inputs": ["w1"', json.dumps({"inputs": ["w1 " * 400_000]}),
           {"inputs": [[5, -1]]}]
    errors: list[str] = []
    counts = {"ok": 0, "bad": 0}
    lock = threading.Lock()

    def worker(seed: int, until: float) -> None:
        import random

        rnd = random.Random(seed)
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < until:
                if rnd.random() < 0.3:
                    r = _post(c, app, rnd.choice(bad))
                    with lock:
                        counts["bad"] += 1
                        if not 400 <= r.status_code < 500:
                            errors.append(f"bad request answered {r.status_code}: {r.text[:200]}")
                    continue
                xs = rnd.sample(texts, rnd.randint(1, 4))
                r = _post(c, app, {"inputs": xs})
                with lock:
                    counts["ok"] += 1
                    if r.status_code != 200:
                        errors.append(f"valid request answered {r.status_code}: {r.text[:200]}")
                    elif not all(_same(g, want[x]) for g, x in zip(r.json()["predictions"], xs)):
                        errors.append(f"wrong answer for {xs}")

    def run(seconds: float) -> None:
        until = time.monotonic() + seconds
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda s: worker(s, until), range(6)))

    with httpx.Client(timeout=60) as c:
        pid = c.get(f"{app}/v1/model").json()["replica"]["pid"]
    replica = psutil.Process(pid)
    run(15)  # warm-up: allocator pools and caches reach their working size
    rss_warm = replica.memory_info().rss
    run(SOAK_S)
    rss_end = replica.memory_info().rss
    assert not errors, errors[:10]
    assert counts["ok"] > 50 and counts["bad"] > 20, counts
    assert rss_end <= rss_warm + RSS_TOLERANCE, (rss_warm, rss_end)
