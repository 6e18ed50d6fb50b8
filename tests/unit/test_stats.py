"""Calibration: data files, hooks (padding, shared inputs, upcasting, Conv1D), passes under a
memory budget, the on-disk cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from esm_ray.errors import InputError
from esm_ray.spec import CalibrationSpec
from esm_ray.stats import StatsCollector, StatsStore, calibrate, calibrate_expert, data_hash, load_calibration_rows
from esm_ray.models.text import make_batches
from esm_ray.stats.hooks import plan_passes, stats_bytes


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _id_rows(n: int, seed: int, vocab: int = 90, lo: int = 3, hi: int = 15) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(n)]


def _assert_same(a: dict, b: dict, rtol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].n == b[k].n, k
        scale = float(a[k].gram.abs().max())
        torch.testing.assert_close(a[k].gram, b[k].gram, rtol=rtol, atol=rtol * scale)
        torch.testing.assert_close(a[k].s1, b[k].s1, rtol=rtol, atol=rtol * float(a[k].s1.abs().max()))


@pytest.fixture(scope="module")
def bert(tiny_bert):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(tiny_bert["expert_0"])).eval()


# ---- data ---------------------------------------------------------------------------------------

def test_jsonl_and_text_rows_are_picked_deterministically(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"sample {i}"}) for i in range(20)) + "\n\n")
    a = load_calibration_rows(str(p), 5, seed=3)
    assert a == load_calibration_rows(str(p), 5, seed=3)
    assert a != load_calibration_rows(str(p), 5, seed=4)
    assert len({r["text"] for r in a}) == 5
    # the first n of one shuffle: a larger n extends a smaller one
    assert load_calibration_rows(str(p), 8, seed=3)[:5] == a
    assert len(load_calibration_rows(str(p), 50, seed=0)) == 20
    t = tmp_path / "d.txt"
    t.write_text("first line\n\n  second  \nthird\n")
    assert sorted(r["text"] for r in load_calibration_rows(str(t), 10, 0)) == ["first line", "second", "third"]
    ids = tmp_path / "ids.data"  # unknown suffix, sniffed as JSONL
    ids.write_text('{"input_ids": [1, 2, 3]}\n')
    assert load_calibration_rows(str(ids), 1, 0) == [{"input_ids": [1, 2, 3]}]


@pytest.mark.parametrize("content,needle", [
    ('{"text": "ok"}\n{"text": "broken"\n', "line 2"),
    ('{"text": "ok"}\n\n{"label": 1}\n', "line 3"),
    ('{"input_ids": []}\n', "line 1"),
    ('{"input_ids": [1, "a"]}\n', "line 1"),
    ('["text"]\n', "line 1"),
    ("\n\n", "empty"),
])
def test_bad_data_files_name_the_file_and_line(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(InputError) as e:
        load_calibration_rows(str(p), 4, 0)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_missing_file_and_content_hash(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_calibration_rows(str(tmp_path / "nope.jsonl"), 1, 0)
    p = tmp_path / "d.txt"
    p.write_text("a\nb\n")
    h = data_hash(str(p))
    assert h == data_hash(str(p))
    p.write_text("a\nc\n")
    assert data_hash(str(p)) != h


# ---- hooks --------------------------------------------------------------------------------------

def test_one_batch_equals_samples_one_by_one(bert):
    rows = _id_rows(7, seed=1)
    batched = calibrate(bert, rows, None, CalibrationSpec(samples=7, batch_size=7))
    single = calibrate(bert, rows, None, CalibrationSpec(samples=7, batch_size=1))
    tokens = sum(len(r["input_ids"]) for r in rows)
    assert batched["encoder.layer.0.attention.self.query"].n == tokens
    assert batched["pooler.dense"].n == len(rows)  # the pooler reads one (first) token per sample
    _assert_same(batched, single, rtol=1e-5)


def test_padding_tokens_do_not_count(bert):
    rows = _id_rows(4, seed=2)
    ids = [r["input_ids"] for r in rows]
    (x0, m0), = list(make_batches(ids, 4))
    # the same batch with 5 more positions of arbitrary (non-pad) ids, masked out
    x1 = torch.cat([x0, torch.randint(1, 90, (4, 5))], 1)
    m1 = torch.cat([m0, torch.zeros(4, 5, dtype=m0.dtype)], 1)
    res = []
    for x, m in ((x0, m0), (x1, m1)):
        with torch.inference_mode(), StatsCollector(bert) as col:
            col.begin_batch(m)
            bert(input_ids=x, attention_mask=m)
        res.append(col.results())
    _assert_same(res[0], res[1], rtol=1e-5)
    assert res[1]["encoder.layer.1.output.dense"].n == int(m0.sum())


def test_qkv_share_one_gram_and_store_it_once(bert, tmp_path):
    stats = calibrate(bert, _id_rows(3, seed=3), None, CalibrationSpec(samples=3))
    for i in range(2):
        q, k, v = (stats[f"encoder.layer.{i}.attention.self.{n}"] for n in ("query", "key", "value"))
        assert q is k is v
        assert stats[f"encoder.layer.{i}.attention.output.dense"] is not q
    store = StatsStore.save(stats, tmp_path / "s.safetensors", {"key": "x"})
    from safetensors import safe_open

    with safe_open(str(store.path), framework="pt") as f:
        grams = [k for k in f.keys() if k.endswith(".gram")]
    assert len(grams) == 9 == store.manifest["distinct_inputs"]  # 13 linears, 2×(q,k,v) folded
    assert store.shared()["encoder.layer.1.attention.self.value"] == "encoder.layer.1.attention.self.query"
    torch.testing.assert_close(store.get("encoder.layer.0.attention.self.key").gram,
                               stats["encoder.layer.0.attention.self.query"].gram)
    # read back, modules sharing an input get the same tensors (what a method derives from
    # them can be kept for the next one); another input replaces them
    q = store.get("encoder.layer.1.attention.self.query")
    assert store.get("encoder.layer.1.attention.self.value").gram is q.gram
    assert store.get("encoder.layer.1.attention.output.dense").gram is not q.gram


def test_llama_qkv_and_gate_up_share_inputs(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama["expert_1"]))
    stats = calibrate(model, _id_rows(3, seed=4, vocab=70), None, CalibrationSpec(samples=3))
    p = "model.layers.0."
    assert stats[p + "self_attn.q_proj"] is stats[p + "self_attn.k_proj"] is stats[p + "self_attn.v_proj"]
    assert stats[p + "mlp.gate_proj"] is stats[p + "mlp.up_proj"]
    assert stats[p + "mlp.down_proj"].d_in == 48
    assert len({id(s) for s in stats.values()}) == 2 * 4 + 1  # per block qkv, o, gate/up, down; lm_head


def test_causal_lm_padding_never_enters_a_gram(tiny_llama):
    """A decoder calibrated in padded batches (right padding, mask) equals one sample at a time
    (no padding at all), and the token count is the real tokens'."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama["expert_1"])).float().eval()
    rows = _id_rows(5, seed=6, vocab=70, lo=2, hi=12)
    batched = calibrate(model, rows, None, CalibrationSpec(samples=5, batch_size=5, gram_precision="float64"))
    single = calibrate(model, rows, None, CalibrationSpec(samples=5, batch_size=1, gram_precision="float64"))
    _assert_same(batched, single, rtol=1e-5)
    assert batched["model.layers.1.mlp.down_proj"].n == sum(len(r["input_ids"]) for r in rows)


def test_low_precision_inputs_are_upcast_and_conv1d_is_hooked():
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(6, 4).to(torch.bfloat16)
    conv = Conv1D(4, 6)
    x = torch.randn(2, 3, 6, generator=g).to(torch.bfloat16)
    model = nn.ModuleDict({"lin": lin, "conv": conv})
    with torch.inference_mode(), StatsCollector(model, precision="float64") as col:
        col.begin_batch(None)
        lin(x)
        conv(x.float())
    st = col.results()
    ref = x.reshape(-1, 6).double()
    assert st["lin"].gram.dtype == torch.float64
    torch.testing.assert_close(st["lin"].gram, ref.T @ ref, rtol=0, atol=0)  # exact: bf16 → f64 products
    assert st["conv"].transposed and not st["lin"].transposed
    torch.testing.assert_close(st["conv"].gram, ref.T @ ref)


def test_passes_under_a_memory_budget_give_the_same_stats(bert):
    rows = _id_rows(5, seed=6)
    one = calibrate(bert, rows, None, CalibrationSpec(samples=5, batch_size=2))
    budget = stats_bytes(32) * 2  # two 32-wide inputs per pass
    several = calibrate(bert, rows, None, CalibrationSpec(samples=5, batch_size=2), max_bytes=budget)
    _assert_same(one, several, rtol=1e-12)
    assert several["encoder.layer.0.attention.self.query"] is several["encoder.layer.0.attention.self.value"]
    groups = [["a", "b", "c"], ["d"], ["e"], ["f", "g"]]
    widths = dict.fromkeys("abcdefg", 32) | {"e": 64}
    passes = plan_passes(groups, widths, stats_bytes(32) * 2)
    assert passes == [["a", "b", "c", "d"], ["e"], ["f", "g"]]  # groups never split; big ones alone
    assert plan_passes(groups, widths, None) == [list("abcdefg")]
    only = calibrate(bert, rows, None, CalibrationSpec(samples=5), modules=["encoder.layer.1.output.dense"])
    assert list(only) == ["encoder.layer.1.output.dense"]


# ---- calibrate_expert and the cache -------------------------------------------------------------

def test_calibrate_expert_caches_and_hits(tiny_bert, tmp_path, caplog):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _id_rows(12, seed=7)))
    settings = CalibrationSpec(samples=8, max_length=10, batch_size=3, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="esm_ray.stats"):
        a = calibrate_expert(str(tiny_bert["expert_2"]), str(data), settings, name="e2")
        b = calibrate_expert(str(tiny_bert["expert_2"]), str(data), settings, name="e2")
    assert not a.cache_hit and b.cache_hit and a.path == b.path
    assert any("cache hit" in r.message and "e2" in r.message for r in caplog.records)
    assert any("8 rows" in r.message for r in caplog.records)
    assert a.modules() == b.modules() and len(a.modules()) == 13
    for m in a.modules():
        x, y = a.get(m), b.get(m)
        assert x.n == y.n and torch.equal(x.gram, y.gram) and torch.equal(x.s1, y.s1)
    man = b.manifest
    assert man["rows"] == 8 and man["data_hash"] == data_hash(str(data)) and man["model_fingerprint"]
    assert man["settings"]["max_length"] == 10 and man["seconds"] >= 0
    assert not list((tmp_path / "cache" / "stats").glob(".*tmp"))  # no temp files left
    # the rows were truncated to max_length
    assert a.get("encoder.layer.0.output.dense").n <= 8 * 10
    # settings that matter change the key; the batch size does not
    c = calibrate_expert(str(tiny_bert["expert_2"]), str(data), settings.model_copy(update={"max_length": 12}))
    assert c.path != a.path and not c.cache_hit
    d = calibrate_expert(str(tiny_bert["expert_2"]), str(data), settings.model_copy(update={"batch_size": 8}))
    assert d.path == a.path and d.cache_hit
    # another expert is another model: another key
    e = calibrate_expert(str(tiny_bert["expert_1"]), str(data), settings)
    assert e.path != a.path
    assert StatsStore(a.path).get("no.such.module") is None


def test_calibrate_expert_names_modules_as_the_checkpoint_does(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _id_rows(4, seed=8, vocab=60)))
    store = calibrate_expert(str(tmp_path / "clf"), str(data), CalibrationSpec(samples=4, cache_dir=str(tmp_path)))
    assert "bert.encoder.layer.0.attention.self.query" in store.modules()  # the stored key prefix
    one = calibrate_expert(str(tmp_path / "clf"), str(data), CalibrationSpec(samples=4, cache_dir=str(tmp_path)),
                           modules=["bert.encoder.layer.0.output.dense"])
    assert one.modules() == {"bert.encoder.layer.0.output.dense"} and one.path != store.path


def test_cache_dir_from_the_environment(tiny_bert, tmp_path, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 2, 3]}))
    monkeypatch.setenv("ESM_RAY_CACHE", str(tmp_path / "envcache"))
    store = calibrate_expert(str(tiny_bert["expert_0"]), str(data), CalibrationSpec(samples=1))
    assert store.path.parent == tmp_path / "envcache" / "stats"


def test_text_rows_use_the_model_directory_tokenizer(tiny_bert, tmp_path):
    import shutil

    from transformers import AutoTokenizer, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "the a movie was good bad plot great boring fun".split()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_bert["expert_0"], model_dir)
    BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(model_dir)
    lines = ["the movie was great fun", "a boring plot", "good", "bad bad bad bad bad bad bad bad bad"]
    data = tmp_path / "rows.txt"
    data.write_text("\n".join(lines) + "\n")
    settings = CalibrationSpec(samples=4, max_length=8, cache_dir=str(tmp_path / "cache"))
    store = calibrate_expert(str(model_dir), str(data), settings)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tokens = sum(len(tok(t, truncation=True, max_length=8)["input_ids"]) for t in lines)
    assert store.get("encoder.layer.0.output.dense").n == tokens
    assert store.manifest["rows"] == 4
    # a tokenizer_uri without tokenizer files (e.g. the base) falls back to the expert's own
    again = calibrate_expert(str(model_dir), str(data), settings, tokenizer_uri=str(tiny_bert["base"]))
    assert again.path == store.path


def test_text_rows_without_tokenizer_fail_clearly(tiny_bert, tmp_path):
    data = tmp_path / "rows.txt"
    data.write_text("hello world\n")
    with pytest.raises(InputError, match="tokenizer"):
        calibrate_expert(str(tiny_bert["expert_0"]), str(data), CalibrationSpec(cache_dir=str(tmp_path)))


# ---- mixed-precision Gram --------------------------------------------------------------------

def _collect(x_batches: list[torch.Tensor], precision: str):
    model = nn.Sequential(nn.Linear(x_batches[0].shape[-1], 3))
    with torch.inference_mode(), StatsCollector(model, precision=precision) as col:
        for x in x_batches:
            col.begin_batch(None)
            model(x)
    return col.results()["0"]


def test_mixed_gram_is_within_tolerance_of_float64():
    """float32 block products summed in float64: relative error ≤ 1e-7 on non-centred rows over
    3000 calls and a multi-block call with a tail; an all-float32 accumulator (7e-7 here) or a
    lost block misses this."""
    from esm_ray.stats.hooks import BLOCK_ROWS

    g = torch.Generator().manual_seed(3)
    offset = 4.0 * torch.randn(48, generator=g)
    batches = [torch.randn(16, 48, generator=g) + offset for _ in range(3000)]
    batches.append(torch.randn(2 * BLOCK_ROWS + 77, 48, generator=g) + offset)  # several blocks + a tail
    ref, mixed = _collect(batches, "float64"), _collect(batches, "mixed")
    x64 = torch.cat(batches).double()
    torch.testing.assert_close(ref.gram, x64.T @ x64)
    assert mixed.n == ref.n == x64.shape[0]
    assert mixed.gram.dtype == torch.float64
    err = float((mixed.gram - ref.gram).norm() / ref.gram.norm())
    assert err < 1e-7, err
    assert float((mixed.s1 - ref.s1).norm() / ref.s1.norm()) < 1e-7
    # the same rows accumulated in float32 throughout are measurably worse: the test can tell
    acc32 = torch.zeros(48, 48)
    for x in batches:
        acc32 += x.T @ x
    assert float((acc32.double() - ref.gram).norm() / ref.gram.norm()) > 1e-7


def test_gram_precision_is_in_the_cache_key_and_the_default_is_mixed():
    from esm_ray.stats.calibrate import cache_key

    mixed, f64 = CalibrationSpec(), CalibrationSpec(gram_precision="float64")
    assert mixed.gram_precision == "mixed"
    assert cache_key("m", "d", mixed) != cache_key("m", "d", f64)
    with pytest.raises(ValueError):
        CalibrationSpec(gram_precision="float16")


@pytest.mark.parametrize("d", [1, 48, 192, 193, 384, 500, 1536])
def test_mixed_gram_blocks_cover_the_lower_triangle_once(d):
    """tri_blocks partitions the lower block-triangle (diagonal blocks whole, at most TRI_BASE
    wide); above 192 columns its area is well under the full d², i.e. about half the flops."""
    from esm_ray.stats.hooks import TRI_BASE, tri_blocks

    cover = torch.zeros(d, d, dtype=torch.int64)
    for r0, r1, c0, c1 in tri_blocks(d):
        assert r0 >= c0 and r1 > r0 and c1 > c0
        if r0 == c0:
            assert r1 == c1 and r1 - r0 <= TRI_BASE
        cover[r0:r1, c0:c1] += 1
    low = torch.ones(d, d, dtype=torch.int64).tril()
    assert int((cover * low).max()) == 1 and bool((cover >= low).all())  # every lower entry once
    assert int(cover.sum()) <= (d * d + d * TRI_BASE) // 2 + d


@pytest.mark.parametrize("d", [384, 500, 1536])
def test_wide_mixed_gram_is_symmetric_and_within_tolerance_of_float64(d, monkeypatch):
    """Real-shaped inputs (MiniLM's 384 and 1536, an odd 500), non-centred, in calls of uneven
    size that cross the float32 flush (BLOCK_ROWS) within and between calls: the block-triangle
    Gram is exactly symmetric and within 2e-7 of the float64 Gram (1.1e-7 measured, as for the
    previous full-XᵀX accumulation); s1 and n agree. d = 500 has blocks that are not multiples
    of the mirror's strip width."""
    from esm_ray.stats import hooks
    from esm_ray.stats.hooks import BLOCK_ROWS

    monkeypatch.setattr(hooks, "ROWS_MIN_WIDTH", 1 << 30)  # a Gram from the first row (rows: below)
    g = torch.Generator().manual_seed(d)
    offset = 2.0 * torch.randn(d, generator=g)
    sizes = [300, 700, 5, BLOCK_ROWS + 333, 1]
    batches = [torch.randn(k, d, generator=g) * (1 + torch.rand(d, generator=g)) + offset for k in sizes]
    ref, mixed = _collect(batches, "float64"), _collect(batches, "mixed")
    assert mixed.n == ref.n == sum(sizes)
    assert mixed.gram.dtype == torch.float64 and torch.equal(mixed.gram, mixed.gram.T)
    err = float((mixed.gram - ref.gram).norm() / ref.gram.norm())
    assert err < 2e-7, err
    assert float((mixed.s1 - ref.s1).norm() / ref.s1.norm()) < 1e-7
    # every entry, not only the norm: the mirrored upper triangle and the diagonal blocks
    scale = float(ref.gram.abs().max())
    torch.testing.assert_close(mixed.gram, ref.gram, rtol=0, atol=1e-6 * scale)


# ---- rows instead of a Gram -----------------------------------------------------------------

@pytest.mark.parametrize("precision", ["mixed", "float64"])
def test_a_wide_input_with_fewer_rows_than_twice_its_width_keeps_the_rows(precision):
    """A 300-wide input that sees 599 rows (padding removed) holds X itself, exactly (float32),
    with s1 in float64; its Gram, formed on first use, is the float64 XᵀX, and no Gram was
    accumulated. A 32-wide input (below ROWS_MIN_WIDTH) gets a Gram as before."""
    from esm_ray.stats.hooks import ROWS_MIN_WIDTH

    assert ROWS_MIN_WIDTH == 256
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(300, 32), nn.Linear(32, 8))
    xs = [torch.randn(4, 50, 300, generator=g) for _ in range(3)]
    masks = [torch.ones(4, 50, dtype=torch.long) for _ in range(3)]
    masks[1][2, 49:] = 0  # one padding token: 3 · 200 − 1 = 599 rows
    with torch.inference_mode(), StatsCollector(model, precision=precision) as col:
        for x, m in zip(xs, masks):
            col.begin_batch(m)
            model(x)
        acc = col._acc["0"]
        assert not hasattr(acc, "gram") and not hasattr(acc, "buf")  # no Gram accumulated
        st = col.results()
    wide, narrow = st["0"], st["1"]
    x = torch.cat([xi[mi.bool()] for xi, mi in zip(xs, masks)])
    assert wide.n == 599 and wide.rows is not None and wide.rows.dtype == torch.float32
    assert torch.equal(wide.rows, x)
    torch.testing.assert_close(wide.s1, x.double().sum(0), rtol=1e-12, atol=1e-9)
    assert wide._gram is None
    torch.testing.assert_close(wide.gram, x.double().T @ x.double(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(wide.factor(), x.double().T, rtol=0, atol=0)
    assert narrow.rows is None and narrow.n == 599 and narrow.gram.shape == (32, 32)


@pytest.mark.parametrize("precision", ["mixed", "float64"])
def test_the_batch_that_reaches_twice_the_width_turns_the_kept_rows_into_the_gram(precision):
    """Rows kept for the first 500 rows of a 256-wide input, then a batch that reaches 512: the
    result is a Gram of every row (the kept ones included), within the precision's tolerance of
    the float64 XᵀX, and s1 over every row; 511 rows stay rows."""
    g = torch.Generator().manual_seed(6)
    offset = 2.0 * torch.randn(256, generator=g)
    batches = [torch.randn(k, 256, generator=g) + offset for k in (200, 300, 12, 40)]
    st = _collect(batches, precision)
    x64 = torch.cat(batches).double()
    assert st.n == 552 and st.rows is None
    ref = x64.T @ x64
    err = float((st.gram - ref).norm() / ref.norm())
    assert err < (1e-7 if precision == "mixed" else 1e-13), err
    assert float((st.s1 - x64.sum(0)).norm() / x64.sum(0).norm()) < 1e-7
    one_less = _collect(batches[:2] + [batches[2][:11]], precision)
    assert one_less.rows is not None and one_less.n == 511


def test_rows_are_stored_read_back_and_shared_by_the_modules_reading_them(tmp_path):
    """A cache entry holds `<module>.rows` where calibration kept rows (manifest: held = rows)
    and `.gram` elsewhere; the store hands modules sharing an input one object, so a Gram formed
    from its rows is formed once; an entry of the previous format still reads; an unknown
    format is refused naming the manifest."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from esm_ray.stats.hooks import ModuleStats

    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 300, generator=g)
    rows = ModuleStats(40, x.double().sum(0), rows=x)
    x32 = x[:, :32].double()
    gram = ModuleStats(40, x32.sum(0), x32.T @ x32)
    store = StatsStore.save({"a.q": rows, "a.k": rows, "a.o": gram}, tmp_path / "s.safetensors", {"key": "x"})
    with safe_open(str(store.path), framework="pt") as f:
        assert sorted(f.keys()) == ["a.o.gram", "a.o.s1", "a.q.rows", "a.q.s1"]
    assert store.manifest["modules"]["a.q"]["held"] == "rows" and store.manifest["format"] == 2
    q = store.get("a.q")
    assert store.get("a.k") is q and torch.equal(q.rows, x) and q._gram is None
    torch.testing.assert_close(q.gram, x.double().T @ x.double())
    assert store.get("a.k").gram is q.gram  # formed once
    o = store.get("a.o")
    assert torch.equal(o.gram, gram.gram) and o.rows is None
    # format 1: every input a Gram, no "held" field
    old = tmp_path / "old.safetensors"
    save_file({"a.o.gram": gram.gram, "a.o.s1": gram.s1}, str(old))
    old.with_suffix(".json").write_text(json.dumps(
        {"format": 1, "modules": {"a.o": {"stored_as": "a.o", "n": 40, "d_in": 32, "transposed": False}}}))
    assert torch.equal(StatsStore(old).get("a.o").gram, gram.gram)
    (tmp_path / "bad.json").write_text(json.dumps({"format": 9, "modules": {}}))
    with pytest.raises(InputError, match="bad.json: statistics format 9"):
        StatsStore(tmp_path / "bad.safetensors")


# ---- a Gram started at once; the CPU accumulators in the Gram itself -------------------------

def _wide_pass(tokens: int | None, inplace: bool, monkeypatch) -> tuple[dict, object]:
    """A 300-wide and a 32-wide input over three masked batches (599 token rows), "mixed"."""
    from esm_ray.stats import hooks

    start = hooks._Acc._start_gram

    def start_gram(self):
        self.inplace = inplace
        start(self)

    monkeypatch.setattr(hooks._Acc, "_start_gram", start_gram)
    g = torch.Generator().manual_seed(8)
    model = nn.Sequential(nn.Linear(300, 32), nn.Linear(32, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    xs = [torch.randn(4, 100, 300, generator=g) + 3.0 for _ in range(3)]
    masks = [torch.ones(4, 100, dtype=torch.long) for _ in range(3)]
    masks[1][2, 99:] = 0
    kept_after_first = []
    with torch.inference_mode(), StatsCollector(model, tokens=tokens) as col:
        for x, m in zip(xs, masks):
            col.begin_batch(m)
            model(x)
            kept_after_first.append(col._acc["0"].rows is not None)
        st = col.results()
    return st, kept_after_first


@pytest.mark.parametrize("inplace", [True, False])
def test_a_collector_told_the_token_count_starts_the_gram_at_once_with_the_same_bytes(inplace, monkeypatch):
    """Told that the pass feeds 1199 token rows (at least 2 · 300), the 300-wide input keeps no
    rows from its first batch on, and its statistics are bit for bit those of the collector that
    kept the first batches' rows and turned them into the Gram; the CPU accumulation into the
    Gram's own blocks (`inplace`) and the separate blocks of other devices give the same bytes;
    a count below 2 · d_in keeps the rows as before."""
    told, kept = _wide_pass(1199, inplace, monkeypatch)
    assert kept == [False, False, False]
    untold, kept_untold = _wide_pass(None, inplace, monkeypatch)
    assert kept_untold == [True, False, False]  # 400 rows kept, the second batch reaches 600
    other, _ = _wide_pass(1199, not inplace, monkeypatch)
    for name in ("0", "1"):
        a, b, c = told[name], untold[name], other[name]
        assert a.n == b.n == c.n == 1199 and a.rows is None and b.rows is None
        assert torch.equal(a.gram, b.gram) and torch.equal(a.gram, c.gram) and torch.equal(a.s1, b.s1)
        assert torch.equal(a.gram, a.gram.T)
    few, kept_few = _wide_pass(599, inplace, monkeypatch)
    assert kept_few == [True, False, False]


def test_freed_memory_setting_nests_and_is_restored_by_the_last_to_leave(monkeypatch):
    """reuse_freed_memory inside another (a calibration inside a merge), and on another thread:
    the setting is made once, stays in force until the last block ends, and glibc's defaults are
    restored then, once."""
    import threading

    from esm_ray import heap

    calls = []
    monkeypatch.setattr(heap, "_set", lambda threshold, keep: calls.append("set") or object())
    monkeypatch.setattr(heap, "_restore", lambda libc: calls.append("restore"))
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with heap.reuse_freed_memory():
            inside.set()
            release.wait(10)

    with heap.reuse_freed_memory():
        with heap.reuse_freed_memory():
            assert heap._depth == 2
        assert calls == ["set"]
        t = threading.Thread(target=other)
        t.start()
        assert inside.wait(10)
    assert calls == ["set"] and heap._depth == 1  # the thread's block still runs
    release.set()
    t.join(10)
    assert calls == ["set", "restore"] and heap._depth == 0 and heap._libc is None


@pytest.mark.skipif(not __import__("esm_ray.heap", fromlist=["_glibc"])._glibc(), reason="glibc only")
def test_kept_memory_is_returned_on_request():
    """Inside the setting freed blocks stay in the heap (that is its point); return_kept_memory
    gives them back to the system at once (between two experts' layer-wise calibrations)."""
    from esm_ray import heap

    def rss_mb() -> float:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    heap.return_kept_memory()  # outside a block: nothing to do, no error
    with heap.reuse_freed_memory():
        held = [torch.ones(1 << 20) for _ in range(24)]  # 24 blocks of 4 MiB, from the heap
        before = rss_mb()
        del held
        kept = rss_mb()
        heap.return_kept_memory()
        after = rss_mb()
    assert kept > before - 24  # freed but kept
    assert after < kept - 48  # returned


def test_a_store_keeps_no_statistics_once_its_user_lets_go(tmp_path):
    """T experts' stores live in one process (the local pool): a store hands out one input's
    statistics and keeps them only while its user holds them, so between tensors it holds
    nothing; asked again, it reads equal values back; held, they are shared (q, k, v)."""
    import gc
    import weakref

    from esm_ray.stats.hooks import ModuleStats

    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 300, generator=g)
    store = StatsStore.save({"a.q": ModuleStats(40, x.double().sum(0), rows=x)}, tmp_path / "s.safetensors",
                            {"key": "x"})
    first = store.get("a.q")
    assert store.get("a.q") is first  # held: the same object
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None  # the store did not keep it
    again = store.get("a.q")
    assert torch.equal(again.rows, x) and again.n == 40
