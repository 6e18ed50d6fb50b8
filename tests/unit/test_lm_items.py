"""esm_ray.models.lm_items against the plain computation it replaces: every sequence whole,
alone, the LM head on every position. Prompts run once with their choices continued from
the key/value cache, batches sorted by length, the head only on scored positions: the
log-likelihoods must not move (float tolerance)."""

from __future__ import annotations

import random

import pytest
import torch

from esm_ray.models.lm_items import choice_items, encode_pair, prefix_token_id, rolling_items
from tests.fixtures.lm_dir import WORDS, word_tokenizer


@pytest.fixture(scope="module")
def lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), word_tokenizer(None)


@torch.no_grad()
def _plain(model, ids: list[int], k: int) -> float:
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    n = len(ids)
    return float(sum(logp[n - k - 1 + i, t] for i, t in enumerate(ids[n - k:])))


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_choice_items_equal_each_choice_scored_whole(lm, batch_size):
    model, tok = lm
    rng = random.Random(1)
    prompts = [_text(rng, rng.randint(1, 30)) for _ in range(11)]
    choices = ["w3", "w4 w5", "w6 w7 w8"]  # one, two and three continuation tokens
    labels = [rng.randrange(3) for _ in prompts]
    items = choice_items(model, tok, prompts, choices, labels, batch_size=batch_size)
    for p, y, it in zip(prompts, labels, items):
        want = []
        for c in choices:
            ctx, cont = encode_pair(tok, p, " " + c)
            want.append(_plain(model, ctx + cont, len(cont)))
        assert it["lls"] == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert it["label"] == y and it["correct"] == float(max(range(3), key=want.__getitem__) == y)


def test_choice_items_single_token_choices(lm):
    model, tok = lm
    rng = random.Random(2)
    prompts = [_text(rng, rng.randint(1, 20)) for _ in range(5)]
    items = choice_items(model, tok, prompts, ["w1", "w2"], [0] * 5, batch_size=2)
    for p, it in zip(prompts, items):
        want = [_plain(model, ctx + cont, len(cont)) for ctx, cont in
                (encode_pair(tok, p, " " + c) for c in ("w1", "w2"))]
        assert it["lls"] == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_rolling_items_equal_each_text_scored_whole(lm, batch_size):
    model, tok = lm
    rng = random.Random(3)
    texts = [_text(rng, rng.randint(1, 40)) for _ in range(9)]
    items = rolling_items(model, tok, texts, batch_size=batch_size)
    pre = prefix_token_id(tok)
    for t, it in zip(texts, items):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert it["ll"] == pytest.approx(_plain(model, [pre, *ids], len(ids)), rel=1e-5, abs=1e-5)
        assert it["tokens"] == len(ids) and it["words"] == len(t.split())


def test_training_loss_equals_the_models_own_loss(lm):
    """lm_train.loss_on_labels (head only on labelled positions) = the HF model's loss, value and gradient."""
    from esm_ray.zoo.lm_train import batch, loss_on_labels

    model, _ = lm
    rng = random.Random(4)
    ex = [([rng.randrange(8, 80) for _ in range(n)], k) for n, k in ((12, 3), (7, 6), (20, 1), (5, 4))]
    ids, mask, labels = batch(ex, 0)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    try:
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        gw = torch.autograd.grad(want, params)
        got = loss_on_labels(model, ids, mask, labels)
        gg = torch.autograd.grad(got, params)
    finally:
        for p in params:
            p.requires_grad_(False)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
