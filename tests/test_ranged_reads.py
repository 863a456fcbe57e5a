"""Ranged shard reads and cheap checkpoint metadata (issue 15, item 3).

Real shard-stage output (published locally and to moto S3 over HTTP on 127.0.0.1), real files, real streams;
bytes are counted where they are read (a counting opener around clip.storage's readers) and, on S3, where the
server answers (each GetObject's Content-Length, through botocore's event hooks on the real client).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from clip import storage
from clip.config import ComputeConfig, ShardConfig, StorageConfig, load_config
from clip.formats.errors import FormatError
from clip.formats.manifest import Manifest, ShardEntry, read_manifest
from clip.formats.shard_index import ShardIndex, parse_shard_index
from clip.shards import stage as shard_stage
from clip.train import stage as train_stage
from clip.train.checkpoint import find_latest, meta_uri, save_checkpoint, step_name
from clip.train.resume import find_resume_point
from clip.train.schedule import plan_schedule
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

SAMPLES, PER_SHARD = 96, 32


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pool")
    samples = write_unique_pool(root / "raw", SAMPLES, 16, seed=7)
    write_keep(root / "dedup", {key: f"raw-{i // 16:05d}.tar" for i, key in enumerate(sorted(samples))}, samples)
    return root


def publish(pool: Path, out: str, staging: Path | None = None) -> Manifest:
    cfg = ShardConfig(input_dir=str(pool / "raw"), dedup_dir=str(pool / "dedup"), output=out,
                      samples_per_shard=PER_SHARD, staging_dir=str(staging or pool / "staging"), upload_workers=2)
    shard_stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig())
    return read_manifest(out)


@pytest.fixture(scope="module")
def published(pool: Path, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return publish(pool, str(tmp_path_factory.mktemp("out") / "shards"))


class CountingOpener:
    """An opener (clip.train.streams.Opener) over clip.storage that records each open and the bytes read."""

    def __init__(self) -> None:
        self.opens: list[dict[str, Any]] = []

    def __call__(self, uri: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        record = {"uri": uri, "start": start, "end": end, "read": 0}
        self.opens.append(record)
        return _Counted(open_uri(uri, start=start, end=end), record)

    def tar_bytes(self) -> int:
        return sum(r["read"] for r in self.opens if r["uri"].endswith(".tar"))

    def tar_opens(self) -> list[dict[str, Any]]:
        return [r for r in self.opens if r["uri"].endswith(".tar")]


class _Counted:
    def __init__(self, inner: IO[bytes], record: dict[str, Any]) -> None:
        self.inner, self.record = inner, record

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.record["read"] += len(data)
        return data

    def close(self) -> None:
        self.inner.close()


def without_indexes(manifest: Manifest) -> tuple[ShardEntry, ...]:
    """The same shards as a version published before indexes lists them."""
    return tuple(replace(s, index="", index_sha256="", index_uri="") for s in manifest.shards)


def load_index(entry: ShardEntry) -> ShardIndex:
    return parse_shard_index(storage.read_bytes(entry.index_uri), entry.index_uri)


def piece_bytes(plan: StreamPlan, epoch: int, stream: int) -> int:
    """Bytes of the samples a stream's pieces hold, from the indexes."""
    total = 0
    for shard, start, end in plan.pieces(epoch, stream):
        spans = load_index(plan.shards[shard]).samples
        total += spans[end - 1].end - spans[start].start
    return total


def raw_sample_location(plan: StreamPlan, epoch: int, stream: int, raw: int) -> tuple[int, int]:
    """(shard, sample index in the shard) of raw sample `raw` of a stream's first pass."""
    for shard, start, end in plan.pieces(epoch, stream):
        if raw < end - start:
            return shard, start + raw
        raw -= end - start
    raise AssertionError("past the pass")


def test_published_version_names_an_index_per_shard_that_tiles_it(published: Manifest) -> None:
    for entry in published.shards:
        assert entry.index and entry.index_uri.endswith(entry.index)
        raw = storage.read_bytes(entry.index_uri)
        assert hashlib.sha256(raw).hexdigest() == entry.index_sha256
        index = parse_shard_index(raw, entry.index_uri)
        shard = Path(entry.uri).read_bytes()
        assert len(index.samples) == entry.samples and index.samples[-1].end == len(shard) == entry.bytes
        for span in index.samples:
            assert hashlib.sha256(shard[span.start:span.end]).hexdigest() == span.sha256
            assert shard[span.start:span.start + 100].split(b"\0", 1)[0].decode() == f"{span.key}.jpg"


def test_stream_opening_mid_shard_reads_only_its_piece(published: Manifest) -> None:
    """4 streams over 3 shards of 32: stream 1's range [24, 48) starts mid-shard. Its pass reads exactly its
    samples' bytes, from its first sample's offset on; the full-read path (no indexes) reads whole shards."""
    plan = StreamPlan(published.shards, num_streams=4, seed=3, data_version=published.data_version)
    pieces = plan.pieces(0, 1)
    assert pieces[0][1] > 0  # the first piece starts mid-shard
    length = plan.stream_length(1)

    ranged = CountingOpener()
    stream = iter(RawStream(plan, 0, 1, ranged, StreamStats()))
    ranged_keys = [next(stream)[1] for _ in range(length)]
    expected = piece_bytes(plan, 0, 1)
    assert ranged.tar_bytes() == expected
    first_open = ranged.tar_opens()[0]
    shard, start, _end = pieces[0]
    assert first_open["uri"] == plan.shards[shard].uri
    assert first_open["start"] == load_index(plan.shards[shard]).samples[start].start > 0

    full = CountingOpener()
    old_plan = replace(plan, shards=without_indexes(published))
    old_stream = iter(RawStream(old_plan, 0, 1, full, StreamStats()))
    assert [next(old_stream)[1] for _ in range(length)] == ranged_keys  # same samples, same order
    assert all(r["start"] == 0 for r in full.tar_opens())
    from_zero = sum(load_index(plan.shards[s]).samples[end - 1].end for s, _, end in pieces)
    assert full.tar_bytes() >= from_zero  # self-check: the full-read path reads each shard from byte 0
    assert full.tar_bytes() - ranged.tar_bytes() >= first_open["start"]
    print(f"\nstream 1 pass: ranged {expected} tar bytes, full read {full.tar_bytes()}")


def test_resume_reads_only_from_the_needed_window(published: Manifest) -> None:
    """One stream, window 8, resumed at position 45: the first byte read is the first byte of raw sample 40 (the
    window's first); until the first sample is handed out only that window's 8 samples are read. The positions
    and keys equal those of the full-read path, which reads every byte before them."""
    plan = StreamPlan(published.shards, num_streams=1, seed=1, data_version=published.data_version)
    window, position = 8, 45
    counted = CountingOpener()
    resumed = shuffled_stream(RawStream(plan, 0, 0, counted, StreamStats()), window=window, start=position)
    first = next(resumed)
    shard, sample = raw_sample_location(plan, 0, 0, 40)
    index = load_index(plan.shards[shard])
    assert counted.tar_opens()[0]["uri"] == plan.shards[shard].uri
    assert counted.tar_opens()[0]["start"] == index.samples[sample].start
    window_bytes = 0
    for raw in range(40, 48):
        s, i = raw_sample_location(plan, 0, 0, raw)
        window_bytes += load_index(plan.shards[s]).samples[i].size
    assert counted.tar_bytes() == window_bytes
    ranged_first = counted.tar_bytes()
    got = [(p, k) for p, k, _ in [first] + [next(resumed) for _ in range(90)]]  # into the next pass too

    full = CountingOpener()
    old = shuffled_stream(RawStream(replace(plan, shards=without_indexes(published)), 0, 0, full, StreamStats()),
                          window=window, start=position)
    old_first = next(old)
    full_first = full.tar_bytes()
    before = sum(load_index(plan.shards[s]).samples[i].size
                 for s, i in (raw_sample_location(plan, 0, 0, r) for r in range(40)))
    assert full_first >= before + window_bytes  # self-check: the full-read path reads from byte 0
    assert [(p, k) for p, k, _ in [old_first] + [next(old) for _ in range(90)]] == got
    print(f"\nresume at {position}: ranged {ranged_first} bytes before the first sample, full read {full_first}")


def test_altered_sample_is_caught_on_a_ranged_read(pool: Path, tmp_path: Path) -> None:
    """One byte flipped inside a JPEG after publishing (size kept): the stream whose piece holds that sample
    stops naming the shard, the sample key and the version. An altered index is refused too."""
    manifest = publish(pool, str(tmp_path / "shards"))
    entry = manifest.shards[1]
    victim_span = load_index(entry).samples[20]
    data = bytearray(Path(entry.uri).read_bytes())
    data[victim_span.start + 512 + 100] ^= 0x01  # header block, then the jpg payload (members in jpg, json, txt)
    Path(entry.uri).write_bytes(bytes(data))
    plan = StreamPlan((entry,), num_streams=1, seed=0, data_version=manifest.data_version)
    counted = CountingOpener()
    stream = shuffled_stream(RawStream(plan, 0, 0, counted, StreamStats()), window=4, start=17)  # window [16, 20)
    for _ in range(3):
        next(stream)  # positions 17..19: read and verified, before the altered sample
    with pytest.raises(ShardIntegrityError) as caught:
        next(stream)
    message = str(caught.value)
    assert entry.name in message and victim_span.key in message and manifest.data_version[:12] in message
    assert "\n" not in message

    index_path = Path(manifest.shards[2].index_uri)
    index_path.write_text(index_path.read_text().replace(f'"{load_index(manifest.shards[2]).samples[0].key}"',
                                                         '"999999999"', 1))
    plan2 = StreamPlan((manifest.shards[2],), num_streams=1, seed=0, data_version=manifest.data_version)
    with pytest.raises(ShardIntegrityError, match=f"{manifest.shards[2].index}.*{manifest.shards[2].name}"):
        next(iter(RawStream(plan2, 0, 0, open_uri, StreamStats())))


def test_version_without_indexes_still_trains(published: Manifest, tmp_path: Path) -> None:
    """A version written the old way (manifest entries without index fields, data version over
    name/samples/bytes/sha256 only): streams read it whole, and a run trains on it to the end."""
    flat = tmp_path / "old-version"
    flat.mkdir()
    for entry in published.shards:
        shutil.copy(entry.uri, flat / entry.name)
    old = Manifest.build(list(without_indexes(published)))
    (flat / "manifest.json").write_bytes(old.to_bytes())
    assert "index" not in (flat / "manifest.json").read_text()
    reread = read_manifest(str(flat))
    assert reread.data_version == old.data_version != published.data_version
    assert all(not s.index for s in reread.shards)
    plan = StreamPlan(reread.shards, num_streams=2, seed=0, data_version=reread.data_version)
    assert not RawStream(plan, 0, 0, open_uri, StreamStats()).seekable
    cfg = load_config(None, tiny_overrides(str(flat), str(tmp_path / "run"), **{"train.epochs": 1}))
    result = train_stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking)
    assert result.metrics["steps"] == SAMPLES // 16 and result.metrics["data_version"] == old.data_version


def test_stream_reads_s3_pieces_with_range_gets(s3_bucket: str, pool: Path, tmp_path: Path) -> None:
    """Published to moto (publish_remote writes the indexes too); a mid-shard stream's GETs of shard objects
    carry a Range and the server sends exactly the piece's bytes; without indexes it sends whole shards."""
    root = f"s3://{s3_bucket}/data/shards"
    manifest = publish(pool, root, tmp_path / "staging")
    assert all(s.index and storage.exists(s.index_uri) for s in manifest.shards)
    client = storage.get_storage(root).client
    answered: list[dict[str, Any]] = []

    def record(http_response: Any, parsed: dict[str, Any], **_: Any) -> None:
        answered.append({"length": int(parsed.get("ContentLength", 0)), "range": parsed.get("ContentRange"),
                         "status": http_response.status_code, "url": str(http_response.url)})

    client.meta.events.register("after-call.s3.GetObject", record)
    try:
        plan = StreamPlan(manifest.shards, num_streams=4, seed=3, data_version=manifest.data_version)
        stream = iter(RawStream(plan, 0, 1, open_uri, StreamStats()))
        ranged_keys = [next(stream)[1] for _ in range(plan.stream_length(1))]
        tar_gets = [a for a in answered if ".tar" in a["url"]]
        assert tar_gets and all(a["status"] == 206 and a["range"] for a in tar_gets)
        assert sum(a["length"] for a in tar_gets) == piece_bytes(plan, 0, 1)
        answered.clear()
        old_stream = iter(RawStream(replace(plan, shards=without_indexes(manifest)), 0, 1, open_uri, StreamStats()))
        assert [next(old_stream)[1] for _ in range(plan.stream_length(1))] == ranged_keys
        tar_gets = [a for a in answered if ".tar" in a["url"]]
        assert sum(a["length"] for a in tar_gets) == sum(plan.shards[s].bytes for s, _, _ in plan.pieces(0, 1))
    finally:
        client.meta.events.unregister("after-call.s3.GetObject", record)


# ----------------------------------------------------------------------------------------------------------
# checkpoint metadata


def _checkpoint(step: int, tcfg: Any, version: str) -> dict[str, Any]:
    return {"model": {"w": torch.randn(256, 256)}, "model_config": {"name": "tiny-vit"},
            "tokenizer": "{}", "train_config": tcfg.model_dump(mode="json"), "optimizer": {"state": {}},
            "scheduler": {"last_epoch": step}, "step": step, "samples_seen": step * 16,
            "data_state": {"epoch": 0, "step_in_epoch": step, "positions": [step * 8, step * 8]},
            "rng": {}, "data_version": version, "mlflow_run_id": "run-123"}


def test_checkpoint_metadata_is_read_without_loading_the_checkpoint(tmp_path: Path) -> None:
    """The sidecar is enough to choose and check the checkpoint: with the tensor payload overwritten (same size)
    the resume point still knows its step, data version, data position and MLflow run; the whole checkpoint
    is read only on use, and then the damage is named. Without a sidecar the checkpoint is read whole."""
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(str(tmp_path / "data"), str(out)))
    version = "ab" * 32
    schedule = plan_schedule(cfg.train, SAMPLES, world_size=1)
    saved = {step: _checkpoint(step, cfg.train, version) for step in (2, 4)}
    for step, checkpoint in saved.items():
        save_checkpoint(str(out / step_name(step)), checkpoint)
    sidecar = json.loads(Path(meta_uri(str(out / step_name(4)))).read_text())
    assert sidecar["step"] == 4 and sidecar["bytes"] == (out / step_name(4)).stat().st_size

    victim = out / step_name(4)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = b"\xff" * 4096  # inside the tensor payload
    victim.write_bytes(bytes(data))
    found = find_latest(str(out))
    assert found.uri == str(victim) and found.meta["step"] == 4 and found.checkpoint is None
    assert found.meta["data_state"]["positions"] == [32, 32] and found.meta["mlflow_run_id"] == "run-123"
    with pytest.raises(FormatError, match=f"{step_name(4)} does not match its metadata sidecar"):
        found.load()
    # a resume reads the one it will use whole first: the damaged one is passed over, loudly (issue 21 item 6)
    with pytest.warns(UserWarning, match=f"{step_name(4)}; using .*{step_name(2)}"):
        assert find_resume_point(cfg.train, cfg.storage, version, schedule).start_step == 2

    Path(meta_uri(str(victim))).unlink()  # a checkpoint without sidecar (older ones) is read whole: refused
    victim.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match=step_name(4)):
        found = find_latest(str(out))
    assert found.uri.endswith(step_name(2)) and found.checkpoint is None and found.meta["step"] == 2
    Path(meta_uri(str(out / step_name(2)))).unlink()  # now read whole to choose it
    with pytest.warns(UserWarning, match=step_name(4)):
        point = find_resume_point(cfg.train, cfg.storage, version, schedule)
    assert point.start_step == 2 and point.found.checkpoint is not None
    assert point.metadata["data_state"] == saved[2]["data_state"]
    assert torch.equal(point.checkpoint["model"]["w"], saved[2]["model"]["w"])


def test_finished_run_started_again_reads_no_checkpoint(published: Manifest, tmp_path: Path) -> None:
    """A run on an indexed version trains to the end; started again, it finds itself finished from the sidecars
    alone: its checkpoints, zeroed (same size), are never loaded."""
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(published.location, str(out), **{"train.epochs": 1}))
    first = train_stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking)
    checkpoints = sorted(out.glob("*.pt"))
    assert checkpoints and all(Path(meta_uri(str(p))).exists() for p in checkpoints)
    for path in checkpoints:
        path.write_bytes(b"\0" * path.stat().st_size)
    again = train_stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking)
    assert again.metrics["steps"] == first.metrics["steps"] == SAMPLES // 16
    assert again.metrics["final_loss"] == first.metrics["final_loss"]
    assert all(set(path.read_bytes()) == {0} for path in checkpoints)  # not retrained: nothing rewritten


def test_s3_range_read_is_retried_and_resumed_within_its_range(s3_faulty_bucket: tuple[str, Any]) -> None:
    """A ranged read through the fault proxy: a 503 on the first GET is retried, a body cut in half is resumed
    with a Range that still ends at the range's end; the bytes are exactly those asked for."""
    bucket, proxy = s3_faulty_bucket
    uri = f"s3://{bucket}/objects/blob.bin"
    data = bytes(range(256)) * 12_000  # 3 MB
    cfg = StorageConfig(max_attempts=4, backoff_base_s=0.01)
    storage.write_bytes(uri, data, cfg)
    proxy.add(method="GET", path_regex=r"/objects/blob\.bin", action="503", times=1)
    proxy.add(method="GET", path_regex=r"/objects/blob\.bin", action="truncate_response", times=1)
    start, end = 1_000_003, 2_500_000
    with storage.open_read(uri, cfg, start=start, end=end) as handle:
        assert handle.read() == data[start:end]
    assert proxy.count("GET", r"/objects/blob\.bin") == 3 and proxy.pending() == 0
