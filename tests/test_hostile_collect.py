"""Hostile inputs to collect and tokenizer training: a 1 MiB caption is refused at collect (caption_too_long) and
cannot stall BPE training or make it deaf to Ctrl-C; one invalid UTF-8 byte costs its row's caption a U+FFFD,
not the whole table; a JPEG cut short inside its headers is `truncated`, not `not_an_image`."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clip.collect.stage as stage
from clip.collect.fetch import Fetcher
from clip.collect.images import ImageRejected, process_image
from clip.collect.partitions import caption_too_long
from clip.collect.sources import TableSource
from clip.config import CollectConfig, ComputeConfig, FetchConfig, StorageConfig, TableSourceConfig
from clip.tokenizer import Tokenizer, byte_symbols
from clip.tokenizer.bpe import MAX_TRAINER_PIECE_BYTES, trainer_words
from tests.support.webserver import ImageServer, Reply

REPO = Path(__file__).resolve().parents[1]
ONE_MIB = 1 << 20
NORMAL_CAPTIONS = [f"a photo of a {colour} {thing}" for colour in ("red", "blue", "green")
                   for thing in ("dog", "cat", "circle", "square")] * 10


# ----------------------------------------------------------------------------------------------------------
# collect: the caption cap


def test_caption_cap_counts_utf8_bytes() -> None:
    assert not caption_too_long("é" * 2048, 4096)  # 2 bytes each: exactly at the cap
    assert caption_too_long("é" * 2049, 4096)
    assert not caption_too_long("a" * 4096, 4096) and caption_too_long("a" * 4097, 4096)
    assert caption_too_long("\ud800" * 2000, 4096)  # a lone surrogate counts (3 bytes) and does not raise


@pytest.mark.timeout(120)
def test_collect_refuses_a_1mib_caption_and_keeps_the_others(tmp_path: Path) -> None:
    long_caption = "a dog " + "a" * ONE_MIB  # matches the query: only the cap keeps it out
    with ImageServer() as server:
        rows = [{"url": server.url(f"/img/64x48/{i}.jpg"), "caption": f"a photo of a dog number {i}"} for i in range(3)]
        rows.append({"url": server.url("/img/64x48/99.jpg"), "caption": long_caption})
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
        (tmp_path / "q.txt").write_text("dog\n")
        cfg = CollectConfig.model_validate({
            "source": "table", "table": {"paths": [str(tmp_path / "pairs.parquet")]},
            "output_dir": str(tmp_path / "raw"), "queries_path": str(tmp_path / "queries.txt"),
            "queries": {"from_captions": False, "extra_lists": [str(tmp_path / "q.txt")]},
            "fetch": {"allow_loopback": True, "retries": 0, "timeout_s": 5, "threads": 2},
        })
        assert cfg.max_caption_bytes == 4096
        stats = stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig()).stats
        assert server.stats.hits["/img/64x48/99.jpg"] == 0  # refused before any fetch
    table = pq.read_table(tmp_path / "raw" / "candidates.parquet").to_pylist()
    by_caption = {row["caption"]: row for row in table}
    refused = by_caption[long_caption]
    assert (refused["status"], refused["reason"], refused["key"], refused["shard"]) == (
        "filtered", "caption_too_long", None, None)
    assert [by_caption[f"a photo of a dog number {i}"]["status"] for i in range(3)] == ["ok"] * 3
    assert stats["by_reason"] == {"caption_too_long": 1} and stats["by_status"]["ok"] == 3


# ----------------------------------------------------------------------------------------------------------
# tokenizer training: bounded pieces, linear time, Ctrl-C


def test_trainer_pieces_are_bounded_and_lose_no_byte() -> None:
    caption = "Zebra " + "é" * ONE_MIB + " crossing"
    (words,) = list(trainer_words([caption]))
    pieces = words.split(" ")
    # One character per byte: no piece longer than the bound, and the bound is short (a few hundred bytes).
    assert max(len(p) for p in pieces) <= MAX_TRAINER_PIECE_BYTES <= 1024
    assert len(pieces) >= 2 + 2 * ONE_MIB // MAX_TRAINER_PIECE_BYTES
    # The chunks spell the long piece's bytes in order; only its last byte carries the end of word.
    to_byte = {s: b for b, s in enumerate(byte_symbols())} | {chr(0xE000 + b): b for b in range(256)}
    ends = [i for i, p in enumerate(pieces) if ord(p[-1]) >= 0xE000]
    assert ends == [0, len(pieces) - 2, len(pieces) - 1]
    long_piece = bytes(to_byte[c] for c in "".join(pieces[1:-1]))
    assert long_piece == ("é" * ONE_MIB).encode("utf-8")
    # Ordinary captions are passed on whole, as before (cleaned, each piece's last byte with the end of word).
    def end(char: str) -> str:
        return chr(0xE000 + ord(char))

    assert next(trainer_words(["A  red dog!"])) == f"{end('a')} re{end('d')} do{end('g')} {end('!')}"


@pytest.mark.timeout(60)  # a hang guard, not a timing: a 1 MiB run of one letter used to take minutes
def test_training_with_a_1mib_single_character_caption_completes() -> None:
    tokenizer = Tokenizer.train([*NORMAL_CAPTIONS, "a" * ONE_MIB], vocab_size=600)
    assert tokenizer.decode(tokenizer.encode("a photo of a red dog")) == "a photo of a red dog"
    assert len(tokenizer.encode("a photo of a red dog")) == 6  # the normal words were learnt whole


def _interrupt_after_start(script: str) -> tuple[int, str]:
    """Run `script` in a fresh interpreter (a process group of its own); once it prints 'ready', wait a second
    and press Ctrl-C (SIGINT to the group, as a terminal does). It must exit within the guard below (before
    the fix it went on for minutes), and leave no process of its group behind. Returns (exit code, stderr)."""
    # SIGINT at its default in the child, as in a terminal: a test run started in the background (`cmd &` in a
    # script) inherits SIGINT ignored, which Python keeps, and Ctrl-C would then be tested on a deaf process.
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert child.stdout.readline().strip() == "ready"
        try:
            child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGINT)
        child.wait(timeout=20)  # raises (fails the test) if Ctrl-C is ignored
        for _ in range(50):  # the trainer process it started is killed too, not left running
            try:
                os.killpg(child.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("a process of the interrupted run is still alive")
        return child.returncode, child.stderr.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


@pytest.mark.timeout(60)
def test_ctrl_c_stops_tokenizer_training_on_a_hostile_corpus() -> None:
    script = (
        "from clip.tokenizer import Tokenizer\n"
        "captions = ['a photo of a red dog'] * 50 + ['a' * (1 << 20)] * 4\n"
        "print('ready', flush=True)\n"
        "Tokenizer.train(captions, vocab_size=4096)\n"
    )
    returncode, stderr = _interrupt_after_start(script)
    assert returncode in (0, -signal.SIGINT), stderr  # finished, or stopped by the Ctrl-C


@pytest.mark.timeout(60)
def test_ctrl_c_stops_the_trainer_process_in_its_native_merges() -> None:
    # One unbounded 1 MiB word (past trainer_words' chunking): minutes of native merging that never looks at
    # signals. Ctrl-C must stop the caller and kill the trainer process.
    script = (
        "from clip.tokenizer.bpe import _learn_merges\n"
        "print('ready', flush=True)\n"
        "_learn_merges(['a' * (1 << 20)], {'vocab_size': 4096, 'show_progress': False})\n"
    )
    returncode, stderr = _interrupt_after_start(script)
    assert returncode == -signal.SIGINT and "KeyboardInterrupt" in stderr, stderr


# ----------------------------------------------------------------------------------------------------------
# a CSV with one invalid UTF-8 byte


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_invalid_utf8_byte_replaces_in_its_row_only(tmp_path: Path, fmt: str) -> None:
    rows = [(f"http://img.example/{i}.jpg", f"caption {i}".encode()) for i in range(5)]
    rows[2] = (rows[2][0], b"bad \xff byte")
    if fmt == "jsonl":
        lines = [b'{"url": "%s", "caption": "%s"}' % (url.encode(), caption) for url, caption in rows]
    else:
        sep = b"," if fmt == "csv" else b"\t"
        lines = [sep.join([b"url", b"caption"])] + [sep.join([url.encode(), caption]) for url, caption in rows]
    path = tmp_path / f"pairs.{fmt}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    source = TableSource(TableSourceConfig(paths=[str(path)]), partition_size=10)
    got = [(c.url, c.caption) for part in source.partitions() for c in source.iter_candidates(part)]
    want = [(url, caption.decode("utf-8", errors="replace")) for url, caption in rows]
    assert got == want and want[2][1] == "bad \ufffd byte"


# ----------------------------------------------------------------------------------------------------------
# a JPEG cut short


def _flat_jpeg() -> bytes:
    """A flat 64 x 64 JPEG: most of its ~700 bytes are header tables, so its first half ends inside them."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(("data", "reason"), [
    (_flat_jpeg()[: len(_flat_jpeg()) // 2], "truncated"),
    (b"\x00\x17garbage bytes that no image format claims" * 8, "not_an_image"),
])
def test_image_validation_tells_truncated_from_garbage(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        process_image(data, FetchConfig(min_size=32))
    assert caught.value.reason == reason


@pytest.mark.timeout(60)
def test_fetching_a_jpeg_cut_in_half_records_truncated() -> None:
    whole = _flat_jpeg()
    cfg = FetchConfig(allow_loopback=True, retries=0, timeout_s=5, threads=2, min_size=32)
    with ImageServer() as server, Fetcher(cfg) as fetcher:
        # A complete HTTP response whose body is half a JPEG (the file was stored cut short).
        half = server.route("/half.jpg", Reply(200, {"Content-Type": "image/jpeg"}, whole[: len(whole) // 2]))
        garbage = server.route("/garbage.jpg", Reply(200, {"Content-Type": "image/jpeg"}, b"not a jpeg" * 50))
        results = {url: fetcher.fetch(url) for url in (half, garbage, server.url("/img/64x48/1.jpg"))}
    assert [(r.status, r.reason) for r in results.values()] == [
        ("failed", "truncated"), ("failed", "not_an_image"), ("ok", None)]
