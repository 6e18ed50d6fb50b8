"""The S3 output's layout and commit: one write switches readers from the old model to the new.

An esm-ray output under the prefix P/ is

    P/model-<job>-0000i-of-0000N.safetensors   the shards; <job> is 8 hex digits, new per write
    P/model.safetensors.index.json              names its shards (weight_map); metadata.esm_ray
                                                records the job and the other files it wrote
    P/config.json, merge_report.json, ...       those files (copied, reports, experts/...)
    P/.partial-<job>/...                        one write's staging area, hidden from readers

A write puts its shards under its own job's names (never over the old output's), stages its
other files under .partial-<job>/, and commits in this order: copy the staged files to their
keys (only over files the old output wrote), PUT the index (the single step that switches from
old to new: until then the old index names the old shards, which are untouched), then delete
what the old output wrote and the new one does not, and the staging area. A write killed at any
point leaves the old model or the new one readable; what it left (its shards, staging, open
uploads) is removed by the next write to the prefix.

Only esm-ray's own objects are ever replaced or deleted: the files and shards a committed
esm-ray index names, versioned shards no index names, and .partial-* / .esm-ray-probe-*
objects. A prefix holding anything else and no esm-ray output is refused by name.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from esm_ray.errors import OutputError
from esm_ray.io import s3 as s3io
from esm_ray.io.format import INDEX_NAME
from esm_ray.io.guard import MARKER_FORMAT, MARKER_KEY
from esm_ray.io.s3_upload import copy_object

__all__ = ["INDEX_NAME", "MARKER", "Output", "PrefixState", "check", "check_writable", "clean_leftovers",
           "inspect", "new_job", "publish", "read_output", "shard_name", "staging_prefix"]

log = logging.getLogger(__name__)

MARKER, FORMAT = MARKER_KEY, MARKER_FORMAT  # esm-ray's record in the index's metadata (io.guard)
_SHARD = re.compile(r"^model-[0-9a-f]{8}-\d{5}-of-\d{5}\.safetensors$")
_PROBE = re.compile(r"^\.esm-ray-probe-[0-9a-f]+$")
_STAGED = re.compile(r"^\.partial-[0-9a-f]+/")


def new_job() -> str:
    """A fresh job token: 8 hex digits, part of every shard name the write creates."""
    return secrets.token_hex(4)


def shard_name(job: str, i: int, n: int) -> str:
    """The name of shard i (1-based) of n written by `job`."""
    return f"model-{job}-{i:05d}-of-{n:05d}.safetensors"


def staging_prefix(prefix: str, job: str) -> str:
    return f"{prefix}.partial-{job}/"


def _is_relpath(rel: object) -> bool:
    return (isinstance(rel, str) and bool(rel) and not rel.startswith("/") and "\\" not in rel
            and all(p not in ("", ".", "..") for p in rel.split("/")))


@dataclass(frozen=True)
class Output:
    """A committed esm-ray output: its index's ETag, shard names and other files (relative)."""

    etag: str
    shards: frozenset[str]
    files: frozenset[str]

    def owned(self) -> set[str]:
        return {INDEX_NAME, *self.shards, *self.files}


def read_output(body: bytes, etag: str) -> tuple[Output | None, str]:
    """(the output an index describes, '') or (None, why it is not an esm-ray index)."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "it is not valid JSON"
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    rec = meta.get(MARKER) if isinstance(meta, dict) else None
    if not isinstance(wmap, dict) or not isinstance(rec, dict) or rec.get("format") != FORMAT:
        return None, f"its metadata has no '{MARKER}' record of format {FORMAT}"
    shards, files = set(wmap.values()), rec.get("files")
    if not all(isinstance(s, str) and _SHARD.match(s) for s in shards):
        return None, "it names shards that esm-ray did not write"
    if not isinstance(files, list) or not all(_is_relpath(f) for f in files):
        return None, f"its '{MARKER}' record lists no valid files"
    return Output(etag, frozenset(shards), frozenset(files)), ""


@dataclass
class PrefixState:
    """What a prefix holds, one level deep: relative names throughout."""

    has_index: bool = False
    output: Output | None = None  # the committed esm-ray output, if the index is esm-ray's
    not_ours: str = ""  # why the index present is not an esm-ray output
    present: set[str] = field(default_factory=set)  # top-level object names
    leftovers: list[str] = field(default_factory=list)  # unreferenced shards, write probes
    staging: list[str] = field(default_factory=list)  # ".partial-<job>/" sub-prefixes
    foreign: list[str] = field(default_factory=list)  # anything else (objects and "folder/")


def inspect(client, bucket: str, prefix: str) -> PrefixState:
    """List the prefix one level deep and read its index, if any (S3 errors propagate)."""
    objects, subs = s3io.list_level(client, bucket, prefix)
    st = PrefixState(present={o.key[len(prefix):] for o in objects})
    index = next((o for o in objects if o.key == prefix + INDEX_NAME), None)
    if index is not None:
        st.has_index = True
        st.output, st.not_ours = read_output(s3io.get_object(client, bucket, index.key), index.etag)
    out = st.output
    for rel in sorted(st.present):
        if rel in ("", INDEX_NAME) or (out is not None and (rel in out.shards or rel in out.files)):
            continue
        (st.leftovers if _SHARD.match(rel) or _PROBE.match(rel) else st.foreign).append(rel)
    for sub in subs:
        rel = sub[len(prefix):]
        if _STAGED.match(rel):
            st.staging.append(rel)
        elif out is None or not any(f.startswith(rel) for f in out.files):
            st.foreign.append(rel)
    return st


def check(st: PrefixState, uri: str, overwrite: bool, bucket: str, prefix: str) -> None:
    """Raise OutputError, naming the prefix and what is in the way, unless a write may go there:
    an empty prefix (esm-ray's leftovers aside), or an esm-ray output with overwrite."""
    if st.has_index and not overwrite:
        raise OutputError(f"{uri}: output already exists (it has {INDEX_NAME}); choose another "
                          "prefix or pass overwrite")
    if st.has_index and st.output is None:
        raise OutputError(f"{uri}: holds a {INDEX_NAME} that esm-ray did not write ({st.not_ours}); "
                          "overwrite replaces only an esm-ray output: remove it yourself or choose "
                          "another prefix")
    if not st.has_index and st.foreign:
        names = ", ".join(s3io.s3_uri(bucket, prefix + rel) for rel in st.foreign[:3])
        more = f" and {len(st.foreign) - 3} more" if len(st.foreign) > 3 else ""
        raise OutputError(f"{uri}: the prefix holds objects that are not an esm-ray output ({names}"
                          f"{more}); esm-ray writes only into an empty prefix or over its own output")


def _leftover_upload(prefix: str, st: PrefixState):
    def keep(key: str) -> bool:
        rel = key[len(prefix):]
        return bool(_STAGED.match(rel) or (_SHARD.match(rel) and (st.output is None
                                                                   or rel not in st.output.shards)))
    return keep


def clean_leftovers(client, bucket: str, prefix: str, st: PrefixState, uri: str) -> int:
    """Remove what earlier writes to the prefix left (killed before or during their commit):
    shards no index names, staging areas, write probes and their open multipart uploads.
    Returns how many objects and uploads were removed."""
    keys = [prefix + rel for rel in st.leftovers]
    for sub in st.staging:
        keys += s3io.list_keys(client, bucket, prefix + sub)
    n = s3io.abort_open_uploads(client, bucket, prefix, keep=_leftover_upload(prefix, st))
    s3io.delete_keys(client, bucket, keys)
    if keys or n:
        log.warning("%s: removed %d objects and %d unfinished uploads left by an earlier write "
                    "that did not finish", uri, len(keys), n)
    return len(keys) + n


def publish(client, bucket: str, prefix: str, uri: str, *, overwrite: bool, index: bytes,
            moves: list[tuple[str, str, int]], direct: set[str], files: set[str],
            staging: str, copy_threshold: int, created: list[str]) -> None:
    """Commit a write: `moves` (staged key, final name, size) are copied to their keys, then the
    index is written (the switch), then the old output's objects that the new one does not
    reuse and the staging area are deleted. `direct`: shard names uploaded in place. Keys this
    creates are appended to `created` (for abort) until the index is written."""
    st = inspect(client, bucket, prefix)
    if st.has_index and not overwrite:
        raise OutputError(f"{uri}: output appeared while writing; not replacing it without overwrite")
    if st.has_index:
        check(st, uri, overwrite, bucket, prefix)
    missing = sorted(direct - st.present)
    if missing:
        raise OutputError(f"{s3io.s3_uri(bucket, prefix + missing[0])}: shard vanished before the "
                          "commit (did another write to this prefix remove it?)")
    old = st.output
    for _, rel, _ in moves:
        if _SHARD.match(rel) or (old is not None and rel in old.files):
            continue  # a shard of this job, or a file of the old output it replaces
        if s3io.head(client, bucket, prefix + rel) is not None:
            raise OutputError(f"{s3io.s3_uri(bucket, prefix + rel)}: already exists and is not part "
                              "of an esm-ray output; not replacing it")
    with ThreadPoolExecutor(min(8, max(1, len(moves)))) as pool:
        futures = []
        for src, rel, size in moves:
            if old is None or rel not in old.files:
                created.append(prefix + rel)
            futures.append(pool.submit(copy_object, client, bucket, src, prefix + rel, size,
                                       threshold=copy_threshold))
        for f in futures:
            f.result()
    s3io.put_bytes(client, bucket, prefix + INDEX_NAME, index)  # the switch
    created.clear()
    new = {INDEX_NAME, *direct, *files, *(rel for _, rel, _ in moves)}
    stale = sorted((old.owned() - new) if old is not None else set())
    try:
        keys = [prefix + rel for rel in stale] + s3io.list_keys(client, bucket, staging)
        s3io.delete_keys(client, bucket, keys)
    except Exception as err:  # committed: what is left is removed by the next write
        log.warning("%s: committed, but could not remove the old output's objects or the staging "
                    "area (%s); the next write to this prefix removes them", uri, type(err).__name__)


def check_writable(client, bucket: str, prefix: str, uri: str, overwrite: bool) -> None:
    """Dry-run check of an S3 output: the bucket exists, the prefix may be written (see
    `check`), and a probe object can be written and deleted."""
    client.head_bucket(Bucket=bucket)
    check(inspect(client, bucket, prefix), uri, overwrite, bucket, prefix)
    probe = f"{prefix}.esm-ray-probe-{secrets.token_hex(4)}"
    s3io.put_bytes(client, bucket, probe, b"")
    client.delete_object(Bucket=bucket, Key=probe)
