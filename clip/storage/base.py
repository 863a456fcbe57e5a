"""What every storage backend shares: the error types, `ObjectInfo`, and the `Storage` interface.

Backends live next to this module (`local.py`, `s3.py`); `clip.storage` picks one per URI.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from clip.storage.redact import redact

MIB = 1024 * 1024
READ_CHUNK = 1 * MIB  # block size for copying, hashing and streaming reads
SHA_META = "sha256"  # user metadata holding an object's SHA-256 on S3 (the x-amz-meta-sha256 header)


class StorageError(RuntimeError):
    """A storage operation that failed; the message names the URI (never credentials: it is redacted here, whatever
    text from boto3, the OS or a caller went into it)."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(redact(str(message)), *args)


def check_range(uri: str, start: int, end: int | None) -> None:
    """Refuse a byte range that is not `0 <= start <= end`, naming the object."""
    if start < 0 or (end is not None and end < start):
        raise StorageError(f"reading {uri}: invalid byte range [{start}, {end})")


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object (or its bucket) does not exist. Also a FileNotFoundError, so `except FileNotFoundError` works."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its full URI, its size in bytes and, when cheaply known, its SHA-256 (hex)."""

    uri: str
    size: int
    sha256: str | None = None


class Storage(ABC):
    """Objects by URI. Every write is atomic; see the `clip.storage` docstring for the guarantees."""

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
    def open_read(self, uri: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """A streaming binary reader (use as a context manager) of bytes `[start, end)` (`end` None: to the
        object's end; an `end` past it is clipped). Only the whole object (`start` 0, `end` None) is checked
        against a stored SHA-256; a ranged reader's caller verifies what it reads."""

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
