"""The OpenAI-compatible service for causal LMs: the official `openai` client against a real Ray
Serve application on 127.0.0.1, answers checked against peft + transformers' own generate()."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.fixtures.lm_dir import SPECIAL, TASKS, add_router, make_lm_dir
from tests.integration.test_serve import ray_serve  # noqa: F401 - the shared Serve fixture

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("peft")

FAIL_WORD = "w70"  # the lm app's debug_fail_token: any batch holding it raises
FAIL_ID = len(SPECIAL) + 70


@pytest.fixture(scope="module")
def lm_dir(tiny_llama, tmp_path_factory):
    return add_router(make_lm_dir(tmp_path_factory.mktemp("llm") / "lm", tiny_llama["base"]))


@pytest.fixture(scope="module")
def plain_dir(tiny_llama, tmp_path_factory):
    """A static merge: no adapters, no router, a tokenizer without a chat template."""
    return make_lm_dir(tmp_path_factory.mktemp("llm") / "plain", tiny_llama["base"], tasks=[], chat_template=None)


def _deploy(name: str, model_dir, **opts) -> None:
    from ray import serve

    from esm_ray.serve.llm_app import LLMOptions, build_llm
    from esm_ray.spec import ServeSpec

    spec = ServeSpec(num_cpus=0.5, max_ongoing_requests=32)
    options = LLMOptions(model_dir=str(model_dir), threads=1, batch_wait_timeout_s=0.05, **opts)
    serve.run(build_llm(options, spec, max_queued_requests=-1), name=name, route_prefix=f"/{name}")


@pytest.fixture(scope="module")
def lm(ray_serve, lm_dir):  # noqa: F811
    from ray import serve

    _deploy("lm", lm_dir, router_loader="tests.fixtures.lm_dir:load_first_word_router", debug_fail_token=FAIL_ID)
    yield f"{ray_serve}/lm"
    serve.delete("lm")


@pytest.fixture(scope="module")
def plain(ray_serve, plain_dir):  # noqa: F811
    """Slow batches (0.5 s) and room for 2 waiting sequences: the overload test's 503s."""
    from ray import serve

    _deploy("plain", plain_dir, debug_delay_s=0.5, max_waiting=2, max_batch_size=1)
    yield f"{ray_serve}/plain"
    serve.delete("plain")


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def oracle(lm_dir):
    """Greedy tokens from transformers' generate() on the merged model, or on peft with one adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(lm_dir))
    cache = {}

    def run(model: str, ids: list[int], max_tokens: int) -> list[int]:
        if model not in cache:
            m = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32)
            if model in TASKS:
                m = PeftModel.from_pretrained(m, str(lm_dir / "adapters" / model))
            cache[model] = m.eval()
        with torch.no_grad():
            out = cache[model].generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        new = out[0, len(ids):].tolist()
        return new[:new.index(2)] if 2 in new else new  # </s> ends the text and is not part of it

    run.tok = tok
    return run


def test_models_lists_merged_adapters_and_auto(lm, plain):
    assert [m.id for m in _client(lm).models.list().data] == ["lm", *TASKS, "auto"]
    got = _client(plain).models.list().data
    assert [m.id for m in got] == ["plain"] and got[0].model_extra["esm_ray"] == {"kind": "merged"}
    # how rows on different adapters share a batch: the stacked adapters (none without adapters)
    assert httpx.get(f"{lm}/v1/model", timeout=30).json()["adapters"] == "stacked"
    assert httpx.get(f"{plain}/v1/model", timeout=30).json()["adapters"] is None


@pytest.mark.parametrize("model", ["lm", "alpha", "gamma", "lm:beta"])
def test_completion_equals_peft_generate(lm, oracle, model):
    prompt = "w1 w2 w3"
    r = _client(lm).completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    task = model.split(":")[-1]
    want = oracle(task, oracle.tok(prompt)["input_ids"], 10)
    assert r.choices[0].text == oracle.tok.decode(want, skip_special_tokens=True)
    assert r.choices[0].finish_reason == ("length" if len(want) == 10 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, len(want))
    assert r.model_extra["esm_ray"]["task"] == (None if task == "lm" else task)
    assert r.object == "text_completion" and r.model == model


def test_adapters_change_the_answer(lm):
    c = _client(lm)
    texts = {m: c.completions.create(model=m, prompt="w5 w6", max_tokens=8, temperature=0).choices[0].text
             for m in ["lm", *TASKS]}
    assert len(set(texts.values())) == 4, texts


def test_chat_applies_the_template(lm, oracle):
    msgs = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w1 w2"}]
    r = _client(lm).chat.completions.create(model="beta", messages=msgs, max_tokens=6, temperature=0)
    ids = oracle.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = oracle.tok(ids, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [1, 4, len(SPECIAL) + 9]  # <s> <|system|> w9: the template ran
    want = oracle("beta", ids, 6)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == oracle.tok.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.model_extra["esm_ray"]["task"] == "beta"


def test_streaming_completion_and_chat(lm):
    c = _client(lm)
    whole = c.completions.create(model="alpha", prompt="w3 w4", max_tokens=12, temperature=0)
    chunks = list(c.completions.create(model="alpha", prompt="w3 w4", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.model_extra["esm_ray"]["task"] == "alpha" for ch in chunks if ch.choices)
    msgs = [{"role": "user", "content": "w2"}]
    whole = c.chat.completions.create(model="gamma", messages=msgs, max_tokens=8, temperature=0)
    chunks = list(c.chat.completions.create(model="gamma", messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    with httpx.Client(timeout=60) as h:  # the raw stream: server-sent events ending with [DONE]
        raw = h.post(f"{lm}/v1/completions", json={"model": "lm", "prompt": "w1", "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_greedy_tokens_alone_equal_tokens_in_a_concurrent_batch(lm):
    """Mixed adapters in one decoding batch: each answer equals the one it gets alone."""
    c = _client(lm)
    jobs = [(m, " ".join(f"w{3 * i + k}" for k in range(i + 1))) for i in range(4) for m in ["lm", *TASKS]]
    ask = lambda job: c.completions.create(model=job[0], prompt=job[1], max_tokens=12, temperature=0).choices[0].text  # noqa: E731
    alone = [ask(j) for j in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone
    sizes = httpx.get(f"{lm}/v1/model", timeout=30).json()["recent_batch_sizes"]
    assert max(sizes) > 1, sizes  # the concurrent requests did share batches


def test_auto_routes_each_prompt_and_reports_the_task(lm):
    c = _client(lm)
    for word, task in [("w1", "alpha"), ("w2", "beta"), ("w0", "gamma")]:
        r = c.completions.create(model="auto", prompt=f"{word} w5 w6", max_tokens=8, temperature=0)
        direct = c.completions.create(model=task, prompt=f"{word} w5 w6", max_tokens=8, temperature=0)
        assert r.model_extra["esm_ray"]["task"] == task and r.choices[0].text == direct.choices[0].text
    r = c.completions.create(model="auto", prompt=["w1 w5", "w2 w5"], max_tokens=4, temperature=0)
    assert r.model_extra["esm_ray"]["tasks"] == ["alpha", "beta"] and r.model_extra["esm_ray"]["task"] is None


def test_seeded_sampling_n_and_stop(lm):
    c = _client(lm)
    kw = dict(model="alpha", prompt="w1 w2", max_tokens=10, temperature=1.0, top_p=0.9)
    a = c.completions.create(seed=7, **kw).choices[0].text
    assert c.completions.create(seed=7, **kw).choices[0].text == a
    two = c.completions.create(seed=7, n=2, **kw)
    assert [ch.index for ch in two.choices] == [0, 1] and two.choices[0].text == a  # choice k uses seed + k
    assert two.choices[1].text == c.completions.create(seed=8, **kw).choices[0].text
    greedy = c.completions.create(model="beta", prompt="w4", max_tokens=10, temperature=0).choices[0].text.split()
    cut = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    r = c.completions.create(model="beta", prompt="w4", max_tokens=10, temperature=0, stop=[greedy[cut]])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text.split() == greedy[:cut]


BIG = "w1 " * 30_000


@pytest.mark.parametrize("path,body,status,param,needle", [
    ("completions", '{"model": "lm", "prompt": "w1"', 422, None, "json"),
    ("completions", {"model": "lm", "prompt": "w1", "foo": 1}, 422, "foo", "extra"),
    ("completions", {"model": "lm", "prompt": "w1", "max_tokens": "x"}, 422, "max_tokens", "integer"),
    ("completions", {"model": "lm", "prompt": "w1", "temperature": 5}, 422, "temperature", "less than"),
    ("completions", {"model": "lm"}, 422, "prompt", "required"),
    ("completions", {"model": "lm", "prompt": "w1", "logprobs": 2}, 400, "logprobs", "not supported"),
    ("completions", {"model": "lm", "prompt": "w1", "echo": True}, 400, "echo", "not supported"),
    ("completions", {"model": "lm", "prompt": "w1", "n": 100}, 400, "n", "limit"),
    ("completions", {"model": "lm", "prompt": "w1", "max_tokens": 5000}, 400, "max_tokens", "max_tokens"),
    ("completions", {"model": "lm", "prompt": "w1", "max_tokens": 63}, 400, "max_tokens", "positions"),
    ("completions", {"model": "lm", "prompt": "w1", "stop": [""]}, 400, "stop", "stop"),
    ("completions", {"model": "nope", "prompt": "w1"}, 404, "model", "does not exist"),
    ("completions", {"model": "lm", "prompt": " ".join(["w1"] * 70)}, 413, "prompt", "positions"),
    ("completions", {"model": "lm", "prompt": [5, 999]}, 422, "prompt", "outside the vocabulary"),
    ("completions", {"model": "lm", "prompt": BIG}, 413, "prompt", "characters"),
    ("completions", {"model": "lm", "prompt": "w1 " * 400_000}, 413, None, "body"),
    ("completions", {"model": "lm", "prompt": "w1", "seed": 2 ** 70}, 422, "seed", "less than"),
    ("completions", '{"model": "lm", "prompt": "w1 \\ud800"}', 422, "prompt", "unicode"),
    ("chat/completions", '{"model": "lm", "messages": [{"role": "user", "content": "\\ud800"}]}', 422,
     "messages[0].content", "unicode"),
    ("chat/completions", {"model": "lm", "messages": []}, 400, "messages", "empty"),
    ("chat/completions", {"model": "lm", "messages": [{"role": "robot", "content": "w1"}]}, 422,
     "messages.0.role", "system"),
    ("chat/completions", {"model": "lm", "messages": [{"role": "user", "content": "w1"}],
                          "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
])
def test_bad_requests_get_openai_errors_naming_the_field(lm, path, body, status, param, needle):
    with httpx.Client(timeout=60) as c:
        if isinstance(body, str):
            r = c.post(f"{lm}/v1/{path}", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(f"{lm}/v1/{path}", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert needle in err["message"].lower() or needle in err["message"], err


def test_the_client_sees_the_errors_it_expects(lm, plain):
    c = _client(lm)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="delta", prompt="w1")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="needs a router"):
        _client(plain).completions.create(model="auto", prompt="w1")
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        _client(plain).chat.completions.create(model="plain", messages=[{"role": "user", "content": "w1"}])


def test_a_failing_prompt_fails_alone(lm):
    """A batch holding the debug-failing word raises: its sequences rerun alone, the others answer
    as they do alone, and the failing request gets a 422 in OpenAI's shape."""
    c = _client(lm)
    good = [("alpha", "w1 w2"), ("lm", "w3"), ("gamma", "w4 w5")]
    alone = [c.completions.create(model=m, prompt=p, max_tokens=8, temperature=0).choices[0].text for m, p in good]

    def ask(job):
        m, p = job
        try:
            return c.completions.create(model=m, prompt=p, max_tokens=8, temperature=0).choices[0].text
        except openai.APIStatusError as err:
            return err.status_code, err.body

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, good[:2] + [("beta", f"w1 {FAIL_WORD}")] + good[2:]))
    assert got[:2] + got[3:] == alone
    assert got[2][0] == 422 and "debug_fail_token" in got[2][1]["message"]


def test_overload_answers_503_and_recovers(plain):
    c = _client(plain)
    ask = lambda _: c.completions.with_raw_response.create(model="plain", prompt="w1", max_tokens=2)  # noqa: E731

    def code(i):
        try:
            return ask(i).status_code
        except openai.APIStatusError as err:
            assert err.body["type"] == "server_overloaded" or err.status_code != 503, err.body
            return err.status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(code, range(8)))
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1, codes
    assert ask(0).status_code == 200


def test_a_bad_adapter_fails_the_load_by_name(lm_dir, tmp_path):
    from esm_ray.errors import InputError
    from esm_ray.serve.llm_backend import LLMBackend

    bad = tmp_path / "bad"
    shutil.copytree(lm_dir, bad)
    cfg = json.loads((bad / "adapters" / "beta" / "adapter_config.json").read_text())
    (bad / "adapters" / "beta" / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["nowhere"]}))
    with pytest.raises(InputError, match="adapters"):
        LLMBackend(bad, router_loader="tests.fixtures.lm_dir:load_first_word_router")


def test_the_router_front_picks_the_adapter_for_an_upstream_engine(ray_serve, lm, lm_dir):  # noqa: F811
    """esm_ray.serve.llm_front (the front of cluster/serve-llm.yaml) in front of esm-ray's own LLM
    app as the multi-LoRA engine: `auto` is routed here and sent upstream as `lm:<task>`."""
    from ray import serve

    from esm_ray.serve.llm_front import app_builder

    serve.run(app_builder({"model_dir": str(lm_dir), "upstream": lm, "base_model_id": "lm", "num_cpus": 0.25,
                           "router_loader": "tests.fixtures.lm_dir:load_first_word_router"}),
              name="front", route_prefix="/front")
    try:
        c, direct = _client(f"{ray_serve}/front"), _client(lm)
        assert [m.id for m in c.models.list().data] == ["lm", *TASKS, "auto"]
        msgs = [{"role": "user", "content": "w2 w7"}]  # w2 -> beta (FirstWordRouter)
        r = c.chat.completions.create(model="auto", messages=msgs, max_tokens=6, temperature=0)
        want = direct.chat.completions.create(model="beta", messages=msgs, max_tokens=6, temperature=0)
        assert r.model_extra["esm_ray"]["task"] == "beta"
        assert r.choices[0].message.content == want.choices[0].message.content
        streamed = c.completions.create(model="gamma", prompt="w4", max_tokens=5, temperature=0, stream=True)
        text = "".join(ch.choices[0].text for ch in streamed if ch.choices)
        assert text == direct.completions.create(model="gamma", prompt="w4", max_tokens=5, temperature=0).choices[0].text
        with pytest.raises(openai.BadRequestError, match="different tasks"):
            c.completions.create(model="auto", prompt=["w1 w3", "w2 w3"], max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="delta", prompt="w1")
    finally:
        serve.delete("front")


def test_cli_refuses_encoder_flags_on_a_causal_lm(plain_dir, tiny_bert, capsys):
    from esm_ray.cli import main

    assert main(["serve", str(plain_dir), "--head", "alpha=x"]) == 2
    assert "causal LM" in capsys.readouterr().err
    assert main(["serve", str(tiny_bert["base"]), "--adapters", "peft"]) == 2  # and the reverse
    assert "--adapters is for causal LMs" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.serve
def test_esm_ray_serve_on_a_causal_lm_speaks_openai(lm_dir):
    """`esm-ray serve DIR` (a private Ray) on a causal-LM directory: models, chat, a stream."""
    import subprocess
    import sys
    import tempfile
    import threading
    import time
    from pathlib import Path

    from esm_ray.serve import free_port
    from tests.hostile.test_serve import _end, _private_env

    tmp_path = Path(tempfile.mkdtemp(prefix="esmllm-"))  # short: Ray puts unix sockets under it
    model = shutil.copytree(lm_dir, tmp_path / "model", ignore=shutil.ignore_patterns("router"))  # adapters only
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "esm_ray.cli", "serve", str(model), "--port", str(port),
                             "--num-cpus", "1", "--served-name", "tiny"], env=_private_env(tmp_path), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        t0 = time.monotonic()
        while not any(line.startswith("serving ") for line in lines):
            assert proc.poll() is None and time.monotonic() - t0 < 240, "".join(lines)[-3000:]
            time.sleep(0.5)
        assert "/v1/chat/completions" in next(line for line in lines if line.startswith("serving "))
        c = _client(f"http://127.0.0.1:{port}")
        assert [m.id for m in c.models.list().data] == ["tiny", *TASKS]  # no router/: no `auto`
        r = c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "w1"}], max_tokens=4)
        assert r.model_extra["esm_ray"]["task"] == "alpha" and r.usage.completion_tokens <= 4
        assert list(c.completions.create(model="tiny", prompt="w1", max_tokens=3, stream=True))
        with pytest.raises(openai.BadRequestError, match="no router"):
            c.completions.create(model="auto", prompt="w1")
    finally:
        _end(proc, tmp_path)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_router_naming_a_task_without_adapter_fails_the_load(lm_dir, tmp_path):
    from esm_ray.errors import InputError
    from esm_ray.serve.llm_backend import LLMBackend

    bad = shutil.copytree(lm_dir, tmp_path / "bad", ignore=shutil.ignore_patterns("gamma"))
    with pytest.raises(InputError, match="no adapter for task.*gamma"):
        LLMBackend(bad, router_loader="tests.fixtures.lm_dir:load_first_word_router_of_tasks")


def test_an_s3_directory_loads_with_its_adapters(lm_dir, s3_env, s3_bucket, tmp_path):
    from esm_ray.serve.llm_backend import LLMBackend
    from tests.integration.test_io_s3 import _upload_dir

    _upload_dir(s3_env.client(), s3_bucket, "lms/routed-lm", lm_dir)
    b = LLMBackend(f"s3://{s3_bucket}/lms/routed-lm", cache=tmp_path / "cache",
                   router_loader="tests.fixtures.lm_dir:load_first_word_router")
    assert b.name == "routed-lm" and b.tasks == TASKS and [m["id"] for m in b.model_ids()][-1] == "auto"
    assert (tmp_path / "cache").is_dir()
