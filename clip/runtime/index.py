"""Photo search with the shipped model: index a folder with a bundle, then search it by text or by image. No torch.

    bundle = Bundle.load("models/bundle")
    built = build_index(bundle, "~/Photos", "photos.index")          # resumable; built.index.skipped: undecodable
    index = SearchIndex.open("photos.index")
    hits = index.search_text(bundle, "a red car at night", top=10)  # [Hit(file, score), ...], best first

What a caller can rely on (the layout is clip.formats.index's):
- **Resumable.** Images are embedded in parts of `part_size` files, each written atomically under
  `INDEX/parts/` as soon as it is done; a rerun (after a crash, or with new photos) reuses every file already in a
  part or in the existing index whose size and mtime are unchanged, and embeds only the rest. The final index is
  written atomically, then the parts are removed. `CLIP_INDEX_FAIL_AFTER_PARTS=N` raises after N parts (the
  crash the tests plant).
- **Undecodable files are skipped and listed** (`IndexHeader.skipped`: file and reason); the others are indexed.
  Only files with an image extension PIL knows are looked at; hidden files and folders are not.
- **One model.** An index records its bundle's sha256 (clip.formats.index.bundle_sha256); querying it with a
  bundle of another sha256, or adding to it with one, is refused naming both.
- **Exact search** by matrix product, `chunk_rows` rows at a time: cosine similarity of unit vectors, best first,
  ties by file order. An index of up to `resident_bytes` as float32 (default 2 GiB: 1M x 512) is converted once
  and kept; a larger one is read from its memory-mapped float16 file chunk by chunk per query, so memory stays
  bounded at any size.
  `backend="faiss"` (optional extra: `pip install faiss-cpu`) searches an IVF index instead, built on first use and
  saved beside the index; BENCHMARKS.md "Search" says where it starts to pay.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from clip import storage
from clip.config import StorageConfig
from clip.formats.errors import FormatError, MissingInputError
from clip.formats.index import (
    EMBEDDING_DTYPE,
    IndexHeader,
    IndexPart,
    PhotoFile,
    SkippedFile,
    bundle_sha256,
    faiss_name,
    list_parts,
    read_index,
    read_index_header,
    read_part,
    remove_parts,
    write_index,
    write_part,
)
from clip.progress import Progress
from clip.runtime.bundle import Bundle, load_image

FAIL_AFTER_PARTS_ENV = "CLIP_INDEX_FAIL_AFTER_PARTS"
DEFAULT_PART_SIZE = 256
DEFAULT_CHUNK_ROWS = 32768  # 32768 x 512 float32 = 64 MiB per block of the matrix product
# Exact search keeps a float32 copy of an index up to this size (1M x 512 fits): numpy's float16 -> float32
# conversion, redone per query otherwise, costs about 3x the product itself (BENCHMARKS.md "Search").
DEFAULT_RESIDENT_BYTES = 2 << 30
BACKENDS = ("exact", "faiss")


def check_same_model(index_sha256: str, bundle: Bundle, what: str) -> None:
    """Refuse a bundle whose sha256 is not the one `what` (an index, a part) was built with, naming both."""
    sha = bundle_sha256(bundle.manifest)
    if sha != index_sha256:
        raise FormatError(f"{what} was built with bundle sha256 {index_sha256}, not with bundle {bundle.folder} "
                          f"(sha256 {sha}): its embeddings belong to another model; query it with the bundle it was "
                          "built with, or index again")


def list_photos(root: Path) -> list[PhotoFile]:
    """Every file under `root` whose extension PIL can open, hidden files and folders left out, by path."""
    extensions = {ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN}
    photos = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in extensions:
                continue
            path = Path(folder, name)
            stat = path.stat()
            photos.append(PhotoFile(path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(photos, key=lambda photo: photo.path)


@dataclass(frozen=True)
class BuildResult:
    index: IndexHeader
    embedded: int  # files decoded and embedded by this run
    reused: int  # files (embedded or undecodable) taken from earlier parts or the earlier index
    parts_written: int


def _embed_part(bundle: Bundle, root: Path, photos: Sequence[PhotoFile], sha: str, batch_size: int) -> IndexPart:
    """Decode, preprocess and embed `photos` a batch at a time (only one batch of decoded images in memory)."""
    files: list[PhotoFile] = []
    skipped: list[SkippedFile] = []
    blocks: list[np.ndarray] = []
    for start in range(0, len(photos), batch_size):
        pixels = []
        for photo in photos[start:start + batch_size]:
            try:
                pixels.append(bundle.preprocess([load_image(root / photo.path, name=photo.path)]))
                files.append(photo)
            except FormatError as exc:
                skipped.append(SkippedFile(photo, str(exc)))
        if pixels:
            embeddings = bundle.encode_images(np.concatenate(pixels), batch_size=batch_size, normalize=True)
            blocks.append(embeddings.astype(EMBEDDING_DTYPE))
    embed_dim = int(bundle.info.get("embed_dim") or 0)
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, embed_dim), dtype=EMBEDDING_DTYPE)
    return IndexPart(sha, files, matrix, skipped)


def build_index(bundle: Bundle, photos_dir: str | Path, out: str, *, part_size: int = DEFAULT_PART_SIZE,
                batch_size: int = 32, storage_cfg: StorageConfig | None = None,
                progress: Progress | None = None) -> BuildResult:
    """Embed every photo under `photos_dir` with `bundle` into the index at `out` (local folder or s3:// prefix),
    reusing what an earlier (interrupted) run already embedded. Returns the index written and what this run did."""
    if part_size < 1 or batch_size < 1:
        raise ValueError(f"part_size and batch_size must be at least 1, got {part_size} and {batch_size}")
    root = Path(photos_dir).expanduser().resolve()
    if not root.is_dir():
        raise MissingInputError(f"photo folder {photos_dir} is not a folder")
    sha = bundle_sha256(bundle.manifest)
    done: dict[PhotoFile, np.ndarray | str] = {}  # a file as seen -> its embedding row, or why it was skipped
    previous = read_index_header(out, storage_cfg)
    if previous is not None:
        check_same_model(previous.bundle_sha256, bundle, f"search index {out}")
        if previous.root != str(root):
            raise ValueError(f"search index {out} indexes {previous.root}, not {root}: choose another --out")
        header, embeddings = read_index(out, storage_cfg)
        done.update(zip(header.files, embeddings, strict=True))
        done.update((entry.file, entry.error) for entry in header.skipped)
    parts = list_parts(out, storage_cfg)
    for _, uri in parts:
        part = read_part(uri, storage_cfg)
        check_same_model(part.bundle_sha256, bundle, f"search index part {uri}")
        done.update(zip(part.files, part.embeddings, strict=True))
        done.update((entry.file, entry.error) for entry in part.skipped)

    photos = list_photos(root)
    todo = [photo for photo in photos if photo not in done]
    fail_after = int(os.environ.get(FAIL_AFTER_PARTS_ENV) or 0)
    next_number = parts[-1][0] + 1 if parts else 0
    reused, written, embedded = len(photos) - len(todo), [], 0
    undecodable = sum(isinstance(done[photo], str) for photo in photos if photo in done)
    if progress is not None:
        progress("index: images", reused, len(photos), f"{undecodable} undecodable")
    for start in range(0, len(todo), part_size):
        part = _embed_part(bundle, root, todo[start:start + part_size], sha, batch_size)
        written.append(write_part(out, next_number + len(written), part, storage_cfg))
        embedded += len(part.files)
        done.update(zip(part.files, part.embeddings, strict=True))
        done.update((entry.file, entry.error) for entry in part.skipped)
        undecodable += len(part.skipped)
        if progress is not None:
            progress("index: images", reused + start + len(part.files) + len(part.skipped), len(photos),
                     f"{undecodable} undecodable")
        if fail_after and len(written) >= fail_after:
            raise RuntimeError(f"{FAIL_AFTER_PARTS_ENV}={fail_after}: stopped after {len(written)} parts")

    indexed = [photo for photo in photos if not isinstance(done[photo], str)]
    embed_dim = int(bundle.info.get("embed_dim") or 0)
    matrix = (np.stack([done[photo] for photo in indexed]) if indexed  # type: ignore[misc]
              else np.zeros((0, embed_dim), dtype=EMBEDDING_DTYPE))
    location = bundle.folder if storage.is_s3_uri(bundle.folder) else os.path.abspath(bundle.folder)
    skipped = [SkippedFile(photo, str(done[photo])) for photo in photos if isinstance(done[photo], str)]
    header = IndexHeader(
        bundle_sha256=sha, bundle=location, model=str(bundle.info.get("model") or ""), embed_dim=matrix.shape[1],
        root=str(root), files=indexed, skipped=skipped, embeddings="", embeddings_sha256="")
    header = write_index(out, header, matrix, storage_cfg)
    remove_parts(out, [uri for _, uri in parts] + written, storage_cfg)  # the index now holds them all
    return BuildResult(header, embedded=embedded, reused=reused, parts_written=len(written))


# -- search ----------------------------------------------------------------------------------------------------


def _keep_best(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best of one query's candidates (scores [M], rows [M]): by score, ties by the lower row, so the
    result does not depend on how the rows were chunked."""
    if len(scores) <= k:
        return scores, rows
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th largest score
    above, tied = np.flatnonzero(scores > kth), np.flatnonzero(scores == kth)
    keep = np.concatenate([above, tied[np.argsort(rows[tied], kind="stable")][:k - len(above)]])
    return scores[keep], rows[keep]


def exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int,
                chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The `k` rows of `embeddings` [N, D] (any float dtype, memory-mapped is fine) with the largest dot product
    with each of `queries` [Q, D]: (indices int64 [Q, k'], scores float32 [Q, k']), best first, ties by row;
    k' = min(k, N). Reads `chunk_rows` rows at a time, so memory is O(chunk_rows * (D + Q) + Q * k)."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    k = max(0, min(k, len(embeddings)))
    best = [(np.zeros(0, np.float32), np.zeros(0, np.int64)) for _ in queries]
    # float16 rows are converted into one reused buffer: a fresh float32 array per chunk costs page faults
    buffer = None if embeddings.dtype == np.float32 else np.empty((min(chunk_rows, len(embeddings)),
                                                                     embeddings.shape[1]), np.float32)
    for start in range(0, len(embeddings) if k else 0, chunk_rows):
        rows_here = embeddings[start:start + chunk_rows]
        block = rows_here if buffer is None else buffer[:len(rows_here)]  # [R, D] float32
        if buffer is not None:
            np.copyto(block, rows_here)
        block_scores = queries @ block.T  # [Q, R]
        block_rows = np.arange(start, start + len(block))
        best = [_keep_best(np.concatenate([scores, block_scores[q]]), np.concatenate([rows, block_rows]), k)
                for q, (scores, rows) in enumerate(best)]
    order = [np.lexsort((rows, -scores)) for scores, rows in best]  # score descending, then row ascending
    return (np.array([rows[o] for (_, rows), o in zip(best, order, strict=True)], dtype=np.int64).reshape(-1, k),
            np.array([scores[o] for (scores, _), o in zip(best, order, strict=True)], np.float32).reshape(-1, k))


class MissingExtraError(ImportError):
    """An optional package a chosen option needs is not installed (a clip error: the CLI reports it in one line)."""


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MissingExtraError("the faiss backend needs the optional faiss-cpu package (pip install faiss-cpu); exact "
                          "search, the default, needs nothing more") from None
    return faiss


@dataclass(frozen=True)
class Hit:
    file: str  # the photo's path: the index's root joined with its relative path
    score: float  # cosine similarity to the query


class SearchIndex:
    """An index opened for search (build with `SearchIndex.open`). `embeddings` is float16 [count, embed_dim]."""

    def __init__(self, location: str, header: IndexHeader, embeddings: np.ndarray,
                 storage_cfg: StorageConfig | None = None, resident_bytes: int = DEFAULT_RESIDENT_BYTES) -> None:
        self.location, self.header, self.embeddings, self.storage_cfg = location, header, embeddings, storage_cfg
        self.resident_bytes = resident_bytes
        self._resident: np.ndarray | None = None
        self._faiss: Any = None

    @classmethod
    def open(cls, location: str | Path, storage_cfg: StorageConfig | None = None,
             resident_bytes: int = DEFAULT_RESIDENT_BYTES) -> SearchIndex:
        """`resident_bytes`: the largest index (as float32) exact search converts once and keeps in memory;
        a larger one is converted chunk by chunk per query (memory O(chunk), slower)."""
        header, embeddings = read_index(str(location), storage_cfg)
        return cls(str(location), header, embeddings, storage_cfg, resident_bytes)

    def _exact_matrix(self) -> np.ndarray:
        if self._resident is None and self.embeddings.size * 4 <= self.resident_bytes:
            self._resident = np.asarray(self.embeddings, dtype=np.float32)
        return self.embeddings if self._resident is None else self._resident

    def __len__(self) -> int:
        return self.header.count

    def check_bundle(self, bundle: Bundle) -> None:
        check_same_model(self.header.bundle_sha256, bundle, f"search index {self.location}")

    def load_bundle(self, bundle: str | None = None, **load_options: Any) -> Bundle:
        """The bundle at `bundle` (default: where the index was built from), refused unless it is the index's."""
        loaded = Bundle.load(bundle or self.header.bundle, self.storage_cfg, **load_options)
        self.check_bundle(loaded)
        return loaded

    def search_vectors(self, queries: np.ndarray, top: int = 10, *, backend: str = "exact",
                       chunk_rows: int = DEFAULT_CHUNK_ROWS, nprobe: int = 32) -> list[list[Hit]]:
        """Per query vector [Q, D] (unit vectors; one [D] vector is one query), its `top` best files."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.header.embed_dim:
            raise ValueError(f"query vectors have {queries.shape[1]} dimensions, the index {self.header.embed_dim}")
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        if backend == "exact":
            rows, scores = exact_top_k(self._exact_matrix(), queries, top, chunk_rows)
        elif backend == "faiss":
            index = self.faiss_index()
            index.nprobe = nprobe
            scores, rows = index.search(queries, min(top, len(self)))
        else:
            raise ValueError(f"backend {backend!r}: expected one of {list(BACKENDS)}")
        root, files = self.header.root, self.header.files
        return [[Hit(storage.join(root, files[r].path), float(s)) for r, s in zip(row, score, strict=True) if r >= 0]
                for row, score in zip(rows, scores, strict=True)]

    def search_text(self, bundle: Bundle, text: str, top: int = 10, **options: Any) -> list[Hit]:
        self.check_bundle(bundle)
        return self.search_vectors(bundle.encode_texts([text], normalize=True), top, **options)[0]

    def search_image(self, bundle: Bundle, image: PIL.Image.Image, top: int = 10, **options: Any) -> list[Hit]:
        self.check_bundle(bundle)
        return self.search_vectors(bundle.encode_images([image], normalize=True), top, **options)[0]

    def faiss_index(self) -> Any:
        """The IVF index over the embeddings (inner product, float16 storage): read from beside the index when an
        earlier search saved it, else trained (sqrt(N) lists, k-means on 64 vectors per list), filled and saved."""
        if self._faiss is not None:
            return self._faiss
        faiss = _import_faiss()
        uri = storage.join(self.location, faiss_name(self.header.embeddings_sha256))
        try:
            self._faiss = faiss.deserialize_index(np.frombuffer(storage.read_bytes(uri, self.storage_cfg), np.uint8))
            return self._faiss
        except FileNotFoundError:
            pass
        lists = max(1, min(int(np.sqrt(len(self))), len(self) // 39))  # faiss wants >= 39 training points a list
        index = faiss.index_factory(self.header.embed_dim, f"IVF{lists},SQfp16", faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).permutation(len(self))[:64 * lists]
        index.train(np.asarray(self.embeddings[np.sort(sample)], dtype=np.float32))
        for start in range(0, len(self), DEFAULT_CHUNK_ROWS):
            index.add(np.asarray(self.embeddings[start:start + DEFAULT_CHUNK_ROWS], dtype=np.float32))
        storage.write_bytes(uri, faiss.serialize_index(index).tobytes(), self.storage_cfg)
        self._faiss = index
        return index
