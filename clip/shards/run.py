"""The shard stage end to end: kept keys -> shuffled shards -> published data version."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from clip import storage
from clip.config import ShardConfig, StorageConfig
from clip.dedup.raw import MissingInputError, StaleInputError, list_raw_shards, shard_name
from clip.shards.publish import publish
from clip.shards.writer import index_raw_members, plan_shards, shuffled_keys, write_shards

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (task description, done, total)
STAGED_SUFFIX = ".tmp-staged"  # local output: ".<shard>.tmp-staged" beside the final name (never listed)


@dataclass(frozen=True)
class KeepList:
    """dedup's keep.parquet: which raw samples go into training, and the image each must still be."""

    path: str
    shard_of: dict[str, str]  # kept key -> raw shard name
    sha256_of: dict[str, str]  # kept key -> image sha256 from the raw JSON when dedup ran


def read_keep(dedup_dir: str, input_dir: str) -> KeepList:
    """dedup's keep.parquet; refused when it has no `sha256` column (written before keep-lists carried one, so
    it cannot be checked against the raw pool in `input_dir`)."""
    path = Path(dedup_dir) / "keep.parquet"
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist (run the dedup stage first)")
    columns = pq.read_schema(path).names
    missing = [c for c in ("key", "shard") if c not in columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing} (see docs/formats.md \"Dedup output\")")
    if "sha256" not in columns:
        raise StaleInputError(f"{path} does not match the raw pool in {input_dir}: rerun `clip-pipeline dedup` "
                              "(it has no sha256 column: an older dedup wrote it, so it cannot be verified)")
    table = pq.read_table(path, columns=["key", "shard", "sha256"])
    keys = table.column("key").to_pylist()
    return KeepList(path=str(path),
                    shard_of=dict(zip(keys, table.column("shard").to_pylist(), strict=True)),
                    sha256_of=dict(zip(keys, table.column("sha256").to_pylist(), strict=True)))


def local_raw_shards(input_uri: str, needed: set[str], staging_dir: str,
                     storage_cfg: StorageConfig | None = None) -> dict[str, Path]:
    """Raw shard name -> local file; s3:// shards that hold kept samples are downloaded into the staging dir
    (kept there: a re-run downloads only shards whose size changed)."""
    uris = {shard_name(u): u for u in list_raw_shards(input_uri, storage_cfg)}
    if not storage.is_s3_uri(input_uri):
        return {name: Path(uri) for name, uri in uris.items()}
    sizes = {shard_name(o.uri): o.size for o in storage.get_storage(input_uri, storage_cfg).list(input_uri)}
    cache = Path(staging_dir) / "raw"
    local: dict[str, Path] = {}
    for name in sorted(needed & set(uris)):
        target = cache / name
        if not (target.is_file() and target.stat().st_size == sizes.get(name)):
            storage.download_file(uris[name], target, storage_cfg)
        local[name] = target
    return local


def run_sharding(cfg: ShardConfig, storage_cfg: StorageConfig | None = None,
                 progress: ProgressFn | None = None) -> dict[str, Any]:
    """Write and publish the training shards; returns the stage metrics (manifest fields included)."""
    def report(task: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(task, done, total))

    start = time.monotonic()
    keep_list = read_keep(cfg.dedup_dir, cfg.input_dir)
    keep = keep_list.shard_of
    if not keep:
        raise ValueError(f"{keep_list.path} has no samples: nothing to shard")
    raw = local_raw_shards(cfg.input_dir, set(keep.values()), cfg.staging_dir, storage_cfg)
    # Every kept key's raw JSON must still carry the image sha256 dedup saw; otherwise nothing is written.
    index = index_raw_members(raw, keep, report("indexing raw shards"), expected_sha256=keep_list.sha256_of,
                              keep_path=keep_list.path, input_dir=cfg.input_dir)
    plans = plan_shards(shuffled_keys(list(keep), cfg.seed), index, cfg.samples_per_shard, cfg.max_shard_bytes)
    indexed_s = time.monotonic() - start

    remote = storage.is_s3_uri(cfg.output)
    if remote:
        def dest_for(name: str) -> Path:
            return Path(cfg.staging_dir) / name

        planned = {plan.name for plan in plans}
        for old in Path(cfg.staging_dir).glob("shard-*.tar"):  # a previous, larger version's leftovers
            if old.name not in planned:
                old.unlink()
    else:
        def dest_for(name: str) -> Path:
            return Path(cfg.output) / f".{name}{STAGED_SUFFIX}"

    tick = time.monotonic()
    workers = min(4, os.cpu_count() or 1)
    try:
        shards = write_shards(plans, index, dest_for, workers=workers, progress=report("writing shards"))
        write_s = time.monotonic() - tick
        tick = time.monotonic()
        result = publish(shards, cfg.output, storage_cfg, cfg.upload_workers, progress=report("publishing shards"))
    finally:
        if not remote:  # staged local tars not renamed into place (a failure) must not linger
            for plan in plans:
                dest_for(plan.name).unlink(missing_ok=True)
    publish_s = time.monotonic() - tick
    total_bytes = sum(s.bytes for s in shards)
    manifest = result.manifest
    return {
        "data_version": manifest["data_version"],
        "total_samples": manifest["total_samples"],
        "shards": len(shards),
        "bytes": total_bytes,
        "output": cfg.output,
        "raw_shards_read": len(index.paths),
        "uploaded": result.uploaded,
        "skipped_identical": result.skipped,
        "removed_stale": result.removed_stale,
        "index_seconds": indexed_s,
        "write_seconds": write_s,
        "publish_seconds": publish_s,
        "write_mb_per_s": total_bytes / 1e6 / write_s if write_s > 0 else None,
        "seconds": time.monotonic() - start,
    }
