"""Routed causal LMs (esm_ray.routed.lm): ESM++ / SiM experts written as standard PEFT LoRA
adapters, per-sequence routing on the prompt, generation with one adapter per sequence.

The constructed case: the tiny LLaMA family, with every model's embedding rows of task t's
token range shifted along its own direction v_t (the same shift in base and experts, so the task
vectors are unchanged), and the task vectors scaled up so that each adapter changes the text. Each expert's calibration data are token ids from its own range, so
the layer inputs of the three domains lie in distinct directions and routing is well posed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esm_ray.errors import InputError
from esm_ray.models.text import pad_batch
from esm_ray.routed import load_routed
from esm_ray.routed.lm import load_routed_lm
from esm_ray.routed.lm_format import LM_FORMAT, lora_keys
from tests.fixtures.family import make_family

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TASKS = ["alpha", "beta", "gamma"]
SPAN = 26  # task t's tokens: 1 + 26 t .. 26 (t + 1)
SHIFT, GAIN = 0.5, 4.0  # each adapter then changes every greedy continuation of the held-out rows


def _rows(task: int, n: int, seed: int, lo_len: int = 4, hi_len: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo = 1 + SPAN * task
    return [torch.randint(lo, lo + SPAN, (int(torch.randint(lo_len, hi_len, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def _left(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask), pad id 0."""
    return pad_batch(rows, 0, side="left")


def _right(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(rows, 0)


def _domain_family(root: Path, shift_norm: float = SHIFT, gain: float = GAIN) -> dict[str, Path]:
    """The tiny LLaMA family with domain-shifted embeddings and task vectors `gain` times larger
    (so each adapter visibly changes the generated tokens)."""
    fam = make_family(root, "llama", 3, seed=0)
    g = torch.Generator().manual_seed(5)
    shift = torch.linalg.qr(torch.randn(32, 3, generator=g))[0].T * shift_norm  # orthonormal v_t, scaled
    base = load_file(str(fam["base"] / "model.safetensors"))
    for name, d in fam.items():
        sd = load_file(str(d / "model.safetensors"))
        if name != "base":
            sd = {k: base[k] + gain * (v - base[k]) if v.ndim == 2 and "embed" not in k else v for k, v in sd.items()}
        emb = sd["model.embed_tokens.weight"].clone()
        for t in range(3):
            emb[1 + SPAN * t:1 + SPAN * (t + 1)] += shift[t]
        sd["model.embed_tokens.weight"] = emb
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return fam


def build_routed_lms(root: Path, methods: tuple[str, ...] = ("esm_pp", "sim")) -> dict[str, Path]:
    """{method: dir}: routed merges (rank 4 on task arithmetic) of the constructed family, each
    expert calibrated on 24 rows of its own token range."""
    from esm_ray.runtime import run_merge
    from esm_ray.spec import MergeSpec
    import esm_ray.methods.sim  # noqa: F401

    fam = _domain_family(root / "family")
    experts = []
    for t, name in enumerate(TASKS):
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in _rows(t, 24, seed=t)))
        experts.append({"name": name, "model": str(fam[f"expert_{t}"]), "data": str(p)})
    out = {}
    for method in methods:
        params = {"base_method": "task_arithmetic", "rank": 4, "expert_dtype": "float32"}
        if method == "sim":
            params |= {"subspace_rank": 3, "support_samples": 16}
        out[method] = root / method
        run_merge(MergeSpec(base=str(fam["base"]), experts=experts, output=str(out[method]),
                            method={"name": method, "params": params},
                            calibration={"samples": 24, "batch_size": 8, "cache_dir": str(root / "cache")}),
                  progress=False)
    return out


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"esm_pp": dir, "sim": dir}: routed merges of the constructed family."""
    return build_routed_lms(tmp_path_factory.mktemp("routed_lm"))


@pytest.fixture(scope="module")
def lms(lm_dirs):
    return {m: load_routed_lm(d) for m, d in lm_dirs.items()}


def _held_out() -> tuple[list[list[int]], list[str]]:
    rows = [r for t in range(3) for r in _rows(t, 8, seed=100 + t)]
    return rows, [TASKS[t] for t in range(3) for _ in range(8)]


@pytest.mark.parametrize("method", ["esm_pp", "sim"])
def test_each_adapter_is_a_standard_peft_lora_with_esm_rays_logits(lm_dirs, lms, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = lm_dirs[method]
    man = json.loads((out / "router" / "manifest.json").read_text())
    assert man["format"] == LM_FORMAT and man["tasks"] == TASKS and man["method"] == method
    assert man["router"] == ("likelihood" if method == "esm_pp" else "sim") and len(man["layers"]) == 14
    assert not (out / "routed").exists() and not (out / "heads").exists()
    modules = [layer["module"] for layer in man["layers"]]
    rows, _ = _held_out()
    ids, mask = _right(rows)
    real = mask.bool()
    esm = load_routed(out)  # esm-ray's own routed model: B_t (A_t x) on the merged base
    mixed = [TASKS[i % 3] for i in range(len(rows))]
    with torch.no_grad():
        got_mixed = lms[method].logits(ids, mask, mixed)  # peft's mixed-adapter batch
    for t, task in enumerate(TASKS):
        cfg = json.loads((out / "adapters" / task / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 4
        assert cfg["target_modules"] == sorted(modules) and cfg["base_model_name_or_path"] == "../.."
        assert (out / "adapters" / task / cfg["base_model_name_or_path"]).resolve() == out.resolve()
        tensors = load_file(str(out / "adapters" / task / "adapter_model.safetensors"))
        assert set(tensors) == {k for m in modules for k in lora_keys(m)}
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out)),
                                               str(out / "adapters" / task)).eval()
        with torch.no_grad():
            want = peft_model(input_ids=ids, attention_mask=mask).logits
            ours = esm(ids, mask, router="oracle", task_ids=torch.full((len(rows),), t)).raw.logits
            forced = lms[method].logits(ids, mask, [task] * len(rows))
        torch.testing.assert_close(ours[real], want[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(forced[real], want[real], atol=1e-5, rtol=1e-5)
        sel = torch.tensor([m == task for m in mixed])
        torch.testing.assert_close(got_mixed[sel][real[sel]], want[sel][real[sel]], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(want[real], esm(ids, mask, router="none").raw.logits[real], atol=1e-3)


@pytest.mark.parametrize("method,router", [("esm_pp", "prototype"), ("sim", "sim"), ("sim", "prototype")])
def test_route_picks_each_calibration_domain_alone_or_batched(lms, method, router):
    lm = lms[method]
    rows, truth = _held_out()
    ids, mask = _left(rows)
    with torch.no_grad():
        before = lm.model(input_ids=ids, attention_mask=mask).logits  # the active adapter's
    got = lm.route(ids, mask, router)
    with torch.no_grad():  # the router pass (merged base alone) leaves every adapter as it was
        assert torch.equal(lm.model(input_ids=ids, attention_mask=mask).logits, before)
    assert got == truth
    assert [lm.route(*_left([r]), router)[0] for r in rows[::5]] == got[::5]
    assert lm.route(*_right(rows), router) == got  # the mask, not the padding side, decides


def test_router_depth_scores_the_first_blocks_and_runs_no_more(lm_dirs):
    """router_depth k: the prototype scores are the cosines of the routed linears in the first k
    decoder blocks only, summed (an independent pass: transformers' merged base with hooks on
    every routed linear), and the blocks from k on do not run; depth 0 is refused."""
    from transformers import AutoModelForCausalLM

    lm = load_routed_lm(lm_dirs["esm_pp"])
    rows, _ = _held_out()
    ids, mask = _left(rows)
    base = AutoModelForCausalLM.from_pretrained(str(lm_dirs["esm_pp"])).eval()
    cos: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def pre(_m, args):
            x = args[0].double()
            w = mask[..., None].double()
            mean = (x * w).sum(1) / w.sum(1)
            cos[name] = torch.nn.functional.cosine_similarity(
                mean[:, None, :], lm.prototypes[name].double()[None], dim=-1)
        return pre

    hooks = [base.get_submodule(m).register_forward_pre_hook(keep(m)) for m in lm.modules]
    with torch.no_grad():
        base(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    for h in hooks:
        h.remove()
    blocks = lm.model.get_base_model().model.layers
    assert len(blocks) == 2 and all(".layers." in m for m in lm.modules)
    ran = []
    watch = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    full = lm.scores(ids, mask, "prototype")
    lm.router_depth = 1
    got = lm.scores(ids, mask, "prototype")
    for w in watch:
        w.remove()
    assert ran == [0, 1, 0]  # the full pass, then block 0 alone
    want = sum(c for m, c in cos.items() if ".layers.0." in m)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full.double(), sum(cos.values()), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got.double(), full.double(), atol=1e-2)
    assert lm.scored_modules == [m for m in lm.modules if ".layers.0." in m]
    with pytest.raises(InputError, match="router_depth"):
        load_routed_lm(lm_dirs["esm_pp"], router_depth=0)


def test_likelihood_router_gains_and_routes_equal_independent_likelihoods(lm_dirs):
    """The merge records each expert's gain: its first 16 calibration rows' mean token
    log-likelihood under the expert minus under the base (transformers' models, cross-entropy,
    one row at a time). The likelihood router routes as its rule says from the likelihoods of
    peft models holding one adapter each, with every task made eligible."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from esm_ray.spec import CalibrationSpec
    from esm_ray.stats.data import load_calibration_rows

    out = lm_dirs["esm_pp"]
    man = json.loads((out / "router" / "manifest.json").read_text())
    assert man["routers"] == ["prototype", "likelihood"]
    fam = out.parent / "family"

    def mean_ll(model, rows: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([-torch.nn.functional.cross_entropy(
                model(input_ids=torch.tensor([r])).logits[0, :-1], torch.tensor(r[1:])) for r in rows])

    base = AutoModelForCausalLM.from_pretrained(str(fam / "base")).eval()
    for t, task in enumerate(TASKS):
        rows = [r["input_ids"] for r in load_calibration_rows(str(out.parent / f"{task}.jsonl"), 16,
                                                              CalibrationSpec().seed)]
        expert = AutoModelForCausalLM.from_pretrained(str(fam / f"expert_{t}")).eval()
        want = float((mean_ll(expert, rows) - mean_ll(base, rows)).mean())
        assert abs(man["likelihood_gains"][task] - want) < 1e-4, task

    lm = load_routed_lm(out)
    assert man["likelihood_candidates"] == lm.likelihood_candidates == 2  # the merge's default
    assert load_routed_lm(out, likelihood_candidates=3).likelihood_candidates == 3
    assert man["likelihood_margin"] == lm.likelihood_margin  # the merge's default, stored
    assert man["router_depth"] is None and lm.router_depth is None  # every block by default
    assert load_routed_lm(out, likelihood_margin=0.25).likelihood_margin == 0.25
    with pytest.raises(InputError, match="likelihood_margin"):
        load_routed_lm(out, likelihood_margin=-1.0)
    lm.likelihood_candidates = None  # every eligible adapter
    lm.likelihood_margin = None  # and no margin: the likelihoods decide (the margin: below)
    lm.gains = torch.ones(3)  # every task eligible: the likelihoods decide every row
    rows, _ = _held_out()
    ids, mask = _left(rows)
    cfg = json.loads((out / "config.json").read_text())
    pre = cfg.get("bos_token_id") if cfg.get("bos_token_id") is not None else cfg["eos_token_id"]
    ll = torch.stack([mean_ll(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out)),
                                                        str(out / "adapters" / task)).eval(), [[pre] + r for r in rows])
                      for task in TASKS], 1)  # each prompt's first token scored after the BOS
    assert lm.route(ids, mask, "likelihood") == [TASKS[i] for i in ll.argmax(1).tolist()]
    lm.gains = torch.tensor([1.0, 1.0, -1.0])  # gamma not eligible: its prototype rows stay gamma
    proto = lm.route(ids, mask, "prototype")
    got = lm.route(ids, mask, "likelihood")
    best = [TASKS[i] for i in ll[:, :2].argmax(1).tolist()]
    assert got == [p if p == "gamma" else b for p, b in zip(proto, best)]

    # two candidates: the two tasks the prototypes rank highest; the adapters' likelihoods of
    # only those pairs are computed (mixed-adapter batches), and they are the peft models'
    lm.gains = torch.ones(3)
    lm.likelihood_candidates = 2
    scores = lm.scores(ids, mask, "prototype")
    two = scores.argsort(dim=1, descending=True, stable=True)[:, :2]
    pairs = torch.zeros(len(rows), 3, dtype=torch.bool).scatter_(1, two, True)
    got_ll = lm.logliks(ids, mask, pairs)
    assert torch.allclose(got_ll[pairs], ll[pairs].float(), atol=1e-4)
    assert (got_ll[~pairs] == 0).all()
    want = [TASKS[max(c.tolist(), key=lambda t: float(ll[i, t]))] for i, c in enumerate(two)]
    assert lm.route(ids, mask, "likelihood") == want
    assert want != [TASKS[i] for i in ll.argmax(1).tolist()]  # the candidates matter on these rows
    lm.likelihood_candidates = 1  # one candidate is the prototype router, and costs no prefill
    scored = []
    logliks = lm.logliks
    lm.logliks = lambda i, m, pairs: scored.append(int(pairs.sum())) or logliks(i, m, pairs)
    assert lm.route(ids, mask, "likelihood") == lm.route(ids, mask, "prototype")
    assert scored == [0]
    del lm.logliks
    # a margin: prompts whose two best prototype scores are that far apart keep the prototypes'
    # choice; the others route by likelihood as before (the gap taken from these rows)
    lm.likelihood_candidates = 2
    gap = (scores.sort(dim=1, descending=True).values[:, :2] @ torch.tensor([1.0, -1.0])).float()
    summed = float(gap.median())
    lm.likelihood_margin = summed / len(lm.modules)  # the margin is per routed layer
    proto = lm.route(ids, mask, "prototype")
    got = lm.route(ids, mask, "likelihood")
    assert got == [p if g >= summed else w for p, g, w in zip(proto, gap.tolist(), want)]
    assert got != want and got != proto
    lm.likelihood_margin = None


def test_generate_holds_the_routed_adapter_for_every_token(lms):
    """Greedy generate equals a step-by-step argmax over forced-task logits of the growing sequence."""
    lm = lms["esm_pp"]
    rows, truth = _held_out()
    for r, task in [(rows[0], truth[0]), (rows[12], truth[12]), (rows[20], truth[20])]:
        ids, mask = _left([r])
        out = lm.generate(ids, mask, max_new_tokens=6, do_sample=False)
        seq = ids
        for _ in range(6):
            nxt = lm.logits(seq, torch.ones_like(seq), [task])[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert out.tolist() == seq.tolist()


def test_sampled_generation_is_seeded(lms):
    lm = lms["sim"]
    ids, mask = _left(_held_out()[0][:6])
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(lm.generate(ids, mask, max_new_tokens=5, do_sample=True, temperature=1.5, top_p=0.95,
                                num_return_sequences=2))
    assert runs[0].shape == (12, ids.shape[1] + 5) and torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("method", ["esm_pp", "sim"])
def test_a_mixed_batch_gives_each_sequence_its_tokens_alone(lms, method):
    lm = lms[method]
    rows, truth = _held_out()
    picked = [rows[0], rows[9], rows[17], rows[3], rows[23]]  # alpha, beta, gamma, alpha, gamma
    ids, mask = _left(picked)
    assert lm.route(ids, mask) == ["alpha", "beta", "gamma", "alpha", "gamma"]
    batch = lm.generate(ids, mask, max_new_tokens=8, do_sample=False)
    other = lm.generate(ids, mask, tasks=["beta", "gamma", "alpha", "beta", "alpha"], max_new_tokens=8,
                        do_sample=False)
    assert (batch[:, -8:] != other[:, -8:]).any(1).all()  # the adapter decides every row's tokens
    for i, r in enumerate(picked):
        alone = lm.generate(*_left([r]), max_new_tokens=8, do_sample=False)
        assert batch[i, -8:].tolist() == alone[0, -8:].tolist()


def test_generate_with_the_stacked_adapters_equals_peft_generate(lms):
    """RoutedLM.generate runs the stacked adapters (esm_ray.routed.multi_lora); with them taken
    away it runs peft's mixed-adapter batch: the same tokens, greedy and seeded sampling."""
    lm = lms["esm_pp"]
    assert lm.stacked is not None
    rows, _ = _held_out()
    ids, mask = _left([rows[0], rows[9], rows[17], rows[3]])
    tasks = ["gamma", "alpha", "beta", "alpha"]
    kwargs = [dict(max_new_tokens=6, do_sample=False),
              dict(max_new_tokens=5, do_sample=True, temperature=1.5, num_return_sequences=2)]
    got, want = [], []
    for out, stacked in ((got, lm.stacked), (want, None)):
        lm.stacked, keep = stacked, lm.stacked
        try:
            for kw in kwargs:
                torch.manual_seed(3)
                out.append(lm.generate(ids, mask, tasks=tasks, **kw))
        finally:
            lm.stacked = keep
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_tasks_bypass_the_router(lms):
    lm = lms["esm_pp"]
    rows, _ = _held_out()
    ids, mask = _left(rows[:4])  # alpha prompts
    forced = lm.generate(ids, mask, tasks=["gamma"] * 4, max_new_tokens=6, do_sample=False)
    routed = lm.generate(ids, mask, max_new_tokens=6, do_sample=False)
    assert not torch.equal(forced, routed)
    for i in range(4):  # each row as gamma's adapter alone gives it
        seq = ids[i:i + 1, mask[i].bool()]
        for _ in range(6):
            nxt = lm.logits(seq, torch.ones_like(seq), ["gamma"])[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert forced[i, -6:].tolist() == seq[0, -6:].tolist()
    with pytest.raises(ValueError, match="unknown task 'delta'"):
        lm.generate(ids, mask, tasks=["delta"] * 4, max_new_tokens=1)
    with pytest.raises(ValueError, match="left-padded"):
        lm.generate(*_right(rows[:4]), max_new_tokens=1)


def _broken(src: Path, dst: Path, rel: str, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst / rel)
    return dst


def test_bad_router_or_adapter_files_are_input_errors_naming_the_file(lm_dirs, tmp_path):
    src = lm_dirs["esm_pp"]
    cases = [
        ("router/manifest.json", lambda p: p.unlink(), r"router/manifest\.json: not found"),
        ("router/manifest.json", lambda p: p.write_text("{"), r"router/manifest\.json: not valid JSON"),
        ("router/manifest.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "format": "x"})),
         r"router/manifest\.json: unsupported format"),
        ("router/manifest.json",
         lambda p: p.write_text(json.dumps({**json.loads(p.read_text()),
                                            "adapters": {"alpha": "adapters/alpha", "beta": "../beta",
                                                         "gamma": "adapters/gamma"}})),
         r"router/manifest\.json: field `adapters\.beta`: '\.\./beta' is not a relative path inside"),
        ("router/router.safetensors", lambda p: p.unlink(), r"router/router\.safetensors: router state not found"),
        ("router/router.safetensors", lambda p: p.write_bytes(b"junk"), r"router/router\.safetensors: not a readable"),
        ("adapters/beta/adapter_model.safetensors", lambda p: p.unlink(),
         r"adapters/beta/adapter_model\.safetensors: adapter file not found"),
        ("adapters/beta/adapter_model.safetensors",
         lambda p: save_file({k: v for k, v in load_file(str(p)).items() if "layers.1.mlp.down_proj.lora_B" not in k},
                             str(p)),
         r"adapters/beta/adapter_model\.safetensors: tensor 'base_model\.model\.model\.layers\.1\.mlp\.down_proj"
         r"\.lora_B\.weight' is missing"),
    ]
    for i, (rel, edit, msg) in enumerate(cases):
        d = _broken(src, tmp_path / f"case{i}", rel, edit)
        with pytest.raises(InputError, match=msg):
            load_routed_lm(d)
        if rel.startswith("adapters/") or "router.safetensors" in rel:  # the in-process loader says the same
            with pytest.raises(InputError, match=msg):
                load_routed(d)


def test_a_routed_lm_saved_in_process_round_trips_and_counts_its_adapters(lm_dirs, lms, tmp_path):
    """RoutedModel.save of a causal LM writes the same layout as the method; sizes() reads it."""
    src = lm_dirs["sim"]
    rm = load_routed(src)
    sizes = rm.sizes()
    assert sizes["experts_bytes"] == sum(p.stat().st_size for p in (src / "adapters").rglob("*.safetensors"))
    assert sizes["router_bytes"] == (src / "router" / "router.safetensors").stat().st_size
    assert sizes["backbone_bytes"] == (src / "router" / "backbone.safetensors").stat().st_size
    out = rm.save(tmp_path / "again")
    assert not (out / "routed").exists()
    again = load_routed_lm(out)
    assert again.tasks == TASKS and again.routers == ["prototype", "sim"] and again.router == "sim"
    assert (out / "adapters" / "beta" / "adapter_config.json").read_bytes() == \
        (src / "adapters" / "beta" / "adapter_config.json").read_bytes()  # nothing names the location
    rows, truth = _held_out()
    ids, mask = _left(rows)
    assert again.route(ids, mask) == truth
    with torch.no_grad():
        torch.testing.assert_close(again.logits(ids, mask, truth)[mask.bool()],
                                   lms["sim"].logits(ids, mask, truth)[mask.bool()], atol=1e-6, rtol=1e-6)


def test_encode_left_pads_texts_with_the_directorys_tokenizer(lm_dirs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path / "with_tokenizer"
    shutil.copytree(lm_dirs["esm_pp"], d)
    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 80)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>").save_pretrained(str(d))
    lm = load_routed_lm(d)
    beta = _rows(1, 1, seed=3)[0]
    ids, mask = lm.encode([" ".join(f"w{i}" for i in beta), "w1 w2"])
    assert mask.tolist()[1] == [0] * (len(beta) - 2) + [1, 1]  # left-padded
    assert ids[0].tolist() == beta and ids[1, -2:].tolist() == [1, 2]
    assert lm.route(ids, mask)[0] == "beta"
    assert lm.generate(ids, mask, max_new_tokens=3, do_sample=False).shape == (2, len(beta) + 3)
    with pytest.raises(InputError, match="no tokenizer"):
        load_routed_lm(lm_dirs["esm_pp"]).encode(["w1"])
