"""Eval harness on a fake zoo: a tiny random BERT, hand-set heads, hand-computed accuracies."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esm_ray.eval.metrics import evaluate_encoder, evaluate_lm, evaluate_probe, perplexity
from esm_ray.eval.report import ReportTable, Row, to_markdown, write_report
from esm_ray.eval.sweep import ScaledModel, golden_section_max, search_alpha, select_lambda, sweep
from esm_ray.spec import spec_from_dict
from esm_ray.models.encoder import features, load_tokenizer, mean_pool
from esm_ray.zoo.layout import open_zoo, write_json, write_jsonl

WORDS = ["good", "bad", "film", "plot", "great", "awful", "the", "a", "is", "was", "very", "not"]
LN_BIAS = "encoder.layer.1.output.LayerNorm.bias"  # shifts every token state of the last layer


def _tiny_bert(path: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(path))
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    tok.save_pretrained(str(path))
    return path


def _head(path: Path, weight, bias) -> None:
    save_file({"weight": torch.tensor(weight, dtype=torch.float32), "bias": torch.tensor(bias, dtype=torch.float32)},
              str(path))


def _zero_w(n_labels: int) -> list[list[float]]:
    return [[0.0] * 32 for _ in range(n_labels)]


@pytest.fixture()
def fake_zoo(tmp_path: Path) -> Path:
    """Two tasks. Task a: head always says 1, labels 1,1,0,1,0 (acc 3/5); its expert scored 0.8.
    Task b: head always says 0, labels 1,1,1,0 (acc 1/4); its expert scored 0.5."""
    z = tmp_path / "zoo"
    _tiny_bert(z / "base")
    texts = ["good film", "the plot is very awful", "bad", "great great film", "not good"]
    for name, labels, bias, probe_bias, ref in [("a", [1, 1, 0, 1, 0], [0.0, 1.0], [1.0, 0.0], 0.8),
                                                ("b", [1, 1, 1, 0], [1.0, 0.0], [0.0, 1.0], 0.5)]:
        shutil.copytree(z / "base", z / "experts" / name)
        _head(z / "experts" / name / "head.safetensors", _zero_w(2), bias)
        (z / "probes").mkdir(exist_ok=True)
        _head(z / "probes" / f"{name}.safetensors", _zero_w(2), probe_bias)
        for split in ("validation", "test"):
            write_jsonl(z / "data" / name / f"{split}.jsonl",
                        [{"text": t, "label": y} for t, y in zip(texts, labels)])
        write_jsonl(z / "data" / name / "calib.jsonl", [{"text": t} for t in texts[:2]])
    tasks = {n: {"expert": f"experts/{n}", "head": f"experts/{n}/head.safetensors", "probe": f"probes/{n}.safetensors",
                 "data": f"data/{n}", "calib": f"data/{n}/calib.jsonl", "labels": ["neg", "pos"],
                 "sizes": {"validation": k, "test": k}, "metrics": {"expert": {"validation": r, "test": r}}}
             for n, k, r in (("a", 5, 0.8), ("b", 4, 0.5))}
    write_json(z / "zoo.json", {"format": 1, "kind": "encoder", "max_length": 16, "base": "base", "tasks": tasks})
    return z


def test_evaluate_encoder_matches_hand_computation(fake_zoo: Path):
    res = evaluate_encoder(fake_zoo / "base", fake_zoo)
    a, b = res["tasks"]["a"], res["tasks"]["b"]
    assert (a["correct"], a["n"]) == (3, 5) and a["accuracy"] == pytest.approx(0.6)
    assert (b["correct"], b["n"]) == (1, 4) and b["accuracy"] == pytest.approx(0.25)
    assert a["normalized"] == pytest.approx(0.6 / 0.8) and b["normalized"] == pytest.approx(0.25 / 0.5)
    assert res["average"]["accuracy"] == pytest.approx((0.6 + 0.25) / 2)
    assert res["average"]["normalized"] == pytest.approx((0.75 + 0.5) / 2)
    # The probe heads say the opposite class: accuracies 2/5 and 3/4.
    probe = evaluate_probe(fake_zoo)
    assert probe["tasks"]["a"]["accuracy"] == pytest.approx(0.4)
    assert probe["tasks"]["b"]["accuracy"] == pytest.approx(0.75)
    only_b = evaluate_encoder(fake_zoo / "base", fake_zoo, tasks=["b"])
    assert list(only_b["tasks"]) == ["b"]


def test_encoder_report_has_bootstrap_intervals(fake_zoo: Path):
    """Each task's accuracy comes with the 95% bootstrap interval over its items (the LM report's
    resampling), the average with the interval of the mean over tasks resampled one by one."""
    import numpy as np

    from esm_ray.eval.report import row_from_result

    res = evaluate_encoder(fake_zoo / "base", fake_zoo)
    a, b = res["tasks"]["a"], res["tasks"]["b"]
    hits_a, hits_b = np.array([1, 1, 0, 1, 0]), np.array([0, 0, 0, 1])  # head a says 1, head b says 0
    rng = np.random.default_rng(0)
    want_a = np.quantile(hits_a[rng.integers(0, 5, size=(1000, 5))].mean(1), [0.025, 0.975])
    assert a["interval"] == pytest.approx(list(want_a))
    rng = np.random.default_rng(0)
    avg = hits_a[rng.integers(0, 5, size=(1000, 5))].mean(1) + hits_b[rng.integers(0, 4, size=(1000, 4))].mean(1)
    assert res["average"]["interval"] == pytest.approx(list(np.quantile(avg / 2, [0.025, 0.975])))
    for v, (lo, hi) in ((a["accuracy"], a["interval"]), (b["accuracy"], b["interval"]),
                        (res["average"]["accuracy"], res["average"]["interval"])):
        assert lo <= v <= hi and lo < hi
    t = ReportTable(["a", "b"])
    t.add(row_from_result("base", res, "model"))
    lo, hi = res["average"]["interval"]
    md = to_markdown(t)
    assert f"| 60.0 [{100 * a['interval'][0]:.1f}, {100 * a['interval'][1]:.1f}] (75.0) |" in md
    assert f"| 42.5 [{100 * lo:.1f}, {100 * hi:.1f}] (62.5) |" in md
    again = ReportTable.from_dict(json.loads(json.dumps(t.to_dict())))
    assert again.row("base").intervals["b"] == b["interval"]


def test_missing_encoder_weights_are_an_error(fake_zoo: Path, tmp_path: Path):
    from esm_ray.errors import InputError

    bad = tmp_path / "bad"
    shutil.copytree(fake_zoo / "base", bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd.pop("encoder.layer.0.attention.self.query.weight")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match="missing"):
        evaluate_encoder(bad, fake_zoo)


def test_mean_pooling_ignores_padding(fake_zoo: Path):
    from esm_ray.models.encoder import load_encoder

    model, tok = load_encoder(fake_zoo / "base"), load_tokenizer(fake_zoo / "base")
    alone = features(model, tok, ["good"])
    padded = features(model, tok, ["good", "the plot is very very awful not good"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    h = torch.arange(12, dtype=torch.float32).view(1, 3, 4)
    m = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(h, m), torch.tensor([[2.0, 3.0, 4.0, 5.0]]))


def _shifted_copy(src: Path, dst: Path, key: str, delta: torch.Tensor) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    sd[key] = sd[key] + delta
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture()
def window_zoo(fake_zoo: Path) -> Path:
    """Heads that read feature 0 only: task a is right when feature 0 > 35, task b when it is < 85.

    A merged model adds 100·e0 to the last LayerNorm bias, so feature 0 = f0 + 100 s with s the
    scale of that update: both tasks are right exactly for s in about (0.35, 0.85).
    """
    w_a = _zero_w(2)
    w_a[1][0] = 1.0
    _head(fake_zoo / "experts" / "a" / "head.safetensors", w_a, [0.0, -35.0])
    w_b = _zero_w(2)
    w_b[0][0] = -1.0
    _head(fake_zoo / "experts" / "b" / "head.safetensors", w_b, [85.0, 0.0])
    for split in ("validation", "test"):
        rows_a = [{"text": t, "label": 1} for t in ("good film", "bad", "the plot", "not great")]
        rows_b = [{"text": t, "label": 0} for t in ("awful film", "very good", "a plot")]
        write_jsonl(fake_zoo / "data" / "a" / f"{split}.jsonl", rows_a)
        write_jsonl(fake_zoo / "data" / "b" / f"{split}.jsonl", rows_b)
    delta = torch.zeros(32)
    delta[0] = 100.0
    _shifted_copy(fake_zoo / "base", fake_zoo / "merged", LN_BIAS, delta)
    return fake_zoo


def test_scaled_model_rescales_only_chosen_keys(window_zoo: Path):
    other = "encoder.layer.0.attention.self.query.weight"
    merged = window_zoo / "merged"
    sd = load_file(str(merged / "model.safetensors"))
    sd[other] = sd[other] + 1.0
    save_file(sd, str(merged / "model.safetensors"), metadata={"format": "pt"})
    base = load_file(str(window_zoo / "base" / "model.safetensors"))
    sm = ScaledModel(window_zoo / "base", merged, [LN_BIAS])
    sm.set_factor(0.25)
    p = dict(sm.model.named_parameters())
    assert torch.allclose(p[LN_BIAS], base[LN_BIAS] + 0.25 * (sd[LN_BIAS] - base[LN_BIAS]))
    assert torch.equal(p[other], sd[other])  # not an α key: stays as merged


def test_search_alpha_finds_the_window(window_zoo: Path):
    merged = window_zoo / "merged"
    write_json(merged / "merge_report.json", {"method_report": {"alpha": 1.0, "alpha_keys": [LN_BIAS]}})
    res = search_alpha(window_zoo / "base", merged, None, None, window_zoo)
    assert res["validation"] == pytest.approx(1.0)
    assert 0.3 < res["alpha"] < 0.9
    assert len(res["history"]) <= 17  # two initial points + at most 15 iterations
    assert all(0.0 <= a <= 2.0 for a, _ in res["history"])
    assert res["test"]["average"]["accuracy"] == pytest.approx(1.0)
    # α0 = 2 means the merge holds twice the update: the chosen α doubles.
    res2 = search_alpha(window_zoo / "base", merged, [LN_BIAS], 2.0, window_zoo)
    assert 0.6 < res2["alpha"] < 1.8 and res2["validation"] == pytest.approx(1.0)


def test_select_lambda_on_validation(window_zoo: Path):
    res = select_lambda(window_zoo / "base", window_zoo / "merged", 1.0, window_zoo)
    good = [lam for lam, acc in res["history"] if acc == 1.0]
    assert res["lambda"] in good and 0.3 < res["lambda"] < 0.9
    assert dict((round(k, 1), v) for k, v in res["history"])[0.1] == pytest.approx(0.5)  # only task b right
    assert res["test"]["average"]["accuracy"] == pytest.approx(1.0)


def test_golden_section_max():
    calls = []

    def f(x):
        calls.append(x)
        return -(x - 0.7) ** 2

    x, fx, hist = golden_section_max(f, 0.0, 2.0, tol=0.01, max_iter=15)
    assert abs(x - 0.7) < 0.01
    assert len(calls) <= 17 and len(hist) == len(set(calls))


def test_sweep_with_injected_merge(window_zoo: Path, tmp_path: Path):
    calls = []

    def merge_fn(spec):
        calls.append(spec.method.name)
        out = Path(spec.output)
        if not out.exists():
            delta = torch.zeros(32)
            delta[0] = 100.0 * float(spec.method.params.get("lambda", 1.0))
            _shifted_copy(window_zoo / "base", out, LN_BIAS, delta)
        return str(out)

    zoo = open_zoo(window_zoo)

    def spec(method, params, out):
        return spec_from_dict({"base": str(zoo.base_dir), "output": str(tmp_path / out), "method":
                               {"name": method, "params": params},
                               "experts": [{"name": t, "model": str(zoo.expert_dir(t))} for t in zoo.tasks]})

    specs = [spec("task_arithmetic", {"lambda": 1.0}, "ta"), spec("linear", {}, "lin")]
    table = sweep(specs, window_zoo, merge_fn)
    assert calls == ["task_arithmetic", "linear"]
    assert [r.name for r in table.rows][:2] == ["pretrained (linear probe)", "experts"]
    assert table.rows[1].normalized == {"a": 1.0, "b": 1.0}
    ta = table.rows[2]
    assert ta.values == {"a": 1.0, "b": 0.0}  # s = 1: feature 0 ≈ 100 > 85, task b wrong
    selected = sweep(specs[:1], window_zoo, merge_fn, select=True)
    row = selected.rows[-1]
    assert "λ=" in row.name and row.values == {"a": 1.0, "b": 1.0}
    assert 0.3 < row.info["selected"]["lambda"] < 0.9


def test_report_writers(tmp_path: Path):
    t = ReportTable(["sentiment", "party"], metric="accuracy", split="test")
    t.add(Row("pretrained (linear probe)", {"sentiment": 0.6, "party": 0.5}, {"sentiment": 0.75, "party": 0.625},
              "probe"))
    t.add(Row("experts", {"sentiment": 0.8, "party": 0.8}, {"sentiment": 1.0, "party": 1.0}, "experts"))
    t.add(Row("ties", {"sentiment": 0.7, "party": 0.6}, {"sentiment": 0.875, "party": 0.75}))
    md = to_markdown(t)
    assert "| ties | 70.0 (87.5) | 60.0 (75.0) | 65.0 (81.2) |" in md
    paths = write_report(t, tmp_path / "rep", title="two tasks")
    data = json.loads(paths["json"].read_text())
    assert data["rows"][2]["average"] == pytest.approx(0.65)
    assert ReportTable.from_dict(data).row("ties").values == {"sentiment": 0.7, "party": 0.6}
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert paths["markdown"].read_text() == to_markdown(t, "two tasks")


# ---------------------------------------------------------------- causal LM


def _tiny_lm(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    words = ["<unk>", "<pad>", *[f"w{i}" for i in range(30)]]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_perplexity_matches_the_model_loss(tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = _tiny_lm(tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(str(p)).eval()
    tok = AutoTokenizer.from_pretrained(str(p))
    texts = ["w1 w2 w3 w4 w5", "w7 w8 w9"]
    res = perplexity(model, tok, texts)
    # By hand: total NLL over the 4 + 2 predicted tokens, from each text's own loss.
    total = 0.0
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
    assert res["tokens"] == 6
    assert res["perplexity"] == pytest.approx(math.exp(total / 6), rel=1e-4)

    z = tmp_path / "lmzoo"
    shutil.copytree(p, z / "base")
    write_jsonl(z / "data" / "d1" / "test.jsonl", [{"text": t} for t in texts])
    write_json(z / "zoo.json", {"format": 1, "kind": "causal_lm", "base": "base", "max_length": 32,
                                "tasks": {"d1": {"expert": "base", "data": "data/d1", "calib": "data/d1/test.jsonl",
                                                 "metrics": {"base": {"test": 2.0}, "expert": {"test": 4.0}}}}})
    lm = evaluate_lm(z / "base", z)
    d = lm["domains"]["d1"]
    assert d["perplexity"] == pytest.approx(res["perplexity"], rel=1e-5)
    assert d["ratio_to_expert"] == pytest.approx(res["perplexity"] / 4.0, rel=1e-5)


def test_mean_entropy_matches_hand_computation(fake_zoo: Path):
    from esm_ray.eval.metrics import load_encoder_checked, mean_entropy

    # zero head weights: every calibration row gets logits = bias, (0, 1) or (1, 0)
    p = 1.0 / (1.0 + math.e)
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    res = mean_entropy(load_encoder_checked(fake_zoo / "base"), load_tokenizer(fake_zoo / "base"), fake_zoo)
    assert res["tasks"]["a"] == pytest.approx(h, rel=1e-6) and res["tasks"]["b"] == pytest.approx(h, rel=1e-6)
    assert res["average"] == pytest.approx(h, rel=1e-6)


def _table(rows: list[Row], zoo_hash: str = "z1") -> ReportTable:
    return ReportTable(["a", "b"], rows, meta={"zoo_hash": zoo_hash})


def test_combine_keeps_rows_in_order_and_the_shared_rows_once(tmp_path: Path):
    from esm_ray.errors import InputError
    from esm_ray.eval.cli import cmd_eval
    from esm_ray.eval.report import combine

    probe, experts = Row("probe", {"a": 0.5, "b": 0.5}, None, "probe"), Row("experts", {"a": 1.0, "b": 1.0}, None, "experts")
    one = _table([probe, experts, Row("ta", {"a": 0.7, "b": 0.6})])
    two = _table([probe, experts, Row("ties", {"a": 0.8, "b": 0.4})])
    out = combine([one, two])
    assert [r.name for r in out.rows] == ["probe", "experts", "ta", "ties"]
    assert out.row("ties").values == {"a": 0.8, "b": 0.4}
    with pytest.raises(ValueError, match="different zoos"):
        combine([one, _table([Row("x", {"a": 0.1, "b": 0.1})], zoo_hash="z2")])
    with pytest.raises(ValueError, match="different tasks"):
        combine([one, ReportTable(["a"], [], meta={"zoo_hash": "z1"})])
    # through the CLI: report.json files in, one report out; a bad file is named
    paths = []
    for i, t in enumerate((one, two)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(t.to_dict()))
    import argparse

    args = argparse.Namespace(combine=[str(p) for p in paths], out=str(tmp_path / "both"), title=None)
    assert cmd_eval(args) == 0
    joined = json.loads((tmp_path / "both" / "report.json").read_text())
    assert [r["name"] for r in joined["rows"]] == ["probe", "experts", "ta", "ties"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="bad.json"):
        cmd_eval(argparse.Namespace(combine=[str(tmp_path / "bad.json")], out=None, title=None))
