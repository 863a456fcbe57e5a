"""Image embeddings and pre-projection features of one dataset split, extracted once and cached.

    extracted = extract(encoder, evalset, batch_size=256, workers=4)      # Extracted(embeddings, features, labels)
    extracted = cached_extract(encoder, evalset, cache_dir="data/eval_features", storage_cfg=None)

What was chosen, and why:
- **The loader never limits.** Decoding and preprocessing (PIL, numpy) run in a thread pool, `prefetch` batches
  ahead of the encoder; PIL and numpy release the GIL for the heavy parts, and the encoder (onnxruntime or
  torch) runs its own threads. The encoder sees ready float32 batches back to back.
- **Bad images are skipped and counted** (EvalSet.image logs each one); the engine keeps its own count, since
  the worker threads would race on the set's counter, and stores it back on the EvalSet afterwards.
- **Cache** (npz through clip.storage, so local or s3): key = (encoder fingerprint, dataset key, split) plus a
  digest of the sample ids, so a dataset folder that changed is extracted again. float32 as extracted. Multi-label
  labels (VOC) are stored as a multi-hot uint8 matrix.
"""

from __future__ import annotations

import hashlib
import io
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from clip import storage
from clip.config import StorageConfig
from clip.eval.encoders import Encoder

Label = int | tuple[int, ...]


@dataclass
class Extracted:
    embeddings: np.ndarray  # float32 [n, E], projected, unnormalised
    features: np.ndarray  # float32 [n, W], before the projection
    labels: list[Label]  # of the kept samples, in order
    total: int  # samples listed
    skipped_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the extraction (0 when read from the cache)

    @property
    def skipped(self) -> int:
        return len(self.skipped_ids)

    @property
    def multi_label(self) -> bool:
        return bool(self.labels) and isinstance(self.labels[0], tuple)

    def label_array(self, num_classes: int) -> np.ndarray:
        """int64 [n] class indices, or uint8 [n, C] multi-hot for multi-label sets."""
        if self.multi_label:
            hot = np.zeros((len(self.labels), num_classes), dtype=np.uint8)
            for row, label in enumerate(self.labels):
                hot[row, list(label)] = 1
            return hot
        return np.asarray(self.labels, dtype=np.int64)


def extract(encoder: Encoder, evalset, *, batch_size: int = 256, workers: int = 4, prefetch: int = 2,
            progress: Callable[[int, int], None] | None = None) -> Extracted:
    """Run every sample of `evalset` (clip.evalsets.base.EvalSet) through `encoder`, batched."""
    import time

    start = time.perf_counter()
    total = len(evalset)
    chunks = [range(i, min(i + batch_size, total)) for i in range(0, total, batch_size)]

    def load(index: int):
        image = evalset.image(index)  # None for an unreadable image (logged by the EvalSet)
        return None if image is None else encoder.preprocess([image])[0]

    embeddings, features, labels, skipped_ids = [], [], [], []
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="eval-decode") as pool:
        pending: deque[tuple[range, list[Future]]] = deque()
        next_chunk = 0
        while next_chunk < len(chunks) or pending:
            while next_chunk < len(chunks) and len(pending) <= prefetch:
                chunk = chunks[next_chunk]
                pending.append((chunk, [pool.submit(load, i) for i in chunk]))
                next_chunk += 1
            chunk, futures = pending.popleft()
            pixels = []
            for index, future in zip(chunk, futures, strict=True):
                array = future.result()
                if array is None:
                    skipped_ids.append(evalset.ids[index])
                else:
                    pixels.append(array)
                    labels.append(evalset.labels[index])
            if pixels:
                emb, feat = encoder.forward_pixels(np.stack(pixels))
                embeddings.append(emb)
                features.append(feat)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    evalset.skipped, evalset.skipped_ids = len(skipped_ids), list(skipped_ids)
    return Extracted(embeddings=_concat(embeddings), features=_concat(features), labels=labels, total=total,
                     skipped_ids=skipped_ids, seconds=time.perf_counter() - start)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0, 0), dtype=np.float32)


def cache_uri(cache_dir: str, fingerprint: str, dataset: str, split: str, ids: list[str]) -> str:
    digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:16]
    return storage.join(cache_dir, fingerprint, f"{dataset}.{split}.{digest}.npz")


def save_extracted(uri: str, extracted: Extracted, num_classes: int, storage_cfg: StorageConfig | None = None) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=extracted.embeddings, features=extracted.features,
             labels=extracted.label_array(num_classes), multi_label=np.asarray(extracted.multi_label),
             total=np.asarray(extracted.total), skipped_ids=np.asarray(extracted.skipped_ids, dtype=str))
    storage.write_bytes(uri, buffer.getvalue(), storage_cfg)


def load_extracted(uri: str, storage_cfg: StorageConfig | None = None) -> Extracted:
    with np.load(io.BytesIO(storage.read_bytes(uri, storage_cfg)), allow_pickle=False) as doc:
        raw_labels = doc["labels"]
        if bool(doc["multi_label"]):
            labels: list[Label] = [tuple(int(c) for c in np.flatnonzero(row)) for row in raw_labels]
        else:
            labels = [int(v) for v in raw_labels]
        return Extracted(embeddings=doc["embeddings"], features=doc["features"], labels=labels,
                         total=int(doc["total"]), skipped_ids=[str(s) for s in doc["skipped_ids"]])


def cached_extract(encoder: Encoder, evalset, *, cache_dir: str | None, storage_cfg: StorageConfig | None = None,
                   batch_size: int = 256, workers: int = 4,
                   progress: Callable[[int, int], None] | None = None) -> Extracted:
    """`extract`, read from / written to `cache_dir` when it is set (None: no cache)."""
    if not cache_dir:
        return extract(encoder, evalset, batch_size=batch_size, workers=workers, progress=progress)
    uri = cache_uri(cache_dir, encoder.fingerprint, evalset.key, evalset.split, list(evalset.ids))
    if storage.exists(uri, storage_cfg):
        extracted = load_extracted(uri, storage_cfg)
        evalset.skipped, evalset.skipped_ids = extracted.skipped, list(extracted.skipped_ids)
        if progress is not None:
            progress(extracted.total, extracted.total)
        return extracted
    extracted = extract(encoder, evalset, batch_size=batch_size, workers=workers, progress=progress)
    save_extracted(uri, extracted, len(evalset.classes), storage_cfg)
    return extracted
