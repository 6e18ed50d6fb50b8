"""The LLM service on a real routed LM (esm_ray.routed.lm, an ESM++ merge of the tiny LLaMA
family): `auto` requests of three domains in one decoding batch are routed as RoutedLM.route
routes them and generate the greedy tokens RoutedLM.generate gives each alone. In process (no
Ray); skipped where esm_ray.routed.lm is not part of the tree."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("esm_ray.routed.lm")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def routed_lm_dir(tmp_path_factory):
    from tests.fixtures.lm_dir import word_tokenizer
    from tests.methods.test_routed_lm import build_routed_lms

    out = build_routed_lms(tmp_path_factory.mktemp("served_routed_lm"), ("esm_pp",))["esm_pp"]
    word_tokenizer().save_pretrained(out)  # the family has no tokenizer; the service needs one
    return out


def test_auto_in_one_batch_equals_routed_lm_generate_alone(routed_lm_dir):
    from esm_ray.routed.lm import load_routed_lm
    from esm_ray.serve.llm_backend import LLMBackend
    from esm_ray.serve.llm_batcher import Batcher, Seq
    from tests.methods.test_routed_lm import TASKS, _rows

    backend = LLMBackend(routed_lm_dir)
    assert backend.tasks == TASKS and [m["id"] for m in backend.model_ids()][-1] == "auto"
    rows = [r for t in range(3) for r in _rows(t, 3, seed=200 + t)]

    async def serve_all():
        bt = Batcher(backend, max_batch_size=16, wait_s=0.05, max_waiting=64)
        loop = asyncio.get_running_loop()
        seqs = [Seq(index=0, ids=r, adapter=None, auto=True, max_tokens=8, temperature=0.0, top_p=1.0, seed=None,
                    stop=[], events=asyncio.Queue(), loop=loop) for r in rows]
        for s in seqs:
            bt.submit([s])
        out = []
        for s in seqs:
            task = None
            while True:
                kind, _, *rest = await s.events.get()
                assert kind != "error", rest
                if kind == "task":
                    task = rest[0]
                if kind == "done":
                    break
            out.append((task, list(s.out)))
        return out, bt.batches

    got, batches = asyncio.run(serve_all())
    assert batches == [len(rows)]  # one batch, three domains
    lm = load_routed_lm(routed_lm_dir)
    for r, (task, tokens) in zip(rows, got):
        ids, mask = torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)
        want_task = lm.route(ids, mask)[0]
        want = lm.generate(ids, mask, tasks=[want_task], max_new_tokens=8, do_sample=False,
                           pad_token_id=0)[0, len(r):].tolist()
        want = want[:next((i for i, x in enumerate(want) if x in backend.eos_ids), len(want))]
        assert (task, tokens) == (want_task, want)
    assert [t for t, _ in got] == [TASKS[t] for t in range(3) for _ in range(3)]  # each domain to its expert


def test_the_service_takes_the_likelihood_router_and_its_candidates(routed_lm_dir, tmp_path):
    """LLMOptions' router, likelihood_candidates, likelihood_margin and router_depth reach the loaded router: `auto` prompts
    route as RoutedLM with the same choice routes them; a loader that cannot take the choice,
    and a causal LM asked for an encoder-only router, are refused by name."""
    from esm_ray.cli import main
    from esm_ray.errors import InputError
    from esm_ray.routed.lm import load_routed_lm
    from esm_ray.serve.llm_backend import LLMBackend, route_prompts
    from tests.methods.test_routed_lm import TASKS, _rows

    backend = LLMBackend(routed_lm_dir, router="likelihood", likelihood_candidates=2, likelihood_margin=0.5,
                         router_depth=1)
    assert (backend.router.router, backend.router.likelihood_candidates) == ("likelihood", 2)
    assert (backend.router.likelihood_margin, backend.router.router_depth) == (0.5, 1)
    assert backend.stacked is not None and backend.stacked is backend.router.stacked  # stacked once
    rows = [r for t in range(3) for r in _rows(t, 4, seed=300 + t)]
    lm = load_routed_lm(routed_lm_dir, router="likelihood", likelihood_candidates=2)
    backend.router.likelihood_margin = lm.likelihood_margin  # below: the same rule as `lm`
    backend.router.router_depth = lm.router_depth
    want = [lm.route(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0] for r in rows]
    assert route_prompts(backend.router, rows, TASKS, pad_id=0) == want
    with pytest.raises(InputError, match="takes no router"):
        LLMBackend(routed_lm_dir, router="likelihood",
                   router_loader="tests.fixtures.lm_dir:load_first_word_router")
    for bad in (["--router", "oracle"], ["--likelihood-candidates", "0"], ["--likelihood-margin", "-1"],
                ["--router-depth", "0"]):
        assert main(["serve", str(routed_lm_dir), "--host", "127.0.0.1", *bad]) == 2
