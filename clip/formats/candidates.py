"""`candidates.parquet`: every candidate the collect stage saw, one row each (docs/formats.md "Raw shards").

Columns, all strings (null where a row has no value): `key, url, caption, query, status, reason, shard`.
`status` is one of CANDIDATE_STATUSES. The file sits beside the raw shards in `collect.output_dir` and is
rewritten whole on every run. `write_candidates` streams it one batch at a time (a partition of candidates need
not fit in memory twice) through `clip.storage.write_stream`, so it appears under its name only once complete:
locally through a temporary file beside it, on S3 in one upload.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from clip import storage
from clip.config import StorageConfig

if TYPE_CHECKING:
    import pyarrow as pa

CANDIDATES_NAME = "candidates.parquet"
CANDIDATE_COLUMNS = ("key", "url", "caption", "query", "status", "reason", "shard")
CANDIDATE_STATUSES = ("ok", "failed", "filtered", "skipped")


def candidates_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([(name, pa.string()) for name in CANDIDATE_COLUMNS])


def candidates_uri(output_dir: str) -> str:
    return storage.join(output_dir, CANDIDATES_NAME)


def write_candidates(output_dir: str, batches: Iterable[Mapping[str, Sequence[Any]]],
                     storage_cfg: StorageConfig | None = None) -> int:
    """Write `output_dir/candidates.parquet` from `batches` (each: column name -> that column's values, every
    column of CANDIDATE_COLUMNS, all of one length; one parquet row group each); returns the file's size.

    The batches are consumed while the file is written; if one raises, nothing is published and the previous
    file (if any) stays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = candidates_schema()

    def fill(handle: BinaryIO) -> None:
        with pq.ParquetWriter(handle, schema) as writer:
            for batch in batches:
                if set(batch) != set(CANDIDATE_COLUMNS):
                    raise ValueError(f"a {CANDIDATES_NAME} batch has columns {sorted(batch)}, expected "
                                     f"{list(CANDIDATE_COLUMNS)}")
                bad = sorted({status for status in batch["status"] if status not in CANDIDATE_STATUSES})
                if bad:
                    raise ValueError(f"{CANDIDATES_NAME}: unknown status {bad}, expected one of {CANDIDATE_STATUSES}")
                writer.write_table(pa.table({name: batch[name] for name in CANDIDATE_COLUMNS}, schema=schema))

    return storage.write_stream(candidates_uri(output_dir), fill, storage_cfg)
