"""`esm-ray zoo lm`: SmolLM2-135M domain experts and instruction-style task experts.

`build_lm_zoo()` returns `<root>/<hash>/`; the hash covers the domain and task definitions
(with the digests of their source files, the standard-library modules included), the seed,
the split sizes and training settings, and the converted base. A finished zoo (zoo.json
present) is returned at once; an interrupted build resumes: each expert is written under a
temporary name and renamed when done, and a finished expert is reused.

Columns (the zoo's "tasks"): domains (kind "domain", scored by word perplexity of their
held-out passages) and label tasks (kind "label_task", scored by multiple-choice accuracy).
Every expert is the base fine-tuned in float32 on one column's training split (domains: every
token; label tasks: the answer tokens only) and saved in bfloat16 like the base; an expert not
better than the base on its own validation split trains again with twice the steps (`retries`).
At build time the base is scored on every column's test and validation split, and every
expert on its own column's test and validation split and on a strided subset (`cross_items`)
of every other column's test split (enough to see that it gains on its own column only, at a
fraction of the cost), with `esm_ray.models.lm_items` (lm-eval's conventions), per item, under `scores/`. The
manifest records each expert's task-vector norm and the pairwise cosines of the task vectors.

With `lora` (`esm-ray zoo lm --lora`) the same zoo is built with PEFT LoRA adapters as experts
(`esm_ray.zoo.lm_lora`) under its own hash; the layout, manifest and scores are the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from esm_ray.errors import InputError
from esm_ray.models.lm_items import bootstrap_interval, choice_items, rolling_items, score
from esm_ray.zoo.layout import FORMAT, MANIFEST, default_root, write_json, write_jsonl
from esm_ray.zoo.lm_data import (DEFAULT_DOMAINS, DEFAULT_LABEL_TASKS, REDUCED_DOMAINS, REDUCED_LABEL_TASKS,
                                 domain_texts, get_domain, get_label_task, label_rows)
from esm_ray.zoo.lm_lora import LoraSettings
from esm_ray.zoo.lm_train import LMTrainConfig, answer_examples, domain_examples, train_lm

log = logging.getLogger("esm_ray.zoo")
RECIPE_VERSION = 2  # 2: passages of 96 tokens, shorter training, cross table on a strided subset
# `retries` came later, in the key through the config: a zoo built without it equals one built
# with it when every expert passed its validation check at the first attempt
LORA_RECIPE_VERSION = 1
CALIB = 32
_METRIC = {"domain": "word_perplexity", "label_task": "accuracy"}


@dataclass(frozen=True)
class LMZooConfig:
    max_length: int = 96
    domain_sizes: dict = field(default_factory=lambda: {"test": 96, "validation": 48, "train": 2400})
    task_sizes: dict = field(default_factory=lambda: {"test": 240, "validation": 120, "train": 1200})
    domain_train: LMTrainConfig = LMTrainConfig(steps=32, batch_size=8, lr=2e-4, warmup=3)
    task_train: LMTrainConfig = LMTrainConfig(steps=30, batch_size=8, lr=2e-4, warmup=3)
    cross_items: int | None = 32  # an expert on another column's test split: this many items (strided); None: all
    layers: int | None = None  # keep only the first N decoder blocks of the base (reduced zoos)
    max_passages: int | None = None  # stop cutting a corpus into passages after this many (reduced zoos)
    retries: int = 2  # an expert not better than the base on its validation split: train again, 2x the steps

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_LM_CONFIG = LMZooConfig()
REDUCED_LM_CONFIG = LMZooConfig(max_length=32, domain_sizes={"test": 6, "validation": 4, "train": 16},
                                task_sizes={"test": 8, "validation": 4, "train": 16},
                                domain_train=LMTrainConfig(steps=3, batch_size=2, lr=1e-4, warmup=1),
                                task_train=LMTrainConfig(steps=3, batch_size=2, lr=1e-4, warmup=1),
                                layers=2, max_passages=400, cross_items=3, retries=1)


def lm_zoo_key(domains: Sequence[str], tasks: Sequence[str], seed: int, cfg: LMZooConfig, base_sha: str,
               lora: LoraSettings | None = None) -> str:
    """The zoo's content hash; a LoRA zoo's also covers its LoRA settings (a full zoo's key is
    unchanged by their existence)."""
    blob = {"format": FORMAT, "kind": "causal_lm", "recipe": RECIPE_VERSION, "seed": seed, "config": cfg.to_dict(),
            "domains": [get_domain(d).fingerprint() for d in domains],
            "tasks": [get_label_task(t).fingerprint() for t in tasks], "base": base_sha}
    if lora is not None:
        blob["lora"] = {"recipe": LORA_RECIPE_VERSION, **lora.to_dict()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


class _Columns:
    """The data of every column, and scoring of a model on them."""

    def __init__(self, zdir: Path, tok, domains: Sequence[str], tasks: Sequence[str], seed: int, cfg: LMZooConfig):
        self.tok, self.cfg = tok, cfg
        self.kind: dict[str, str] = {}
        self.rows: dict[str, dict[str, list[dict]]] = {}
        for d in domains:
            ds = cfg.domain_sizes
            sp = domain_texts(get_domain(d), tok, cfg.max_length, seed, ds["test"], ds["validation"], ds["train"],
                              cfg.max_passages)
            self.rows[d] = {s: [{"text": t} for t in v] for s, v in sp.items()}
            self.kind[d] = "domain"
        for t in tasks:
            self.rows[t] = label_rows(get_label_task(t), seed, cfg.task_sizes)
            self.kind[t] = "label_task"
        for n, sp in self.rows.items():
            for s, rows in sp.items():
                write_jsonl(zdir / "data" / n / f"{s}.jsonl", rows)
            calib = [{"text": r.get("prompt", r["text"])} for r in sp["validation"][:CALIB]]
            write_jsonl(zdir / "data" / n / "calib.jsonl", calib)

    def metric(self, name: str) -> str:
        return "perplexity" if self.kind[name] == "domain" else "accuracy"

    def cross_subset(self, items: list) -> list:
        """The strided subset of a test split on which an expert is scored off its own column
        (every k-th item, k = ceil(n / cross_items), so every block of the split is represented)."""
        c = self.cfg.cross_items
        return items if c is None or len(items) <= c else items[::-(-len(items) // c)]

    def items(self, model, name: str, split: str, cross: bool = False) -> list[dict]:
        rows = self.rows[name][split]
        if cross:
            rows = self.cross_subset(rows)
        if self.kind[name] == "domain":
            return rolling_items(model, self.tok, [r["text"] for r in rows])
        task = get_label_task(name)
        return choice_items(model, self.tok, [r["prompt"] for r in rows], task.choices, [r["label"] for r in rows])

    def examples(self, name: str):
        rows = self.rows[name]["train"]
        if self.kind[name] == "domain":
            return domain_examples(self.tok, [r["text"] for r in rows], self.cfg.max_length)
        return answer_examples(self.tok, [r["prompt"] for r in rows], [r["answer"] for r in rows],
                               self.cfg.max_length * 2)

    def score_all(self, model, own: str | None = None,
                  validation: list[dict] | None = None) -> dict[str, dict[str, list[dict]]]:
        """{split: {column: items}}: the base (own None): every column's test and validation split;
        an expert: its own column's test and validation split (`validation`: those items, already
        scored), and the cross subset of every other column's test split."""
        out: dict[str, dict[str, list[dict]]] = {"test": {}, "validation": {}}
        for n in self.rows:
            out["test"][n] = self.items(model, n, "test", cross=own is not None and n != own)
            if own is None or n == own:
                out["validation"][n] = validation if n == own and validation is not None else \
                    self.items(model, n, "validation")
        return out


def summarize(items: dict[str, dict[str, list[dict]]], metric_of) -> dict[str, dict[str, dict]]:
    """{split: {column: {"score", "interval", "n"}}} from per-item records."""
    return {s: {n: {"score": score(it, metric_of(n)), "interval": list(bootstrap_interval(it, metric_of(n))),
                    "n": len(it)} for n, it in cols.items()} for s, cols in items.items()}


def task_vector_stats(base_dir: Path, expert_dirs: dict[str, Path]) -> dict:
    """Each expert's task-vector norm (expert - base over the trained tensors, float32) and the
    pairwise cosines, accumulated tensor by tensor."""
    from safetensors import safe_open

    names = list(expert_dirs)
    gram = torch.zeros(len(names), len(names), dtype=torch.float64)
    with safe_open(str(base_dir / "model.safetensors"), "pt") as b:
        keys = [k for k in b.keys() if k.startswith("model.layers.") or k == "model.norm.weight"]
        handles = [safe_open(str(expert_dirs[n] / "model.safetensors"), "pt") for n in names]
        for k in keys:
            base = b.get_tensor(k).float()
            vecs = torch.stack([(h.get_tensor(k).float() - base).flatten() for h in handles]).double()
            gram += vecs @ vecs.T
    norms = gram.diag().sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    return {"norm": {n: float(norms[i]) for i, n in enumerate(names)},
            "cosine": {a: {b: round(float(cos[i, j]), 6) for j, b in enumerate(names)} for i, a in enumerate(names)},
            "tensors": "decoder blocks + final norm"}


def build_lm_zoo(out: str | Path | None = None, domains: Sequence[str] | None = None,
                 tasks: Sequence[str] | None = None, reduced: bool = False, seed: int = 0,
                 config: LMZooConfig | None = None, progress: bool = True, threads: int | None = 2,
                 steps: int | None = None, lora: LoraSettings | None = None, retries: int | None = None) -> Path:
    """Build (or find cached, or resume) the LM zoo; returns `<root>/<hash>`. With `lora`, the
    LoRA zoo: the same columns, data, base and training schedule, each expert a PEFT LoRA
    adapter (`zoo.lm_lora`), under its own hash; it reuses the full zoo's base scores when that
    zoo (same settings) is built under the same root.

    An expert that is not better than the base on its own validation split beyond the 95%
    interval (`beats_base`) is trained again from the base with twice the steps, at most
    `retries` times (default: the config's, 2); each attempt is recorded in its zoo entry. The
    test split is never looked at for this."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esm_ray.zoo.lm_tasks import write_harness_tasks
    from esm_ray.zoo.build import _progress
    from esm_ray.zoo.layout import open_zoo
    from esm_ray.zoo.smollm2 import convert_smollm2, link_or_copy, truncated_smollm2

    dnames = list(domains) if domains is not None else list(REDUCED_DOMAINS if reduced else DEFAULT_DOMAINS)
    tnames = list(tasks) if tasks is not None else list(REDUCED_LABEL_TASKS if reduced else DEFAULT_LABEL_TASKS)
    cols = dnames + tnames
    if not cols or len(set(cols)) != len(cols):
        raise InputError(f"LM zoo columns must be non-empty and distinct: {cols}")
    for d in dnames:
        get_domain(d)
    for t in tnames:
        get_label_task(t)
    cfg = config or (REDUCED_LM_CONFIG if reduced else DEFAULT_LM_CONFIG)
    if steps is not None:
        cfg = LMZooConfig(**{**cfg.__dict__, "domain_train": cfg.domain_train.scaled(steps=steps),
                             "task_train": cfg.task_train.scaled(steps=steps)})
    if retries is not None:
        if retries < 0:
            raise InputError(f"retries must be >= 0, got {retries}")
        cfg = LMZooConfig(**{**cfg.__dict__, "retries": retries})
    root = Path(out).expanduser() if out else default_root()
    if threads:
        torch.set_num_threads(threads)
    conv = truncated_smollm2(root, cfg.layers) if cfg.layers else convert_smollm2(root)
    base_sha = json.loads((conv / "conversion.json").read_text())["source_sha256"]
    key = lm_zoo_key(dnames, tnames, seed, cfg, base_sha, lora)
    zdir = root / key
    if (zdir / MANIFEST).is_file():
        log.info("LM zoo %s is cached at %s", key, zdir)
        return zdir
    t_start = time.perf_counter()
    zdir.mkdir(parents=True, exist_ok=True)
    if not (zdir / "base" / "config.json").is_file():
        link_or_copy(conv, zdir / "base")
    tok = AutoTokenizer.from_pretrained(str(zdir / "base"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data = _Columns(zdir, tok, dnames, tnames, seed, cfg)

    base = AutoModelForCausalLM.from_pretrained(str(zdir / "base"), dtype=torch.float32).eval()
    base_file = zdir / "scores" / "base.json"
    full_base = root / lm_zoo_key(dnames, tnames, seed, cfg, base_sha) / "scores" / "base.json"
    if lora is not None and not base_file.is_file() and full_base.is_file():
        log.info("LoRA zoo %s: base scores from the full zoo %s", key, full_base.parent.parent.name)
        write_json(base_file, json.loads(full_base.read_text()))
    if base_file.is_file():
        base_items = json.loads(base_file.read_text())
    else:
        base_items = data.score_all(base)
        write_json(base_file, base_items)
    base_sum = summarize(base_items, data.metric)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()} if lora is None else {}  # LoRA trains a copy

    entries: dict[str, dict] = {}
    cross: dict[str, dict[str, float]] = {"base": {n: v["score"] for n, v in base_sum["test"].items()}}
    base_cross = {n: score(data.cross_subset(it), data.metric(n)) for n, it in base_items["test"].items()}
    for n in cols:
        edir = zdir / "experts" / n
        if (edir / "manifest.json").is_file():
            m = json.loads((edir / "manifest.json").read_text())
            entries[n], cross[n] = m["zoo_entry"], m["test_all_columns"]
            continue
        tcfg = cfg.domain_train if data.kind[n] == "domain" else cfg.task_train
        tseed = zlib.crc32(f"{n}:{seed}".encode()) & 0x7FFFFFFF
        tmp = edir.with_name(f".{n}.tmp")
        attempts: list[dict] = []
        for k in range(cfg.retries + 1):
            tk = tcfg.scaled(steps=tcfg.steps * 2 ** k)
            shutil.rmtree(tmp, ignore_errors=True)
            if lora is None:
                base.load_state_dict(base_sd)
                stats = train_lm(base, data.examples(n), tk, tseed, tok.pad_token_id, on_step=_progress(n, progress))
                base.to(torch.bfloat16).save_pretrained(str(tmp))
                tok.save_pretrained(str(tmp))
                base.float()
                saved = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
            else:
                from esm_ray.zoo.lm_lora import train_adapter

                tk = lora.train_config(tk)
                stats, saved = train_adapter(base, data.examples(n), tk, lora, tseed, tok.pad_token_id, tmp,
                                             on_step=_progress(n, progress))
            val = data.items(saved, n, "validation")
            v = summarize({"validation": {n: val}}, data.metric)["validation"][n]
            attempts.append({"steps": tk.steps, "validation": v["score"], "validation_interval": v["interval"],
                             "train_seconds": round(stats["train_seconds"], 1)})
            if beats_base(_METRIC[data.kind[n]], base_sum["validation"][n]["score"], v["interval"]):
                break
            if k < cfg.retries:
                log.warning("LM expert %s after %d steps is not better than the base on its validation split "
                            "(%.3f, expert %.3f %s): training again from the base with %d steps", n, tk.steps,
                            base_sum["validation"][n]["score"], v["score"], v["interval"], tk.steps * 2)
                del saved
        items = data.score_all(saved, own=n, validation=val)
        del saved
        write_json(tmp / "scores.json", items)
        summ = summarize(items, data.metric)
        cross[n] = {c: v["score"] for c, v in summ["test"].items()}
        entry = {
            "kind": data.kind[n], "metric": _METRIC[data.kind[n]],
            "expert": f"experts/{n}", "data": f"data/{n}", "calib": f"data/{n}/calib.jsonl",
            "scores": f"experts/{n}/scores.json",
            "description": (get_domain(n) if data.kind[n] == "domain" else get_label_task(n)).description,
            "sizes": {s: len(v) for s, v in data.rows[n].items()}, "train_seed": tseed,
            "metrics": {"base": {s: base_sum[s][n]["score"] for s in ("validation", "test")},
                        "expert": {s: summ[s][n]["score"] for s in ("validation", "test")},
                        "expert_interval": {s: summ[s][n]["interval"] for s in ("validation", "test")}},
            "steps": stats["steps"], "attempts": attempts, "lr": tk.lr,
            "train_seconds": round(sum(a["train_seconds"] for a in attempts), 1),
            "seconds_per_step": round(stats["seconds_per_step"], 3), "final_loss": stats["final_loss"],
        }
        if data.kind[n] == "domain":
            entry["sources"] = list(get_domain(n).sources)
        else:
            lt = get_label_task(n)
            entry.update({"choices": list(lt.choices), "prompt": lt.prompt, "source_task": lt.source_task,
                          "majority_rate": _majority(data.rows[n]["test"])})
        write_json(tmp / "manifest.json", {"column": n, "seed": seed, "config": cfg.to_dict(), "zoo_entry": entry,
                                           "test_all_columns": cross[n], "lora": lora and lora.to_dict()})
        shutil.rmtree(edir, ignore_errors=True)
        edir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(edir)
        entries[n] = entry
        log.info("LM expert %-16s %3d steps %6.0fs  test %s %.3f -> %.3f", n, stats["steps"], stats["train_seconds"],
                 entry["metric"], entry["metrics"]["base"]["test"], entry["metrics"]["expert"]["test"])
        if _weak(entry):
            log.warning("LM expert %s is not better than the base on its own column beyond the 95%% interval "
                        "(test %s %.3f, expert %.3f %s): normalised scores of this column mean little; "
                        "rebuild with more --steps or another --seed", n, entry["metric"],
                        entry["metrics"]["base"]["test"], entry["metrics"]["expert"]["test"],
                        entry["metrics"]["expert_interval"]["test"])
    expert_dirs = {n: zdir / "experts" / n for n in cols}
    if lora is None:
        tv, trained = task_vector_stats(zdir / "base", expert_dirs), "decoder blocks + final norm"
    else:
        from esm_ray.zoo.lm_lora import adapter_vector_stats

        tv = adapter_vector_stats(zdir / "base", expert_dirs)
        trained = f"LoRA factors (r={lora.rank}, lora_alpha={lora.alpha:g}) of {', '.join(lora.targets)}"
    manifest = {
        "format": FORMAT, "kind": "causal_lm", "hash": key, "seed": seed, "reduced": reduced,
        "backbone": {"name": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)", "class": "LlamaForCausalLM",
                     "layers": cfg.layers or "all"},
        "max_length": cfg.max_length, "config": cfg.to_dict(), "trainable": trained,
        "expert_format": "full" if lora is None else "peft_lora",
        **({} if lora is None else {"lora": lora.to_dict(),
                                    "full_zoo": lm_zoo_key(dnames, tnames, seed, cfg, base_sha)}),
        "base": "base", "base_scores": "scores/base.json", "domains": dnames, "label_tasks": tnames,
        "tasks": entries, "test_scores": cross, "test_scores_base_cross": base_cross,
        "cross_items": cfg.cross_items, "task_vectors": tv,
        "weak_experts": [n for n in cols if _weak(entries[n])],
        "build_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(zdir / MANIFEST, manifest)
    zoo = open_zoo(zdir)
    for split in ("test", "validation"):
        write_harness_tasks(zoo, split)
    return zdir


def beats_base(metric: str, base: float, expert_interval: Sequence[float]) -> bool:
    """Whether an expert is better than the base on its own column beyond its 95% interval: the
    whole interval of its test score below the base's word perplexity, or above its accuracy."""
    lo, hi = expert_interval
    return hi < base if metric == "word_perplexity" else lo > base


def _weak(entry: dict) -> bool:
    """Whether a zoo entry's expert does not beat the base on its own test column (`beats_base`)."""
    m = entry["metrics"]
    return not beats_base(entry["metric"], m["base"]["test"], m["expert_interval"]["test"])


def _majority(rows: list[dict]) -> float:
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    return max(counts.values()) / max(len(rows), 1)


def mean_log_ppl(values: Sequence[float]) -> float:
    return sum(math.log(v) for v in values) / len(values)
