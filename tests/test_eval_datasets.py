"""The evaluation registry and every one of its 27 loaders, on tiny fixtures in each dataset's real on-disk format
(tests/support/evalsets.py): labels come back as the right class NAMES (fixtures list classes in another order
than the registry where the format has a list), every image decodes, corrupt images are skipped and counted, a
malformed root names the file it expected, an absent root is reported as absent."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clip.eval import get_dataset, list_datasets, load_webdataset
from clip.evalsets import normalise_name
from clip.evalsets.video import middle_frame
from clip.formats.errors import FormatError, MissingInputError
from tests.support import evalsets

PAPER_CLASS_COUNTS = {
    "food101": 101, "cifar10": 10, "cifar100": 100, "birdsnap": 500, "sun397": 397, "stanford_cars": 196,
    "fgvc_aircraft": 100, "voc2007": 20, "dtd": 47, "oxford_pets": 37, "caltech101": 102, "flowers102": 102,
    "mnist": 10, "fer2013": 7, "stl10": 10, "eurosat": 10, "resisc45": 45, "gtsrb": 43, "kitti_distance": 4,
    "country211": 211, "pcam": 2, "ucf101": 101, "kinetics700": 700, "clevr_counts": 8, "hateful_memes": 2,
    "rendered_sst2": 2, "imagenet": 1000,
}
PAPER_METRICS = {"fgvc_aircraft": "mean_per_class", "oxford_pets": "mean_per_class", "caltech101": "mean_per_class",
                 "flowers102": "mean_per_class", "voc2007": "map_11point", "hateful_memes": "roc_auc",
                 "kinetics700": "top1_top5_mean"}
TEMPLATE_COUNTS = {"imagenet": 80, "cifar10": 18, "cifar100": 18, "ucf101": 48, "caltech101": 34, "kinetics700": 28,
                   "resisc45": 18, "food101": 1, "mnist": 1, "kitti_distance": 1}


def test_registry_names_the_27_datasets_with_paper_class_counts_and_metrics() -> None:
    keys = list_datasets()
    assert len(keys) == 27 and set(keys) == set(PAPER_CLASS_COUNTS)
    for key in keys:
        entry = get_dataset(key)
        assert entry.num_classes == PAPER_CLASS_COUNTS[key], key
        assert entry.metric == PAPER_METRICS.get(key, "accuracy"), key
        assert "test" in entry.splits and "train" in entry.splits, key
        assert entry.templates and all("{}" in t for t in entry.templates), key
        assert "prompts.md" in entry.source or key == "imagenet"
        assert entry.subdir and entry.layout
        if key != "kinetics700":
            assert len(entry.classes) == entry.num_classes, key
        if entry.class_ids:  # mapped by id (ImageNet's published names repeat: two 'crane's, two 'maillot's)
            assert len(set(entry.class_ids)) == len(entry.classes), key
        else:  # names must stay distinct under the spelling-proof key the loaders map by
            assert len({normalise_name(c) for c in entry.classes}) == len(entry.classes), key
    for key, count in TEMPLATE_COUNTS.items():
        assert len(get_dataset(key).templates) == count, key
    assert get_dataset("kinetics700").classes[:2] == ("abseiling", "acting in play")
    assert get_dataset("imagenet").class_ids[0] == "n01440764" and get_dataset("imagenet").classes[0] == "tench"
    assert get_dataset("fer2013").class_synonyms["happy"] == ["happy", "smiling"]
    with pytest.raises(ValueError, match="unknown evaluation dataset"):
        get_dataset("cifar11")


def _names(dataset) -> list:
    if dataset.key == "voc2007":
        return [tuple(sorted(dataset.classes[i] for i in label)) for label in dataset.labels]
    return [dataset.classes[label] for label in dataset.labels]


def _check(key: str, root: Path, expected: dict[str, list]) -> dict[str, list]:
    """Load every split; compare the class-name multiset per split (or over all splits for 'all')."""
    entry = get_dataset(key)
    assert entry.available(root)
    loaded = {}
    for split in entry.splits:
        dataset = entry.load(root, split)
        images = list(dataset)
        assert len(images) == len(dataset) and dataset.skipped == 0, (key, split)
        assert all(im.mode == "RGB" and im.size[0] > 0 for im, _ in images)
        assert dataset.templates == list(entry.templates)
        loaded[split] = _names(dataset)
    if "all" in expected:
        assert Counter(n for names in loaded.values() for n in names) == Counter(expected["all"]), key
        assert sum(map(len, loaded.values())) == len(expected["all"])
    else:
        for split, names in expected.items():
            assert Counter(loaded[split]) == Counter(names), (key, split, loaded[split])
    return loaded


SIMPLE_WRITERS = {
    "food101": evalsets.write_food101, "cifar10": evalsets.write_cifar10, "birdsnap": evalsets.write_birdsnap,
    "sun397": evalsets.write_sun397, "stanford_cars": evalsets.write_stanford_cars,
    "fgvc_aircraft": evalsets.write_fgvc_aircraft, "voc2007": evalsets.write_voc2007, "dtd": evalsets.write_dtd,
    "oxford_pets": evalsets.write_oxford_pets, "caltech101": evalsets.write_caltech101,
    "flowers102": evalsets.write_flowers102, "mnist": evalsets.write_mnist, "fer2013": evalsets.write_fer2013,
    "stl10": evalsets.write_stl10, "eurosat": evalsets.write_eurosat, "resisc45": evalsets.write_resisc45,
    "gtsrb": evalsets.write_gtsrb, "country211": evalsets.write_country211, "pcam": evalsets.write_pcam,
    "ucf101": evalsets.write_ucf101, "kinetics700": evalsets.write_kinetics700,
    "clevr_counts": evalsets.write_clevr_counts, "hateful_memes": evalsets.write_hateful_memes,
    "rendered_sst2": evalsets.write_rendered_sst2, "imagenet": evalsets.write_imagenet,
}


@pytest.mark.parametrize("key", sorted(SIMPLE_WRITERS))
def test_loader_reads_its_release_layout(tmp_path: Path, key: str) -> None:
    _check(key, tmp_path, SIMPLE_WRITERS[key](tmp_path))


def test_cifar100_maps_labels_by_name_not_position(tmp_path: Path) -> None:
    expected = evalsets.write_cifar100(tmp_path, list(get_dataset("cifar100").classes))
    _check("cifar100", tmp_path, expected)


def test_kitti_distance_bins_by_closest_vehicle(tmp_path: Path) -> None:
    expected, by_id = evalsets.write_kitti(tmp_path)
    _check("kitti_distance", tmp_path, expected)
    entry = get_dataset("kitti_distance")
    for split in entry.splits:
        dataset = entry.load(tmp_path, split)
        for sample_id, label in zip(dataset.ids, dataset.labels, strict=True):
            assert dataset.classes[label] == by_id[Path(sample_id).stem]


def test_splits_without_a_release_split_are_stable_and_disjoint(tmp_path: Path) -> None:
    evalsets.write_eurosat(tmp_path)
    entry = get_dataset("eurosat")
    first = {s: entry.load(tmp_path, s).ids for s in entry.splits}
    again = {s: entry.load(tmp_path, s).ids for s in entry.splits}
    assert first == again and not set(first["train"]) & set(first["test"])


def test_voc2007_ignores_difficult_objects(tmp_path: Path) -> None:
    evalsets.write_voc2007(tmp_path)
    test = get_dataset("voc2007").load(tmp_path, "test")
    assert _names(test)[0] == ("tvmonitor",)  # the cat in 000002 is marked difficult


def test_kinetics_appends_classes_missing_from_the_published_list(tmp_path: Path) -> None:
    evalsets.write_kinetics700(tmp_path)
    entry = get_dataset("kinetics700")
    train, test = entry.load(tmp_path, "train"), entry.load(tmp_path, "test")
    assert train.classes == test.classes and train.classes[len(entry.classes):] == ["zumba"]


def test_middle_frame_is_the_middle_one(tmp_path: Path) -> None:
    for codec, suffix in (("mpeg4", "avi"), ("libx264", "mp4")):
        path = evalsets.video(tmp_path / f"v.{suffix}", frames=5, codec=codec)
        grey = float(np.asarray(middle_frame(path)).mean())
        assert abs(grey - 80) < 12, (codec, grey)  # frame 2 of 0..4 is grey 80; its neighbours are 40 and 120


def test_webdataset_layout(tmp_path: Path) -> None:
    expected = evalsets.write_webdataset(tmp_path / "wds_cifar")
    dataset = load_webdataset(tmp_path / "wds_cifar", "test")
    assert [dataset.classes[y] for y in dataset.labels] == expected["test"]
    assert dataset.templates == ["a photo of a {}.", "a drawing of a {}."]
    images = list(dataset)
    assert len(images) == 3 and dataset.skipped == 0 and images[0][0].getpixel((4, 4))[0] > 100


def test_webdataset_malformed_root_names_the_missing_file(tmp_path: Path) -> None:
    evalsets.write_webdataset(tmp_path / "wds")
    (tmp_path / "wds" / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(FormatError, match=r"test/2\.tar"):
        load_webdataset(tmp_path / "wds", "test")
    (tmp_path / "wds" / "test" / "nshards.txt").unlink()
    with pytest.raises(FormatError, match=r"test/nshards\.txt"):
        load_webdataset(tmp_path / "wds", "test")
    with pytest.raises(MissingInputError):
        load_webdataset(tmp_path / "absent", "test")


def test_corrupt_image_is_skipped_and_counted(tmp_path: Path) -> None:
    evalsets.write_food101(tmp_path)
    bad = tmp_path / "food-101" / "images" / "hot_dog" / "test0.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    dataset = get_dataset("food101").load(tmp_path, "test")
    assert len(dataset) == 4
    assert len(list(dataset)) == 3 and dataset.skipped == 1 and dataset.skipped_ids == [str(bad)]


def test_corrupt_video_is_skipped_and_counted(tmp_path: Path) -> None:
    evalsets.write_ucf101(tmp_path)
    (tmp_path / "ucf101" / "UCF-101" / "YoYo" / "v_YoYo_g01_c01.avi").write_bytes(b"RIFF broken")
    dataset = get_dataset("ucf101").load(tmp_path, "test")
    assert list(dataset) == [] and dataset.skipped == 1


def test_absent_and_malformed_roots(tmp_path: Path) -> None:
    entry = get_dataset("food101")
    assert not entry.available(tmp_path)
    with pytest.raises(MissingInputError, match=str(tmp_path / "food-101")):
        entry.load(tmp_path, "test")
    (tmp_path / "food-101" / "images").mkdir(parents=True)
    with pytest.raises(FormatError, match=r"food-101/meta/test\.json"):
        entry.load(tmp_path, "test")
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FormatError, match=r"batches\.meta"):
        get_dataset("cifar10").load(tmp_path, "test")
    with pytest.raises(ValueError, match="split 'val'"):
        get_dataset("cifar10").load(tmp_path, "val")


def test_unknown_class_name_is_a_format_error(tmp_path: Path) -> None:
    evalsets.write_dtd(tmp_path)
    labels = tmp_path / "dtd" / "dtd" / "labels" / "test1.txt"
    evalsets.image(tmp_path / "dtd" / "dtd" / "images" / "plaid" / "plaid_1.jpg")
    labels.write_text(labels.read_text() + "plaid/plaid_1.jpg\n")
    with pytest.raises(FormatError, match="'plaid'"):
        get_dataset("dtd").load(tmp_path, "test")
