"""A boto3 S3 client with retries, the few object operations the reader and writer need, and
the mapping of botocore errors to InputError / OutputError. Large uploads and copies
(multipart) are io.s3_upload's.

Credentials always come from the standard boto3 chain (environment, profile, instance role)
and never appear in a message: errors name the s3:// URI, the endpoint and the environment
variables to check, not their values.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from esm_ray.errors import EsmRayError, InputError, OutputError
from esm_ray.spec import S3Options

MiB = 2**20
MIN_PART_SIZE = 5 * MiB  # S3 rule: every part but the last is at least 5 MiB
MAX_PARTS = 10_000
MAX_COPY_SIZE = 5 * 2**30  # CopyObject limit; larger objects are copied part by part
DEFAULT_PART_SIZE = 64 * MiB

_AUTH = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
         "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed",
         "InvalidSecurity", "UnrecognizedClientException"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_NO_KEY = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_CRED_HINT = ("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the "
              "endpoint (S3Options.endpoint_url or AWS_ENDPOINT_URL)")


def resolve_endpoint(opts: S3Options | None = None) -> str | None:
    opts = opts or S3Options()
    return (opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


_LOCK = threading.Lock()
def _exc():
    """botocore.exceptions, imported on first use: boto3 costs about 0.3 s to import, which a
    merge that never touches S3 should not pay."""
    import botocore.exceptions

    return botocore.exceptions


_LOADER = None
_CLIENTS: dict[tuple, object] = {}
_MAX_CLIENTS = 16


def _botocore_session():
    """A fresh botocore session sharing one data loader, so the S3 service model is parsed once."""
    global _LOADER
    import botocore.loaders
    import botocore.session

    if _LOADER is None:
        _LOADER = botocore.loaders.create_loader()
    bs = botocore.session.get_session()
    bs.register_component("data_loader", _LOADER)
    return bs


def make_client(opts: S3Options | None = None):
    """A boto3 S3 client: endpoint from opts or AWS_ENDPOINT_URL, path addressing by default,
    'standard' retries (throttling, 5xx, connection errors): opts.max_attempts tries in all.

    Clients are thread-safe and cached per process, settings and credentials (credentials are
    looked up through the boto3 chain on every call and kept only as a hash).
    """
    opts = opts or S3Options()
    endpoint = resolve_endpoint(opts)
    region = (opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
              or "us-east-1")
    with _LOCK:
        bs = _botocore_session()
        creds = bs.get_credentials()
        ident = "anonymous"
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            ident = hashlib.sha256("\0".join(str(x) for x in (frozen.access_key, frozen.secret_key,
                                                               frozen.token)).encode()).hexdigest()
        key = (os.getpid(), endpoint, region, opts.addressing_style, opts.max_attempts, ident)
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "total_max_attempts": opts.max_attempts},
                s3={"addressing_style": opts.addressing_style},
                connect_timeout=10,
                read_timeout=120,
                max_pool_connections=32,
            )
            client = boto3.session.Session(botocore_session=bs).client(
                "s3", endpoint_url=endpoint, region_name=region, config=config)
            if len(_CLIENTS) >= _MAX_CLIENTS:
                _CLIENTS.pop(next(iter(_CLIENTS)))
            _CLIENTS[key] = client
    return client


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _scrub(text: str) -> str:
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def map_error(err: Exception, uri: str, *, write: bool = False, what: str = "") -> EsmRayError:
    """Turn a botocore error into InputError (reads) or OutputError (writes) naming `uri`."""
    cls = OutputError if write else InputError
    verb = "write" if write else "read"
    subject = f"{uri}{' (' + what + ')' if what else ''}"
    bucket = uri[5:].split("/", 1)[0] if uri.startswith("s3://") else "?"
    exc = _exc()
    if isinstance(err, exc.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        op = getattr(err, "operation_name", "") or "request"
        if code == "NoSuchBucket" or (code == "404" and op == "HeadBucket"):
            msg = f"{subject}: bucket '{bucket}' does not exist; create it or fix the URI"
        elif code in _NO_KEY:
            msg = f"{subject}: object not found (S3 {code} on {op}); check the key / prefix"
        elif code in _AUTH:
            msg = f"{subject}: the S3 endpoint rejected the credentials ({code} on {op}); {_CRED_HINT}"
        elif code in _DENIED:
            msg = (f"{subject}: access denied (S3 {code} on {op}): the credentials were rejected or "
                   f"may not {verb} here; {_CRED_HINT}, and the bucket policy")
        elif code == "InvalidRange":
            msg = f"{subject}: requested byte range is beyond the end of the object (truncated?)"
        else:
            detail = err.response.get("Error", {}).get("Message", "")
            msg = f"{subject}: S3 error {code or status} on {op}: {detail}"
    elif isinstance(err, (exc.NoCredentialsError, exc.PartialCredentialsError)):
        msg = (f"{subject}: no usable S3 credentials were found; set AWS_ACCESS_KEY_ID and "
               "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    elif isinstance(err, exc.ConnectionError):
        endpoint = getattr(err, "kwargs", {}).get("endpoint_url", "the S3 endpoint")
        msg = (f"{subject}: cannot connect to {endpoint} ({type(err).__name__}); check that the "
               "server is up and S3Options.endpoint_url / AWS_ENDPOINT_URL")
    elif isinstance(err, exc.BotoCoreError):
        msg = f"{subject}: S3 {verb} failed: {type(err).__name__}: {err}"
    else:
        msg = f"{subject}: S3 {verb} failed: {type(err).__name__}: {err}"
    return cls(_scrub(msg))


@contextlib.contextmanager
def s3_errors(uri: str, *, write: bool = False, what: str = "") -> Iterator[None]:
    """Re-raise botocore errors inside the block as InputError / OutputError naming `uri`."""
    try:
        yield
    except (_exc().ClientError, _exc().BotoCoreError) as err:
        raise map_error(err, uri, write=write, what=what) from None


def _is_missing(err: Exception) -> bool:
    return str(err.response.get("Error", {}).get("Code", "")) in _NO_KEY


# ---- reads ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str


def head(client, bucket: str, key: str) -> S3Object | None:
    """The object's size and ETag, or None when it does not exist."""
    try:
        r = client.head_object(Bucket=bucket, Key=key)
    except _exc().ClientError as err:
        if _is_missing(err):
            return None
        raise
    return S3Object(key, int(r["ContentLength"]), r.get("ETag", "").strip('"'))


def head_size(client, bucket: str, key: str) -> int | None:
    """The object's size, or None when it does not exist."""
    obj = head(client, bucket, key)
    return None if obj is None else obj.size


def list_objects(client, bucket: str, prefix: str) -> list[S3Object]:
    """Every object whose key starts with `prefix`, in key order."""
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out.append(S3Object(obj["Key"], int(obj["Size"]), obj.get("ETag", "").strip('"')))
    return out


def list_level(client, bucket: str, prefix: str) -> tuple[list[S3Object], list[str]]:
    """One level under `prefix`: the objects directly in it and the sub-prefixes ("folder/")
    below it, each in key order (a ListObjectsV2 with Delimiter='/')."""
    objects, subs = [], []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for obj in page.get("Contents", []):
            objects.append(S3Object(obj["Key"], int(obj["Size"]), obj.get("ETag", "").strip('"')))
        subs += [p["Prefix"] for p in page.get("CommonPrefixes", []) or []]
    return objects, subs


def list_keys(client, bucket: str, prefix: str) -> list[str]:
    return [o.key for o in list_objects(client, bucket, prefix)]


def get_object(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def read_range_into(client, bucket: str, key: str, start: int, out: memoryview, attempts: int = 3) -> None:
    """Fill `out` with bytes [start, start + len(out)) of the object, with one ranged GET
    (re-issued for the rest if the stream breaks off)."""
    n = len(out)
    pos = 0
    tries = 0
    while pos < n:
        resp = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start + pos}-{start + n - 1}")
        try:
            for chunk in resp["Body"].iter_chunks(chunk_size=4 * MiB):
                m = min(len(chunk), n - pos)
                out[pos:pos + m] = chunk[:m]
                pos += m
        except (_exc().HTTPClientError, _exc().IncompleteReadError):
            tries += 1
            if tries >= attempts:
                raise
            continue
        finally:
            resp["Body"].close()
        if pos < n:
            raise _exc().IncompleteReadError(actual_bytes=pos, expected_bytes=n)


def get_range(client, bucket: str, key: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of the object (end exclusive), with one ranged GET."""
    if end <= start:
        return b""
    buf = bytearray(end - start)
    read_range_into(client, bucket, key, start, memoryview(buf))
    return bytes(buf)


# ---- writes --------------------------------------------------------------------------------

def put_bytes(client, bucket: str, key: str, data: bytes | bytearray | memoryview) -> str:
    body = data if isinstance(data, (bytes, bytearray)) else bytes(data)
    return client.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')


def delete_keys(client, bucket: str, keys: Iterable[str]) -> None:
    """Delete objects in batches of 1000; raises OutputError if the server refuses any."""
    keys = list(dict.fromkeys(keys))
    for i in range(0, len(keys), 1000):
        batch = keys[i:i + 1000]
        resp = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch],
                                                            "Quiet": True})
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise OutputError(f"{s3_uri(bucket, first.get('Key', '?'))}: delete failed "
                              f"({first.get('Code')}), and {len(errors) - 1} more")


def abort_open_uploads(client, bucket: str, prefix: str, keep=None) -> int:
    """Abort every unfinished multipart upload under `prefix` (only those whose key passes
    `keep(key)`, when given); returns how many."""
    n = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for up in page.get("Uploads", []) or []:
            if keep is not None and not keep(up["Key"]):
                continue
            client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
            n += 1
    return n
