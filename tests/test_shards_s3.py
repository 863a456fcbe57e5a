"""Publishing shards to S3 (moto over HTTP on loopback) through the fault-injecting proxy."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from clip import storage
from clip.config import ComputeConfig, ShardConfig, StorageConfig
from clip.formats.manifest import data_version
from clip.shards import PublishError, stage
from tests.support.shards import write_keep, write_unique_pool


@pytest.fixture
def pool(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    samples = write_unique_pool(tmp_path / "raw", 40, 10, seed=2)
    keep = {key: f"raw-{i // 10:05d}.tar" for i, key in enumerate(sorted(samples))}
    write_keep(tmp_path / "dedup", keep, samples)
    return tmp_path, keep


def run_shard(cfg: ShardConfig, storage_cfg: StorageConfig | None = None) -> stage.ShardResult:
    """The shard stage's entry point (default storage section unless given)."""
    return stage.run(cfg, storage=storage_cfg or StorageConfig(), compute=ComputeConfig())


def cfg_for(root: Path, bucket: str) -> ShardConfig:
    return ShardConfig(input_dir=str(root / "raw"), dedup_dir=str(root / "dedup"),
                       output=f"s3://{bucket}/data/shards", staging_dir=str(root / "staging"),
                       samples_per_shard=8, upload_workers=3)


def shard_puts(proxy, name: str) -> int:
    return proxy.count("PUT", rf"/data/shards/[0-9a-f]{{64}}/{name}(\?|$)")


def check_remote(root: str, cfg: StorageConfig) -> dict:
    """latest.json names a version folder whose manifest names exactly the shards present, each with its listed
    size and content hash."""
    store = storage.get_storage(root, cfg)
    pointer = json.loads(store.read_bytes(storage.join(root, "latest.json")))
    prefix = storage.join(root, pointer["data_version"])
    manifest = json.loads(store.read_bytes(storage.join(prefix, "manifest.json")))
    assert manifest["data_version"] == pointer["data_version"]
    listed = {o.uri.rsplit("/", 1)[-1]: o.size for o in store.list(prefix)}
    assert sorted(n for n in listed if n.startswith("shard-")) == [s["name"] for s in manifest["shards"]]
    for entry in manifest["shards"]:
        data = store.read_bytes(storage.join(prefix, entry["name"]))
        assert listed[entry["name"]] == entry["bytes"] == len(data)
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    sizes = json.loads(store.read_bytes(storage.join(prefix, "sizes.json")))
    assert sizes == {s["name"]: s["samples"] for s in manifest["shards"]}
    assert manifest["data_version"] == data_version(manifest["shards"])
    return manifest


def test_publish_survives_5xx_and_dropped_connections(s3_faulty_bucket, pool) -> None:
    bucket, proxy = s3_faulty_bucket
    root, keep = pool
    storage_cfg = StorageConfig(max_attempts=6, backoff_base_s=0.01)
    proxy.add(method="PUT", path_regex=r"/data/shards/\w+/shard-00001\.tar", action="503", times=2)
    proxy.add(method="PUT", path_regex=r"/data/shards/\w+/shard-00002\.tar", action="drop_mid_body", times=1)
    proxy.add(method="PUT", path_regex=r"/data/shards/\w+/shard-00003\.tar", action="500", times=1)
    proxy.add(method="PUT", path_regex=r"/data/shards/\w+/manifest\.json", action="drop", times=1)
    proxy.add(method="PUT", path_regex=r"/data/shards/latest\.json", action="503", times=1)
    metrics = run_shard(cfg_for(root, bucket), storage_cfg).metrics
    assert proxy.pending() == 0  # every fault fired
    manifest = check_remote(f"s3://{bucket}/data/shards", storage_cfg)
    assert manifest["total_samples"] == len(keep) == metrics["total_samples"]
    assert metrics["uploaded"] == len(manifest["shards"])
    assert shard_puts(proxy, "shard-00001.tar") == 3 and shard_puts(proxy, "shard-00000.tar") == 1


def test_failed_publish_leaves_no_manifest_and_rerun_sends_only_missing(s3_faulty_bucket, pool) -> None:
    bucket, proxy = s3_faulty_bucket
    root, keep = pool
    prefix = f"s3://{bucket}/data/shards"
    storage_cfg = StorageConfig(max_attempts=2, backoff_base_s=0.01)
    # shard-00002 fails every attempt: retries are exhausted and the run must fail without a manifest.
    proxy.add(method="PUT", path_regex=r"/data/shards/\w+/shard-00002\.tar", action="503", times=100)
    with pytest.raises(PublishError, match="shard-00002"):
        run_shard(cfg_for(root, bucket), storage_cfg)
    store = storage.get_storage(prefix, storage_cfg)
    assert not store.exists(storage.join(prefix, "latest.json"))
    assert not [o for o in store.list(prefix) if o.uri.endswith("manifest.json")]
    present = sorted(o.uri.rsplit("/", 1)[-1] for o in store.list(prefix))
    num_shards = -(-len(keep) // 8)
    assert present == sorted([f"shard-{i:05d}.tar" for i in range(num_shards) if i != 2]
                             + [f"index-{i:05d}.json" for i in range(num_shards) if i != 2])

    proxy.clear()
    proxy.reset_counts()
    metrics = run_shard(cfg_for(root, bucket), storage_cfg).metrics
    # Only the missing shard was sent again; the others were checked (HEAD) and skipped.
    assert shard_puts(proxy, "shard-00002.tar") == 1
    assert all(shard_puts(proxy, f"shard-{i:05d}.tar") == 0 for i in range(num_shards) if i != 2)
    assert metrics["uploaded"] == 1 and metrics["skipped_identical"] == num_shards - 1
    manifest = check_remote(prefix, storage_cfg)
    assert manifest["data_version"] == metrics["data_version"]

    # A third run on the same input is a no-op upload with the same data version.
    proxy.reset_counts()
    again = run_shard(cfg_for(root, bucket), storage_cfg).metrics
    assert again["data_version"] == metrics["data_version"] and again["uploaded"] == 0
    assert proxy.count("PUT", r"/data/shards/(?!\.lock)") == 0 and again["already_published"]  # the run's lock aside


def test_new_version_never_touches_the_old_one(s3_faulty_bucket, pool) -> None:
    """Issue 11.1: a failed v2 publish leaves latest.json on v1; a successful one moves it; v1's objects are
    byte-unchanged throughout (the old code withdrew the manifest and overwrote shards in place)."""
    bucket, proxy = s3_faulty_bucket
    root, _ = pool
    prefix = f"s3://{bucket}/data/shards"
    storage_cfg = StorageConfig(max_attempts=2, backoff_base_s=0.01)
    v1 = run_shard(cfg_for(root, bucket), storage_cfg).metrics["data_version"]
    store = storage.get_storage(prefix, storage_cfg)

    def v1_objects() -> dict[str, str]:
        return {o.uri: hashlib.sha256(store.read_bytes(o.uri)).hexdigest()
                for o in store.list(storage.join(prefix, v1))}

    before = v1_objects()
    proxy.add(method="PUT", path_regex=r"/data/shards/\w+/shard-00000\.tar", action="503", times=100)
    cfg = cfg_for(root, bucket)
    cfg.seed = 7
    with pytest.raises(PublishError):
        run_shard(cfg, storage_cfg)
    assert json.loads(store.read_bytes(storage.join(prefix, "latest.json")))["data_version"] == v1
    assert v1_objects() == before
    proxy.clear()
    metrics = run_shard(cfg, storage_cfg).metrics
    assert metrics["data_version"] != v1
    assert check_remote(prefix, storage_cfg)["data_version"] == metrics["data_version"]
    assert v1_objects() == before
    assert proxy.count("DELETE", r"/data/shards/(?!\.lock)") == 0  # the run's lock (clip.storage.lock) aside


def test_s3_publish_keeps_local_disk_bounded(s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    """Issue 11.5: with many shards, at most upload_workers shard files are on local disk at any time (the old
    code wrote every shard to staging_dir before the first upload). Observed through a spy around the real
    upload that counts the .tar files under staging_dir when each upload starts."""
    samples = write_unique_pool(tmp_path / "raw", 60, 20, seed=3)
    keep = {key: f"raw-{i // 20:05d}.tar" for i, key in enumerate(sorted(samples))}
    write_keep(tmp_path / "dedup", keep, samples)
    cfg = ShardConfig(input_dir=str(tmp_path / "raw"), dedup_dir=str(tmp_path / "dedup"),
                      output=f"s3://{s3_bucket}/data/shards", staging_dir=str(tmp_path / "staging"),
                      samples_per_shard=2, upload_workers=2)
    seen: list[int] = []
    real_upload = storage.S3Storage.upload_file

    def counting_upload(self, local_path, uri):  # noqa: ANN001 - same signature as the real one
        # os.walk, not rglob: another upload thread may remove its spool folder while this one counts, and
        # os.walk skips a folder that vanished (rglob raised FileNotFoundError here, failing the upload)
        seen.append(sum(name.endswith(".tar") for _, _, names in os.walk(tmp_path / "staging") for name in names))
        return real_upload(self, local_path, uri)

    monkeypatch.setattr(storage.S3Storage, "upload_file", counting_upload)
    metrics = run_shard(cfg).metrics
    assert metrics["shards"] == 30 and len(seen) == 30
    assert max(seen) <= 2 and metrics["peak_local_shards"] <= 2
    assert not list((tmp_path / "staging").rglob("*.tar"))  # nothing left behind
    check_remote(cfg.output, StorageConfig())


def test_large_shard_goes_up_in_parts_through_faults(s3_faulty_bucket, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from tests.support.shards import sample_record, write_raw_shards

    bucket, proxy = s3_faulty_bucket
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):  # noise images compress badly: ~0.5 MB each, so the shard is past the 1 MiB threshold
        image = Image.fromarray(rng.integers(0, 256, (640, 640, 3), dtype=np.uint8))
        samples.append((f"{i:09d}", sample_record(f"{i:09d}", image, f"noise {i}", quality=95)))
    write_raw_shards(tmp_path / "raw", samples, per_shard=3)
    write_keep(tmp_path / "dedup", {key: "raw-00000.tar" for key, _ in samples}, dict(samples))
    storage_cfg = StorageConfig(max_attempts=4, backoff_base_s=0.01, multipart_threshold_mb=1)
    proxy.add(method="PUT", path_regex=r"shard-00000\.tar\?.*partNumber=1", action="drop_mid_body", times=1)
    proxy.add(method="POST", path_regex=r"shard-00000\.tar\?uploadId=", action="503", times=1)
    metrics = run_shard(cfg_for(tmp_path, bucket), storage_cfg).metrics
    assert metrics["bytes"] > 1024 * 1024 and proxy.pending() == 0
    assert proxy.count("PUT", r"shard-00000\.tar\?.*partNumber=1") == 2
    check_remote(f"s3://{bucket}/data/shards", storage_cfg)


def test_dedup_and_shard_read_raw_shards_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    """The whole dedup -> shard path with the raw pool, and the output, on S3."""
    from clip.config import DedupConfig
    from clip.dedup import stage as dedup_stage

    samples = write_unique_pool(tmp_path / "raw", 24, 8, seed=4)
    raw_prefix = f"s3://{s3_bucket}/data/raw"
    for path in sorted((tmp_path / "raw").glob("raw-*.tar")):
        storage.upload_file(path, storage.join(raw_prefix, path.name))
    result = dedup_stage.run(DedupConfig(input_dir=raw_prefix, output_dir=str(tmp_path / "dedup"),
                                         decontaminate_synthetic=False), storage=StorageConfig(), compute=ComputeConfig())
    assert result.metrics["input_samples"] == 24 and result.metrics["raw_shards"] == 3
    cfg = ShardConfig(input_dir=raw_prefix, dedup_dir=str(tmp_path / "dedup"),
                      output=f"s3://{s3_bucket}/data/shards", staging_dir=str(tmp_path / "staging"),
                      samples_per_shard=10)
    metrics = run_shard(cfg).metrics
    manifest = check_remote(f"s3://{s3_bucket}/data/shards", StorageConfig())
    assert manifest["total_samples"] == result.metrics["kept"] == metrics["total_samples"]
    assert result.metrics["kept"] <= len(samples)
