"""A published data version: training shards, `sizes.json` and `manifest.json` (docs/formats.md).

    {
      "format": "clip-pipeline/shards/v1",
      "data_version": "<sha256 over the sorted (name, samples, bytes, sha256) of all shards>",
      "total_samples": 4096,
      "shards": [{"name": "shard-00000.tar", "samples": 1000, "bytes": 12345678, "sha256": "..."}]
    }

Shard names are relative to the manifest's own location. `data_version` is the sha256 of the UTF-8 lines
`name\\tsamples\\tbytes\\tsha256\\n`, sorted by name, so the same shards always give the same version.
`read_manifest` returns a typed `Manifest` whose data version has been recomputed and checked: a reader can
rely on every field it reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from clip import storage
from clip.config import StorageConfig
from clip.formats.errors import FormatError, MissingInputError

MANIFEST_FORMAT = "clip-pipeline/shards/v1"
MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
SHARD_PREFIX = "shard-"


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}.tar"


def is_shard_name(name: str) -> bool:
    return name.startswith(SHARD_PREFIX) and name.endswith(".tar")


@dataclass(frozen=True)
class ShardEntry:
    name: str  # relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str
    uri: str = ""  # the shard's full location, set when the manifest was read from somewhere

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}


def data_version(shards: list[ShardEntry] | list[dict[str, Any]]) -> str:
    """SHA-256 over the sorted `name<TAB>samples<TAB>bytes<TAB>sha256<LF>` lines of all shards."""
    rows = [s.to_dict() if isinstance(s, ShardEntry) else s for s in shards]
    lines = sorted(f"{s['name']}\t{int(s['samples'])}\t{int(s['bytes'])}\t{s['sha256']}\n" for s in rows)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Manifest:
    data_version: str
    total_samples: int
    shards: tuple[ShardEntry, ...]
    uri: str = ""  # where it was read from (empty for one being built)

    @classmethod
    def build(cls, shards: list[ShardEntry]) -> Manifest:
        ordered = tuple(sorted(shards, key=lambda s: s.name))
        return cls(data_version=data_version(list(ordered)), total_samples=sum(s.samples for s in ordered),
                   shards=ordered)

    def to_dict(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "data_version": self.data_version, "total_samples": self.total_samples,
                "shards": [s.to_dict() for s in self.shards]}

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")

    def sizes_bytes(self) -> bytes:
        """`sizes.json`: shard name -> samples (the file open_clip's webdataset loader reads)."""
        return (json.dumps({s.name: s.samples for s in self.shards}, indent=2) + "\n").encode("utf-8")


def manifest_uri(location: str) -> str:
    """The manifest of a data location: `location/manifest.json`, or `location` itself when it names a .json."""
    return location if location.endswith(".json") else storage.join(location, MANIFEST_NAME)


def parse_manifest(raw: bytes, uri: str) -> Manifest:
    """Parse and check a manifest's bytes; FormatError naming `uri` and what is wrong."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{uri}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{uri}: not a shard manifest (top level is not an object)")
    if doc.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
        raise FormatError(f"{uri}: unknown manifest format {doc.get('format')!r}; expected {MANIFEST_FORMAT}")
    base = uri.rsplit("/", 1)[0] if "/" in uri else ""
    try:
        shards = tuple(
            ShardEntry(name=str(s["name"]), samples=int(s["samples"]), bytes=int(s.get("bytes", 0)),
                       sha256=str(s.get("sha256", "")), uri=storage.join(base, str(s["name"])) if base else str(s["name"]))
            for s in doc["shards"]
        )
        version = str(doc.get("data_version", ""))
        total = int(doc.get("total_samples", sum(s.samples for s in shards)))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{uri}: not a valid shard manifest ({exc!r})") from None
    if not shards or sum(s.samples for s in shards) == 0:
        raise FormatError(f"{uri}: the manifest lists no samples")
    if total != sum(s.samples for s in shards):
        raise FormatError(f"{uri}: total_samples {total} != the sum over its shards {sum(s.samples for s in shards)}")
    if version and all(s.sha256 for s in shards) and version != data_version(list(shards)):
        raise FormatError(f"{uri}: data_version {version} does not match its shard list (edited or corrupt)")
    return Manifest(data_version=version, total_samples=total, shards=shards, uri=uri)


def read_manifest(location: str, storage_cfg: StorageConfig | None = None) -> Manifest:
    """The manifest at a data location (folder, s3:// prefix, or the .json itself).

    MissingInputError when there is none ("run the shard stage first"), FormatError when it is malformed."""
    uri = manifest_uri(location)
    try:
        raw = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:  # clip.storage.ObjectNotFound is one too
        raise MissingInputError(f"no shard manifest at {uri}; run the shard stage first") from None
    return parse_manifest(raw, uri)


def find_manifest(location: str, storage_cfg: StorageConfig | None = None) -> Manifest | None:
    """The manifest at `location`, or None when there is none or it cannot be parsed (a publisher replaces it)."""
    try:
        return read_manifest(location, storage_cfg)
    except (MissingInputError, FormatError):
        return None
