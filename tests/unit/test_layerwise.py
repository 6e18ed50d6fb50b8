"""Layer-wise calibration (`calibration.mode: layerwise`): the same statistics as the full pass,
one block in memory at a time, a clear error for a model it cannot cut into blocks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from esm_ray.errors import InputError
from esm_ray.models.blocks import BlockModel
from esm_ray.models.hf import StoredModel
from esm_ray.spec import CalibrationSpec
from esm_ray.stats import StatsStore, calibrate, calibrate_expert

VOCAB = 60  # below every tiny model's vocabulary


def _data(path: Path, n: int = 7, seed: int = 0) -> Path:
    """Rows of 3 to 13 token ids: with batch_size 3 most batches hold padding."""
    import json

    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"input_ids": [rng.randrange(1, VOCAB) for _ in range(rng.randrange(3, 14))]})
                            + "\n" for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def more_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen2 (tied embeddings, sliding-window layers beside full-attention ones: a
    different mask per layer), Mistral (sliding window), GPT-2 (Conv1D layers, learned positions),
    OPT (linear layers before and after the blocks) and ALBERT (shared layers: no block list)."""
    from transformers import (AlbertConfig, AlbertModel, GPT2Config, GPT2LMHeadModel, MistralConfig,
                              MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    root = tmp_path_factory.mktemp("layerwise_models")
    small = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    models = {
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**small, num_hidden_layers=3, use_sliding_window=True,
                                              sliding_window=4, max_window_layers=1, tie_word_embeddings=True)),
        "mistral": MistralForCausalLM(MistralConfig(**small, num_hidden_layers=2, sliding_window=4)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=80, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=1, eos_token_id=2)),  # Conv1D: weights stored (d_in, d_out)
        "opt": OPTForCausalLM(OPTConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=16,
                                        pad_token_id=1, bos_token_id=2, eos_token_id=2)),  # linear layers before
        # the blocks (project_in) and after them (project_out, then the head)
        "albert": AlbertModel(AlbertConfig(vocab_size=80, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=48)),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _both(model: Path, data: Path, tmp: Path, **settings) -> tuple[StatsStore, StatsStore]:
    """The statistics of the full and the layer-wise pass (separate caches: mode is not in the key)."""
    full = calibrate_expert(str(model), str(data), CalibrationSpec(
        samples=7, batch_size=3, max_length=16, cache_dir=str(tmp / "full"), **settings))
    layer = calibrate_expert(str(model), str(data), CalibrationSpec(
        samples=7, batch_size=3, max_length=16, cache_dir=str(tmp / "layer"), mode="layerwise", **settings))
    return full, layer


def _assert_same(full: StatsStore, layer: StatsStore) -> None:
    assert not list(layer.path.parent.glob(".esm-ray-spill-*")), "spilled parts left behind"
    assert layer.manifest["tokens"] == full.manifest["tokens"]
    assert layer.manifest["distinct_inputs"] == full.manifest["distinct_inputs"]
    assert full.modules() == layer.modules()
    assert full.shared() == layer.shared()
    for m in sorted(full.modules()):
        a, b = full.get(m), layer.get(m)
        assert a.n == b.n, m
        scale = float(a.gram.abs().max())
        torch.testing.assert_close(b.s1, a.s1, rtol=1e-6, atol=1e-9 * scale, msg=m)
        torch.testing.assert_close(b.gram, a.gram, rtol=1e-6, atol=1e-9 * scale, msg=m)


@pytest.mark.parametrize("precision", ["mixed", "float64"])
def test_layerwise_equals_full_on_llama(tiny_llama, tmp_path, precision):
    full, layer = _both(tiny_llama["expert_0"], _data(tmp_path / "d.jsonl"), tmp_path, gram_precision=precision)
    assert "lm_head" in full.modules()  # the head after the final norm is calibrated too
    _assert_same(full, layer)


def test_layerwise_equals_full_on_bert(tiny_bert, tmp_path):
    full, layer = _both(tiny_bert["expert_1"], _data(tmp_path / "d.jsonl"), tmp_path)
    assert "pooler.dense" in full.modules()
    _assert_same(full, layer)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2", "opt"])
def test_layerwise_equals_full_on_more_architectures(more_models, tmp_path, arch):
    full, layer = _both(more_models[arch], _data(tmp_path / "d.jsonl", seed=2), tmp_path)
    if arch == "opt":
        assert {"model.decoder.project_in", "model.decoder.project_out", "lm_head"} <= full.modules()
    _assert_same(full, layer)


def test_padding_never_counts(tiny_llama, tmp_path):
    data = _data(tmp_path / "d.jsonl")
    _, layer = _both(tiny_llama["base"], data, tmp_path)
    import json

    tokens = sum(min(len(json.loads(ln)["input_ids"]), 16) for ln in data.read_text().splitlines())
    assert {layer.get(m).n for m in layer.modules()} == {tokens}


class _Watched(BlockModel):
    """A BlockModel that notes, at every load, how many blocks hold real (non-meta) tensors."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.loaded_blocks: list[int] = []
        self.loads: list[str] = []

    def load(self, name: str):
        mod = super().load(name)
        self.loads.append(name)
        self.loaded_blocks.append(sum(1 for b in self.blocks if any(p.device.type != "meta" for p in b.parameters())))
        return mod


def test_one_block_in_memory_at_a_time(more_models):
    src = StoredModel(str(more_models["qwen2"]), None)
    try:
        bm = _Watched(src, torch.float32, torch.device("cpu"))
        rng = random.Random(1)
        rows = [{"input_ids": [rng.randrange(1, VOCAB) for _ in range(9)]} for _ in range(4)]
        parts: list[set[str]] = []
        stats = calibrate(bm.model, rows, None, CalibrationSpec(samples=4, batch_size=2), blocks=bm,
                          emit=lambda part: parts.append(set(part)))
    finally:
        src.close()
    assert stats == {}  # every part was handed over, none kept
    parts = [p for p in parts if p]
    assert [sorted({".".join(n.split(".")[:3]) for n in p}) for p in parts] == \
        [[f"model.layers.{i}"] for i in range(3)] + [["lm_head"]]
    assert [n for n in bm.loads if n.startswith("model.layers.")] == [f"model.layers.{i}" for i in range(3)]
    assert max(bm.loaded_blocks) == 1
    # the head's statistics (the last part) come from its input: the pass ends at the head,
    # which is never loaded, and no logits are formed
    assert "lm_head" not in bm.loads
    assert all(p.device.type == "meta" for b in bm.blocks for p in b.parameters())  # every block freed
    assert "model.layers.2.mlp.down_proj" in parts[2]


def test_layerwise_budget_splits_passes_within_a_block(tiny_llama, tmp_path):
    full, _ = _both(tiny_llama["expert_2"], _data(tmp_path / "d.jsonl"), tmp_path)
    src = StoredModel(str(tiny_llama["expert_2"]), None)
    try:
        bm = BlockModel(src, torch.float32, torch.device("cpu"))
        from esm_ray.stats.data import load_calibration_rows

        rows = load_calibration_rows(str(tmp_path / "d.jsonl"), 7, 0)
        stats = calibrate(bm.model, rows, None, CalibrationSpec(samples=7, batch_size=3, max_length=16),
                          blocks=bm, max_bytes=8 * 33 * 33)  # one 32-wide input per pass
    finally:
        src.close()
    for m, st in stats.items():
        torch.testing.assert_close(st.gram, full.get(m).gram, rtol=1e-6, atol=1e-9)


def test_unsupported_architecture_is_named(more_models, tmp_path):
    data = _data(tmp_path / "d.jsonl")
    with pytest.raises(InputError, match=r"albert.*layer-wise calibration does not support architecture "
                                         r"AlbertModel.*calibration.mode: full"):
        calibrate_expert(str(more_models["albert"]), str(data),
                         CalibrationSpec(samples=4, cache_dir=str(tmp_path), mode="layerwise"))
    # the full pass still calibrates it
    assert calibrate_expert(str(more_models["albert"]), str(data),
                            CalibrationSpec(samples=4, cache_dir=str(tmp_path))).modules()


def test_dry_run_names_an_unsupported_architecture(more_models, tmp_path, capsys):
    from esm_ray.cli import main
    from tests.builders import import_methods, write_spec

    import_methods()
    fam = {"base": more_models["albert"], "expert_0": more_models["albert"], "expert_1": more_models["albert"]}
    data = [_data(tmp_path / f"d{i}.jsonl", seed=i) for i in range(2)]
    spec = write_spec(tmp_path / "s.yaml", fam, tmp_path / "out", method="esm", n_experts=2, data=data,
                      calibration={"mode": "layerwise", "cache_dir": str(tmp_path / "cache")})
    assert main(["merge", str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "calibration.mode" in err and "AlbertModel" in err
    spec.write_text(spec.read_text().replace("mode: layerwise", "mode: full"))
    assert main(["merge", str(spec), "--dry-run"]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_layerwise_on_cuda_matches_full_on_cpu(tiny_llama, tmp_path):
    """Blocks loaded straight onto the GPU, activations and Grams there (TF32 allowed or not)."""
    data = _data(tmp_path / "d.jsonl")
    settings = dict(samples=7, batch_size=3, max_length=16)
    full = calibrate_expert(str(tiny_llama["expert_0"]), str(data),
                            CalibrationSpec(**settings, cache_dir=str(tmp_path / "cpu")))
    gpu = calibrate_expert(str(tiny_llama["expert_0"]), str(data),
                           CalibrationSpec(**settings, cache_dir=str(tmp_path / "gpu"), mode="layerwise"),
                           device="cuda")
    assert full.modules() == gpu.modules()
    for m in sorted(full.modules()):
        a, b = full.get(m), gpu.get(m)
        assert a.n == b.n
        torch.testing.assert_close(b.gram, a.gram, rtol=2e-3, atol=2e-3 * float(a.gram.abs().max()), msg=m)


def test_dry_run_estimates_one_blocks_grams(tiny_llama, tmp_path, capsys):
    from esm_ray.cli import main
    from tests.builders import import_methods, write_spec

    import_methods()
    data = [_data(tmp_path / f"d{i}.jsonl", seed=i) for i in range(2)]
    for mode in ("full", "layerwise"):
        spec = write_spec(tmp_path / f"{mode}.yaml", tiny_llama, tmp_path / "out", method="esm", n_experts=2,
                          data=data, calibration={"mode": mode, "cache_dir": str(tmp_path / "cache")})
        assert main(["merge", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # hidden 32, intermediate 48: 7 matrices per block (6 read 32 wide, down_proj 48), 2 blocks, lm_head
    assert "calibration Gram matrices, one expert at a time (upper bound): 0.2 MB" in out
    assert "calibration Gram matrices of one block (layer-wise, upper bound): 0.1 MB" in out
    assert "layer-wise, one of model.layers at a time" in out


def test_missing_block_tensor_is_named(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.builders import copy_family

    fam = copy_family({"expert_0": tiny_llama["expert_0"]}, tmp_path / "fam")
    f = fam["expert_0"] / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"^\S*expert_0: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        calibrate_expert(str(fam["expert_0"]), str(_data(tmp_path / "d.jsonl")),
                         CalibrationSpec(samples=4, cache_dir=str(tmp_path / "c"), mode="layerwise"))
    assert not list((tmp_path / "c" / "stats").glob(".esm-ray-spill-*")), "spilled parts left behind"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "opt"])
def test_full_pass_skips_the_logits_and_keeps_the_heads_statistics(more_models, tiny_llama, tmp_path, arch):
    """A causal LM is calibrated through its base model alone, its last hidden state handed to
    the head's statistics: every module's statistics equal those of hooks on the whole model's
    forward (head included), and the head runs once, on the first batch (the check that it
    reads the base model's output), of the three."""
    import json

    from transformers import AutoModelForCausalLM

    from esm_ray.models.text import encode_rows, make_batches, pad_id
    from esm_ray.stats.calibrate import output_head
    from esm_ray.stats.hooks import StatsCollector

    path = tiny_llama["expert_0"] if arch == "llama" else more_models[arch]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    rows = [json.loads(line) for line in _data(tmp_path / "d.jsonl", seed=3).read_text().splitlines()]
    settings = CalibrationSpec(samples=7, batch_size=3, max_length=16)
    name, head, _ = output_head(model)
    calls = []
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = calibrate(model, rows, None, settings)
    finally:
        handle.remove()
    assert len(calls) == 1 and name in got
    ids = encode_rows(rows, None, settings.max_length)
    with torch.inference_mode(), StatsCollector(model) as col:
        for batch_ids, mask in make_batches(ids, settings.batch_size, pad_id(model, None)):
            col.begin_batch(mask)
            model(input_ids=batch_ids, attention_mask=mask, use_cache=False)
    want = col.results()
    assert set(got) == set(want)
    for m in want:
        assert got[m].n == want[m].n, m
        torch.testing.assert_close(got[m].s1, want[m].s1, rtol=0, atol=0, msg=m)
        torch.testing.assert_close(got[m].gram, want[m].gram, rtol=0, atol=0, msg=m)


def test_a_head_behind_a_transform_runs_in_the_whole_forward(tiny_bert, tmp_path):
    """An encoder has no output head; a masked-LM head reads a transformed hidden state, not
    the base model's: calibration then runs the whole model, and the statistics are the hooks'."""
    import json

    from transformers import AutoModel, BertConfig, BertForMaskedLM

    from esm_ray.stats.calibrate import output_head

    assert output_head(AutoModel.from_pretrained(str(tiny_bert["expert_0"]))) is None
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=48)).eval()
    assert output_head(mlm) is not None
    rows = [json.loads(line) for line in _data(tmp_path / "d.jsonl").read_text().splitlines()]
    calls = []
    handle = mlm.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        got = calibrate(mlm, rows, None, CalibrationSpec(samples=7, batch_size=3, max_length=16))
    finally:
        handle.remove()
    assert len(calls) == 1 + 3  # the check, then every batch through the whole model
    assert got["cls.predictions.decoder"].n == got["bert.encoder.layer.0.attention.self.query"].n


@pytest.mark.parametrize("arch", ["llama", "bert", "qwen2", "gpt2", "opt"])
def test_support_features_layerwise_equal_the_whole_models(more_models, tiny_llama, tiny_bert, tmp_path, arch):
    """SiM's support features (mean last hidden state over each row's tokens) computed one
    block at a time equal those of the whole model, on padded batches; the tail runs the base
    model only, so a causal LM's head is never loaded (its weight stays on the meta device)."""
    import json

    from esm_ray.models.features import pooled_features
    from esm_ray.models.text import make_batches
    from esm_ray.stats.layerwise import calibrate_layerwise

    model = {"llama": tiny_llama["base"], "bert": tiny_bert["base"]}.get(arch) or more_models[arch]
    rows = [json.loads(r)["input_ids"] for r in _data(tmp_path / "d.jsonl").read_text().splitlines()]
    batches = list(make_batches(rows, 3, 0))
    src = StoredModel(str(model), None)
    whole = src.load(torch.float32, "cpu")
    want = torch.cat([pooled_features(whole, ids, mask) for ids, mask in batches])
    bm = BlockModel(src, torch.float32, torch.device("cpu"))
    pooled: list[torch.Tensor] = []
    with torch.inference_mode():
        assert calibrate_layerwise(bm, batches, modules=[], pooled=pooled) == {}
    got = torch.cat(pooled)
    assert got.shape == want.shape == (7, want.shape[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    head = bm.model.get_output_embeddings() if hasattr(bm.model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear) and arch != "qwen2":  # qwen2's head is the tied embedding
        assert head.weight.is_meta


def test_plan_finds_the_blocks_in_the_stored_names(tiny_llama, tmp_path, monkeypatch):
    """The plan's check reads the block list from the checkpoint's names and the config's depth,
    without building the model class (whose code costs a process about 150 MB to import)."""
    from esm_ray.models import blocks
    from esm_ray.runtime import build_plan
    from esm_ray.spec import load_spec
    from tests.builders import import_methods, write_spec

    import_methods()
    monkeypatch.setattr(blocks, "skeleton", lambda *a, **k: pytest.fail("the plan built the model class"))
    data = [_data(tmp_path / f"d{i}.jsonl", seed=i) for i in range(2)]
    spec = write_spec(tmp_path / "s.yaml", tiny_llama, tmp_path / "out", method="esm", n_experts=2, data=data,
                      calibration={"mode": "layerwise", "cache_dir": str(tmp_path / "cache")})
    assert build_plan(load_spec(spec)).blocks == "model.layers"
    names = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight",
             "bert.encoder.layer.1.output.dense.weight", "cls.predictions.bias"]
    assert blocks.stored_blocks(names, 2) == "bert.encoder.layer"
    assert blocks.stored_blocks(["h.0.attn.c_attn.weight", "h.1.mlp.c_fc.weight", "wte.weight"], 2) == "h"
    assert blocks.stored_blocks(names, 3) is None  # not num_hidden_layers blocks
    shared = ["encoder.albert_layer_groups.0.albert_layers.0.ffn.weight"]  # ALBERT: one shared layer
    with pytest.raises(InputError, match="does not support architecture AlbertModel"):
        blocks.check_blocks({"architectures": ["AlbertModel"], "num_hidden_layers": 2}, "m", shared)


def test_large_tensors_are_read_into_their_parameters_in_row_blocks(tiny_llama, tmp_path, monkeypatch):
    """A stored tensor larger than READ_BYTES (an embedding) is copied into its parameter a row
    block at a time: the same statistics as the full pass."""
    from esm_ray.io.reader import ModelReader
    from esm_ray.models import blocks

    monkeypatch.setattr(blocks, "READ_BYTES", 256)
    reads: list[tuple[str, tuple[int, int] | None]] = []
    real = ModelReader.get
    monkeypatch.setattr(ModelReader, "get", lambda self, name, out=None, rows=None: (
        reads.append((name, rows)), real(self, name, out=out, rows=rows))[1])
    model, data = str(tiny_llama["expert_0"]), str(_data(tmp_path / "d.jsonl"))
    full = calibrate_expert(model, data, CalibrationSpec(samples=7, batch_size=3, max_length=16,
                                                         cache_dir=str(tmp_path / "full")))
    reads.clear()
    layer = calibrate_expert(model, data, CalibrationSpec(samples=7, batch_size=3, max_length=16,
                                                          cache_dir=str(tmp_path / "layer"), mode="layerwise"))
    _assert_same(full, layer)
    emb = [r for n, r in reads if n == "model.embed_tokens.weight"]
    assert len(emb) > 1 and None not in emb


def test_auto_mode_runs_adapters_layerwise_and_full_experts_whole():
    """`calibration.mode: auto` (the default): layer-wise for a LoRA adapter whose block list is
    found, a full pass for a full expert or an architecture without one; `layerwise` refuses
    such an architecture by name."""
    from esm_ray.models.blocks import layerwise_blocks

    llama = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert layerwise_blocks("auto", True, llama, names, "m") == "model.layers"
    assert layerwise_blocks("auto", False, llama, names, "m") is None
    assert layerwise_blocks("full", True, llama, names, "m") is None
    assert layerwise_blocks("layerwise", False, llama, names, "m") == "model.layers"
    albert = {"architectures": ["AlbertModel"], "num_hidden_layers": 2}
    shared = ["encoder.albert_layer_groups.0.albert_layers.0.ffn.weight"]
    assert layerwise_blocks("auto", True, albert, shared, "m") is None
    with pytest.raises(InputError, match="does not support architecture AlbertModel"):
        layerwise_blocks("layerwise", True, albert, shared, "m")


def test_auto_mode_falls_back_to_the_full_pass_where_blocks_cannot_run_alone(lora_family, tmp_path, monkeypatch,
                                                                            caplog):
    """An adapter whose model turns out not to run block by block (here: the record pass says
    so) is calibrated whole under `auto`, with a warning; `layerwise` fails by name."""
    import json
    import logging

    import importlib

    from esm_ray.models.blocks import LayerwiseUnsupported

    cal_mod = importlib.import_module("esm_ray.stats.calibrate")

    def refuse(bm, *a, **k):
        raise LayerwiseUnsupported(f"{bm.uri}: the forward pass of {bm.arch} called 1 of its 2 blocks")

    monkeypatch.setattr(cal_mod, "calibrate_layerwise", refuse)
    data = _data(tmp_path / "d.jsonl")
    adapter, base = str(lora_family["lora_0"]), str(lora_family["base"])
    settings = dict(samples=7, batch_size=3, max_length=16)
    with caplog.at_level(logging.WARNING, logger="esm_ray"):
        store = calibrate_expert(adapter, str(data), CalibrationSpec(**settings, cache_dir=str(tmp_path / "a")),
                                 base_uri=base)
    assert store.manifest["mode"] == "full" and store.modules()
    assert "calibrating the whole model instead" in caplog.text
    assert not list((tmp_path / "a" / "stats").glob(".esm-ray-spill-*"))
    with pytest.raises(InputError, match="called 1 of its 2 blocks"):
        calibrate_expert(adapter, str(data), CalibrationSpec(**settings, cache_dir=str(tmp_path / "l"),
                                                             mode="layerwise"), base_uri=base)
    assert json.loads(next((tmp_path / "a" / "stats").glob("*.json")).read_text())["mode"] == "full"
