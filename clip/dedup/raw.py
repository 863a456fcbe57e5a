"""Reading the collect stage's raw shards (docs/formats.md "Raw shards") without decoding any image.

Only each sample's `{key}.json` is read: it carries the sha256 of the JPEG bytes, the 64-bit pHash, the image size
and the caption, which is all dedup needs. Local shards are read from disk; `s3://` shards stream through
`clip.storage`.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from clip.config import StorageConfig
from clip.imagehash import hex_to_int

log = logging.getLogger(__name__)

RAW_SHARD_PREFIX = "raw-"
REQUIRED_MEMBERS = ("jpg", "txt", "json")


class MissingInputError(FileNotFoundError):
    """An input of the dedup or shard stage is not there (raw shards, keep.parquet, an evaluation folder).

    A FileNotFoundError defined in `clip`, so the CLI reports it as bad input (one line) rather than a bug.
    """


class StaleInputError(ValueError):
    """An input of the shard stage belongs to another run: keep.parquet does not match the raw pool it names.

    Raw keys are positional (`000000042`), so a collect rerun with another config reuses the same keys for other
    images; the keep-list of the old pool must then be refused, not published against the new one.
    """


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def shard_name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def list_raw_shards(input_uri: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """URIs of every `raw-*.tar` directly under `input_uri`, sorted by name."""
    if is_remote(input_uri):
        from clip import storage

        objects = storage.get_storage(input_uri, storage_cfg).list(input_uri)
        uris = [obj.uri for obj in objects]
    else:
        folder = Path(input_uri)
        if not folder.is_dir():
            raise MissingInputError(f"raw shard folder {input_uri} does not exist (run the collect stage first)")
        uris = [str(p) for p in folder.iterdir()]
    shards = [u for u in uris if shard_name(u).startswith(RAW_SHARD_PREFIX) and shard_name(u).endswith(".tar")]
    return sorted(shards, key=shard_name)


@contextmanager
def open_shard(uri: str, storage_cfg: StorageConfig | None = None) -> Iterator[IO[bytes]]:
    """A binary file object over one shard: the local file, or a streaming read through clip.storage."""
    if is_remote(uri):
        from clip import storage

        stream = storage.get_storage(uri, storage_cfg).open_read(uri)
        try:
            yield stream
        finally:
            stream.close()
    else:
        with open(uri, "rb") as handle:
            yield handle


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the base name, extension = the rest."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


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


def _parse_sample_json(raw: bytes, shard: str, key: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"raw shard {shard}: {key}.json is not valid JSON: {exc}") from None
    missing = [f for f in ("sha256", "phash", "width", "height") if f not in meta]
    if missing:
        raise ValueError(f"raw shard {shard}: {key}.json lacks field(s) {missing} (see docs/formats.md)")
    try:
        meta["phash_int"] = hex_to_int(str(meta["phash"]))
    except ValueError as exc:
        raise ValueError(f"raw shard {shard}: {key}.json has a bad phash: {exc}") from None
    return meta


def read_shard_metadata(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[list[dict[str, Any]], int]:
    """(per-sample JSON dicts with "key" set from the member name, count of incomplete samples) of one shard."""
    name = shard_name(uri)
    members: dict[str, set[str]] = {}
    metas: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    with open_shard(uri, storage_cfg) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if key not in members:
                members[key] = set()
                order.append(key)
            members[key].add(ext)
            if ext == "json":
                extracted = tar.extractfile(member)
                assert extracted is not None  # a regular file always has contents
                meta = _parse_sample_json(extracted.read(), name, key)
                meta["key"] = key
                metas[key] = meta
    complete = [metas[k] for k in order if k in metas and all(m in members[k] for m in REQUIRED_MEMBERS)]
    return complete, len(order) - len(complete)


def read_pool_metadata(input_uri: str, storage_cfg: StorageConfig | None = None,
                       progress: Any = None) -> PoolMetadata:
    """Metadata of every complete sample in every raw shard under `input_uri`.

    `progress`: optional callable(done_shards, total_shards). Keys must be unique across the pool.
    """
    shard_uris = list_raw_shards(input_uri, storage_cfg)
    pool = PoolMetadata(raw_shards=len(shard_uris), shard_uris={shard_name(u): u for u in shard_uris})
    seen: dict[str, str] = {}
    for done, uri in enumerate(shard_uris, start=1):
        name = shard_name(uri)
        metas, incomplete = read_shard_metadata(uri, storage_cfg)
        pool.incomplete += incomplete
        for meta in metas:
            key = meta["key"]
            if key in seen:
                raise ValueError(f"sample key {key!r} appears in both {seen[key]} and {name}; keys must be unique")
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
