"""One small safetensors file written atomically, locally or to S3 (routers, resume state):
a reader sees the old file or the new one, never a part."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import torch

from esm_ray.errors import OutputError
from esm_ray.io import s3 as s3io
from esm_ray.io.format import serialize
from esm_ray.io.s3_upload import upload_stream
from esm_ray.io.targets import write_local
from esm_ray.io.uri import parse_uri
from esm_ray.spec import S3Options

__all__ = ["save_safetensors_atomic"]


def save_safetensors_atomic(path_or_uri: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None,
                            s3: S3Options | None = None) -> int:
    """Write one small safetensors file atomically (temp name, then rename; an S3 PUT is atomic).
    Returns the bytes written."""
    try:
        u = parse_uri(path_or_uri)
    except ValueError as err:
        raise OutputError(str(err)) from None
    try:
        header, views, _ = serialize(tensors.items(), metadata)
    except ValueError as err:
        raise OutputError(f"{u}: {err}") from None
    if u.is_s3:
        client = s3io.make_client(s3)
        with s3io.s3_errors(str(u), write=True):
            return upload_stream(client, u.bucket, u.key, [header, *views]).size
    p = Path(u.path)
    tmp = p.parent / f".{p.name}.tmp-{secrets.token_hex(4)}"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        n = write_local(tmp, header, views, fsync=True)
        os.replace(tmp, p)
        return n
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{p}: write failed: {err.strerror or err}") from None
