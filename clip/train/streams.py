"""The training data as logical streams: which samples each stream reads, in which order, from where.

Guarantees (why a resume is exact and the batches do not depend on the number of ranks):

* The data is cut into `L` **logical streams** (`train.streams`; by default a function of the batch size
  alone, clip/train/schedule.py `default_streams`).
  In sequential mode, epoch `e` orders the manifest's shards by a permutation drawn from `(seed, e)`, lays
  their samples end to end (N samples), and gives stream `s` the contiguous sample range
  `[s * N // L, (s + 1) * N // L)`: each stream reads one or a few shards (or part of one), so shards are split
  by node and by worker, and every stream has the same length within one sample. In resampled mode, stream `s`
  of epoch `e` draws whole shards with replacement from an RNG seeded by `(seed, e, s)`.
* A stream's raw samples are shuffled in consecutive **windows** of `shuffle_buffer` samples (a window never
  straddles two passes over the range), each window permuted by an RNG seeded by `(seed, e, s, window)`. Position
  `p` of the shuffled stream is therefore a pure function of `(seed, e, s, p)`, and the stream can be restarted at
  any `p`: when every shard has an index (versions published with shard indexes) by opening the shard piece
  holding the first sample of `p`'s window at that sample's first byte, and reading nothing before it; for older
  versions by re-reading the tar headers and payloads of the windows before it without decoding them.
* Image augmentation is seeded per sample from `(seed, e, s, p)` (`sample_seed`), so it too is independent of
  which process or loader worker decodes the sample.
* The resume state (`DataState`, `data_state` in checkpoints) is `{epoch, step_in_epoch, positions[L]}`: the
  position at which each stream continues. A stream that runs out (sequential epochs longer than its range, or
  samples lost to corruption) wraps to a new pass over its range, so every step always gets full chunks.

How the streams become per-step batches on each rank is clip/train/loader.py. Tars are read by clip.formats.tar
(`iter_tar_samples`), streamed through `clip.storage.open_read` (local files directly, `s3://` objects without a
download first), inside the one data version the run resolved at its start (`train.data`'s `latest.json`
pointer is read once, by rank 0). Every byte trained on is verified against the published version before it
is decoded:
* Shards with an index (clip/formats/shard_index.py; the manifest names it with its sha256, so the data version
  covers it): a stream reads only its piece of a shard, in one read of exactly the piece's bytes (a local seek,
  an S3 HTTP Range GET through clip.storage, retried like any read), from the first byte of its first sample to
  the last byte of its last. The index is read once per stream and checked against the manifest; each sample's
  bytes are checked against the index's sha256 before they are parsed. A mismatch (or a shard shorter than its
  index says) stops the run with a ShardIntegrityError naming the shard, the sample key and the version. The
  ranges tile the shard (the end blocks belong to its last sample), so the streams of an epoch together verify
  every byte of every shard they read to its end. Nothing is left to check at the end of an epoch: verifying
  what was read is enough, so `RawStream.verify_open_shard` has nothing to do for these shards.
* Shards without an index (versions published before indexes): the whole shard is read from byte 0 and hashed
  as the tar reader consumes it, read on to EOF, and its size and sha256 compared with the manifest's
  (`VerifyingReader`); a mismatch stops the run with a ShardIntegrityError naming the shard and the version; the
  shard a stream is in the middle of at the end of an epoch is read on and verified before that epoch's last
  step is handed out (`RawStream.verify_open_shard`).
Reads fail closed: a shard or index that cannot be opened or read (missing object, S3 failure after the storage
layer's retries, any OSError / clip.storage.StorageError) stops the run with a DataError naming it, rather than
training on a silent subset. Only damaged tar content of an unindexed shard (TruncatedTarError: the shard ends
early) and corrupt samples (undecodable images, bad captions) are skipped and counted.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from clip import storage
from clip.config import StorageConfig
from clip.formats import manifest as formats_manifest
from clip.formats.errors import FormatError, MissingInputError
from clip.formats.manifest import Manifest, ShardEntry
from clip.formats.shard_index import SampleSpan, ShardIndex, parse_shard_index
from clip.formats.tar import TruncatedTarError, iter_tar_samples, read_up_to
from clip.storage import StorageError


class DataError(RuntimeError):
    """The training data cannot be used (no samples, unreadable shards, ...); the message names the location."""


# How a stream reads objects: `opener(uri)` the whole object, `opener(uri, start=a, end=b)` its bytes [a, b).
Opener = Callable[..., IO[bytes]]


def open_uri(uri: str, storage_cfg: StorageConfig | None = None, *, start: int = 0,
             end: int | None = None) -> IO[bytes]:
    """A streaming binary reader of one shard or index (local file, or an S3 body through clip.storage), of
    bytes `[start, end)` when given (a local seek, an S3 Range GET)."""
    return storage.open_read(uri, storage_cfg, start=start, end=end)


def read_manifest(data_uri: str, storage_cfg: StorageConfig | None = None) -> Manifest:
    """The data version to train on: `train.data`'s manifest, through its `latest.json` pointer when it is a
    shard output root (clip.formats.manifest, checked). The manifest's shard URIs lie in that version's own
    folder, which no later publish rewrites."""
    try:
        return formats_manifest.read_manifest(data_uri, storage_cfg)
    except MissingInputError as exc:
        raise MissingInputError(f"{exc} (train.data)") from None


def resolve_data_location(data_uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """The version folder `train.data` stands for now (its pointer read once); see clip.formats.manifest."""
    try:
        return formats_manifest.resolve_data_location(data_uri, storage_cfg)
    except MissingInputError as exc:
        raise MissingInputError(f"{exc} (train.data)") from None


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


# ----------------------------------------------------------------------------------------------------------
# stream plan


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


@dataclass(frozen=True)
class StreamPlan:
    """What each logical stream reads in each epoch (pure function of the manifest, seed and stream count)."""

    shards: tuple[ShardEntry, ...]
    num_streams: int
    seed: int
    resampled: bool = False
    data_version: str = ""  # named in integrity errors

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def stream_length(self, stream: int) -> int:
        """Samples in one pass of a stream's range (sequential mode)."""
        n = self.total_samples
        return (stream + 1) * n // self.num_streams - stream * n // self.num_streams

    def shard_order(self, epoch: int) -> list[int]:
        return [int(i) for i in _rng(self.seed, epoch, 0x5EED).permutation(len(self.shards))]

    def pieces(self, epoch: int, stream: int) -> list[tuple[int, int, int]]:
        """Sequential mode: (shard index, first sample, end sample) pieces covering the stream's range."""
        n = self.total_samples
        lo, hi = stream * n // self.num_streams, (stream + 1) * n // self.num_streams
        out, offset = [], 0
        for index in self.shard_order(epoch):
            count = self.shards[index].samples
            start, end = max(lo, offset), min(hi, offset + count)
            if start < end:
                out.append((index, start - offset, end - offset))
            offset += count
        return out

    def resampled_shards(self, epoch: int, stream: int) -> Iterator[int]:
        rng = _rng(self.seed, epoch, stream, 0xD1CE)
        while True:
            yield int(rng.integers(len(self.shards)))


@dataclass
class StreamStats:
    corrupt_samples: int = 0
    truncated_shards: int = 0


def unreadable_shard(uri: str, exc: BaseException) -> DataError:
    """The error that stops a run whose shard cannot be opened or read (one line, naming the shard)."""
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    return DataError(f"shard {uri} cannot be read ({detail}); stopping rather than training on a subset of the data")


class RawStream:
    """The pre-shuffle sample sequence of one stream in one epoch: infinite (passes / draws repeat)."""

    def __init__(self, plan: StreamPlan, epoch: int, stream: int, opener: Opener, stats: StreamStats) -> None:
        self.plan, self.epoch, self.stream, self.opener, self.stats = plan, epoch, stream, opener, stats
        self.open_reader: VerifyingReader | None = None  # the shard being read whole, when one is
        self._indexes: dict[int, ShardIndex] = {}  # shard -> its verified index, read once per stream

    @property
    def seekable(self) -> bool:
        """Every shard has an index: a shard then always yields exactly its manifest's sample count (a damaged
        one stops the run instead of ending early), so the raw number of every sample is known in advance and
        the stream can start at any of them without reading what comes before (`iter_from`)."""
        return all(shard.index for shard in self.plan.shards)

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
        info = self.plan.shards[shard]
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
                f"index {info.index_uri} of shard {info.uri}{_version_note(self.plan.data_version)} does not match "
                f"its manifest (sha256 {digest[:16]}...; manifest: {info.index_sha256[:16]}...): it was altered "
                "after publishing; stopping the run")
        try:
            index = parse_shard_index(raw, info.index_uri)
        except FormatError as exc:
            raise DataError(f"{exc}; stopping the run") from None
        if (index.bytes, index.sha256, len(index.samples)) != (info.bytes, info.sha256, info.samples):
            raise ShardIntegrityError(
                f"index {info.index_uri} describes {len(index.samples)} samples in {index.bytes} bytes, not shard "
                f"{info.uri}{_version_note(self.plan.data_version)} ({info.samples} samples, {info.bytes} bytes); "
                "stopping the run")
        self._indexes[shard] = index
        return index

    def _read_piece(self, shard: int, start: int, end: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        if self.plan.shards[shard].index:
            return self._read_indexed(shard, start, end)
        return self._read_whole(shard, start, end)

    def _read_indexed(self, shard: int, start: int, end: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Samples `[start, end)` of a shard with an index: one read of exactly their bytes (a seek, an S3 Range
        GET), each sample's bytes checked against its index digest before it is parsed."""
        info = self.plan.shards[shard]
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
                        f"sample {span.key} of shard {info.uri}{_version_note(self.plan.data_version)} does not "
                        f"match the shard's index (bytes [{span.start}, {span.end}): read {len(data)}, sha256 "
                        f"{digest[:16]}...; index: {span.sha256[:16]}...): it was altered after publishing; "
                        "stopping the run")
                yield _parse_indexed_sample(data, span, info.uri)
        finally:
            f.close()

    def _read_whole(self, shard: int, start: int, end: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Samples `[start, end)` of a shard without an index: read from its first byte, hashed to EOF."""
        info = self.plan.shards[shard]
        try:
            f = VerifyingReader(self.opener(info.uri), info, self.plan.data_version)
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

    def __iter__(self) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(pass index, key, members); resampled streams are one endless pass."""
        return self.iter_from(0)

    def iter_from(self, first: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(pass index, key, members) from raw sample number `first` on (counted over passes / draws). A start
        past 0 needs `seekable`: pieces and draws before it are skipped unread, and the piece holding it is
        opened at that sample's first byte."""
        if first and not self.seekable:
            raise ValueError(f"stream {self.stream}: a start at raw sample {first} needs every shard's index")
        if self.plan.resampled:
            empty_draws = 0
            for shard in self.plan.resampled_shards(self.epoch, self.stream):
                count = self.plan.shards[shard].samples
                if first >= count:  # a whole draw before the start: skipped unread
                    first -= count
                    continue
                got = 0
                for key, members in self._read_piece(shard, first, math.inf):  # type: ignore[arg-type]
                    got += 1
                    yield 0, key, members
                first = 0
                empty_draws = 0 if got else empty_draws + 1
                if empty_draws > 10 * len(self.plan.shards) + 10:
                    raise DataError("no readable samples in any shard (resampled stream)")
        else:
            pieces = self.plan.pieces(self.epoch, self.stream)
            if not pieces:
                raise DataError(
                    f"stream {self.stream} has no samples: {self.plan.total_samples} samples for "
                    f"{self.plan.num_streams} streams"
                )
            first_pass, skip = divmod(first, self.plan.stream_length(self.stream))
            for pass_index in itertools.count(first_pass):
                got = 0
                for shard, start, end in pieces:
                    if skip >= end - start:  # a whole piece before the start: skipped unread
                        skip -= end - start
                        continue
                    for key, members in self._read_piece(shard, start + skip, end):
                        got += 1
                        yield pass_index, key, members
                    skip = 0
                if not got:
                    raise DataError(f"stream {self.stream}: none of its shards has a readable sample")

    def window_start(self, position: int, window: int) -> tuple[int, int]:
        """(first position, window number) of the shuffle window holding `position` (`seekable` streams: every
        pass has exactly `stream_length` samples, cut into windows of `window` that never straddle passes)."""
        if self.plan.resampled:
            number = position // window
            return number * window, number
        length = self.plan.stream_length(self.stream)
        pass_index, offset = divmod(position, length)
        number = offset // window
        return pass_index * length + number * window, pass_index * -(-length // window) + number


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


def shuffled_stream(raw: RawStream, window: int, start: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(position, key, members) from position `start` on. The raw sequence is cut into windows of `window`
    samples that never straddle two passes over the stream's range (so one epoch's positions
    `[0, stream_length)` hold each sample of the range exactly once); window `i` is permuted by an RNG seeded by
    (seed, epoch, stream, i). A seekable stream (every shard indexed) starts reading at the first sample of the
    window holding `start`; otherwise the windows before it are read (tar bytes) but never decoded."""
    window = max(1, window)
    position = window_index = 0
    if start and raw.seekable:  # start reading at the first sample of the window holding `start`
        position, window_index = raw.window_start(start, window)
    iterator = raw.iter_from(position)  # positions count raw samples: the window's first is raw sample `position`
    pending: tuple[int, str, dict[str, bytes]] | None = None
    while True:
        buffer: list[tuple[str, dict[str, bytes]]] = []
        current_pass: int | None = None
        if pending is not None:
            current_pass, buffer = pending[0], [(pending[1], pending[2])]
            pending = None
        while len(buffer) < window:
            pass_index, key, members = next(iterator)
            if current_pass is None:
                current_pass = pass_index
            if pass_index != current_pass:
                pending = (pass_index, key, members)
                break
            buffer.append((key, members))
        if position + len(buffer) > start:
            order = _rng(raw.plan.seed, raw.epoch, raw.stream, window_index, 0x5A5A).permutation(len(buffer))
            for offset, source in enumerate(order):
                if position + offset >= start:
                    key, members = buffer[source]
                    yield position + offset, key, members
        position += len(buffer)
        window_index += 1


def sample_seed(seed: int, epoch: int, stream: int, position: int) -> int:
    """Per-sample augmentation seed: independent of which process or worker decodes the sample."""
    return int(_rng(seed, epoch, stream, position, 0xA06).integers(2**62))


@dataclass
class DataState:
    """Where the stream continues: the checkpoint's `data_state` (plain ints, loadable with weights_only)."""

    epoch: int = 0
    step_in_epoch: int = 0
    positions: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "positions": list(self.positions)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, num_streams: int) -> DataState:
        if not data:
            return cls(positions=[0] * num_streams)
        positions = [int(p) for p in data.get("positions", [])]
        if len(positions) != num_streams:
            raise DataError(
                f"checkpoint data_state has {len(positions)} streams but this run uses {num_streams} "
                "(train.streams must stay the same across a resume)"
            )
        return cls(epoch=int(data["epoch"]), step_in_epoch=int(data["step_in_epoch"]), positions=positions)


def iter_captions(manifest: Manifest, storage_cfg: StorageConfig | None = None,
                  limit: int | None = None) -> Iterator[str]:
    """Every `.txt` member of the manifest's shards, in manifest order (for training the tokenizer)."""
    count = 0
    for shard in manifest.shards:
        try:
            with open_uri(shard.uri, storage_cfg) as f:  # tokenizer captions: read, not verified (training is)
                for _key, members in iter_tar_samples(f):
                    text = members.get("txt")
                    if text is None:
                        continue
                    try:
                        yield text.decode("utf-8").strip()
                    except UnicodeDecodeError:
                        continue
                    count += 1
                    if limit is not None and count >= limit:
                        return
        except TruncatedTarError:  # damaged tar content: its complete samples were read
            continue
        except (OSError, StorageError) as exc:  # missing or unreachable: fail closed
            raise unreadable_shard(shard.uri, exc) from exc
