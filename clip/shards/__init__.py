"""Training shards: shuffled, byte-deterministic webdataset tars plus a manifest, published locally or to S3.

    from clip.shards import run_sharding
    metrics = run_sharding(cfg.shard, cfg.storage)   # shard-00000.tar ..., sizes.json, manifest.json (last)
"""

from clip.shards.publish import PublishError, build_manifest, data_version, publish, read_manifest
from clip.shards.run import run_sharding
from clip.shards.tarwriter import DeterministicTarWriter
from clip.shards.writer import index_raw_members, plan_shards, shuffled_keys, write_shard, write_shards

__all__ = [
    "DeterministicTarWriter",
    "PublishError",
    "build_manifest",
    "data_version",
    "index_raw_members",
    "plan_shards",
    "publish",
    "read_manifest",
    "run_sharding",
    "shuffled_keys",
    "write_shard",
    "write_shards",
]
