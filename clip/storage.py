"""Objects by URI: local paths and `s3://bucket/key`, behind one small interface.

    from clip import storage
    storage.write_bytes("s3://bucket/data/shards/sizes.json", b"{}")      # atomic
    storage.upload_file("staging/shard-00000.tar", "s3://bucket/data/shards/shard-00000.tar")  # False: skipped
    with storage.open_read("s3://bucket/data/shards/shard-00000.tar") as f:  # streaming, resumes on a drop
        ...

Guarantees (both backends):
- **Atomic writes.** Nothing half-written is ever visible under its final name. Local: a temporary file in the
  same folder (`.<name>.tmp-<random>`, never listed), fsync, rename, fsync of the folder. S3: one PUT is
  atomic; a multipart upload only becomes visible on CompleteMultipartUpload, and any failure aborts it, so
  no parts are left behind and nothing appears under the key.
- **Idempotent uploads.** Every object written carries the SHA-256 of its content in its metadata
  (`x-amz-meta-sha256`); `upload_file` HEADs the key first and skips (returns False) when size and checksum
  already match. Locally the existing file's size and SHA-256 are compared.
- **Integrity.** A single PUT and every part carry `Content-MD5`, so a body corrupted on the way is refused by
  S3 / MinIO / Ceph (BadDigest) and sent again; the returned ETag is also compared with the MD5 (for servers
  that do not check, e.g. moto), a mismatch is re-sent and, if it persists, the damaged object is removed.
  Reads check the stored SHA-256 once the whole object was read.
- **Retries are ours.** botocore's own retries are off (`total_max_attempts=1`); each request (each part,
  each HEAD/GET/PUT, each resumed read) is retried here on throttling (SlowDown, 429, 503), other 5xx and
  connection errors (refused, reset, dropped mid-body, read timeouts, truncated bodies), up to
  `StorageConfig.max_attempts` attempts with exponential backoff and jitter from `backoff_base_s`. A failed
  part is sent again on its own; the parts that went through are not.
- **Plain bodies.** The client is built with `request_checksum_calculation="when_required"`, so botocore does
  not switch request bodies to `aws-chunked` encoding with trailing CRCs; we send Content-MD5 instead. That
  works with every S3-compatible server (MinIO, Ceph, moto) and keeps bodies plain for proxies.

Endpoint: `AWS_ENDPOINT_URL` when set, else `StorageConfig.endpoint_url`, else AWS. With a custom endpoint,
path-style addressing is used (what MinIO-like servers expect). Credentials come only from boto3's standard
chain (environment, shared profile, instance role...), never from params.yaml, and never appear in our
messages or logs.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import logging
import os
import random
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from clip.config import StorageConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1024 * 1024
S3_MIN_PART_BYTES = 5 * MIB  # S3 refuses smaller parts (except the last one) at CompleteMultipartUpload
S3_MAX_PARTS = 10_000
_READ_CHUNK = 1 * MIB
_MAX_BACKOFF_S = 20.0
_TMP_MARK = ".tmp-"  # local temp files are ".<final name>.tmp-<hex>"; list() never returns them
_SHA_META = "sha256"  # -> x-amz-meta-sha256

# Error codes (S3 XML <Code>) worth another attempt: throttling, server trouble, bodies damaged on the way.
_RETRYABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "RequestLimitExceeded", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException",
    "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchBucket"})


# ----------------------------------------------------------------------------------------------------------
# Errors and small types


class StorageError(RuntimeError):
    """A storage operation that failed; the message names the URI (never credentials)."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object (or its bucket) does not exist. Also a FileNotFoundError, so `except FileNotFoundError` works."""


class _ChecksumMismatch(Exception):
    """Content read back does not match its stored SHA-256 (treated as a transient fault: read again)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its full URI, its size in bytes and, when cheaply known, its SHA-256 (hex)."""

    uri: str
    size: int
    sha256: str | None = None


def is_s3_uri(uri: str) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"). The key may be empty (the bucket's root)."""
    if not is_s3_uri(uri):
        raise StorageError(f"not an s3:// URL: {uri!r}")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"s3 URL {uri!r} has no bucket; expected s3://bucket/prefix")
    return bucket, key


def join(base_uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URL (`join("s3://b/x", "y", "z.tar")` -> "s3://b/x/y/z.tar")."""
    clean = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if is_s3_uri(base_uri):
        return "/".join([base_uri.rstrip("/"), *clean]) if clean else base_uri
    return os.path.join(str(base_uri), *clean)


def _local_path(uri: str | Path) -> Path:
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise StorageError(f"unsupported URL scheme in {text!r}; use a local path or s3://bucket/prefix")
    return Path(text)


def _sha256_file(path: Path) -> tuple[str, int]:
    """(hex SHA-256, size) of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(_READ_CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not let a folder be opened; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_local_write(final: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write `final` through a temporary file in the same folder: fill, flush, fsync, rename, fsync folder.

    On any failure the temporary file is removed and `final` keeps its old content (or stays absent).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    try:
        with open(tmp, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


# ----------------------------------------------------------------------------------------------------------
# The interface


class Storage(ABC):
    """Objects by URI. Every write is atomic; see the module docstring for the guarantees."""

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None: ...

    @abstractmethod
    def upload_file(self, local_path: str | Path, uri: str) -> bool:
        """Copy a local file to `uri`; False when skipped because an identical object is already there."""

    @abstractmethod
    def download_file(self, uri: str, local_path: str | Path) -> None: ...

    @abstractmethod
    def open_read(self, uri: str) -> BinaryIO:
        """A streaming binary reader (use as a context manager)."""

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether an object (a file, not a folder) exists at `uri`."""

    @abstractmethod
    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        """Objects at or under `prefix_uri` taken as a folder (`x` matches `x` and `x/...`, not `x-y`).

        Recursive, sorted by URI, full URIs (same form as the prefix given).
        """

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove one object; a missing one is fine."""

    @abstractmethod
    def sha256(self, uri: str) -> str | None:
        """The content's SHA-256 (hex): stored metadata on S3 (None if absent), computed locally."""


# ----------------------------------------------------------------------------------------------------------
# Local disk


class LocalStorage(Storage):
    """Local paths (optionally `file://`). Writes go to a temp file in the same folder, then rename."""

    def read_bytes(self, uri: str) -> bytes:
        path = _local_path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"no such file: {uri}") from None
        except OSError as exc:
            raise StorageError(f"reading {uri} failed: {exc}") from exc

    def write_bytes(self, uri: str, data: bytes) -> None:
        try:
            _atomic_local_write(_local_path(uri), lambda handle: handle.write(data))
        except OSError as exc:
            raise StorageError(f"writing {uri} failed: {exc}") from exc

    def upload_file(self, local_path: str | Path, uri: str) -> bool:
        src, dst = Path(local_path), _local_path(uri)
        if not src.is_file():
            raise ObjectNotFound(f"upload of {uri}: source file {src} does not exist")
        try:
            if dst.is_file():
                if src.resolve() == dst.resolve():
                    return False
                if dst.stat().st_size == src.stat().st_size and _sha256_file(dst)[0] == _sha256_file(src)[0]:
                    return False
            self._copy(src, dst)
        except OSError as exc:
            raise StorageError(f"copying {src} to {uri} failed: {exc}") from exc
        return True

    def download_file(self, uri: str, local_path: str | Path) -> None:
        src, dst = _local_path(uri), Path(local_path)
        if not src.is_file():
            raise ObjectNotFound(f"no such file: {uri}")
        if src.resolve() == dst.resolve():
            return
        try:
            self._copy(src, dst)
        except OSError as exc:
            raise StorageError(f"copying {uri} to {dst} failed: {exc}") from exc

    @staticmethod
    def _copy(src: Path, dst: Path) -> None:
        def fill(out: BinaryIO) -> None:
            with open(src, "rb") as handle:
                while block := handle.read(_READ_CHUNK):
                    out.write(block)

        _atomic_local_write(dst, fill)

    def open_read(self, uri: str) -> BinaryIO:
        try:
            return open(_local_path(uri), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"no such file: {uri}") from None

    def exists(self, uri: str) -> bool:
        return _local_path(uri).is_file()

    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        root = _local_path(prefix_uri)
        if root.is_file():
            return [ObjectInfo(uri=str(prefix_uri), size=root.stat().st_size)]
        if not root.is_dir():
            return []
        found: list[ObjectInfo] = []
        base = str(prefix_uri)
        for folder, _dirs, files in os.walk(root):
            rel_folder = os.path.relpath(folder, root)
            for name in files:
                if _is_temp_name(name):  # an unfinished write: not an object yet
                    continue
                rel = name if rel_folder == "." else os.path.join(rel_folder, name)
                try:
                    size = os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:  # removed meanwhile
                    continue
                found.append(ObjectInfo(uri=join(base, rel), size=size))
        return sorted(found, key=lambda info: info.uri)

    def delete(self, uri: str) -> None:
        try:
            _local_path(uri).unlink(missing_ok=True)
        except IsADirectoryError:
            raise StorageError(f"delete {uri}: is a folder, not an object") from None

    def sha256(self, uri: str) -> str | None:
        path = _local_path(uri)
        if not path.is_file():
            raise ObjectNotFound(f"no such file: {uri}")
        return _sha256_file(path)[0]


# ----------------------------------------------------------------------------------------------------------
# S3


def _client_error_parts(exc: BaseException | None) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError; ("", 0) for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_not_found(exc: BaseException) -> bool:
    code, status = _client_error_parts(exc)
    return code in _NOT_FOUND_CODES or status == 404


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt can help: throttling, 5xx, dropped/reset/timed-out connections, damaged bodies."""
    from botocore import exceptions as bexc
    from urllib3 import exceptions as uexc

    if isinstance(exc, bexc.ClientError):
        code, status = _client_error_parts(exc)
        return code in _RETRYABLE_CODES or status == 429 or status >= 500
    retryable_types: tuple[type[BaseException], ...] = (
        bexc.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
        bexc.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ...
        bexc.IncompleteReadError,
        bexc.ResponseStreamingError,
        uexc.ProtocolError,
        uexc.ReadTimeoutError,
        uexc.IncompleteRead,
        uexc.NewConnectionError,
        http.client.IncompleteRead,
        http.client.RemoteDisconnected,
        ConnectionError,  # reset, aborted, refused, broken pipe
        TimeoutError,
        _ChecksumMismatch,
    )
    return isinstance(exc, retryable_types)


def _describe(exc: BaseException) -> str:
    """A one-line description of an error, for messages: its type and text (botocore texts hold no secrets)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def backoff_delay(attempt: int, base_s: float, cap_s: float = _MAX_BACKOFF_S) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): exponential with 'equal jitter'.

    Half of base * 2^(attempt-1) (capped) is fixed, the other half random, so concurrent clients spread out
    but none retries immediately.
    """
    ceiling = min(cap_s, base_s * (2 ** (attempt - 1)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


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
        raise _ChecksumMismatch(f"{what}: server stored a body whose MD5 is {etag}, expected {expected}")


def _redact_endpoint(endpoint: str | None) -> str:
    """An endpoint URL without any user:password@ part, for messages."""
    if not endpoint or "@" not in endpoint:
        return endpoint or "AWS default"
    scheme, _, rest = endpoint.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


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
        return f"S3Storage(endpoint={_redact_endpoint(self.endpoint)!r})"

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
                if _is_not_found(exc):
                    raise ObjectNotFound(f"{what} {uri}: not found ({_describe(exc)})") from exc
                if not is_retryable(exc):
                    raise StorageError(f"{what} {uri} failed: {_describe(exc)}") from exc
                if attempt >= attempts or (stop is not None and stop.is_set()):
                    raise StorageError(
                        f"{what} {uri} failed after {attempt} attempt(s): {_describe(exc)}"
                    ) from exc
                delay = backoff_delay(attempt, self.cfg.backoff_base_s)
                log.warning("%s %s: attempt %d/%d failed (%s); retrying in %.2fs",
                            what, uri, attempt, attempts, _describe(exc), delay)
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
        return (head.get("Metadata") or {}).get(_SHA_META)

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

    def open_read(self, uri: str) -> BinaryIO:
        bucket, key = parse_s3_uri(uri)
        if not key:
            raise StorageError(f"open {uri!r}: names a bucket, not an object")
        raw = _S3ResumingReader(self, uri, bucket, key)
        return io.BufferedReader(raw, buffer_size=_READ_CHUNK)  # type: ignore[return-value]

    def read_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as handle:
            return handle.read()

    def download_file(self, uri: str, local_path: str | Path) -> None:
        handle = self.open_read(uri)  # first: a missing object creates no temporary file

        def fill(out: BinaryIO) -> None:
            while block := handle.read(_READ_CHUNK):
                out.write(block)

        try:
            with handle:
                _atomic_local_write(Path(local_path), fill)
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
        digest, size = _sha256_file(src)
        try:
            head = self._head(uri)
        except StorageError as exc:
            # Write-only credentials get 403 on HEAD (S3 answers 403, not 404, without s3:ListBucket): we
            # cannot know whether an identical object is there, so upload it.
            if _client_error_parts(exc.__cause__)[1] != 403:
                raise
            log.debug("upload %s: HEAD refused (403); uploading without the identical-object check", uri)
            head = None
        if head is not None and (head.get("Metadata") or {}).get(_SHA_META) == digest \
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
                    Bucket=bucket, Key=key, Body=body, ContentMD5=md5, Metadata={_SHA_META: digest})
                _check_etag(response, md5_hex, "PUT")
                return response

            try:
                self._attempt("PUT", uri, put_once)
            except StorageError as exc:
                if isinstance(exc.__cause__, _ChecksumMismatch):  # a damaged body is stored: remove it
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
            Bucket=bucket, Key=key, Metadata={_SHA_META: digest}))
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
                raise StorageError(f"multipart upload of {uri} failed: {_describe(exc)}") from exc
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
                code, _status = _client_error_parts(exc)
                # A retried Complete whose first try went through (the response was lost): the upload id is
                # gone and the object is there with our checksum. That is success.
                if not first_try and code == "NoSuchUpload":
                    head = self.client.head_object(Bucket=bucket, Key=key)
                    if (head.get("Metadata") or {}).get(_SHA_META) == digest and head["ContentLength"] == size:
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


class _S3ResumingReader(io.RawIOBase):
    """A sequential reader over one S3 object that survives dropped connections.

    On a read error it re-opens the object with `Range: bytes=<offset>-` and `If-Match: <etag>` (so a replaced
    object is refused rather than spliced) and goes on; the SHA-256 is checked when the end is reached.
    """

    def __init__(self, storage: S3Storage, uri: str, bucket: str, key: str) -> None:
        super().__init__()
        self._storage, self._uri, self._bucket, self._key = storage, uri, bucket, key
        self._pos = 0
        self._etag: str | None = None
        self._hash = hashlib.sha256()
        self._verified = False
        response = self._storage._attempt("GET", uri, lambda: self._open(0))
        self._length = int(response["ContentLength"])
        self._expected_sha = (response.get("Metadata") or {}).get(_SHA_META)

    def _open(self, offset: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        if self._etag:
            kwargs["IfMatch"] = self._etag
        response = self._storage.client.get_object(**kwargs)
        self._etag = response.get("ETag")
        self._body = response["Body"]
        return response

    def readable(self) -> bool:
        return True

    def readall(self) -> bytes:
        # io.RawIOBase.readall reads 8 KiB at a time; objects here are often hundreds of MiB
        chunks, buffer = [], bytearray(_READ_CHUNK)
        while n := self.readinto(buffer):
            chunks.append(bytes(buffer[:n]))
        return b"".join(chunks)

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._length:
            self._check_sha()
            return 0
        want = min(len(buffer), self._length - self._pos)
        attempts = self._storage.cfg.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                data = self._body.read(want)
                if not data:  # the server ended the body early
                    raise http.client.IncompleteRead(b"", self._length - self._pos)
                break
            except Exception as exc:
                if not is_retryable(exc) or attempt >= attempts:
                    raise StorageError(f"reading {self._uri} at byte {self._pos} failed after {attempt} "
                                       f"attempt(s): {_describe(exc)}") from exc
                delay = backoff_delay(attempt, self._storage.cfg.backoff_base_s)
                log.warning("reading %s at byte %d failed (%s); resuming in %.2fs",
                            self._uri, self._pos, _describe(exc), delay)
                time.sleep(delay)
                self._close_body()
                self._storage._attempt("GET (resume)", self._uri, lambda: self._open(self._pos))
        n = len(data)
        buffer[:n] = data
        self._hash.update(data)
        self._pos += n
        if self._pos >= self._length:
            self._check_sha()
        return n

    def _check_sha(self) -> None:
        if self._verified:
            return
        self._verified = True
        if self._expected_sha and self._hash.hexdigest() != self._expected_sha:
            raise StorageError(f"reading {self._uri}: content does not match its stored sha256 "
                               f"({self._hash.hexdigest()[:12]}... != {self._expected_sha[:12]}...)")

    def _close_body(self) -> None:
        try:
            self._body.close()
        except Exception:  # a broken connection may fail to close; it is discarded either way
            pass

    def close(self) -> None:
        if not self.closed:
            self._close_body()
        super().close()


# ----------------------------------------------------------------------------------------------------------
# Dispatch and module-level shortcuts

_LOCAL = LocalStorage()


def get_storage(uri: str, cfg: StorageConfig | None = None, *, storage_cfg: StorageConfig | None = None) -> Storage:
    """The backend for `uri`: S3Storage for s3://, LocalStorage for local paths. S3 clients are cached."""
    if not isinstance(uri, str | Path):
        raise StorageError(f"expected a path or s3:// URL, got {type(uri).__name__}")
    text = str(uri)
    if is_s3_uri(text):
        parse_s3_uri(text)  # refuse s3:// without a bucket here, with the URI named
        return S3Storage(cfg or storage_cfg)
    _local_path(text)  # refuses other schemes
    return _LOCAL


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    return get_storage(uri, cfg).read_bytes(uri)


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    get_storage(uri, cfg).write_bytes(uri, data)


def upload_file(local_path: str | Path, uri: str, cfg: StorageConfig | None = None) -> bool:
    return get_storage(uri, cfg).upload_file(local_path, uri)


def download_file(uri: str, local_path: str | Path, cfg: StorageConfig | None = None) -> None:
    get_storage(uri, cfg).download_file(uri, local_path)


def open_read(uri: str, cfg: StorageConfig | None = None) -> BinaryIO:
    return get_storage(uri, cfg).open_read(uri)


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    return get_storage(uri, cfg).exists(uri)


def list_objects(prefix_uri: str, cfg: StorageConfig | None = None) -> list[ObjectInfo]:
    return get_storage(prefix_uri, cfg).list(prefix_uri)


def delete(uri: str, cfg: StorageConfig | None = None) -> None:
    get_storage(uri, cfg).delete(uri)


def sha256(uri: str, cfg: StorageConfig | None = None) -> str | None:
    return get_storage(uri, cfg).sha256(uri)

