"""Stacked LoRA adapters (esm_ray.routed.multi_lora) against peft itself: a batch whose rows name
different adapters (or none) gives, row by row, peft's logits for that row's adapter; peft's own
answers do not move when its weights become views of the stacks; anything but vanilla LoRA on
nn.Linear is refused by name."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

# adapters of different ranks, scalings and target modules: the stacks pad ranks and leave a
# layer's slot empty where an adapter has no factors
ADAPTERS = {
    "a": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "b": dict(r=2, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"]),
    "c": dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["k_proj", "v_proj", "down_proj"]),
}


def _peft_model(base_dir, adapters=ADAPTERS, seed: int = 0):
    """The tiny LLaMA with every adapter of `adapters` loaded in peft, random factors."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    model = None
    for name, cfg in adapters.items():
        config = LoraConfig(init_lora_weights=False, **cfg)
        if model is None:
            model = PeftModel(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), config,
                              adapter_name=name)
        else:
            model.add_adapter(name, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    return model.eval()


def _batch(seed: int = 1, rows: int = 5, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 80, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on some rows
    mask[3, :4] = 0
    return ids, mask


def _peft_logits(model, ids, mask, names):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, adapter_names=[n or "__base__" for n in names]).logits


def test_rows_on_different_adapters_give_peft_logits(tiny_llama):
    from esm_ray.routed.multi_lora import MultiLoRA

    model = _peft_model(tiny_llama["base"])
    ids, mask = _batch()
    names = ["a", None, "c", "b", "a"]
    want = _peft_logits(model, ids, mask, names)
    alone = [_peft_logits(model, ids[i:i + 1], mask[i:i + 1], [n]) for i, n in enumerate(names)]
    stacked, why = MultiLoRA.of(model)
    assert why is None and stacked is not None
    with stacked.rows(names) as m, torch.no_grad():
        got = m(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for i in range(len(names)):  # each row as peft gives it alone
        torch.testing.assert_close(got[i:i + 1], alone[i], rtol=1e-5, atol=1e-5)
    # the adapters matter: rows with the other adapters' factors differ beyond the tolerance
    other = _peft_logits(model, ids, mask, ["b", "a", "a", "c", None])
    assert (other - want).abs().amax(-1).amin() > 1e-3


@pytest.mark.parametrize("names", [["b"] * 5, [None] * 5])
def test_one_adapter_for_every_row_gives_peft_logits(tiny_llama, names):
    from esm_ray.routed.multi_lora import MultiLoRA

    model = _peft_model(tiny_llama["base"])
    ids, mask = _batch(seed=2)
    want = _peft_logits(model, ids, mask, names)
    stacked, _ = MultiLoRA.of(model)
    with stacked.rows(names) as m, torch.no_grad():
        got = m(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gathering_at_each_call_equals_keeping_the_gathered_factors(tiny_llama):
    from esm_ray.routed.multi_lora import MultiLoRA

    model = _peft_model(tiny_llama["base"])
    ids, mask = _batch(seed=3)
    names = ["c", "a", None, "b", "c"]
    kept, _ = MultiLoRA.of(model)
    with kept.rows(names) as m, torch.no_grad():
        want = m(input_ids=ids, attention_mask=mask).logits
    kept.cache_bytes = 0  # over the budget: gathered again at every call
    with kept.rows(names) as m, torch.no_grad():
        got = m(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)


def test_peft_answers_the_same_after_stacking_and_gets_its_layers_back(tiny_llama):
    from peft.tuners.lora.layer import Linear as LoraLinear

    from esm_ray.routed.multi_lora import MultiLoRA, StackedLoRALinear

    model = _peft_model(tiny_llama["base"])
    ids, mask = _batch(seed=4)
    names = ["a", "b", "c", None, "b"]
    before = _peft_logits(model, ids, mask, names)
    lora_bytes = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    stacked, _ = MultiLoRA.of(model)
    with pytest.raises(RuntimeError, match="boom"):
        with stacked.rows(names) as m:
            assert any(isinstance(x, StackedLoRALinear) for x in m.modules())
            raise RuntimeError("boom")
    assert not any(isinstance(x, StackedLoRALinear) for x in model.modules())
    assert any(isinstance(x, LoraLinear) for x in model.modules())
    # the same numbers (a lower rank's lora_B is a strided view: the last place may round apart)
    torch.testing.assert_close(_peft_logits(model, ids, mask, names), before, rtol=0, atol=1e-6)
    # peft's weights are views into the stacks: the adapters are held once
    layer = next(x for x in model.modules() if isinstance(x, LoraLinear) and "a" in x.lora_A)
    swapped = next(s for _, _, orig, s in stacked._swaps if orig is layer)
    assert layer.lora_A["a"].weight.untyped_storage().data_ptr() == swapped.A.untyped_storage().data_ptr()
    assert lora_bytes == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_unknown_adapters_are_refused_by_name(tiny_llama):
    from esm_ray.routed.multi_lora import MultiLoRA

    stacked, _ = MultiLoRA.of(_peft_model(tiny_llama["base"]))
    with pytest.raises(ValueError, match="unknown adapter.*zeta"):
        with stacked.rows(["a", "zeta"]):
            pass


def test_dora_is_not_stacked_and_says_where(tiny_llama):
    from esm_ray.routed.multi_lora import MultiLoRA

    model = _peft_model(tiny_llama["base"], {"a": ADAPTERS["a"],
                                             "d": dict(r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj"])})
    stacked, why = MultiLoRA.of(model)
    assert stacked is None and "q_proj" in why and "'d'" in why and "DoRA" in why


def test_adapters_of_one_rank_leave_peft_bit_for_bit(tiny_llama):
    from esm_ray.routed.multi_lora import MultiLoRA

    same = {k: {**v, "r": 4, "lora_alpha": 4, "use_rslora": False} for k, v in ADAPTERS.items()}
    model = _peft_model(tiny_llama["base"], same)
    ids, mask = _batch(seed=5)
    names = ["c", "b", "a", None, "a"]
    before = _peft_logits(model, ids, mask, names)
    MultiLoRA.of(model)
    assert torch.equal(_peft_logits(model, ids, mask, names), before)


def test_the_server_backend_decodes_the_same_tokens_stacked_or_with_peft(tiny_llama, tmp_path):
    """LLMBackend's default (stacked adapters) against `stacked=False` (peft's mixed-adapter
    batch): greedy and seeded-sampled rows on different adapters give the same tokens."""
    from esm_ray.serve.llm_backend import LLMBackend
    from esm_ray.serve.llm_decode import Row
    from tests.fixtures.lm_dir import make_lm_dir

    d = make_lm_dir(tmp_path / "lm", tiny_llama["base"])
    stacked, plain = LLMBackend(d), LLMBackend(d, stacked=False)
    assert stacked.stacked is not None and plain.stacked is None

    def run(backend) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(5)]
        rows = [Row(backend.encode(p), a, 12, temperature=t, seed=7) for p, a, t in
                [("w1 w2 w3", "alpha", 0.0), ("w9", None, 0.0), ("w4 w4 w5 w6 w7", "gamma", 0.0),
                 ("w30 w31", "beta", 0.8), ("w2 w2", "alpha", 0.8)]]
        for i, r in enumerate(rows):
            r.on_token = (lambda i: lambda tok: out[i].append(tok))(i)
        backend.generate(rows)
        return out

    got, want = run(stacked), run(plain)
    assert got == want and all(got)


def test_float32_adapters_on_a_bfloat16_base_give_peft_logits(tiny_llama):
    """peft keeps adapters in float32 on a half-precision base; the stacks compute as it does."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from esm_ray.routed.multi_lora import MultiLoRA

    model = PeftModel(AutoModelForCausalLM.from_pretrained(str(tiny_llama["base"]), dtype=torch.bfloat16),
                      LoraConfig(init_lora_weights=False, **ADAPTERS["a"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(init_lora_weights=False, **ADAPTERS["b"]))
    model.eval()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    ids, mask = _batch(seed=6)
    names = ["a", "b", None, "a", "b"]
    stacked, _ = MultiLoRA.of(model)
    for rows in (names, ["b"] * 5):
        with stacked.rows(rows) as m, torch.no_grad():
            got = m(input_ids=ids, attention_mask=mask).logits
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), _peft_logits(model, ids, mask, rows).float(), rtol=0, atol=2e-2)
