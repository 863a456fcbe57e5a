"""Published data versions: training shards, `sizes.json`, `manifest.json`, and the `latest.json` pointer.

Layout of a shard output (`shard.output`, a folder or s3:// prefix; docs/formats.md "Training shards"):

    <output>/latest.json                      the pointer: which version is current (moved atomically)
    <output>/<data_version>/shard-00000.tar   one folder per data version, never rewritten once published
    <output>/<data_version>/index-00000.json  each shard's sample byte ranges and digests (shard_index.py)
    <output>/<data_version>/sizes.json
    <output>/<data_version>/manifest.json     written last in its folder

Why a pointer and immutable folders: a training run may stream a version for days while a new one is
published. Each version lives under its own prefix that nothing rewrites, and readers resolve the pointer ONCE
(`resolve_data_location`) and then read only inside that version's folder, so a new publish can never change
bytes under a reader. The pointer is one small object: local writes rename it into place, an S3 PUT is atomic.

`read_manifest(location)` accepts the output root (resolves the pointer), the pointer file itself, a version
folder, or a manifest .json. A folder without a pointer is read as a version folder (the flat layout of older
outputs and of hand-made test data).

The manifest:

    {
      "format": "clip-pipeline/shards/v1",
      "data_version": "<sha256 over the sorted shard entries>",
      "total_samples": 4096,
      "shards": [{"name": "shard-00000.tar", "samples": 1000, "bytes": 12345678, "sha256": "...",
                  "index": "index-00000.json", "index_sha256": "..."}]
    }

Shard and index names are relative to the manifest's own location. `data_version` is the sha256 of the UTF-8
lines `name\\tsamples\\tbytes\\tsha256\\n` (with an index: `name\\tsamples\\tbytes\\tsha256\\tindex\\tindex_sha256\\n`),
sorted by name, so the same shards (and indexes) always give the same version. Versions published before
shard indexes have entries without `index`: their data version is unchanged, and readers read their shards whole.
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
from clip.formats.jsondoc import parse_format_doc, parse_json

MANIFEST_FORMAT = "clip-pipeline/shards/v1"
MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
SHARD_PREFIX = "shard-"
POINTER_NAME = "latest.json"
POINTER_FORMAT = "clip-pipeline/shards-latest/v1"
_HEX = frozenset("0123456789abcdef")


def is_data_version(name: str) -> bool:
    """A version folder's name: the 64-hex-digit data version."""
    return len(name) == 64 and set(name) <= _HEX


def version_location(root: str, version: str) -> str:
    """The folder of one data version under a shard output: `<root>/<data_version>`."""
    return storage.join(root, version)


def parent_location(uri: str) -> str:
    """The folder holding `uri` (local path or s3:// URL)."""
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else ""


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}.tar"


@dataclass(frozen=True)
class ShardEntry:
    name: str  # relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str
    uri: str = ""  # the shard's full location, set when the manifest was read from somewhere
    index: str = ""  # its shard index (clip/formats/shard_index.py), relative; "" in versions published without
    index_sha256: str = ""
    index_uri: str = ""  # the index's full location, set like `uri`

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}
        if self.index:
            doc["index"], doc["index_sha256"] = self.index, self.index_sha256
        return doc


def _version_line(entry: dict[str, Any]) -> str:
    line = f"{entry['name']}\t{int(entry['samples'])}\t{int(entry['bytes'])}\t{entry['sha256']}"
    if entry.get("index"):
        line += f"\t{entry['index']}\t{entry.get('index_sha256', '')}"
    return line + "\n"


def data_version(shards: list[ShardEntry] | list[dict[str, Any]]) -> str:
    """SHA-256 over the sorted `name<TAB>samples<TAB>bytes<TAB>sha256[<TAB>index<TAB>index_sha256]<LF>` lines
    of all shards (the index fields only for entries that have an index)."""
    rows = [s.to_dict() if isinstance(s, ShardEntry) else s for s in shards]
    return hashlib.sha256("".join(sorted(_version_line(s) for s in rows)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Manifest:
    data_version: str
    total_samples: int
    shards: tuple[ShardEntry, ...]
    uri: str = ""  # where it was read from (empty for one being built)
    published_at: str = ""  # ISO 8601 UTC, set by the publisher (informational, not part of the data version)

    @property
    def location(self) -> str:
        """The folder the manifest was read from (its shards lie there)."""
        return parent_location(self.uri)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @classmethod
    def build(cls, shards: list[ShardEntry]) -> Manifest:
        ordered = tuple(sorted(shards, key=lambda s: s.name))
        return cls(data_version=data_version(list(ordered)), total_samples=sum(s.samples for s in ordered),
                   shards=ordered)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": MANIFEST_FORMAT, "data_version": self.data_version,
                               "total_samples": self.total_samples, "shards": [s.to_dict() for s in self.shards]}
        if self.published_at:
            doc["published_at"] = self.published_at
        return doc

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")

    def sizes_bytes(self) -> bytes:
        """`sizes.json`: shard name -> samples (the file open_clip's webdataset loader reads)."""
        return (json.dumps({s.name: s.samples for s in self.shards}, indent=2) + "\n").encode("utf-8")


def manifest_uri(location: str) -> str:
    """The manifest of a data location: `location/manifest.json`, or `location` itself when it names a .json."""
    return location if location.endswith(".json") else storage.join(location, MANIFEST_NAME)


def _located(base: str, name: str) -> str:
    return storage.join(base, name) if base else name


def parse_manifest(raw: bytes, uri: str) -> Manifest:
    """Parse and check a manifest's bytes; FormatError naming `uri` and what is wrong."""
    doc = parse_json(raw, uri)
    if not isinstance(doc, dict):
        raise FormatError(f"{uri}: not a shard manifest (top level is not an object)")
    if doc.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
        raise FormatError(f"{uri}: unknown manifest format {doc.get('format')!r}; expected {MANIFEST_FORMAT}")
    base = uri.rsplit("/", 1)[0] if "/" in uri else ""
    try:
        shards = tuple(
            ShardEntry(name=str(s["name"]), samples=int(s["samples"]), bytes=int(s.get("bytes", 0)),
                       sha256=str(s.get("sha256", "")), uri=_located(base, str(s["name"])),
                       index=str(s.get("index") or ""), index_sha256=str(s.get("index_sha256") or ""),
                       index_uri=_located(base, str(s["index"])) if s.get("index") else "")
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
    unhashed = [s.name for s in shards if s.index and not s.index_sha256]
    if unhashed:
        raise FormatError(f"{uri}: shard {unhashed[0]} names an index without its index_sha256")
    return Manifest(data_version=version, total_samples=total, shards=shards, uri=uri,
                    published_at=str(doc.get("published_at", "")))


# ----------------------------------------------------------------------------------------------------------
# the pointer


@dataclass(frozen=True)
class Pointer:
    """`latest.json`: `{"format", "data_version", "manifest": "<data_version>/manifest.json", "published_at"}`."""

    data_version: str
    published_at: str
    uri: str = ""

    @property
    def manifest(self) -> str:
        return f"{self.data_version}/{MANIFEST_NAME}"

    def to_bytes(self) -> bytes:
        doc = {"format": POINTER_FORMAT, "data_version": self.data_version, "manifest": self.manifest,
               "published_at": self.published_at}
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def pointer_uri(root: str) -> str:
    return storage.join(root, POINTER_NAME)


def parse_pointer(raw: bytes, uri: str) -> Pointer:
    doc = parse_format_doc(raw, uri, POINTER_FORMAT, "data version pointer")
    version = str(doc.get("data_version", ""))
    if not is_data_version(version) or doc.get("manifest") != f"{version}/{MANIFEST_NAME}":
        raise FormatError(f"{uri}: data_version {version!r} / manifest {doc.get('manifest')!r} are not a version")
    return Pointer(data_version=version, published_at=str(doc.get("published_at", "")), uri=uri)


def read_pointer(root: str, storage_cfg: StorageConfig | None = None) -> Pointer | None:
    """The pointer of a shard output, or None when nothing was published there with a pointer."""
    uri = root if storage.basename(root) == POINTER_NAME else pointer_uri(root)
    try:
        raw = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:  # clip.storage.ObjectNotFound is one too
        return None
    return parse_pointer(raw, uri)


def write_pointer(root: str, version: str, published_at: str, storage_cfg: StorageConfig | None = None) -> Pointer:
    """Move the pointer to `version` (one atomic write: rename locally, a single PUT on S3)."""
    pointer = Pointer(data_version=version, published_at=published_at, uri=pointer_uri(root))
    storage.write_bytes(pointer.uri, pointer.to_bytes(), storage_cfg)
    return pointer


def resolve_data_location(location: str, storage_cfg: StorageConfig | None = None) -> str:
    """The version folder (or manifest .json) to read for `location`, reading the pointer once.

    Output root with a `latest.json`, or the pointer itself: the folder of the version it names. Anything else
    (a version folder, a flat folder, a manifest .json) is returned unchanged. A reader that must not see a
    new publish half-way (the trainer) resolves once and then reads only what this returns."""
    if location.endswith(".json") and storage.basename(location) != POINTER_NAME:
        return location
    pointer = read_pointer(location, storage_cfg)
    if pointer is None:
        if storage.basename(location) == POINTER_NAME:
            raise MissingInputError(f"no data version pointer at {location}; run the shard stage first")
        return location
    return version_location(parent_location(pointer.uri), pointer.data_version)


def read_manifest(location: str, storage_cfg: StorageConfig | None = None) -> Manifest:
    """The manifest of a data location: a shard output root (through `latest.json`), the pointer itself, a
    version folder, or the manifest .json.

    MissingInputError when there is none ("run the shard stage first"), FormatError when it is malformed or
    does not hold the version the pointer names."""
    resolved = resolve_data_location(location, storage_cfg)
    uri = manifest_uri(resolved)
    try:
        raw = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:  # clip.storage.ObjectNotFound is one too
        raise MissingInputError(f"no shard manifest at {uri}; run the shard stage first") from None
    manifest = parse_manifest(raw, uri)
    folder = storage.basename(resolved) if resolved != location else ""
    if folder and manifest.data_version != folder:
        raise FormatError(f"{uri}: holds data version {manifest.data_version[:12]}, not {folder[:12]} as its "
                          "folder and the latest.json pointer say (edited or corrupt)")
    return manifest
