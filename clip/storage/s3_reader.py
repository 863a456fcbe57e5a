"""Streaming reads of one S3 object that survive dropped connections and check the stored SHA-256.

Shards are hundreds of MiB read over minutes; a connection reset in the middle must not restart the shard
(or worse, end it silently). The reader resumes with a ranged GET pinned to the object's ETag. A reader of a
byte range (`start`, `end`: one sample range of a shard, clip/formats/shard_index.py) asks for exactly those
bytes with `Range: bytes=start-(end-1)` and resumes the same way; only a whole-object read can be checked
against the stored SHA-256 (the caller of a ranged read verifies what it reads).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import time
from typing import TYPE_CHECKING, Any

from clip.storage.base import READ_CHUNK, SHA_META, StorageError
from clip.storage.retry import backoff_delay, describe, is_retryable

if TYPE_CHECKING:
    from clip.storage.s3 import S3Storage

# One logger for the whole package, as before the split: log filters and formats keyed on it keep working.
log = logging.getLogger("clip.storage")


class S3ResumingReader(io.RawIOBase):
    """A sequential reader over one S3 object that survives dropped connections.

    On a read error it re-opens the object with `Range: bytes=<offset>-` and `If-Match: <etag>` (so a replaced
    object is refused rather than spliced) and goes on; the SHA-256 is checked when the end is reached.
    """

    def __init__(self, storage: S3Storage, uri: str, bucket: str, key: str, start: int = 0,
                 end: int | None = None) -> None:
        super().__init__()
        self._storage, self._uri, self._bucket, self._key = storage, uri, bucket, key
        self._pos = start  # offsets are the object's
        self._end = end
        self._etag: str | None = None
        self._hash = hashlib.sha256()
        self._verified = False
        response = self._storage._attempt("GET", uri, lambda: self._open(start))
        self._stop = start + int(response["ContentLength"])  # where this read stops (end clipped to the object)
        whole = start == 0 and end is None
        self._expected_sha = (response.get("Metadata") or {}).get(SHA_META) if whole else None

    def _open(self, offset: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if offset or self._end is not None:
            kwargs["Range"] = f"bytes={offset}-{'' if self._end is None else self._end - 1}"
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
        chunks, buffer = [], bytearray(READ_CHUNK)
        while n := self.readinto(buffer):
            chunks.append(bytes(buffer[:n]))
        return b"".join(chunks)

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._stop:
            self._check_sha()
            return 0
        want = min(len(buffer), self._stop - self._pos)
        attempts = self._storage.cfg.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                data = self._body.read(want)
                if not data:  # the server ended the body early
                    raise http.client.IncompleteRead(b"", self._stop - self._pos)
                break
            except Exception as exc:
                if not is_retryable(exc) or attempt >= attempts:
                    raise StorageError(f"reading {self._uri} at byte {self._pos} failed after {attempt} "
                                       f"attempt(s): {describe(exc)}") from exc
                delay = backoff_delay(attempt, self._storage.cfg.backoff_base_s)
                log.warning("reading %s at byte %d failed (%s); resuming in %.2fs",
                            self._uri, self._pos, describe(exc), delay)
                time.sleep(delay)
                self._close_body()
                self._storage._attempt("GET (resume)", self._uri, lambda: self._open(self._pos))
        n = len(data)
        buffer[:n] = data
        self._hash.update(data)
        self._pos += n
        if self._pos >= self._stop:
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
