"""The shard stage end to end: kept keys -> shuffled shards -> published data version.

    from clip.shards import stage
    result = stage.run(cfg.shard, storage=cfg.storage, compute=cfg.compute, progress=progress)
    result.data_version, result.outputs["manifest"]

Reads `shard.dedup_dir`'s keep-list and the raw shards in `shard.input_dir`, checks every kept key's image sha256
against the raw JSON (nothing is written for a stale keep-list), writes shuffled byte-deterministic tars and
publishes them with `sizes.json` and `manifest.json` (last) to `shard.output`, a folder or s3:// prefix
(docs/formats.md "Training shards and manifest"). Progress tasks: "indexing raw shards", "writing shards",
"publishing shards".
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from clip import storage as storage_lib
from clip.config import ComputeConfig, ShardConfig, StorageConfig, TrackingConfig
from clip.formats.dedup import read_keep_list
from clip.formats.manifest import SIZES_NAME, is_shard_name, manifest_uri
from clip.formats.raw import list_raw_shards
from clip.progress import Progress, for_task
from clip.result import StageResult
from clip.shards.publish import publish
from clip.shards.writer import index_raw_members, plan_shards, shuffled_keys, write_shards

log = logging.getLogger(__name__)

STAGED_SUFFIX = ".tmp-staged"  # local output: ".<shard>.tmp-staged" beside the final name (never listed)


@dataclass(kw_only=True)
class ShardResult(StageResult):
    """metrics: counts, bytes, timings and the manifest fields; outputs: `shards` (the data location), `manifest`,
    `sizes`; data_version and total_samples: the published version (what train tags its run with)."""

    data_version: str
    total_samples: int


def local_raw_shards(input_uri: str, needed: set[str], staging_dir: str,
                     storage_cfg: StorageConfig | None = None) -> dict[str, Path]:
    """Raw shard name -> local file; s3:// shards that hold kept samples are downloaded into the staging dir
    (kept there: a re-run downloads only shards whose size changed)."""
    uris = {storage_lib.basename(u): u for u in list_raw_shards(input_uri, storage_cfg)}
    if not storage_lib.is_s3_uri(input_uri):
        return {name: Path(uri) for name, uri in uris.items()}
    sizes = {storage_lib.basename(o.uri): o.size
             for o in storage_lib.get_storage(input_uri, storage_cfg).list(input_uri)}
    cache = Path(staging_dir) / "raw"
    local: dict[str, Path] = {}
    for name in sorted(needed & set(uris)):
        target = cache / name
        if not (target.is_file() and target.stat().st_size == sizes.get(name)):
            storage_lib.download_file(uris[name], target, storage_cfg)
        local[name] = target
    return local


def run(
    cfg: ShardConfig, *, storage: StorageConfig, compute: ComputeConfig, tracking: TrackingConfig | None = None,
    progress: Progress | None = None,
) -> ShardResult:
    """Write and publish the training shards; returns the metrics (manifest fields included) and the locations.

    `compute` and `tracking` are accepted for the common stage shape: shards are written by a small local thread
    pool and nothing is logged to MLflow.
    """
    start = time.monotonic()
    keep_list = read_keep_list(cfg.dedup_dir, cfg.input_dir, storage)
    keep = keep_list.shard_of
    if not keep:
        raise ValueError(f"{keep_list.path} has no samples: nothing to shard")
    raw = local_raw_shards(cfg.input_dir, set(keep.values()), cfg.staging_dir, storage)
    # Every kept key's raw JSON must still carry the image sha256 dedup saw; otherwise nothing is written.
    index = index_raw_members(raw, keep, for_task(progress, "indexing raw shards"),
                              expected_sha256=keep_list.sha256_of, keep_path=keep_list.path, input_dir=cfg.input_dir)
    plans = plan_shards(shuffled_keys(list(keep), cfg.seed), index, cfg.samples_per_shard, cfg.max_shard_bytes)
    indexed_s = time.monotonic() - start

    remote = storage_lib.is_s3_uri(cfg.output)
    if remote:
        def dest_for(name: str) -> Path:
            return Path(cfg.staging_dir) / name

        planned = {plan.name for plan in plans}
        for old in Path(cfg.staging_dir).glob("*.tar"):  # a previous, larger version's leftovers
            if is_shard_name(old.name) and old.name not in planned:
                old.unlink()
    else:
        def dest_for(name: str) -> Path:
            return Path(cfg.output) / f".{name}{STAGED_SUFFIX}"

    tick = time.monotonic()
    workers = min(4, os.cpu_count() or 1)
    try:
        shards = write_shards(plans, index, dest_for, workers=workers, progress=for_task(progress, "writing shards"))
        write_s = time.monotonic() - tick
        tick = time.monotonic()
        published = publish(shards, cfg.output, storage, cfg.upload_workers,
                            progress=for_task(progress, "publishing shards"))
    finally:
        if not remote:  # staged local tars not renamed into place (a failure) must not linger
            for plan in plans:
                dest_for(plan.name).unlink(missing_ok=True)
    publish_s = time.monotonic() - tick
    total_bytes = sum(s.bytes for s in shards)
    manifest = published.manifest
    metrics = {
        "data_version": manifest.data_version,
        "total_samples": manifest.total_samples,
        "shards": len(shards),
        "bytes": total_bytes,
        "output": cfg.output,
        "raw_shards_read": len(index.paths),
        "uploaded": published.uploaded,
        "skipped_identical": published.skipped,
        "removed_stale": published.removed_stale,
        "index_seconds": indexed_s,
        "write_seconds": write_s,
        "publish_seconds": publish_s,
        "write_mb_per_s": total_bytes / 1e6 / write_s if write_s > 0 else None,
        "seconds": time.monotonic() - start,
    }
    outputs = {"shards": cfg.output, "manifest": manifest_uri(cfg.output),
               "sizes": storage_lib.join(cfg.output, SIZES_NAME)}
    return ShardResult(metrics=metrics, outputs=outputs, data_version=manifest.data_version,
                       total_samples=manifest.total_samples)
