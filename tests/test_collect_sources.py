"""Candidate sources read their real formats; the synthetic generator is deterministic, varied, and holds out
colour x shape combinations."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from clip import synthetic
from clip.collect.sources import (
    FolderSource,
    SourceError,
    SyntheticSource,
    TableSource,
    WebdatasetSource,
)
from clip.config import FolderSourceConfig, SyntheticSourceConfig, TableSourceConfig, WebdatasetSourceConfig

ROWS = [
    {"URL": f"http://img.example/{i}.jpg", "TEXT": f"caption {i}, with \"quotes\"" + ("\nand a newline" if i == 3 else ""),
     "score": i / 10}
    for i in range(25)
]
ROWS[7]["TEXT"] = None  # a missing caption reads as ""


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tables(folder: Path) -> dict[str, Path]:
    table = pa.Table.from_pylist(ROWS)
    paths = {fmt: folder / f"meta.{fmt}" for fmt in ("parquet", "csv", "tsv", "jsonl")}
    pq.write_table(table, paths["parquet"], row_group_size=10)
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        with open(paths[fmt], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["URL", "TEXT", "score"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(ROWS)
    paths["jsonl"].write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return paths


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_table_source_reads_each_format(tmp_path: Path, fmt: str) -> None:
    path = _write_tables(tmp_path)[fmt]
    source = TableSource(TableSourceConfig(paths=[str(path)], url_column="URL", caption_column="TEXT"), partition_size=10)
    parts = source.partitions()
    assert len(parts) == (3 if fmt == "parquet" else 1)  # parquet: row groups of 10 -> partitions of 10 rows
    got = [c for p in parts for c in source.iter_candidates(p)]
    assert [c.url for c in got] == [row["URL"] for row in ROWS]
    assert [c.caption for c in got] == [row["TEXT"] or "" for row in ROWS]
    assert len({c.source_key for c in got}) == len(ROWS)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_table_source_missing_column_names_column_and_file(tmp_path: Path, fmt: str) -> None:
    path = _write_tables(tmp_path)[fmt]
    source = TableSource(TableSourceConfig(paths=[str(path)], url_column="URL", caption_column="caption"), 10)
    with pytest.raises(SourceError) as err:
        source.partitions()
    assert "'caption'" in str(err.value) and str(path) in str(err.value) and "caption_column" in str(err.value)


def test_table_source_globs_and_missing_files(tmp_path: Path) -> None:
    _write_tables(tmp_path)
    source = TableSource(TableSourceConfig(paths=[str(tmp_path / "*.parquet"), str(tmp_path / "meta.{csv,tsv}")],
                                           url_column="URL", caption_column="TEXT"), 100)
    assert [Path(f).name for f in source.files] == ["meta.parquet", "meta.csv", "meta.tsv"]
    with pytest.raises(SourceError, match=r"nothing\*\.parquet matches no file"):
        TableSource(TableSourceConfig(paths=[str(tmp_path / "nothing*.parquet")]), 10)


def test_folder_source_with_sidecars(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    files = {"b.png": ((255, 0, 0), "a red square"), "a.jpg": ((0, 0, 255), "blue"), "sub/c.png": ((0, 255, 0), None)}
    for name, (color, caption) in files.items():
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        Image.new("RGB", (40, 40), color).save(tmp_path / name, format=fmt)
        if caption is not None:
            (tmp_path / name).with_suffix(".txt").write_text(caption + "\n")
    (tmp_path / "notes.md").write_text("not an image")
    source = FolderSource(FolderSourceConfig(path=str(tmp_path)), partition_size=2)
    parts = source.partitions()
    assert len(parts) == 2
    got = [c for p in parts for c in source.iter_candidates(p)]
    assert [(c.source_key, c.caption) for c in got] == [("a.jpg", "blue"), ("b.png", "a red square"), ("sub/c.png", "")]
    assert all(c.image is None for c in got)
    loaded = source.load_images(parts[0], [1])
    assert loaded[1].image == (tmp_path / "b.png").read_bytes()
    with pytest.raises(SourceError, match="is not a folder"):
        FolderSource(FolderSourceConfig(path=str(tmp_path / "missing")), 10)


def test_webdataset_source_reads_tars(tmp_path: Path) -> None:
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"in-{shard}.tar")) as sink:
            for i in range(3):
                sample = {"__key__": f"s{shard}_{i}", "txt": f"sample {shard} {i}", "json": {"i": i}}
                sample["png" if i == 1 else "jpg"] = _png((shard * 100, i * 50, 0))
                sink.write(sample)
            sink.write({"__key__": f"noimage{shard}", "txt": "no image here"})
    source = WebdatasetSource(WebdatasetSourceConfig(urls=[str(tmp_path / "in-{0..1}.tar")]))
    parts = source.partitions()
    assert len(parts) == 2
    got = [c for p in parts for c in source.iter_candidates(p)]
    assert [c.caption for c in got] == [f"sample {s} {i}" for s in range(2) for i in range(3)]
    assert got[0].url.endswith("in-0.tar#s0_0")
    with_images = list(source.iter_candidates(parts[1], with_images=True))
    assert with_images[1].image == _png((100, 50, 0))
    assert source.load_images(parts[0], [2])[2].image == _png((0, 100, 0))


def test_webdataset_source_truncated_tar_keeps_complete_samples(tmp_path: Path) -> None:
    import random
    import tarfile

    rng = random.Random(0)
    noise = [bytes(rng.randrange(256) for _ in range(4000)) for _ in range(5)]  # incompressible "images"
    whole = tmp_path / "whole.tar"
    with wds.TarWriter(str(whole)) as sink:
        for i in range(5):
            sink.write({"__key__": f"s{i}", "jpg": noise[i], "txt": f"sample {i}"})
    with tarfile.open(whole) as tar:
        cut_member = tar.getmember("s3.jpg")  # cut inside sample 3's image: samples 0-2 are complete
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:cut_member.offset_data + cut_member.size // 2])
    source = WebdatasetSource(WebdatasetSourceConfig(urls=[str(cut)]))
    [part] = source.partitions()
    captions = [c.caption for c in source.iter_candidates(part)]
    loaded = list(source.iter_candidates(part, with_images=True))
    # Every pass stops at the same place (row i means the same sample in matching and in loading).
    assert captions == [c.caption for c in loaded] == ["sample 0", "sample 1", "sample 2"]
    assert [c.image for c in loaded] == noise[:3]
    assert sorted(source.load_images(part, [0, 2, 3])) == [0, 2]


def test_synthetic_is_deterministic_by_seed() -> None:
    def digest(seed: int) -> tuple[list[str], str]:
        source = SyntheticSource(SyntheticSourceConfig(num_samples=40, image_size=64), partition_size=16, seed=seed)
        cands = [c for p in source.partitions() for c in source.iter_candidates(p, with_images=True)]
        pixels = hashlib.sha256(b"".join(c.image.tobytes() for c in cands)).hexdigest()
        return [c.caption for c in cands], pixels

    first = digest(3)
    assert first == digest(3)
    other = digest(4)
    assert other[0] != first[0] and other[1] != first[1]
    image = synthetic.training_image(3, 5, 64)
    assert image.size == (64, 64) and image.mode == "RGB"


def test_synthetic_captions_are_varied() -> None:
    captions = [synthetic.training_caption(0, i) for i in range(600)]
    assert len(set(captions)) > 400
    openings = {" ".join(c.lower().split()[:2]) for c in captions}
    assert len(openings) > 15  # several templates, articles, counts and sizes
    assert any(re.search(r"\b(two|three|a pair of)\b", c) for c in captions)
    assert any("word" in c or "text" in c or "labelled" in c for c in captions)
    for color in synthetic.COLORS:
        assert any(color in c for c in captions)


def test_synthetic_heldout_combinations_never_in_training() -> None:
    held = synthetic.heldout_combinations(0.2)
    assert len(held) == round(0.2 * len(synthetic.COLORS) * len(synthetic.SHAPES))
    seen_colors, seen_shapes = set(), set()
    for i in range(3000):
        scene = synthetic.make_scene(0, i)
        for obj in scene.objects:
            assert (obj.color, obj.shape) not in held
            seen_colors.add(obj.color)
            seen_shapes.add(obj.shape)
        for color, shape in held:
            assert not re.search(rf"\b{color} ({shape}|{synthetic.PLURALS[shape]})\b", scene.caption.lower())
    assert seen_colors == set(synthetic.COLORS) and seen_shapes == set(synthetic.SHAPES)


def test_synthetic_eval_sets() -> None:
    train_pixels = {synthetic.training_image(0, i, 32).tobytes() for i in range(300)}
    for name in synthetic.EVAL_SET_NAMES:
        classes = synthetic.eval_classnames(name)
        pairs = synthetic.generate_eval_set(name, seed=0, n=2 * len(classes), image_size=32)
        assert [label for _, label in pairs] == classes * 2
        assert all(image.size == (32, 32) for image, _ in pairs)
        assert not any(image.tobytes() in train_pixels for image, _ in pairs)
        again = synthetic.generate_eval_set(name, seed=0, n=3, image_size=32)
        assert [i.tobytes() for i, _ in again] == [i.tobytes() for i, _ in pairs[:3]]
    held = synthetic.eval_classnames("synthetic-heldout")
    assert held == sorted(f"{c} {s}" for c, s in synthetic.heldout_combinations())
    with pytest.raises(ValueError, match="unknown synthetic evaluation set"):
        synthetic.eval_classnames("imagenet")
