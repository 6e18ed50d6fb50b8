"""URIs of models and outputs: a local path or s3://bucket/key."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Uri:
    """A parsed location. Local: `path` is set. S3: `bucket` and `key` (no leading '/')."""

    scheme: Literal["file", "s3"]
    path: str = ""
    bucket: str = ""
    key: str = ""

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def name(self) -> str:
        """The last component ('' for a bucket root)."""
        if self.is_s3:
            return self.key.rstrip("/").rsplit("/", 1)[-1] if self.key.strip("/") else ""
        return Path(self.path).name

    @property
    def parent(self) -> "Uri":
        if self.is_s3:
            key = self.key.rstrip("/")
            return Uri("s3", bucket=self.bucket, key=key.rsplit("/", 1)[0] if "/" in key else "")
        return Uri("file", path=str(Path(self.path).parent))

    def join(self, *parts: str) -> "Uri":
        """Append path components ('a/b' counts as two). Absolute parts are not allowed."""
        clean = []
        for p in parts:
            p = str(p)
            if p.startswith("/"):
                raise ValueError(f"cannot join absolute path {p!r} onto {self}")
            clean.extend(s for s in p.split("/") if s)
        if any(s == ".." for s in clean):
            raise ValueError(f"cannot join {'/'.join(parts)!r} onto {self}: '..' is not allowed")
        if self.is_s3:
            key = posixpath.join(self.key.rstrip("/"), *clean) if self.key.strip("/") else "/".join(clean)
            return Uri("s3", bucket=self.bucket, key=key)
        return Uri("file", path=str(Path(self.path, *clean)))

    @property
    def dir_prefix(self) -> str:
        """S3 only: the key prefix of the 'directory' this URI names ('' or ending in '/')."""
        key = self.key.strip("/")
        return f"{key}/" if key else ""

    def __str__(self) -> str:
        if self.is_s3:
            return f"s3://{self.bucket}/{self.key}"
        return self.path


def is_s3(uri: str | Uri) -> bool:
    if isinstance(uri, Uri):
        return uri.is_s3
    return str(uri).lower().startswith("s3://")


def parse_uri(uri: str | Path | Uri) -> Uri:
    """'s3://bucket/a/b' -> Uri('s3', bucket='bucket', key='a/b'); '/x/y' or 'file:///x/y' -> local.

    Raises ValueError for an empty string, an unknown scheme or an S3 URI without a bucket.
    """
    if isinstance(uri, Uri):
        return uri
    if isinstance(uri, Path):
        return Uri("file", path=str(uri))
    s = str(uri).strip()
    if not s:
        raise ValueError("empty path or URI")
    if s.lower().startswith("s3://"):
        rest = s[5:]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{s!r}: an S3 URI needs a bucket, as in s3://bucket/prefix")
        while "//" in key:
            key = key.replace("//", "/")
        return Uri("s3", bucket=bucket, key=key.lstrip("/"))
    if s.lower().startswith("file://"):
        path = s[7:]
        if not path.startswith("/"):
            raise ValueError(f"{s!r}: a file:// URI needs an absolute path, as in file:///data/model")
        return Uri("file", path=path)
    if "://" in s:
        scheme = s.split("://", 1)[0]
        raise ValueError(f"{s!r}: unsupported URI scheme {scheme!r}; use a local path or s3://")
    return Uri("file", path=str(Path(s).expanduser()))
