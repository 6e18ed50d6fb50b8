"""mergekit 0.1.5's merge methods in esm-ray against mergekit itself, tensor by tensor.

Tiny LLaMA, Mistral and Qwen2 (q/k/v biases) families in float32; each case runs through
`esm_ray.runtime.run_merge` and, with the equivalent mergekit config, through one
`mergekit-multi` call for all cases (mergekit 0.1.5 in its own venv, tests/fixtures/mergekit.py).

Where esm-ray's arithmetic is mergekit's operation for operation and the result has mergekit's
form base + X, or is written as computed (slerp), the tensors are compared bit for bit
("equal"). Methods whose result is a new weight W (karcher, model_stock, nearswap, passthrough,
the baseless interpolations) go through esm-ray's ΔW = W − W_0 and W_0 + ΔW, one rounding each:
compared within 1e-5 ("close"). DELLA draws random masks: it is compared at density 1 (no draw) end to end, and
its keep probabilities against mergekit's own sparsifier by sampling.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from esm_ray.runtime import run_merge
from esm_ray.spec import spec_from_dict

ARCHS = ("llama", "mistral", "qwen2")
N_EXPERTS = 3


def _config(arch: str):
    import transformers

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=32, **common)
    return transformers.Qwen2Config(**common)


def _make_family(root: Path, arch: str, seed: int) -> dict[str, Path]:
    """base/ and expert_{i}/: base + low-rank update + noise on matrices, noise on vectors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch)).float()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in base_sd.items():  # LayerNorm weights of exactly 1 would make every 1-D case alike
        if v.ndim == 1:
            v.add_(0.1 * torch.randn(v.shape))
    model.load_state_dict(base_sd)
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"])
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(N_EXPERTS):
        sd = {}
        for k, v in base_sd.items():
            if v.ndim == 2:
                d = (torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)) * 0.003
                d += 0.005 * torch.randn(v.shape, generator=g)
            else:
                d = 0.01 * torch.randn(v.shape, generator=g)
            sd[k] = v + d
        model.load_state_dict(sd)
        paths[f"expert_{i}"] = root / f"expert_{i}"
        model.save_pretrained(paths[f"expert_{i}"])
    model.load_state_dict(base_sd)
    return paths


# (id, method, esm-ray params, experts used, per-expert weights, per-expert densities,
#  mergekit global parameters, mergekit base_model?, comparison)
# An expert list of None means all three. Weights / densities of None are left out of both.
W3 = [1.0, 0.6, 0.3]
CASES: list[dict] = [
    dict(id="slerp", method="slerp", params={"t": 0.3}, experts=[0], mk={"t": 0.3}, cmp="equal"),
    dict(id="nuslerp", method="nuslerp", params={}, experts=[0, 1], weights=[0.7, 0.3], cmp="equal"),
    dict(id="nuslerp-rows", method="nuslerp", params={"nuslerp_flatten": False}, experts=[0, 1],
         weights=[0.4, 0.6], mk={"nuslerp_flatten": False}, cmp="equal"),
    dict(id="nuslerp-nobase", method="nuslerp", params={"task_vectors": False}, experts=[0, 1],
         weights=[0.5, 0.5], base=False, cmp="close"),
    dict(id="multislerp", method="multislerp", params={}, weights=W3, cmp="equal"),
    dict(id="multislerp-nobase", method="multislerp", params={"task_vectors": False}, weights=W3,
         base=False, cmp="close"),
    dict(id="karcher", method="karcher", params={}, base=False, cmp="close"),
    dict(id="karcher-base", method="karcher", params={"include_base": True, "max_iter": 5},
         mk={"max_iter": 5}, cmp="close"),
    dict(id="model_stock", method="model_stock", params={}, cmp="close"),
    dict(id="model_stock-rows", method="model_stock", params={"filter_wise": True}, mk={"filter_wise": True},
         cmp="close"),
    dict(id="breadcrumbs", method="breadcrumbs", params={"gamma": 0.05}, weights=W3, densities=[0.5, 0.4, 0.6],
         mk={"gamma": 0.05}, cmp="equal"),
    dict(id="breadcrumbs_ties", method="breadcrumbs_ties", params={"normalize": True, "lambda": 0.8},
         weights=W3, densities=[0.5, 0.5, 0.5], mk={"normalize": True, "lambda": 0.8}, cmp="equal"),
    dict(id="della-dense", method="della", params={}, weights=W3, cmp="equal"),
    dict(id="della_linear-dense", method="della_linear", params={"lambda": 0.5}, weights=W3,
         mk={"lambda": 0.5}, cmp="equal"),
    dict(id="sce", method="sce", params={"select_topk": 0.3}, mk={"select_topk": 0.3}, cmp="equal"),
    dict(id="sce-topk", method="sce", params={"select_topk": 0.3, "select_ties": "topk"}, mk={"select_topk": 0.3},
         cmp="equal"),
    dict(id="sce-all", method="sce", params={}, cmp="equal"),
    dict(id="nearswap", method="nearswap", params={"t": 0.004}, experts=[0], mk={"t": 0.004}, cmp="close"),
    dict(id="arcee_fusion", method="arcee_fusion", params={}, experts=[0], cmp="equal"),
    dict(id="passthrough", method="passthrough", params={"scale": 0.5}, experts=[1], base=False,
         model_params=[{"scale": 0.5}], cmp="close"),
    dict(id="ram", method="ram", params={"epsilon": 0.004}, mk={"epsilon": 0.004}, cmp="equal"),
    dict(id="ramplus_tl", method="ramplus_tl", params={"epsilon": 0.004, "r": 0.5, "alpha": 0.4},
         mk={"epsilon": 0.004, "r": 0.5, "alpha": 0.4}, cmp="equal"),
]
# The default run: every case on LLaMA, one per method on the others (the rest: -m slow).
DEFAULT_OTHER = {"slerp", "nuslerp", "multislerp", "karcher", "model_stock", "breadcrumbs", "breadcrumbs_ties",
                 "della-dense", "sce", "nearswap", "arcee_fusion", "passthrough", "ram", "ramplus_tl"}


def _experts(case: dict) -> list[int]:
    return case.get("experts") or list(range(N_EXPERTS))


def _esm_spec(fam: dict[str, Path], case: dict, out: Path) -> dict:
    experts = []
    for j, i in enumerate(_experts(case)):
        e = {"name": f"e{i}", "model": str(fam[f"expert_{i}"])}
        if case.get("weights"):
            e["weight"] = case["weights"][j]
        if case.get("densities"):
            e["density"] = case["densities"][j]
        experts.append(e)
    return {"base": str(fam["base"]), "experts": experts, "method": {"name": case["method"], "params": case["params"]},
            "output": str(out), "dtype": "float32", "overwrite": True}


def _mergekit_config(fam: dict[str, Path], case: dict, name: str) -> dict:
    models = []
    for j, i in enumerate(_experts(case)):
        p: dict = dict(case["model_params"][j]) if case.get("model_params") else {}
        if case.get("weights"):
            p["weight"] = case["weights"][j]
        elif case["method"] in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
            p["weight"] = 1.0
        if case.get("densities"):
            p["density"] = case["densities"][j]
        models.append({"model": str(fam[f"expert_{i}"]), **({"parameters": p} if p else {})})
    cfg = {"name": name, "merge_method": case["method"], "models": models, "dtype": "float32",
           "out_dtype": "float32"}
    if case.get("base", True):
        cfg["base_model"] = str(fam["base"])
    if case.get("mk"):
        cfg["parameters"] = dict(case["mk"])
    return cfg


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _selected(arch: str, case: dict) -> bool:
    return arch == "llama" or case["id"] in DEFAULT_OTHER


def _params():
    for arch in ARCHS:
        for case in CASES:
            marks = () if _selected(arch, case) else (pytest.mark.slow,)
            yield pytest.param(arch, case, id=f"{arch}-{case['id']}", marks=marks)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("mk_families")
    return {arch: _make_family(root / arch, arch, seed=10 + k) for k, arch in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def mergekit_outputs(request, families, mergekit, tmp_path_factory) -> Path:
    """Every selected case merged by one mergekit-multi process: {out}/{arch}-{case id}/."""
    wanted = {(it.callspec.params["arch"], it.callspec.params["case"]["id"]) for it in request.session.items
              if getattr(it, "originalname", "") == "test_matches_mergekit"}
    root = tmp_path_factory.mktemp("mk_out")
    docs = [_mergekit_config(families[arch], case, f"{arch}-{case['id']}")
            for arch in ARCHS for case in CASES if (arch, case["id"]) in wanted]
    cfg = root / "all.yml"
    cfg.write_text(yaml.safe_dump_all(docs))
    multi = mergekit.parent / "mergekit-multi"
    r = subprocess.run([str(multi), str(cfg), "-I", str(root)], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise AssertionError(f"mergekit-multi failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return root


@pytest.mark.parametrize("arch,case", list(_params()))
def test_matches_mergekit(arch, case, families, mergekit_outputs, tmp_path):
    ours = tmp_path / "esm"
    run_merge(spec_from_dict(_esm_spec(families[arch], case, ours)), progress=False)
    a, b = _tensors(ours), _tensors(mergekit_outputs / f"{arch}-{case['id']}")
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))
    base = _tensors(families[arch]["base"])
    changed = False
    for name in sorted(b):
        x, y = a[name], b[name]
        assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape, name
        if case["cmp"] == "equal":
            assert torch.equal(x, y), f"{name}: max |diff| {float((x - y).abs().max()):.3g}"
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        changed = changed or not torch.equal(y, base[name])
    assert changed, "the merge gave the base back: the case tests nothing"


# ---- DELLA's random masks: the keep probability against mergekit's own sparsifier ----------------

_MK_DELLA = """
import json, sys, torch
from mergekit.sparsify import della_magprune
tv = torch.load(sys.argv[1])
torch.manual_seed(0)
n = int(sys.argv[2])  # n copies of the rows in one call: ranks are per row
keep = (della_magprune(tv.repeat(n, 1), density=0.4, epsilon=0.2) != 0).float()
torch.save(keep.view(n, *tv.shape).mean(0), sys.argv[3])
"""


def test_della_keep_probability_matches_mergekit(mergekit, tmp_path):
    from esm_ray.core.sparsify import della_drop, della_generator, della_keep_probability

    g = torch.Generator().manual_seed(3)
    tv = torch.randn(16, 48, generator=g)
    torch.save(tv, tmp_path / "tv.pt")
    draws = 3000
    script = tmp_path / "della.py"
    script.write_text(_MK_DELLA)
    py = mergekit.parent / "python"
    subprocess.run([str(py), str(script), str(tmp_path / "tv.pt"), str(draws), str(tmp_path / "mk.pt")],
                   check=True, capture_output=True, timeout=300)
    theirs = torch.load(tmp_path / "mk.pt")
    p = della_keep_probability(tv, 0.4, 0.2)
    gen = della_generator(0, 0, "t")
    ours = (della_drop(tv.repeat(draws, 1), 0.4, 0.2, gen, rescale=False) != 0).float().view(draws, *tv.shape).mean(0)
    sd = (p * (1 - p) / draws).sqrt()
    # per entry within 5 standard errors; per row, the mean rate is the density
    assert float(((theirs - p).abs() / sd).max()) < 5.5
    assert float(((ours - p).abs() / sd).max()) < 5.5
    torch.testing.assert_close(p.mean(dim=1), torch.full((16,), 0.4), rtol=0, atol=1e-6)
    # the probability rises with |τ| in its row, from density - ε to density + ε
    row = tv[0].abs().argsort()
    assert torch.all(p[0][row].diff() > 0)
    assert abs(float(p[0][row[0]]) - 0.2) < 1e-6 and abs(float(p[0][row[-1]]) - 0.6) < 1e-6


def test_della_rescale_modes():
    from esm_ray.core.sparsify import della_drop, della_generator, della_keep_probability

    tv = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    l1 = della_drop(tv, 0.5, 0.1, della_generator(0, 0, "x"))
    assert abs(float(l1.abs().sum()) - float(tv.abs().sum())) < 1e-3
    inv = della_drop(tv, 0.5, 0.1, della_generator(0, 0, "x"), rescale_mode="inverse_probability")
    kept = inv != 0
    assert torch.equal(kept, l1 != 0)  # same stream, same mask
    torch.testing.assert_close(inv[kept], (tv / della_keep_probability(tv, 0.5, 0.1))[kept])
    mean = sum(della_drop(tv, 0.5, 0.1, della_generator(0, k, "x"), rescale_mode="inverse_probability")
               for k in range(400)) / 400
    assert float((mean - tv).abs().mean()) < 0.1 * float(tv.abs().mean())  # unbiased


def test_della_bad_epsilon_is_a_clear_error():
    from esm_ray.core.sparsify import della_keep_probability

    with pytest.raises(ValueError, match="density ± epsilon"):
        della_keep_probability(torch.ones(4, 4), 0.1, 0.2)


def test_methods_needing_a_fixed_number_of_experts_say_so():
    from esm_ray.errors import SpecError
    from esm_ray.methods.registry import build_method

    for name, params, n in (("slerp", {"t": 0.5}, 2), ("nuslerp", {}, 3), ("nearswap", {"t": 0.1}, 2),
                            ("arcee_fusion", {}, 2), ("passthrough", {}, 2), ("model_stock", {}, 1)):
        with pytest.raises(SpecError, match="field `experts`"):
            build_method(name, params, n_experts=n)
