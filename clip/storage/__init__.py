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
  no parts are left behind and nothing appears under the key. A process killed mid-write locally leaves its
  temporary file: `remove_leftovers(folder)` deletes those (only when nothing is writing into the folder).
- **Idempotent uploads.** Every object written carries the SHA-256 of its content in its metadata
  (`x-amz-meta-sha256`); `upload_file` HEADs the key first and skips (returns False) when size and checksum
  already match. Locally the existing file's size and SHA-256 are compared.
- **Integrity.** A single PUT and every part carry `Content-MD5`, so a body corrupted on the way is refused by
  S3 / MinIO / Ceph (BadDigest) and sent again; the returned ETag is also compared with the MD5 (for servers
  that do not check, e.g. moto), a mismatch is re-sent and, if it persists, the damaged object is removed.
  Reads check the stored SHA-256 once the whole object was read; a ranged read (`open_read(uri, start=,
  end=)`: a local seek, an S3 Range GET) cannot, and its caller verifies what it reads (shard indexes).
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

Layout: `uri.py` (URI helpers: `is_s3_uri`, `parse_s3_uri`, `join`, `basename`), `base.py` (errors,
`ObjectInfo`, the `Storage` interface), `local.py` (local disk), `s3.py` (S3: client cache, multipart,
integrity checks), `retry.py` (what is retried, backoff), `s3_reader.py` (resuming streaming reads),
`redact.py` (credentials masked out of every message and log line: an endpoint URL's `user:password@`, secret
query values). This module picks the backend for a URI and offers one function per operation.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from clip.config import StorageConfig
from clip.storage.base import MIB, ObjectInfo, ObjectNotFound, Storage, StorageError
from clip.storage.local import LocalStorage, atomic_local_write, remove_unfinished_writes
from clip.storage.retry import backoff_delay, is_retryable
from clip.storage.s3 import S3_MAX_PARTS, S3_MIN_PART_BYTES, S3Storage, clear_client_cache
from clip.storage.uri import basename, is_s3_uri, join, parse_s3_uri, to_local_path

__all__ = [
    "MIB", "S3_MAX_PARTS", "S3_MIN_PART_BYTES",
    "LocalStorage", "ObjectInfo", "ObjectNotFound", "S3Storage", "Storage", "StorageError",
    "backoff_delay", "basename", "clear_client_cache", "delete", "download_file", "exists", "get_storage",
    "is_retryable", "is_s3_uri", "join", "list_objects", "open_read", "parse_s3_uri", "read_bytes",
    "remove_leftovers", "sha256", "upload_file", "write_bytes", "write_stream",
]  # fmt: skip

_LOCAL = LocalStorage()


def get_storage(uri: str, cfg: StorageConfig | None = None, *, storage_cfg: StorageConfig | None = None) -> Storage:
    """The backend for `uri`: S3Storage for s3://, LocalStorage for local paths. S3 clients are cached."""
    if not isinstance(uri, str | Path):
        raise StorageError(f"expected a path or s3:// URL, got {type(uri).__name__}")
    text = str(uri)
    if is_s3_uri(text):
        parse_s3_uri(text)  # refuse s3:// without a bucket here, with the URI named
        return S3Storage(cfg or storage_cfg)
    to_local_path(text)  # refuses other schemes
    return _LOCAL


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    return get_storage(uri, cfg).read_bytes(uri)


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    get_storage(uri, cfg).write_bytes(uri, data)


def write_stream(uri: str, fill: Callable[[BinaryIO], object], cfg: StorageConfig | None = None,
                 spool_dir: str | Path | None = None) -> int:
    """Write an object too big to hold in memory: `fill(handle)` writes it to a binary file; returns its size.

    Atomic like `write_bytes`. Local: a temporary file beside the final name, fsynced, then renamed. S3: the
    stream is spooled to a temporary local file (in `spool_dir`, default the system's temp folder; removed
    afterwards, also on failure) and uploaded in one PUT or multipart upload, which is atomic on S3."""
    if not is_s3_uri(str(uri)):
        final = to_local_path(str(uri))
        sizes: list[int] = []

        def fill_and_measure(handle: BinaryIO) -> None:
            fill(handle)
            sizes.append(handle.tell())

        try:
            atomic_local_write(final, fill_and_measure)
        except OSError as exc:
            raise StorageError(f"writing {uri} failed: {exc}") from exc
        return sizes[0]
    with tempfile.TemporaryDirectory(prefix="clip-spool-", dir=spool_dir) as folder:
        local = Path(folder, basename(str(uri)) or "object")
        with open(local, "wb") as handle:
            fill(handle)
        size = local.stat().st_size
        get_storage(uri, cfg).upload_file(local, uri)
    return size


def remove_leftovers(folder_uri: str) -> list[str]:
    """Delete what interrupted writes left directly in a local folder (their temporary files, never listed);
    returns their names. S3 has none to delete (an unfinished upload never becomes an object): []. Call it only
    when nothing is being written into the folder."""
    if is_s3_uri(str(folder_uri)):
        return []
    return remove_unfinished_writes(to_local_path(str(folder_uri)))


def upload_file(local_path: str | Path, uri: str, cfg: StorageConfig | None = None) -> bool:
    return get_storage(uri, cfg).upload_file(local_path, uri)


def download_file(uri: str, local_path: str | Path, cfg: StorageConfig | None = None) -> None:
    get_storage(uri, cfg).download_file(uri, local_path)


def open_read(uri: str, cfg: StorageConfig | None = None, *, start: int = 0, end: int | None = None) -> BinaryIO:
    """A streaming binary reader over a local file or an S3 object (use as a context manager), of its bytes
    `[start, end)` when given: locally a seek, on S3 an HTTP Range GET with the same retries and resumes as
    any read. Only a whole-object read is checked against the stored SHA-256."""
    return get_storage(uri, cfg).open_read(uri, start=start, end=end)


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    return get_storage(uri, cfg).exists(uri)


def list_objects(prefix_uri: str, cfg: StorageConfig | None = None) -> list[ObjectInfo]:
    return get_storage(prefix_uri, cfg).list(prefix_uri)


def delete(uri: str, cfg: StorageConfig | None = None) -> None:
    get_storage(uri, cfg).delete(uri)


def sha256(uri: str, cfg: StorageConfig | None = None) -> str | None:
    return get_storage(uri, cfg).sha256(uri)
