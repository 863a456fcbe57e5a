"""Candidate sources: where (image, caption) candidates come from, behind one interface.

A source splits its pool into `Partition`s (small, picklable descriptions that a Dask worker can read on its
own) and yields `Candidate`s from each: a stable `source_key`, the caption, a `url` (the image URL for
metadata tables; the file path, tar member or synthetic id for local sources) and, for local sources when asked,
the image itself.

- `table`: (url, caption) metadata tables, Parquet / CSV / TSV / JSONL (CC3M, CC12M, LAION, DataComp style).
  Read with pyarrow in record batches, never whole: a Parquet file splits into partitions of consecutive row
  groups (about `partition_size` rows each); an uncompressed text table splits into byte ranges of about
  `partition_bytes` (TEXT_PARTITION_BYTES by default), each starting at a record start, so that the partitions
  hold every row of the file exactly once (see `text_partition_starts`). A compressed text table (.gz, .bz2,
  .zst, .lz4) cannot be entered in the middle: it is one partition, streamed block by block.
- `folder`: a folder tree of images with sidecar caption files (`cat.jpg` + `cat.txt`).
- `webdataset`: existing webdataset tars (local paths, brace patterns, s3:// URLs), one partition per tar.
- `synthetic`: the built-in generator (clip.synthetic), the embedded default.

    source = make_source(cfg.collect)
    for part in source.partitions():
        for cand in source.iter_candidates(part): ...
"""

from __future__ import annotations

import glob
import logging
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from clip import synthetic
from clip.config import (
    CollectConfig,
    FolderSourceConfig,
    StorageConfig,
    SyntheticSourceConfig,
    TableSourceConfig,
    WebdatasetSourceConfig,
)
from clip.formats.tar import TruncatedTarError, iter_tar_samples

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_TEXT_BLOCK_BYTES = 8 << 20  # pyarrow CSV/JSON block: bounded memory however large the file
TEXT_PARTITION_BYTES = 64 << 20  # default byte range of one text-table partition (what a task holds in memory)
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")


class SourceError(ValueError):
    """A source that cannot be read as configured (missing file or column, unknown format); names the culprit."""


@dataclass
class Candidate:
    source_key: str  # stable identity inside the source: "file:row", a relative path, "tar#key", an index
    caption: str
    url: str | None  # table: the image URL to fetch; local sources: where the image is (for the record)
    image: bytes | Image.Image | None = None  # local sources, when asked for: encoded bytes or rendered pixels


@dataclass(frozen=True)
class Partition:
    index: int
    spec: tuple[Any, ...]  # source-specific; picklable


class CandidateSource(ABC):
    """The interface every source implements."""

    name: str = "?"
    needs_fetch: bool = False  # True: images come from URLs (the fetcher); False: the source holds them

    @abstractmethod
    def partitions(self) -> list[Partition]:
        """The pool split into independently readable parts, in a fixed order."""

    @abstractmethod
    def iter_candidates(self, part: Partition, with_images: bool = False) -> Iterator[Candidate]:
        """Candidates of one partition, in a fixed order (their position is their row number in the partition)."""

    def load_images(self, part: Partition, rows: Sequence[int]) -> dict[int, Candidate]:
        """The candidates at `rows` of a partition, with their images (local sources)."""
        wanted = set(rows)
        found: dict[int, Candidate] = {}
        for row, cand in enumerate(self.iter_candidates(part, with_images=True)):
            if row in wanted:
                found[row] = cand
                if len(found) == len(wanted):
                    break
        return found

    def vocabulary(self) -> list[str]:
        """Queries the source knows to be meaningful (the synthetic world's words and phrases).

        When a source has one and no corpus is given, it replaces mining the captions (`from_captions`):
        template words of generated captions are not worth searching for.
        """
        return []

    def size_hint(self) -> int | None:
        """Number of candidates when known without reading the pool."""
        return None


# ----------------------------------------------------------------------------------------------------------
# helpers


def _expand_local_or_s3(pattern: str, storage_cfg: StorageConfig | None) -> list[str]:
    """A path, glob or brace pattern -> the sorted files it names (s3:// globs are listed under their prefix)."""
    import fnmatch

    from braceexpand import braceexpand

    out: list[str] = []
    for item in braceexpand(pattern):
        if item.startswith("s3://"):
            if any(ch in item for ch in "*?["):
                from clip import storage

                prefix = item[: min(item.index(ch) for ch in "*?[" if ch in item)]
                prefix = prefix.rsplit("/", 1)[0]
                out.extend(o.uri for o in storage.list_objects(prefix, storage_cfg) if fnmatch.fnmatch(o.uri, item))
            else:
                out.append(item)
        elif any(ch in item for ch in "*?["):
            out.extend(sorted(glob.glob(item, recursive=True)))
        else:
            out.append(item)
    return out


def _open_binary(uri: str, storage_cfg: StorageConfig | None):
    if uri.startswith("s3://"):
        from clip import storage

        return storage.open_read(uri, storage_cfg)
    if not os.path.exists(uri):
        raise SourceError(f"input file {uri} does not exist")
    return open(uri, "rb")


def _text_or_empty(value: Any) -> str:
    if isinstance(value, bytes):  # a text column read as bytes (`_column_values`): bad UTF-8 becomes U+FFFD
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def _column_values(batch: Any, column: str) -> list[Any]:
    """A record batch column as Python values, text as bytes: one invalid UTF-8 byte in one caption must not
    refuse the whole file (pyarrow's text readers fail on it), so text is decoded row by row with
    errors="replace", as the folder and webdataset sources read their captions."""
    import pyarrow as pa

    values = batch.column(batch.schema.get_field_index(column))
    if pa.types.is_string(values.type):
        values = values.cast(pa.binary())  # no UTF-8 check, no copy
    elif pa.types.is_large_string(values.type):
        values = values.cast(pa.large_binary())
    return values.to_pylist()


_SCAN_BLOCK_BYTES = 8 << 20


def text_partition_starts(handle: BinaryIO, every: int, csv: bool) -> tuple[list[int], int]:
    """(record starts about `every` bytes apart, file size) of an uncompressed text table read from `handle`.

    A start is the offset just after a newline that ends a record, the first record end at least `every`
    bytes after the previous start; cutting a file at these offsets loses and duplicates no row. `csv`
    (CSV / TSV): the first start is the end of the header record, and a newline inside a quoted field is not
    a record end. The quote state at a newline is the parity of the quote
    characters before it, which is exact for RFC 4180 quoting (a field with a quote is quoted as a whole and
    its quotes doubled, as Python's csv module and pandas write); a bare quote inside an unquoted field flips
    the parity, and a cut placed in a quoted newline after it makes the partitions fail to parse (an error,
    not silently wrong rows). Quote state is a property of everything before a point, so a CSV is read once,
    from its start, in blocks (bounded memory); JSONL has no newline inside a record and could seek instead.
    Offsets equal to the file size are not starts (nothing follows them).
    """
    starts: list[int] = []
    want = 1 if csv else every  # the next start must be >= want (a CSV's first one ends its header)
    position = 0  # file offset of `block`
    quotes = 0  # quote characters before `counted` (file offset)
    while block := handle.read(_SCAN_BLOCK_BYTES):
        counted = 0  # quote characters of this block are counted up to here
        search = max(want - 1 - position, 0)
        while search < len(block):
            newline = block.find(b"\n", search)
            if newline < 0:
                break
            if csv:
                quotes += block.count(b'"', counted, newline)
                counted = newline
                if quotes % 2:  # inside a quoted field: look at the next newline
                    search = newline + 1
                    continue
            starts.append(position + newline + 1)
            want = starts[-1] + every
            search = max(want - 1 - position, newline + 1)
        if csv:
            quotes += block.count(b'"', counted)
        position += len(block)
    return [start for start in starts if start < position], position


def _read_range(uri: str, start: int, stop: int, storage_cfg: StorageConfig | None) -> bytes:
    """Bytes [start, stop) of a local file or s3:// object (a seek locally, an HTTP Range GET on S3)."""
    from clip import storage

    with storage.open_read(uri, storage_cfg, start=start, end=stop) as handle:
        data = handle.read(stop - start)
    if len(data) != stop - start:
        raise SourceError(f"{uri}: shorter than when it was partitioned (bytes {start}-{stop} wanted); "
                          "was it rewritten during the run?")
    return data


# ----------------------------------------------------------------------------------------------------------
# table


def table_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = path.lower()
    for suffix in _COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise SourceError(f"cannot tell the table format of {path} from its extension; set collect.table.format")


class TableSource(CandidateSource):
    """(url, caption) rows from Parquet / CSV / TSV / JSONL metadata tables."""

    name = "table"
    needs_fetch = True

    def __init__(self, cfg: TableSourceConfig, partition_size: int, storage_cfg: StorageConfig | None = None,
                 partition_bytes: int = TEXT_PARTITION_BYTES):
        self.cfg = cfg
        self.partition_size = partition_size  # rows per Parquet partition (whole row groups)
        self.partition_bytes = partition_bytes  # bytes per uncompressed text partition (whole records)
        self.storage_cfg = storage_cfg
        self.files: list[str] = []
        for pattern in cfg.paths:
            found = _expand_local_or_s3(pattern, storage_cfg)
            if not found:
                raise SourceError(f"collect.table.paths: {pattern} matches no file")
            self.files.extend(found)

    def _columns(self) -> list[str]:
        return [self.cfg.url_column, self.cfg.caption_column]

    def _check_columns(self, names: Sequence[str], path: str) -> None:
        for column, key in ((self.cfg.url_column, "url_column"), (self.cfg.caption_column, "caption_column")):
            if column not in names:
                raise SourceError(
                    f"{path}: no column {column!r} (collect.table.{key}); the file has columns {list(names)}"
                )

    def partitions(self) -> list[Partition]:
        import pyarrow.parquet as pq

        parts: list[Partition] = []
        for path in self.files:
            fmt = table_format(path, self.cfg.format)
            if fmt == "parquet":
                with _open_binary(path, self.storage_cfg) as handle:
                    meta = pq.ParquetFile(handle).metadata
                    self._check_columns(meta.schema.names, path)
                # Consecutive row groups up to ~partition_size rows form one partition.
                groups: list[int] = []
                rows = 0
                for group in range(meta.num_row_groups):
                    groups.append(group)
                    rows += meta.row_group(group).num_rows
                    if rows >= self.partition_size:
                        parts.append(Partition(len(parts), ("parquet", path, tuple(groups))))
                        groups, rows = [], 0
                if groups:
                    parts.append(Partition(len(parts), ("parquet", path, tuple(groups))))
            elif path.lower().endswith(_COMPRESSED_SUFFIXES):
                with self._text_reader(path, fmt) as (reader, _handle):
                    self._check_columns(reader.schema.names, path)
                parts.append(Partition(len(parts), (fmt, path, ())))
            else:
                parts.extend(self._text_partitions(path, fmt, len(parts)))
        return parts

    def _text_partitions(self, path: str, fmt: str, first_index: int) -> list[Partition]:
        """An uncompressed CSV / TSV / JSONL file as byte ranges of whole records, in file order.

        Spec: (fmt, path, (start, stop, header)): the records in bytes [start, stop); `header` is a CSV's
        header record (the column names every range is parsed with), b"" for JSONL.
        """
        is_csv = fmt != "jsonl"
        with _open_binary(path, self.storage_cfg) as handle:
            starts, size = text_partition_starts(handle, self.partition_bytes, csv=is_csv)
        header = b""
        data_start = 0
        if is_csv:
            # The first start ends the header; a header-only file has none (its one range is empty).
            data_start = starts.pop(0) if starts else size
            header = _read_range(path, 0, data_start, self.storage_cfg)
            with self._text_reader(path, fmt, data=header) as (reader, _handle):
                self._check_columns(reader.schema.names, path)
        else:
            with self._text_reader(path, fmt) as (reader, _handle):  # the schema of the first block
                self._check_columns(reader.schema.names, path)
        bounds = [data_start, *starts, size]
        return [
            Partition(first_index + i, (fmt, path, (start, stop, header)))
            for i, (start, stop) in enumerate(zip(bounds, bounds[1:], strict=False))
        ]

    class _Reader:
        """A pyarrow batch reader over a whole text file, or over `data` (a partition's bytes) when given."""

        def __init__(self, source: TableSource, path: str, fmt: str, data: bytes | None = None) -> None:
            self.source, self.path, self.fmt, self.data = source, path, fmt, data

        def __enter__(self):
            import pyarrow as pa
            import pyarrow.csv as pacsv
            import pyarrow.json as pajson

            parse_json = pajson.ParseOptions()
            if self.data is not None:
                self.handle = pa.BufferReader(self.data)
                # Both columns as text: a range whose rows all lack a key reads it as null, not as a missing
                # column (the file's columns were checked once, when it was partitioned).
                parse_json = pajson.ParseOptions(
                    explicit_schema=pa.schema([(name, pa.string()) for name in self.source._columns()]),
                    unexpected_field_behavior="ignore",
                )
            elif self.path.startswith("s3://"):
                self.handle = _open_binary(self.path, self.source.storage_cfg)
            else:
                if not os.path.exists(self.path):
                    raise SourceError(f"input file {self.path} does not exist")
                # A path (not a file object) lets pyarrow pick the decompressor from the extension (.gz, .zst...).
                self.handle = pa.input_stream(self.path, compression="detect")
            try:
                if self.fmt == "jsonl":
                    reader = pajson.open_json(
                        self.handle, read_options=pajson.ReadOptions(block_size=_TEXT_BLOCK_BYTES),
                        parse_options=parse_json,
                    )
                else:
                    reader = pacsv.open_csv(
                        self.handle,
                        read_options=pacsv.ReadOptions(block_size=_TEXT_BLOCK_BYTES),
                        parse_options=pacsv.ParseOptions(
                            delimiter="\t" if self.fmt == "tsv" else ",", newlines_in_values=True
                        ),
                        # Everything as bytes: type inference on the first block could guess wrong for later
                        # ones, and a string column refuses the whole file for one invalid UTF-8 byte.
                        convert_options=pacsv.ConvertOptions(
                            column_types=dict.fromkeys(self.source._columns(), pa.binary()),
                            strings_can_be_null=True,
                        ),
                    )
            except Exception as exc:
                self.handle.close()
                raise SourceError(f"{self.path}: cannot be read as {self.fmt}: {exc}") from exc
            return reader, self.handle

        def __exit__(self, *exc_info: object) -> None:
            self.handle.close()

    def _text_reader(self, path: str, fmt: str, data: bytes | None = None) -> TableSource._Reader:
        return TableSource._Reader(self, path, fmt, data)

    def _batches(self, part: Partition) -> Iterator[Any]:
        import pyarrow.parquet as pq

        fmt, path, extent = part.spec
        if fmt == "parquet":
            with _open_binary(path, self.storage_cfg) as handle:
                yield from pq.ParquetFile(handle).iter_batches(
                    batch_size=65536, row_groups=list(extent), columns=self._columns()
                )
            return
        data = None
        if extent:  # a byte range of an uncompressed file (in memory: at most ~partition_bytes)
            start, stop, header = extent
            data = header + _read_range(path, start, stop, self.storage_cfg)
            if not data:
                return  # an empty JSONL file
        with self._text_reader(path, fmt, data) as (reader, _handle):
            self._check_columns(reader.schema.names, path)
            yield from reader

    def iter_candidates(self, part: Partition, with_images: bool = False) -> Iterator[Candidate]:
        _fmt, path, _groups = part.spec
        row = 0
        for batch in self._batches(part):
            urls = _column_values(batch, self.cfg.url_column)
            captions = _column_values(batch, self.cfg.caption_column)
            for url, caption in zip(urls, captions, strict=True):
                yield Candidate(f"{path}:{part.index}:{row}", _text_or_empty(caption), _text_or_empty(url) or None)
                row += 1


# ----------------------------------------------------------------------------------------------------------
# folder


class FolderSource(CandidateSource):
    """Images in a folder tree, each with a sidecar caption file of the same stem."""

    name = "folder"

    def __init__(self, cfg: FolderSourceConfig, partition_size: int) -> None:
        self.cfg = cfg
        self.root = Path(cfg.path or "")
        if not self.root.is_dir():
            raise SourceError(f"collect.folder.path: {self.root} is not a folder")
        self.partition_size = partition_size
        # Sorted relative paths: the order, and so the keys, do not depend on the file system.
        self.images = sorted(
            str(p.relative_to(self.root)) for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )

    def partitions(self) -> list[Partition]:
        return [
            Partition(i, ("folder", tuple(self.images[start:start + self.partition_size])))
            for i, start in enumerate(range(0, len(self.images), self.partition_size))
        ]

    def size_hint(self) -> int | None:
        return len(self.images)

    def iter_candidates(self, part: Partition, with_images: bool = False) -> Iterator[Candidate]:
        for rel in part.spec[1]:
            yield self._candidate(rel, with_images)

    def _candidate(self, rel: str, with_images: bool) -> Candidate:
        image_path = self.root / rel
        sidecar = image_path.with_suffix(self.cfg.caption_extension)
        caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
        return Candidate(rel, caption, str(image_path), image_path.read_bytes() if with_images else None)

    def load_images(self, part: Partition, rows: Sequence[int]) -> dict[int, Candidate]:
        names = part.spec[1]
        return {row: self._candidate(names[row], True) for row in rows}


# ----------------------------------------------------------------------------------------------------------
# webdataset


class WebdatasetSource(CandidateSource):
    """Samples of existing webdataset tars: members sharing a key prefix form one sample."""

    name = "webdataset"

    def __init__(self, cfg: WebdatasetSourceConfig, storage_cfg: StorageConfig | None = None) -> None:
        self.cfg = cfg
        self.storage_cfg = storage_cfg
        self.tars: list[str] = []
        for pattern in cfg.urls:
            found = _expand_local_or_s3(pattern, storage_cfg)
            if not found:
                raise SourceError(f"collect.webdataset.urls: {pattern} matches no tar")
            self.tars.extend(found)

    def partitions(self) -> list[Partition]:
        for tar in self.tars:
            if not tar.startswith("s3://") and not os.path.isfile(tar):
                raise SourceError(f"collect.webdataset.urls: {tar} does not exist")
        return [Partition(i, ("webdataset", tar)) for i, tar in enumerate(self.tars)]

    def _samples(self, tar_uri: str, with_images: bool) -> Iterator[tuple[str, dict[str, bytes | None]]]:
        """(key, {extension: bytes, or None when not read}) per sample, streaming; image members are read only
        when asked for. Gzip-compressed tars are read too."""
        wanted = {self.cfg.caption_key, *self.cfg.image_keys} if with_images else {self.cfg.caption_key}
        yielded = 0
        try:
            with _open_binary(tar_uri, self.storage_cfg) as raw:
                for key, members in iter_tar_samples(raw, want=wanted.__contains__, decompress=True):
                    yield key, members
                    yielded += 1
        except (TruncatedTarError, EOFError, OSError, zlib.error) as exc:
            # A truncated or corrupt tar (common among downloaded shards) must not stop the stage: its complete
            # samples count, the one being read when the damage starts and everything after it are skipped.
            # Every pass over the tar stops at the same place, so the candidate rows stay consistent.
            log.warning("webdataset tar %s is truncated or corrupt after %d samples (%s); the rest is skipped",
                        tar_uri, yielded, exc)

    def iter_candidates(self, part: Partition, with_images: bool = False) -> Iterator[Candidate]:
        tar_uri = part.spec[1]
        for key, fields in self._samples(tar_uri, with_images):
            if not any(k in fields for k in self.cfg.image_keys):
                continue  # no image: not a candidate (e.g. a metadata-only member)
            caption = (fields.get(self.cfg.caption_key) or b"").decode("utf-8", errors="replace").strip()
            image = None
            if with_images:
                image = next((fields[k] for k in self.cfg.image_keys if fields.get(k) is not None), None)
            yield Candidate(f"{tar_uri}#{key}", caption, f"{tar_uri}#{key}", image)


# ----------------------------------------------------------------------------------------------------------
# synthetic


class SyntheticSource(CandidateSource):
    """The built-in generator; candidate i is scene i of the training stream for `seed`."""

    name = "synthetic"

    def __init__(self, cfg: SyntheticSourceConfig, partition_size: int, seed: int) -> None:
        self.cfg = cfg
        self.partition_size = partition_size
        self.seed = seed

    def partitions(self) -> list[Partition]:
        n = self.cfg.num_samples
        return [
            Partition(i, ("synthetic", start, min(n, start + self.partition_size)))
            for i, start in enumerate(range(0, n, self.partition_size))
        ]

    def size_hint(self) -> int | None:
        return self.cfg.num_samples

    def _candidate(self, index: int, with_images: bool) -> Candidate:
        scene = synthetic.make_scene(self.seed, index, heldout_fraction=self.cfg.heldout_fraction)
        image = synthetic.render_scene(scene, self.cfg.image_size) if with_images else None
        return Candidate(str(index), scene.caption, f"synthetic://{self.seed}/{index}", image)

    def iter_candidates(self, part: Partition, with_images: bool = False) -> Iterator[Candidate]:
        _, start, stop = part.spec
        for index in range(start, stop):
            yield self._candidate(index, with_images)

    def load_images(self, part: Partition, rows: Sequence[int]) -> dict[int, Candidate]:
        start = part.spec[1]
        return {row: self._candidate(start + row, True) for row in rows}

    def vocabulary(self) -> list[str]:
        return synthetic.vocabulary(self.cfg.heldout_fraction)


def make_source(cfg: CollectConfig, storage_cfg: StorageConfig | None = None) -> CandidateSource:
    """The source `collect.source` names, built from its section."""
    if cfg.source == "table":
        return TableSource(cfg.table, cfg.partition_size, storage_cfg)
    if cfg.source == "folder":
        return FolderSource(cfg.folder, cfg.partition_size)
    if cfg.source == "webdataset":
        return WebdatasetSource(cfg.webdataset, storage_cfg)
    if cfg.source == "synthetic":
        return SyntheticSource(cfg.synthetic, cfg.partition_size, cfg.seed)
    raise SourceError(f"unknown collect.source {cfg.source!r}")

