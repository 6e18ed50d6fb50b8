"""Writing large S3 objects: a byte stream uploaded as one object (one PUT when it fits in a
part, otherwise a multipart upload with bounded memory), a local file, and a server-side copy
(part by part above the CopyObject limit). Any failure aborts the multipart upload."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from esm_ray.errors import OutputError
from esm_ray.io.s3 import DEFAULT_PART_SIZE, MAX_COPY_SIZE, MAX_PARTS, MIN_PART_SIZE, MiB, put_bytes, s3_uri

__all__ = ["StreamUpload", "UploadResult", "copy_object", "upload_file", "upload_stream"]


@dataclass
class UploadResult:
    key: str
    size: int
    etag: str
    parts: int  # 0 for a single PUT


@dataclass
class StreamUpload:
    """Upload a byte stream to one object: a single PUT when it fits in one part, otherwise a
    multipart upload with `part_size` parts, up to `max_concurrency` in flight. Any failure
    aborts the multipart upload. Use as a context manager or call close() / abort()."""

    client: object
    bucket: str
    key: str
    part_size: int = DEFAULT_PART_SIZE
    max_concurrency: int = 4
    upload_id: str | None = None
    size: int = 0
    _buf: bytearray = field(default_factory=bytearray)
    _futures: list = field(default_factory=list)
    _pool: ThreadPoolExecutor | None = None
    _done: bool = False

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {self.part_size} is below the S3 minimum of {MIN_PART_SIZE} bytes")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.size += len(view)
        while len(view):
            take = min(len(view), self.part_size - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) >= self.part_size:
                self._send_part()

    def _send_part(self) -> None:
        if self.upload_id is None:
            r = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)
            self.upload_id = r["UploadId"]
            self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="s3-part")
        number = len(self._futures) + 1
        if number > MAX_PARTS:
            raise OutputError(f"{s3_uri(self.bucket, self.key)}: more than {MAX_PARTS} parts; "
                              "raise the part size")
        body, self._buf = self._buf, bytearray()  # handed over whole: no copy
        # Bound memory: wait for the oldest part when max_concurrency are in flight.
        pending = [f for f in self._futures if not f.done()]
        if len(pending) >= self.max_concurrency:
            pending[0].result()
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        self._futures.append(self._pool.submit(self._upload_part, number, body))

    def _upload_part(self, number: int, body: bytearray) -> dict:
        r = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                    PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": r["ETag"]}

    def close(self) -> UploadResult:
        """Finish the upload (last part, then CompleteMultipartUpload) and return its result."""
        if self._done:
            raise RuntimeError("upload already finished")
        try:
            if self.upload_id is None:
                etag = put_bytes(self.client, self.bucket, self.key, self._buf)
                self._buf = bytearray()
                self._done = True
                return UploadResult(self.key, self.size, etag, 0)
            if self._buf:
                self._send_part()
            parts = [f.result() for f in self._futures]
            r = self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key,
                                                      UploadId=self.upload_id,
                                                      MultipartUpload={"Parts": parts})
            self._done = True
            self._shutdown()
            return UploadResult(self.key, self.size, r.get("ETag", "").strip('"'), len(parts))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the upload; never raises (it runs on error paths)."""
        if self._done:
            return
        self._done = True
        self._buf = bytearray()
        if self._pool is not None:
            for f in self._futures:
                f.cancel()
            self._shutdown()
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "StreamUpload":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def upload_stream(client, bucket: str, key: str, chunks: Iterable[bytes | bytearray | memoryview],
                  part_size: int = DEFAULT_PART_SIZE, max_concurrency: int = 4) -> UploadResult:
    """Upload an iterable of byte chunks as one object (multipart when over one part)."""
    up = StreamUpload(client, bucket, key, part_size=part_size, max_concurrency=max_concurrency)
    try:
        for chunk in chunks:
            up.write(chunk)
    except BaseException:
        up.abort()
        raise
    return up.close()


def upload_file(client, bucket: str, key: str, path: str | os.PathLike,
                part_size: int = DEFAULT_PART_SIZE, max_concurrency: int = 4) -> UploadResult:
    """Upload a local file; the part size grows if the file would need more than 10,000 parts."""
    size = os.path.getsize(path)
    part_size = max(part_size, -(-size // MAX_PARTS))

    def chunks():
        with open(path, "rb") as f:
            while block := f.read(part_size):
                yield block

    return upload_stream(client, bucket, key, chunks(), part_size, max_concurrency)


def copy_object(client, bucket: str, src: str, dst: str, size: int,
                part_size: int = 512 * MiB, threshold: int = MAX_COPY_SIZE) -> None:
    """Server-side copy within a bucket; objects over `threshold` are copied part by part."""
    if size <= threshold:
        client.copy_object(Bucket=bucket, Key=dst, CopySource={"Bucket": bucket, "Key": src})
        return
    part_size = max(part_size, MIN_PART_SIZE, -(-size // MAX_PARTS))
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=dst)["UploadId"]
    try:
        parts = []
        for i, start in enumerate(range(0, size, part_size)):
            end = min(start + part_size, size) - 1
            r = client.upload_part_copy(Bucket=bucket, Key=dst, UploadId=upload_id, PartNumber=i + 1,
                                        CopySource={"Bucket": bucket, "Key": src},
                                        CopySourceRange=f"bytes={start}-{end}")
            parts.append({"PartNumber": i + 1, "ETag": r["CopyPartResult"]["ETag"]})
        client.complete_multipart_upload(Bucket=bucket, Key=dst, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=dst, UploadId=upload_id)
        raise

