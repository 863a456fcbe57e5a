"""Immutable data versions (issue 11.1): a run finishes on the version it started with while another is
published, every shard is verified while it is streamed, and `clip-pipeline data list|prune`.

Real shard stage output (tests/support/shards pools), the real tiny model, real checkpoints, a real MLflow store,
the real CLI in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from clip.config import ComputeConfig, PipelineConfig, ShardConfig, StorageConfig, load_config
from clip.formats.manifest import read_manifest
from clip.shards import stage as shard_stage
from clip.shards.versions import list_versions, prune
from clip.train import stage as train_stage
from clip.train.shard_reader import ShardIntegrityError
from clip.train.streams import (
    RawStream,
    StreamPlan,
    StreamStats,
    open_uri,
    shuffled_stream,
)
from tests.support.shards import write_keep, write_unique_pool
from tests.support.train_config import tiny_overrides

CLI = str(Path(sys.executable).with_name("clip-pipeline"))


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pool")
    samples = write_unique_pool(root / "raw", 64, 16, seed=5)
    write_keep(root / "dedup", {key: f"raw-{i // 16:05d}.tar" for i, key in enumerate(sorted(samples))}, samples)
    return root


def publish(pool: Path, out: Path, seed: int) -> str:
    cfg = ShardConfig(input_dir=str(pool / "raw"), dedup_dir=str(pool / "dedup"), output=str(out),
                      samples_per_shard=16, seed=seed)
    return shard_stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig()).data_version


def train(cfg: PipelineConfig) -> train_stage.TrainResult:
    return train_stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking,
                           debug=cfg.debug)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_logged(path: Path) -> dict[int, list[str]]:
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["keys"] for r in records if "step" in r}


def test_run_finishes_on_its_version_while_another_is_published(pool: Path, tmp_path: Path,
                                                                 mlflow_store: dict[str, str]) -> None:
    out = tmp_path / "shards"
    v1 = publish(pool, out, seed=0)
    v1_before = tree_digest(out / v1)
    # Reference: the same training on v1's folder, with nothing published meanwhile.
    reference_log = tmp_path / "reference.log"
    train(load_config(None, tiny_overrides(str(out / v1), str(tmp_path / "reference"), **{
        "train.epochs": 3, "debug.keys_log": str(reference_log)})))

    keys_log = tmp_path / "keys.log"
    tracking = {"tracking.enabled": True, "tracking.uri": mlflow_store["uri"], "tracking.experiment": "versions",
                "tracking.artifact_location": mlflow_store["artifact_location"]}
    cfg = load_config(None, tiny_overrides(str(out), str(tmp_path / "run"), **{
        "train.epochs": 3, "train.keep_checkpoints": 10, "debug.keys_log": str(keys_log),
        "debug.fault_step_delay_s": 0.3}, **tracking))
    published: dict[str, object] = {}

    def publish_v2_mid_run() -> None:
        deadline = time.monotonic() + 120
        while len(steps_logged(keys_log.with_name(keys_log.name + ".rank0"))) < 2:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        published["v2"] = publish(pool, out, seed=1)  # a new version: every shard differs
        published["at_step"] = len(steps_logged(keys_log.with_name(keys_log.name + ".rank0")))

    publisher = threading.Thread(target=publish_v2_mid_run)
    publisher.start()
    try:
        result = train(cfg)
    finally:
        publisher.join()
    v2 = published["v2"]
    total_steps = result.metrics["steps"]
    assert v2 != v1 and int(published["at_step"]) < total_steps  # v2 went out while the run was streaming
    assert json.loads((out / "latest.json").read_text())["data_version"] == v2
    assert tree_digest(out / v1) == v1_before  # v1's objects byte-unchanged

    # The run finished on v1: same samples per step as the undisturbed reference, and everything names v1.
    assert result.data_version == v1 and result.metrics["data_version"] == v1
    trained = steps_logged(keys_log.with_name(keys_log.name + ".rank0"))
    assert trained == steps_logged(reference_log.with_name(reference_log.name + ".rank0"))
    checkpoints = sorted((tmp_path / "run").glob("*.pt"))
    assert len(checkpoints) >= 3
    for path in checkpoints:
        assert torch.load(path, weights_only=True)["data_version"] == v1, path.name

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_store["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("versions").experiment_id])
    assert run.data.tags["data_version"] == v1
    assert run.data.tags["data_location"] == str(out / v1)

    # The next run with the default location trains on v2 (new data, new run), v1's run is left alone.
    assert read_manifest(str(out)).data_version == v2


@pytest.mark.parametrize("where", ["jpg payload", "padding after the end blocks"])
def test_altered_shard_stops_training_naming_it(pool: Path, tmp_path: Path, where: str) -> None:
    """Same size, one byte flipped after publishing: the run stops naming the shard and the version. The old
    reader never looked at shard bytes (and stops at the tar's end block, before the padding)."""
    out = tmp_path / "shards"
    version = publish(pool, out, seed=0)
    victim = out / version / "shard-00001.tar"
    data = bytearray(victim.read_bytes())
    offset = 512 + 100 if where == "jpg payload" else len(data) - 1  # inside the first member's data / padding
    data[offset] ^= 0x01
    victim.write_bytes(bytes(data))
    cfg = load_config(None, tiny_overrides(str(out), str(tmp_path / "run"), **{"train.epochs": 1}))
    with pytest.raises(ShardIntegrityError, match="shard-00001.tar") as caught:
        train(cfg)
    assert version[:12] in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "run" / "final.pt").exists()


def test_resume_starting_mid_shard_still_verifies_the_whole_shard(pool: Path, tmp_path: Path) -> None:
    """A stream restarted at position 12 of a 16-sample shard starts reading at the window it needs (ranged read),
    yet a byte flipped in the skipped sample 0 is still found: when the stream's next pass reads it (each sample
    is verified against the shard index as it is read)."""
    out = tmp_path / "shards"
    version = publish(pool, out, seed=0)
    manifest = read_manifest(str(out))
    plan = StreamPlan(manifest.shards[:1], num_streams=1, seed=0, data_version=version)
    clean = shuffled_stream(RawStream(plan, 0, 0, open_uri, StreamStats()), window=4, start=12)
    assert len([next(clean) for _ in range(8)]) == 8  # past the shard's end: verified, wraps to a new pass
    victim = out / version / manifest.shards[0].name
    data = bytearray(victim.read_bytes())
    data[512 + 50] ^= 0x01  # inside sample 0, which a start at 12 skips
    victim.write_bytes(bytes(data))
    resumed = shuffled_stream(RawStream(plan, 0, 0, open_uri, StreamStats()), window=4, start=12)
    with pytest.raises(ShardIntegrityError, match=manifest.shards[0].name):
        for _ in range(8):
            next(resumed)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_data_list_and_prune(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "data" / "shards"
    versions = [publish(pool, out, seed=seed) for seed in range(4)]  # v0 oldest ... v3 latest
    runs = tmp_path / "models" / "runs"
    # v0 is named by a run in the default location (its folder name); v1 by the checkpoint of a custom-named run.
    (runs / f"tiny-vit-{versions[0][:12]}").mkdir(parents=True)
    (runs / f"tiny-vit-{versions[0][:12]}" / "tokenizer.json").write_text("{}")
    (runs / "my-experiment").mkdir()
    torch.save({"data_version": versions[1], "step": 4}, runs / "my-experiment" / "step-00000004.pt")

    listed = run_cli("data", "list", "--set", f"shard.output={out}", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines()[1:] if line.strip()]
    assert [line.split()[0] for line in lines] == [v[:12] for v in versions]
    assert lines[-1].split()[-1] == "latest" and all("latest" not in line for line in lines[:-1])
    assert [int(line.split()[1]) for line in lines] == [4] * 4  # 64 samples / 16 per shard
    assert [int(line.split()[2]) for line in lines] == [64] * 4

    dry = run_cli("data", "prune", "--keep", "0", "--dry-run", "--set", f"shard.output={out}", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {versions[2][:12]}" in dry.stdout
    assert all((out / v).is_dir() for v in versions)

    v3_before = tree_digest(out / versions[3])
    pruned = run_cli("data", "prune", "--keep", "0", "--set", f"shard.output={out}", cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["latest.json", versions[0], versions[1], versions[3]])
    assert tree_digest(out / versions[3]) == v3_before
    assert read_manifest(str(out)).data_version == versions[3]

    # --keep counts the newest complete versions; latest is kept whatever --keep says.
    result = prune(str(out), keep=1, runs_dir=str(tmp_path / "no-runs"))
    assert [v.data_version for v in result.removed] == versions[:2]
    assert [v.data_version for v in list_versions(str(out))] == [versions[3]]
    assert result.kept[versions[3]] == "latest"


def test_reading_the_root_with_nothing_published_names_what_is_missing(tmp_path: Path) -> None:
    from clip.formats.errors import MissingInputError

    with pytest.raises(MissingInputError, match="no shard manifest at .*run the shard stage first"):
        read_manifest(str(tmp_path / "nothing"))


def test_training_from_s3_resolves_the_pointer_and_verifies_shards(s3_bucket: str, pool: Path,
                                                                  tmp_path: Path) -> None:
    """The S3 path (moto on 127.0.0.1): train.data is the output root; an object re-uploaded with one byte
    changed (its stored checksum follows the new bytes, so only the manifest can tell) stops the run."""
    from clip import storage

    root = f"s3://{s3_bucket}/data/shards"
    cfg = ShardConfig(input_dir=str(pool / "raw"), dedup_dir=str(pool / "dedup"), output=root,
                      staging_dir=str(tmp_path / "staging"), samples_per_shard=16, upload_workers=2)
    version = shard_stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig()).data_version
    good = train(load_config(None, tiny_overrides(root, str(tmp_path / "run"), **{"train.epochs": 1})))
    assert good.data_version == version
    uri = storage.join(root, version, "shard-00002.tar")
    data = bytearray(storage.read_bytes(uri))
    data[-1] ^= 0x01  # the record padding after the end blocks
    storage.write_bytes(uri, bytes(data))
    with pytest.raises(ShardIntegrityError, match=f"{version}/shard-00002.tar"):
        train(load_config(None, tiny_overrides(root, str(tmp_path / "run2"), **{"train.epochs": 1})))
