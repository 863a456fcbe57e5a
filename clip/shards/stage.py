"""The shard stage end to end: kept keys -> shuffled shards -> published data version.

    from clip.shards import stage
    result = stage.run(cfg.shard, storage=cfg.storage, compute=cfg.compute, progress=progress)
    result.data_version, result.outputs["manifest"]

Reads `shard.dedup_dir`'s keep-list and the raw shards in `shard.input_dir`, checks every kept key's image sha256
against the raw JSON (nothing is written for a stale keep-list), writes shuffled byte-deterministic tars and
publishes them as one immutable data version `<shard.output>/<data_version>/` (shards, `sizes.json`,
`manifest.json` last), then moves the pointer `<shard.output>/latest.json` to it (clip/shards/publish.py;
docs/formats.md "Training shards and manifest"). `shard.output` is a folder or s3:// prefix; on S3 at most
`shard.upload_workers` shard files are on local disk at once. Progress tasks: "indexing raw shards",
"writing shards" (S3: hashing them), "publishing shards".
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
from clip.formats.manifest import SIZES_NAME, manifest_uri, pointer_uri
from clip.formats.raw import list_raw_shards
from clip.progress import Progress, for_task
from clip.result import StageResult
from clip.shards.publish import publish_local, publish_remote
from clip.shards.writer import index_raw_members, plan_shards, shuffled_keys
from clip.storage.lock import output_lock

log = logging.getLogger(__name__)


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
    pool and nothing is logged to MLflow. One run per output at a time: `<shard.output>/.lock`
    (clip.storage.lock) is held throughout; a second run is refused in one line naming the holder.
    """
    with output_lock(cfg.output, "shard", storage):
        return _shard(cfg, storage, progress)


def _shard(cfg: ShardConfig, storage: StorageConfig, progress: Progress | None) -> ShardResult:
    start = time.monotonic()
    keep_list = read_keep_list(cfg.dedup_dir, cfg.input_dir, storage)
    keep = keep_list.shard_of
    if not keep:
        raise ValueError(f"{keep_list.path} has no samples: nothing to shard")
    raw = local_raw_shards(cfg.input_dir, set(keep.values()), cfg.staging_dir, storage)
    # Every kept key's raw JSON must still carry the image sha256 and caption dedup saw; else nothing is written.
    index = index_raw_members(raw, keep, for_task(progress, "indexing raw shards"),
                              expected_sha256=keep_list.sha256_of, expected_caption=keep_list.caption_of,
                              keep_path=keep_list.path, input_dir=cfg.input_dir)
    plans = plan_shards(shuffled_keys(list(keep), cfg.seed), index, cfg.samples_per_shard, cfg.max_shard_bytes)
    indexed_s = time.monotonic() - start

    remote = storage_lib.is_s3_uri(cfg.output)
    tick = time.monotonic()
    workers = min(4, os.cpu_count() or 1)
    if remote:
        published = publish_remote(plans, index, cfg.output, cfg.staging_dir, workers, cfg.upload_workers, storage,
                                   hash_progress=for_task(progress, "writing shards"),
                                   publish_progress=for_task(progress, "publishing shards"))
    else:
        published = publish_local(plans, index, cfg.output, workers, storage,
                                  write_progress=for_task(progress, "writing shards"),
                                  publish_progress=for_task(progress, "publishing shards"))
    publish_s = time.monotonic() - tick
    manifest = published.manifest
    total_bytes = manifest.bytes
    metrics = {
        "data_version": manifest.data_version,
        "total_samples": manifest.total_samples,
        "shards": len(manifest.shards),
        "bytes": total_bytes,
        "output": cfg.output,
        "location": published.location,
        "raw_shards_read": len(index.paths),
        "uploaded": published.uploaded,
        "skipped_identical": published.skipped,
        "already_published": published.already_published,
        "pointer_moved": published.pointer_moved,
        "peak_local_shards": published.peak_local_shards,
        "index_seconds": indexed_s,
        "publish_seconds": publish_s,
        "write_mb_per_s": total_bytes / 1e6 / publish_s if publish_s > 0 else None,
        "seconds": time.monotonic() - start,
    }
    outputs = {"shards": published.location, "manifest": manifest_uri(published.location),
               "sizes": storage_lib.join(published.location, SIZES_NAME), "pointer": pointer_uri(cfg.output)}
    return ShardResult(metrics=metrics, outputs=outputs, data_version=manifest.data_version,
                       total_samples=manifest.total_samples)
