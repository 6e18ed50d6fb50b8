"""Where calibration statistics (and an S3 output's resume staging) are cached, and whether that
place can be used: checked before a merge starts, so a bad `calibration.cache_dir` fails in
--dry-run too, naming the field, instead of deep inside calibration."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from esm_ray.errors import SpecError
from esm_ray.spec import CalibrationSpec

ENV = "ESM_RAY_CACHE"
DEFAULT = "~/.cache/esm-ray"


def cache_root(settings: CalibrationSpec) -> Path:
    """settings.cache_dir, else $ESM_RAY_CACHE, else ~/.cache/esm-ray."""
    root = settings.cache_dir or os.environ.get(ENV) or DEFAULT
    return Path(root).expanduser()


def cache_source(settings: CalibrationSpec) -> str:
    """How an error names the setting that chose the cache directory."""
    if settings.cache_dir:
        return "field `calibration.cache_dir`"
    if os.environ.get(ENV):
        return f"${ENV} (no `calibration.cache_dir` in the spec)"
    return f"the default cache {DEFAULT} (no `calibration.cache_dir` in the spec)"


def unusable(root: Path, what: str, err: OSError | None = None) -> SpecError:
    """The error for a cache directory that cannot be created or written."""
    why = f": {err.strerror or err}" if err is not None else ""
    return SpecError(f"{what}: {root} cannot be used as a cache directory{why}")


def check_cache_dir(settings: CalibrationSpec) -> Path:
    """Raise SpecError naming the setting unless the cache's `stats` directory exists and is
    writable, or can be created. Leaves nothing behind: a probe file is created and removed in
    the directory itself or its nearest existing parent. Returns the cache root."""
    root = cache_root(settings)
    what = cache_source(settings)
    target = root / "stats"
    near = target
    while not near.exists() and near.parent != near:
        if near.is_symlink():  # a dangling link
            raise SpecError(f"{what}: {root}: {near} is a link to nothing")
        near = near.parent
    if not near.is_dir():
        raise SpecError(f"{what}: {root} cannot be used as a cache directory: {near} is a file, "
                        "not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".esm-ray-probe-", dir=near)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise unusable(root, what, err) from None
    return root
