"""Collection at scale: a large table input read in independent partitions, and per-host fetch limits that hold
across worker processes (issue 16, item 4).

- A CSV / TSV / JSONL file splits into byte ranges of whole records and a Parquet file into row groups; the
  partitions together hold every row exactly once, in order, equal to a one-piece read (local and s3://).
- With 2 Dask worker processes, every host is fetched by one of them: a loopback server that counts requests in
  progress per Host header never sees more than `per_host_concurrency`, while the former distribution (any
  shard in any process, each with its own limiter) exceeds it against the same servers.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import clip.collect.stage as stage
from clip.collect.build import ShardEntry, ShardTask, build_shard, close_shared_fetchers
from clip.collect.sources import Candidate, TableSource, text_partition_starts
from clip.collect.sources import table as table_source
from clip.compute import DaskRunner
from clip.config import CollectConfig, ComputeConfig, StorageConfig, TableSourceConfig
from tests.support.webserver import ImageServer

pytestmark = pytest.mark.timeout(120)

NUM_ROWS = 3000


def _rows() -> list[dict[str, str | None]]:
    """Captions with commas, quotes, unicode and (every 5th) a newline inside the field; a few missing."""
    rows: list[dict[str, str | None]] = []
    for i in range(NUM_ROWS):
        caption: str | None = f'photo {i}, a "quoted" word, café 東京 ✓'
        if i % 5 == 0:
            caption += f"\nsecond line of {i},\n\"third\" line"
        if i % 97 == 0:
            caption = None
        rows.append({"url": f"http://img.example/{i}.jpg", "caption": caption, "extra": str(i * 7)})
    return rows


def _write(folder: Path, rows: list[dict[str, str | None]]) -> dict[str, Path]:
    paths = {fmt: folder / f"pool.{fmt}" for fmt in ("csv", "tsv", "jsonl", "parquet")}
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        with open(paths[fmt], "w", newline="", encoding="utf-8") as handle:  # \r\n line ends (csv's default)
            writer = csv.DictWriter(handle, fieldnames=["url", "caption", "extra"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"], row_group_size=250)
    return paths


def _read_all(source: TableSource) -> tuple[int, list[Candidate]]:
    parts = source.partitions()
    return len(parts), [c for part in parts for c in source.iter_candidates(part)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_partitions_of_a_large_table_equal_a_one_piece_read(tmp_path: Path, fmt: str) -> None:
    rows = _rows()
    path = str(_write(tmp_path, rows)[fmt])
    cfg = TableSourceConfig(paths=[path])
    whole_parts, whole = _read_all(TableSource(cfg, partition_size=10**9, partition_bytes=1 << 40))
    count, split = _read_all(TableSource(cfg, partition_size=500, partition_bytes=16 << 10))
    assert whole_parts == 1 and count >= 6, count  # several partitions, each read on its own
    expected = [(r["url"], r["caption"] or "") for r in rows]
    assert [(c.url, c.caption) for c in whole] == expected
    assert [(c.url, c.caption) for c in split] == expected  # row for row: none lost or repeated at a boundary
    assert len({c.source_key for c in split}) == NUM_ROWS


def test_csv_cut_only_outside_quoted_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quote-aware starts are record starts; cutting at the first newline instead splits records."""
    rows = _rows()
    path = _write(tmp_path, rows)["csv"]
    data = path.read_bytes()
    header_end = data.index(b"\n") + 1
    with open(path, "rb") as handle:
        starts, size = text_partition_starts(handle, 16 << 10, csv=True)
    assert size == len(data) and starts[0] == header_end and len(starts) >= 7
    monkeypatch.setattr(table_source, "_SCAN_BLOCK_BYTES", 777)  # quote state and targets carried across blocks
    with open(path, "rb") as handle:
        assert text_partition_starts(handle, 16 << 10, csv=True) == (starts, size)

    def parse(bounds: list[int]) -> list[tuple[str, str]]:
        read = pacsv.ParseOptions(newlines_in_values=True)
        convert = pacsv.ConvertOptions(column_types={"caption": pa.string()}, strings_can_be_null=True)
        out = []
        for start, stop in zip(bounds, bounds[1:], strict=False):
            table = pacsv.read_csv(io.BytesIO(data[:header_end] + data[start:stop]), parse_options=read,
                                   convert_options=convert)
            out += [(r["url"], r["caption"] or "") for r in table.to_pylist()]
        return out

    expected = [(r["url"], r["caption"] or "") for r in rows]
    assert parse(starts + [size]) == expected
    with open(path, "rb") as handle:
        naive, _ = text_partition_starts(handle, 16 << 10, csv=False)  # any newline: some fall inside a caption
    try:
        naive_rows = parse([header_end] + [s for s in naive if s > header_end] + [size])
    except pa.ArrowInvalid:  # a cut record that does not even parse
        naive_rows = None
    assert naive_rows != expected


def test_header_only_and_single_line_files(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("url,caption\n")
    (tmp_path / "one.jsonl").write_text('{"url": "http://a/1.jpg", "caption": "one"}')  # no final newline
    for name, want in (("empty.csv", []), ("one.jsonl", [("http://a/1.jpg", "one")])):
        count, got = _read_all(TableSource(TableSourceConfig(paths=[str(tmp_path / name)]), 10, partition_bytes=4))
        assert count == 1 and [(c.url, c.caption) for c in got] == want, name


def test_partitions_of_an_s3_table(tmp_path: Path, s3_bucket: str) -> None:
    from clip import storage

    rows = _rows()[:1200]
    paths = _write(tmp_path, rows)
    for fmt in ("csv", "jsonl"):
        uri = f"s3://{s3_bucket}/meta/pool.{fmt}"
        storage.upload_file(paths[fmt], uri)
        count, got = _read_all(TableSource(TableSourceConfig(paths=[uri]), 500, StorageConfig(), 16 << 10))
        assert count >= 4 and [(c.url, c.caption) for c in got] == [(r["url"], r["caption"] or "") for r in rows]


# ---------------------------------------------------------------------------------------------------------
# per-host limits across processes

URLS_PER_HOST = 24
FETCH = {"allow_loopback": True, "per_host_concurrency": 1, "per_host_rate": 1000.0, "threads": 8, "retries": 0,
         "timeout_s": 10}


def _pool(servers: list[ImageServer]) -> list[dict[str, str]]:
    """Rows interleaving the hosts, so every shard holds URLs of every host."""
    return [{"url": server.url(f"/img/64x48/{i % 3}.jpg?n={i}"), "caption": f"a dog {h} {i}"}
            for i in range(URLS_PER_HOST) for h, server in enumerate(servers)]


def _stage_cfg(folder: Path, table: Path) -> CollectConfig:
    (folder / "q.txt").write_text("dog\n")
    return CollectConfig.model_validate({
        "output_dir": str(folder / "raw"), "queries_path": str(folder / "queries.txt"), "source": "table",
        "table": {"paths": [str(table)]}, "samples_per_shard": 9, "partition_size": 1000,
        "queries": {"from_captions": False, "extra_lists": [str(folder / "q.txt")]}, "fetch": FETCH,
    })


def test_per_host_concurrency_holds_across_two_worker_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    servers = [ImageServer(request_delay_s=0.05).start() for _ in range(3)]  # 3 hosts: 127.0.0.1 on 3 ports
    try:
        rows = _pool(servers)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pool.parquet")
        hosts = [f"127.0.0.1:{server.port}" for server in servers]

        # The stage on 2 worker processes: every host fetched by its owner only.
        monkeypatch.setattr(stage, "MIN_PARTITIONS_FOR_CLUSTER", 1)
        monkeypatch.setattr(stage, "MIN_SHARDS_FOR_CLUSTER", 1)
        (tmp_path / "dask").mkdir()
        stats = stage.run(_stage_cfg(tmp_path / "dask", tmp_path / "pool.parquet"), storage=StorageConfig(),
                          compute=ComputeConfig(dask_workers=2)).stats
        assert stats["used_dask"] and stats["by_status"]["ok"] == len(rows) and stats["shards"] == 8
        dask_max = [server.stats.max_active_by_host[host] for server, host in zip(servers, hosts, strict=True)]
        assert dask_max == [1, 1, 1], dask_max

        # Same shards in one process (no cluster): byte for byte the same output.
        (tmp_path / "local").mkdir()
        local = stage.run(_stage_cfg(tmp_path / "local", tmp_path / "pool.parquet"), storage=StorageConfig(),
                          compute=ComputeConfig(dask_workers=1)).stats
        assert not local["used_dask"]
        for i in range(8):
            name = f"raw-{i:05d}.tar"
            assert (tmp_path / "dask" / "raw" / name).read_bytes() == (tmp_path / "local" / "raw" / name).read_bytes()

        # Self-check: the former distribution (whole shards on any worker, one limiter per process) breaks the
        # limit against the same servers, so the assertion above can fail.
        for server in servers:
            server.stats.max_active_by_host.clear()
        fetch_cfg = _stage_cfg(tmp_path / "dask", tmp_path / "pool.parquet").fetch
        source = TableSource(TableSourceConfig(paths=[str(tmp_path / "pool.parquet")]), 1000)
        entries = [ShardEntry(i, 0, i, f"{i:09d}", "dog", r["caption"], r["url"]) for i, r in enumerate(rows)]
        tasks = [ShardTask(n, "x", entries[n * 9:(n + 1) * 9]) for n in range(8)]
        with DaskRunner(ComputeConfig(dask_workers=2), force_dask=True) as runner:
            parts = {p.index: p for p in source.partitions()}
            shared = (source, parts, fetch_cfg, str(tmp_path / "old"), StorageConfig())
            records = list(runner.run(build_shard, shared, ((task,) for task in tasks), True))
        assert sum(s["status"] == "ok" for r in records for s in r["samples"]) == len(rows)
        old_max = [server.stats.max_active_by_host[host] for server, host in zip(servers, hosts, strict=True)]
        assert max(old_max) >= 2, old_max
    finally:
        close_shared_fetchers()
        for server in servers:
            server.stop()


def test_host_owner_is_the_same_in_every_process() -> None:
    """Ownership must not depend on the process (Python's str hash is salted per process)."""
    import subprocess
    import sys

    from clip.collect.net.limits import host_owner

    urls = [f"http://host{i}.example:{8000 + i % 3}/a.jpg" for i in range(40)] + ["not a url", "https://ÄÖ.example/x"]
    here = [host_owner(url, 3) for url in urls]
    assert set(here) == {0, 1, 2}
    assert host_owner("http://host1.example:8001/other.jpg?q=1", 3) == here[1]  # the host decides, not the path
    code = "import json, sys; from clip.collect.net.limits import host_owner; " \
           "print(json.dumps([host_owner(u, 3) for u in json.loads(sys.argv[1])]))"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, json.dumps(urls)], capture_output=True, text=True,
                             check=True, env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert json.loads(out.stdout) == here
