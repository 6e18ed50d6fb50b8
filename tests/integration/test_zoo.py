"""The offline test bed: task splits, a reduced zoo build end to end, caching, specs, CLI."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from esm_ray.zoo.tasks import (DEFAULT_TASKS, SPLITS, TASKS, TaskDef, load_task, read_convention_party,
                               read_convention_year, read_debate_party, read_rt_subjectivity, split_rows)


def _keys(data, split):
    return [e.text.lower() for e in data[split]]


@pytest.mark.parametrize("name", list(TASKS))
def test_task_splits(name):
    d = load_task(name, seed=0)
    again = load_task(name, seed=0)
    assert d.splits == again.splits, "a loader must be deterministic for a seed"
    sets = {s: set(_keys(d, s)) for s in SPLITS}
    for s in SPLITS:
        assert len(sets[s]) == len(d[s]), f"{name}/{s} has duplicate texts"
    assert not sets["train"] & sets["test"]
    assert not sets["train"] & sets["validation"]
    assert not sets["validation"] & sets["test"]
    n_labels = len(d.task.labels)
    for s in SPLITS:
        counts = Counter(e.label for e in d[s])
        assert set(counts) == set(range(n_labels)), f"{name}/{s} misses a label"
        assert [counts[i] for i in range(n_labels)] == d.info["label_counts"][s]
        if d.task.balance:
            assert max(counts.values()) - min(counts.values()) <= 1
    assert len(d["train"]) >= 300 and len(d["validation"]) >= 64
    assert d.info["majority_rate"] == max(d.info["label_counts"]["test"]) / len(d["test"])
    if name in DEFAULT_TASKS and name != "chinese_novel":
        assert len(d["test"]) >= 300


def test_other_seed_gives_other_splits():
    a, b = load_task("rt_sentiment", 0), load_task("rt_sentiment", 1)
    assert _keys(a, "test") != _keys(b, "test")


@pytest.mark.parametrize("reader,name", [(read_convention_party, "convention_party"),
                                         (read_convention_year, "convention_year"),
                                         (read_rt_subjectivity, "rt_subjectivity"),
                                         (read_debate_party, "debate_party")])
def test_groups_do_not_span_splits(reader, name):
    """Speakers (conventions), movies (subjectivity) and statements (debates) stay in one split."""
    group_of = {}
    for text, _, group in reader():
        group_of.setdefault(" ".join(text.split()).lower(), group)
    d = load_task(name, 0)
    where: dict[str, set[str]] = {}
    for s in SPLITS:
        for k in _keys(d, s):
            where.setdefault(group_of[k], set()).add(s)
    assert all(len(v) == 1 for v in where.values())
    assert len(where) > 10


def test_split_rows_dedupes_and_balances():
    rows = [(f"text {i}", "x" if i % 3 else "y", f"g{i // 2}") for i in range(300)]
    rows += [("Text 1", "x", "other"), ("  text   2 ", "y", "other"), ("conflict", "x", "c1"), ("CONFLICT", "y", "c2")]
    task = TaskDef("synthetic", (), "rule", ("x", "y"), read=lambda: rows, n_test=40, n_val=20, max_train=60)
    d = split_rows(rows, task, seed=3)
    every = [k for s in SPLITS for k in _keys(d, s)]
    assert "conflict" not in every  # one text, two labels: dropped
    assert every.count("text 1") <= 1 and every.count("text 2") <= 1
    assert d.info["label_counts"] == {"train": [30, 30], "validation": [10, 10], "test": [20, 20]}
    pair = {}
    for s in SPLITS:
        for k in _keys(d, s):
            pair.setdefault(int(k.split()[1]) // 2, set()).add(s)
    assert all(len(v) == 1 for v in pair.values()), "a group was split"


# ---------------------------------------------------------------- reduced build


@pytest.fixture(scope="module")
def reduced_zoo(tmp_path_factory):
    from esm_ray.zoo.build import build_zoo

    root = tmp_path_factory.mktemp("zooroot")
    t0 = time.perf_counter()
    zdir = build_zoo(root, reduced=True, progress=False)
    return zdir, time.perf_counter() - t0


def test_reduced_build_layout(reduced_zoo):
    from esm_ray.zoo.layout import open_zoo
    from esm_ray.zoo.sources import minilm_dir

    zdir, seconds = reduced_zoo
    assert seconds < 600, f"reduced build took {seconds:.0f}s"  # about 1 min on 2 idle cores
    zoo = open_zoo(zdir)
    assert zoo.kind == "encoder" and zoo.tasks == ["rt_sentiment", "rt_subjectivity"]
    assert zoo.manifest["hash"] == zdir.name
    # base: an exact copy of the packaged pretrained weights, same tensor names as the experts
    with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as src, \
            safe_open(str(zoo.base_dir / "model.safetensors"), "pt") as base:
        base_keys = set(base.keys())
        for k in base_keys:
            assert torch.equal(base.get_tensor(k), src.get_tensor(k)), k
        assert base_keys >= {k for k in src.keys() if not k.endswith("position_ids")}
    for t in zoo.tasks:
        edir = zoo.expert_dir(t)
        for f in ("config.json", "model.safetensors", "head.safetensors", "manifest.json", "tokenizer.json"):
            assert (edir / f).is_file(), f
        with safe_open(str(edir / "model.safetensors"), "pt") as ex, \
                safe_open(str(zoo.base_dir / "model.safetensors"), "pt") as base:
            assert set(ex.keys()) == base_keys
            q = "encoder.layer.0.attention.self.query.weight"
            assert not torch.equal(ex.get_tensor(q), base.get_tensor(q)), "the expert did not move"
        man = json.loads((edir / "manifest.json").read_text())
        assert man["task"] == t and man["splits"] == zoo.task(t)["sizes"]
        assert zoo.probe_path(t).is_file()
        calib = [r["text"] for r in zoo.rows(t, "calib")]
        val = {r["text"] for r in zoo.rows(t, "validation")}
        test = {r["text"] for r in zoo.rows(t, "test")}
        assert len(calib) >= 32 and set(calib) <= val and not set(calib) & test
        rows = zoo.rows(t, "train")
        assert set(rows[0]) == {"text", "label"}


def test_evaluate_expert_reproduces_recorded_accuracy(reduced_zoo):
    from esm_ray.eval.metrics import evaluate_encoder
    from esm_ray.zoo.layout import open_zoo

    zdir, _ = reduced_zoo
    zoo = open_zoo(zdir)
    t = zoo.tasks[1]
    res = evaluate_encoder(zoo.expert_dir(t), zdir, split="test", tasks=[t])
    assert res["tasks"][t]["accuracy"] == pytest.approx(zoo.task(t)["metrics"]["expert"]["test"], abs=1e-6)  # recorded via float32
    assert res["tasks"][t]["normalized"] == pytest.approx(1.0)


def test_second_build_is_cached(reduced_zoo):
    from esm_ray.zoo.build import build_zoo

    zdir, _ = reduced_zoo
    before = (zdir / "zoo.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_zoo(zdir.parent, reduced=True, progress=False)
    assert again == zdir and time.perf_counter() - t0 < 10
    assert (zdir / "zoo.json").stat().st_mtime_ns == before


def test_zoo_hash_depends_on_inputs():
    from esm_ray.zoo.build import REDUCED_CONFIG, REDUCED_SIZES, with_overrides, zoo_key
    from esm_ray.zoo.sources import minilm_dir

    k = zoo_key(["rt_sentiment"], 0, REDUCED_CONFIG, REDUCED_SIZES, minilm_dir())
    assert k == zoo_key(["rt_sentiment"], 0, REDUCED_CONFIG, REDUCED_SIZES, minilm_dir())
    assert k != zoo_key(["rt_sentiment"], 1, REDUCED_CONFIG, REDUCED_SIZES, minilm_dir())
    assert k != zoo_key(["rt_sentiment"], 0, with_overrides(REDUCED_CONFIG, lr=1e-3), REDUCED_SIZES, minilm_dir())
    assert k != zoo_key(["rt_subjectivity"], 0, REDUCED_CONFIG, REDUCED_SIZES, minilm_dir())


def test_specs_for_the_zoo(reduced_zoo, tmp_path):
    from esm_ray.spec import load_spec
    from esm_ray.zoo.layout import open_zoo
    from esm_ray.zoo.specs import METHOD_TABLE, write_specs

    zdir, _ = reduced_zoo
    zoo = open_zoo(zdir)
    paths = write_specs(zdir, tmp_path / "specs")
    assert {p.stem for p in paths} == set(METHOD_TABLE)
    for p in paths:
        spec = load_spec(p)
        entry = METHOD_TABLE[p.stem]
        assert spec.method.name == entry.method and spec.method.params == entry.params
        assert (spec.purify is not None) == (entry.purify is not None)
        assert Path(spec.base) == zoo.base_dir
        assert [e.name for e in spec.experts] == zoo.tasks
        assert all(Path(e.data) == zoo.calib_path(e.name) for e in spec.experts)
        assert Path(spec.output) == (tmp_path / "specs" / "merged" / p.stem).resolve()
    pave = load_spec(tmp_path / "specs" / "pave_ties.yaml")
    assert pave.purify.name == "pave" and pave.purify.params == METHOD_TABLE["pave_ties"].purify


def test_cli_registers_and_runs_specs(reduced_zoo, tmp_path, capsys):
    from esm_ray.eval import cli as eval_cli
    from esm_ray.zoo import cli as zoo_cli

    zdir, _ = reduced_zoo
    parser = argparse.ArgumentParser(prog="esm-ray")
    sub = parser.add_subparsers(dest="command", required=True)
    zoo_cli.register(sub)
    eval_cli.register(sub)
    args = parser.parse_args(["zoo", "specs", str(zdir), "--out", str(tmp_path / "s"), "--methods", "ties", "esm"])
    assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("*.yaml")) == ["esm.yaml", "ties.yaml"]
    args = parser.parse_args(["eval", str(zdir / "base"), "--zoo", str(zdir), "--out", str(tmp_path / "rep")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "pretrained (linear probe)" in out
    for f in ("report.json", "report.md", "report.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    probe, base_row = rep["rows"][0], rep["rows"][2]
    assert base_row["kind"] == "model" and set(base_row["values"]) == set(rep["tasks"])
    assert probe["kind"] == "probe" and rep["rows"][1]["normalized"] == {t: 1.0 for t in rep["tasks"]}
    args = parser.parse_args(["zoo", "build", "--out", str(zdir.parent), "--reduced", "--no-progress"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(zdir)


@pytest.mark.slow
def test_full_zoo_build_meets_the_bar(tmp_path):
    """The default 8-task zoo: every expert above its task's majority rate and its linear probe."""
    from esm_ray.zoo.build import build_zoo
    from esm_ray.zoo.layout import open_zoo

    zoo = open_zoo(build_zoo(progress=False))
    assert len(zoo.tasks) >= 8
    for t in zoo.tasks:
        e = zoo.task(t)
        assert e["metrics"]["expert"]["test"] > e["majority_rate"] + 0.05, t
        assert e["metrics"]["expert"]["test"] >= e["metrics"]["probe"]["test"], t


@pytest.mark.slow
def test_smollm2_zoo_experts_beat_base(tmp_path):
    from esm_ray.zoo.layout import open_zoo
    from esm_ray.zoo.smollm2 import build_lm_zoo

    zoo = open_zoo(build_lm_zoo())
    assert zoo.kind == "causal_lm" and len(zoo.manifest["domains"]) >= 6 and len(zoo.manifest["label_tasks"]) >= 3
    for d in zoo.tasks:
        m = zoo.task(d)["metrics"]
        if zoo.task(d)["kind"] == "domain":  # word perplexity: lower is better
            assert m["expert"]["test"] < m["base"]["test"], d
        else:  # accuracy
            assert m["expert"]["test"] > m["base"]["test"], d
