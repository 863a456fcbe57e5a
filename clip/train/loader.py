"""Per-step batches of one rank, assembled from its logical streams (clip/train/streams.py) by a DataLoader.

Guarantees:

* Each step, every stream contributes its next `chunk = batch_size // L` *valid* samples (a corrupt sample is
  skipped and counted; the position still advances). The global batch is the concatenation of the streams'
  chunks in stream order; rank `r` owns streams `[r * L/W, (r + 1) * L/W)`, so its part of the global batch is
  the same whatever `W` is (1 process with 2 streams == 2 processes with 1 stream each).
* Inside a rank, DataLoader worker `w` serves the rank's streams `j` with `j % workers == w` and yields ONE item
  per step (its streams' chunks, decoded, transformed and tokenized). torch's DataLoader returns the items of an
  IterableDataset round-robin over workers in worker order, so the main process receives exactly `workers`
  items per step, in a fixed order, and re-orders the chunks by stream id (`RankLoader`).
* A stream with no usable sample in a whole pass stops the run with a DataError (it would spin forever).
* The workers stop when the batch iterator ends, on errors in the training loop too.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip.config import StorageConfig
from clip.formats.images import WEBDATASET_IMAGE_KEYS
from clip.train.gpu_decode import crop_box
from clip.train.streams import (
    DataError,
    DataState,
    Opener,
    RawStream,
    StreamPlan,
    StreamStats,
    open_uri,
    sample_seed,
    shuffled_stream,
)


def decode_sample(members: dict[str, bytes], transform: Callable[[Any], torch.Tensor] | None,
                  seed: int, image_size: int = 0) -> tuple[Any, str] | None:
    """(image tensor, caption), or with transform None (`train.gpu_decode`) ((JPEG bytes as a uint8 tensor, crop
    box), caption): the GPU decodes and crops (clip/train/gpu_decode.py). None when the sample is unusable."""
    image_bytes = next((members[ext] for ext in WEBDATASET_IMAGE_KEYS if ext in members), None)
    text = members.get("txt")
    if image_bytes is None or text is None:
        return None
    try:
        caption = text.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if transform is None:
        box = crop_box(image_bytes, image_size, seed)
        if box is None:
            return None
        return (torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8), box), caption
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            img.load()
            rgb = img.convert("RGB")
        torch.manual_seed(seed)
        return transform(rgb), caption
    except Exception:  # any decode failure (bad JPEG, truncated data, decompression bomb) = corrupt sample
        return None


@dataclass
class StreamConfig:
    """What one rank reads: the plan, its streams, the step shape, where to start (picklable: sent to workers)."""

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

    def _opener(self) -> Opener:
        storage_cfg = StorageConfig(**self.cfg.storage_cfg) if self.cfg.storage_cfg else None
        return lambda uri, **byte_range: open_uri(uri, storage_cfg, **byte_range)

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
            raws = []
            for s in my_streams:
                start = cfg.start.positions[s] if epoch == cfg.start.epoch else 0
                raw = RawStream(cfg.plan, epoch, s, opener, stats)
                raws.append(raw)
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
                        decoded = decode_sample(members, transform, sample_seed(cfg.plan.seed, epoch, s, position),
                                                cfg.image_size)
                        if decoded is None:
                            stats.corrupt_samples += 1
                            unusable_in_a_row += 1
                            if unusable_in_a_row > cfg.plan.total_samples:  # a whole pass: it would spin forever
                                raise DataError(
                                    f"stream {s}: {unusable_in_a_row} samples in a row could not be used (each needs "
                                    f"a decodable image {'/'.join(WEBDATASET_IMAGE_KEYS)} and a UTF-8 txt caption)"
                                )
                            continue
                        unusable_in_a_row = 0
                        image, caption = decoded
                        images.append(image)
                        captions.append(caption)
                        keys.append(key)
                        got += 1
                    positions.append(position + 1)
                if step == cfg.steps_per_epoch - 1:  # the run may end here: verify the shards in hand first
                    for raw in raws:
                        raw.verify_open_shard()
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
    """This rank's part of one step's global batch: its streams' chunks concatenated in stream order."""

    epoch: int
    step_in_epoch: int
    images: Any  # [n, 3, S, S] float tensor, or with gpu_decode a list of (JPEG byte tensor, crop box)
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
