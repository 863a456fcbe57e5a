"""Training shards: shuffled, byte-deterministic webdataset tars plus a manifest, published locally or to S3.

    from clip.shards import stage
    result = stage.run(cfg.shard, storage=cfg.storage, compute=cfg.compute, progress=progress)
    # <output>/<data_version>/shard-00000.tar, index-00000.json ..., sizes.json, manifest.json (last), then
    # <output>/latest.json
    # result: ShardResult (metrics, outputs, data_version)

Modules: stage (`run`: keep-list -> shards -> published version), writer (indexing raw members, planning and
writing the tars), publish (one immutable folder per data version, then the pointer), versions (listing data
versions and pruning those no kept run names: `clip-pipeline data list|prune`).
"""

from clip.shards.publish import PublishError, build_manifest, publish_local, publish_remote
from clip.shards.writer import index_raw_members, plan_shards, shuffled_keys, write_shard, write_shards

__all__ = [
    "PublishError",
    "build_manifest",
    "index_raw_members",
    "plan_shards",
    "publish_local",
    "publish_remote",
    "shuffled_keys",
    "write_shard",
    "write_shards",
]
