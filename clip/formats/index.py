"""The search index of a photo folder (docs/formats.md "Search index"): float16 unit embeddings, the file list,
and the sha256 of the bundle that embedded them.

    INDEX/index.json                        written last: the header (format, bundle_sha256, files, skipped, ...)
    INDEX/embeddings-<sha256[:16]>.npy      float16 [count, embed_dim], row i = files[i], unit rows
    INDEX/parts/part-NNNNN.npz              while building: one atomically written chunk each (removed at the end)
    INDEX/faiss-ivf-<sha256[:16]>.index     optional: a FAISS index of those embeddings, saved on first use

What a reader can rely on:
- **Complete or absent.** Every file is written atomically (clip.storage); `index.json` is written after the
  embeddings file it names, and the embeddings file's name carries its content hash, so a rebuild never changes
  the bytes an older `index.json` points at. A reader sees the old index or the new one.
- **Verified.** `read_index` checks the embeddings file against the sha256, shape and dtype the header records.
- **One model.** `bundle_sha256` is the sha256 of the bundle's flat manifest (`BundleManifest.to_bytes()`: every
  file's sha256 plus `info`), the same for the published bundle, its version folder and the MLflow model's copy.
  Queries must be embedded by that bundle; clip.runtime.index refuses any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from clip import storage
from clip.config import StorageConfig
from clip.formats.bundle import BundleManifest
from clip.formats.errors import FormatError, MissingInputError
from clip.formats.jsondoc import parse_format_doc, parse_json

INDEX_FORMAT = "clip-pipeline/search-index/v1"
INDEX_NAME = "index.json"
PARTS_DIR = "parts"
PART_PATTERN = re.compile(r"part-(\d{5,})\.npz")
EMBEDDINGS_PATTERN = re.compile(r"embeddings-[0-9a-f]{16}\.npy")
FAISS_PATTERN = re.compile(r"faiss-ivf-[0-9a-f]{16}\.index")
EMBEDDING_DTYPE = np.float16


def bundle_sha256(manifest: BundleManifest) -> str:
    """The identity of a bundle's model: sha256 of its flat manifest (layout- and version-folder-independent)."""
    return hashlib.sha256(manifest.to_bytes()).hexdigest()


def part_name(number: int) -> str:
    return f"part-{number:05d}.npz"


def embeddings_name(sha256: str) -> str:
    return f"embeddings-{sha256[:16]}.npy"


def faiss_name(embeddings_sha256: str) -> str:
    """The optional FAISS index saved beside the embeddings it was built from (clip.runtime.index)."""
    return f"faiss-ivf-{embeddings_sha256[:16]}.index"


@dataclass(frozen=True)
class PhotoFile:
    """A photo as indexed: its path relative to the index's `root` (POSIX separators), size and mtime. A file
    whose size or mtime changed since is embedded again."""
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SkippedFile:
    file: PhotoFile
    error: str


@dataclass(frozen=True)
class IndexPart:
    """One chunk of a build: the files embedded (row i of `embeddings` is `files[i]`) and those that failed."""
    bundle_sha256: str
    files: list[PhotoFile]
    embeddings: np.ndarray  # float16 [len(files), embed_dim]
    skipped: list[SkippedFile] = field(default_factory=list)


@dataclass(frozen=True)
class IndexHeader:
    """`index.json`. `root`: the photo folder the paths are relative to; `bundle`: where the bundle was read
    from (the default for queries; its sha256 must still be `bundle_sha256`)."""
    bundle_sha256: str
    bundle: str
    model: str
    embed_dim: int
    root: str
    files: list[PhotoFile]
    skipped: list[SkippedFile]
    embeddings: str  # the embeddings file's name
    embeddings_sha256: str

    @property
    def count(self) -> int:
        return len(self.files)

    def to_bytes(self) -> bytes:
        doc = {"format": INDEX_FORMAT, **asdict(self), "count": self.count, "dtype": "float16"}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")


def _photo(entry: Any, uri: str) -> PhotoFile:
    try:
        return PhotoFile(path=str(entry["path"]), size=int(entry["size"]), mtime_ns=int(entry["mtime_ns"]))
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{uri}: a file entry is not {{path, size, mtime_ns}}: {entry!r}") from None


def _skipped(entries: Any, uri: str) -> list[SkippedFile]:
    try:
        return [SkippedFile(_photo(e["file"], uri), str(e["error"])) for e in entries or []]
    except (KeyError, TypeError):
        raise FormatError(f"{uri}: `skipped` must list {{file, error}} entries") from None


def parse_index_header(raw: bytes, uri: str) -> IndexHeader:
    doc = parse_format_doc(raw, uri, INDEX_FORMAT, "search index")
    try:
        header = IndexHeader(
            bundle_sha256=str(doc["bundle_sha256"]), bundle=str(doc["bundle"]), model=str(doc["model"]),
            embed_dim=int(doc["embed_dim"]), root=str(doc["root"]),
            files=[_photo(e, uri) for e in doc["files"]], skipped=_skipped(doc.get("skipped"), uri),
            embeddings=str(doc["embeddings"]), embeddings_sha256=str(doc["embeddings_sha256"]))
    except KeyError as exc:
        raise FormatError(f"{uri}: the search index header is missing key {exc.args[0]!r}") from None
    if not EMBEDDINGS_PATTERN.fullmatch(header.embeddings):
        raise FormatError(f"{uri}: `embeddings` {header.embeddings!r} is not an embeddings file name")
    return header


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_index(folder: str, header: IndexHeader, embeddings: np.ndarray,
                storage_cfg: StorageConfig | None = None) -> IndexHeader:
    """Write the embeddings file, then `index.json` (both atomic), then remove embeddings files it no longer
    names (and FAISS indexes of them). `header.embeddings` / `embeddings_sha256` are filled in here; returns the
    header written."""
    matrix = np.ascontiguousarray(embeddings, dtype=EMBEDDING_DTYPE)
    if matrix.shape != (header.count, header.embed_dim):
        raise ValueError(f"embeddings {list(matrix.shape)} do not match {header.count} files x {header.embed_dim}")
    data = _npy_bytes(matrix)
    sha = hashlib.sha256(data).hexdigest()
    header = IndexHeader(**{**header.__dict__, "embeddings": embeddings_name(sha), "embeddings_sha256": sha})
    storage.write_bytes(storage.join(folder, header.embeddings), data, storage_cfg)
    storage.write_bytes(storage.join(folder, INDEX_NAME), header.to_bytes(), storage_cfg)
    current = {header.embeddings, faiss_name(sha)}
    for obj in storage.list_objects(folder, storage_cfg):
        name = storage.basename(obj.uri)
        stale = (EMBEDDINGS_PATTERN.fullmatch(name) or FAISS_PATTERN.fullmatch(name)) and name not in current
        if stale and obj.uri == storage.join(folder, name):
            storage.delete(obj.uri, storage_cfg)
    return header


def read_index_header(folder: str, storage_cfg: StorageConfig | None = None) -> IndexHeader | None:
    """The header of the index at `folder`, or None when there is none."""
    uri = storage.join(folder, INDEX_NAME)
    try:
        return parse_index_header(storage.read_bytes(uri, storage_cfg), uri)
    except FileNotFoundError:
        return None


def read_index(folder: str, storage_cfg: StorageConfig | None = None) -> tuple[IndexHeader, np.ndarray]:
    """The header and the float16 [count, embed_dim] embeddings, checked against the header's sha256. A local
    index is memory-mapped (searching it in chunks keeps memory bounded); an s3:// one is read into memory."""
    header = read_index_header(folder, storage_cfg)
    if header is None:
        raise MissingInputError(f"no search index at {folder}: {INDEX_NAME} is missing "
                                "(build one with `clip-pipeline index`)")
    uri = storage.join(folder, header.embeddings)
    digest = hashlib.sha256()
    try:
        if storage.is_s3_uri(uri):
            data = storage.read_bytes(uri, storage_cfg)
            digest.update(data)
            embeddings = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            path = storage.to_local_path(uri)
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
            embeddings = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise FormatError(f"search index {folder}: {header.embeddings} is missing") from None
    except ValueError as exc:
        raise FormatError(f"search index {folder}: {header.embeddings} is not a .npy array ({exc})") from None
    if digest.hexdigest() != header.embeddings_sha256:
        raise FormatError(f"search index {folder}: {header.embeddings} was altered (sha256 differs from {INDEX_NAME})")
    if embeddings.dtype != EMBEDDING_DTYPE or embeddings.shape != (header.count, header.embed_dim):
        raise FormatError(f"search index {folder}: {header.embeddings} is {embeddings.dtype} "
                          f"{list(embeddings.shape)}, expected float16 [{header.count}, {header.embed_dim}]")
    return header, embeddings


# -- parts (a build in progress) ---------------------------------------------------------------------------------


def part_bytes(part: IndexPart) -> bytes:
    """One .npz: `embeddings` (float16) and `meta` (the part's JSON as uint8 bytes: no pickles anywhere)."""
    meta = {"format": INDEX_FORMAT + "/part", "bundle_sha256": part.bundle_sha256,
            "files": [asdict(f) for f in part.files], "skipped": [asdict(s) for s in part.skipped]}
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=np.ascontiguousarray(part.embeddings, dtype=EMBEDDING_DTYPE),
             meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
    return buffer.getvalue()


def parse_part(raw: bytes, uri: str) -> IndexPart:
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
            embeddings, meta_bytes = arrays["embeddings"], arrays["meta"].tobytes()
    except (ValueError, KeyError, OSError) as exc:
        raise FormatError(f"{uri}: not a search index part ({exc})") from None
    meta = parse_json(meta_bytes, uri)
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT + "/part":
        raise FormatError(f"{uri}: not a search index part (format {INDEX_FORMAT}/part expected)")
    files = [_photo(e, uri) for e in meta.get("files") or []]
    if embeddings.dtype != EMBEDDING_DTYPE or embeddings.ndim != 2 or len(embeddings) != len(files):
        raise FormatError(f"{uri}: embeddings {embeddings.dtype} {list(embeddings.shape)} do not match "
                          f"its {len(files)} files")
    return IndexPart(str(meta.get("bundle_sha256")), files, embeddings, _skipped(meta.get("skipped"), uri))


def list_parts(folder: str, storage_cfg: StorageConfig | None = None) -> list[tuple[int, str]]:
    """(number, uri) of each part under `folder`/parts, by number."""
    found = []
    for obj in storage.list_objects(storage.join(folder, PARTS_DIR), storage_cfg):
        match = PART_PATTERN.fullmatch(storage.basename(obj.uri))
        if match:
            found.append((int(match.group(1)), obj.uri))
    return sorted(found)


def write_part(folder: str, number: int, part: IndexPart, storage_cfg: StorageConfig | None = None) -> str:
    uri = storage.join(folder, PARTS_DIR, part_name(number))
    storage.write_bytes(uri, part_bytes(part), storage_cfg)
    return uri


def read_part(uri: str, storage_cfg: StorageConfig | None = None) -> IndexPart:
    return parse_part(storage.read_bytes(uri, storage_cfg), uri)


def remove_parts(folder: str, uris: list[str], storage_cfg: StorageConfig | None = None) -> None:
    """Delete the parts a finished index holds, and the local parts folder once it is empty."""
    for uri in uris:
        storage.delete(uri, storage_cfg)
    parts = storage.join(folder, PARTS_DIR)
    if not storage.is_s3_uri(parts):
        with contextlib.suppress(OSError):  # not empty (a part being written by another run) or not there
            storage.to_local_path(parts).rmdir()
