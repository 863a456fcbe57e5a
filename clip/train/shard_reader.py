"""Verified reads of a data version's shards: every byte trained on is checked against the published version
before it is decoded.

    reader = ShardReader(manifest.shards, manifest.data_version, open_uri, StreamStats())
    for key, members in reader.read(shard, start, end): ...   # samples [start, end) of shard number `shard`
    reader.verify_open_shard()                                 # an unindexed shard in hand: read on and check

Guarantees:
* Shards with an index (clip/formats/shard_index.py; the manifest names it with its sha256, so the data version
  covers it): a stream reads only its piece of a shard, in one read of exactly the piece's bytes (a local seek,
  an S3 HTTP Range GET through clip.storage, retried like any read), from the first byte of its first sample to
  the last byte of its last. The index is read once per stream and checked against the manifest; each sample's
  bytes are checked against the index's sha256 before they are parsed. A mismatch (or a shard shorter than its
  index says) stops the run with a ShardIntegrityError naming the shard, the sample key and the version. The
  ranges tile the shard (the end blocks belong to its last sample), so the streams of an epoch together verify
  every byte of every shard they read to its end. Nothing is left to check at the end of an epoch: verifying
  what was read is enough, so `ShardReader.verify_open_shard` has nothing to do for these shards.
* Shards without an index (versions published before indexes): the whole shard is read from byte 0 and hashed
  as the tar reader consumes it, read on to EOF, and its size and sha256 compared with the manifest's
  (`VerifyingReader`); a mismatch stops the run with a ShardIntegrityError naming the shard and the version; the
  shard a stream is in the middle of at the end of an epoch is read on and verified before that epoch's last
  step is handed out (`ShardReader.verify_open_shard`, through clip/train/streams.py's RawStream).
Reads fail closed: a shard or index that cannot be opened or read (missing object, S3 failure after the storage
layer's retries, any OSError / clip.storage.StorageError) stops the run with a DataError naming it, rather than
training on a silent subset. Only damaged tar content of an unindexed shard (TruncatedTarError: the shard ends
early) and corrupt samples (undecodable images, bad captions) are skipped and counted.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from clip import storage
from clip.config import StorageConfig
from clip.formats.errors import FormatError
from clip.formats.manifest import ShardEntry
from clip.formats.shard_index import SampleSpan, ShardIndex, parse_shard_index
from clip.formats.tar import TruncatedTarError, iter_tar_samples, read_up_to
from clip.storage import StorageError


class DataError(RuntimeError):
    """The training data cannot be used (no samples, unreadable shards, ...); the message names the location."""


class ShardIntegrityError(DataError):
    """A shard's bytes differ from what its manifest (or its index) lists: the published data changed."""


def _version_note(data_version: str) -> str:
    return f" of data version {data_version[:12]}" if data_version else ""


class VerifyingReader:
    """Wraps a shard's byte stream: hashes and counts every byte as the tar reader consumes it (no second read).

    `finish()` reads on to EOF (the end-of-archive blocks and record padding after the tar's end marker, or the
    rest of a shard whose piece ended early), then compares the size and SHA-256 with the manifest entry and
    raises ShardIntegrityError naming the shard and the data version."""

    def __init__(self, raw: IO[bytes], entry: ShardEntry, data_version: str = "") -> None:
        self.raw, self.entry, self.data_version = raw, entry, data_version
        self.digest = hashlib.sha256()
        self.size = 0
        self.finished = False

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        while block := self.read(1 << 20):
            del block
        if not self.entry.sha256 and not self.entry.bytes:
            return  # a hand-made manifest without checksums: nothing to compare with
        size_ok = not self.entry.bytes or self.size == self.entry.bytes
        sha_ok = not self.entry.sha256 or self.digest.hexdigest() == self.entry.sha256
        if not (size_ok and sha_ok):
            raise ShardIntegrityError(
                f"shard {self.entry.uri}{_version_note(self.data_version)} does not match its manifest (read {self.size} bytes, sha256 "
                f"{self.digest.hexdigest()[:16]}...; manifest: {self.entry.bytes} bytes, sha256 "
                f"{self.entry.sha256[:16]}...): it was altered after publishing; stopping the run")

    def close(self) -> None:
        self.raw.close()


# How a stream reads objects: `opener(uri)` the whole object, `opener(uri, start=a, end=b)` its bytes [a, b).
Opener = Callable[..., IO[bytes]]


def open_uri(uri: str, storage_cfg: StorageConfig | None = None, *, start: int = 0,
             end: int | None = None) -> IO[bytes]:
    """A streaming binary reader of one shard or index (local file, or an S3 body through clip.storage), of
    bytes `[start, end)` when given (a local seek, an S3 Range GET)."""
    return storage.open_read(uri, storage_cfg, start=start, end=end)


@dataclass
class StreamStats:
    """What a stream skipped and counted (the loader reports them per step)."""

    corrupt_samples: int = 0
    truncated_shards: int = 0


def unreadable_shard(uri: str, exc: BaseException) -> DataError:
    """The error that stops a run whose shard cannot be opened or read (one line, naming the shard)."""
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    return DataError(f"shard {uri} cannot be read ({detail}); stopping rather than training on a subset of the data")


class ShardReader:
    """One stream's reads of the shards of one data version (`shards`: the manifest's entries), each verified;
    `stats` counts the unindexed shards that ended early."""

    def __init__(self, shards: tuple[ShardEntry, ...], data_version: str, opener: Opener,
                 stats: StreamStats) -> None:
        self.shards, self.data_version, self.opener, self.stats = shards, data_version, opener, stats
        self.open_reader: VerifyingReader | None = None  # the shard being read whole, when one is
        self._indexes: dict[int, ShardIndex] = {}  # shard -> its verified index, read once per stream

    def verify_open_shard(self) -> None:
        """Read the shard in hand to its end and verify it now (the loader calls this before handing out an
        epoch's last step, so no trained sample's shard goes unchecked when the run ends there). A shard read
        through its index needs nothing here: each sample was verified when it was read."""
        reader = self.open_reader
        if reader is not None:
            try:
                reader.finish()
            except (OSError, StorageError) as exc:
                raise unreadable_shard(reader.entry.uri, exc) from exc

    def shard_index(self, shard: int) -> ShardIndex:
        """The index of shard number `shard`, read once and checked: its SHA-256 against the manifest entry
        (ShardIntegrityError), its format, and that it describes that shard (size, sha256, sample count)."""
        cached = self._indexes.get(shard)
        if cached is not None:
            return cached
        info = self.shards[shard]
        try:
            f = self.opener(info.index_uri)
            try:
                raw = f.read()
            finally:
                f.close()
        except Exception as exc:  # missing or unreachable: fail closed, as for the shard itself
            raise unreadable_shard(info.index_uri, exc) from exc
        digest = hashlib.sha256(raw).hexdigest()
        if digest != info.index_sha256:
            raise ShardIntegrityError(
                f"index {info.index_uri} of shard {info.uri}{_version_note(self.data_version)} does not match "
                f"its manifest (sha256 {digest[:16]}...; manifest: {info.index_sha256[:16]}...): it was altered "
                "after publishing; stopping the run")
        try:
            index = parse_shard_index(raw, info.index_uri)
        except FormatError as exc:
            raise DataError(f"{exc}; stopping the run") from None
        if (index.bytes, index.sha256, len(index.samples)) != (info.bytes, info.sha256, info.samples):
            raise ShardIntegrityError(
                f"index {info.index_uri} describes {len(index.samples)} samples in {index.bytes} bytes, not shard "
                f"{info.uri}{_version_note(self.data_version)} ({info.samples} samples, {info.bytes} bytes); "
                "stopping the run")
        self._indexes[shard] = index
        return index

    def read(self, shard: int, start: int, end: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, members) of samples `[start, end)` of shard number `shard`, each verified (see the module doc)."""
        if self.shards[shard].index:
            return self._read_indexed(shard, start, end)
        return self._read_whole(shard, start, end)

    def _read_indexed(self, shard: int, start: int, end: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Samples `[start, end)` of a shard with an index: one read of exactly their bytes (a seek, an S3 Range
        GET), each sample's bytes checked against its index digest before it is parsed."""
        info = self.shards[shard]
        index = self.shard_index(shard)
        spans = index.samples[start:min(end, len(index.samples))]
        if not spans:
            return
        try:
            f = self.opener(info.uri, start=spans[0].start, end=spans[-1].end)
        except Exception as exc:  # missing or unreachable: fail closed, never train on a silent subset
            raise unreadable_shard(info.uri, exc) from exc
        try:
            for span in spans:
                try:
                    data = read_up_to(f, span.size)
                except (OSError, StorageError) as exc:  # the read itself failed: fail closed
                    raise unreadable_shard(info.uri, exc) from exc
                digest = hashlib.sha256(data).hexdigest()
                if len(data) != span.size or digest != span.sha256:
                    raise ShardIntegrityError(
                        f"sample {span.key} of shard {info.uri}{_version_note(self.data_version)} does not "
                        f"match the shard's index (bytes [{span.start}, {span.end}): read {len(data)}, sha256 "
                        f"{digest[:16]}...; index: {span.sha256[:16]}...): it was altered after publishing; "
                        "stopping the run")
                yield _parse_indexed_sample(data, span, info.uri)
        finally:
            f.close()

    def _read_whole(self, shard: int, start: int, end: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Samples `[start, end)` of a shard without an index: read from its first byte, hashed to EOF."""
        info = self.shards[shard]
        try:
            f = VerifyingReader(self.opener(info.uri), info, self.data_version)
        except Exception as exc:  # missing or unreachable: fail closed, never train on a silent subset
            raise unreadable_shard(info.uri, exc) from exc
        self.open_reader = f
        try:
            try:
                for index, sample in enumerate(iter_tar_samples(f)):
                    if index >= end:
                        break
                    if index >= start:
                        yield sample
            except TruncatedTarError:  # damaged tar content: the shard ends early, counted
                self.stats.truncated_shards += 1
            # Every byte of the object is hashed: a piece that starts mid-shard (a resume) has read the samples
            # before it anyway, and one that ends early (at most the last piece of a stream's range) reads on.
            f.finish()
        except (OSError, StorageError) as exc:  # the read itself failed: fail closed
            raise unreadable_shard(info.uri, exc) from exc
        finally:
            self.open_reader = None
            f.close()


def _parse_indexed_sample(data: bytes, span: SampleSpan, uri: str) -> tuple[str, dict[str, bytes]]:
    """The one sample a verified index range holds (its bytes are the published ones; anything else here is a
    publisher's fault, and stops the run)."""
    try:
        samples = list(iter_tar_samples(io.BytesIO(data)))
    except TruncatedTarError as exc:
        raise DataError(f"sample {span.key} of shard {uri}: its indexed bytes are not whole tar members ({exc}); "
                        "stopping the run") from None
    if len(samples) != 1 or samples[0][0] != span.key:
        raise DataError(f"sample {span.key} of shard {uri}: its indexed bytes hold samples "
                        f"{[key for key, _ in samples]}; stopping the run")
    return samples[0]  # type: ignore[return-value]
