"""clip.storage on local disk and on moto's S3 server over HTTP, with faults injected by a loopback proxy.

    .venv/bin/pytest tests/test_storage.py -q
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import traceback
from pathlib import Path

import boto3
import pytest

from clip import storage
from clip.config import StorageConfig
from clip.storage import ObjectNotFound, StorageError

MIB = 1024 * 1024

# Small multipart threshold (moto, like S3, refuses parts under 5 MiB except the last) and fast backoff.
FAST = StorageConfig(multipart_threshold_mb=5, multipart_chunk_mb=5, backoff_base_s=0.01, max_attempts=4,
                     max_concurrency=3)


def _raw_client(endpoint: str):
    """A plain boto3 client straight to moto (not through the proxy) to check what the server holds."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _blob(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible-looking bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


# ----------------------------------------------------------------------------------------------------------
# URIs


def test_parse_and_join() -> None:
    assert storage.parse_s3_uri("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert storage.parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("s3://", "s3:///key/x"):
        with pytest.raises(StorageError, match="no bucket") as info:
            storage.parse_s3_uri(bad)
        assert bad in str(info.value)
        with pytest.raises(StorageError, match="no bucket"):
            storage.get_storage(bad)
        with pytest.raises(StorageError, match="no bucket"):
            storage.write_bytes(bad + "/obj", b"x")
    with pytest.raises(StorageError, match="scheme"):
        storage.get_storage("gs://bucket/x")
    assert storage.join("s3://b/x/", "y", "/z.tar") == "s3://b/x/y/z.tar"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("data/shards", "shard-00000.tar") == os.path.join("data/shards", "shard-00000.tar")
    assert storage.join("/abs/dir", "/sub", "f") == "/abs/dir/sub/f"


def test_basename_of_local_paths_and_s3_uris(tmp_path: Path) -> None:
    assert storage.basename("s3://bucket/data/shards/shard-00000.tar") == "shard-00000.tar"
    assert storage.basename("s3://bucket/data/shards/") == "shards"  # trailing slashes do not count
    assert storage.basename("s3://bucket") == storage.basename("s3://bucket/") == "bucket"
    assert storage.basename("data/shards/manifest.json") == "manifest.json"
    assert storage.basename("data/shards/") == "shards"
    assert storage.basename(tmp_path / "sub" / "f.bin") == "f.bin"
    assert storage.basename("file:///abs/dir/f.bin") == "f.bin"
    # the inverse of join for the last part, on both kinds of location
    for base in ("s3://bucket/x", str(tmp_path)):
        assert storage.basename(storage.join(base, "sub", "name.tar")) == "name.tar"
    with pytest.raises(StorageError, match="no bucket"):
        storage.basename("s3:///key")
    with pytest.raises(StorageError, match="scheme"):
        storage.basename("gs://bucket/x")


def test_backoff_grows_with_jitter_within_bounds() -> None:
    for attempt in range(1, 12):
        ceiling = min(20.0, 0.2 * 2 ** (attempt - 1))
        delays = [storage.backoff_delay(attempt, 0.2) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered


# ----------------------------------------------------------------------------------------------------------
# Local disk


def test_local_round_trip(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    a, b, c = storage.join(root, "a.bin"), storage.join(root, "sub", "b.bin"), storage.join(root + "-sibling", "c")
    storage.write_bytes(a, b"alpha")
    storage.write_bytes(b, b"bravo!")
    storage.write_bytes(c, b"c")
    assert storage.read_bytes(a) == b"alpha"
    assert storage.exists(a) and not storage.exists(storage.join(root, "nope"))
    assert not storage.exists(root)  # a folder is not an object
    # an unfinished write (temp name) is never listed
    (tmp_path / "store" / ".a.bin.tmp-deadbeef").write_bytes(b"partial")
    listed = storage.list_objects(root)
    assert listed == [storage.ObjectInfo(a, 5), storage.ObjectInfo(b, 6)]  # sorted, recursive, no sibling
    assert storage.list_objects(a) == [storage.ObjectInfo(a, 5)]
    assert storage.list_objects(storage.join(root, "missing")) == []
    assert storage.sha256(b) == hashlib.sha256(b"bravo!").hexdigest()
    with storage.open_read(b) as handle:
        assert handle.read() == b"bravo!"
    out = tmp_path / "dl" / "b.bin"
    storage.download_file(b, out)
    assert out.read_bytes() == b"bravo!"
    storage.delete(a)
    storage.delete(a)  # missing is fine
    assert not storage.exists(a)
    with pytest.raises(FileNotFoundError, match="a.bin"):
        storage.read_bytes(a)
    with pytest.raises(ObjectNotFound):
        storage.sha256(a)


def test_local_upload_is_idempotent(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    dst = str(tmp_path / "out" / "dst.bin")
    assert storage.upload_file(src, dst) is True
    mtime = os.stat(dst).st_mtime_ns
    assert storage.upload_file(src, dst) is False
    assert os.stat(dst).st_mtime_ns == mtime  # not rewritten
    src.write_bytes(b"y" * 1000)  # same size, new content
    assert storage.upload_file(src, dst) is True
    assert Path(dst).read_bytes() == b"y" * 1000


def test_local_failed_write_keeps_old_content_and_leaves_no_temp(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "d" / "file.json"
    storage.write_bytes(str(target), b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # the local backend fsyncs before its rename
    with pytest.raises(StorageError, match="file.json"):
        storage.write_bytes(str(target), b"new content that never lands")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]
    # and a first write that fails leaves nothing at all
    fresh = tmp_path / "d" / "fresh.json"
    with pytest.raises(StorageError):
        storage.write_bytes(str(fresh), b"data")
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def test_write_stream_is_atomic_locally(tmp_path: Path) -> None:
    target = tmp_path / "d" / "big.bin"
    assert storage.write_stream(str(target), lambda handle: handle.write(b"x" * 3000)) == 3000
    assert target.read_bytes() == b"x" * 3000

    def half_then_fail(handle) -> None:
        handle.write(b"partial")
        raise RuntimeError("source failed mid-stream")

    with pytest.raises(RuntimeError, match="mid-stream"):
        storage.write_stream(str(target), half_then_fail)
    assert target.read_bytes() == b"x" * 3000  # the old object, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["big.bin"]  # no temporary left


# ----------------------------------------------------------------------------------------------------------
# S3 (moto over HTTP)


def test_write_stream_to_s3_spools_and_cleans_up(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/streamed/obj.bin"
    spool = tmp_path / "spool"
    spool.mkdir()
    assert storage.write_stream(uri, lambda handle: handle.write(b"y" * 5000), spool_dir=spool) == 5000
    assert storage.read_bytes(uri) == b"y" * 5000
    with pytest.raises(RuntimeError):
        storage.write_stream(f"s3://{s3_bucket}/streamed/never.bin",
                             lambda handle: (handle.write(b"z"), (_ for _ in ()).throw(RuntimeError("boom"))),
                             spool_dir=spool)
    assert not storage.exists(f"s3://{s3_bucket}/streamed/never.bin")
    assert list(spool.iterdir()) == []  # spooled copies removed, on success and on failure


def test_s3_round_trip(s3_bucket: str, s3_server: str, tmp_path: Path) -> None:
    base = f"s3://{s3_bucket}/data"
    a, b = storage.join(base, "a.json"), storage.join(base, "shards", "shard-00000.tar")
    storage.write_bytes(a, b'{"k": 1}\n', FAST)
    storage.write_bytes(b, b"tarbytes", FAST)
    storage.write_bytes(f"s3://{s3_bucket}/data-sibling/x", b"x", FAST)
    assert storage.read_bytes(a, FAST) == b'{"k": 1}\n'
    assert storage.exists(a, FAST) and not storage.exists(storage.join(base, "nope"), FAST)
    assert storage.list_objects(base, FAST) == [storage.ObjectInfo(a, 9), storage.ObjectInfo(b, 8)]
    assert storage.list_objects(base + "/", FAST) == storage.list_objects(base, FAST)
    assert [o.uri for o in storage.list_objects(f"s3://{s3_bucket}", FAST)] == [
        f"s3://{s3_bucket}/data-sibling/x", a, b]  # sorted by URI: "-" sorts before "/"
    assert storage.sha256(b, FAST) == hashlib.sha256(b"tarbytes").hexdigest()
    head = _raw_client(s3_server).head_object(Bucket=s3_bucket, Key="data/a.json")
    assert head["Metadata"]["sha256"] == hashlib.sha256(b'{"k": 1}\n').hexdigest()
    with storage.open_read(a, FAST) as raw, io.TextIOWrapper(raw, encoding="utf-8") as text:
        assert text.read() == '{"k": 1}\n'
    out = tmp_path / "dl" / "a.json"
    storage.download_file(a, out, FAST)
    assert out.read_bytes() == b'{"k": 1}\n'
    assert [p.name for p in out.parent.iterdir()] == ["a.json"]
    storage.delete(a, FAST)
    storage.delete(a, FAST)  # missing is fine
    assert not storage.exists(a, FAST)
    with pytest.raises(FileNotFoundError, match="a.json"):
        storage.read_bytes(a, FAST)
    with pytest.raises(ObjectNotFound):
        storage.download_file(a, tmp_path / "never", FAST)
    assert not (tmp_path / "never").exists()
    storage.write_bytes(storage.join(base, "empty"), b"", FAST)
    assert storage.read_bytes(storage.join(base, "empty"), FAST) == b""


def test_s3_client_has_botocore_retries_off(s3_bucket: str) -> None:
    import pickle

    backend = storage.get_storage(f"s3://{s3_bucket}/x", FAST)
    storage.write_bytes(f"s3://{s3_bucket}/x", b"pickled", FAST)
    assert pickle.loads(pickle.dumps(backend)).read_bytes(f"s3://{s3_bucket}/x") == b"pickled"
    assert isinstance(backend, storage.S3Storage)
    assert backend.client.meta.config.retries["total_max_attempts"] == 1
    assert backend.client.meta.config.request_checksum_calculation == "when_required"
    assert storage.get_storage(f"s3://{s3_bucket}/y", FAST).client is backend.client  # cached


def test_s3_multipart_upload_and_download(s3_bucket: str, s3_server: str, tmp_path: Path) -> None:
    data = _blob(12 * MIB + 123)
    src = tmp_path / "big.tar"
    src.write_bytes(data)
    uri = f"s3://{s3_bucket}/shards/big.tar"
    assert storage.upload_file(src, uri, FAST) is True
    head = _raw_client(s3_server).head_object(Bucket=s3_bucket, Key="shards/big.tar")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB parts
    assert head["ContentLength"] == len(data)
    assert storage.sha256(uri, FAST) == hashlib.sha256(data).hexdigest()
    out = tmp_path / "back.tar"
    storage.download_file(uri, out, FAST)
    assert out.read_bytes() == data
    # write_bytes takes the multipart path too
    storage.write_bytes(f"s3://{s3_bucket}/wb.bin", data, FAST)
    assert storage.read_bytes(f"s3://{s3_bucket}/wb.bin", FAST) == data


# ----------------------------------------------------------------------------------------------------------
# S3 behind the fault proxy


def _no_multipart_left(endpoint: str, bucket: str) -> bool:
    return not _raw_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_idempotent_reupload_sends_nothing(s3_faulty_bucket: tuple[str, object], tmp_path: Path) -> None:
    bucket, faults = s3_faulty_bucket
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(b"s" * 1000)
    big.write_bytes(_blob(11 * MIB))
    assert storage.upload_file(small, f"s3://{bucket}/o/shard-00000.tar", FAST) is True
    assert storage.upload_file(big, f"s3://{bucket}/o/shard-00001.tar", FAST) is True
    assert faults.count("PUT", r"shard-00000") == 1
    assert faults.count("PUT", r"shard-00001.*partNumber") == 3
    assert storage.upload_file(small, f"s3://{bucket}/o/shard-00000.tar", FAST) is False
    assert storage.upload_file(big, f"s3://{bucket}/o/shard-00001.tar", FAST) is False
    assert faults.count("PUT", r"shard-00000") == 1  # no second PUT
    assert faults.count("PUT", r"shard-00001") == 3
    assert faults.count("POST", r"shard-00001\.tar\?uploads") == 1  # no second multipart upload either
    small.write_bytes(b"t" * 1000)  # changed content is uploaded again
    assert storage.upload_file(small, f"s3://{bucket}/o/shard-00000.tar", FAST) is True
    assert faults.count("PUT", r"shard-00000") == 2


@pytest.mark.parametrize("action", ["503", "slowdown", "500", "429", "drop", "drop_mid_body", "corrupt"])
def test_single_put_retried_after_fault(action: str, s3_faulty_bucket: tuple[str, object],
                                        s3_server: str) -> None:
    bucket, faults = s3_faulty_bucket
    data = _blob(256 * 1024, seed=1)
    faults.add(method="PUT", path_regex=r"/obj\.bin$", action=action, times=2)
    storage.write_bytes(f"s3://{bucket}/obj.bin", data, FAST)
    assert faults.pending() == 0
    assert faults.count("PUT", r"/obj\.bin$") == 3  # two faulted attempts, then one that went through
    stored = _raw_client(s3_server).get_object(Bucket=bucket, Key="obj.bin")["Body"].read()
    assert stored == data


def test_multipart_resends_only_the_failed_part(s3_faulty_bucket: tuple[str, object], s3_server: str,
                                                tmp_path: Path) -> None:
    bucket, faults = s3_faulty_bucket
    data = _blob(13 * MIB, seed=2)
    src = tmp_path / "shard.tar"
    src.write_bytes(data)
    faults.add(method="PUT", path_regex=r"partNumber=2", action="drop_mid_body", times=1)
    faults.add(method="PUT", path_regex=r"partNumber=2", action="corrupt", times=1)
    faults.add(method="PUT", path_regex=r"partNumber=3", action="drop", times=1)
    faults.add(method="PUT", path_regex=r"partNumber=3", action="slowdown", times=1)
    faults.add(method="POST", path_regex=r"uploadId=", action="503", times=1)  # CompleteMultipartUpload
    assert storage.upload_file(src, f"s3://{bucket}/shard.tar", FAST) is True
    assert faults.pending() == 0
    assert faults.count("PUT", r"partNumber=1\b") == 1  # never re-sent
    assert faults.count("PUT", r"partNumber=2\b") == 3
    assert faults.count("PUT", r"partNumber=3\b") == 3
    assert faults.count("POST", r"\?uploads") == 1  # the object was not started over
    assert _raw_client(s3_server).get_object(Bucket=bucket, Key="shard.tar")["Body"].read() == data
    assert _no_multipart_left(s3_server, bucket)


def test_complete_whose_response_is_lost_counts_as_done(s3_faulty_bucket: tuple[str, object], s3_server: str,
                                                        tmp_path: Path) -> None:
    bucket, faults = s3_faulty_bucket
    data = _blob(11 * MIB, seed=3)
    src = tmp_path / "shard.tar"
    src.write_bytes(data)
    faults.add(method="POST", path_regex=r"uploadId=", action="drop_response", times=1)
    assert storage.upload_file(src, f"s3://{bucket}/shard.tar", FAST) is True
    assert faults.pending() == 0
    assert _raw_client(s3_server).get_object(Bucket=bucket, Key="shard.tar")["Body"].read() == data


def test_exhausted_multipart_raises_and_leaves_nothing(s3_faulty_bucket: tuple[str, object], s3_server: str,
                                                       tmp_path: Path) -> None:
    bucket, faults = s3_faulty_bucket
    src = tmp_path / "shard.tar"
    src.write_bytes(_blob(12 * MIB, seed=4))
    uri = f"s3://{bucket}/out/shard-00007.tar"
    faults.add(method="PUT", path_regex=r"partNumber=2\b", action="503", times=1000)
    with pytest.raises(StorageError) as info:
        storage.upload_file(src, uri, FAST)
    assert uri in str(info.value) and "attempt" in str(info.value)
    assert faults.count("PUT", r"partNumber=2\b") == FAST.max_attempts
    assert faults.count("DELETE", r"uploadId=") >= 1  # aborted
    assert not storage.exists(uri, FAST)
    assert storage.list_objects(f"s3://{bucket}/out", FAST) == []
    assert _no_multipart_left(s3_server, bucket)


@pytest.mark.parametrize("action", ["drop_mid_body", "corrupt"])
def test_exhausted_single_put_raises_and_leaves_nothing(action: str, s3_faulty_bucket: tuple[str, object]) -> None:
    bucket, faults = s3_faulty_bucket
    uri = f"s3://{bucket}/manifest.json"
    faults.add(method="PUT", path_regex=r"manifest", action=action, times=1000)
    with pytest.raises(StorageError, match="manifest.json"):
        storage.write_bytes(uri, _blob(64 * 1024), FAST)
    assert faults.count("PUT", r"manifest") == FAST.max_attempts
    assert not storage.exists(uri, FAST)


def test_non_retryable_error_is_not_retried(s3_faulty_bucket: tuple[str, object], tmp_path: Path) -> None:
    bucket, faults = s3_faulty_bucket
    faults.add(method="PUT", path_regex=r"denied", action="403", times=1000)
    with pytest.raises(StorageError, match=r"s3://.*/denied.*AccessDenied"):
        storage.write_bytes(f"s3://{bucket}/denied", b"x", FAST)
    assert faults.count("PUT", r"denied") == 1
    # and with max_attempts=1 a 503 is tried exactly once: botocore adds no retries of its own
    faults.add(method="PUT", path_regex=r"once", action="503", times=1)
    with pytest.raises(StorageError, match="once"):
        storage.write_bytes(f"s3://{bucket}/once", b"x", FAST.model_copy(update={"max_attempts": 1}))
    assert faults.count("PUT", r"once") == 1
    # write-only credentials: HEAD answers 403; upload_file still uploads (it cannot tell if identical)
    faults.clear()
    faults.add(method="HEAD", path_regex=r"wo\.bin", action="403", times=1)
    src = tmp_path / "wo.bin"
    src.write_bytes(b"write-only")
    assert storage.upload_file(src, f"s3://{bucket}/wo.bin", FAST) is True
    assert faults.pending() == 0 and storage.read_bytes(f"s3://{bucket}/wo.bin", FAST) == b"write-only"


def test_reads_resume_after_drops(s3_faulty_bucket: tuple[str, object], tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    bucket, faults = s3_faulty_bucket
    data = _blob(3 * MIB, seed=5)
    uri = f"s3://{bucket}/r/shard.tar"
    storage.write_bytes(uri, data, FAST)
    faults.add(method="GET", path_regex=r"shard\.tar", action="truncate_response", times=2)
    faults.add(method="HEAD", path_regex=r"shard\.tar", action="503", times=1)
    faults.add(method="GET", path_regex=r"list-type", action="drop", times=1)
    with caplog.at_level(logging.WARNING, logger="clip.storage"):
        assert storage.read_bytes(uri, FAST) == data
    assert any("resuming" in r.getMessage() and "at byte 0" not in r.getMessage() for r in caplog.records)
    assert storage.exists(uri, FAST)
    assert [o.uri for o in storage.list_objects(f"s3://{bucket}/r", FAST)] == [uri]
    faults.add(method="GET", path_regex=r"shard\.tar", action="drop", times=1)
    faults.add(method="GET", path_regex=r"shard\.tar", action="truncate_response", times=1)
    out = tmp_path / "shard.tar"
    storage.download_file(uri, out, FAST)
    assert out.read_bytes() == data
    assert faults.pending() == 0


def test_credentials_never_in_errors_or_logs(s3_faulty_bucket: tuple[str, object], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    bucket, faults = s3_faulty_bucket
    key_id, secret = "AKIAEXAMPLEKEYID4242", "sEcReT/example+Key+0123456789abcdefXYZ"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage.clear_client_cache()
    try:
        src = tmp_path / "f.bin"
        src.write_bytes(_blob(11 * MIB, seed=6))
        faults.add(method="PUT", action="503", times=1000)
        caplog.set_level(logging.INFO)
        caplog.set_level(logging.DEBUG, logger="clip.storage")
        messages = []
        for call in (lambda: storage.upload_file(src, f"s3://{bucket}/f.bin", FAST),
                     lambda: storage.write_bytes(f"s3://{bucket}/g.bin", b"x", FAST)):
            with pytest.raises(StorageError) as info:
                call()
            messages.append("".join(traceback.format_exception(info.value)))
        faults.clear()
        storage.write_bytes(f"s3://{bucket}/ok.bin", b"ok", FAST)  # the credentials did work
        text = "\n".join(messages) + caplog.text
        assert "attempt" in caplog.text  # retries were logged
        assert key_id not in text and secret not in text
    finally:
        storage.clear_client_cache()


def test_read_detects_content_not_matching_stored_sha256(s3_bucket: str, s3_server: str) -> None:
    _raw_client(s3_server).put_object(Bucket=s3_bucket, Key="bad.bin", Body=b"actual content",
                                      Metadata={"sha256": hashlib.sha256(b"other content").hexdigest()})
    with pytest.raises(StorageError, match=r"bad\.bin.*sha256"):
        storage.read_bytes(f"s3://{s3_bucket}/bad.bin", FAST)
    # an object written by another tool (no sha256 metadata) reads fine and has no known checksum
    _raw_client(s3_server).put_object(Bucket=s3_bucket, Key="plain.bin", Body=b"plain")
    assert storage.read_bytes(f"s3://{s3_bucket}/plain.bin", FAST) == b"plain"
    assert storage.sha256(f"s3://{s3_bucket}/plain.bin", FAST) is None


def test_endpoint_env_var_wins_over_config(s3_faulty_bucket: tuple[str, object], s3_server: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, faults = s3_faulty_bucket
    via_proxy = FAST.model_copy(update={"endpoint_url": faults.endpoint})
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # straight to moto: the proxy must see nothing
    storage.write_bytes(f"s3://{bucket}/direct", b"d", via_proxy)
    assert faults.count() == 0
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.read_bytes(f"s3://{bucket}/direct", via_proxy) == b"d"  # now config's endpoint: the proxy
    assert faults.count("GET", r"/direct") == 1


def test_concurrent_uploads_share_the_client(s3_faulty_bucket: tuple[str, object], s3_server: str,
                                             tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    bucket, faults = s3_faulty_bucket
    blobs = {f"shard-{i:05d}.tar": _blob(6 * MIB if i % 2 else 300_000, seed=10 + i) for i in range(6)}
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
    faults.add(method="PUT", path_regex=r"shard-0000[0-5]", action="503", times=4)
    faults.add(method="PUT", path_regex=r"partNumber=2", action="drop_mid_body", times=2)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda n: storage.upload_file(tmp_path / n, f"s3://{bucket}/c/{n}", FAST), blobs))
    assert results == [True] * len(blobs)
    assert faults.pending() == 0
    client = _raw_client(s3_server)
    for name, data in blobs.items():
        assert client.get_object(Bucket=bucket, Key=f"c/{name}")["Body"].read() == data
    assert _no_multipart_left(s3_server, bucket)


def test_fault_proxy_keep_alive_and_chunked_bodies(s3_faulty_bucket: tuple[str, object], s3_server: str) -> None:
    """The proxy itself: several requests on one client connection, a chunked body de-chunked on the way."""
    import http.client
    from urllib.parse import urlsplit

    bucket, faults = s3_faulty_bucket
    where = urlsplit(faults.endpoint)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    try:
        conn.request("PUT", f"/{bucket}/chunked.bin", body=iter([b"abc", b"defgh", b"ij"]), encode_chunked=True)
        response = conn.getresponse()
        response.read()
        assert response.status == 200 and not response.will_close
        first_socket = conn.sock
        conn.request("PUT", f"/{bucket}/plain.bin", body=b"0123456789")  # same connection (keep-alive)
        response = conn.getresponse()
        response.read()
        assert response.status == 200 and conn.sock is first_socket
        conn.request("HEAD", f"/{bucket}/missing.bin")  # (unsigned: moto answers 403 or 404, no body)
        response = conn.getresponse()
        assert response.read() == b"" and response.status in (403, 404)
    finally:
        conn.close()
    client = _raw_client(s3_server)
    assert client.get_object(Bucket=bucket, Key="chunked.bin")["Body"].read() == b"abcdefghij"
    assert client.get_object(Bucket=bucket, Key="plain.bin")["Body"].read() == b"0123456789"
    assert faults.count(None, r"(chunked|plain|missing)\.bin", forwarded_only=True) == 3
    with pytest.raises(ValueError, match="unknown fault action"):
        faults.add(action="explode")
