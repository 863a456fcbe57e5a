"""Shards: round trip through webdataset's reader, size limits, determinism, manifest/sizes, local republish."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from clip.config import ComputeConfig, DedupConfig, ShardConfig, StorageConfig, config_from_dict
from clip.dedup import stage as dedup_stage
from clip.formats.errors import StaleInputError
from clip.formats.manifest import data_version
from clip.formats.raw import caption_digest
from clip.formats.tar import DeterministicTarWriter
from clip.progress import Progress, RecordingProgress
from clip.shards import stage
from tests.support.images import random_scene
from tests.support.shards import sample_record, write_keep, write_raw_shards, write_unique_pool

NUM_SAMPLES = 90
RAW_PER_SHARD = 20


def run_shard(cfg: ShardConfig, progress: Progress | None = None) -> stage.ShardResult:
    """The shard stage's entry point with default storage and compute sections."""
    return stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig(), progress=progress)


def run_dedup(cfg: DedupConfig) -> dedup_stage.DedupResult:
    return dedup_stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig())


@pytest.fixture(scope="module")
def raw_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, bytes]], dict[str, str]]:
    """Raw shards plus a keep table holding every sample but every 7th (so the shards must leave some out)."""
    root = tmp_path_factory.mktemp("pool")
    samples = write_unique_pool(root / "raw", NUM_SAMPLES, RAW_PER_SHARD, seed=1)
    keep = {key: f"raw-{i // RAW_PER_SHARD:05d}.tar" for i, key in enumerate(sorted(samples)) if i % 7 != 3}
    write_keep(root / "dedup", keep, samples)
    return root, samples, keep


def shard_cfg(root: Path, out: Path, **overrides) -> ShardConfig:
    values = {"input_dir": str(root / "raw"), "dedup_dir": str(root / "dedup"), "output": str(out),
              "staging_dir": str(out.parent / f"{out.name}-staging"), "samples_per_shard": 11,
              "max_shard_bytes": 40_000, "seed": 0}
    values.update(overrides)
    return ShardConfig(**values)


def version_dir(out: Path) -> Path:
    """The version folder `latest.json` names (docs/formats.md: <output>/<data_version>/)."""
    pointer = json.loads((out / "latest.json").read_text())
    assert pointer["format"] == "clip-pipeline/shards-latest/v1"
    assert pointer["manifest"] == f"{pointer['data_version']}/manifest.json"
    return out / pointer["data_version"]


def check_published(root: Path) -> dict:
    """The pointer names a version folder whose manifest.json and sizes.json agree with its tars; returns the
    manifest."""
    out = version_dir(root)
    manifest = json.loads((out / "manifest.json").read_text())
    assert out.name == manifest["data_version"]
    sizes = json.loads((out / "sizes.json").read_text())
    tars = sorted(p.name for p in out.glob("shard-*.tar"))
    assert [s["name"] for s in manifest["shards"]] == tars
    assert sizes == {s["name"]: s["samples"] for s in manifest["shards"]}
    for entry in manifest["shards"]:
        data = (out / entry["name"]).read_bytes()
        assert len(data) == entry["bytes"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
        assert len(names) == 3 * entry["samples"]
    assert manifest["total_samples"] == sum(sizes.values())
    assert manifest["data_version"] == data_version(manifest["shards"])
    assert manifest["format"] == "clip-pipeline/shards/v1"
    return manifest


def test_round_trip_with_webdataset_reader(raw_pool, tmp_path: Path) -> None:
    root, samples, keep = raw_pool
    out = tmp_path / "shards"
    progress = RecordingProgress()
    result = run_shard(shard_cfg(root, out), progress)
    manifest = check_published(out)
    assert result.metrics["data_version"] == result.data_version == manifest["data_version"]
    folder = out / manifest["data_version"]
    assert result.total_samples == len(keep) and result.outputs["manifest"] == str(folder / "manifest.json")
    shards = len(manifest["shards"])
    assert progress.last["writing shards"][:2] == progress.last["publishing shards"][:2] == (shards, shards)
    urls = [str(folder / s["name"]) for s in manifest["shards"]]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        seen.append(key)
        assert sample["jpg"] == samples[key]["jpg"]
        assert sample["txt"] == samples[key]["txt"]
        assert sample["json"] == samples[key]["json"]
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"jpg", "txt", "json"}
    assert sorted(seen) == sorted(keep) and len(seen) == len(set(seen))  # every kept sample exactly once
    # Shuffled: not in key order, and the first shard mixes several raw shards.
    assert seen != sorted(seen)
    first = seen[:manifest["shards"][0]["samples"]]
    assert len({keep[k] for k in first}) >= 3


def test_shard_size_limits(raw_pool, tmp_path: Path) -> None:
    root, _, keep = raw_pool
    out = tmp_path / "shards"
    run_shard(shard_cfg(root, out, samples_per_shard=9, max_shard_bytes=30_000))
    manifest = check_published(out)
    counts = [s["samples"] for s in manifest["shards"]]
    assert all(c <= 9 for c in counts) and sum(counts) == len(keep)
    assert all(s["bytes"] <= 30_000 for s in manifest["shards"] if s["samples"] > 1)
    assert any(c < 9 for c in counts[:-1])  # the byte limit cut some shards before the count limit
    # Count limit alone: all shards full but the last.
    out2 = tmp_path / "by-count"
    run_shard(shard_cfg(root, out2, samples_per_shard=10, max_shard_bytes=10**9))
    counts2 = [s["samples"] for s in check_published(out2)["shards"]]
    assert counts2[:-1] == [10] * (len(counts2) - 1)


def test_rerun_is_byte_identical_and_seed_changes_version(raw_pool, tmp_path: Path) -> None:
    root, _, _ = raw_pool
    first = run_shard(shard_cfg(root, tmp_path / "a")).metrics
    second = run_shard(shard_cfg(root, tmp_path / "b")).metrics
    again = run_shard(shard_cfg(root, tmp_path / "a")).metrics  # same folder again
    assert first["data_version"] == second["data_version"] == again["data_version"]
    tars = list(version_dir(tmp_path / "a").glob("shard-*.tar"))
    assert tars
    for tar in tars:
        assert tar.read_bytes() == (version_dir(tmp_path / "b") / tar.name).read_bytes()
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                assert (member.mtime, member.uid, member.gid, member.uname, member.gname, member.mode) == \
                    (0, 0, 0, "", "", 0o644)
    other = run_shard(shard_cfg(root, tmp_path / "c", seed=1)).metrics
    assert other["data_version"] != first["data_version"]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_new_version_gets_its_own_folder_and_never_touches_the_old_one(raw_pool, tmp_path: Path) -> None:
    """Issue 11.1: publishing v2 adds <output>/<v2>/ and moves latest.json; v1's objects stay byte-identical and
    reading v1's folder directly still gives v1. The old code replaced shard-*.tar in place."""
    from clip.formats.manifest import read_manifest

    root, _, keep = raw_pool
    out = tmp_path / "shards"
    first = run_shard(shard_cfg(root, out, samples_per_shard=5)).metrics
    v1 = out / first["data_version"]
    before = tree_digest(v1)
    second = run_shard(shard_cfg(root, out, samples_per_shard=40, max_shard_bytes=10**9, seed=3)).metrics
    assert second["data_version"] != first["data_version"] and second["pointer_moved"]
    manifest = check_published(out)
    assert manifest["data_version"] == second["data_version"] and manifest["total_samples"] == len(keep)
    assert tree_digest(v1) == before  # v1 untouched
    assert read_manifest(str(v1)).data_version == first["data_version"]
    assert read_manifest(str(out)).data_version == second["data_version"]  # the root resolves the pointer
    assert sorted(p.name for p in out.iterdir()) == sorted(["latest.json", first["data_version"],
                                                            second["data_version"]])  # no staging left


def test_publishing_the_same_version_again_is_a_no_op(raw_pool, tmp_path: Path) -> None:
    root, _, _ = raw_pool
    out = tmp_path / "shards"
    first = run_shard(shard_cfg(root, out)).metrics
    pointer = (out / "latest.json").read_bytes()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_shard(shard_cfg(root, out)).metrics
    assert again["data_version"] == first["data_version"]
    assert again["already_published"] and not again["pointer_moved"] and again["uploaded"] == 0
    assert (out / "latest.json").read_bytes() == pointer
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing rewritten


def test_altered_published_shard_is_refused_on_republish(raw_pool, tmp_path: Path) -> None:
    """Republishing re-verifies: a published shard whose bytes changed is named, the pointer stays."""
    from clip.shards import PublishError

    root, _, _ = raw_pool
    out = tmp_path / "shards"
    run_shard(shard_cfg(root, out))
    victim = version_dir(out) / "shard-00001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(PublishError, match="shard-00001.tar"):
        run_shard(shard_cfg(root, out))


def test_tar_writer_matches_tarfile_reading(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    members = {"jpg": b"\xff\xd8" + bytes(range(256)) * 3, "txt": b"a cat", "json": b"{}"}
    with open(path, "wb") as handle:
        writer = DeterministicTarWriter(handle)
        writer.add_sample("000000001", members)
        writer.add("000000002.txt", b"")
        writer.close()
    data = path.read_bytes()
    assert len(data) == writer.bytes_written and len(data) % 10240 == 0
    assert hashlib.sha256(data).hexdigest() == writer.sha256
    with tarfile.open(path) as tar:
        assert tar.getnames() == ["000000001.jpg", "000000001.json", "000000001.txt", "000000002.txt"]
        assert tar.extractfile("000000001.jpg").read() == members["jpg"]


def test_missing_keep_table_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="keep.parquet"):
        run_shard(ShardConfig(input_dir=str(tmp_path), dedup_dir=str(tmp_path / "nope"),
                              output=str(tmp_path / "out")))


def test_pipeline_entry_point(raw_pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines._common import execute_stage

    root, _, keep = raw_pool
    cfg = config_from_dict({"shard": shard_cfg(root, tmp_path / "out").model_dump()})
    monkeypatch.chdir(tmp_path)
    result = execute_stage("shard", cfg, progress=RecordingProgress())
    on_disk = json.loads((tmp_path / "reports" / "metrics" / "shard.json").read_text())
    assert on_disk["total_samples"] == len(keep) == result.metrics["total_samples"]
    assert on_disk["data_version"] == check_published(tmp_path / "out")["data_version"]
    assert on_disk["location"] == str(tmp_path / "out" / on_disk["data_version"])


STALE_ADVICE = "does not match the raw pool in"


def assert_nothing_published(out: Path) -> None:
    """A refused run leaves no manifest, sizes.json or shard (final or staged) in the output folder."""
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], left


def test_stale_keep_list_is_refused_before_writing(tmp_path: Path) -> None:
    """collect (pool A) -> dedup -> collect again (pool B: the same positional keys, other images) -> shard must
    refuse the old keep-list; after dedup reruns on B, shard publishes B's samples."""
    raw = tmp_path / "raw"
    pool_a = write_unique_pool(raw, 24, 8, seed=10)
    dedup_cfg = DedupConfig(input_dir=str(raw), output_dir=str(tmp_path / "dedup"), decontaminate_synthetic=False)
    run_dedup(dedup_cfg)
    keep_table = pq.read_table(tmp_path / "dedup" / "keep.parquet")
    assert keep_table.column_names == ["key", "shard", "sha256", "caption_digest"]
    for row in keep_table.to_pylist():  # the columns are the raw JSON's image sha256 and its caption's digest
        assert row["sha256"] == json.loads(pool_a[row["key"]]["json"])["sha256"]
        assert row["caption_digest"] == caption_digest(json.loads(pool_a[row["key"]]["json"])["caption"])

    for old in raw.glob("raw-*.tar"):
        old.unlink()
    pool_b = write_unique_pool(raw, 24, 8, seed=11)
    assert sorted(pool_b) == sorted(pool_a) and pool_b["000000000"]["jpg"] != pool_a["000000000"]["jpg"]
    out = tmp_path / "shards"
    cfg = ShardConfig(input_dir=str(raw), dedup_dir=str(tmp_path / "dedup"), output=str(out),
                      staging_dir=str(tmp_path / "staging"), samples_per_shard=10)
    with pytest.raises(StaleInputError, match=STALE_ADVICE) as refused:
        run_shard(cfg)
    message = str(refused.value)
    assert str(tmp_path / "dedup" / "keep.parquet") in message and str(raw) in message
    assert "rerun `clip-pipeline dedup`" in message
    assert "000000000 (image sha256 differs)" in message  # the first mismatching key is named
    assert_nothing_published(out)

    run_dedup(dedup_cfg)  # the advice works: dedup on pool B, then shard publishes B's images
    metrics = run_shard(cfg).metrics
    manifest = check_published(out)
    assert metrics["total_samples"] == manifest["total_samples"] == keep_table.num_rows
    urls = [str(version_dir(out) / s["name"]) for s in manifest["shards"]]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert sample["jpg"] == pool_b[sample["__key__"]]["jpg"]


def replace_raw_pool(tmp_path: Path, samples: dict, first_shard_size: int) -> None:
    """Rewrite tmp_path/raw as two raw shards of `samples` in key order: raw-00000.tar holds the first
    `first_shard_size`, raw-00001.tar the rest (what a collect rerun leaves behind)."""
    ordered = sorted(samples.items())
    for name, part in (("raw-00000.tar", ordered[:first_shard_size]), ("raw-00001.tar", ordered[first_shard_size:])):
        (written,) = write_raw_shards(tmp_path / f"new-{name}", part, per_shard=len(part))
        written.replace(tmp_path / "raw" / name)


def test_partly_changed_pool_names_exactly_the_changed_keys(tmp_path: Path) -> None:
    """One image replaced and one sample gone: both keys (and no other) are named, nothing is published."""
    samples = write_unique_pool(tmp_path / "raw", 20, 10, seed=12)
    keep = {key: f"raw-{i // 10:05d}.tar" for i, key in enumerate(sorted(samples))}
    write_keep(tmp_path / "dedup", keep, samples)
    changed = dict(samples)
    changed["000000013"] = sample_record("000000013", random_scene(np.random.default_rng(99), (64, 48)), "other")
    del changed["000000004"]
    # The new pool: raw-00000.tar holds keys 0..9 without 4, raw-00001.tar keys 10..19 (13 with another image).
    replace_raw_pool(tmp_path, changed, first_shard_size=9)
    out = tmp_path / "shards"
    with pytest.raises(StaleInputError, match=STALE_ADVICE) as refused:
        run_shard(shard_cfg(tmp_path, out))
    message = str(refused.value)
    assert "2 of 20 kept samples differ" in message
    assert "000000004 (not in raw shard raw-00000.tar)" in message
    assert "000000013 (image sha256 differs)" in message
    assert_nothing_published(out)


def test_collect_rerun_that_changed_only_captions_is_refused(tmp_path: Path) -> None:
    """Issue 16.5: the same images under new captions (a collect rerun that re-captioned the pool) contradict the
    keep-list as much as new images do: refused naming the key, nothing published; before, nothing caught it."""
    samples = write_unique_pool(tmp_path / "raw", 20, 10, seed=12)
    keep = {key: f"raw-{i // 10:05d}.tar" for i, key in enumerate(sorted(samples))}
    write_keep(tmp_path / "dedup", keep, samples)
    changed = dict(samples)
    meta = json.loads(samples["000000007"]["json"])
    meta["caption"] = "a caption written by another collect run"
    changed["000000007"] = {**samples["000000007"], "txt": meta["caption"].encode(),
                            "json": json.dumps(meta).encode()}
    replace_raw_pool(tmp_path, changed, first_shard_size=10)
    out = tmp_path / "shards"
    with pytest.raises(StaleInputError, match=STALE_ADVICE) as refused:
        run_shard(shard_cfg(tmp_path, out))
    assert "1 of 20 kept samples differ" in str(refused.value)
    assert "000000007 (caption differs)" in str(refused.value)
    assert_nothing_published(out)


def test_keep_list_without_sha256_is_refused(raw_pool, tmp_path: Path) -> None:
    """A keep.parquet from before the sha256 column cannot be verified against the raw pool: refused, same advice."""
    root, _, keep = raw_pool
    legacy = tmp_path / "root"
    (legacy / "dedup").mkdir(parents=True)
    (legacy / "raw").symlink_to(root / "raw")
    keys = sorted(keep)
    pq.write_table(pa.table({"key": keys, "shard": [keep[k] for k in keys]}), legacy / "dedup" / "keep.parquet")
    out = tmp_path / "shards"
    with pytest.raises(StaleInputError, match=STALE_ADVICE) as refused:
        run_shard(shard_cfg(legacy, out))
    assert "rerun `clip-pipeline dedup`" in str(refused.value) and "sha256" in str(refused.value)
    assert_nothing_published(out)
