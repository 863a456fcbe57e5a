"""Dedup: banded near-duplicate search vs brute force, planted duplicates, decontamination, the stage entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from clip.config import ComputeConfig, DedupConfig, StorageConfig, config_from_dict
from clip.dedup import (
    DedupResult,
    band_layout,
    brute_force_pairs,
    cluster_labels,
    find_cross_pairs,
    find_near_pairs,
    find_near_pairs_dask,
    normalize_caption,
    stage,
)
from clip.dedup.neardup import find_pairs_in_partition, unique_pairs
from clip.formats.errors import FormatError
from clip.formats.raw import STATS_NAME, SYNTHETIC_IMAGE_SIZE_FIELD, pool_synthetic_image_size
from clip.imagehash import hamming, phash64
from clip.progress import Progress, RecordingProgress
from tests.support.images import cropped, random_scene, reencode, resized
from tests.support.shards import sample_record, write_raw_shards


def run_dedup(cfg: DedupConfig, compute: ComputeConfig | None = None,
              progress: Progress | None = None) -> DedupResult:
    """The dedup stage's entry point with default storage and compute sections."""
    return stage.run(cfg, storage=StorageConfig(), compute=compute or ComputeConfig(), progress=progress)


def planted_hashes(rng: np.random.Generator, n: int, threshold: int, clumpy: bool = False) -> np.ndarray:
    """Random hashes with ~10% copies flipped in 0..threshold+1 bits (some just outside the threshold)."""
    if clumpy:  # few distinct band values: big buckets, the expensive case for the run-by-offset loop
        hashes = rng.integers(0, 4, size=n, dtype=np.uint64) * np.uint64(0x0101010101010101)
        hashes ^= rng.integers(0, 2**8, size=n, dtype=np.uint64)
    else:
        hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    for target in rng.choice(n, size=n // 10, replace=False):
        source = int(hashes[rng.integers(0, n)])
        for bit in rng.choice(64, size=int(rng.integers(0, threshold + 2)), replace=False):
            source ^= 1 << int(bit)
        hashes[target] = source
    return hashes


@pytest.mark.parametrize("threshold", [0, 1, 2, 4, 7, 12])
def test_band_layout_tiles_64_bits(threshold: int) -> None:
    layout = band_layout(threshold)
    assert len(layout) == threshold + 1
    assert sum(w for _, w in layout) == 64
    assert [s for s, _ in layout] == list(np.cumsum([0] + [w for _, w in layout[:-1]]))
    assert max(w for _, w in layout) - min(w for _, w in layout) <= 1


@pytest.mark.parametrize("threshold", [0, 1, 3, 4, 6, 10])
@pytest.mark.parametrize("clumpy", [False, True])
def test_banded_search_equals_brute_force(threshold: int, clumpy: bool) -> None:
    rng = np.random.default_rng(threshold * 7 + clumpy)
    hashes = planted_hashes(rng, 600 if clumpy else 1500, threshold, clumpy)
    expected = brute_force_pairs(hashes, threshold)
    found = find_near_pairs(hashes, threshold)
    assert expected.shape[0] > 50  # the planted pairs exist
    np.testing.assert_array_equal(found, expected)
    # The partitioned form (what Dask runs) gives the same pairs when its partitions are merged.
    parts = [find_pairs_in_partition(hashes, threshold, band, part, 5)
             for band in range(threshold + 1) for part in range(5)]
    np.testing.assert_array_equal(unique_pairs(np.concatenate(parts)), expected)


@pytest.mark.parametrize("threshold", [0, 2, 4, 9])
def test_cross_search_equals_brute_force(threshold: int) -> None:
    rng = np.random.default_rng(100 + threshold)
    hashes = planted_hashes(rng, 1200, threshold)
    query, reference = hashes[:700], hashes[700:]
    q, r, d = find_cross_pairs(query, reference, threshold)
    all_pairs = brute_force_pairs(hashes, threshold)
    expected = all_pairs[(all_pairs[:, 0] < 700) & (all_pairs[:, 1] >= 700)]
    assert expected.shape[0] > 5
    np.testing.assert_array_equal(np.stack([q, r + 700], axis=1), expected)
    assert d.tolist() == [hamming(int(query[a]), int(reference[b])) for a, b in zip(q, r, strict=True)]


def test_dask_search_equals_local() -> None:
    from dask.distributed import Client, LocalCluster

    rng = np.random.default_rng(5)
    hashes = planted_hashes(rng, 3000, 4)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        found = find_near_pairs_dask(hashes, 4, client, num_partitions=4)
    np.testing.assert_array_equal(found, brute_force_pairs(hashes, 4))


def test_cluster_labels_match_connected_components() -> None:
    rng = np.random.default_rng(3)
    n = 500
    pairs = np.sort(rng.integers(0, n, size=(300, 2)), axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    labels = cluster_labels(n, pairs)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, reference = connected_components(graph, directed=False)
    # Same partition of the items, and each label is its component's smallest member.
    for comp in np.unique(reference):
        members = np.flatnonzero(reference == comp)
        assert set(labels[members].tolist()) == {members.min()}


def test_normalize_caption() -> None:
    assert normalize_caption("  A   Dog!!  ") == "a dog"
    assert normalize_caption("«Hello,   World.»") == "hello, world"
    assert normalize_caption("...") == ""
    assert normalize_caption("it's a cat's toy") == "it's a cat's toy"


def build_planted_pool(root: Path, num_scenes: int = 80, seed: int = 0) -> tuple[Path, dict]:
    """Raw shards of `num_scenes` unrelated scenes plus planted duplicates; returns (folder, truth).

    truth["groups"]: lists of keys that are duplicates of one another (first = expected survivor when the rule
    decides it), truth["reasons"]: expected removal reason per planted key.
    """
    rng = np.random.default_rng(seed)
    samples = []
    groups: list[list[str]] = []
    reasons: dict[str, str] = {}
    key_counter = iter(range(10**6))

    def add(image, caption, quality=90):
        key = f"{next(key_counter):09d}"
        samples.append((key, sample_record(key, image, caption, quality)))
        return key

    scenes = [random_scene(rng) for _ in range(num_scenes)]
    for i, scene in enumerate(scenes):
        caption = f"scene number {i} with shapes"
        base = add(scene, caption)
        kind = i % 8
        if kind == 0:  # exact pair copy, caption differs only in case/spacing/punctuation
            dup = add(scene, "  Scene number " + str(i) + " with SHAPES. ")
            groups.append([base, dup])
            reasons[dup] = "exact_caption_image"
        elif kind == 1:  # same bytes, a different caption
            dup = add(scene, f"another caption {i}")
            groups.append([base, dup])
            reasons[dup] = "exact_sha256"
        elif kind == 2:  # re-encoded at low JPEG quality
            groups.append([base, add(reencode(scene, 30), caption, quality=60)])
        elif kind == 3:  # downscaled
            groups.append([base, add(resized(scene, 0.6), caption)])
        elif kind == 4:  # upscaled: the bigger copy must survive
            big = add(resized(scene, 1.5), caption + " big")
            groups.append([big, base])
        elif kind == 5:  # 2% crop
            groups.append([base, add(cropped(scene, 0.02), caption)])
        elif kind == 6:  # a three-copy cluster
            groups.append([base, add(reencode(scene, 50), "x"), add(resized(scene, 0.8), "y")])
    for group in groups:
        for key in group[1:]:
            reasons.setdefault(key, "near_duplicate")
    # Shuffle so duplicates land in different raw shards.
    order = rng.permutation(len(samples))
    folder = root / "raw"
    write_raw_shards(folder, [samples[i] for i in order], per_shard=25)
    return folder, {"groups": groups, "reasons": reasons, "num_samples": len(samples)}


def test_planted_duplicates_recall_precision(tmp_path: Path) -> None:
    raw, truth = build_planted_pool(tmp_path)
    cfg = DedupConfig(input_dir=str(raw), output_dir=str(tmp_path / "dedup"), near_dup_threshold=4,
                      decontaminate_synthetic=False)
    progress = RecordingProgress()
    result = run_dedup(cfg, progress=progress)
    removed = pq.read_table(tmp_path / "dedup" / "removed.parquet").to_pylist()
    kept = pq.read_table(tmp_path / "dedup" / "keep.parquet").to_pylist()
    assert len(removed) + len(kept) == truth["num_samples"]
    assert {r["key"] for r in removed}.isdisjoint({k["key"] for k in kept})
    expected_removed = set(truth["reasons"])
    actual_removed = {r["key"] for r in removed}
    true_positive = len(expected_removed & actual_removed)
    recall = true_positive / len(expected_removed)
    precision = true_positive / max(1, len(actual_removed))
    print(f"planted duplicates: {len(expected_removed)}, removed: {len(actual_removed)}, "
          f"recall {recall:.3f}, precision {precision:.3f}")
    assert recall >= 0.95 and precision >= 0.95
    by_key = {r["key"]: r for r in removed}
    # Exact passes label what they find; the survivor rule picks the largest image then the smallest key.
    for key, reason in truth["reasons"].items():
        if reason.startswith("exact") and key in by_key:
            assert by_key[key]["reason"] == reason
    for group in truth["groups"]:
        survivors = [k for k in group if k not in actual_removed]
        assert len(survivors) == 1, group
        for key in group:
            if key in by_key:
                assert by_key[key]["duplicate_of"] == survivors[0]
    upscaled = [g for g in truth["groups"] if g[0] > g[1]]  # kind 4: bigger copy has the larger key
    assert upscaled and all(g[0] not in actual_removed for g in upscaled)
    assert result.metrics["kept"] == len(kept)
    assert result.outputs["keep"] == str(tmp_path / "dedup" / "keep.parquet")
    raw_shards = result.metrics["raw_shards"]
    assert raw_shards > 1 and progress.last["reading raw shards"][:2] == (raw_shards, raw_shards)


def test_crop_robustness_is_measured() -> None:
    """Not a pass/fail on the hash: records how far slight crops move the pHash (see BENCHMARKS.md)."""
    rng = np.random.default_rng(11)
    scenes = [random_scene(rng) for _ in range(40)]
    for fraction in (0.02, 0.05):
        distances = np.array([hamming(phash64(reencode(s, 90)), phash64(reencode(cropped(s, fraction), 90)))
                              for s in scenes])
        print(f"crop {fraction:.0%}: within 4 bits {np.mean(distances <= 4):.2f}, median {np.median(distances)}")
    unrelated = [hamming(phash64(a), phash64(b)) for a, b in zip(scenes[:-1], scenes[1:], strict=True)]
    assert min(unrelated) > 8  # unrelated scenes are far apart, so precision does not depend on luck


def test_dedup_with_dask_matches_local(tmp_path: Path) -> None:
    from dask.distributed import Client, LocalCluster

    from clip.dedup import deduplicate
    from clip.dedup.pool import read_pool_metadata

    raw, _ = build_planted_pool(tmp_path, num_scenes=24, seed=3)
    pool = read_pool_metadata(str(raw))
    local = deduplicate(pool, DedupConfig(input_dir=str(raw), decontaminate_synthetic=False), [])
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        distributed = deduplicate(pool, DedupConfig(input_dir=str(raw), decontaminate_synthetic=False,
                                                    use_dask=True), [], dask=client)
    assert distributed.reason == local.reason and distributed.duplicate_of == local.duplicate_of


def test_decontamination_removes_eval_copies(tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    eval_a = [random_scene(rng) for _ in range(12)]
    eval_b = [random_scene(rng) for _ in range(8)]
    train_only = [random_scene(rng) for _ in range(30)]
    # Evaluation folders with nested sub-folders (class folders, as ImageNet-style sets have).
    for name, images in (("set_a", eval_a), ("set_b", eval_b)):
        for i, image in enumerate(images):
            sub = tmp_path / "eval" / name / f"class{i % 3}"
            sub.mkdir(parents=True, exist_ok=True)
            image.save(sub / f"img{i}.png")
    samples = []
    planted: dict[str, str] = {}
    for i, image in enumerate(train_only):
        samples.append((f"{i:09d}", sample_record(f"{i:09d}", image, f"train {i}")))
    for j, idx in enumerate((0, 3, 7)):  # re-encoded / resized copies of three set_a images
        key = f"{100 + j:09d}"
        variant = reencode(eval_a[idx], 40) if j != 1 else resized(eval_a[idx], 0.7)
        samples.append((key, sample_record(key, variant, f"leak a{idx}")))
        planted[key] = f"set_a:class{idx % 3}/img{idx}.png"
    key = f"{200:09d}"
    samples.append((key, sample_record(key, eval_b[5], "leak b5")))
    planted[key] = "set_b:class2/img5.png"
    write_raw_shards(tmp_path / "raw", samples, per_shard=10)

    cfg = DedupConfig(input_dir=str(tmp_path / "raw"), output_dir=str(tmp_path / "dedup"),
                      eval_dirs=[str(tmp_path / "eval" / "set_a"), str(tmp_path / "eval" / "set_b")],
                      decontaminate_synthetic=False)
    run_dedup(cfg)
    removed = {r["key"]: r for r in pq.read_table(tmp_path / "dedup" / "removed.parquet").to_pylist()}
    assert set(removed) == set(planted)
    for key, match in planted.items():
        assert removed[key]["reason"] == "eval_overlap"
        assert removed[key]["duplicate_of"] == match
    report = json.loads((tmp_path / "dedup" / "overlap_report.json").read_text())
    assert report["set_a"]["matched"] == 3 and report["set_a"]["eval_images"] == 12
    assert report["set_b"]["matched"] == 1 and report["set_b"]["eval_images"] == 8
    example = report["set_b"]["examples"][0]
    assert example["train_key"] == f"{200:09d}" and example["eval_id"] == "class2/img5.png"
    assert example["distance"] == 0
    assert {e["train_key"] for e in report["set_a"]["examples"]} == {k for k in planted if k != f"{200:09d}"}


def test_synthetic_decontamination_skips_or_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from clip.dedup import deduplicate
    from clip.dedup.decontam import synthetic_eval_sets
    from clip.dedup.pool import read_pool_metadata

    sets = synthetic_eval_sets(image_size=48, num_images=30)
    try:
        from clip.synthetic import EVAL_SET_NAMES, generate_eval_set
    except ImportError:
        assert sets == [] and "synthetic evaluation sets unavailable" in caplog.text
        return
    assert [s.name for s in sets] == [f"synthetic/{n}" for n in EVAL_SET_NAMES]
    # A training pool holding JPEG copies (quality 90, as collect stores them) of two evaluation images: both are found and reported.
    leaked = generate_eval_set(EVAL_SET_NAMES[0], seed=0, n=30, image_size=48)
    rng = np.random.default_rng(2)
    samples = [(f"{i:09d}", sample_record(f"{i:09d}", random_scene(rng), f"t{i}")) for i in range(10)]
    samples += [("000000100", sample_record("000000100", leaked[4][0], "leak", quality=90)),
                ("000000101", sample_record("000000101", leaked[17][0], "leak", quality=90))]
    write_raw_shards(tmp_path / "raw", samples, per_shard=6)
    result = deduplicate(read_pool_metadata(str(tmp_path / "raw")), DedupConfig(), sets)
    removed = {k: d for k, r, d in zip(result.keys, result.reason, result.duplicate_of, strict=True) if r}
    name = f"synthetic/{EVAL_SET_NAMES[0]}"
    assert removed["000000100"] == f"{name}:4" and removed["000000101"] == f"{name}:17"
    assert result.overlap_report[name]["matched"] >= 2


def test_pipeline_entry_point_writes_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines._common import execute_stage

    raw, truth = build_planted_pool(tmp_path, num_scenes=16, seed=9)
    cfg = config_from_dict({"dedup": {"input_dir": str(raw), "output_dir": str(tmp_path / "out"),
                                      "decontaminate_synthetic": False}})
    monkeypatch.chdir(tmp_path)
    result = execute_stage("dedup", cfg, progress=RecordingProgress())
    on_disk = json.loads((tmp_path / "reports" / "metrics" / "dedup.json").read_text())
    assert result.outputs["metrics"] == "reports/metrics/dedup.json"
    assert on_disk["input_samples"] == truth["num_samples"] == result.metrics["input_samples"]
    assert on_disk["kept"] + on_disk["removed"] == truth["num_samples"]
    assert sum(on_disk["removed_by_reason"].values()) == on_disk["removed"]


def test_bad_raw_json_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    record = sample_record("000000001", random_scene(rng), "x")
    meta = json.loads(record["json"])
    del meta["phash"]
    record["json"] = json.dumps(meta).encode()
    write_raw_shards(tmp_path / "raw", [("000000001", record)], per_shard=5)
    with pytest.raises(ValueError, match=r"raw-00000\.tar.*000000001.*phash"):
        run_dedup(DedupConfig(input_dir=str(tmp_path / "raw"), output_dir=str(tmp_path / "d"),
                              decontaminate_synthetic=False))


def test_color_check_keeps_same_layout_in_other_colours(tmp_path: Path) -> None:
    """pHash is grey-level: equal-luma recolourings hash alike; the colour check keeps them apart."""
    from PIL import Image, ImageDraw

    def layout(colour: tuple[int, int, int], seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        image = Image.new("RGB", (96, 96), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        for _ in range(3):  # dark and light blocks: the layout
            x, y = rng.integers(0, 70, 2)
            draw.rectangle([x, y, x + 26, y + 26], fill=tuple(int(v) for v in rng.choice([20, 235], 3)))
        x, y = rng.integers(0, 50, 2)
        draw.ellipse([x, y, x + 45, y + 45], fill=colour)
        return image

    samples = []
    for seed in range(5):  # five layouts, each in two colours of (nearly) equal luma
        red, green = layout((220, 80, 80), seed), layout((40, 160, 120), seed)
        assert hamming(phash64(red), phash64(green)) <= 4  # the weakness is real for these images
        for image in (red, green):
            key = f"{len(samples):09d}"
            samples.append((key, sample_record(key, image, f"shape {key}")))
    # Plus a genuine near duplicate (re-encoded) of the first image, which must still go.
    samples.append(("000000100", sample_record("000000100", reencode(layout((220, 80, 80), 0), 40), "copy")))
    hashes = [phash64(reencode(layout((220, 80, 80), seed), 90)) for seed in range(5)]
    assert min(hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]) > 8  # layouts differ
    write_raw_shards(tmp_path / "raw", samples, per_shard=4)
    base = {"input_dir": str(tmp_path / "raw"), "decontaminate_synthetic": False}
    checked = run_dedup(DedupConfig(**base, output_dir=str(tmp_path / "a")))
    assert checked.metrics["removed_by_reason"]["near_duplicate"] == 1
    assert checked.duplicate_of[checked.keys.index("000000100")] == "000000000"
    assert checked.metrics["near_duplicate_pairs_color_rejected"] > 0
    phash_only = run_dedup(DedupConfig(**base, output_dir=str(tmp_path / "b"), color_tolerance=None))
    assert phash_only.metrics["removed_by_reason"]["near_duplicate"] > 1


def test_run_dedup_on_a_local_dask_cluster(tmp_path: Path) -> None:
    """use_dask with no scheduler address starts a local cluster from the compute section (worker processes)."""
    raw, _ = build_planted_pool(tmp_path, num_scenes=16, seed=5)
    base = {"input_dir": str(raw), "decontaminate_synthetic": False}
    local = run_dedup(DedupConfig(**base, output_dir=str(tmp_path / "a")))
    distributed = run_dedup(DedupConfig(**base, output_dir=str(tmp_path / "b"), use_dask=True),
                            compute=ComputeConfig(dask_workers=1, threads_per_worker=1))
    assert distributed.reason == local.reason and distributed.metrics["use_dask"]
    assert (tmp_path / "a" / "removed.parquet").read_bytes() == (tmp_path / "b" / "removed.parquet").read_bytes()


def test_dedup_asks_the_compute_runner_for_a_cluster(tmp_path: Path) -> None:
    """dedup.use_dask unset: the near-duplicate search goes where the compute section's runner says, as collect's
    steps do (`DaskRunner.wants_cluster`): a configured scheduler takes it, a local setup keeps a small pool in
    process; use_dask false keeps it in process whatever the compute section says."""
    from dask.distributed import LocalCluster

    raw, _ = build_planted_pool(tmp_path, num_scenes=16, seed=5)
    base = {"input_dir": str(raw), "decontaminate_synthetic": False}
    local = run_dedup(DedupConfig(**base, output_dir=str(tmp_path / "a")), compute=ComputeConfig(dask_workers=2))
    assert local.metrics["use_dask"] is False
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        scheduled = ComputeConfig(dask_scheduler=cluster.scheduler_address)
        kept_home = run_dedup(DedupConfig(**base, output_dir=str(tmp_path / "c"), use_dask=False), compute=scheduled)
        assert "partition_edges" not in cluster.scheduler.task_prefixes
        on_cluster = run_dedup(DedupConfig(**base, output_dir=str(tmp_path / "b")), compute=scheduled)
        assert "partition_edges" in cluster.scheduler.task_prefixes  # the search's tasks ran there
    assert on_cluster.metrics["use_dask"] is True and kept_home.metrics["use_dask"] is False
    assert on_cluster.reason == local.reason == kept_home.reason and on_cluster.duplicate_of == local.duplicate_of
    # the key's description (config show --explain) names the pool size a local cluster starts from
    from clip.dedup.dedup import MIN_SAMPLES_FOR_CLUSTER
    assert f"{MIN_SAMPLES_FOR_CLUSTER:,} samples" in (DedupConfig.model_fields["use_dask"].description or "")


def test_synthetic_image_size_comes_from_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dedup renders the synthetic evaluation sets at the size collect recorded in the pool's stats.json (it
    never sees collect's config); a pool without stats.json gets the generator's default, 64."""
    import clip.dedup.dedup as dedup_passes

    rng = np.random.default_rng(4)
    samples = [(f"{i:09d}", sample_record(f"{i:09d}", random_scene(rng), f"t{i}")) for i in range(6)]
    write_raw_shards(tmp_path / "raw", samples, per_shard=3)
    sizes_rendered: list[int] = []
    monkeypatch.setattr(dedup_passes, "synthetic_eval_sets", lambda image_size: sizes_rendered.append(image_size) or [])
    cfg = DedupConfig(input_dir=str(tmp_path / "raw"), output_dir=str(tmp_path / "dedup"),
                      decontaminate_synthetic=True)
    run_dedup(cfg)
    (tmp_path / "raw" / STATS_NAME).write_text(json.dumps({"shards": 2, SYNTHETIC_IMAGE_SIZE_FIELD: 48}))
    run_dedup(cfg)
    assert sizes_rendered == [64, 48]
    (tmp_path / "raw" / STATS_NAME).write_text(json.dumps({SYNTHETIC_IMAGE_SIZE_FIELD: "big"}))
    with pytest.raises(FormatError, match=SYNTHETIC_IMAGE_SIZE_FIELD):
        pool_synthetic_image_size(str(tmp_path / "raw"))


def _sepia(image):
    from PIL import ImageOps

    return ImageOps.colorize(image.convert("L"), (40, 26, 13), (255, 240, 192))


def _tinted(image):
    from PIL import Image

    return Image.blend(image, Image.new("RGB", image.size, (0, 90, 200)), 0.35)


def test_decontamination_removes_transformed_copies_of_evaluation_images(tmp_path: Path) -> None:
    """Recall first for evaluation overlap (issue 11.6): grayscale, sepia, tinted, re-encoded, resized, 2%-cropped
    and mirrored copies of evaluation images are removed (>= 99%), unrelated images are not. Before: the colour
    check rejected most grayscale / sepia / tinted copies and pHash alone missed mirrors and many crops."""
    from PIL import Image

    rng = np.random.default_rng(11)
    eval_dir = tmp_path / "eval" / "photos"
    eval_dir.mkdir(parents=True)
    originals = [random_scene(rng, (160, 128)) for _ in range(32)]
    for i, image in enumerate(originals):
        image.save(eval_dir / f"{i:03d}.png")
    transforms = {
        "grayscale": lambda im: im.convert("L").convert("RGB"), "sepia": _sepia, "tinted": _tinted,
        "quality30": lambda im: reencode(im, 30), "half": lambda im: resized(im, 0.5),
        "double": lambda im: resized(im, 2.0), "crop2": lambda im: cropped(im, 0.02),
        "mirrored": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    }
    samples, planted = [], set()
    for i, image in enumerate(originals):
        for name, transform in transforms.items():
            key = f"{len(samples):09d}"
            samples.append((key, sample_record(key, transform(image), f"copy {name} {i}")))
            planted.add(key)
    unrelated = set()
    for i in range(200):
        key = f"{len(samples):09d}"
        samples.append((key, sample_record(key, random_scene(rng, (160, 128)), f"unrelated {i}")))
        unrelated.add(key)
    write_raw_shards(tmp_path / "raw", samples, per_shard=100)
    cfg = DedupConfig(input_dir=str(tmp_path / "raw"), output_dir=str(tmp_path / "dedup"),
                      eval_dirs=[str(eval_dir)], decontaminate_synthetic=False, near_duplicates=False)
    result = run_dedup(cfg)
    removed = {k for k, r in zip(result.keys, result.reason, strict=True) if r == "eval_overlap"}
    missed = sorted(planted - removed)
    assert len(planted & removed) >= 0.99 * len(planted), f"missed {len(missed)}: {missed[:10]}"
    assert not removed & unrelated
    report = result.overlap_report["photos"]
    assert report["eval_images"] == 32 and report["eval_images_matched"] == 32 and report["color_rejected"] == 0


@pytest.mark.parametrize("source, expected", [("synthetic", True), ("table", False), (None, False)])
def test_synthetic_decontamination_defaults_to_synthetic_pools(tmp_path: Path, source: str | None,
                                                               expected: bool) -> None:
    """dedup.decontaminate_synthetic (null by default) checks the built-in synthetic sets only for a pool the
    synthetic source made (issue 11.6); before, a web pool was checked against them too."""
    rng = np.random.default_rng(3)
    samples = [(f"{i:09d}", sample_record(f"{i:09d}", random_scene(rng, (64, 48)), f"c {i}")) for i in range(6)]
    write_raw_shards(tmp_path / "raw", samples, per_shard=6)
    if source is not None:
        (tmp_path / "raw" / STATS_NAME).write_text(json.dumps({"source": source}))
    cfg = config_from_dict({"dedup": {"input_dir": str(tmp_path / "raw"),
                                      "output_dir": str(tmp_path / "dedup")}}).dedup
    assert cfg.decontaminate_synthetic is None
    metrics = run_dedup(cfg).metrics
    assert any(name.startswith("synthetic/") for name in metrics["eval_sets"]) is expected


def test_evaluation_datasets_are_named_once_and_read_through_the_evaluation_loaders(tmp_path: Path) -> None:
    """evaluate.datasets / evaluate.data_root are also what dedup decontaminates against (dedup.eval_datasets
    null): a DTD-layout dataset on disk, copies of its images (any split) in the pool, removed and reported."""
    from clip.config import load_config
    from pipelines import dedup as dedup_pipeline

    rng = np.random.default_rng(5)
    base = tmp_path / "eval" / "dtd" / "dtd"
    eval_images = {}
    for split, classes in {"train": ["banded", "zigzagged"], "val": ["banded"], "test": ["zigzagged", "banded"]}.items():
        lines = []
        for i, name in enumerate(classes):
            rel = f"{name}/{name}_{split}{i}.png"
            (base / "images" / name).mkdir(parents=True, exist_ok=True)
            eval_images[f"{split}/{base / 'images' / rel}"] = scene = random_scene(rng)
            scene.save(base / "images" / rel)
            lines.append(rel)
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    ids = sorted(eval_images)
    samples = [(f"{i:09d}", sample_record(f"{i:09d}", random_scene(rng), f"train {i}")) for i in range(20)]
    planted = {f"{100 + j:09d}": ids[j] for j in (0, 3)}
    for key, eval_id in planted.items():
        samples.append((key, sample_record(key, reencode(eval_images[eval_id], 50), "leak")))
    write_raw_shards(tmp_path / "raw", samples, per_shard=10)

    cfg = load_config(None, [f"dedup.input_dir={tmp_path / 'raw'}", f"dedup.output_dir={tmp_path / 'dedup'}",
                             "dedup.decontaminate_synthetic=false", "evaluate.datasets=[dtd, cifar10]",
                             f"evaluate.data_root={tmp_path / 'eval'}"])
    section = dedup_pipeline.dedup_section(cfg)
    assert section.eval_datasets == ["dtd", "cifar10"] and section.eval_root == str(tmp_path / "eval")
    run_dedup(section)
    removed = {r["key"]: r for r in pq.read_table(tmp_path / "dedup" / "removed.parquet").to_pylist()}
    assert {k: r["duplicate_of"] for k, r in removed.items()} == {k: f"dtd:{v}" for k, v in planted.items()}
    report = json.loads((tmp_path / "dedup" / "overlap_report.json").read_text())
    assert report["dtd"]["matched"] == 2 and report["dtd"]["eval_images"] == len(ids)
    assert "cifar10" not in report  # absent on disk: nothing to decontaminate against
