"""clip.formats: the one tar reader and writer, the manifest, the bundle manifest, the results table, metrics."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from clip.formats.bundle import verify_bundle, write_bundle
from clip.formats.errors import FormatError, MissingInputError
from clip.formats.manifest import Manifest, ShardEntry, data_version, read_manifest
from clip.formats.metrics import metrics_uri, read_metrics, write_metrics
from clip.formats.raw import RawSample, read_raw_shard_metadata, write_raw_shard
from clip.formats.results import ResultRow, ResultsTable
from clip.formats.tar import DeterministicTarWriter, TruncatedTarError, iter_tar_members, iter_tar_samples


def _tar(samples: dict[str, dict[str, bytes]]) -> bytes:
    out = io.BytesIO()
    writer = DeterministicTarWriter(out)
    for key, members in samples.items():
        writer.add_sample(key, members)
    writer.close()
    return out.getvalue()


SAMPLES = {"000000001": {"jpg": b"\xff\xd8one", "txt": b"a cat", "json": b"{}"},
           "000000002": {"jpg": b"\xff\xd8two" * 300, "txt": b"a dog", "json": b"{}"}}


def test_written_tar_reads_back_with_tarfile_and_our_reader() -> None:
    data = _tar(SAMPLES)
    assert _tar(SAMPLES) == data  # byte-deterministic
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # an independent reader agrees
        assert {m.name: tar.extractfile(m).read() for m in tar} == {
            f"{k}.{e}": v for k, members in SAMPLES.items() for e, v in members.items()}
    assert dict(iter_tar_samples(io.BytesIO(data))) == SAMPLES


def test_unwanted_payloads_are_skipped_and_gzip_is_read() -> None:
    data = gzip.compress(_tar(SAMPLES))
    got = dict(iter_tar_samples(io.BytesIO(data), want={"txt"}.__contains__, decompress=True))
    assert got["000000002"] == {"jpg": None, "json": None, "txt": b"a dog"}


def test_truncated_tar_yields_complete_samples_then_raises() -> None:
    data = _tar(SAMPLES)
    cut = data.index(b"\xff\xd8two") + 100  # inside the second sample's image
    got = []
    with pytest.raises(TruncatedTarError):
        for key, _members in iter_tar_samples(io.BytesIO(data[:cut])):
            got.append(key)
    assert got == ["000000001"]
    corrupt = bytearray(data)
    corrupt[0] ^= 0xFF  # the first header's checksum no longer matches
    with pytest.raises(TruncatedTarError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(corrupt))))


def test_raw_shard_metadata_needs_complete_samples(tmp_path: Path) -> None:
    meta = {"key": "000000001", "sha256": "ab", "phash": "00000000000000ff", "width": 4, "height": 3}
    path = tmp_path / "raw-00000.tar"
    with open(path, "wb") as f:
        write_raw_shard(f, [RawSample("000000001", b"jpeg", "a cat", meta)])
    [parsed], incomplete = read_raw_shard_metadata(str(path))
    assert incomplete == 0 and parsed["phash_int"] == 255 and parsed["key"] == "000000001"
    with open(path, "wb") as f:
        write_raw_shard(f, [RawSample("000000001", b"jpeg", "a cat", {**meta, "phash": "xyz"})])
    with pytest.raises(FormatError, match=r"raw-00000.tar: 000000001.json has a bad phash"):
        read_raw_shard_metadata(str(path))


def test_manifest_round_trip_and_refusals(tmp_path: Path) -> None:
    shards = [ShardEntry("shard-00001.tar", 5, 10240, "b" * 64), ShardEntry("shard-00000.tar", 7, 20480, "a" * 64)]
    manifest = Manifest.build(shards)
    assert [s.name for s in manifest.shards] == ["shard-00000.tar", "shard-00001.tar"]
    assert manifest.data_version == data_version(shards) and manifest.total_samples == 12
    (tmp_path / "manifest.json").write_bytes(manifest.to_bytes())
    read = read_manifest(str(tmp_path))
    assert read.data_version == manifest.data_version
    assert read.shards[0].uri == str(tmp_path / "shard-00000.tar")
    doc = json.loads(manifest.to_bytes())
    doc["shards"][0]["samples"] = 8  # edited by hand: the version no longer matches the list
    doc["total_samples"] = 13
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="does not match its shard list"):
        read_manifest(str(tmp_path))
    with pytest.raises(MissingInputError, match="run the shard stage first"):
        read_manifest(str(tmp_path / "absent"))


def test_bundle_is_verified_file_by_file(tmp_path: Path) -> None:
    files = {"image_encoder.onnx": b"img", "text_encoder.onnx": b"txt", "tokenizer.json": b"{}",
             "preprocess.json": b"{}", "model_card.md": b"# card"}
    folder = str(tmp_path / "bundle")
    write_bundle(folder, files, {"data_version": "abc"})
    assert verify_bundle(folder).info == {"data_version": "abc"}
    (tmp_path / "bundle" / "text_encoder.onnx").write_bytes(b"tampered")
    with pytest.raises(FormatError, match="text_encoder.onnx was altered"):
        verify_bundle(folder)
    (tmp_path / "bundle" / "tokenizer.json").unlink()
    (tmp_path / "bundle" / "text_encoder.onnx").write_bytes(b"txt")
    with pytest.raises(FormatError, match="tokenizer.json is missing"):
        verify_bundle(folder)
    with pytest.raises(MissingInputError, match="no bundle"):
        verify_bundle(str(tmp_path / "nothing"))


def test_results_table_formats_agree() -> None:
    table = ResultsTable(rows=(
        ResultRow("cifar10", "zeroshot", "accuracy", 0.5, 100),
        ResultRow("mnist", "zeroshot", "accuracy", 0.75, 50),
        ResultRow("sun397", "zeroshot", "accuracy", None, 0, "skipped", "data/eval/sun397 not found"),
    ))
    assert table.mean == pytest.approx(0.625)  # skipped rows are listed, not averaged
    assert ResultsTable.from_json_bytes(table.to_json_bytes()) == table
    assert table.to_csv().splitlines()[1] == "cifar10,zeroshot,accuracy,0.5,100,ok,,0,,,,"  # shots, spread, matching_shots: empty
    assert "skipped (data/eval/sun397 not found)" in table.to_markdown()
    with pytest.raises(FormatError):
        ResultsTable.from_json_bytes(b'{"rows": []}')


def test_metrics_land_in_one_place(tmp_path: Path) -> None:
    uri = metrics_uri("dedup", str(tmp_path))
    write_metrics(uri, {"kept": 3, "ratio": float("nan")})
    assert uri == str(tmp_path / "dedup.json") and read_metrics(uri) == {"kept": 3, "ratio": None}
