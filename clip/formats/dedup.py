"""The dedup stage's output, read by the shard stage (docs/formats.md "Dedup output").

Under `dedup.output_dir` (local folder or s3:// prefix), each file written atomically through `clip.storage`:
- `keep.parquet`: `key, shard, sha256`, sorted by key: the raw samples that go into training. `sha256` is the
  image sha256 from the sample's raw `{key}.json`; it ties the list to the raw pool it was computed from.
- `removed.parquet`: `key, reason, duplicate_of, shard`, sorted by key; reason is one of `REMOVAL_REASONS`.
- `overlap_report.json`: per evaluation dataset, what matched it.
`read_keep_list` refuses a keep-list written before it carried `sha256` (StaleInputError), so a reader can
always verify the keep-list against the raw pool.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clip import storage
from clip.config import StorageConfig
from clip.formats.errors import FormatError, MissingInputError, StaleInputError

KEEP_NAME = "keep.parquet"
REMOVED_NAME = "removed.parquet"
OVERLAP_REPORT_NAME = "overlap_report.json"
REMOVAL_REASONS = ("exact_sha256", "exact_caption_image", "near_duplicate", "eval_overlap")


@dataclass(frozen=True)
class KeepList:
    """keep.parquet: which raw samples go into training, and the image each must still be."""

    uri: str
    shard_of: dict[str, str]  # kept key -> raw shard name
    sha256_of: dict[str, str]  # kept key -> image sha256 from the raw JSON when dedup ran
    caption_of: dict[str, str]  # kept key -> clip.formats.raw.caption_digest of its caption when dedup ran

    @property
    def path(self) -> str:  # the location, as error messages name it
        return self.uri


def _write_parquet(table: pa.Table, uri: str, storage_cfg: StorageConfig | None) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue().to_pybytes(), storage_cfg)  # atomic


def write_keep_list(output_dir: str, keys: Sequence[str], shards: Sequence[str], sha256: Sequence[str],
                    caption_digests: Sequence[str], storage_cfg: StorageConfig | None = None) -> str:
    """Write keep.parquet (rows sorted by key; `caption_digests`: clip.formats.raw.caption_digest of each
    caption); returns its URI."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    uri = storage.join(output_dir, KEEP_NAME)
    _write_parquet(pa.table({
        "key": pa.array([keys[i] for i in order], pa.string()),
        "shard": pa.array([shards[i] for i in order], pa.string()),
        "sha256": pa.array([sha256[i] for i in order], pa.string()),
        "caption_digest": pa.array([caption_digests[i] for i in order], pa.string()),
    }), uri, storage_cfg)
    return uri


def write_removed_list(output_dir: str, keys: Sequence[str], reasons: Sequence[str],
                       duplicate_of: Sequence[str | None], shards: Sequence[str],
                       storage_cfg: StorageConfig | None = None) -> str:
    """Write removed.parquet (rows sorted by key); returns its URI."""
    unknown = sorted(set(reasons) - set(REMOVAL_REASONS))
    if unknown:
        raise ValueError(f"unknown removal reason(s) {unknown}; expected one of {REMOVAL_REASONS}")
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    uri = storage.join(output_dir, REMOVED_NAME)
    _write_parquet(pa.table({
        "key": pa.array([keys[i] for i in order], pa.string()),
        "reason": pa.array([reasons[i] for i in order], pa.string()),
        "duplicate_of": pa.array([duplicate_of[i] for i in order], pa.string()),
        "shard": pa.array([shards[i] for i in order], pa.string()),
    }), uri, storage_cfg)
    return uri


def write_overlap_report(output_dir: str, report: dict[str, Any], storage_cfg: StorageConfig | None = None) -> str:
    uri = storage.join(output_dir, OVERLAP_REPORT_NAME)
    storage.write_bytes(uri, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode("utf-8"), storage_cfg)
    return uri


def _read_parquet(uri: str, storage_cfg: StorageConfig | None) -> pa.Table:
    try:
        raw = storage.read_bytes(uri, storage_cfg)
    except FileNotFoundError:
        raise MissingInputError(f"{uri} does not exist (run the dedup stage first)") from None
    try:
        # ParquetFile.read, not pq.read_table: read_table goes through the dataset scanner, which decodes row
        # groups on Arrow's CPU pool even with use_threads=False, and that pool thread can hold the last reference
        # to `raw` (a Python object). Run late (busy CPUs) it releases it while the interpreter finalizes, needs
        # the GIL, is ended by CPython inside a C++ destructor and std::terminate aborts the process (exit 134).
        # ParquetFile.read with use_threads=False reads on this thread: no pool thread is ever started.
        return pq.ParquetFile(pa.BufferReader(raw)).read(use_threads=False)
    except pa.ArrowInvalid as exc:
        raise FormatError(f"{uri} is not a Parquet file ({exc})") from None


def read_keep_list(dedup_dir: str, input_dir: str, storage_cfg: StorageConfig | None = None) -> KeepList:
    """dedup's keep.parquet; refused when it has no `sha256` or `caption_digest` column (written before keep-lists
    carried them, so it cannot be checked against the raw pool in `input_dir`)."""
    uri = storage.join(dedup_dir, KEEP_NAME)
    table = _read_parquet(uri, storage_cfg)
    missing = [c for c in ("key", "shard") if c not in table.column_names]
    if missing:
        raise FormatError(f"{uri} lacks column(s) {missing} (see docs/formats.md \"Dedup output\")")
    for column in ("sha256", "caption_digest"):
        if column not in table.column_names:
            raise StaleInputError(f"{uri} does not match the raw pool in {input_dir}: rerun `clip-pipeline dedup` "
                                  f"(it has no {column} column: an older dedup wrote it, so it cannot be verified)")
    keys = table.column("key").to_pylist()
    return KeepList(uri=uri,
                    shard_of=dict(zip(keys, table.column("shard").to_pylist(), strict=True)),
                    sha256_of=dict(zip(keys, table.column("sha256").to_pylist(), strict=True)),
                    caption_of=dict(zip(keys, table.column("caption_digest").to_pylist(), strict=True)))


def read_removed_list(dedup_dir: str, storage_cfg: StorageConfig | None = None) -> pa.Table:
    """removed.parquet as an Arrow table (`key, reason, duplicate_of, shard`)."""
    return _read_parquet(storage.join(dedup_dir, REMOVED_NAME), storage_cfg)
