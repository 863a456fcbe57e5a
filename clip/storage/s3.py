"""The S3 backend: `s3://bucket/key` objects through boto3, with our retries, multipart uploads and checksums.

Writes carry the content's SHA-256 as metadata and Content-MD5 on every request body; the ETag the server
returns is compared with the MD5 as well (servers like moto do not check Content-MD5). Large objects go up
as parallel multipart uploads that are aborted on any failure, so nothing partial is ever visible. Clients
are cached per (process, endpoint, region). The guarantees are listed in the `clip.storage` docstring.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from clip.config import StorageConfig
from clip.storage.base import (
    MIB,
    READ_CHUNK,
    SHA_META,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
    check_range,
)
from clip.storage.local import atomic_local_write, sha256_file
from clip.storage.redact import redact
from clip.storage.retry import (
    ChecksumMismatch,
    backoff_delay,
    client_error_parts,
    describe,
    is_not_found,
    is_retryable,
)
from clip.storage.s3_reader import S3ResumingReader
from clip.storage.uri import parse_s3_uri

# One logger for the whole package, as before the split: log filters and formats keyed on it keep working.
log = logging.getLogger("clip.storage")

T = TypeVar("T")

S3_MIN_PART_BYTES = 5 * MIB  # S3 refuses smaller parts (except the last one) at CompleteMultipartUpload
S3_MAX_PARTS = 10_000


def _md5(data: bytes) -> tuple[str, str]:
    """(base64 for the Content-MD5 header, hex for comparing with an ETag) of one request body."""
    digest = hashlib.md5(data, usedforsecurity=False).digest()  # an integrity check, not security
    return base64.b64encode(digest).decode("ascii"), digest.hex()


def _check_etag(response: dict[str, Any], expected: str, what: str) -> None:
    """Second integrity check after a PUT / UploadPart: the ETag must be the MD5 of what we meant to send.

    Content-MD5 already makes S3, MinIO and Ceph refuse a damaged body; this also catches servers that store
    it anyway (moto does not check Content-MD5). Skipped where the ETag is not an MD5 by design: SSE-KMS and
    SSE-C objects, or an ETag that is not 32 hex digits.
    """
    if response.get("SSECustomerAlgorithm") or str(response.get("ServerSideEncryption", "")).startswith("aws:kms"):
        return
    etag = str(response.get("ETag", "")).strip('"').lower()
    if len(etag) != 32 or any(c not in "0123456789abcdef" for c in etag):
        return
    if etag != expected:
        raise ChecksumMismatch(f"{what}: server stored a body whose MD5 is {etag}, expected {expected}")


_CLIENTS: dict[tuple[int, str | None, str | None], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _resolve_endpoint(cfg: StorageConfig) -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or cfg.endpoint_url or None


def _s3_client(endpoint: str | None, region: str | None) -> Any:
    """One boto3 client per (process, endpoint, region); boto3 clients are thread-safe, sessions are not.

    The process id is part of the key so that a forked data-loader worker never shares its parent's sockets.
    """
    key = (os.getpid(), endpoint, region)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                # Our own retry loop (per request / per part) is the policy; botocore makes exactly one try.
                retries={"total_max_attempts": 1, "mode": "standard"},
                # Keep request bodies plain (no aws-chunked + trailing CRC); we send Content-MD5 ourselves.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=64,  # shared by concurrent part uploads of concurrent files
                s3={"addressing_style": "path"} if endpoint else {},
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
            _CLIENTS[key] = client
        return client


def clear_client_cache() -> None:
    """Forget the cached S3 clients (e.g. after credentials in the environment changed)."""
    with _CLIENTS_LOCK:
        _CLIENTS.clear()


class S3Storage(Storage):
    """`s3://bucket/key` objects through boto3, with our retry policy, multipart uploads and checksums."""

    def __init__(self, cfg: StorageConfig | None = None) -> None:
        self.cfg = cfg or StorageConfig()
        self.endpoint = _resolve_endpoint(self.cfg)
        self.client = _s3_client(self.endpoint, self.cfg.region)

    def __repr__(self) -> str:
        return f"S3Storage(endpoint={redact(self.endpoint or 'AWS default')!r})"

    # Picklable (e.g. sent to Dask workers): the client is rebuilt, from the cache, where it lands.
    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "endpoint": self.endpoint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cfg, self.endpoint = state["cfg"], state["endpoint"]
        self.client = _s3_client(self.endpoint, self.cfg.region)

    # -- retry core ---------------------------------------------------------------------------------------

    def _attempt(self, what: str, uri: str, call: Callable[[], T], stop: threading.Event | None = None) -> T:
        """Run one request with our retry policy; errors become StorageError / ObjectNotFound naming `uri`."""
        attempts = self.cfg.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except Exception as exc:
                if is_not_found(exc):
                    raise ObjectNotFound(f"{what} {uri}: not found ({describe(exc)})") from exc
                if not is_retryable(exc):
                    raise StorageError(f"{what} {uri} failed: {describe(exc)}") from exc
                if attempt >= attempts or (stop is not None and stop.is_set()):
                    raise StorageError(
                        f"{what} {uri} failed after {attempt} attempt(s): {describe(exc)}"
                    ) from exc
                delay = backoff_delay(attempt, self.cfg.backoff_base_s)
                log.warning("%s %s: attempt %d/%d failed (%s); retrying in %.2fs",
                            what, uri, attempt, attempts, describe(exc), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- small operations ----------------------------------------------------------------------------------

    def _head(self, uri: str) -> dict[str, Any] | None:
        bucket, key = parse_s3_uri(uri)
        if not key:
            raise StorageError(f"{uri!r} names a bucket, not an object")
        try:
            return self._attempt("HEAD", uri, lambda: self.client.head_object(Bucket=bucket, Key=key))
        except ObjectNotFound:
            return None

    def exists(self, uri: str) -> bool:
        return self._head(uri) is not None

    def sha256(self, uri: str) -> str | None:
        head = self._head(uri)
        if head is None:
            raise ObjectNotFound(f"no such object: {uri}")
        return (head.get("Metadata") or {}).get(SHA_META)

    def delete(self, uri: str) -> None:
        bucket, key = parse_s3_uri(uri)
        if not key:
            raise StorageError(f"delete {uri!r}: names a bucket, not an object")
        try:
            self._attempt("DELETE", uri, lambda: self.client.delete_object(Bucket=bucket, Key=key))
        except ObjectNotFound:  # the bucket is gone: so is the object
            pass

    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        bucket, key = parse_s3_uri(prefix_uri)
        folder = key.rstrip("/")
        base = f"s3://{bucket}/"
        found: list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": folder}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                page = self._attempt("LIST", prefix_uri, lambda kw=kwargs: self.client.list_objects_v2(**kw))
            except ObjectNotFound as exc:
                raise ObjectNotFound(f"LIST {prefix_uri}: bucket {bucket!r} does not exist") from exc
            for item in page.get("Contents", []):
                name = item["Key"]
                if folder and name != folder and not name.startswith(folder + "/"):
                    continue  # "x-y" under prefix "x": a sibling, not inside the folder
                found.append(ObjectInfo(uri=base + name, size=int(item["Size"])))
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        return sorted(found, key=lambda info: info.uri)

    # -- reads ---------------------------------------------------------------------------------------------

    def open_read(self, uri: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """Streaming, resumed after dropped connections; a ranged read (`start`, `end`) is an HTTP Range GET of
        exactly those bytes (retried like every GET), never a read of the object from its first byte."""
        bucket, key = parse_s3_uri(uri)
        if not key:
            raise StorageError(f"open {uri!r}: names a bucket, not an object")
        check_range(uri, start, end)
        if end is not None and end == start:
            return io.BytesIO(b"")  # an empty range: nothing to ask for (S3 would answer the whole object)
        raw = S3ResumingReader(self, uri, bucket, key, start=start, end=end)
        return io.BufferedReader(raw, buffer_size=READ_CHUNK)  # type: ignore[return-value]

    def read_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as handle:
            return handle.read()

    def download_file(self, uri: str, local_path: str | Path) -> None:
        handle = self.open_read(uri)  # first: a missing object creates no temporary file

        def fill(out: BinaryIO) -> None:
            while block := handle.read(READ_CHUNK):
                out.write(block)

        try:
            with handle:
                atomic_local_write(Path(local_path), fill)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"download of {uri} to {local_path} failed: {exc}") from exc

    # -- writes --------------------------------------------------------------------------------------------

    def _part_size(self, size: int) -> int:
        """Configured chunk size, at least S3's 5 MiB minimum, grown so no upload needs more than 10,000 parts."""
        part = max(self.cfg.multipart_chunk_mb * MIB, S3_MIN_PART_BYTES)
        while (size + part - 1) // part > S3_MAX_PARTS:
            part *= 2
        return part

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = parse_s3_uri(uri)
        if not key:
            raise StorageError(f"write {uri!r}: names a bucket, not an object")
        view = memoryview(bytes(data))
        digest = hashlib.sha256(view).hexdigest()
        self._put(uri, bucket, key, len(view), digest, lambda offset, length: view[offset:offset + length].tobytes())

    def upload_file(self, local_path: str | Path, uri: str) -> bool:
        bucket, key = parse_s3_uri(uri)
        if not key:
            raise StorageError(f"upload to {uri!r}: names a bucket, not an object")
        src = Path(local_path)
        if not src.is_file():
            raise ObjectNotFound(f"upload of {uri}: source file {src} does not exist")
        digest, size = sha256_file(src)
        try:
            head = self._head(uri)
        except StorageError as exc:
            # Write-only credentials get 403 on HEAD (S3 answers 403, not 404, without s3:ListBucket): we
            # cannot know whether an identical object is there, so upload it.
            if client_error_parts(exc.__cause__)[1] != 403:
                raise
            log.debug("upload %s: HEAD refused (403); uploading without the identical-object check", uri)
            head = None
        if head is not None and (head.get("Metadata") or {}).get(SHA_META) == digest \
                and int(head.get("ContentLength", -1)) == size:
            log.debug("upload %s: identical object already there (sha256 %s); skipped", uri, digest[:12])
            return False
        with open(src, "rb") as handle:
            fd = handle.fileno()

            def read_range(offset: int, length: int) -> bytes:
                data = os.pread(fd, length, offset)  # positional read: safe from several part threads at once
                if len(data) != length:
                    raise StorageError(f"upload of {uri}: {src} changed size while uploading")
                return data

            self._put(uri, bucket, key, size, digest, read_range)
            # The file must not have changed under us: the metadata would then lie about the content.
            if os.fstat(fd).st_size != size:
                self.delete(uri)
                raise StorageError(f"upload of {uri}: {src} changed while uploading; object removed")
        return True

    def _put(self, uri: str, bucket: str, key: str, size: int, digest: str,
             read_range: Callable[[int, int], bytes]) -> None:
        if size < self.cfg.multipart_threshold_mb * MIB:
            body = read_range(0, size)
            md5, md5_hex = _md5(body)

            def put_once() -> Any:
                response = self.client.put_object(
                    Bucket=bucket, Key=key, Body=body, ContentMD5=md5, Metadata={SHA_META: digest})
                _check_etag(response, md5_hex, "PUT")
                return response

            try:
                self._attempt("PUT", uri, put_once)
            except StorageError as exc:
                if isinstance(exc.__cause__, ChecksumMismatch):  # a damaged body is stored: remove it
                    try:
                        self.delete(uri)
                    except StorageError as cleanup:
                        log.error("upload %s: could not remove the damaged object: %s", uri, cleanup)
                raise
        else:
            self._multipart(uri, bucket, key, size, digest, read_range)

    def _multipart(self, uri: str, bucket: str, key: str, size: int, digest: str,
                   read_range: Callable[[int, int], bytes]) -> None:
        """Upload in parts (in parallel); visible only on Complete; aborted on any failure so nothing remains."""
        part_size = self._part_size(size)
        n_parts = max(1, (size + part_size - 1) // part_size)
        created = self._attempt("CREATE-MULTIPART", uri, lambda: self.client.create_multipart_upload(
            Bucket=bucket, Key=key, Metadata={SHA_META: digest}))
        upload_id = created["UploadId"]
        stop = threading.Event()  # set on the first failed part so the others give up early

        def send_part(number: int) -> dict[str, Any]:
            if stop.is_set():
                raise StorageError(f"upload of {uri}: part {number} not sent, upload is being aborted")
            offset = (number - 1) * part_size
            body = read_range(offset, min(part_size, size - offset))
            md5, md5_hex = _md5(body)

            def put_part_once() -> Any:
                response = self.client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body, ContentMD5=md5)
                _check_etag(response, md5_hex, f"part {number}")
                return response

            response = self._attempt(f"PUT part {number}/{n_parts} of", uri, put_part_once, stop)
            return {"PartNumber": number, "ETag": response["ETag"]}

        try:
            workers = max(1, min(self.cfg.max_concurrency, n_parts))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-part") as pool:
                futures = [pool.submit(send_part, number) for number in range(1, n_parts + 1)]
                done, _pending = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    stop.set()
                    for future in futures:
                        future.cancel()
                    raise failed[0].exception()  # type: ignore[misc]
                parts = [f.result() for f in futures]
            self._complete(uri, bucket, key, upload_id, parts, digest, size)
        except BaseException as exc:
            stop.set()
            self._abort(uri, bucket, key, upload_id)
            if isinstance(exc, StorageError):
                raise
            if isinstance(exc, Exception):
                raise StorageError(f"multipart upload of {uri} failed: {describe(exc)}") from exc
            raise

    def _complete(self, uri: str, bucket: str, key: str, upload_id: str, parts: list[dict[str, Any]],
                  digest: str, size: int) -> None:
        first_try = True

        def call() -> Any:
            nonlocal first_try
            try:
                return self.client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
            except Exception as exc:
                code, _status = client_error_parts(exc)
                # A retried Complete whose first try went through (the response was lost): the upload id is
                # gone and the object is there with our checksum. That is success.
                if not first_try and code == "NoSuchUpload":
                    head = self.client.head_object(Bucket=bucket, Key=key)
                    if (head.get("Metadata") or {}).get(SHA_META) == digest and head["ContentLength"] == size:
                        return head
                raise
            finally:
                first_try = False

        self._attempt("COMPLETE-MULTIPART", uri, call)

    def _abort(self, uri: str, bucket: str, key: str, upload_id: str) -> None:
        try:
            self._attempt("ABORT-MULTIPART", uri, lambda: self.client.abort_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id))
        except ObjectNotFound:  # NoSuchUpload after a retried abort: already gone
            pass
        except StorageError as exc:
            # Nothing is visible under the key either way; the parts will expire with a lifecycle rule.
            log.error("upload %s: could not abort multipart upload %s: %s", uri, upload_id, exc)
