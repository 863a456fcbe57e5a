"""Photo search benchmark: images/s indexed (vs the image encoder's own rate) and query latency at 10k-1M vectors.

Indexing: a tiny-vit or ViT-B-32 bundle (random weights, tests/support/bundles.py: speed does not depend on the
values; `--bundle` for a real one) indexes `--photos` synthetic 640x480 JPEGs with `clip.runtime.index.build_index`
(decode, preprocess, encode, parts, final index), against `Bundle.encode_images` on already preprocessed batches of
32 (the encoder alone) and decode + preprocess alone, in alternating rounds (median). Query latency: random unit float16 vectors (embed_dim 512, as
ViT-B-32) written as a real index, opened with `SearchIndex.open` (the sha256 check included: "open"), then the
median of `--queries` single-query searches, exact (chunked matrix product) and, when faiss is importable, the IVF
backend (build once, nprobe 32, recall@10 against exact). The query's text encoding is timed separately.

    .venv/bin/python benchmarks/search.py --json .bench/search.json
    PYTHONPATH=/tmp/faiss-pkgs .venv/bin/python benchmarks/search.py --sizes 1000000 --skip-indexing   # with faiss
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clip.formats.index import IndexHeader, PhotoFile, write_index  # noqa: E402
from clip.runtime import Bundle, load_image  # noqa: E402
from clip.runtime.index import SearchIndex, build_index, exact_top_k  # noqa: E402


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def indexing(bundle_dir: str, photos: int, rounds: int, work: Path) -> dict[str, object]:
    """Rounds of: the encoder alone (>= 3 s), decode + preprocess alone, a whole index build; medians."""
    from tests.support.images import random_scene

    bundle = Bundle.load(bundle_dir)
    folder = work / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(photos):
        random_scene(rng, (640, 480)).save(folder / f"{i:06d}.jpg", quality=90)
    paths = sorted(folder.iterdir())
    pixels = np.random.default_rng(1).normal(size=(32, 3, bundle.image_size, bundle.image_size)).astype(np.float32)
    bundle.encode_images(pixels)  # warm-up
    encoder, decode, index = [], [], []
    for r in range(rounds):
        start, calls = time.perf_counter(), 0
        while calls < 3 or time.perf_counter() - start < 3:
            bundle.encode_images(pixels)
            calls += 1
        encoder.append(32 * calls / (time.perf_counter() - start))
        start = time.perf_counter()
        for path in paths[:100]:
            bundle.preprocess([load_image(path)])
        decode.append(len(paths[:100]) / (time.perf_counter() - start))
        start = time.perf_counter()
        built = build_index(bundle, folder, str(work / f"photos-{r}.index"))
        index.append(built.index.count / (time.perf_counter() - start))
        print(json.dumps({"round": r, "encoder": encoder[-1], "decode": decode[-1], "index": index[-1]}))
    return {"model": bundle.info.get("model"), "photos": photos, "rounds": rounds,
            "encoder_images_per_s": statistics.median(encoder), "decode_preprocess_images_per_s":
            statistics.median(decode), "index_images_per_s": statistics.median(index),
            "index_per_round": index, "encoder_per_round": encoder}


def latency(size: int, dim: int, queries: int, work: Path, with_faiss: bool) -> dict[str, float]:
    rng = np.random.default_rng(size)
    vectors = np.empty((size, dim), np.float16)
    for start in range(0, size, 100_000):  # unit rows, made a block at a time (float64 of 1M x 512 is 4 GiB)
        block = rng.standard_normal((min(100_000, size - start), dim), dtype=np.float32)
        vectors[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    header = IndexHeader(bundle_sha256="0" * 64, bundle="-", model="-", embed_dim=dim, root="/photos",
                         files=[PhotoFile(f"{i:07d}.jpg", 1, 1) for i in range(size)], skipped=[], embeddings="",
                         embeddings_sha256="")
    folder = str(work / f"random-{size}")
    write_index(folder, header, vectors)
    del vectors
    start = time.perf_counter()
    chunked = SearchIndex.open(folder, resident_bytes=0)  # float16 rows converted chunk by chunk per query
    out: dict[str, float] = {"vectors": size, "open_s": time.perf_counter() - start}
    query_vectors = rng.standard_normal((queries + 1, dim), dtype=np.float32)
    query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
    index = SearchIndex.open(folder)
    start = time.perf_counter()
    index.search_vectors(query_vectors[0], 10)  # the first exact search converts to float32 (resident)
    out["resident_first_query_s"] = time.perf_counter() - start
    for name, opened in (("exact_chunked", chunked), ("exact_resident", index)):
        times, cpu = [], []
        for q in query_vectors:
            start, cpu_start = time.perf_counter(), time.process_time()
            opened.search_vectors(q, 10)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        out[f"{name}_ms"] = 1000 * statistics.median(times[1:])
        out[f"{name}_cpu_ms"] = 1000 * statistics.median(cpu[1:])
    del chunked
    if with_faiss:
        start = time.perf_counter()
        index.faiss_index()
        out["faiss_build_s"] = time.perf_counter() - start
        times, recall = [], []
        for q in query_vectors:
            start = time.perf_counter()
            hits = index.search_vectors(q, 10, backend="faiss")[0]
            times.append(time.perf_counter() - start)
            exact = exact_top_k(index.embeddings, q, 10)[0][0]
            recall.append(len({int(Path(h.file).stem) for h in hits} & set(exact.tolist())) / 10)
        out["faiss_ms"] = 1000 * statistics.median(times[1:])
        out["faiss_recall_at_10"] = float(np.mean(recall))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="a bundle folder [default: build a random-weight one of --model]")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--skip-indexing", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    try:
        import faiss  # noqa: F401
        with_faiss = True
    except ImportError:
        with_faiss = False
    report: dict[str, object] = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": os.getloadavg()[0],
                                 "faiss": with_faiss}
    print(json.dumps(report))
    with tempfile.TemporaryDirectory(prefix="clip-search-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_indexing:
            bundle_dir = args.bundle
            if bundle_dir is None:
                from tests.support.bundles import make_bundle
                bundle_dir = make_bundle(work / "bundle", args.model)
            report["indexing"] = indexing(bundle_dir, args.photos, args.rounds, work)
            text_bundle = Bundle.load(bundle_dir)
            text_bundle.encode_texts(["warm-up"])
            times = []
            for _ in range(20):
                start = time.perf_counter()
                text_bundle.encode_texts(["a red car at night"], normalize=True)
                times.append(time.perf_counter() - start)
            report["text_query_encode_ms"] = 1000 * statistics.median(times)
            print(json.dumps(report))
        measured: list[dict[str, float]] = []
        report["latency"] = measured
        for size in args.sizes:
            measured.append(latency(size, args.dim, args.queries, work, with_faiss))
            print(json.dumps(measured[-1]))
    report["load_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
