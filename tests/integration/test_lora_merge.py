"""LoRA adapter experts end to end: against peft's own add_weighted_adapter, against the same
adapters densified into full models, mixed with full experts, written as an adapter
(`output_format: peft`), from S3 and through Ray (bad adapters: tests/hostile/test_lora_inputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esm_ray.cli import main
from esm_ray.errors import SpecError
from esm_ray.io.reader import open_model
from esm_ray.runtime import build_plan, run_merge
from esm_ray.spec import spec_from_dict
from tests.builders import calibration_files, output_files

TARGET_KEYS = [f"model.layers.{i}.{m}.weight" for i in range(2)
               for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    r = open_model(str(d))
    return {k: r.get(k).float() for k in r.keys()}


def _spec(base: Path, experts: list[Path], out: Path, method: str = "task_arithmetic", *,
          weights: list[float] | None = None, params: dict | None = None, **extra) -> dict:
    exps = [{"name": f"e{i}", "model": str(e)} | ({"weight": weights[i]} if weights else {})
            for i, e in enumerate(experts)]
    return {"base": str(base), "experts": exps, "method": {"name": method, "params": params or {}},
            "output": str(out), "runtime": {"name": "local"}, **extra}


def _merge(spec: dict):
    return run_merge(spec_from_dict(spec), progress=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _peft_model(base: Path, adapters: list[Path]):
    """The base with the adapters loaded as a0, a1, ... (peft)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(adapters[i], adapter_name=f"a{i}")
    return model


def _peft_deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    """{base weight name: ΔW} of one loaded adapter, from peft's own get_delta_weight."""
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "get_delta_weight") and (adapter in getattr(mod, "lora_A", {})
                                                 or adapter in getattr(mod, "lora_embedding_A", {})):
            out[f"{name}.weight"] = mod.get_delta_weight(adapter).detach().float()
    return out


def _densified(base: Path, adapter: Path, out: Path) -> Path:
    """The adapter merged into the base by peft, saved as a full model."""
    if not out.exists():
        _peft_model(base, [adapter]).merge_and_unload().save_pretrained(out)
    return out


# ---- against peft's add_weighted_adapter -----------------------------------------------------

def test_task_arithmetic_equals_peft_cat(lora_family, tmp_path):
    ads = [lora_family[f"lora_{i}"] for i in range(3)]  # ranks 2, 4, 3; the last rsLoRA
    w = [0.7, 1.3, 0.5]
    res = _merge(_spec(lora_family["base"], ads, tmp_path / "out", weights=w))
    assert res.report["method"] == "task_arithmetic"
    assert [e["lora"]["ranks"] for e in res.report["experts"]] == [[2], [4], [3]]
    assert res.report["experts"][0]["lora"] == {"targets": 8, "ranks": [2], "saved": [], "factored": True}
    peft = _peft_model(lora_family["base"], ads)
    peft.add_weighted_adapter([f"a{i}" for i in range(3)], w, "cat", combination_type="cat")
    want = _peft_deltas(peft, "cat")
    assert sorted(want) == sorted(TARGET_KEYS)
    base, got = _weights(lora_family["base"]), _weights(tmp_path / "out")
    for k in TARGET_KEYS:
        assert _rel(got[k] - base[k], want[k]) < 1e-5, k
    for k in set(base) - set(TARGET_KEYS):
        assert torch.equal(got[k], base[k]), k
    # the same merge written as an adapter: exact concatenation, rank Σr = 9, loads in peft
    _merge(_spec(lora_family["base"], ads, tmp_path / "ad", weights=w, output_format="peft"))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 9 and cfg["peft_type"] == "LORA"
    mine = _peft_deltas(_peft_model(lora_family["base"], [tmp_path / "ad"]), "a0")
    for k in TARGET_KEYS:
        assert _rel(mine[k], want[k]) < 1e-5, k


def test_truncated_adapter_equals_peft_svd(lora_family, tmp_path):
    ads = [lora_family["lora_0"], lora_family["lora_1"]]
    w = [1.0, 0.8]
    _merge(_spec(lora_family["base"], ads, tmp_path / "ad", weights=w, output_format="peft", peft={"rank": 3}))
    peft = _peft_model(lora_family["base"], ads)
    peft.add_weighted_adapter(["a0", "a1"], w, "svd", combination_type="svd", svd_rank=3)
    want = _peft_deltas(peft, "svd")
    report = json.loads((tmp_path / "ad" / "merge_report.json").read_text())
    assert set(report["output"]["ranks"].values()) == {3}
    mine = _peft_deltas(_peft_model(lora_family["base"], [tmp_path / "ad"]), "a0")
    for k in TARGET_KEYS:
        assert _rel(mine[k], want[k]) < 1e-4, k


def test_one_adapter_equals_peft_linear(lora_family, tmp_path):
    """peft's `linear` sums the A and the B factors separately, which is the weighted task
    vector only for one adapter (with several it adds cross terms B_i A_j); compare there."""
    ad = lora_family["lora_1"]
    _merge(_spec(lora_family["base"], [ad], tmp_path / "out", weights=[0.6]))
    peft = _peft_model(lora_family["base"], [ad])
    peft.add_weighted_adapter(["a0"], [0.6], "lin", combination_type="linear")
    want = _peft_deltas(peft, "lin")
    base, got = _weights(lora_family["base"]), _weights(tmp_path / "out")
    for k in TARGET_KEYS:
        assert _rel(got[k] - base[k], want[k]) < 1e-5, k


# ---- factored == densified ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["tsvm", "esm"])
def test_factored_methods_equal_the_densified_merge(method, lora_family, tmp_path, monkeypatch):
    from esm_ray.methods import METHODS

    ads = [lora_family[f"lora_{i}"] for i in range(3)]
    dense = [_densified(lora_family["base"], a, tmp_path / f"dense_{i}") for i, a in enumerate(ads)]
    extra: dict = {}
    if method == "esm":
        data = calibration_files(tmp_path / "data", 3, vocab=80)
        # the rescale ESM runs by default on adapters, asked of the densified experts too: an
        # adapter's τ from its factors, a full expert's from its weights, the same factors
        extra = {"calibration": {"samples": 8, "max_length": 16, "batch_size": 4,
                                 "gram_precision": "float64", "cache_dir": str(tmp_path / "cache")},
                 "rescale": {"scope": "tensor"}}
    calls = []
    cls = METHODS[method]
    orig = cls.prepare_lora
    monkeypatch.setattr(cls, "prepare_lora", lambda self, *a: calls.append(a[0].name) or orig(self, *a))
    specs = []
    for name, experts in (("lora", ads), ("dense", dense)):
        s = _spec(lora_family["base"], experts, tmp_path / name, method, **extra)
        if method == "esm":
            for e, d in zip(s["experts"], data):
                e["data"] = str(d)
        specs.append(s)
        _merge(s)
    assert sorted(set(calls)) == sorted(TARGET_KEYS)  # every LoRA target went the factored way
    if method == "esm":  # calibration.mode auto: the adapters one block at a time, full experts whole
        modes = [json.loads(p.read_text())["mode"] for p in (tmp_path / "cache" / "stats").glob("*.json")]
        assert sorted(modes) == ["full"] * 3 + ["layerwise"] * 3
    got, want = _weights(tmp_path / "lora"), _weights(tmp_path / "dense")
    for k in want:
        assert _rel(got[k], want[k]) < 1e-5, k


# ---- mixed with full experts; modules_to_save ---------------------------------------------------

def test_adapters_mixed_with_a_full_expert(lora_family, tmp_path):
    base = _weights(lora_family["base"])
    full = _weights(lora_family["full_0"])
    experts = [lora_family["full_0"], lora_family["lora_0"], lora_family["saved"]]
    _merge(_spec(lora_family["base"], experts, tmp_path / "ta", params={"lambda": 0.5}))
    got = _weights(tmp_path / "ta")
    d0 = _peft_deltas(_peft_model(lora_family["base"], [lora_family["lora_0"]]), "a0")
    d2 = _peft_deltas(_peft_model(lora_family["base"], [lora_family["saved"]]), "a0")
    saved = load_file(str(lora_family["saved"] / "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    for k, b in base.items():
        want = full[k] - b + d0.get(k, 0) + d2.get(k, 0) + (saved - b if k == "lm_head.weight" else 0)
        torch.testing.assert_close(got[k], b + 0.5 * want, rtol=1e-5, atol=1e-6)
    # an elementwise method reads the adapters densified, tensor by tensor
    _merge(_spec(lora_family["base"], experts, tmp_path / "ties", "ties", params={"density": 0.5}))
    assert any(not torch.equal(v, base[k]) for k, v in _weights(tmp_path / "ties").items())


@pytest.mark.parametrize("method", ["tsvm", "esm", "ties"])
def test_peft_output_with_saved_modules_loads_as_the_dense_merge(method, lora_family, tmp_path):
    """tsvm: factored update; esm: factored with statistics, layer scales and the rescale it
    runs by default on adapters (each update's factor from its dense form, the same in both
    outputs); ties: from the SVD of the dense update."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    experts = [lora_family["lora_0"], lora_family["saved"]]
    extra: dict = {}
    if method == "esm":
        data = calibration_files(tmp_path / "data", 2, vocab=80)
        extra = {"calibration": {"samples": 8, "max_length": 16, "batch_size": 4, "cache_dir": str(tmp_path / "c")}}
    for name, fmt in (("dense", "dense"), ("ad", "peft")):
        s = _spec(lora_family["base"], experts, tmp_path / name, method, output_format=fmt, **extra)
        if method == "esm":
            for e, d in zip(s["experts"], data):
                e["data"] = str(d)
        _merge(s)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head"]
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(lora_family["base"]), tmp_path / "ad")
    merged = model.merge_and_unload().state_dict()
    for k, v in _weights(tmp_path / "dense").items():
        assert _rel(merged[k].float(), v) < 1e-5, k


def test_peft_output_refuses_what_an_adapter_cannot_hold(lora_family, tmp_path, capsys):
    spec = _spec(lora_family["base"], [lora_family["full_0"], lora_family["lora_0"]], tmp_path / "out",
                 output_format="peft")
    with pytest.raises(SpecError, match=r"tensor '(lm_head|model\.[a-z_.0-9]+)\.weight' changes in the merge"):
        _merge(spec)
    assert not (tmp_path / "out").exists()
    # passthrough with a scale changes every tensor, the adapter's or not
    scaled = _spec(lora_family["base"], [lora_family["lora_0"]], tmp_path / "out", "passthrough",
                   params={"scale": 0.5}, output_format="peft")
    with pytest.raises(SpecError, match=r"tensor '(lm_head|model\.[a-z_.0-9]+)\.weight' changes in the merge"):
        _merge(scaled)
    assert not (tmp_path / "out").exists()
    only_full = _spec(lora_family["base"], [lora_family["full_0"]], tmp_path / "out", output_format="peft")
    with pytest.raises(SpecError, match="no expert is one"):
        _merge(only_full)
    assert not (tmp_path / "out").exists()


def test_peft_output_checks_the_other_tensors_in_row_blocks(lora_family, tmp_path, monkeypatch):
    """The tensors no adapter targets are checked unchanged in row blocks where the method
    merges in blocks (an LLM's embedding is never held whole in float32): the same adapter as
    whole-tensor checks, and the same refusal, naming the tensor, when a full expert changes one."""
    from esm_ray.runtime.job import MergeJob
    from esm_ray.runtime.pool import LocalPool

    def merge(spec: dict, block_bytes: int):
        s = spec_from_dict(spec)
        pool = LocalPool(s)
        try:
            return MergeJob(build_plan(s), pool, progress=False, block_bytes=block_bytes).run()
        finally:
            pool.close()

    from esm_ray.methods.ties import Ties

    blocked = []
    real = MergeJob._merged_blocks
    monkeypatch.setattr(MergeJob, "_merged_blocks", lambda self, o, *a: (blocked.append(o.info.name),
                                                                         real(self, o, *a))[1])
    # the check itself: TIES would otherwise write the untouched tensors as the base's unmerged
    monkeypatch.setattr(Ties, "zero_for_zero_tasks", False)
    adapters = [lora_family["lora_0"], lora_family["lora_1"]]
    for name, block_bytes in (("whole", 1 << 30), ("blocks", 256)):
        merge(_spec(lora_family["base"], adapters, tmp_path / name, "ties", params={"density": 0.5},
                    output_format="peft"), block_bytes)
        assert bool(blocked) == (name == "blocks")
    assert "model.embed_tokens.weight" in blocked
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "blocks" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mixed = _spec(lora_family["base"], [lora_family["full_0"], lora_family["lora_0"]], tmp_path / "out",
                  output_format="peft")
    with pytest.raises(SpecError, match=r"tensor '(lm_head|model\.[a-z_.0-9]+)\.weight' changes in the merge"):
        merge(mixed, 256)
    assert not (tmp_path / "out").exists()


def test_embedding_target_equals_peft_cat_and_round_trips(lora_family, tmp_path):
    from tests.fixtures.lora import make_adapter

    base = lora_family["base"]
    emb = make_adapter(base, tmp_path / "emb", r=2, alpha=3, seed=20, targets=("embed_tokens", "q_proj"))
    ads = [emb, lora_family["lora_1"]]
    _merge(_spec(base, ads, tmp_path / "out", weights=[0.5, 1.0]))
    _merge(_spec(base, ads, tmp_path / "ad", weights=[0.5, 1.0], output_format="peft"))
    peft = _peft_model(base, ads)
    peft.add_weighted_adapter(["a0", "a1"], [0.5, 1.0], "cat", combination_type="cat")
    want = _peft_deltas(peft, "cat")
    assert "model.embed_tokens.weight" in want
    b, got = _weights(base), _weights(tmp_path / "out")
    mine = _peft_deltas(_peft_model(base, [tmp_path / "ad"]), "a0")
    for k, d in want.items():
        assert _rel(got[k] - b[k], d) < 1e-5, k
        assert _rel(mine[k], d) < 1e-5, k


def test_dry_run_names_the_adapters_and_the_output(lora_family, tmp_path, capsys):
    import pickle

    import yaml

    from esm_ray.io.composite import open_input

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(_spec(lora_family["base"], [lora_family["full_0"], lora_family["lora_1"]],
                                         tmp_path / "out", "ties", output_format="peft", peft={"rank": 4})))
    assert main(["merge", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "expert 'e1' is a LoRA adapter (8 targets, rank 4, 0 saved tensors): 'ties' merges its targets " \
           "densified one tensor at a time" in out
    assert "one LoRA adapter on the base (rank 4)" in out and "with full experts" in out
    assert not (tmp_path / "out").exists()
    routed = _routed_spec(lora_family["base"], [lora_family["lora_0"], lora_family["lora_1"]], tmp_path / "out",
                          tmp_path)
    spec.write_text(yaml.safe_dump(routed))
    assert main(["merge", str(spec), "--dry-run"]) == 0
    assert "routed experts: T x each LoRA adapter's own rank (residual_of base)" in capsys.readouterr().out
    r = open_input(str(lora_family["lora_1"]), str(lora_family["base"]))
    again = pickle.loads(pickle.dumps(r))  # readers travel to Ray workers by reopening
    assert again.fingerprint() == r.fingerprint() and torch.equal(again.factors(TARGET_KEYS[0])[0],
                                                                  r.factors(TARGET_KEYS[0])[0])


# ---- S3 and Ray ----------------------------------------------------------------------------------

def test_adapter_from_s3_equals_local(lora_family, s3_bucket, s3_env, tmp_path):
    client = s3_env.client()
    for p in lora_family["lora_1"].iterdir():
        client.upload_file(str(p), s3_bucket, f"adapters/l1/{p.name}")
    ads = [lora_family["lora_0"], f"s3://{s3_bucket}/adapters/l1"]
    _merge(_spec(lora_family["base"], ads, tmp_path / "s3", "tsvm"))
    _merge(_spec(lora_family["base"], [lora_family["lora_0"], lora_family["lora_1"]], tmp_path / "local", "tsvm"))
    assert output_files(tmp_path / "s3") == output_files(tmp_path / "local")


def test_ray_equals_local_bytes_for_adapters(lora_family, ray_driver, tmp_path):
    experts = [lora_family["full_0"], lora_family["lora_0"], lora_family["lora_2"]]
    local = _spec(lora_family["base"], experts, tmp_path / "local", "tsvm")
    ray = _spec(lora_family["base"], experts, tmp_path / "ray", "tsvm", runtime={"name": "ray"})
    _merge(local)
    assert _merge(ray).report["executor"] == "ray"
    assert output_files(tmp_path / "ray") == output_files(tmp_path / "local")


def test_ray_equals_local_bytes_for_esm_with_the_default_calibration(lora_family, ray_driver, tmp_path):
    """`calibration.mode: auto` on each side: the adapters layer-wise, the full expert whole, in
    the Ray expert actors as in one process; the same bytes."""
    experts = [lora_family["full_0"], lora_family["lora_0"], lora_family["lora_2"]]
    data = calibration_files(tmp_path / "data", 3, vocab=80)
    for name, runtime in (("local", {"name": "local"}), ("ray", {"name": "ray"})):
        spec = _spec(lora_family["base"], experts, tmp_path / name, "esm", runtime=runtime,
                     calibration={"samples": 8, "max_length": 16, "batch_size": 4,
                                  "cache_dir": str(tmp_path / f"cache-{name}")})
        for e, d in zip(spec["experts"], data):
            e["data"] = str(d)
        _merge(spec)
        modes = {json.loads(p.read_text())["model"]: json.loads(p.read_text())["mode"]
                 for p in (tmp_path / f"cache-{name}" / "stats").glob("*.json")}
        assert modes == {str(experts[0]): "full", str(experts[1]): "layerwise", str(experts[2]): "layerwise"}
    assert output_files(tmp_path / "ray") == output_files(tmp_path / "local")


def test_ray_equals_local_bytes_for_an_adapter_output(lora_family, ray_driver, tmp_path):
    experts = [lora_family["lora_0"], lora_family["lora_2"]]
    for name, runtime in (("local", {"name": "local"}), ("ray", {"name": "ray"})):
        _merge(_spec(lora_family["base"], experts, tmp_path / name, "tsvm", runtime=runtime,
                     output_format="peft", peft={"rank": 3}))
    assert output_files(tmp_path / "ray") == output_files(tmp_path / "local")


def test_esm_embedding_beside_an_adapter_is_the_full_experts_tsv(lora_family, tmp_path):
    """A LoRA adapter leaves the embedding untouched (a zero task vector, no statistics: ESM's
    TSV branch). Its arbitrary singular vectors must not enter the polar factors: ESM (α 1)
    gives the embedding TSV-M gives, whose null triplets are dropped."""
    from tests.builders import TEST_CALIBRATION

    experts = [lora_family["full_0"], lora_family["lora_0"]]
    esm = _spec(lora_family["base"], experts, tmp_path / "esm", "esm", params={"alpha": 1.0},
                calibration=TEST_CALIBRATION | {"cache_dir": str(tmp_path / "cache")})
    for e, d in zip(esm["experts"], calibration_files(tmp_path / "data", 2, vocab=80)):
        e["data"] = str(d)
    _merge(esm)
    _merge(_spec(lora_family["base"], experts, tmp_path / "tsvm", "tsvm"))
    k = "model.embed_tokens.weight"
    base, got, want = (_weights(d)[k] for d in (lora_family["base"], tmp_path / "esm", tmp_path / "tsvm"))
    assert not torch.equal(got, base)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- routed models from adapters ------------------------------------------------------------------

ROUTED = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _routed_spec(base: Path, experts: list[Path], out: Path, tmp_path: Path, runtime: str = "local",
                 **params) -> dict:
    """ESM++ on task arithmetic with float32 experts, each expert calibrated on its own rows."""
    from tests.builders import TEST_CALIBRATION

    spec = _spec(base, experts, out, "esm_pp",
                 params={"base_method": "task_arithmetic", "rank": 2, "expert_dtype": "float32", **params},
                 calibration=TEST_CALIBRATION | {"cache_dir": str(tmp_path / "cache")}, runtime={"name": runtime})
    for e, d in zip(spec["experts"], calibration_files(tmp_path / "data", len(experts), vocab=80)):
        e["data"] = str(d)
    return spec


def _routed_deltas(out: Path, task: str) -> dict[str, torch.Tensor]:
    """{weight name: ΔW} of one task's written adapter, loaded by peft onto the written base."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out), out / "adapters" / task)
    return _peft_deltas(model, "default")


def test_routed_merge_of_adapters_routes_each_adapter_as_itself(lora_family, tmp_path):
    """ESM++ on adapter experts only (residual_of auto -> base): the routed linears keep W_0 and
    each task's written adapter, loaded by peft, gives its input adapter's ΔW (peft's own
    get_delta_weight, ranks 2, 4 and 3 with rsLoRA), and nothing on the linears it does not target."""
    ads = [lora_family["lora_0"], lora_family["lora_1"], lora_family["lora_2"]]
    out = tmp_path / "routed"
    _merge(_routed_spec(lora_family["base"], ads, out, tmp_path))
    man = json.loads((out / "router" / "manifest.json").read_text())
    assert man["residual_of"] == "base" and man["rank"] == 4
    assert json.loads((out / "adapters" / "e1" / "adapter_config.json").read_text())["r"] == 4
    base, got = _weights(lora_family["base"]), _weights(out)
    assert all(torch.equal(got[f"{m}.weight"], base[f"{m}.weight"]) for m in ROUTED)
    for i, ad in enumerate(ads):
        want = _peft_deltas(_peft_model(lora_family["base"], [ad]), "a0")
        mine = _routed_deltas(out, f"e{i}")
        assert sorted(mine) == sorted(f"{m}.weight" for m in ROUTED)
        for k, d in mine.items():
            if k in want:
                assert _rel(d, want[k]) < 1e-6, (i, k)
            else:
                assert not d.any(), (i, k)


def _mean_inputs(model, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """{routed linear: its mean input over every token of the rows}, each row run alone
    through the decoder (transformers' model, forward pre-hooks)."""
    sums: dict[str, torch.Tensor] = {m: 0 for m in ROUTED}
    count = 0
    hooks = [model.get_submodule(m).register_forward_pre_hook(
        lambda _mod, args, m=m: sums.__setitem__(m, sums[m] + args[0][0].double().sum(0))) for m in ROUTED]
    with torch.no_grad():
        for r in rows:
            model.model(input_ids=torch.tensor([r]))
            count += len(r)
    for h in hooks:
        h.remove()
    return {m: v / count for m, v in sums.items()}


def test_routed_prototypes_of_adapters_come_from_the_base(lora_family, tmp_path):
    """With residual_of base (adapters only) the prototype router's pass runs the base, so each
    task's prototypes (`prototypes: auto` -> base) are the base's mean inputs of the routed
    linears over that task's calibration rows; `prototypes: expert` keeps ESM++'s own, the
    adapted model's mean inputs on them."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from esm_ray.routed.format import prototype_key
    from esm_ray.spec import CalibrationSpec
    from esm_ray.stats.data import load_calibration_rows
    from tests.builders import TEST_CALIBRATION

    ads = [lora_family["lora_0"], lora_family["lora_2"]]
    spec = _routed_spec(lora_family["base"], ads, tmp_path / "base", tmp_path)
    _merge(spec)
    _merge(_routed_spec(lora_family["base"], ads, tmp_path / "expert", tmp_path, prototypes="expert"))
    settings = CalibrationSpec(**TEST_CALIBRATION)
    rows = [[r["input_ids"] for r in load_calibration_rows(e["data"], settings.samples, settings.seed)]
            for e in spec["experts"]]
    base = LlamaForCausalLM.from_pretrained(lora_family["base"]).eval()
    for kind in ("base", "expert"):
        assert json.loads((tmp_path / kind / "router" / "manifest.json").read_text())["prototypes"] == kind
        state = load_file(tmp_path / kind / "router" / "router.safetensors")
        for t, ad in enumerate(ads):
            model = base if kind == "base" else _peft_model(lora_family["base"], [ad]).merge_and_unload().eval()
            want = _mean_inputs(model, rows[t])
            for m in ROUTED:
                assert _rel(state[prototype_key(m)][t].double(), want[m]) < 1e-5, (kind, t, m)
    a, b = (load_file(tmp_path / k / "router" / "router.safetensors") for k in ("base", "expert"))
    assert max(_rel(a[prototype_key(m)], b[prototype_key(m)]) for m in ROUTED) > 1e-2  # the choice matters


def test_routed_merge_of_mixed_experts(lora_family, tmp_path):
    """A full expert among the adapters: `auto` keeps ESM++'s residuals against the merge (the
    routed linears carry it); `residual_of: base` routes the adapters as themselves and the full
    expert as a rank-2 update of W_0."""
    experts = [lora_family["full_0"], lora_family["lora_1"]]
    _merge(_routed_spec(lora_family["base"], experts, tmp_path / "auto", tmp_path))
    assert json.loads((tmp_path / "auto" / "router" / "manifest.json").read_text())["residual_of"] == "merged"
    base, auto = _weights(lora_family["base"]), _weights(tmp_path / "auto")
    assert all(not torch.equal(auto[f"{m}.weight"], base[f"{m}.weight"]) for m in ROUTED)

    out = tmp_path / "on_base"
    _merge(_routed_spec(lora_family["base"], experts, out, tmp_path, residual_of="base"))
    got = _weights(out)
    assert all(torch.equal(got[f"{m}.weight"], base[f"{m}.weight"]) for m in ROUTED)
    want = _peft_deltas(_peft_model(lora_family["base"], [lora_family["lora_1"]]), "a0")
    adapter = _routed_deltas(out, "e1")
    assert all(_rel(adapter[k], d) < 1e-6 for k, d in want.items())
    full, tau = _routed_deltas(out, "e0"), _weights(lora_family["full_0"])
    for m in ROUTED:
        k = f"{m}.weight"
        sv = torch.linalg.svdvals(full[k].double())
        assert sv[1] > 0 and sv[2] < 1e-5 * sv[0], k  # rank 2 (peft forms ΔW in float32)
        assert (tau[k] - base[k] - full[k]).norm() < (tau[k] - base[k]).norm(), k  # a closer W_t than W_0


def test_ray_equals_local_bytes_for_a_routed_merge_of_adapters(lora_family, ray_driver, tmp_path):
    ads = [lora_family["lora_0"], lora_family["lora_2"]]
    for runtime in ("local", "ray"):
        _merge(_routed_spec(lora_family["base"], ads, tmp_path / runtime, tmp_path / f"{runtime}-work", runtime))
    assert output_files(tmp_path / "ray") == output_files(tmp_path / "local")


# ---- every method -----------------------------------------------------------------------------

def _every_method() -> list[str]:
    from tests.builders import import_methods

    import_methods()
    from esm_ray.methods import METHODS

    return sorted(METHODS)


@pytest.mark.parametrize("method", _every_method())
def test_every_method_merges_adapters_mixed_with_a_full_expert(method, lora_family, tmp_path):
    """Each method on a full expert and LoRA adapters (one adapter for the one-expert methods):
    the merge runs and every LoRA target comes out changed."""
    from esm_ray.methods import METHODS
    from tests.builders import TEST_CALIBRATION, method_experts, method_params

    n = method_experts(method, 3)
    experts = [lora_family["lora_0"]] if n == 1 else [lora_family["full_0"], lora_family["lora_0"],
                                                        lora_family["lora_2"]][:n]
    spec = _spec(lora_family["base"], experts, tmp_path / "out", method, params=method_params(method),
                 calibration=TEST_CALIBRATION | {"cache_dir": str(tmp_path / "cache")})
    m = METHODS[method]
    if m.needs_stats or m.needs_data or m.search_stage:
        for e, d in zip(spec["experts"], calibration_files(tmp_path / "data", n, vocab=80)):
            e["data"] = str(d)
    _merge(spec)
    base = _weights(lora_family["base"])
    if (tmp_path / "out" / "model.safetensors.index.json").exists():
        got = _weights(tmp_path / "out")
        assert all(not torch.equal(got[k], base[k]) for k in TARGET_KEYS)


def test_conv1d_adapter_with_fan_in_fan_out(tmp_path):
    """GPT-2 stores its projections (d_in, d_out) (Conv1D); peft's adapter says fan_in_fan_out."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "base")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                      init_lora_weights=False))
    model.save_pretrained(tmp_path / "ad_in")
    _merge(_spec(tmp_path / "base", [tmp_path / "ad_in"], tmp_path / "out", weights=[0.5]))
    _merge(_spec(tmp_path / "base", [tmp_path / "ad_in"], tmp_path / "ad", weights=[0.5], output_format="peft"))
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    want = {k: v * 0.5 for k, v in _peft_deltas(model, "default").items()}
    reloaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "ad")
    mine = _peft_deltas(reloaded, "default")
    base, got = _weights(tmp_path / "base"), _weights(tmp_path / "out")
    assert len(want) == 2 and sorted(mine) == sorted(want)
    for k, d in want.items():
        assert _rel(got[k] - base[k], d) < 1e-5, k
        assert _rel(mine[k], d) < 1e-5, k


def test_methods_say_which_are_factored_for_adapters(capsys):
    assert main(["methods", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    factored = sorted(n for n, m in table.items() if m["lora"] == "factored")
    assert factored == ["esm", "linear", "task_arithmetic", "tsvm"]
    assert table["ties"]["lora"] == "densified per tensor" and table["pave"]["lora"] is None
    assert table["esm_pp"]["lora"] == table["sim"]["lora"] == "routed as themselves (residual_of: base)"
    assert main(["methods"]) == 0
    assert "tsvm  [method, LoRA factored]" in capsys.readouterr().out


@pytest.mark.parametrize("output_format", ["dense", "peft"])
def test_tensors_no_adapter_changes_are_the_base_unmerged(output_format, lora_family, tmp_path, monkeypatch):
    """With adapters only, a tensor that no adapter targets or saves (the embedding, the norms)
    is written as the base's own value, never read into float32 and merged, for a method whose
    update is zero when every task vector is (TSV-M): equal to the output of merging it, and in
    the dense output equal to the base itself."""
    from esm_ray.methods.tsvm import Tsvm
    from esm_ray.runtime.job import MergeJob

    adapters = [lora_family[f"lora_{i}"] for i in range(3)]
    fused: list[str] = []
    real = MergeJob._fuse_tensor
    monkeypatch.setattr(MergeJob, "_fuse_tensor", lambda self, o, *a: (fused.append(o.info.name),
                                                                       real(self, o, *a))[1])
    plan = build_plan(spec_from_dict(_spec(lora_family["base"], adapters, tmp_path / "p", "tsvm")))
    assert "model.embed_tokens.weight" in plan.untouched and not set(TARGET_KEYS) & plan.untouched
    # the dry run's workspace estimate counts only what is merged (the copied embedding is larger)
    merged = [s for n, s in plan.shapes.items() if not plan.copies_base(n)]
    assert plan.largest_unit_bytes() == max(4 * torch.Size(s).numel() for s in merged)
    assert plan.largest_unit_bytes() < 4 * torch.Size(plan.shapes["model.embed_tokens.weight"]).numel()
    copied = _merge(_spec(lora_family["base"], adapters, tmp_path / "copied", "tsvm", output_format=output_format))
    assert copied.report["method"] == "tsvm"
    if output_format == "dense":
        assert sorted(fused) == sorted(TARGET_KEYS)  # the only tensors merged
    monkeypatch.setattr(Tsvm, "zero_for_zero_tasks", False)
    merged = _merge(_spec(lora_family["base"], adapters, tmp_path / "merged", "tsvm", output_format=output_format))
    assert merged.report["method"] == "tsvm"
    if output_format == "dense":
        base, a, b = _weights(lora_family["base"]), _weights(tmp_path / "copied"), _weights(tmp_path / "merged")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for k in plan.untouched:
            assert torch.equal(a[k], base[k]), k
    else:
        a = load_file(str(tmp_path / "copied" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "merged" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_expert_leaves_no_tensor_untouched(lora_family, tmp_path):
    """Beside a full expert every tensor may change: none is copied unmerged."""
    plan = build_plan(spec_from_dict(_spec(lora_family["base"], [lora_family["full_0"], lora_family["lora_0"]],
                                           tmp_path / "o", "tsvm")))
    assert not plan.untouched and not plan.copies_base("model.embed_tokens.weight")


def test_the_plan_warns_of_the_default_scale_on_adapters_only(lora_family, tmp_path, caplog):
    """TSV-M and ESM at their default scale on adapters only: a plan note (and a warning) with
    the 1/sqrt(T) scale to try; none with a scale set, nor beside a full expert."""
    import logging

    ads = [lora_family[f"lora_{i}"] for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="esm_ray.plan"):
        plan = build_plan(spec_from_dict(_spec(lora_family["base"], ads, tmp_path / "o", "tsvm")))
    note = [n for n in plan.notes if "every expert an adapter" in n]
    assert len(note) == 1 and "lambda 0.58" in note[0] and "lambda 0.58" in caplog.text
    assert "`rescale: {scope: tensor}`" in note[0]
    assert not [n for n in build_plan(spec_from_dict(_spec(lora_family["base"], ads, tmp_path / "o", "tsvm",
                                                           params={"lambda": 0.5}))).notes
                if "every expert an adapter" in n]
    mixed = [lora_family["full_0"], lora_family["lora_0"]]
    assert not [n for n in build_plan(spec_from_dict(_spec(lora_family["base"], mixed, tmp_path / "o", "tsvm"))).notes
                if "every expert an adapter" in n]
    assert not [n for n in build_plan(spec_from_dict(_spec(lora_family["base"], ads, tmp_path / "o"))).notes
                if "every expert an adapter" in n]  # task arithmetic: no such note


def test_untouched_tensors_are_copied_a_row_block_at_a_time(lora_family, tmp_path, monkeypatch):
    """A tensor copied from the base (no adapter targets it) is read and written in row blocks,
    so an LLM's embedding is never held whole: the same file as a whole copy, and the embedding
    read from the base only by rows."""
    from esm_ray.io.reader import ModelReader
    from esm_ray.runtime.job import MergeJob
    from esm_ray.runtime.pool import LocalPool

    reads: list[tuple[str, tuple[int, int] | None]] = []
    real = ModelReader.get
    monkeypatch.setattr(ModelReader, "get", lambda self, name, out=None, rows=None: (
        reads.append((name, rows)), real(self, name, out=out, rows=rows))[1])
    adapters = [lora_family["lora_0"], lora_family["lora_1"]]
    for name, block_bytes in (("whole", 1 << 30), ("blocks", 256)):
        reads.clear()
        s = spec_from_dict(_spec(lora_family["base"], adapters, tmp_path / name, "tsvm"))
        pool = LocalPool(s)
        try:
            MergeJob(build_plan(s), pool, progress=False, block_bytes=block_bytes).run()
        finally:
            pool.close()
        emb = [rows for n, rows in reads if n == "model.embed_tokens.weight"]
        assert emb and (all(r is not None for r in emb) if name == "blocks" else None in emb)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "blocks")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_sim_support_features_run_the_base_one_block_at_a_time_for_adapters(lora_family, tmp_path, monkeypatch):
    """With every expert an adapter, the default calibration (auto) runs SiM's support features
    on the base one block at a time, like the adapters' calibration; `mode: full` runs it whole."""
    from esm_ray.runtime import support

    used: list[bool] = []
    real = support.calibrate_layerwise
    monkeypatch.setattr(support, "calibrate_layerwise", lambda *a, **k: (used.append(True), real(*a, **k))[1])
    ads = [lora_family["lora_0"], lora_family["lora_1"]]
    for mode in ("auto", "full"):
        used.clear()
        spec = _routed_spec(lora_family["base"], ads, tmp_path / mode, tmp_path, subspace_rank=2, support_samples=4)
        spec["method"]["name"] = "sim"
        spec["method"]["params"].pop("base_method")
        spec["calibration"]["mode"] = mode
        _merge(spec)
        assert bool(used) == (mode == "auto"), mode
