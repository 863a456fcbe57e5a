"""The `shard` section."""

from __future__ import annotations

from pydantic import Field

from clip.config.base import PositiveInt, Section, Uri


class ShardConfig(Section):
    """shard: write shuffled webdataset shards + manifest, publish to local disk or S3 -> data/shards/."""

    input_dir: Uri = Field("data/raw", description="the collect stage's output (local path or s3://bucket/prefix)")
    dedup_dir: str = Field("data/dedup", description="the dedup stage's output (its keep-list is applied)")
    output: Uri = Field(
        "data/shards", description="local folder or s3://bucket/prefix: each data version is published to "
                                   "<output>/<data_version>/ (never rewritten), then <output>/latest.json points at it")
    staging_dir: str = Field(
        "data/shards-staging", description="local folder for shards on their way to S3 (at most upload_workers at "
                                           "once, each deleted once uploaded) and for raw shards read from S3")
    samples_per_shard: PositiveInt = Field(1000, description="samples per training shard")
    max_shard_bytes: PositiveInt = Field(
        256 * 1024 * 1024,
        description="a shard is cut before it grows past this many bytes (a larger single sample gets a shard alone)")
    seed: int = Field(0, description="seed of the shuffle of samples across shards")
    upload_workers: PositiveInt = Field(
        8, description="parallel shard uploads when output is s3; also the most shard files on local disk at once")
