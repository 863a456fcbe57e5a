"""The training data stream: webdataset shards listed in a manifest, read as deterministic, resumable streams.

Design (why it is exact on resume and independent of the number of ranks):

* The data is cut into `L` **logical streams** (`train.streams`, default `world_size * max(1, num_workers)`).
  In sequential mode, epoch `e` orders the manifest's shards by a permutation drawn from `(seed, e)`, lays
  their samples end to end (N samples), and gives stream `s` the contiguous sample range
  `[s * N // L, (s + 1) * N // L)`: each stream reads one or a few shards (or part of one), so shards are split
  by node and by worker, and every stream has the same length within one sample. In resampled mode, stream `s`
  of epoch `e` draws whole shards with replacement from an RNG seeded by `(seed, e, s)`.
* A stream's raw samples are shuffled in consecutive **windows** of `shuffle_buffer` samples (a window never
  straddles two passes over the range), each window permuted by an RNG seeded by `(seed, e, s, window)`. Position `p` of the shuffled stream is therefore a pure
  function of `(seed, e, s, p)`, and the stream can be restarted at any `p` by re-reading the tar headers and
  payloads of the windows before it without decoding them.
* Each step, every stream contributes its next `chunk = batch_size // L` *valid* samples (a corrupt sample is
  skipped and counted; the position still advances). The global batch is the concatenation of the streams'
  chunks in stream order; rank `r` owns streams `[r * L/W, (r + 1) * L/W)`, so its part of the global batch is
  the same whatever `W` is (1 process with 2 streams == 2 processes with 1 stream each).
* Inside a rank, DataLoader worker `w` serves the rank's streams `j` with `j % workers == w` and yields ONE item
  per step (its streams' chunks, decoded, transformed and tokenized). torch's DataLoader returns the items of an
  IterableDataset round-robin over workers in worker order, so the main process receives exactly `workers`
  items per step, in a fixed order, and re-orders the chunks by stream id.
* Image augmentation is seeded per sample from `(seed, e, s, p)`, so it too is independent of worker placement.
* The resume state (`data_state` in checkpoints) is `{epoch, step_in_epoch, positions[L]}`: the position at
  which each stream continues. A stream that runs out (sequential epochs longer than its range, or samples lost
  to corruption) wraps to a new pass over its range, so every step always gets full chunks on every rank.

Tar reading is our own (`iter_tar_samples`): local files are opened directly, `s3://` objects are streamed
through `clip.storage.open_read` (no download first). A truncated tar ends its shard early, counted.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import posixpath
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip.config import StorageConfig

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "clip-pipeline/shards/v1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TAR_BLOCK = 512


class DataError(RuntimeError):
    """The training data cannot be used (missing manifest, no samples, ...); the message names the location."""


class TruncatedTarError(Exception):
    """A tar ended in the middle of a member (or a header was corrupt)."""


# ----------------------------------------------------------------------------------------------------------
# locations


def join_uri(base: str, name: str) -> str:
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return posixpath.join(base, name) if base else name


def open_uri(uri: str, storage_cfg: StorageConfig | None = None) -> IO[bytes]:
    """A streaming binary reader: local paths directly, `s3://` through the storage layer."""
    if "://" not in uri:
        return open(uri, "rb")  # noqa: SIM115 - the caller closes it
    from clip import storage

    return storage.open_read(uri, storage_cfg)


def read_uri_bytes(uri: str, storage_cfg: StorageConfig | None = None) -> bytes:
    with open_uri(uri, storage_cfg) as f:
        return f.read()


@dataclass(frozen=True)
class ShardInfo:
    name: str
    uri: str
    samples: int


@dataclass(frozen=True)
class Manifest:
    uri: str
    data_version: str
    total_samples: int
    shards: tuple[ShardInfo, ...]


def read_manifest(data_uri: str, storage_cfg: StorageConfig | None = None) -> Manifest:
    """Read `manifest.json` from the shard location (docs/formats.md); shard names are relative to it."""
    uri = data_uri if data_uri.endswith(".json") else join_uri(data_uri, MANIFEST_NAME)
    base = uri.rsplit("/", 1)[0] if "/" in uri else ""
    try:
        raw = read_uri_bytes(uri, storage_cfg)
    except FileNotFoundError:  # clip.storage.ObjectNotFound is one too
        raise DataError(f"no shard manifest at {uri} (train.data); run the shard stage first") from None
    try:
        doc = json.loads(raw)
        shards = tuple(
            ShardInfo(name=s["name"], uri=join_uri(base, s["name"]), samples=int(s["samples"])) for s in doc["shards"]
        )
        manifest = Manifest(uri=uri, data_version=str(doc.get("data_version", "")),
                            total_samples=int(doc.get("total_samples", sum(s.samples for s in shards))), shards=shards)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{uri}: not a valid shard manifest ({exc!r})") from None
    if doc.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
        raise DataError(f"{uri}: unknown manifest format {doc.get('format')!r}; expected {MANIFEST_FORMAT}")
    if not shards or sum(s.samples for s in shards) == 0:
        raise DataError(f"{uri}: the manifest lists no samples")
    return manifest


# ----------------------------------------------------------------------------------------------------------
# tar streaming


def _read_exact(f: IO[bytes], n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        data = f.read(left)
        if not data:
            raise TruncatedTarError(f"tar ended {left} bytes early")
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def iter_tar_members(f: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of each regular file in a tar stream. Raises TruncatedTarError on a short read or a
    header whose checksum is wrong (after yielding every member before it)."""
    long_name: str | None = None
    while True:
        header = f.read(TAR_BLOCK)
        if len(header) < TAR_BLOCK:
            header += _read_exact(f, TAR_BLOCK - len(header)) if header else b""
        if not header:
            return  # EOF exactly at a member boundary: accept (some writers omit the end blocks)
        if header.count(0) == TAR_BLOCK:
            return  # end-of-archive marker
        stored = _octal(header[148:156])
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != computed:
            raise TruncatedTarError("tar header checksum mismatch")
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = prefix + "/" + name
        size = _octal(header[124:136])
        typeflag = header[156:157]
        padded = -(-size // TAR_BLOCK) * TAR_BLOCK
        try:
            payload = _read_exact(f, padded)[:size] if padded else b""
        except TruncatedTarError as exc:
            exc.member = long_name or name  # type: ignore[attr-defined]  # lets the caller close the group before
            raise
        if typeflag == b"L":  # GNU long name for the next member
            long_name = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if typeflag == b"x":  # pax extended header: "len key=value\n" records
            for record in payload.decode("utf-8", "replace").split("\n"):
                if " path=" in record:
                    long_name = record.split(" path=", 1)[1]
            continue
        if typeflag not in (b"0", b"\0", b"7"):
            long_name = None
            continue  # directories, links, global headers
        if long_name is not None:
            name, long_name = long_name, None
        yield name, payload


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename; extension = the rest, lower."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def iter_tar_samples(f: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members with the same key into samples. A truncated tar raises TruncatedTarError
    after the last complete sample (the partly read one is dropped)."""
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        for name, payload in iter_tar_members(f):
            member_key, ext = split_member_name(name)
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            members[ext] = payload
    except TruncatedTarError as exc:
        # The group in hand is complete when the cut fell inside the NEXT sample's first member.
        cut_in = getattr(exc, "member", None)
        if key is not None and cut_in is not None and split_member_name(cut_in)[0] != key:
            yield key, members
        raise
    if key is not None:
        yield key, members


# ----------------------------------------------------------------------------------------------------------
# stream plan


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


@dataclass(frozen=True)
class StreamPlan:
    """What each logical stream reads in each epoch (pure function of the manifest, seed and stream count)."""

    shards: tuple[ShardInfo, ...]
    num_streams: int
    seed: int
    resampled: bool = False

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


class RawStream:
    """The pre-shuffle sample sequence of one stream in one epoch: infinite (passes / draws repeat)."""

    def __init__(self, plan: StreamPlan, epoch: int, stream: int, opener: Callable[[str], IO[bytes]],
                 stats: StreamStats) -> None:
        self.plan, self.epoch, self.stream, self.opener, self.stats = plan, epoch, stream, opener, stats

    def _read_piece(self, shard: int, start: int, end: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        info = self.plan.shards[shard]
        try:
            f = self.opener(info.uri)
        except Exception:  # a missing or unreadable shard: counted like a truncated one, never fatal
            self.stats.truncated_shards += 1
            return
        try:
            for index, sample in enumerate(iter_tar_samples(f)):
                if index >= end:
                    return
                if index >= start:
                    yield sample
        except TruncatedTarError:
            self.stats.truncated_shards += 1
        except OSError:
            self.stats.truncated_shards += 1
        finally:
            f.close()

    def __iter__(self) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(pass index, key, members); resampled streams are one endless pass."""
        if self.plan.resampled:
            empty_draws = 0
            for shard in self.plan.resampled_shards(self.epoch, self.stream):
                got = 0
                for key, members in self._read_piece(shard, 0, math.inf):  # type: ignore[arg-type]
                    got += 1
                    yield 0, key, members
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
            for pass_index in itertools.count():
                got = 0
                for piece in pieces:
                    for key, members in self._read_piece(*piece):
                        got += 1
                        yield pass_index, key, members
                if not got:
                    raise DataError(f"stream {self.stream}: none of its shards has a readable sample")


def shuffled_stream(raw: RawStream, window: int, start: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(position, key, members) from position `start` on. The raw sequence is cut into windows of `window`
    samples that never straddle two passes over the stream's range (so one epoch's positions
    `[0, stream_length)` hold each sample of the range exactly once); window `i` is permuted by an RNG seeded by
    (seed, epoch, stream, i). Windows before `start` are read (tar bytes) but never decoded."""
    window = max(1, window)
    iterator = iter(raw)
    pending: tuple[int, str, dict[str, bytes]] | None = None
    position = 0
    window_index = 0
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


# ----------------------------------------------------------------------------------------------------------
# decoding


def sample_seed(seed: int, epoch: int, stream: int, position: int) -> int:
    """Per-sample augmentation seed: independent of which process or worker decodes the sample."""
    return int(_rng(seed, epoch, stream, position, 0xA06).integers(2**62))


def decode_sample(members: dict[str, bytes], transform: Callable[[Any], torch.Tensor] | None,
                  seed: int) -> tuple[torch.Tensor | bytes, str] | None:
    """(image tensor or raw JPEG bytes when transform is None, caption) or None when the sample is unusable."""
    image_bytes = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    text = members.get("txt")
    if image_bytes is None or text is None:
        return None
    try:
        caption = text.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if transform is None:
        return image_bytes, caption
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            img.load()
            rgb = img.convert("RGB")
        torch.manual_seed(seed)
        return transform(rgb), caption
    except Exception:  # any decode failure (bad JPEG, truncated data, decompression bomb) = corrupt sample
        return None


# ----------------------------------------------------------------------------------------------------------
# the dataset


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


@dataclass
class StreamConfig:
    plan: StreamPlan
    chunk: int  # samples per stream per step
    steps_per_epoch: int
    epochs: int
    shuffle_buffer: int
    image_size: int
    tokenizer_json: str
    rank_streams: tuple[int, ...]  # the logical streams this rank reads, ascending
    start: DataState
    gpu_decode: bool = False
    storage_cfg: dict[str, Any] | None = None


class StepChunks(IterableDataset):
    """Yields, for each step from `start`, one dict per DataLoader worker:
    `{"epoch", "step", "streams": [ids], "images": [n, 3, S, S] float | list of JPEG uint8 tensors,
    "tokens": [n, ctx] long, "keys": [n], "positions": [ids' end positions], "corrupt", "truncated"}`."""

    def __init__(self, cfg: StreamConfig, num_workers: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_workers = max(1, num_workers)

    def _opener(self) -> Callable[[str], IO[bytes]]:
        storage_cfg = StorageConfig(**self.cfg.storage_cfg) if self.cfg.storage_cfg else None
        return lambda uri: open_uri(uri, storage_cfg)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        my_streams = [s for j, s in enumerate(cfg.rank_streams) if j % workers == worker]
        if not my_streams:
            return
        torch.set_num_threads(1)  # decoding workers: one thread each, the main process keeps the rest
        from clip.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_json(cfg.tokenizer_json)
        transform = None
        if not cfg.gpu_decode:
            from clip.transforms import train_transform

            transform = train_transform(cfg.image_size)
        opener = self._opener()
        for epoch in range(cfg.start.epoch, cfg.epochs):
            first_step = cfg.start.step_in_epoch if epoch == cfg.start.epoch else 0
            stats = StreamStats()
            iterators = {}
            for s in my_streams:
                start = cfg.start.positions[s] if epoch == cfg.start.epoch else 0
                raw = RawStream(cfg.plan, epoch, s, opener, stats)
                iterators[s] = shuffled_stream(raw, cfg.shuffle_buffer, start)
            for step in range(first_step, cfg.steps_per_epoch):
                images: list[Any] = []
                captions: list[str] = []
                keys: list[str] = []
                positions: list[int] = []
                corrupt_before, truncated_before = stats.corrupt_samples, stats.truncated_shards
                for s in my_streams:
                    got = 0
                    position = -1
                    unusable_in_a_row = 0
                    while got < cfg.chunk:
                        position, key, members = next(iterators[s])
                        decoded = decode_sample(members, transform, sample_seed(cfg.plan.seed, epoch, s, position))
                        if decoded is None:
                            stats.corrupt_samples += 1
                            unusable_in_a_row += 1
                            if unusable_in_a_row > cfg.plan.total_samples:  # a whole pass: it would spin forever
                                raise DataError(
                                    f"stream {s}: {unusable_in_a_row} samples in a row could not be used (each needs "
                                    f"a decodable image {'/'.join(IMAGE_EXTENSIONS)} and a UTF-8 txt caption)"
                                )
                            continue
                        unusable_in_a_row = 0
                        image, caption = decoded
                        if transform is None:
                            image = torch.frombuffer(bytearray(image), dtype=torch.uint8)
                        images.append(image)
                        captions.append(caption)
                        keys.append(key)
                        got += 1
                    positions.append(position + 1)
                yield {
                    "epoch": epoch,
                    "step": step,
                    "streams": list(my_streams),
                    "images": images if transform is None else torch.stack(images),
                    "tokens": tokenizer(captions),
                    "keys": keys,
                    "positions": positions,
                    "corrupt": stats.corrupt_samples - corrupt_before,
                    "truncated": stats.truncated_shards - truncated_before,
                }


@dataclass
class Batch:
    epoch: int
    step_in_epoch: int
    images: Any  # [n, 3, S, S] float tensor, or a list of JPEG byte tensors with gpu_decode
    tokens: torch.Tensor  # [n, ctx]
    keys: list[str]
    positions: dict[int, int]  # stream -> position after this batch
    corrupt: int
    truncated: int


def _forget_inherited_exit_hooks(worker_id: int) -> None:
    """Drop the thread-exit hooks a forked worker inherits from its parent.

    Hooks registered with `threading._register_atexit` (Prefect's log and event workers when training runs inside a
    flow, the parent's thread pools) belong to threads that do not exist in the fork; run at the worker's exit they
    fail and the worker exits with status 1, which the DataLoader reports as a crash. Python has no public way to
    unregister them, hence the private list.
    """
    hooks = getattr(threading, "_threading_atexits", None)
    if isinstance(hooks, list):
        hooks.clear()


def _collate_none(item: Any) -> Any:
    return item


class RankLoader:
    """Iterates `Batch`es of this rank's part of the global batch, in the order described in the module doc."""

    def __init__(self, cfg: StreamConfig, num_workers: int, pin_memory: bool = False) -> None:
        self.cfg = cfg
        self.workers = min(num_workers, len(cfg.rank_streams))
        self.dataset = StepChunks(cfg, self.workers)
        self.loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.workers, collate_fn=_collate_none,
            pin_memory=pin_memory, prefetch_factor=4 if self.workers else None,
            persistent_workers=False, multiprocessing_context="fork" if self.workers else None,
            worker_init_fn=_forget_inherited_exit_hooks if self.workers else None,
        )

    def __iter__(self) -> Iterator[Batch]:
        return self.start()

    def start(self) -> Iterator[Batch]:
        """Start the workers now (fork before the caller starts threads, e.g. a progress bar) and return the
        batch iterator."""
        return self._batches(iter(self.loader))

    def _batches(self, iterator: Iterator[dict[str, Any]]) -> Iterator[Batch]:
        try:
            yield from self._assemble(iterator)
        finally:
            # Stop the workers now, on every exit (end of data, break, an error in the training loop), rather
            # than whenever the garbage collector gets to the iterator.
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _assemble(self, iterator: Iterator[dict[str, Any]]) -> Iterator[Batch]:
        items_per_step = max(1, self.workers)
        while True:
            items = []
            for _ in range(items_per_step):
                try:
                    items.append(next(iterator))
                except StopIteration:
                    if items:
                        raise DataError("data loader workers ended out of step") from None
                    return
            epochs_steps = {(item["epoch"], item["step"]) for item in items}
            if len(epochs_steps) != 1:
                raise DataError(f"data loader items of different steps arrived together: {sorted(epochs_steps)}")
            # Re-order the chunks by logical stream id: rank batch = concat of its streams' chunks, ascending.
            chunk = self.cfg.chunk
            pieces: dict[int, tuple[Any, torch.Tensor, list[str]]] = {}
            positions: dict[int, int] = {}
            for item in items:
                for j, s in enumerate(item["streams"]):
                    sl = slice(j * chunk, (j + 1) * chunk)
                    pieces[s] = (item["images"][sl], item["tokens"][sl], item["keys"][sl])
                    positions[s] = item["positions"][j]
            order = sorted(pieces)
            if isinstance(items[0]["images"], torch.Tensor):
                images: Any = torch.cat([pieces[s][0] for s in order])
            else:
                images = [img for s in order for img in pieces[s][0]]
            epoch, step = epochs_steps.pop()
            yield Batch(
                epoch=epoch, step_in_epoch=step, images=images,
                tokens=torch.cat([pieces[s][1] for s in order]),
                keys=[k for s in order for k in pieces[s][2]], positions=positions,
                corrupt=sum(i["corrupt"] for i in items), truncated=sum(i["truncated"] for i in items),
            )


def iter_captions(manifest: Manifest, storage_cfg: StorageConfig | None = None,
                  limit: int | None = None) -> Iterator[str]:
    """Every `.txt` member of the manifest's shards, in manifest order (for training the tokenizer)."""
    count = 0
    for shard in manifest.shards:
        try:
            with open_uri(shard.uri, storage_cfg) as f:
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
        except (TruncatedTarError, OSError):
            continue
