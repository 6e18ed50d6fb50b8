"""The routed model (esm_ray.routed) and the esm_pp / sim methods through the merge runtime."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esm_ray.routed.format import DEFAULT_ROUTED_LAYERS
from esm_ray.core.routing import fit_subspace, stack_subspaces
from esm_ray.models.features import pooled_features
from esm_ray.routed import Head, SimRouter, build_routed, load_routed, routed_modules
from esm_ray.spec import CalibrationSpec
from tests.fixtures.family import bert_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TASKS = ["alpha", "beta", "gamma"]
VOCAB = 96


def _rows(task: int, n: int, seed: int) -> list[dict]:
    """Token rows of one task: ids from the task's own third of the vocabulary, varied lengths."""
    g = torch.Generator().manual_seed(seed)
    lo = 1 + task * 31
    return [{"input_ids": torch.randint(lo, lo + 31, (int(torch.randint(4, 15, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(n)]


def _batch(rows: list[dict], pad_value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return ids, mask


@pytest.fixture(scope="module")
def family():
    return make_family_in_memory()


def make_family_in_memory() -> dict:
    """A tiny BERT base and three experts that differ from it only in the routed linears."""
    from transformers import BertModel

    from esm_ray.stats.calibrate import calibrate

    torch.manual_seed(0)
    base = BertModel(bert_config()).eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    routed = routed_modules(base)
    g = torch.Generator().manual_seed(1)
    experts, stats = [], []
    for t in range(len(TASKS)):
        m = BertModel(bert_config()).eval()
        sd = {k: v.clone() for k, v in base_sd.items()}
        for name in routed:
            w = sd[f"{name}.weight"]
            sd[f"{name}.weight"] = w + 0.3 * torch.randn(w.shape, generator=g)
        m.load_state_dict(sd)
        experts.append(m)
        stats.append(calibrate(m, _rows(t, 24, seed=10 + t), None, CalibrationSpec(samples=24, batch_size=8)))
    heads = {}
    for t, name in enumerate(TASKS):
        lin = torch.nn.Linear(32, 2 + t)
        heads[name] = Head(lin.eval(), [f"{name}-{j}" for j in range(2 + t)])
    return {"base_sd": base_sd, "experts": experts, "stats": stats, "heads": heads, "routed": routed}


def _merged(family) -> torch.nn.Module:
    from transformers import BertModel

    m = BertModel(bert_config()).eval()
    sd = {k: torch.stack([e.state_dict()[k] for e in family["experts"]]).mean(0) for k in family["base_sd"]}
    m.load_state_dict(sd)
    return m


def routed_in_memory(family, rank: int = 64, sim: bool = True, expert_dtype: str = "float32"):
    from transformers import BertModel

    backbone = None
    sim_router = None
    if sim:
        backbone = BertModel(bert_config()).eval()
        backbone.load_state_dict(family["base_sd"])
        spaces = []
        for t in range(len(TASKS)):
            ids, mask = _batch(_rows(t, 24, seed=10 + t))
            spaces.append(fit_subspace(pooled_features(backbone, ids, mask), 4))
        means, bases = stack_subspaces(spaces)
        sim_router = SimRouter(means, bases)
    return build_routed(_merged(family), [e.state_dict() for e in family["experts"]], family["stats"], TASKS,
                        rank=rank, heads=family["heads"], sim=sim_router, backbone=backbone,
                        expert_dtype=expert_dtype)


def test_default_pattern_routes_all_six_linears_per_block(family):
    assert len(family["routed"]) == 12
    names = {re.sub(r"\d+", "*", n) for n in family["routed"]}
    assert names == {"encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.key",
                     "encoder.layer.*.attention.self.value", "encoder.layer.*.attention.output.dense",
                     "encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"}
    assert not re.search(DEFAULT_ROUTED_LAYERS, "pooler.dense")


def test_oracle_routing_at_full_rank_reproduces_each_expert(family):
    """Oracle 10 on the whole model: W_merged + B_t A_t = W_t at every routed layer."""
    rm = routed_in_memory(family, rank=64, sim=False)
    rows = [r for t in range(3) for r in _rows(t, 4, seed=99 + t)]
    ids, mask = _batch(rows)
    with torch.no_grad():
        for t in range(3):
            out = rm(ids, mask, router="oracle", task_ids=torch.full((len(rows),), t))
            want = family["experts"][t](input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(out.hidden * mask[..., None], want * mask[..., None], atol=2e-4, rtol=1e-4)
            assert out.task.tolist() == [t] * len(rows)
        plain = _merged(family)(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(rm(ids, mask, router="none").hidden, plain, atol=1e-5, rtol=1e-5)
        gap = (rm(ids, mask, router="oracle", task_ids=torch.zeros(len(rows), dtype=torch.long)).hidden - plain).abs()
        assert float(gap.max()) > 1e-2  # the experts do change the output


@pytest.mark.parametrize("router", ["prototype", "sim", "oracle"])
def test_mixed_task_batch_equals_one_by_one(family, router):
    """Oracle 11: routing and outputs on a mixed-task, mixed-length batch equal solo runs."""
    rm = routed_in_memory(family, rank=8)
    rows = [r for t in range(3) for r in _rows(t, 3, seed=200 + t)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(3)).tolist()
    rows = [rows[i] for i in order]
    truth = torch.tensor([i // 3 for i in order])
    ids, mask = _batch(rows, pad_value=77)  # pad ids differ from a solo run's: must not matter
    task_ids = truth if router == "oracle" else None
    with torch.no_grad():
        out = rm(ids, mask, router=router, task_ids=task_ids)
        for i, r in enumerate(rows):
            sid, smask = _batch([r])
            solo = rm(sid, smask, router=router, task_ids=None if task_ids is None else task_ids[i:i + 1])
            n = len(r["input_ids"])
            assert int(solo.task[0]) == int(out.task[i])
            assert torch.equal(solo.layer_choices[0], out.layer_choices[i])
            torch.testing.assert_close(solo.hidden[0, :n], out.hidden[i, :n], atol=1e-4, rtol=1e-4)
            if out.scores is not None:
                torch.testing.assert_close(solo.scores[0], out.scores[i], atol=1e-5, rtol=1e-5)
    if router == "sim":  # tasks use disjoint vocabularies: the support subspaces separate them
        assert float((out.task == truth).float().mean()) >= 0.8


def test_classify_and_predict_use_the_routed_tasks_head(family):
    rm = routed_in_memory(family, rank=8)
    rows = [r for t in range(3) for r in _rows(t, 2, seed=300 + t)]
    inputs = [r["input_ids"] for r in rows]
    preds = rm.predict(inputs, router="sim")
    ids, mask = _batch(rows)
    with torch.no_grad():
        out = rm(ids, mask, router="sim")
    for p, t, pooled in zip(preds, out.task.tolist(), out.pooled):
        assert p["task"] == TASKS[t]
        head = family["heads"][TASKS[t]]
        assert p["label"] == head.labels[int(head.linear(pooled).argmax())]
        assert set(p["scores"]) == set(TASKS)
    forced = rm.predict(inputs[:2], tasks=["gamma", None], router="prototype")
    assert forced[0]["task"] == "gamma" and forced[0]["label"].startswith("gamma-") and forced[0]["scores"] is None
    assert forced[1]["scores"] is not None
    with pytest.raises(KeyError, match="unknown task"):
        rm.predict(inputs[:1], tasks=["delta"])
    with pytest.raises(ValueError, match="oracle"):
        rm(ids, mask, router="oracle")


def test_save_load_round_trip_gives_identical_outputs(family, tmp_path):
    from transformers import BertModel

    rm = routed_in_memory(family, rank=8)
    out_dir = rm.save(tmp_path / "routed", expert_dtype="float32")
    assert (out_dir / "config.json").is_file() and (out_dir / "routed" / "manifest.json").is_file()
    assert sorted(p.name for p in (out_dir / "heads").iterdir()) == [f"{t}.safetensors" for t in TASKS]
    # the merged base is a plain HF directory with the merged weights
    plain = BertModel.from_pretrained(str(out_dir))
    for k, v in _merged(family).state_dict().items():
        torch.testing.assert_close(plain.state_dict()[k], v, atol=0, rtol=0)
    back = load_routed(out_dir)
    assert back.tasks == TASKS and back.routers[:2] == ["prototype", "sim"]
    assert {t: h.labels for t, h in back.heads.items()} == {t: h.labels for t, h in family["heads"].items()}
    rows = [r for t in range(3) for r in _rows(t, 2, seed=400 + t)]
    ids, mask = _batch(rows)
    with torch.no_grad():
        for router in ("prototype", "sim", "none"):
            a, b = rm(ids, mask, router=router), back(ids, mask, router=router)
            assert torch.equal(a.task, b.task)
            torch.testing.assert_close(a.hidden, b.hidden, atol=0, rtol=0)
    assert back.predict([r["input_ids"] for r in rows]) == rm.predict([r["input_ids"] for r in rows])
    sizes = back.sizes()
    assert sizes["experts_bytes"] == (out_dir / "routed" / "experts.safetensors").stat().st_size
    assert 0 < sizes["total_bytes"] < sizes["full_experts_bytes"]


def test_static_directory_serves_with_given_heads(family, tmp_path):
    merged = _merged(family)
    merged.save_pretrained(str(tmp_path / "static"))
    exp = tmp_path / "expert_beta"
    exp.mkdir()
    h = family["heads"]["beta"]
    save_file({"weight": h.linear.weight.detach().contiguous(), "bias": h.linear.bias.detach().contiguous()},
              str(exp / "head.safetensors"))
    (exp / "manifest.json").write_text(json.dumps({"labels": h.labels}))
    m = load_routed(tmp_path / "static", heads={"beta": exp})
    assert m.routers == ["none"] and m.tasks == ["beta"]
    preds = m.predict([[5, 6, 7], [40, 41]])
    assert all(p["task"] == "beta" and p["label"] in h.labels for p in preds)
    assert m.sizes()["experts_bytes"] == 0


# ---- through the merge runtime ---------------------------------------------------------------

def _expert_copy(src: Path, dst: Path, n_labels: int, name: str) -> Path:
    shutil.copytree(src, dst)
    lin = torch.nn.Linear(32, n_labels)
    save_file({"weight": lin.weight.detach().contiguous(), "bias": lin.bias.detach().contiguous()},
              str(dst / "head.safetensors"))
    (dst / "manifest.json").write_text(json.dumps({"task": name, "labels": [f"{name}{j}" for j in range(n_labels)]}))
    return dst


@pytest.fixture(scope="module")
def merge_inputs(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("routed_merge")
    experts = []
    for t in range(3):
        d = _expert_copy(tiny_bert[f"expert_{t}"], root / f"expert_{t}", 2 + t, TASKS[t])
        data = root / f"calib_{t}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in _rows(t, 20, seed=500 + t)))
        experts.append({"name": TASKS[t], "model": str(d), "data": str(data)})
    return {"root": root, "base": str(tiny_bert["base"]), "experts": experts}


def _spec(inputs, method: str, out: Path, params: dict):
    """The tests below check the spec's oracles exactly (a full-rank residual restores the expert),
    so the statistics are float64: with mixed-precision Grams the near-null directions of
    δW G δWᵀ are decided by round-off (docs/methods-subspace.md)."""
    from esm_ray.spec import MergeSpec

    return MergeSpec(base=inputs["base"], experts=inputs["experts"], method={"name": method, "params": params},
                     output=str(out), overwrite=True,
                     calibration={"samples": 16, "batch_size": 8, "cache_dir": str(inputs["root"] / "cache"),
                                  "gram_precision": "float64"})


def _base_method() -> str:
    from esm_ray.methods import METHODS

    try:
        import esm_ray.methods.esm  # noqa: F401
    except ModuleNotFoundError:
        pass
    return "esm" if "esm" in METHODS else "task_arithmetic"


def test_esm_pp_merge_writes_a_routed_directory(merge_inputs, tmp_path):
    from esm_ray.runtime import run_merge
    from esm_ray.stats.calibrate import calibrate
    from esm_ray.stats.data import load_calibration_rows
    import esm_ray.methods.esm_pp  # noqa: F401
    from transformers import BertModel

    out = tmp_path / "esm_pp"
    base_method = _base_method()
    params = {"base_method": base_method, "rank": 64, "expert_dtype": "float32"}
    if base_method == "task_arithmetic":
        params["base_params"] = {"lambda": 0.4}
    run_merge(_spec(merge_inputs, "esm_pp", out, params), progress=False)
    man = json.loads((out / "routed" / "manifest.json").read_text())
    assert man["method"] == "esm_pp" and man["tasks"] == TASKS and man["router"] == "prototype"
    assert man["base_method"] == base_method and man["rank"] == 64 and len(man["layers"]) == 12
    assert {t: h["labels"] for t, h in man["heads"].items()} == {t: [f"{t}{j}" for j in range(2 + i)]
                                                                 for i, t in enumerate(TASKS)}
    merged = BertModel.from_pretrained(str(out)).state_dict()
    factors = load_file(str(out / "routed" / "experts.safetensors"))
    router = load_file(str(out / "routed" / "router.safetensors"))
    for t, e in enumerate(merge_inputs["experts"]):
        expert = BertModel.from_pretrained(e["model"]).eval()
        w = expert.state_dict()
        rows = load_calibration_rows(e["data"], 16, 0)
        st = calibrate(expert, rows, None, CalibrationSpec(samples=16, batch_size=8))
        for layer in man["layers"]:
            m = layer["module"]
            # rank 64 ≥ d_out: the residual expert restores the expert's weight (oracle 10)
            restored = merged[f"{m}.weight"] + factors[f"{m}.B"][t] @ factors[f"{m}.A"][t]
            torch.testing.assert_close(restored, w[f"{m}.weight"], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(router[f"prototype.{m}"][t].double(), st[m].mean(), atol=1e-5, rtol=1e-5)
    rm = load_routed(out)
    assert rm.routers == ["prototype", "oracle", "none"]
    ids, mask = _batch([r for t in range(3) for r in _rows(t, 2, seed=600 + t)])
    with torch.no_grad():
        for t, e in enumerate(merge_inputs["experts"]):
            got = rm(ids, mask, router="oracle", task_ids=torch.full((6,), t)).hidden
            assert torch.isfinite(got).all()
    sizes = rm.sizes()  # rank 64 in float32 on a 32-wide model: the experts outweigh the model
    assert sizes["experts_bytes"] == (out / "routed" / "experts.safetensors").stat().st_size
    assert sizes["full_experts_bytes"] == 3 * sizes["merged_bytes"] + sizes["heads_bytes"]


def test_sim_merge_routes_held_out_samples_to_their_task(merge_inputs, tmp_path):
    from esm_ray.runtime import run_merge
    import esm_ray.methods.sim  # noqa: F401

    out = tmp_path / "sim"
    params = {"base_method": "task_arithmetic", "base_params": {"lambda": 0.4}, "rank": 4,
              "subspace_rank": 4, "support_samples": 16}
    run_merge(_spec(merge_inputs, "sim", out, params), progress=False)
    man = json.loads((out / "routed" / "manifest.json").read_text())
    assert man["router"] == "sim" and man["routers"] == ["sim", "prototype"]
    assert man["sim"]["backbone"] == "routed/backbone.safetensors" and man["sim"]["samples"] == 16
    # the stored backbone is the pretrained base, tensor for tensor
    base = load_file(str(Path(merge_inputs["base"]) / "model.safetensors"))
    bb = load_file(str(out / "routed" / "backbone.safetensors"))
    assert set(bb) == set(base) and all(torch.equal(bb[k], base[k]) for k in base)
    rm = load_routed(out)
    assert rm.router == "sim"
    rows = [r for t in range(3) for r in _rows(t, 10, seed=700 + t)]
    truth = torch.tensor([t for t in range(3) for _ in range(10)])
    ids, mask = _batch(rows)
    with torch.no_grad():
        got = rm(ids, mask).task
    assert float((got == truth).float().mean()) >= 0.9
    preds = rm.predict([r["input_ids"] for r in rows[:3]])
    assert preds[0]["label"].startswith(preds[0]["task"])


def test_routed_method_rejects_bad_parameters(merge_inputs, tmp_path):
    from esm_ray.errors import SpecError
    from esm_ray.runtime import build_plan
    import esm_ray.methods.esm_pp  # noqa: F401

    with pytest.raises(SpecError, match="base_method"):
        build_plan(_spec(merge_inputs, "esm_pp", tmp_path / "x", {"base_method": "sim"}))
    with pytest.raises(SpecError, match="lambda_x|unknown parameter"):
        build_plan(_spec(merge_inputs, "esm_pp", tmp_path / "x",
                         {"base_method": "task_arithmetic", "base_params": {"lambda_x": 1}}))
    with pytest.raises(SpecError, match="search stage"):
        build_plan(_spec(merge_inputs, "esm_pp", tmp_path / "x", {"base_method": "concrete_ta"}))
    with pytest.raises(SpecError, match="layers"):
        build_plan(_spec(merge_inputs, "esm_pp", tmp_path / "x", {"base_method": "task_arithmetic", "layers": "("}))


def test_evaluate_routed_reports_accuracy_and_routing(family, tmp_path):
    from esm_ray.routed.evaluate import confusion_png, evaluate_routed

    rm = routed_in_memory(family, rank=8)
    data = {}
    for t, name in enumerate(TASKS):
        rows = _rows(t, 12, seed=900 + t)
        ids, mask = _batch(rows)
        with torch.no_grad():  # labels: what the oracle-routed model predicts with the task's head
            out = rm(ids, mask, router="oracle", task_ids=torch.full((len(rows),), t))
            labels = family["heads"][name].linear(out.pooled).argmax(-1).tolist()
        data[name] = ([r["input_ids"] for r in rows], labels)
    res = evaluate_routed(rm, data, ["oracle", "sim", "prototype", "none"], expert_accuracy={n: 0.5 for n in TASKS},
                          batch_size=7)
    oracle = res["routers"]["oracle"]
    assert oracle["average"]["accuracy"] == 1.0 and oracle["average"]["routing_accuracy"] == 1.0
    assert oracle["average"]["normalized"] == 2.0
    assert oracle["confusion"] == [[12, 0, 0], [0, 12, 0], [0, 0, 12]]
    sim = res["routers"]["sim"]
    assert sum(map(sum, sim["confusion"])) == 36
    for name, row in sim["tasks"].items():
        assert row["accuracy_task_unknown"] <= row["accuracy"]
        assert row["routing_accuracy"] == sim["confusion"][TASKS.index(name)][TASKS.index(name)] / 12
    assert "layer_routing_accuracy" in res["routers"]["prototype"]["average"]
    assert res["routers"]["none"]["confusion"] is None and "routing_accuracy" not in res["routers"]["none"]["average"]
    png = confusion_png(sim["confusion"], TASKS, tmp_path / "c.png", "sim")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sim_merge_of_a_llama_family_routes_per_sample(tiny_llama, tmp_path):
    """The decoder path: LLaMA projections are routed, SiM features come from the causal LM."""
    from esm_ray.runtime import run_merge
    from esm_ray.spec import MergeSpec
    import esm_ray.methods.sim  # noqa: F401

    experts = []
    for t in range(3):
        data = tmp_path / f"llama_{t}.jsonl"
        lo = 1 + 26 * t
        g = torch.Generator().manual_seed(t)
        data.write_text("".join(json.dumps({"input_ids": torch.randint(lo, lo + 26, (int(torch.randint(4, 12, (1,), generator=g)),),
                                                                       generator=g).tolist()}) + "\n" for _ in range(12)))
        experts.append({"name": TASKS[t], "model": str(tiny_llama[f"expert_{t}"]), "data": str(data)})
    out = tmp_path / "llama_sim"
    spec = MergeSpec(base=str(tiny_llama["base"]), experts=experts, output=str(out),
                     method={"name": "sim", "params": {"base_method": "task_arithmetic", "rank": 4,
                                                       "subspace_rank": 3, "support_samples": 12}},
                     calibration={"samples": 12, "batch_size": 4, "cache_dir": str(tmp_path / "cache")})
    run_merge(spec, progress=False)
    rm = load_routed(out)
    man = rm.manifest
    assert len(man["layers"]) == 14  # q, k, v, o, gate, up, down in 2 blocks
    assert all(re.search(r"layers\.\d+\.(self_attn|mlp)\.", layer["module"]) for layer in man["layers"])
    rows = [{"input_ids": list(range(1 + 26 * t + j, 1 + 26 * t + j + 5 + 2 * j))} for t in range(3) for j in range(2)]
    ids, mask = _batch(rows)
    with torch.no_grad():
        for router in ("sim", "prototype"):
            out_b = rm(ids, mask, router=router)
            for i, r in enumerate(rows):
                solo = rm(*_batch([r]), router=router)
                n = len(r["input_ids"])
                assert int(solo.task[0]) == int(out_b.task[i])
                torch.testing.assert_close(solo.hidden[0, :n], out_b.hidden[i, :n], atol=1e-4, rtol=1e-4)
