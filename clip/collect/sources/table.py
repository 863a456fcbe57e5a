"""The `table` source: (url, caption) rows of Parquet / CSV / TSV / JSONL metadata tables, read with pyarrow in
record batches and split into partitions of whole row groups or whole-record byte ranges (package docstring)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from clip.collect.sources.base import (
    Candidate,
    CandidateSource,
    Partition,
    SourceError,
    expand_all,
    open_binary,
)
from clip.config import StorageConfig, TableSourceConfig

_TEXT_BLOCK_BYTES = 8 << 20  # pyarrow CSV/JSON block: bounded memory however large the file
TEXT_PARTITION_BYTES = 64 << 20  # default byte range of one text-table partition (what a task holds in memory)
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")


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
        self.files = expand_all(cfg.paths, "collect.table.paths", "file", storage_cfg)

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
                with open_binary(path, self.storage_cfg) as handle:
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
        with open_binary(path, self.storage_cfg) as handle:
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
                self.handle = open_binary(self.path, self.source.storage_cfg)
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
            with open_binary(path, self.storage_cfg) as handle:
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
