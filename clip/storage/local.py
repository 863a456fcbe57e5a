"""The local-disk backend and the atomic-write primitive the S3 backend also uses for downloads.

A write goes to `.<final name>.tmp-<random>` in the destination folder, is flushed and fsynced, renamed over
the final name, and then the folder is fsynced: a reader sees the old content or the new, never half of it.
`list()` never returns those temporary names.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from clip.storage.base import READ_CHUNK, ObjectInfo, ObjectNotFound, Storage, StorageError, check_range
from clip.storage.uri import join, to_local_path

TMP_MARK = ".tmp-"  # local temp files are ".<final name>.tmp-<hex>"; list() never returns them
_TEMP_HEX = 12
_OUR_TEMP_NAME = re.compile(r"\..+" + re.escape(TMP_MARK) + f"[0-9a-f]{{{_TEMP_HEX}}}")  # what _temp_name makes


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex SHA-256, size) of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(READ_CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:_TEMP_HEX]}")


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


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


def remove_unfinished_writes(folder: Path) -> list[str]:
    """Delete the temporary files that interrupted writes left directly in `folder` (not in its sub-folders):
    names exactly as `atomic_local_write` makes them, nothing else; returns them, sorted. Only for a folder no
    write is going into at the same time."""
    if not folder.is_dir():
        return []
    removed = []
    for leftover in folder.iterdir():
        if _OUR_TEMP_NAME.fullmatch(leftover.name) and leftover.is_file():
            leftover.unlink(missing_ok=True)
            removed.append(leftover.name)
    return sorted(removed)


def atomic_local_write(final: Path, fill: Callable[[BinaryIO], None]) -> None:
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


class _BoundedReader(io.RawIOBase):
    """Reads a file from its current position for at most `limit` bytes (None: to its end)."""

    def __init__(self, handle: BinaryIO, limit: int | None) -> None:
        super().__init__()
        self._handle, self._left = handle, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = len(buffer) if self._left is None else min(len(buffer), self._left)
        if want <= 0:
            return 0
        n = self._handle.readinto(memoryview(buffer)[:want])  # type: ignore[attr-defined]
        if self._left is not None:
            self._left -= n
        return n

    def readall(self) -> bytes:
        if self._left is None:
            return self._handle.read()
        data = self._handle.read(max(0, self._left))
        self._left -= len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()


class LocalStorage(Storage):
    """Local paths (optionally `file://`). Writes go to a temp file in the same folder, then rename."""

    def read_bytes(self, uri: str) -> bytes:
        path = to_local_path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"no such file: {uri}") from None
        except OSError as exc:
            raise StorageError(f"reading {uri} failed: {exc}") from exc

    def write_bytes(self, uri: str, data: bytes) -> None:
        try:
            atomic_local_write(to_local_path(uri), lambda handle: handle.write(data))
        except OSError as exc:
            raise StorageError(f"writing {uri} failed: {exc}") from exc

    def upload_file(self, local_path: str | Path, uri: str) -> bool:
        src, dst = Path(local_path), to_local_path(uri)
        if not src.is_file():
            raise ObjectNotFound(f"upload of {uri}: source file {src} does not exist")
        try:
            if dst.is_file():
                if src.resolve() == dst.resolve():
                    return False
                if dst.stat().st_size == src.stat().st_size and sha256_file(dst)[0] == sha256_file(src)[0]:
                    return False
            self._copy(src, dst)
        except OSError as exc:
            raise StorageError(f"copying {src} to {uri} failed: {exc}") from exc
        return True

    def download_file(self, uri: str, local_path: str | Path) -> None:
        src, dst = to_local_path(uri), Path(local_path)
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
                while block := handle.read(READ_CHUNK):
                    out.write(block)

        atomic_local_write(dst, fill)

    def open_read(self, uri: str, start: int = 0, end: int | None = None) -> BinaryIO:
        check_range(uri, start, end)
        try:
            handle = open(to_local_path(uri), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"no such file: {uri}") from None
        if start == 0 and end is None:
            return handle
        handle.seek(start)
        return _BoundedReader(handle, None if end is None else end - start)  # type: ignore[return-value]

    def exists(self, uri: str) -> bool:
        return to_local_path(uri).is_file()

    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        root = to_local_path(prefix_uri)
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
            to_local_path(uri).unlink(missing_ok=True)
        except IsADirectoryError:
            raise StorageError(f"delete {uri}: is a folder, not an object") from None

    def sha256(self, uri: str) -> str | None:
        path = to_local_path(uri)
        if not path.is_file():
            raise ObjectNotFound(f"no such file: {uri}")
        return sha256_file(path)[0]
