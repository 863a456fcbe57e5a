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

Modules: base (`CandidateSource`, `Candidate`, `Partition`, `SourceError`, the path and object helpers), one per
source (table, folder, webdataset, synthetic). Import from this package: `from clip.collect.sources import make_source`.
"""

from __future__ import annotations

from clip.collect.sources.base import Candidate, CandidateSource, Partition, SourceError
from clip.collect.sources.folder import FolderSource
from clip.collect.sources.synthetic import SyntheticSource
from clip.collect.sources.table import TEXT_PARTITION_BYTES, TableSource, table_format, text_partition_starts
from clip.collect.sources.webdataset import WebdatasetSource
from clip.config import CollectConfig, StorageConfig

__all__ = [
    "TEXT_PARTITION_BYTES", "Candidate", "CandidateSource", "FolderSource", "Partition", "SourceError",
    "SyntheticSource", "TableSource", "WebdatasetSource", "make_source", "table_format", "text_partition_starts",
]


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
