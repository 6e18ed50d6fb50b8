"""The LLM service's decoding loop and batcher in process (no Ray): sampling, stop strings held
back from a stream, mixed-adapter batches equal to one-by-one runs."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.fixtures.lm_dir import make_lm_dir

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backend(tiny_llama, tmp_path_factory):
    from esm_ray.serve.llm_backend import LLMBackend

    return LLMBackend(make_lm_dir(tmp_path_factory.mktemp("lmb") / "lm", tiny_llama["base"]))


def test_choose_greedy_and_nucleus():
    from esm_ray.serve.llm_decode import choose

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    g = torch.Generator().manual_seed(0)
    assert choose(logits, 0.0, 1.0, g) == 1
    assert {choose(logits, 1.0, 1e-6, g) for _ in range(50)} == {1}  # the nucleus is the top token
    seen = {choose(logits, 1.0, 0.9, g) for _ in range(400)}
    assert seen == {1, 2}  # tokens 1 and 2 hold > 0.9 of the mass; 0 and 3 are cut
    a = [choose(logits, 1.0, 1.0, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert a == [a[0]] * 3  # a seed fixes the draw


def _run(backend, jobs: list[dict]) -> tuple[list[dict], list[int]]:
    """Submit jobs together; per job: task, text deltas, finish reason, tokens."""
    from esm_ray.serve.llm_batcher import Batcher, Seq

    async def main():
        bt = Batcher(backend, max_batch_size=16, wait_s=0.05, max_waiting=64)
        loop = asyncio.get_running_loop()
        seqs = []
        for j in jobs:
            q: asyncio.Queue = asyncio.Queue()
            seqs.append(Seq(index=0, ids=backend.encode(j["prompt"]), adapter=j.get("adapter"), auto=False,
                            max_tokens=j.get("max_tokens", 12), temperature=j.get("temperature", 0.0), top_p=1.0,
                            seed=j.get("seed"), stop=j.get("stop", []), events=q, loop=loop))
        for s in seqs:
            bt.submit([s])

        async def drain(s):
            out = {"deltas": []}
            while True:
                kind, _, *rest = await s.events.get()
                if kind == "task":
                    out["task"] = rest[0]
                elif kind == "text":
                    out["deltas"].append(rest[0])
                elif kind == "done":
                    return {**out, "reason": rest[0], "tokens": list(s.out)}
                else:
                    raise AssertionError(rest)

        return await asyncio.gather(*[drain(s) for s in seqs]), bt.batches

    return asyncio.run(main())


def test_mixed_adapters_in_one_batch_equal_one_by_one(backend):
    jobs = [{"prompt": "w1 w2 w3", "adapter": a} for a in (None, "alpha", "beta", "gamma")]
    jobs += [{"prompt": "w9", "adapter": "beta"}, {"prompt": "w4 w5 w6 w7 w8", "adapter": None, "temperature": 0.9,
                                                  "seed": 3}]
    alone = [_run(backend, [j])[0][0] for j in jobs]
    together, batches = _run(backend, jobs)
    assert batches == [len(jobs)]  # one batch held them all
    assert [t["tokens"] for t in together] == [a["tokens"] for a in alone]
    assert [t["task"] for t in together] == [j["adapter"] for j in jobs]


def test_a_stop_string_is_never_streamed(backend):
    plain = _run(backend, [{"prompt": "w1 w2 w3", "adapter": "alpha", "max_tokens": 12}])[0][0]
    words = "".join(plain["deltas"]).split()
    k = next(i for i in range(2, len(words)) if " ".join(words[i - 1:i + 1]) not in " ".join(words[:i]))
    stop = " ".join(words[k - 1:k + 1])  # two tokens: the first arrives before we know it stops
    got = _run(backend, [{"prompt": "w1 w2 w3", "adapter": "alpha", "max_tokens": 12, "stop": [stop]}])[0][0]
    text = "".join(got["deltas"])
    assert got["reason"] == "stop" and stop not in text and text.split() == words[:k - 1]  # held back, dropped


def test_task_names_map_to_their_adapters(backend, tiny_llama, tmp_path):
    """A router whose task is called "Alpha!" while its adapter is adapters/alpha: generating for
    the task uses that adapter (peft knows it by its directory's name)."""
    from tests.fixtures.lm_dir import add_router
    from esm_ray.serve.llm_backend import LLMBackend

    renamed = LLMBackend(add_router(make_lm_dir(tmp_path / "lm", tiny_llama["base"])),
                         router_loader="tests.fixtures.lm_dir:load_renamed_router")
    assert renamed.tasks == ["Alpha!", "beta", "gamma"] and renamed.adapter_of["Alpha!"] == "alpha"
    assert renamed.resolve("Alpha!") == ("Alpha!", False)
    got, _ = _run(renamed, [{"prompt": "w1 w2", "adapter": "Alpha!"}])
    want, _ = _run(backend, [{"prompt": "w1 w2", "adapter": "alpha"}])
    assert got[0]["tokens"] == want[0]["tokens"] and got[0]["task"] == "Alpha!"
