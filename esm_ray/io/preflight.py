"""Questions asked of an output location before or instead of writing it: does it hold a
finished output, and could a write there succeed (the dry run's check)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from esm_ray.errors import OutputError
from esm_ray.io import s3 as s3io
from esm_ray.io import s3_commit as s3c
from esm_ray.io.format import INDEX_NAME
from esm_ray.io.guard import check_replaceable
from esm_ray.io.uri import parse_uri
from esm_ray.spec import S3Options

__all__ = ["check_writable", "is_committed"]


def is_committed(uri: str, s3: S3Options | None = None) -> bool:
    """Whether `uri` holds a finished output (its index exists). Partial writes never do."""
    try:
        u = parse_uri(uri)
    except ValueError as err:
        raise OutputError(str(err)) from None
    if u.is_s3:
        with s3io.s3_errors(str(u)):
            return s3io.head(s3io.make_client(s3), u.bucket, u.dir_prefix + INDEX_NAME) is not None
    return Path(u.path, INDEX_NAME).is_file()


def check_writable(uri: str, overwrite: bool = False, s3: S3Options | None = None) -> None:
    """Dry-run check that `uri` can receive an output; raises OutputError naming it."""
    try:
        u = parse_uri(uri)
    except ValueError as err:
        raise OutputError(str(err)) from None
    if u.is_s3:
        with s3io.s3_errors(str(u), write=True):
            s3c.check_writable(s3io.make_client(s3), u.bucket, u.dir_prefix, str(u), overwrite)
        return
    p = Path(u.path)
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise OutputError(f"{p}: output already exists; choose another path or pass overwrite")
        check_replaceable(p)
    anc = p.parent
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{p}: cannot create the output: {anc} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".esm-ray-probe-", dir=anc)
        os.rmdir(probe)
    except OSError as err:
        raise OutputError(f"{p}: cannot write in {anc}: {err.strerror or err}") from None
