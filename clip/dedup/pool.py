"""The raw pool as dedup sees it: numpy columns of every complete sample's metadata, no image decoded.

Only each sample's `{key}.json` is read (clip.formats.raw): it carries the sha256 of the JPEG bytes, the 64-bit
pHash, the colour signature, the image size and the caption, which is all dedup needs. The pool is held as
fixed-width columns, about 270 bytes per sample whatever its size (`PoolMetadata.bytes_per_sample`):

    phash     [n] uint64                 sha256      [n, 32] uint8         color     [n, 192] uint8
    has_color [n] bool                   area        [n] int64             shard     [n] int32 (into shard_names)
    caption   [n] uint64 (hash of the normalised caption)                  keys      [n] bytes (S<w>, UTF-8)
    caption_digest [n] uint64 (clip.formats.raw.caption_digest of the exact caption)

Captions are kept only as 64-bit BLAKE2b hashes: of their normalised form (`normalize_caption`), which is all the
caption + image pass compares (a collision would also need equal image bytes to matter), and of the exact text,
which keep.parquet carries so that the shard stage catches a collect rerun that changed only captions.
"""

from __future__ import annotations

import hashlib
import logging
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clip import storage
from clip.config import StorageConfig
from clip.formats.errors import FormatError
from clip.formats.raw import COLOR_LENGTH, caption_digest, list_raw_shards, read_raw_shard_metadata

log = logging.getLogger(__name__)


def normalize_caption(caption: str) -> str:
    """Lower-case, whitespace collapsed, punctuation stripped at both ends ("  A Dog!! " -> "a dog")."""
    text = " ".join(caption.lower().split())
    start, end = 0, len(text)
    while start < end and _is_edge_noise(text[start]):
        start += 1
    while end > start and _is_edge_noise(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge_noise(char: str) -> bool:
    return char in string.punctuation or char.isspace() or unicodedata.category(char).startswith("P")


def caption_hash(caption: str) -> int:
    """64-bit BLAKE2b of the normalised caption (the pool's `caption` column)."""
    return int.from_bytes(hashlib.blake2b(normalize_caption(caption).encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class PoolMetadata:
    """Column arrays over every complete sample of the raw pool, in shard order then member order."""

    keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype="S1"))  # [n] UTF-8 bytes
    shard: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))  # [n] index into shard_names
    sha256: np.ndarray = field(default_factory=lambda: np.empty((0, 32), dtype=np.uint8))  # [n, 32]
    phash: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))  # [n]
    area: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # [n] width * height
    caption: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))  # [n] caption_hash
    # [n] the exact caption's clip.formats.raw.caption_digest as a number (keep.parquet carries it as hex)
    caption_digest: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    color: np.ndarray = field(default_factory=lambda: np.empty((0, COLOR_LENGTH), dtype=np.uint8))  # [n, 192]
    has_color: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))  # [n] False: not in the JSON
    shard_names: list[str] = field(default_factory=list)  # raw shard file names (not URIs)
    incomplete: int = 0  # samples missing a jpg/txt/json member, left out
    shard_uris: dict[str, str] = field(default_factory=dict)  # raw shard name -> URI

    def __len__(self) -> int:
        return int(self.phash.shape[0])

    @property
    def raw_shards(self) -> int:
        return len(self.shard_names)

    def key(self, index: int) -> str:
        return self.keys[index].decode("utf-8")

    def key_list(self) -> list[str]:
        return [k.decode("utf-8") for k in self.keys.tolist()]

    def shard_list(self) -> list[str]:
        """The raw shard name of every sample (shared strings: one per shard)."""
        return [self.shard_names[s] for s in self.shard.tolist()]

    def sha256_hex(self) -> list[str]:
        return [row.hex() for row in map(bytes, self.sha256)]

    def caption_digest_hex(self) -> list[str]:
        return [f"{value:016x}" for value in self.caption_digest.tolist()]

    def column_bytes(self) -> int:
        """Bytes held by the per-sample columns."""
        columns = (self.keys, self.shard, self.sha256, self.phash, self.area, self.caption, self.caption_digest,
                   self.color, self.has_color)
        return int(sum(c.nbytes for c in columns))

    def bytes_per_sample(self) -> float:
        return self.column_bytes() / max(1, len(self))


class _ShardColumns:
    """One shard's metadata as small column arrays (the pool concatenates them once at the end)."""

    def __init__(self, metas: list[dict[str, Any]], shard_index: int, where: str) -> None:
        n = len(metas)
        self.keys = [m["key"].encode("utf-8") for m in metas]
        self.shard = np.full(n, shard_index, dtype=np.int32)
        digests = []
        for m in metas:
            try:
                digest = bytes.fromhex(str(m["sha256"]))
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise FormatError(f"raw shard {where}: {m['key']}.json sha256 {m['sha256']!r} is not 64 hex digits")
            digests.append(digest)
        self.sha256 = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(n, 32)
        self.phash = np.array([m["phash_int"] for m in metas], dtype=np.uint64)
        self.area = np.array([int(m["width"]) * int(m["height"]) for m in metas], dtype=np.int64)
        self.caption = np.array([caption_hash(str(m.get("caption", ""))) for m in metas], dtype=np.uint64)
        self.caption_digest = np.array([int(caption_digest(str(m.get("caption", ""))), 16) for m in metas],
                                       dtype=np.uint64)
        self.has_color = np.array([m["color_bytes"] is not None for m in metas], dtype=bool)
        color = bytearray(n * COLOR_LENGTH)
        for i, m in enumerate(metas):
            if m["color_bytes"] is not None:
                color[i * COLOR_LENGTH:(i + 1) * COLOR_LENGTH] = m["color_bytes"]
        self.color = np.frombuffer(bytes(color), dtype=np.uint8).reshape(n, COLOR_LENGTH)


def read_pool_metadata(input_uri: str, storage_cfg: StorageConfig | None = None,
                       progress: Any = None) -> PoolMetadata:
    """Metadata of every complete sample in every raw shard under `input_uri`.

    `progress`: optional callable(done_shards, total_shards). Keys must be unique across the pool.
    """
    shard_uris = list_raw_shards(input_uri, storage_cfg)
    names = [storage.basename(u) for u in shard_uris]
    pool = PoolMetadata(shard_names=names, shard_uris=dict(zip(names, shard_uris, strict=True)))
    parts: list[_ShardColumns] = []
    for done, uri in enumerate(shard_uris, start=1):
        metas, incomplete = read_raw_shard_metadata(uri, storage_cfg)
        pool.incomplete += incomplete
        parts.append(_ShardColumns(metas, done - 1, names[done - 1]))
        if progress is not None:
            progress(done, len(shard_uris))
    if parts:
        keys: list[bytes] = [k for p in parts for k in p.keys]
        pool.keys = np.array(keys, dtype=f"S{max([len(k) for k in keys], default=1) or 1}")
        for name in ("shard", "sha256", "phash", "area", "caption", "caption_digest", "color", "has_color"):
            setattr(pool, name, np.concatenate([getattr(p, name) for p in parts]))
            for p in parts:  # free each shard's piece as soon as it is copied
                setattr(p, name, None)
    _check_unique_keys(pool)
    if pool.incomplete:
        log.warning("%d raw samples lack a jpg, txt or json member and are left out", pool.incomplete)
    return pool


def _check_unique_keys(pool: PoolMetadata) -> None:
    if len(pool) < 2:
        return
    order = np.argsort(pool.keys, kind="stable")
    same = np.flatnonzero(pool.keys[order][1:] == pool.keys[order][:-1])
    if same.size:
        a, b = int(order[same[0]]), int(order[same[0] + 1])
        raise FormatError(f"sample key {pool.key(a)!r} appears in both {pool.shard_names[pool.shard[a]]} and "
                          f"{pool.shard_names[pool.shard[b]]}; keys must be unique")
