"""SmolLM2-135M from its packaged GGUF, and causal-LM domain experts fine-tuned from it.

Conversion: transformers dequantizes the GGUF (needs `gguf` and `accelerate`), but refuses to
`save_pretrained` a model that carries a quantization config; so a fresh LlamaForCausalLM is
built from the config without it, the dequantized state dict is loaded into it, and the result
is saved in bfloat16 with the tokenizer. The output is cached under a hash of the GGUF bytes.

Experts: each domain (a packaged corpus) is cut into passages of at most `max_length` tokens
and split into train / validation / test by blocks of consecutive passages. An expert is the
base fine-tuned on its domain's training passages: every parameter of the 30 decoder blocks
(all attention and MLP matrices and the RMSNorm weights) and the final norm are trained, the
token embeddings (tied with the LM head) are frozen. Training runs in float32; the expert is
saved in bfloat16 like the base, and its recorded perplexities are measured on the saved
(bfloat16-rounded) weights. Perplexity of the base and of every expert on every domain's
held-out text goes into zoo.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from esm_ray.errors import InputError
from esm_ray.zoo.layout import FORMAT, MANIFEST, default_root, write_json, write_jsonl
from esm_ray.zoo.sources import clean, data_file, file_digest, open_text, read_csv, sentences, smollm2_gguf

log = logging.getLogger("esm_ray.zoo")

CONVERT_VERSION = 1


# ---------------------------------------------------------------- conversion


def convert_smollm2(out: str | Path | None = None, gguf: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Convert the packaged SmolLM2 GGUF to an HF safetensors directory; cached by content hash.

    Returns `<root>/smollm2/<hash>/` (config.json, model.safetensors, tokenizer files).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf) if gguf else smollm2_gguf()
    root = Path(out).expanduser() if out else default_root()
    key = hashlib.sha256(f"{file_digest(str(src))}:{dtype}:{CONVERT_VERSION}".encode()).hexdigest()[:16]
    dest = root / "smollm2" / key
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    t0 = time.perf_counter()
    log.info("converting %s (dequantizing; about 20 s)", src.name)
    q = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise InputError(f"{src}: converted state dict does not match the config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    del q
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    tmp = dest.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(str(tmp))
    write_json(tmp / "conversion.json", {"source": src.name, "source_sha256": file_digest(str(src)),
                                         "dtype": dtype, "seconds": round(time.perf_counter() - t0, 1)})
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


# ---------------------------------------------------------------- domains


@dataclass(frozen=True)
class Domain:
    name: str
    sources: tuple[str, ...]
    description: str
    read: Callable[[], list[tuple[list[str], str]]]  # documents as (units, separator), in file order
    version: int = 1


def _hamlet():
    # The play as one document of lines: speaker names, verse, stage directions.
    with open_text(data_file("hamlet.txt")) as f:
        return [([ln.rstrip() for ln in f if ln.strip()], "\n")]


def _debates():
    return [([f"{r['speaker'].title()}: {clean(r['statement'])}" for r in read_csv("presidential_debates_2016.csv.gz")
              if clean(r["statement"])], "\n")]


def _headlines():
    return [([clean(r["Text"]) for r in read_csv("guardian_headlines.csv.bz2")], "\n")]


def _plots():
    return [(sentences(r["text"]), " ") for r in read_csv("rotten_tomatoes_corpus_full.csv.bz2")
            if r["category"] == "plot"]


def _speeches():
    return [(sentences(r["text"]), " ") for r in read_csv("political_data.csv")]


DOMAINS: dict[str, Domain] = {d.name: d for d in [
    Domain("hamlet", ("hamlet.txt",), "Shakespeare's Hamlet, line by line with speaker names", _hamlet),
    Domain("headlines", ("guardian_headlines.csv.bz2",), "Guardian headlines 2020, one per line", _headlines),
    Domain("debates", ("presidential_debates_2016.csv.gz",), "2016 US debate transcripts, 'Speaker: text'", _debates),
    Domain("plots", ("rotten_tomatoes_corpus_full.csv.bz2",), "Rotten Tomatoes plot synopses", _plots),
    Domain("speeches", ("political_data.csv",), "2012 US convention speeches", _speeches),
]}
DEFAULT_DOMAINS = ("hamlet", "headlines", "debates", "plots", "speeches")


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def passages(docs: Sequence[tuple[list[str], str]], tokenizer, max_tokens: int) -> list[str]:
    """Greedy runs of consecutive units (lines or sentences) of at most max_tokens tokens;
    a unit longer than that is cut at word boundaries. Passages under max_tokens/4 are dropped."""
    out = []
    for units, sep in docs:
        cur: list[str] = []
        n = 0
        for u in units:
            u = u.strip()
            if not u:
                continue
            k = _ntok(tokenizer, u) + (1 if cur else 0)
            if k > max_tokens:
                words, piece = u.split(" "), []
                for w in words:
                    if piece and _ntok(tokenizer, " ".join(piece + [w])) > max_tokens:
                        out.append(" ".join(piece))
                        piece = []
                    piece.append(w)
                u, k = " ".join(piece), _ntok(tokenizer, " ".join(piece)) + (1 if cur else 0)
            if cur and n + k > max_tokens:
                out.append(sep.join(cur))
                cur, n = [], 0
                k -= 1
            cur.append(u)
            n += k
        if cur:
            out.append(sep.join(cur))
    return [p for p in out if _ntok(tokenizer, p) >= max_tokens // 4]


def split_passages(ps: list[str], name: str, seed: int, n_test: int, n_val: int, block: int = 8) -> dict[str, list[str]]:
    """Blocks of `block` consecutive passages go whole to test, validation or train (seeded)."""
    blocks = [ps[i:i + block] for i in range(0, len(ps), block)]
    order = list(range(len(blocks)))
    random.Random(f"lm:{name}:{seed}").shuffle(order)
    out: dict[str, list[str]] = {"test": [], "validation": [], "train": []}
    for b in order:
        target = "test" if len(out["test"]) < n_test else "validation" if len(out["validation"]) < n_val else "train"
        out[target].extend(blocks[b])
    out["test"], out["validation"] = out["test"][:n_test], out["validation"][:n_val]
    return out


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class LMConfig:
    steps: int = 60
    batch_size: int = 4
    max_length: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 5
    n_test: int = 40
    n_val: int = 32
    max_train: int = 1200


REDUCED_LM = LMConfig(steps=2, batch_size=2, max_length=32, n_test=4, n_val=4, max_train=16)


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    out = []
    for name, p in model.named_parameters():
        train = name.startswith("model.layers.") or name == "model.norm.weight"
        p.requires_grad_(train)
        if train:
            out.append((name, p))
    return out


def train_lm(model, tokenizer, texts: Sequence[str], cfg: LMConfig, seed: int, on_step=None) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for _, p in _trainable(model)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    order: list[int] = []
    t0, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        scale = (step + 1) / cfg.warmup if step < cfg.warmup else max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * scale
        if len(order) < cfg.batch_size:
            nxt = list(range(len(texts)))
            rng.shuffle(nxt)
            order += nxt
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=cfg.max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, cfg.steps, losses[-1])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": cfg.steps, "train_seconds": time.perf_counter() - t0,
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def _lm_key(domains: Sequence[str], seed: int, cfg: LMConfig, base: Path) -> str:
    defs = [{"name": d, "sources": [file_digest(str(data_file(s))) for s in DOMAINS[d].sources],
             "version": DOMAINS[d].version} for d in domains]
    blob = {"format": FORMAT, "kind": "causal_lm", "domains": defs, "seed": seed, "config": asdict(cfg),
            "base": json.loads((base / "conversion.json").read_text())["source_sha256"], "trainable": "blocks+norm"}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def build_lm_zoo(out: str | Path | None = None, n_experts: int = 3, domains: Sequence[str] | None = None,
                 steps: int | None = None, reduced: bool = False, seed: int = 0, progress: bool = True,
                 threads: int | None = 2, config: LMConfig | None = None) -> Path:
    """Build (or find cached) the SmolLM2 domain-expert zoo; returns `<root>/<hash>`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esm_ray.eval.metrics import perplexity

    names = list(domains) if domains else list(DEFAULT_DOMAINS[:n_experts])
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise InputError(f"unknown LM domains {unknown}; known: {', '.join(DOMAINS)}")
    cfg = config or (REDUCED_LM if reduced else LMConfig())
    if steps is not None:
        cfg = LMConfig(**{**asdict(cfg), "steps": steps})
    root = Path(out).expanduser() if out else default_root()
    if threads:
        torch.set_num_threads(threads)
    conv = convert_smollm2(root)
    key = _lm_key(names, seed, cfg, conv)
    zdir = root / key
    if (zdir / MANIFEST).is_file():
        log.info("LM zoo %s is cached at %s", key, zdir)
        return zdir
    t_start = time.perf_counter()
    zdir.mkdir(parents=True, exist_ok=True)
    if not (zdir / "base" / "config.json").is_file():
        _link_or_copy(conv, zdir / "base")
    tok = AutoTokenizer.from_pretrained(str(zdir / "base"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"

    data: dict[str, dict[str, list[str]]] = {}
    for d in names:
        ps = passages(DOMAINS[d].read(), tok, cfg.max_length)
        sp = split_passages(ps, d, seed, cfg.n_test, cfg.n_val)
        sp["train"] = sp["train"][:cfg.max_train]
        data[d] = sp
        for s, rows in sp.items():
            write_jsonl(zdir / "data" / d / f"{s}.jsonl", ({"text": t} for t in rows))
        write_jsonl(zdir / "data" / d / "calib.jsonl", ({"text": t} for t in sp["validation"][:32]))

    def score(model) -> dict[str, dict[str, float]]:
        return {d: {s: perplexity(model, tok, data[d][s], cfg.max_length)["perplexity"]
                    for s in ("validation", "test")} for d in names}

    base = AutoModelForCausalLM.from_pretrained(str(zdir / "base"), dtype=torch.float32).eval()
    base_ppl = score(base)
    log.info("base perplexity (test): %s", {d: round(v["test"], 2) for d, v in base_ppl.items()})
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}

    entries: dict[str, dict] = {}
    cross: dict[str, dict[str, dict[str, float]]] = {}
    from esm_ray.zoo.build import _progress

    for d in names:
        edir = zdir / "experts" / d
        man = edir / "manifest.json"
        if man.is_file():
            m = json.loads(man.read_text())
            entries[d], cross[d] = m["zoo_entry"], m["perplexity_all_domains"]
            continue
        base.load_state_dict(base_sd)
        tseed = zlib.crc32(f"{d}:{seed}".encode()) & 0x7FFFFFFF
        stats = train_lm(base, tok, data[d]["train"], cfg, tseed, on_step=_progress(d, progress))
        tmp = edir.with_name(f".{d}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        base.to(torch.bfloat16).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        saved = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        cross[d] = score(saved)
        del saved
        base.float()
        entry = {
            "expert": f"experts/{d}", "data": f"data/{d}", "calib": f"data/{d}/calib.jsonl",
            "description": DOMAINS[d].description, "sources": list(DOMAINS[d].sources),
            "sizes": {s: len(v) for s, v in data[d].items()}, "train_seed": tseed,
            "metrics": {"base": base_ppl[d], "expert": cross[d][d]},
            "steps": stats["steps"], "train_seconds": round(stats["train_seconds"], 1),
            "final_loss": stats["final_loss"],
        }
        write_json(tmp / "manifest.json", {"domain": d, "seed": seed, "config": asdict(cfg), "zoo_entry": entry,
                                           "perplexity_all_domains": cross[d]})
        shutil.rmtree(edir, ignore_errors=True)
        edir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(edir)
        entries[d] = entry
        log.info("LM expert %-10s steps %d  %.0fs  test ppl %.2f -> %.2f", d, stats["steps"],
                 stats["train_seconds"], base_ppl[d]["test"], cross[d][d]["test"])
    manifest = {
        "format": FORMAT, "kind": "causal_lm", "hash": key, "seed": seed, "reduced": reduced,
        "backbone": {"name": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)", "class": "LlamaForCausalLM"},
        "max_length": cfg.max_length, "config": asdict(cfg), "trainable": "decoder blocks + final norm",
        "base": "base", "tasks": entries,
        "perplexity": {"base": base_ppl, **{f"expert:{d}": cross[d] for d in names}},
        "build_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(zdir / MANIFEST, manifest)
    return zdir
