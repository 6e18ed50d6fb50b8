"""Routed models in the zoo evaluation: sweep rows per router, routing tables, confusion PNGs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esm_ray.errors import InputError
from esm_ray.eval.metrics import evaluate_encoder
from esm_ray.eval.report import ReportTable, to_markdown, write_report
from esm_ray.eval.routed import evaluate_routed_zoo, is_routed_dir
from esm_ray.eval.sweep import sweep
from esm_ray.zoo.layout import open_zoo, write_json, write_jsonl
from esm_ray.zoo.specs import MethodEntry, spec_for
from tests.integration.test_eval import WORDS, _tiny_bert

TASKS = ["a", "b"]
N_TEST = {"a": 9, "b": 7}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _texts(task: int, n: int, seed: int) -> list[str]:
    """Texts of one task: words from the task's own half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    own = WORDS[6 * task:6 * task + 6]
    return [" ".join(own[int(i)] for i in torch.randint(0, 6, (int(torch.randint(2, 7, (1,), generator=g)),),
                                                         generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def routed_zoo(tmp_path_factory) -> Path:
    """A two-task zoo whose experts differ from the base in their linears, with random heads."""
    z = tmp_path_factory.mktemp("routed_zoo") / "zoo"
    _tiny_bert(z / "base")
    base = load_file(str(z / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    tasks = {}
    for t, name in enumerate(TASKS):
        d = z / "experts" / name
        shutil.copytree(z / "base", d)
        sd = {k: (v + 0.3 * torch.randn(v.shape, generator=g) if v.ndim == 2 and k.startswith("encoder.") else v)
              for k, v in base.items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        head = torch.nn.Linear(32, 2)
        hd = {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}
        save_file(hd, str(d / "head.safetensors"))
        (d / "manifest.json").write_text(json.dumps({"task": name, "labels": ["neg", "pos"]}))
        (z / "probes").mkdir(exist_ok=True)
        save_file(hd, str(z / "probes" / f"{name}.safetensors"))
        for split, seed in (("validation", 10 + t), ("test", 20 + t)):
            texts = _texts(t, N_TEST[name], seed)
            write_jsonl(z / "data" / name / f"{split}.jsonl",
                        [{"text": x, "label": i % 2} for i, x in enumerate(texts)])
        write_jsonl(z / "data" / name / "calib.jsonl", [{"text": x} for x in _texts(t, 8, 30 + t)])
        tasks[name] = {"expert": f"experts/{name}", "head": f"experts/{name}/head.safetensors",
                       "probe": f"probes/{name}.safetensors", "data": f"data/{name}",
                       "calib": f"data/{name}/calib.jsonl", "labels": ["neg", "pos"],
                       "sizes": {"validation": N_TEST[name], "test": N_TEST[name]},
                       "metrics": {"expert": {"validation": 0.8, "test": 0.8}}}
    write_json(z / "zoo.json", {"format": 1, "kind": "encoder", "max_length": 16, "base": "base", "tasks": tasks})
    return z


@pytest.fixture(scope="module")
def swept(routed_zoo: Path, tmp_path_factory):
    """One sweep over an ESM++ rank-8 spec (fixed here, not METHOD_TABLE's), merged for real."""
    from esm_ray.runtime import run_merge

    root = tmp_path_factory.mktemp("routed_sweep")
    zoo = open_zoo(routed_zoo)
    spec = spec_for(zoo, "esm_pp_r8", root / "esm_pp_r8", entry=MethodEntry("esm_pp", {"rank": 8}),
                    calibration={"cache_dir": str(root / "cache")})

    def merge_fn(s):
        return str(run_merge(s, progress=False).output)

    return sweep([spec], zoo, merge_fn), root / "esm_pp_r8"


@torch.no_grad()
def _by_hand(out: Path, zoo_dir: Path, router: str) -> dict:
    """Per task, one sample at a time: accuracy with the zoo's head of the true task, and the
    routed task of each sample."""
    from esm_ray.routed import load_routed
    from esm_ray.models.encoder import load_tokenizer
    from esm_ray.models.heads import load_head

    zoo = open_zoo(zoo_dir)
    rm = load_routed(out)
    tok = load_tokenizer(zoo.base_dir)
    res = {}
    for t, name in enumerate(rm.tasks):
        head = load_head(zoo.head_path(name))
        rows = zoo.rows(name, "test")
        correct, routed = 0, []
        for r in rows:
            enc = tok(r["text"], return_tensors="pt", truncation=True, max_length=16)
            o = rm(enc["input_ids"], enc["attention_mask"], router=router,
                   task_ids=torch.tensor([t]) if router == "oracle" else None)
            correct += int(int(head(o.pooled).argmax(-1)) == int(r["label"]))
            routed.append(int(o.task[0]))
        res[name] = {"accuracy": correct / len(rows), "routed": routed}
    return res


def test_sweep_gives_one_row_per_router_matching_a_hand_computation(swept, routed_zoo):
    table, out = swept
    assert is_routed_dir(out)
    names = [r.name for r in table.rows]
    assert names == ["pretrained (linear probe)", "experts", "esm_pp (rank=8) [prototype router]",
                     "esm_pp (rank=8) [oracle router]", "esm_pp (rank=8) [no routing]"]
    for router in ("prototype", "oracle"):
        row = next(r for r in table.rows if r.info.get("router") == router)
        hand = _by_hand(out, routed_zoo, router)
        assert row.kind == "routed" and row.info["method"] == "esm_pp"
        ro = row.info["routing"]
        for i, t in enumerate(TASKS):
            assert row.values[t] == pytest.approx(hand[t]["accuracy"])
            assert row.normalized[t] == pytest.approx(hand[t]["accuracy"] / 0.8)
            assert 0.0 <= ro["routing_accuracy"][t] <= 1.0
            assert ro["routing_accuracy"][t] == pytest.approx(sum(x == i for x in hand[t]["routed"]) / N_TEST[t])
            assert sum(ro["confusion"][i]) == N_TEST[t]
            assert ro["confusion"][i] == [sum(x == j for x in hand[t]["routed"]) for j in range(len(TASKS))]
        assert ro["confusion_tasks"] == TASKS
    oracle = table.row("esm_pp (rank=8) [oracle router]")
    assert oracle.info["routing"]["average_routing_accuracy"] == 1.0
    # no routing = the static merged base: the same numbers as the static evaluation path
    none = table.rows[-1]
    assert none.info["routing"] is None
    static = evaluate_encoder(out, routed_zoo)
    assert none.values == pytest.approx({t: v["accuracy"] for t, v in static["tasks"].items()})


def test_report_has_routing_table_and_confusion_pngs(swept, tmp_path):
    table, _ = swept
    paths = write_report(table, tmp_path / "rep")
    md = paths["markdown"].read_text()
    assert "routing accuracy (%)" in md
    assert "| esm_pp (rank=8) [prototype router] |" in md.split("routing accuracy (%)")[1]
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("confusion_*.png"))
    assert pngs == ["confusion_esm_pp-rank=8-oracle-router.png", "confusion_esm_pp-rank=8-prototype-router.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in (tmp_path / "rep").glob("confusion_*.png"))
    back = ReportTable.from_dict(json.loads(paths["json"].read_text()))
    assert back.row("esm_pp (rank=8) [prototype router]").info["routing"]["confusion"] == \
        table.row("esm_pp (rank=8) [prototype router]").info["routing"]["confusion"]
    assert to_markdown(back) == to_markdown(table)


def test_cli_eval_on_a_routed_dir(swept, routed_zoo, tmp_path, capsys):
    from esm_ray.cli import main

    table, out = swept
    assert main(["eval", str(out), "--zoo", str(routed_zoo), "--name", "esm_pp (rank=8)",
                 "--out", str(tmp_path / "rep")]) == 0
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    got = {r["name"]: r["values"] for r in data["rows"]}
    assert got == {r.name: pytest.approx(r.values) for r in table.rows}
    assert (tmp_path / "rep" / "confusion_esm_pp-rank=8-prototype-router.png").is_file()
    assert "[prototype router]" in capsys.readouterr().out


def test_task_mismatch_names_the_dir_and_the_missing_task(swept, routed_zoo, tmp_path):
    _, out = swept
    z2 = tmp_path / "zoo3"
    z2.mkdir()
    for sub in ("base", "experts", "probes", "data"):
        os.symlink(routed_zoo / sub, z2 / sub)
    man = json.loads((routed_zoo / "zoo.json").read_text())
    man["tasks"]["c"] = dict(man["tasks"]["a"])
    write_json(z2 / "zoo.json", man)
    with pytest.raises(InputError, match=rf"{out}.*no expert for the zoo task\(s\) c"):
        evaluate_routed_zoo(out, z2)
    assert list(evaluate_routed_zoo(out, z2, tasks=["b"], routers=["oracle"])["routers"]["oracle"]["tasks"]) == ["b"]
