"""A byte-deterministic tar writer for webdataset shards.

Every header carries the same fixed metadata (mtime, mode, uid/gid, empty user and group names), members are
written in the order given, and the archive ends the way GNU tar and Python's tarfile end one (two zero blocks,
then zero padding up to a whole 10 KiB record). The same samples in the same order therefore give the same bytes,
and so the same SHA-256, on every run and machine. The exact size of an archive is known before it is written
(`member_bytes`, `archive_bytes`), which is how shards are cut at `max_shard_bytes`.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 20 blocks: archives are padded to a whole record
FIXED_MTIME = 0
FIXED_MODE = 0o644


def member_bytes(size: int) -> int:
    """Bytes one member of `size` data bytes takes: a header block plus the data padded to whole blocks."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def archive_bytes(content_bytes: int) -> int:
    """Total archive size for members totalling `content_bytes`: plus two end blocks, padded to a record."""
    return -(-(content_bytes + 2 * BLOCK) // RECORD) * RECORD


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = FIXED_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    # PAX only adds extended headers for names USTAR cannot hold; keys of this pipeline are short ASCII.
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class DeterministicTarWriter:
    """Write members to a binary stream with fixed header metadata, hashing everything written.

    with open(path, "wb") as f:
        writer = DeterministicTarWriter(f)
        writer.add("000000042.jpg", jpeg_bytes)
        writer.close()            # writes the end blocks; f stays open
        writer.sha256, writer.bytes_written
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.bytes_written = 0
        self.members = 0
        self._closed = False

    def _emit(self, data: bytes | memoryview) -> None:
        self._stream.write(data)
        self._hash.update(data)
        self.bytes_written += len(data)

    def add(self, name: str, data: bytes | memoryview) -> None:
        if self._closed:
            raise ValueError("tar writer is closed")
        header = _header(name, len(data))
        if len(header) != BLOCK:
            raise ValueError(f"tar member name {name!r} needs an extended header; use short ASCII keys")
        self._emit(header)
        self._emit(data)
        pad = -len(data) % BLOCK
        if pad:
            self._emit(b"\0" * pad)
        self.members += 1

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """One webdataset sample: members `{key}.{ext}` in sorted extension order."""
        for ext in sorted(members):
            self.add(f"{key}.{ext}", members[ext])

    def close(self) -> None:
        if self._closed:
            return
        end = archive_bytes(self.bytes_written) - self.bytes_written
        self._emit(b"\0" * end)
        self._closed = True

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
