"""Loaders for datasets read from their original release layout (torchvision has no class for them, or its class
does not give the paper's task).

- Birdsnap: `species.txt` (tab-separated: id, common, scientific, dir), `images.txt` (path, species_id, ...),
  `test_images.txt`; images as the release's get_birdsnap.py saves them, `download/images/<path>`. Images listed
  but never downloaded (many source URLs are dead) are left out of the split, not skipped: they never existed.
- SUN397: `ClassName.txt` (`/a/apartment_building/outdoor`), images under their class path, the first of the ten
  official partitions (`Partitions/Training_01.txt`, `Testing_01.txt`), as the paper's 50/50 per-class split.
- Caltech-101: `101_ObjectCategories/<folder>/`, all 102 folders including BACKGROUND_Google (torchvision drops
  it; the paper counts 102 classes). No official split: per class, 30 images for train (the 30 with the smallest
  SHA-1 of their path), the rest test, as the paper's 3,060 / 6,085.
- FER2013: the Kaggle `fer2013.csv` (or `icml_face_data.csv`): Training = train, PublicTest = val,
  PrivateTest = test.
- RESISC45: `NWPU-RESISC45/<class_folder>/`; no official split: 60/20/20 by SHA-1 (VTAB's proportions).
- KITTI distance (the paper's task, from VTAB): label by the distance of the closest vehicle (Car, Van or Truck;
  `location` z in metres of the KITTI object label file): z <= 8 -> 0 "on my left or right side", 8 < z <= 20
  -> 1 "nearby", z > 20 -> 2 "in the distance", no vehicle -> 3 "no car". VTAB's thresholds are -100, 8, 20, 999.
- CLEVR counts: the number of objects of each scene in `scenes/CLEVR_<split>_scenes.json`, 3 to 10 (the class
  names are the counts); test = the release's val (its test scenes are unpublished).
- Hateful Memes: `train.jsonl`, `dev_seen.jsonl` (or `dev.jsonl` of the first release) = test, `img/<id>.png`.
- ImageNet: `{train,val}/<wnid>/` (the val images moved into synset folders); wnid -> class by the registry's ids.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from clip.evalsets.base import ClassMap, DatasetEntry, EvalSet, image_list, require, stable_split
from clip.formats.errors import FormatError
from clip.formats.images import IMAGE_SUFFIXES

KITTI_VEHICLES = ("Car", "Van", "Truck")
KITTI_THRESHOLDS_M = (8.0, 20.0)  # upper bounds of the 'side' and 'nearby' bins; 'no car' when there is none
CALTECH_TRAIN_PER_CLASS = 30


def _cmap(entry: DatasetEntry) -> ClassMap:
    return ClassMap(entry.classes, entry.class_ids)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folders(entry: DatasetEntry, base: Path, folder: Path) -> list[tuple[Path, int]]:
    """(image, label) for every image in `folder/<class>/`, classes by folder name."""
    cmap = _cmap(entry)
    folders = sorted(d for d in folder.iterdir() if d.is_dir())
    if not folders:
        raise FormatError(f"{entry.key}: expected class folders in {folder}")
    return [(path, cmap(d.name, d)) for d in folders for path in _images_in(d)]


def birdsnap(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    species_file = require(base / "species.txt", entry.key)
    images_file = require(base / "images.txt", entry.key)
    test_file = require(base / "test_images.txt", entry.key)
    cmap = _cmap(entry)
    with open(species_file, newline="") as f:
        species = {row["id"]: cmap(row["common"], species_file) for row in csv.DictReader(f, delimiter="\t")}
    test_paths = set(test_file.read_text().split()[1:])  # first line is the header `path`
    items = []
    with open(images_file, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if (row["path"] in test_paths) != (split == "test"):
                continue
            if row["species_id"] not in species:
                raise FormatError(f"{images_file}: species_id {row['species_id']} is not in {species_file.name}")
            path = base / "download" / "images" / row["path"]
            if path.exists():
                items.append((path, species[row["species_id"]]))
    return image_list(entry.key, split, base, list(entry.classes), items)


def sun397(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    require(base / "ClassName.txt", entry.key)
    list_file = require(base / "Partitions" / ("Training_01.txt" if split == "train" else "Testing_01.txt"),
                        entry.key)
    cmap = _cmap(entry)
    items = []
    for line in list_file.read_text().split():
        parts = line.strip("/").split("/")  # a, apartment_building, outdoor, sun_xxx.jpg
        items.append((base.joinpath(*parts), cmap(" ".join(parts[1:-1]), list_file)))
    return image_list(entry.key, split, base, list(entry.classes), items)


def caltech101(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    folder = require(base / "101_ObjectCategories", entry.key)
    by_class: dict[int, list[Path]] = {}
    for path, label in _class_folders(entry, base, folder):
        by_class.setdefault(label, []).append(path)
    items = []
    for label, paths in sorted(by_class.items()):
        ranked = sorted(paths, key=lambda p: hashlib.sha1(str(p.relative_to(base)).encode()).hexdigest())
        chosen = ranked[:CALTECH_TRAIN_PER_CLASS] if split == "train" else ranked[CALTECH_TRAIN_PER_CLASS:]
        items += [(p, label) for p in sorted(chosen)]
    return image_list(entry.key, split, base, list(entry.classes), items)


def fer2013(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    csv_file = base / "fer2013.csv"
    if not csv_file.exists() and (base / "icml_face_data.csv").exists():
        csv_file = base / "icml_face_data.csv"
    require(csv_file, entry.key)
    usage = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}[split]
    cmap = _cmap(entry)
    images, labels = [], []
    with open(csv_file, newline="") as f:
        for row in csv.DictReader(f, skipinitialspace=True):
            row = {k.strip(): v for k, v in row.items()}
            if row.get("Usage") != usage:
                continue
            pixels = np.array(row["pixels"].split(), dtype=np.uint8)
            if pixels.size != 48 * 48:
                raise FormatError(f"{csv_file}: a row has {pixels.size} pixels, expected 48x48")
            images.append(pixels.reshape(48, 48))
            labels.append(cmap.by_label(int(row["emotion"]), csv_file))
    return EvalSet(key=entry.key, split=split, root=base, classes=list(entry.classes),
                   ids=[f"{csv_file.name}#{usage}#{i}" for i in range(len(labels))], labels=labels,
                   load_image=lambda i: Image.fromarray(images[i]))


def resisc45(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    items = [(p, y) for p, y in _class_folders(entry, base, base)
             if stable_split(str(p.relative_to(base)), test_fraction=0.2, val_fraction=0.2) == split]
    return image_list(entry.key, split, base, list(entry.classes), items)


def kitti_label(label_file: Path) -> int:
    """The distance bin (see the module docstring) of one KITTI object label file."""
    distances = []
    for line in label_file.read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 15:
            raise FormatError(f"{label_file}: a KITTI object line has 15 fields, found {len(fields)}")
        if fields[0] in KITTI_VEHICLES:
            distances.append(float(fields[13]))
    if not distances:
        return 3
    closest = min(distances)
    return 0 if closest <= KITTI_THRESHOLDS_M[0] else 1 if closest <= KITTI_THRESHOLDS_M[1] else 2


def kitti_distance(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    images = require(base / "training" / "image_2", entry.key)
    labels = require(base / "training" / "label_2", entry.key)
    items = []
    for path in _images_in(images):
        if stable_split(path.stem, test_fraction=0.1, val_fraction=0.1) == split:
            items.append((path, kitti_label(require(labels / f"{path.stem}.txt", entry.key))))
    return image_list(entry.key, split, base, list(entry.classes), items)


def clevr_counts(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    name = "train" if split == "train" else "val"
    scenes_file = require(base / "scenes" / f"CLEVR_{name}_scenes.json", entry.key)
    require(base / "images" / name, entry.key)
    cmap = _cmap(entry)
    try:
        scenes = json.loads(scenes_file.read_text())["scenes"]
        items = [(base / "images" / name / s["image_filename"], cmap(str(len(s["objects"])), scenes_file))
                 for s in scenes]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FormatError(f"{scenes_file}: not a CLEVR scenes file ({exc})") from exc
    return image_list(entry.key, split, base, list(entry.classes), items)


def hateful_memes(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    if split == "train":
        jsonl = require(base / "train.jsonl", entry.key)
    else:
        jsonl = base / "dev_seen.jsonl" if (base / "dev_seen.jsonl").exists() else require(base / "dev.jsonl",
                                                                                           entry.key)
    cmap = _cmap(entry)
    items = []
    for number, line in enumerate(jsonl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append((base / row["img"], cmap.by_label(int(row["label"]), jsonl)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{jsonl}: line {number} has no img/label ({exc})") from exc
    return image_list(entry.key, split, base, list(entry.classes), items)


def imagenet(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    folder = require(base / ("train" if split == "train" else "val"), entry.key)
    return image_list(entry.key, split, base, list(entry.classes), _class_folders(entry, base, folder))
