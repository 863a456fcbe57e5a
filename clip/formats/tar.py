"""webdataset tars: the one reader and the one writer of the project.

Reading (`iter_tar_members`, `iter_tar_samples`): a streaming parser over any binary file object (a local file,
an S3 body from `clip.storage.open_read`, a gzip stream), so nothing is downloaded first and nothing seeks.
Members are grouped into samples by the webdataset convention: the key is the path up to the first dot of the
base name, the extension the rest, lower-cased. Payloads of members a caller does not want are skipped, not
kept. A tar that ends inside a member, or whose header checksum is wrong, raises `TruncatedTarError` after every
complete sample before the damage has been yielded.

Writing (`DeterministicTarWriter`): every header carries the same fixed metadata (mtime 0, mode 0644, uid/gid 0,
empty owner names), members are written in the order given, and the archive ends the way GNU tar and Python's
tarfile end one (two zero blocks, then zero padding to a whole 10 KiB record). The same samples in the same order
therefore give the same bytes, and the same SHA-256, on every run and machine. The exact size of an archive is
known before it is written (`member_bytes`, `archive_bytes`), which is how shards are cut at a byte budget. The
writer can also record each sample's byte range and its SHA-256 as it writes (`index_samples=True`, then `spans`:
the ranges tile the archive, the end blocks belong to the last sample), which is what a shard index holds
(clip/formats/shard_index.py).

`index_tar_members` lists (name, data offset, size) of a local, seekable tar from its headers alone, so a
member can later be copied with one `pread`.
"""

from __future__ import annotations

import gzip
import hashlib
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from clip.formats.shard_index import SampleSpan

BLOCK = 512
RECORD = 20 * BLOCK  # archives are padded to a whole record
FIXED_MTIME = 0
FIXED_MODE = 0o644
_GZIP_MAGIC = b"\x1f\x8b"


class TruncatedTarError(Exception):
    """A tar ended in the middle of a member, or a header was corrupt."""

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member  # the member being read when the damage was found, when known


# ----------------------------------------------------------------------------------------------------------
# names


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the base name; extension = the rest, lower."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def is_sample_member(name: str) -> bool:
    """Members that belong to a sample: hidden files (`._x.jpg` from macOS archivers) and names without an
    extension are not."""
    base = posixpath.basename(name)
    return not base.startswith(".") and "." in base


# ----------------------------------------------------------------------------------------------------------
# reading


class _Prefixed:
    """A read-only stream with a few already-read bytes put back in front (gzip sniffing without seeking)."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head, self._rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(n)
        if n is None or n < 0:
            data, self._head = self._head + self._rest.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        if len(data) < n:
            data += self._rest.read(n - len(data))
        return data


def _maybe_gunzip(f: IO[bytes]) -> IO[bytes]:
    head = f.read(2)
    stream = _Prefixed(head, f)
    return gzip.GzipFile(fileobj=stream, mode="rb") if head == _GZIP_MAGIC else stream  # type: ignore[return-value]


def read_up_to(f: IO[bytes], n: int) -> bytes:
    """`n` bytes, or fewer only at the end of the stream (raw readers may return short reads)."""
    chunks, left = [], n
    while left > 0:
        data = f.read(left)
        if not data:
            break
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def _read_exact(f: IO[bytes], n: int, member: str | None = None) -> bytes:
    data = read_up_to(f, n)
    if len(data) < n:
        raise TruncatedTarError(f"tar ended {n - len(data)} bytes early", member)
    return data


def _skip(f: IO[bytes], n: int, member: str) -> None:
    while n > 0:
        data = f.read(min(n, 1 << 20))
        if not data:
            raise TruncatedTarError(f"tar ended {n} bytes early", member)
        n -= len(data)


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def iter_tar_members(f: IO[bytes], want: Callable[[str], bool] | None = None,
                     decompress: bool = False) -> Iterator[tuple[str, bytes | None]]:
    """(name, payload) of each regular file in a tar stream; payload is None for members `want` rejects (their
    bytes are skipped). `decompress`: accept a gzip-compressed tar too (detected from its first bytes).

    Raises TruncatedTarError on a short read or a header whose checksum is wrong, after yielding every member
    before it. EOF exactly at a member boundary is accepted (some writers omit the end blocks)."""
    if decompress:
        f = _maybe_gunzip(f)
    long_name: str | None = None
    while True:
        header = f.read(BLOCK)
        if header and len(header) < BLOCK:
            header += _read_exact(f, BLOCK - len(header))
        if not header or header.count(0) == BLOCK:
            return  # end of stream, or the end-of-archive marker
        stored = _octal(header[148:156])
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != computed:
            raise TruncatedTarError("tar header checksum mismatch", long_name)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = prefix + "/" + name
        size = _octal(header[124:136])
        typeflag = header[156:157]
        padded = -(-size // BLOCK) * BLOCK
        if typeflag in (b"L", b"x"):  # GNU long name / pax extended header for the next member
            payload = _read_exact(f, padded, long_name or name)[:size]
            if typeflag == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:  # "len key=value\n" records
                for record in payload.decode("utf-8", "replace").split("\n"):
                    if " path=" in record:
                        long_name = record.split(" path=", 1)[1]
            continue
        if long_name is not None:
            name, long_name = long_name, None
        if typeflag not in (b"0", b"\0", b"7"):  # directories, links, global headers: skip their data
            _skip(f, padded, name)
            continue
        if want is not None and not want(name):
            _skip(f, padded, name)
            yield name, None
            continue
        yield name, (_read_exact(f, padded, name)[:size] if padded else b"")


def iter_tar_samples(f: IO[bytes], want: Callable[[str], bool] | None = None,
                     decompress: bool = False) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {extension: payload}) per sample, grouping consecutive members with the same key.

    Members `want(extension)` rejects appear with payload None (the sample still shows they exist). Hidden
    members and names without an extension are ignored. A truncated tar raises TruncatedTarError after the last
    complete sample (a partly read sample is dropped)."""
    key: str | None = None
    members: dict[str, bytes | None] = {}
    member_want = None if want is None else (lambda name: want(split_member_name(name)[1]))
    try:
        for name, payload in iter_tar_members(f, member_want, decompress):
            if not is_sample_member(name):
                continue
            member_key, ext = split_member_name(name)
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            members[ext] = payload
    except TruncatedTarError as exc:
        # The sample in hand is complete when the cut fell inside the NEXT sample's first member.
        if key is not None and exc.member is not None and split_member_name(exc.member)[0] != key:
            yield key, members
        raise
    if key is not None:
        yield key, members


@dataclass(frozen=True)
class MemberLocation:
    name: str
    offset: int  # byte offset of the member's data in the tar
    size: int


def index_tar_members(path: str | Path) -> Iterator[tuple[MemberLocation, Callable[[], bytes]]]:
    """(location, read) of every regular file of a local tar, from the headers alone (data is skipped by seeking;
    `read()` returns a member's bytes when a caller needs one, e.g. a small JSON)."""
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue

            def read(member: tarfile.TarInfo = member) -> bytes:
                extracted = tar.extractfile(member)
                assert extracted is not None  # a regular file always has contents
                return extracted.read()

            yield MemberLocation(member.name, member.offset_data, member.size), read


# ----------------------------------------------------------------------------------------------------------
# writing


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
        writer.sha256, writer.bytes_written   # and writer.spans when built with index_samples=True
    """

    def __init__(self, stream: BinaryIO, index_samples: bool = False) -> None:
        self._stream = stream
        self._index_samples = index_samples  # record `spans` (one more SHA-256 pass over what is written)
        self._hash = hashlib.sha256()
        self.bytes_written = 0
        self.members = 0
        self._closed = False
        self.spans: list[SampleSpan] = []  # with index_samples: one per sample, in tar order; complete after close()
        self._span_key = ""
        self._span_start = 0
        self._span_hash: hashlib._Hash | None = None  # the sample being written

    def _emit(self, data: bytes | memoryview) -> None:
        self._stream.write(data)
        self._hash.update(data)
        self.bytes_written += len(data)
        if self._span_hash is not None:
            self._span_hash.update(data)

    def _end_span(self) -> None:
        if self._span_hash is not None:
            self.spans.append(SampleSpan(self._span_key, self._span_start, self.bytes_written,
                                         self._span_hash.hexdigest()))
            self._span_hash = None

    def add(self, name: str, data: bytes | memoryview) -> None:
        if self._closed:
            raise ValueError("tar writer is closed")
        key = split_member_name(name)[0]
        if self._index_samples and (self._span_hash is None or (is_sample_member(name) and key != self._span_key)):
            self._end_span()  # a new sample starts here (members the reader ignores stay with the one before)
            self._span_key, self._span_start, self._span_hash = key, self.bytes_written, hashlib.sha256()
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
        self._emit(b"\0" * end)  # the end blocks and padding: part of the last sample's range
        self._end_span()
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
