"""The output may never be, hold or lie inside an input.

Writing (or, with overwrite, replacing) an output that is an input's directory, one of its
parent folders, or a folder inside it would destroy that input or copy the output into the
next merge of it. Locations are compared as they will be opened:

- local paths after `~`, `..` and symbolic links are resolved (the parts that exist);
- S3 URIs by bucket and key, on path-segment boundaries: s3://b is a parent of s3://b/models/x,
  s3://b/mod is not one of s3://b/models. Keys are compared both as written and with `.`/`..`
  segments folded, since some servers fold them.

A local path and an S3 URI never overlap (the endpoint is the spec's one for all S3 URIs).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from pathlib import Path

from esm_ray.errors import OutputError
from esm_ray.io.uri import Uri, parse_uri

__all__ = ["check_no_overlap", "relation"]


def _local(path: str) -> tuple[str, ...]:
    p = Path(os.path.expanduser(path))
    p = p if p.is_absolute() else Path.cwd() / p  # `..` is applied after the links before it
    try:
        return p.resolve().parts
    except (OSError, RuntimeError):  # a link loop: compared as written (opening it fails anyway)
        return Path(os.path.abspath(p)).parts


def _s3_forms(u: Uri) -> list[tuple[str, ...]]:
    literal = tuple(s for s in u.key.split("/") if s)
    folded = tuple(s for s in posixpath.normpath("/" + u.key).split("/") if s)
    return [(u.bucket, *literal)] if folded == literal else [(u.bucket, *literal), (u.bucket, *folded)]


def _forms(uri: str | Uri) -> tuple[str, list[tuple[str, ...]]]:
    u = parse_uri(uri)
    if u.is_s3:
        return "s3", _s3_forms(u)
    return "file", [_local(u.path)]


def relation(output: str | Uri, other: str | Uri) -> str | None:
    """'is' when `output` and `other` name the same place, 'contains' when `other` lies inside
    `output`, 'lies inside' when `output` lies inside `other`, None when they are apart."""
    ka, fa = _forms(output)
    kb, fb = _forms(other)
    if ka != kb:
        return None
    for a in fa:
        for b in fb:
            n = min(len(a), len(b))
            if a[:n] != b[:n]:
                continue
            return "is" if len(a) == len(b) else "contains" if len(a) < len(b) else "lies inside"
    return None


def check_no_overlap(output: str, inputs: Iterable[tuple[str, str]], output_field: str = "output") -> None:
    """Raise OutputError naming the output and the input field when the output is, contains or
    lies inside one of `inputs` ((field, location) pairs; None locations are skipped)."""
    try:
        parse_uri(output)
    except ValueError as err:
        raise OutputError(f"field `{output_field}`: {err}") from None
    for fld, loc in inputs:
        if not loc:
            continue
        try:
            rel = relation(output, loc)
        except ValueError:
            continue  # a malformed input is reported where it is read
        if rel is None:
            continue
        what = {"is": "is the same location as", "contains": "contains",
                "lies inside": "lies inside"}[rel]
        raise OutputError(f"field `{output_field}`: the output {output} {what} the input `{fld}` ({loc}); "
                          "an output may never be, contain or lie inside an input (it would be "
                          "overwritten or deleted): choose another output location")
