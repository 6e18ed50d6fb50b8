"""Which existing local folder an overwrite may replace: only an esm-ray output, whole.

The marker is the output's own index: model.safetensors.index.json, written last by esm-ray's
writer, carries in its "metadata" the key "esm_ray" = {"format": "esm-ray/output/1",
"files": [every file the writer wrote except the index]}. With overwrite, an existing local
output is replaced only when

- it is an empty directory, or
- it is a directory whose index carries that marker, and every file in it (subfolders and
  hidden files included) is the index or one of the listed files; it holds no symbolic link.

Anything else (a file, a link, a folder without the marker, an esm-ray output into which
someone put a file of their own) is refused by name and left untouched. Outputs written before
the marker existed are refused too: remove them by hand once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from esm_ray.errors import OutputError
from esm_ray.io.format import INDEX_NAME

__all__ = ["MARKER_KEY", "MARKER_FORMAT", "marker", "written_files", "check_replaceable"]

MARKER_KEY = "esm_ray"
MARKER_FORMAT = "esm-ray/output/1"


def marker(files: list[str]) -> dict[str, object]:
    """The index metadata entry that marks an output as written by esm-ray."""
    return {"format": MARKER_FORMAT, "files": sorted(set(files))}


def written_files(path: Path) -> set[str] | None:
    """The files esm-ray wrote into output directory `path` (index included), or None when
    `path` holds no index carrying esm-ray's marker."""
    idx = path / INDEX_NAME
    if idx.is_symlink() or not idx.is_file():
        return None
    try:
        doc = json.loads(idx.read_bytes())
        mark = doc["metadata"][MARKER_KEY]
        files = mark["files"]
        if mark["format"] != MARKER_FORMAT or not all(isinstance(f, str) for f in files):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(files) | {INDEX_NAME}


def _contents(path: Path) -> tuple[list[str], list[str]]:
    """(files, symbolic links) under `path`, relative, without following links."""
    files, links = [], []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for d in list(dirnames):
            if Path(dirpath, d).is_symlink():
                links.append(Path(dirpath, d).relative_to(path).as_posix())
                dirnames.remove(d)
        for fn in filenames:
            p = Path(dirpath, fn)
            (links if p.is_symlink() else files).append(p.relative_to(path).as_posix())
    return sorted(files), sorted(links)


def check_replaceable(path: Path) -> None:
    """Raise OutputError naming `path` (and the first foreign entry) unless overwrite may
    replace it: missing, an empty directory, or an esm-ray output holding only what it wrote."""
    if path.is_symlink():
        raise OutputError(f"{path}: the output is a symbolic link; not replacing it (an overwrite "
                          "replaces only an esm-ray output directory): choose another output")
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{path}: the output exists and is a file, not an esm-ray output; not "
                          "replacing it: choose another output")
    try:
        if not any(path.iterdir()):
            return
        files, links = _contents(path)
    except OSError as err:
        raise OutputError(f"{path}: cannot list the existing output: {err.strerror or err}") from None
    ours = written_files(path)
    if ours is None:
        raise OutputError(f"{path}: the output exists and is not an esm-ray output (no {INDEX_NAME} "
                          "written by esm-ray); overwrite replaces only an esm-ray output, so nothing "
                          "was changed: choose another output or remove it yourself")
    foreign = links + [f for f in files if f not in ours]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise OutputError(f"{path}: not replacing this esm-ray output: it holds {foreign[0]!r}{more}, "
                          "which esm-ray did not write; nothing was changed: move it away or "
                          "choose another output")
