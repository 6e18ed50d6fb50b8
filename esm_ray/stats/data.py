"""Calibration data: a few unlabelled samples per task, from a JSONL or a plain text file.

Formats (chosen by suffix; an unknown suffix is JSONL when its first non-empty line starts
with '{', else text):
- `.jsonl` / `.json` / `.ndjson`: one JSON object per line, {"text": "..."} or
  {"input_ids": [int, ...]}; blank lines are skipped.
- `.txt`: one sample per non-empty line (surrounding whitespace stripped).

Selection is deterministic: all valid rows in file order are shuffled with
`random.Random(seed)` and the first n are kept (all of them when the file has fewer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from esm_ray.errors import InputError

log = logging.getLogger(__name__)

_JSONL = {".jsonl", ".json", ".ndjson"}


def _local_path(uri: str) -> Path:
    s = str(uri)
    if s.startswith("file://"):
        s = s[len("file://"):]
    if "://" in s:
        raise InputError(f"{uri}: calibration data must be a local file (fetch remote data first)")
    p = Path(s).expanduser()
    if not p.is_file():
        raise InputError(f"{uri}: calibration data file not found")
    return p


def _is_jsonl(path: Path, lines: list[str]) -> bool:
    if path.suffix.lower() in _JSONL:
        return True
    if path.suffix.lower() == ".txt":
        return False
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    return first.startswith("{")


def _parse_json_row(line: str, path: Path, lineno: int) -> dict[str, Any]:
    where = f"{path}, line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object with 'text' or 'input_ids'")
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
            raise InputError(f"{where}: 'input_ids' must be a non-empty list of non-negative integers")
        return {"input_ids": ids}
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: 'text' must be a non-empty string")
        return {"text": text}
    raise InputError(f"{where}: missing field 'text' or 'input_ids' (keys: {', '.join(sorted(obj)) or 'none'})")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def check_token_ids(uri: str, vocab_size: int) -> None:
    """Raise InputError naming the file and line of the first row whose `input_ids` hold an id
    the model does not have (ids run from 0 to vocab_size - 1). Text rows are not checked here:
    the tokenizer makes their ids (see calibrate.encode_rows)."""
    path = _local_path(uri)
    lines = _lines(path)
    if not _is_jsonl(path, lines):
        return
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        ids = _parse_json_row(ln, path, i).get("input_ids")
        if ids and max(ids) >= vocab_size:
            raise InputError(f"{path}, line {i}: token id {max(ids)} is outside the model's vocabulary "
                             f"({vocab_size} ids, 0 to {vocab_size - 1}); the data was tokenized for "
                             "another model")


def read_rows(uri: str) -> list[dict[str, Any]]:
    """Every valid row of a calibration file, in file order."""
    path = _local_path(uri)
    lines = _lines(path)
    if _is_jsonl(path, lines):
        rows = [_parse_json_row(ln, path, i) for i, ln in enumerate(lines, 1) if ln.strip()]
    else:
        rows = [{"text": ln.strip()} for ln in lines if ln.strip()]
    if not rows:
        raise InputError(f"{path}: calibration data file is empty")
    return rows


def load_calibration_rows(uri: str, n: int, seed: int) -> list[dict[str, Any]]:
    """n rows, chosen deterministically: the first n after a `random.Random(seed)` shuffle.

    Each row is {"text": str} or {"input_ids": list[int]}. Raises InputError naming the file
    (and line) for a missing or empty file, bad JSON or a row without a usable field.
    """
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    rows = read_rows(uri)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if len(rows) < n:
        log.warning("%s: %d calibration rows requested, the file has %d; using all", uri, n, len(rows))
    return [rows[i] for i in order[:n]]


def data_hash(uri: str) -> str:
    """sha256 of the file's bytes: the data's part of a statistics cache key."""
    h = hashlib.sha256()
    with _local_path(uri).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
