"""Dedup at scale: the bounded near-duplicate search against brute force on clustered pools, its comparison count,
the pool's bytes per sample, and no image decoded when the raw JSON carries the colour signature."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clip.collect.images import encode_image
from clip.config import ComputeConfig, DedupConfig, FetchConfig, StorageConfig
from clip.dedup import stage
from clip.dedup.neardup import (
    BOUND_PER_KEY,
    SMALL_RUN,
    all_pairs_comparisons,
    brute_force_labels,
    brute_force_pairs,
    cluster_labels,
    find_cross_pairs,
    find_near_duplicates,
    find_near_duplicates_dask,
    search_layout,
)
from clip.dedup.pool import read_pool_metadata
from clip.formats.errors import FormatError
from clip.formats.raw import COLOR_LENGTH, RawSample, color_signature, parse_sample_json, write_raw_shard
from tests.support.images import random_scene, reencode

THRESHOLD = 4
TOLERANCE = 40


def clustered_hashes(rng: np.random.Generator, num_random: int, cluster_sizes: list[int],
                     planted_pairs: int) -> np.ndarray:
    """Random hashes, clusters (each member within 2 bits of its centre: any two within 4), and planted pairs
    (a random hash and a copy 1..4 bits away, each source used once), shuffled. [n] uint64."""
    hashes = rng.integers(0, 2**64, size=num_random, dtype=np.uint64)
    sources = rng.choice(num_random, size=2 * planted_pairs, replace=False)
    for source, target in zip(sources[:planted_pairs], sources[planted_pairs:], strict=True):
        flipped = int(hashes[source])
        for bit in rng.choice(64, size=int(rng.integers(1, THRESHOLD + 1)), replace=False):
            flipped ^= 1 << int(bit)
        hashes[target] = flipped
    parts = [hashes]
    for size in cluster_sizes:
        centre = rng.integers(0, 2**64, dtype=np.uint64)
        flips = np.zeros(size, dtype=np.uint64)
        for _ in range(2):
            bit = rng.integers(0, 64, size=size).astype(np.uint64)
            flips ^= np.where(rng.random(size) < 0.7, np.uint64(1) << bit, np.uint64(0))
        parts.append(centre ^ flips)
    pool = np.concatenate(parts)
    return pool[rng.permutation(pool.size)]


def class_colors(rng: np.random.Generator, hashes: np.ndarray, num_classes: int) -> np.ndarray:
    """[n, 192] uint8: each hash gets one of `num_classes` base signatures (pairwise > 60 apart in one cell) plus
    noise of at most TOLERANCE / 2, so members of a class always agree and different classes never do."""
    assert num_classes * 70 <= 256
    bases = rng.integers(0, 60, size=(num_classes, COLOR_LENGTH))
    bases[:, 0] = np.arange(num_classes) * 70  # one cell sets the classes apart: >= 70 - noise > TOLERANCE
    which = rng.integers(0, num_classes, size=hashes.size)
    noise = rng.integers(0, TOLERANCE // 2 + 1, size=(hashes.size, COLOR_LENGTH))
    return np.clip(bases[which] + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clustered() -> np.ndarray:
    return clustered_hashes(np.random.default_rng(16), num_random=6000, cluster_sizes=[5000, 3000, 1000, 200, 7],
                            planted_pairs=150)


def test_clustered_pool_components_equal_brute_force(clustered: np.ndarray) -> None:
    found = find_near_duplicates(clustered, THRESHOLD)
    expected = brute_force_labels(clustered, THRESHOLD)
    np.testing.assert_array_equal(found.labels(clustered.size), expected)
    sizes = np.bincount(expected)
    assert sizes.max() >= 5000 and np.count_nonzero(sizes == 2) >= 140  # the clusters and planted pairs exist
    assert found.stats.long_runs > 0  # the leader rounds ran (runs over SMALL_RUN members)
    assert found.stats.truncated_runs == 0


def test_colour_classes_inside_clusters_equal_brute_force() -> None:
    """Clusters whose members fall into colour classes: a leader of one class must not absorb (nor block) the
    others; each class becomes its own component, as brute force says."""
    rng = np.random.default_rng(7)
    hashes = clustered_hashes(rng, num_random=3000, cluster_sizes=[1500, 600, 90], planted_pairs=60)
    colors = class_colors(rng, hashes, num_classes=3)
    found = find_near_duplicates(hashes, THRESHOLD, colors, TOLERANCE)
    expected = brute_force_labels(hashes, THRESHOLD, colors, TOLERANCE)
    np.testing.assert_array_equal(found.labels(hashes.size), expected)
    assert np.bincount(expected).max() > 300 and found.color_rejected > 0 and found.stats.long_runs > 0
    # Without the colour check the classes of a cluster merge.
    assert np.bincount(find_near_duplicates(hashes, THRESHOLD).labels(hashes.size)).max() >= 1500


def test_comparisons_are_bounded_where_all_pairs_is_not(clustered: np.ndarray) -> None:
    found = find_near_duplicates(clustered, THRESHOLD)
    n = clustered.size
    bound = n * found.stats.bound_per_hash
    assert found.stats.bound_per_hash == search_layout(n, THRESHOLD).num_keys * BOUND_PER_KEY
    assert 0 < found.stats.comparisons <= bound
    old = all_pairs_comparisons(clustered, THRESHOLD)  # what the all-pairs banded search (find_near_pairs) does
    print(f"n {n}: bounded search {found.stats.comparisons:,} comparisons (bound {bound:,}), all-pairs {old:,}")
    assert old > bound


def test_dask_search_gives_the_same_edges() -> None:
    from dask.distributed import Client, LocalCluster

    rng = np.random.default_rng(3)
    hashes = clustered_hashes(rng, num_random=2000, cluster_sizes=[800, 150], planted_pairs=40)
    colors = class_colors(rng, hashes, num_classes=2)
    local = find_near_duplicates(hashes, THRESHOLD, colors, TOLERANCE)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        distributed = find_near_duplicates_dask(hashes, THRESHOLD, client, 3, colors, TOLERANCE)
    np.testing.assert_array_equal(distributed.edges, local.edges)
    assert distributed.color_rejected == local.color_rejected
    assert distributed.stats.comparisons == local.stats.comparisons


def test_long_run_of_distinct_hashes_is_truncated_and_counted() -> None:
    """A bucket of many unrelated hashes (equal on every key, far apart elsewhere) cannot be settled by leader
    rounds: the search says so (truncated_runs) and still keeps within its bound."""
    rng = np.random.default_rng(1)
    # Equal low 32 bits, random high 32: with t = 1 (2 bands of 32 bits) all share the low band's bucket.
    hashes = (rng.integers(0, 2**32, size=3000, dtype=np.uint64) << np.uint64(32)) | np.uint64(12345)
    found = find_near_duplicates(hashes, 1)
    assert found.stats.truncated_runs == 1
    assert found.stats.comparisons <= hashes.size * found.stats.bound_per_hash
    assert found.stats.largest_run == hashes.size > SMALL_RUN


def test_cross_search_on_clusters_equals_brute_force() -> None:
    rng = np.random.default_rng(5)
    train = clustered_hashes(rng, num_random=1500, cluster_sizes=[2000], planted_pairs=0)
    evaluation = np.concatenate([train[rng.choice(train.size, 40, replace=False)] ^ np.uint64(1),
                                 rng.integers(0, 2**64, size=200, dtype=np.uint64)])
    q, r, d = find_cross_pairs(train, evaluation, THRESHOLD)
    distance = np.bitwise_count(train[:, None] ^ evaluation[None, :])
    eq, er = np.nonzero(distance <= THRESHOLD)
    np.testing.assert_array_equal(q, eq)
    np.testing.assert_array_equal(r, er)
    np.testing.assert_array_equal(d, distance[eq, er])
    assert q.size > 2000  # evaluation copies of cluster members match most of the cluster


# ------------------------------------------------------------------------------------------------------------
# Raw pools written the way collect writes them (clip.collect.images.encode_image: colour stored in the JSON)


def layout_image(colour: tuple[int, int, int], seed: int) -> Image.Image:
    """Blocks in a seeded layout plus a coloured disc: the same layout in two colours of similar luma hash alike."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (96, 96), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, 70, 2)
        draw.rectangle([x, y, x + 26, y + 26], fill=tuple(int(v) for v in rng.choice([20, 235], 3)))
    x, y = rng.integers(0, 50, 2)
    draw.ellipse([x, y, x + 45, y + 45], fill=colour)
    return image


def collected_sample(key: str, image: Image.Image, caption: str, with_color: bool = True) -> RawSample:
    processed = encode_image(image, FetchConfig(), check=False)
    meta = {"key": key, "url": None, "caption": caption, "query": "q", "source": "test", "width": processed.width,
            "height": processed.height, "sha256": processed.sha256, "phash": processed.phash}
    if with_color:
        meta["color"] = processed.color
    return RawSample(key, processed.jpeg, caption, meta)


def write_pool(folder: Path, samples: list[RawSample], per_shard: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(0, len(samples), per_shard):
        with open(folder / f"raw-{index // per_shard:05d}.tar", "wb") as handle:
            write_raw_shard(handle, samples[index:index + per_shard])


def duplicate_pool(with_color: bool) -> list[RawSample]:
    """Ten layouts each in red and green (pHash alike, colour apart), plus a re-encoded copy of every red one,
    plus 20 unrelated scenes: 10 near duplicates to remove, colour rejections to make."""
    samples = []
    for seed in range(10):
        for colour in ((220, 80, 80), (40, 160, 120)):
            samples.append(collected_sample(f"{len(samples):09d}", layout_image(colour, seed), f"s{seed}", with_color))
        samples.append(collected_sample(f"{len(samples):09d}", reencode(layout_image((220, 80, 80), seed), 40),
                                        f"copy {seed}", with_color))
    rng = np.random.default_rng(0)
    first = len(samples)
    samples += [collected_sample(f"{first + i:09d}", random_scene(rng), f"r{i}", with_color) for i in range(20)]
    return samples


def unreadable_images(folder: Path) -> None:
    """Overwrite every jpg member with bytes no decoder accepts (same length: the tar stays valid)."""
    for path in folder.glob("raw-*.tar"):
        data = bytearray(path.read_bytes())
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    data[member.offset_data:member.offset_data + member.size] = b"\x00" * member.size
        path.write_bytes(bytes(data))


def run(raw: Path, out: Path) -> stage.DedupResult:
    cfg = DedupConfig(input_dir=str(raw), output_dir=str(out), decontaminate_synthetic=False)
    return stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig())


def test_dedup_never_decodes_an_image_when_colour_is_stored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_pool(tmp_path / "raw", duplicate_pool(with_color=True), per_shard=8)
    unreadable_images(tmp_path / "raw")  # any decode would now fail
    result = run(tmp_path / "raw", tmp_path / "out")
    assert result.metrics["images_decoded_for_color_check"] == 0
    assert result.metrics["removed_by_reason"]["near_duplicate"] == 10
    assert result.metrics["near_duplicate_pairs_color_rejected"] > 0  # the colour check ran, on stored signatures
    removed = {k: d for k, r, d in zip(result.keys, result.reason, result.duplicate_of, strict=True) if r}
    assert all(int(k) % 3 == 2 and int(d) == int(k) - 2 for k, d in removed.items())  # each copy -> its red original

    # The same pool written before the colour field existed: still deduplicated, by decoding (counted, logged).
    write_pool(tmp_path / "old", duplicate_pool(with_color=False), per_shard=8)
    with caplog.at_level(logging.INFO, logger="clip.dedup.color"):
        legacy = run(tmp_path / "old", tmp_path / "old_out")
    assert legacy.reason == result.reason and legacy.duplicate_of == result.duplicate_of
    assert 0 < legacy.metrics["images_decoded_for_color_check"] < len(legacy.keys)  # only samples in pHash matches
    assert "predates the color field" in caplog.text


def test_stored_colour_matches_the_decoded_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for i in range(8):
        sample = collected_sample(f"{i:09d}", random_scene(rng), "x")
        meta = parse_sample_json(json.dumps(sample.meta).encode(), "raw-00000.tar", sample.key)
        stored = np.frombuffer(meta["color_bytes"], dtype=np.uint8)
        decoded = color_signature(Image.open(io.BytesIO(sample.jpeg)))
        assert np.abs(stored.astype(int) - decoded.astype(int)).max() <= 8  # JPEG noise only, far below 40
    bad = dict(sample.meta, color="AAAA")
    with pytest.raises(FormatError, match=r"raw-00000\.tar: 000000007\.json: color field holds 3 bytes"):
        parse_sample_json(json.dumps(bad).encode(), "raw-00000.tar", "000000007")


def test_pool_columns_hold_at_most_300_bytes_per_sample(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    scenes = [random_scene(rng, size=(48, 40)) for _ in range(40)]
    samples = [collected_sample(f"{i:09d}", scenes[i % 40], f"caption number {i} " + "words " * (i % 30))
               for i in range(2000)]
    write_pool(tmp_path / "raw", samples, per_shard=250)
    del samples
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    pool = read_pool_metadata(str(tmp_path / "raw"))
    retained = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(pool) == 2000 and pool.has_color.all()
    print(f"pool columns: {pool.bytes_per_sample():.1f} bytes/sample; retained after reading: "
          f"{retained / len(pool):.1f} bytes/sample")
    assert pool.bytes_per_sample() <= 300
    assert retained <= 300 * len(pool) + 64 * 1024  # the columns plus a constant (shard names, URIs)


def test_brute_force_labels_agree_with_brute_force_pairs() -> None:
    """The component reference itself, against the pair reference on a pool with chains (non-clique clusters)."""
    rng = np.random.default_rng(11)
    hashes = clustered_hashes(rng, num_random=1200, cluster_sizes=[60], planted_pairs=100)
    chain = [int(hashes[0])]
    for _ in range(20):  # a walk of 3-bit steps: neighbours within 4, ends far apart
        step = chain[-1]
        for bit in rng.choice(64, size=3, replace=False):
            step ^= 1 << int(bit)
        chain.append(step)
    hashes = np.concatenate([hashes, np.array(chain, dtype=np.uint64)])
    expected = cluster_labels(hashes.size, brute_force_pairs(hashes, THRESHOLD))
    np.testing.assert_array_equal(brute_force_labels(hashes, THRESHOLD), expected)
    assert np.bincount(expected).max() >= 60


def test_pool_without_stored_colour_finds_what_a_pool_with_it_finds(tmp_path: Path) -> None:
    """In a long bucket run, a member that a leader's colour check refused stays and meets later leaders, so the
    search needs colours the colour-free search never asks for. Hashes A, B, C (B 4 bits from A and from C, C 8
    from A) lead a run of 70 unrelated hashes; B and C share a colour, A does not: B absorbs C. The old pool path
    decoded only the samples a colour-free search matched (A, B), compared C with B on a zero signature and kept
    both."""
    threshold = DedupConfig().near_dup_threshold
    fillers_mask = search_layout(73, threshold).key_masks[0]  # fillers differ only here: one run in every other key
    rng = np.random.default_rng(5)
    ends = [0, 0b1111, 0b11111111]
    hashes = list(ends)
    while len(hashes) < 73:
        value = int(rng.integers(0, fillers_mask + 1)) & fillers_mask
        if value not in hashes and all(bin(value ^ end).count("1") > threshold for end in ends):
            hashes.append(value)
    images = [Image.new("RGB", (64, 64), colour) for colour in ((200, 60, 60), (50, 50, 50), (50, 56, 50))]
    images += [random_scene(rng) for _ in range(70)]

    def pool(with_color: bool) -> list[RawSample]:
        samples = []
        for i, (value, image) in enumerate(zip(hashes, images, strict=True)):
            sample = collected_sample(f"{i:09d}", image, f"caption {i}", with_color)
            meta = {**sample.meta, "phash": f"{value:016x}"}
            samples.append(RawSample(sample.key, sample.jpeg, sample.caption, meta))
        return samples

    write_pool(tmp_path / "new", pool(with_color=True), per_shard=25)
    write_pool(tmp_path / "old", pool(with_color=False), per_shard=25)
    stored = run(tmp_path / "new", tmp_path / "new_out")
    legacy = run(tmp_path / "old", tmp_path / "old_out")
    assert stored.reason[:3] == [None, None, "near_duplicate"] and stored.duplicate_of[2] == "000000001"
    assert legacy.reason == stored.reason and legacy.duplicate_of == stored.duplicate_of
