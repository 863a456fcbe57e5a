"""The collection stage end to end: raw shards readable by webdataset with the documented fields,
candidates.parquet / query_counts.json / stats.json consistent, restart after interruption, Dask = in-process."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

import clip.collect.stage as stage
from clip.collect.matching import QueryMatcher
from clip.config import CollectConfig, ComputeConfig, StorageConfig
from clip.formats.candidates import CANDIDATE_COLUMNS, CANDIDATES_NAME, write_candidates
from clip.formats.raw import SYNTHETIC_IMAGE_SIZE_FIELD
from clip.imagehash import hamming, hex_to_int, phash64
from clip.progress import Progress, RecordingProgress
from clip.storage import StorageError

JSON_FIELDS = {"key", "url", "caption", "query", "source", "width", "height", "sha256", "phash", "color"}


def _cfg(tmp_path: Path, **overrides: object) -> CollectConfig:
    data = {
        "output_dir": str(tmp_path / "raw"), "queries_path": str(tmp_path / "queries.txt"),
        "samples_per_shard": 100, "synthetic": {"num_samples": 300, "image_size": 48},
    }
    data.update(overrides)
    return CollectConfig.model_validate(data)


def _run(cfg: CollectConfig, compute: ComputeConfig | None = None, progress: Progress | None = None) -> dict:
    """The stage's stats (what stats.json holds)."""
    return stage.run(cfg, storage=StorageConfig(), compute=compute or ComputeConfig(), progress=progress).stats


def _force_dask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put even a small pool on Dask: every map step is worth a cluster (with more than one worker)."""
    monkeypatch.setattr(stage, "MIN_PARTITIONS_FOR_CLUSTER", 1)
    monkeypatch.setattr(stage, "MIN_SHARDS_FOR_CLUSTER", 1)


def _read_shards(raw: Path) -> list[dict]:
    tars = sorted(str(p) for p in raw.glob("raw-*.tar"))
    return list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))


def test_synthetic_stage_end_to_end(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    progress = RecordingProgress()
    stats = _run(cfg, progress=progress)
    assert progress.last == {"collect: shards": (3, 3, "samples ok 300, not ok 0")}
    raw = tmp_path / "raw"
    assert sorted(p.name for p in raw.glob("raw-*.tar")) == ["raw-00000.tar", "raw-00001.tar", "raw-00002.tar"]
    assert not list(raw.glob(".*"))  # no temporary files left

    samples = _read_shards(raw)
    assert len(samples) == 300
    keys = [s["__key__"] for s in samples]
    assert keys == [f"{i:09d}" for i in range(300)]
    for sample in samples[:: 7]:
        meta = json.loads(sample["json"])
        assert set(meta) == JSON_FIELDS
        assert meta["key"] == sample["__key__"] and meta["caption"] == sample["txt"].decode()
        assert meta["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (meta["width"], meta["height"]) == (48, 48)
        assert len(meta["phash"]) == 16 and hamming(hex_to_int(meta["phash"]), phash64(image)) <= 6
        assert meta["source"] == "synthetic" and QueryMatcher([meta["query"]]).match(meta["caption"]) == [0]

    table = pq.read_table(raw / "candidates.parquet").to_pylist()
    assert len(table) == 300 and {r["status"] for r in table} == {"ok"}
    assert [r["key"] for r in table] == keys and table[150]["shard"] == "raw-00001.tar"

    queries = (tmp_path / "queries.txt").read_text().splitlines()
    assert queries == sorted(set(queries)) and all(q == q.lower().strip() for q in queries)
    assert {"red", "circle", "triangle", "blue"} <= set(queries)
    counts = json.loads((raw / "query_counts.json").read_text())["counts"]
    assert sum(c["assigned"] for c in counts.values()) == 300
    assert stats["by_status"] == {"ok": 300, "failed": 0, "filtered": 0, "skipped": 0}
    on_disk = json.loads((raw / "stats.json").read_text())
    assert on_disk["shards"] == 3 and on_disk[SYNTHETIC_IMAGE_SIZE_FIELD] == 48  # what dedup renders its eval sets at


def test_candidates_file_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    """clip.formats.candidates streams its batches through clip.storage: a batch that fails (a source that breaks
    mid-read, a status the format does not know) leaves the previous file whole and no temporary file behind."""
    row = {"key": ["000000000"], "url": ["u"], "caption": ["a red circle"], "query": ["red"], "status": ["ok"],
           "reason": [None], "shard": ["raw-00000.tar"]}
    out = tmp_path / "raw"
    write_candidates(str(out), [row, {**row, "key": [None], "status": ["skipped"], "reason": ["no_query"]}])
    before = (out / CANDIDATES_NAME).read_bytes()
    assert [r["status"] for r in pq.read_table(out / CANDIDATES_NAME).to_pylist()] == ["ok", "skipped"]

    def breaks_after_one() -> Iterator[dict]:
        yield row
        raise OSError("candidate source went away")

    with pytest.raises(StorageError, match="went away"):
        write_candidates(str(out), breaks_after_one())
    with pytest.raises(ValueError, match="unknown status"):
        write_candidates(str(out), [{**row, "status": ["lost"]}])
    with pytest.raises(ValueError, match="columns"):
        write_candidates(str(out), [{name: row[name] for name in CANDIDATE_COLUMNS[:-1]}])
    assert (out / CANDIDATES_NAME).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [CANDIDATES_NAME]


def test_per_query_cap_skips_and_keys_are_contiguous(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, per_query_cap=2)
    stats = _run(cfg)
    table = pq.read_table(tmp_path / "raw" / "candidates.parquet").to_pylist()
    ok = [r for r in table if r["status"] == "ok"]
    skipped = [r for r in table if r["status"] == "skipped"]
    assert len(ok) + len(skipped) == 300 and skipped
    assert all(r["reason"] == "query_full" and r["key"] is None for r in skipped)
    per_query: dict[str, int] = {}
    for r in ok:
        per_query[r["query"]] = per_query.get(r["query"], 0) + 1
    assert max(per_query.values()) <= 2
    assert sorted(r["key"] for r in ok) == [f"{i:09d}" for i in range(len(ok))]
    assert len(_read_shards(tmp_path / "raw")) == len(ok) == stats["by_status"]["ok"]
    counts = json.loads((tmp_path / "raw" / "query_counts.json").read_text())["counts"]
    assert {q: c["ok"] for q, c in counts.items() if c["ok"]} == per_query
    assert stats["by_reason"] == {"query_full": len(skipped)}


def test_restart_rebuilds_only_missing_shards(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _run(cfg)
    raw = tmp_path / "raw"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in raw.glob("raw-*.tar")}
    (raw / "raw-00001.tar").unlink()  # lost shard
    (raw / "records" / "raw-00002.json").unlink()  # tar renamed but its record never written
    (raw / ".raw-00002.tar.tmp-0123456789ab").write_bytes(b"half a tar")  # left over by a killed writer
    progress = RecordingProgress()
    stats = _run(cfg, progress=progress)
    assert stats["shards_built"] == 2 and stats["shards_reused"] == 1 and stats["partials_removed"] == 1
    # The reused shard counts as done from the start: the run ends on the whole pool's totals.
    assert progress.last["collect: shards"] == (3, 3, "samples ok 300, not ok 0") and progress.calls == 3
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in raw.glob("raw-*.tar")}
    assert after["raw-00000.tar"] == before["raw-00000.tar"]  # untouched
    for name in ("raw-00001.tar", "raw-00002.tar"):
        assert after[name][0] == before[name][0]  # rebuilt byte for byte: same keys, same images
    assert not list(raw.glob(".*"))
    keys = [s["__key__"] for s in _read_shards(raw)]
    assert len(keys) == len(set(keys)) == 300


def test_interrupted_run_continues_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path)
    real_build = stage.build_shard
    calls = []

    def build_then_die(*args: object) -> dict:
        if len(calls) == 1:
            raise KeyboardInterrupt  # the second shard never finishes
        calls.append(1)
        return real_build(*args)

    monkeypatch.setattr(stage, "build_shard", build_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg)
    assert len(list((tmp_path / "raw").glob("raw-*.tar"))) == 1
    monkeypatch.setattr(stage, "build_shard", real_build)
    stats = _run(cfg)
    assert stats["shards_reused"] == 1 and stats["shards_built"] == 2
    assert len(_read_shards(tmp_path / "raw")) == 300
    # A changed plan (different seed -> different captions) is not mistaken for the finished shards.
    stats = _run(cfg.model_copy(update={"seed": 1}))
    assert stats["shards_reused"] == 0


def test_folder_source_statuses(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), (200, 0, 0)).save(images / "a.jpg")
    Image.new("RGB", (10, 10), (0, 0, 200)).save(images / "b.png")  # below min_size
    (images / "c.jpg").write_bytes(b"not a jpeg at all")
    Image.new("RGB", (600, 300), (0, 200, 0)).save(images / "d.png")  # shrunk to max_side
    Image.new("RGB", (64, 64), (0, 200, 0)).save(images / "e.png")
    for name, caption in {"a": "a red photo", "b": "a blue photo", "c": "a broken photo", "d": "a green photo",
                          "e": "unrelated words"}.items():
        (images / f"{name}.txt").write_text(caption)
    cfg = _cfg(tmp_path, source="folder", folder={"path": str(images)},
               queries={"from_captions": False, "extra_lists": [str(_write(tmp_path / "q.txt", "photo\n"))]},
               fetch={"max_side": 128})
    stats = _run(cfg)
    rows = {Path(r["url"]).name: r for r in pq.read_table(tmp_path / "raw" / "candidates.parquet").to_pylist()}
    assert (rows["a.jpg"]["status"], rows["b.png"]["status"], rows["c.jpg"]["status"]) == ("ok", "filtered", "failed")
    assert (rows["b.png"]["reason"], rows["c.jpg"]["reason"]) == ("too_small", "not_an_image")
    assert (rows["e.png"]["status"], rows["e.png"]["reason"]) == ("skipped", "no_query")
    assert stats["by_status"] == {"ok": 2, "failed": 1, "filtered": 1, "skipped": 1}
    samples = _read_shards(tmp_path / "raw")
    assert [json.loads(s["json"])["width"] for s in samples] == [64, 128]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_dask_run_equals_in_process_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = _cfg(tmp_path / "a", partition_size=120)
    distributed = _cfg(tmp_path / "b", partition_size=120)
    assert not _run(local, ComputeConfig(dask_workers=1))["used_dask"]  # one worker: never a cluster
    _force_dask(monkeypatch)
    stats = _run(distributed, ComputeConfig(dask_workers=2))
    assert stats["used_dask"]
    for name in ("raw-00000.tar", "raw-00001.tar", "raw-00002.tar", "candidates.parquet", "query_counts.json"):
        assert (tmp_path / "a" / "raw" / name).read_bytes() == (tmp_path / "b" / "raw" / name).read_bytes(), name


def test_per_host_limit_holds_across_dask_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker process has its own Fetcher; each host is fetched only by the worker that owns it, so its
    limit holds as configured."""
    import pyarrow as pa

    from tests.support.webserver import ImageServer

    with ImageServer(request_delay_s=0.05) as server:
        rows = [{"url": server.url(f"/img/100x80/{i % 5}.jpg?n={i}"), "caption": f"a dog {i}"} for i in range(400)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet", row_group_size=100)
        cfg = _cfg(tmp_path, source="table", table={"paths": [str(tmp_path / "pairs.parquet")]},
                   samples_per_shard=50, partition_size=100,
                   queries={"from_captions": False, "extra_lists": [str(_write(tmp_path / "q.txt", "dog\n"))]},
                   fetch={"allow_loopback": True, "per_host_concurrency": 4, "per_host_rate": 1000.0,
                          "threads": 16})
        _force_dask(monkeypatch)
        stats = _run(cfg, ComputeConfig(dask_workers=2))
        assert stats["used_dask"] and stats["by_status"]["ok"] == 400
        assert server.stats.max_active_by_host[f"127.0.0.1:{server.port}"] <= 4, server.stats.max_active_by_host
        assert server.stats.max_active >= 2  # requests overlapped, so the limit had something to hold back


def test_pipeline_module_writes_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import collect

    monkeypatch.chdir(tmp_path)
    collect.main(["--set", "collect.synthetic.num_samples=64", "--set", "collect.samples_per_shard=50"])
    metrics = json.loads((tmp_path / "reports" / "metrics" / "collect.json").read_text())
    assert metrics["collect_ok"] == 64 and metrics["collect_shards"] == 2
    assert (tmp_path / "data" / "queries.txt").exists()


class _ImageServer:
    """Images over HTTP on 127.0.0.1: /ok/N.jpg, /gone (404), /flaky (503 until `healthy`)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.healthy = False
        server_state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.startswith("/ok/") or (self.path == "/flaky" and server_state.healthy):
                    buffer = io.BytesIO()
                    Image.new("RGB", (80, 60), (10 * len(self.path), 100, 50)).save(buffer, format="JPEG")
                    body, status = buffer.getvalue(), 200
                else:
                    body, status = b"no", (503 if self.path == "/flaky" else 404)
                self.send_response(status)
                self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_table_source_over_loopback_http_with_retry(tmp_path: Path) -> None:
    import pyarrow as pa

    server = _ImageServer()
    try:
        rows = [{"url": f"{server.url}/ok/{i}.jpg", "caption": f"a photo of a dog number {i}"} for i in range(5)]
        rows += [{"url": f"{server.url}/gone", "caption": "a dog that is gone"},
                 {"url": f"{server.url}/flaky", "caption": "a flaky dog"},
                 {"url": f"{server.url}/ok/x.jpg", "caption": "a cat"}]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
        cfg = _cfg(tmp_path, source="table", table={"paths": [str(tmp_path / "pairs.parquet")]}, samples_per_shard=4,
                   queries={"from_captions": False, "extra_lists": [str(_write(tmp_path / "q.txt", "dog\n"))]},
                   fetch={"allow_loopback": True, "retries": 0, "timeout_s": 5, "threads": 4})
        stats = _run(cfg)
        rows_out = {r["caption"]: r for r in pq.read_table(tmp_path / "raw" / "candidates.parquet").to_pylist()}
        assert rows_out["a photo of a dog number 0"]["status"] == "ok"
        assert rows_out["a dog that is gone"]["status"] == "failed"
        assert rows_out["a flaky dog"]["status"] == "failed"
        assert rows_out["a cat"]["reason"] == "no_query"
        assert stats["by_status"]["ok"] == 5 and stats["fetch_latency_ms"]["download_samples"] >= 5
        per_shard = stats["fetch_latency_ms_per_shard"]  # median and p99 of DNS and download, per shard
        assert len(per_shard) == 2 and all(name.startswith("raw-") for name in per_shard)
        for figures in per_shard.values():
            assert figures["download_ms"]["p99"] >= figures["download_ms"]["median"] > 0
            assert figures["dns_ms"]["median"] is not None
        assert len(_read_shards(tmp_path / "raw")) == 5

        server.healthy = True
        again = _run(cfg)  # without retry_failed: finished shards stay as they are
        assert again["shards_built"] == 0
        retried = _run(cfg.model_copy(update={"fetch": cfg.fetch.model_copy(update={"retry_failed": True})}))
        # Only the shard holding the retryable 503 is rebuilt; the 404 is not retryable.
        assert retried["shards_built"] == 1 and retried["by_status"]["ok"] == 6
        samples = _read_shards(tmp_path / "raw")
        assert sorted(json.loads(s["json"])["caption"] for s in samples)[0] == "a flaky dog"
        assert len({s["__key__"] for s in samples}) == 6
    finally:
        server.close()


def test_stage_writes_to_s3_and_resumes(tmp_path: Path, s3_bucket: str) -> None:
    from clip import storage

    prefix = f"s3://{s3_bucket}/raw"
    cfg = _cfg(tmp_path, output_dir=prefix, synthetic={"num_samples": 150, "image_size": 32})
    stats = _run(cfg)
    assert stats["by_status"]["ok"] == 150
    names = sorted(info.uri.rsplit("/", 1)[-1] for info in storage.list_objects(prefix))
    assert {"raw-00000.tar", "raw-00001.tar", "candidates.parquet", "query_counts.json", "stats.json"} <= set(names)
    tar_bytes = storage.read_bytes(f"{prefix}/raw-00001.tar")
    local = tmp_path / "raw-00001.tar"
    local.write_bytes(tar_bytes)
    assert len(list(wds.WebDataset(str(local), shardshuffle=False))) == 50
    again = _run(cfg)
    assert again["shards_reused"] == 2 and again["shards_built"] == 0


def test_webdataset_source_through_the_stage(tmp_path: Path) -> None:
    tars = []
    for shard in range(2):
        tars.append(str(tmp_path / f"in-{shard}.tar"))
        with wds.TarWriter(tars[-1]) as sink:
            for i in range(4):
                buffer = io.BytesIO()
                Image.new("RGB", (40, 40), (shard * 100, i * 60, 0)).save(buffer, format="PNG")
                sink.write({"__key__": f"s{shard}_{i}", "png": buffer.getvalue(), "txt": f"red thing {shard} {i}"})
    cfg = _cfg(tmp_path, source="webdataset", webdataset={"urls": tars}, samples_per_shard=3,
               queries={"from_captions": False, "extra_lists": [str(_write(tmp_path / "q.txt", "red thing\n"))]})
    stats = _run(cfg)
    assert stats["by_status"]["ok"] == 8 and stats["shards"] == 3
    samples = _read_shards(tmp_path / "raw")
    assert [s["txt"].decode() for s in samples] == [f"red thing {s} {i}" for s in range(2) for i in range(4)]
    first = Image.open(io.BytesIO(samples[5]["jpg"])).convert("RGB").getpixel((20, 20))
    assert abs(first[0] - 100) < 8 and abs(first[1] - 60) < 8  # sample s1_1, re-encoded as JPEG
    assert json.loads(samples[0]["json"])["url"].endswith("in-0.tar#s0_0")


def test_queries_mined_from_candidate_captions(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    captions = ["a red dog", "the red dog runs", "a blue bird", "one lonely cat", "a red bird", "blue sky"]
    for i, caption in enumerate(captions):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    stats = _run(_cfg(tmp_path, source="folder", folder={"path": str(images)}))
    # 6 captions: thresholds scale down to 2 occurrences; stopwords ("a", "the") never become queries.
    assert (tmp_path / "queries.txt").read_text().splitlines() == ["bird", "blue", "dog", "red", "red dog"]
    rows = {r["caption"]: r for r in pq.read_table(tmp_path / "raw" / "candidates.parquet").to_pylist()}
    assert rows["one lonely cat"]["reason"] == "no_query" and stats["by_status"]["ok"] == 5
