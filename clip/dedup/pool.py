"""The raw pool as dedup sees it: column arrays of every complete sample's metadata, no image decoded.

Only each sample's `{key}.json` is read (clip.formats.raw): it carries the sha256 of the JPEG bytes, the 64-bit
pHash, the image size and the caption, which is all dedup needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clip import storage
from clip.config import StorageConfig
from clip.formats.errors import FormatError
from clip.formats.raw import list_raw_shards, read_raw_shard_metadata

log = logging.getLogger(__name__)


@dataclass
class PoolMetadata:
    """Column arrays over every complete sample of the raw pool, in shard order then member order."""

    keys: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)  # raw shard file name (not URI) holding the sample
    sha256: list[str] = field(default_factory=list)
    phash: list[int] = field(default_factory=list)
    width: list[int] = field(default_factory=list)
    height: list[int] = field(default_factory=list)
    caption: list[str] = field(default_factory=list)
    incomplete: int = 0  # samples missing a jpg/txt/json member, left out
    raw_shards: int = 0
    shard_uris: dict[str, str] = field(default_factory=dict)  # raw shard name -> URI

    def __len__(self) -> int:
        return len(self.keys)

    def phash_array(self) -> np.ndarray:
        return np.array(self.phash, dtype=np.uint64)

    def areas(self) -> np.ndarray:
        return np.asarray(self.width, dtype=np.int64) * np.asarray(self.height, dtype=np.int64)


def read_pool_metadata(input_uri: str, storage_cfg: StorageConfig | None = None,
                       progress: Any = None) -> PoolMetadata:
    """Metadata of every complete sample in every raw shard under `input_uri`.

    `progress`: optional callable(done_shards, total_shards). Keys must be unique across the pool.
    """
    shard_uris = list_raw_shards(input_uri, storage_cfg)
    pool = PoolMetadata(raw_shards=len(shard_uris), shard_uris={storage.basename(u): u for u in shard_uris})
    seen: dict[str, str] = {}
    for done, uri in enumerate(shard_uris, start=1):
        name = storage.basename(uri)
        metas, incomplete = read_raw_shard_metadata(uri, storage_cfg)
        pool.incomplete += incomplete
        for meta in metas:
            key = meta["key"]
            if key in seen:
                raise FormatError(f"sample key {key!r} appears in both {seen[key]} and {name}; keys must be unique")
            seen[key] = name
            pool.keys.append(key)
            pool.shards.append(name)
            pool.sha256.append(str(meta["sha256"]))
            pool.phash.append(meta["phash_int"])
            pool.width.append(int(meta["width"]))
            pool.height.append(int(meta["height"]))
            pool.caption.append(str(meta.get("caption", "")))
        if progress is not None:
            progress(done, len(shard_uris))
    if pool.incomplete:
        log.warning("%d raw samples lack a jpg, txt or json member and are left out", pool.incomplete)
    return pool
