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
is decoded, and reads fail closed (clip/train/shard_reader.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clip.config import StorageConfig
from clip.formats import manifest as formats_manifest
from clip.formats.errors import MissingInputError
from clip.formats.manifest import Manifest, ShardEntry
from clip.formats.tar import TruncatedTarError, iter_tar_samples
from clip.storage import StorageError
from clip.train.shard_reader import DataError, Opener, ShardReader, StreamStats, open_uri, unreadable_shard


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


class RawStream:
    """The pre-shuffle sample sequence of one stream in one epoch: infinite (passes / draws repeat)."""

    def __init__(self, plan: StreamPlan, epoch: int, stream: int, opener: Opener, stats: StreamStats) -> None:
        self.plan, self.epoch, self.stream = plan, epoch, stream
        self.reader = ShardReader(plan.shards, plan.data_version, opener, stats)

    @property
    def seekable(self) -> bool:
        """Every shard has an index: a shard then always yields exactly its manifest's sample count (a damaged
        one stops the run instead of ending early), so the raw number of every sample is known in advance and
        the stream can start at any of them without reading what comes before (`iter_from`)."""
        return all(shard.index for shard in self.plan.shards)

    def verify_open_shard(self) -> None:
        """Read the shard in hand to its end and verify it now (the loader calls this before handing out an
        epoch's last step; see ShardReader.verify_open_shard)."""
        self.reader.verify_open_shard()

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
                for key, members in self.reader.read(shard, first, math.inf):  # type: ignore[arg-type]
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
                    for key, members in self.reader.read(shard, start + skip, end):
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
