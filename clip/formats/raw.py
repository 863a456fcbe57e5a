"""The raw pool: the collect stage's output, read by dedup and shard (docs/formats.md "Raw shards").

Under `collect.output_dir` (a local folder or s3://bucket/prefix):

    raw-00000.tar            per sample `{key}.jpg`, `{key}.json`, `{key}.txt` (byte-deterministic tar)
    records/raw-00000.json   the shard's done-record (collect's restart bookkeeping)
    candidates.parquet       every candidate's status (clip.formats.candidates)
    query_counts.json, stats.json

Each sample's `{key}.json` carries the sha256 of the JPEG bytes as stored, the 64-bit pHash as 16 hex digits, the
colour signature (8 x 8 RGB box-averaged thumbnail, 192 bytes, base64), the image size and the caption: everything
dedup needs, so dedup never decodes an image. Pools written before the colour field existed lack it; readers
get None for it (`parse_sample_json`) and dedup then decodes those images once. A reader can rely on a raw shard
being complete (it is visible under its final name only once written).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from clip import storage
from clip.config import StorageConfig
from clip.formats.errors import FormatError, MissingInputError
from clip.formats.tar import (
    DeterministicTarWriter,
    TruncatedTarError,
    iter_tar_members,
    iter_tar_samples,
    split_member_name,
)
from clip.imagehash import hex_to_int

log = logging.getLogger(__name__)

RAW_SHARD_PREFIX = "raw-"
RECORDS_DIR = "records"
QUERY_COUNTS_NAME = "query_counts.json"
STATS_NAME = "stats.json"
# stats.json field: the side (pixels) of the built-in synthetic scenes, `collect.synthetic.image_size`. Dedup
# renders the synthetic evaluation sets at this size, so it learns it from the pool rather than from collect's config.
SYNTHETIC_IMAGE_SIZE_FIELD = "synthetic_image_size"
DEFAULT_SYNTHETIC_IMAGE_SIZE = 64  # a pool without stats.json (not written by collect): the generator's default
SAMPLE_MEMBERS = ("jpg", "json", "txt")  # what a raw sample carries, in the order written (sorted)
SAMPLE_JSON_FIELDS = ("key", "url", "caption", "query", "source", "width", "height", "sha256", "phash", "color")
_REQUIRED_JSON_FIELDS = ("sha256", "phash", "width", "height")
COLOR_FIELD = "color"  # optional in pools written before it existed
COLOR_SIDE = 8
COLOR_LENGTH = COLOR_SIDE * COLOR_SIDE * 3  # 192 bytes: R, G, B of each cell, row-major


def color_signature(image: Image.Image) -> np.ndarray:
    """[192] uint8: the image box-averaged to 8 x 8 RGB (the `color` field of a raw sample, decoded)."""
    thumb = image.convert("RGB").resize((COLOR_SIDE, COLOR_SIDE), Image.Resampling.BOX)
    return np.asarray(thumb, dtype=np.uint8).reshape(-1)


def encode_color(signature: np.ndarray) -> str:
    """The `color` field: base64 (standard alphabet, padded) of the 192 signature bytes."""
    signature = np.asarray(signature)
    if signature.shape != (COLOR_LENGTH,) or signature.dtype != np.uint8:
        raise ValueError(f"a colour signature is [{COLOR_LENGTH}] uint8, got {signature.shape} {signature.dtype}")
    return base64.b64encode(signature.tobytes()).decode("ascii")


def decode_color(value: Any, where: str) -> bytes:
    """The 192 signature bytes of a `color` field; FormatError naming `where` when it is not that."""
    try:
        raw = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"{where}: bad {COLOR_FIELD} field (base64 of {COLOR_LENGTH} bytes): {exc}") from None
    if len(raw) != COLOR_LENGTH:
        raise FormatError(f"{where}: {COLOR_FIELD} field holds {len(raw)} bytes, expected {COLOR_LENGTH}")
    return raw


def raw_shard_name(index: int) -> str:
    return f"{RAW_SHARD_PREFIX}{index:05d}.tar"


def raw_record_name(index: int) -> str:
    return f"{RAW_SHARD_PREFIX}{index:05d}.json"


def raw_shard_index(name: str) -> int | None:
    """5 from `raw-00005.tar` or `raw-00005.json`; None for any other name."""
    if name.startswith(RAW_SHARD_PREFIX) and name.endswith((".tar", ".json")):
        digits = name[len(RAW_SHARD_PREFIX):].split(".", 1)[0]
        if digits.isdigit():
            return int(digits)
    return None


def is_raw_shard_name(name: str) -> bool:
    return name.startswith(RAW_SHARD_PREFIX) and name.endswith(".tar")


@dataclass
class RawSample:
    key: str
    jpeg: bytes
    caption: str
    meta: dict[str, Any]  # the {key}.json fields (SAMPLE_JSON_FIELDS)


def write_raw_shard(stream: BinaryIO, samples: list[RawSample]) -> int:
    """Write one raw shard's tar to `stream` (byte-deterministic); returns its size in bytes."""
    writer = DeterministicTarWriter(stream)
    for sample in samples:
        writer.add_sample(sample.key, {
            "jpg": sample.jpeg,
            "txt": sample.caption.encode("utf-8"),
            "json": json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
        })
    writer.close()
    return writer.bytes_written


def parse_sample_json(raw: bytes, shard: str, key: str) -> dict[str, Any]:
    """A raw sample's `{key}.json`, checked for the fields dedup relies on.

    Adds `phash_int` (the pHash as int) and `color_bytes` (the 192 colour signature bytes, None when the sample
    predates the `color` field)."""
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"raw shard {shard}: {key}.json is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise FormatError(f"raw shard {shard}: {key}.json is not an object")
    missing = [f for f in _REQUIRED_JSON_FIELDS if f not in meta]
    if missing:
        raise FormatError(f"raw shard {shard}: {key}.json lacks field(s) {missing} (see docs/formats.md)")
    try:
        meta["phash_int"] = hex_to_int(str(meta["phash"]))
    except ValueError as exc:
        raise FormatError(f"raw shard {shard}: {key}.json has a bad phash: {exc}") from None
    color = meta.get(COLOR_FIELD)
    meta["color_bytes"] = None if color is None else decode_color(color, f"raw shard {shard}: {key}.json")
    return meta


def caption_digest(caption: str) -> str:
    """16 hex digits: BLAKE2b-64 of the caption's UTF-8 bytes exactly as stored (keep.parquet's `caption_digest`,
    which the shard stage compares with the raw JSON so that a collect rerun that changed only captions is caught)."""
    return hashlib.blake2b(caption.encode("utf-8"), digest_size=8).hexdigest()


def sample_json_digests(raw: bytes) -> tuple[str | None, str | None]:
    """(the `sha256` field, `caption_digest` of the `caption` field) of a raw sample's JSON member; None for a
    value the member lacks or when it is unreadable."""
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, None
    if not isinstance(meta, dict):
        return None, None
    sha256, caption = meta.get("sha256"), meta.get("caption")
    return (str(sha256) if sha256 is not None else None,
            caption_digest(caption) if isinstance(caption, str) else None)


def list_raw_shards(input_uri: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """URIs of every `raw-*.tar` directly under `input_uri`, sorted by name."""
    if not storage.is_s3_uri(input_uri) and not Path(input_uri).is_dir():
        raise MissingInputError(f"raw shard folder {input_uri} does not exist (run the collect stage first)")
    found = []
    for info in storage.list_objects(input_uri, storage_cfg):
        name = storage.basename(info.uri)
        if is_raw_shard_name(name) and storage.join(input_uri, name) == info.uri:  # not in a sub-folder
            found.append(info.uri)
    return sorted(found, key=storage.basename)


def read_raw_shard_metadata(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[list[dict[str, Any]], int]:
    """(each complete sample's JSON with "key" set from the member name, count of incomplete samples) of one
    raw shard. Only the JSON members are read; images are skipped."""
    name = storage.basename(uri)
    complete: list[dict[str, Any]] = []
    incomplete = 0
    try:
        with storage.open_read(uri, storage_cfg) as handle:
            for key, members in iter_tar_samples(handle, want=lambda ext: ext == "json"):
                if not all(m in members for m in SAMPLE_MEMBERS) or members["json"] is None:
                    incomplete += 1
                    continue
                meta = parse_sample_json(members["json"], name, key)
                meta["key"] = key
                complete.append(meta)
    except TruncatedTarError as exc:
        raise FormatError(f"raw shard {uri} is truncated or corrupt ({exc}); run the collect stage again") from None
    return complete, incomplete


def iter_raw_images(uri: str, keys: set[str], storage_cfg: StorageConfig | None = None) -> Iterator[tuple[str, bytes]]:
    """(key, JPEG bytes) of the samples of one raw shard whose key is in `keys`, in shard order; other
    images are skipped unread. Raises FormatError naming the keys it did not find."""
    wanted = set(keys)

    def want(name: str) -> bool:
        key, ext = split_member_name(name)
        return ext == "jpg" and key in wanted

    with storage.open_read(uri, storage_cfg) as handle:
        for name, payload in iter_tar_members(handle, want):
            if payload is not None:
                key = split_member_name(name)[0]
                wanted.discard(key)
                yield key, payload
    if wanted:
        raise FormatError(f"raw shard {storage.basename(uri)}: no jpg member for {sorted(wanted)[:5]}")


def read_raw_stats(input_uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any] | None:
    """The pool's stats.json, or None when the pool has none (raw shards written by another tool)."""
    uri = storage.join(input_uri, STATS_NAME)
    if not storage.exists(uri, storage_cfg):
        return None
    try:
        stats = json.loads(storage.read_bytes(uri, storage_cfg))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{uri} is not valid JSON: {exc}") from None
    if not isinstance(stats, dict):
        raise FormatError(f"{uri} is not a JSON object")
    return stats


def pool_source(input_uri: str, storage_cfg: StorageConfig | None = None) -> str | None:
    """The candidate source collect recorded in the pool's stats.json (synthetic, table, ...), or None."""
    source = (read_raw_stats(input_uri, storage_cfg) or {}).get("source")
    return source if isinstance(source, str) else None


def pool_synthetic_image_size(input_uri: str, storage_cfg: StorageConfig | None = None) -> int:
    """The synthetic image size collect recorded in the pool's stats.json; the generator's default without one."""
    stats = read_raw_stats(input_uri, storage_cfg) or {}
    value = stats.get(SYNTHETIC_IMAGE_SIZE_FIELD, DEFAULT_SYNTHETIC_IMAGE_SIZE)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FormatError(f"{storage.join(input_uri, STATS_NAME)}: {SYNTHETIC_IMAGE_SIZE_FIELD} must be a positive "
                          f"integer, got {value!r}")
    return value
