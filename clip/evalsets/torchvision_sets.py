"""Loaders for the datasets torchvision can read, always with `download=False` (nothing is ever downloaded).

torchvision lists the files and parses the annotations; we take its sample list, map every class to the
registry by name (base.ClassMap) and decode images ourselves, so a corrupt file is skipped and counted rather than
raised. Three readers are our own although torchvision has the class: CIFAR and STL-10 (torchvision refuses any
copy whose MD5 differs from the original archive's, including a re-packed one; we parse the same pickles and
binaries), and Flowers102 (same MD5 check; we subclass it with a presence check instead). Where torchvision keeps
its sample list in a private attribute (`_image_files`, `_samples`, ...) we read it: torchvision is pinned in
constraints.txt, and tests/test_eval_datasets*.py run every loader on a fixture in the real format.
"""

from __future__ import annotations

import codecs
import pickle
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from clip.evalsets.base import (
    ClassMap,
    DatasetEntry,
    EvalSet,
    check_counts,
    check_label,
    image_list,
    require,
    stable_split,
)
from clip.formats.errors import FormatError


def _tv():
    import torchvision.datasets as tvd  # imported on use: torchvision is heavy and most runs read few sets

    return tvd


def _make(dataset_class, base: Path, *args, **kwargs):
    """A torchvision dataset, its own errors (RuntimeError 'not found', an empty class folder, a bad annotation)
    reported as one-line FormatErrors naming the dataset folder."""
    try:
        return dataset_class(*args, download=False, **kwargs)
    except (RuntimeError, FileNotFoundError, KeyError, ValueError, IndexError, OSError) as exc:
        raise FormatError(f"{base}: torchvision {dataset_class.__name__} could not read it ({exc})") from exc


def _class_map(entry: DatasetEntry) -> ClassMap:
    return ClassMap(entry.classes, entry.class_ids)


def _arrays(entry: DatasetEntry, base: Path, split: str, images, labels: list, images_file: Path,
            labels_file: Path) -> EvalSet:
    """An EvalSet over images held in memory (uint8 arrays, HWC or HW), as many as there are labels."""
    check_counts(len(images), len(labels), images_file, labels_file)
    source = images_file.name
    return EvalSet(key=entry.key, split=split, root=base, classes=list(entry.classes),
                   ids=[f"{source}#{i}" for i in range(len(labels))], labels=labels,
                   load_image=lambda i: Image.fromarray(np.asarray(images[i])))


def _files(entry: DatasetEntry, base: Path, split: str, paths, names, source_file) -> EvalSet:
    """An EvalSet over image files whose class is known by name."""
    cmap = _class_map(entry)
    items = [(Path(p), cmap(str(name), source_file)) for p, name in zip(paths, names, strict=True)]
    return image_list(entry.key, split, base, list(entry.classes), items)


# The globals a CIFAR python release may name: numpy's array, dtype and scalar reconstructors (numpy 1 spells
# their module `numpy.core`, numpy 2 `numpy._core`; protocol 5 rebuilds arrays with `_frombuffer`) and
# `_codecs.encode` (bytes pickled by Python 3 at protocol 0-2). Nothing else: any other global in a pickle is a
# callable the file chooses, which is how a crafted file runs code.
_CIFAR_GLOBALS = {
    (module, name): obj
    for core in ("numpy.core", "numpy._core")
    for module, name, obj in (
        (f"{core}.multiarray", "_reconstruct", np.zeros(0).__reduce__()[0]),
        (f"{core}.multiarray", "scalar", np.float64(0).__reduce__()[0]),
        (f"{core}.numeric", "_frombuffer", np.zeros(0).__reduce_ex__(5)[0]),
    )
} | {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only `_CIFAR_GLOBALS`: an evaluation folder is data, never code."""

    def __init__(self, file: BinaryIO, path: Path):
        super().__init__(file, encoding="latin1")  # the release was pickled by Python 2
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise FormatError(f"{self.path}: refused to load global {module}.{name} (a CIFAR file holds only "
                              f"numpy arrays, lists, strings and numbers)")
        return _CIFAR_GLOBALS[module, name]


def read_cifar_pickle(path: Path) -> dict:
    """One file of the CIFAR python release (a pickled dict), read without running anything it names."""
    try:
        with open(path, "rb") as f:
            loaded = _CifarUnpickler(f, path).load()
    except FormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as exc:
        raise FormatError(f"{path}: not a CIFAR python pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, dict):
        raise FormatError(f"{path}: not a CIFAR python pickle (a {type(loaded).__name__}, expected a dict)")
    return loaded


def cifar(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    """CIFAR-10 (`batches.meta`, `data_batch_1..5`, `test_batch`) and CIFAR-100 (`meta`, `train`, `test`)."""
    ten = entry.key == "cifar10"
    meta_file = require(base / ("batches.meta" if ten else "meta"), entry.key)
    names_key = "label_names" if ten else "fine_label_names"
    labels_key = "labels" if ten else "fine_labels"
    names = read_cifar_pickle(meta_file).get(names_key)
    if not isinstance(names, list):
        raise FormatError(f"{meta_file}: expected a list {names_key!r} of class names")
    if split == "train":
        files = [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]
    else:
        files = ["test_batch" if ten else "test"]
    cmap = _class_map(entry)
    images, labels = [], []
    for name in files:
        path = require(base / name, entry.key)
        batch = read_cifar_pickle(path)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            ys = [int(y) for y in batch[labels_key]]
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(f"{path}: not a CIFAR batch ({type(exc).__name__}: {exc})") from None
        check_counts(len(data), len(ys), path, path)  # per file: two wrong files could cancel out in the total
        images.extend(data)
        labels.extend(cmap(names[check_label(y, len(names), path)], meta_file) for y in ys)
    return _arrays(entry, base, split, images, labels, base / files[0], base / files[0])


def stl10(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    """STL-10 binaries: `{split}_X.bin` (N x 3 x 96 x 96, column-major), `{split}_y.bin` (1-based), class_names.txt."""
    names = require(base / "class_names.txt", entry.key).read_text().split()
    x_file, y_file = require(base / f"{split}_X.bin", entry.key), require(base / f"{split}_y.bin", entry.key)
    raw = np.fromfile(x_file, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise FormatError(f"{x_file}: size {raw.size} is not a whole number of 3x96x96 images")
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)  # stored column-major: (N, C, W, H) -> (N, H, W, C)
    ys = np.fromfile(y_file, dtype=np.uint8)
    check_counts(len(images), len(ys), x_file, y_file)
    cmap = _class_map(entry)
    labels = [cmap(names[check_label(int(y) - 1, len(names), y_file)], base / "class_names.txt") for y in ys]
    return _arrays(entry, base, split, images, labels, x_file, y_file)


def mnist(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    prefix = "train" if split == "train" else "t10k"
    images_file = require(base / "raw" / f"{prefix}-images-idx3-ubyte", entry.key)
    labels_file = require(base / "raw" / f"{prefix}-labels-idx1-ubyte", entry.key)
    ds = _make(_tv().MNIST, base, str(base.parent), train=split == "train")
    cmap = _class_map(entry)
    labels = [cmap.by_label(int(y), labels_file) for y in ds.targets]
    return _arrays(entry, base, split, ds.data.numpy(), labels, images_file, labels_file)


def food101(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    require(base / "meta" / f"{split}.json", entry.key)
    ds = _make(_tv().Food101, base, str(base.parent), split=split)
    names = [ds.classes[y] for y in ds._labels]
    return _files(entry, base, split, ds._image_files, names, base / "meta" / f"{split}.json")


def stanford_cars(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    require(base / "devkit" / "cars_meta.mat", entry.key)
    require(base / ("devkit/cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat"),
            entry.key)
    ds = _make(_tv().StanfordCars, base, str(base.parent), split=split)
    names = [ds.classes[y] for _, y in ds._samples]
    return _files(entry, base, split, [p for p, _ in ds._samples], names, base / "devkit" / "cars_meta.mat")


def fgvc_aircraft(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    require(base / "data" / "variants.txt", entry.key)
    labels_file = require(base / "data" / f"images_variant_{split}.txt", entry.key)
    ds = _make(_tv().FGVCAircraft, base, str(base.parent), split=split, annotation_level="variant")
    names = [ds.classes[y] for y in ds._labels]
    return _files(entry, base, split, ds._image_files, names, labels_file)


def dtd(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    require(base / "dtd" / "labels" / f"{split}1.txt", entry.key)
    ds = _make(_tv().DTD, base, str(base.parent), split=split, partition=1)
    return _files(entry, base, split, ds._image_files, [Path(p).parent.name for p in ds._image_files],
                  base / "dtd" / "labels" / f"{split}1.txt")


def oxford_pets(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    tv_split = "trainval" if split == "train" else "test"
    list_file = require(base / "annotations" / f"{tv_split}.txt", entry.key)
    ds = _make(_tv().OxfordIIITPet, base, str(base.parent), split=tv_split)
    # The breed is in the file name (`great_pyrenees_12.jpg`); torchvision's `classes` only holds breeds present.
    names = [Path(p).stem.rsplit("_", 1)[0] for p in ds._images]
    return _files(entry, base, split, ds._images, names, list_file)


def flowers102(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    tvd = _tv()

    class _Flowers102(tvd.Flowers102):
        def _check_integrity(self) -> bool:  # presence, not the original archive's MD5
            return self._images_folder.is_dir() and all(
                (self._base_folder / self._file_dict[part][0]).exists() for part in ("label", "setid"))

    for name in ("imagelabels.mat", "setid.mat", "jpg"):
        require(base / name, entry.key)
    ds = _make(_Flowers102, base, str(base.parent), split=split)
    cmap = _class_map(entry)
    items = [(Path(p), cmap.by_label(y, base / "imagelabels.mat")) for p, y in zip(ds._image_files, ds._labels, strict=True)]
    return image_list(entry.key, split, base, list(entry.classes), items)


def eurosat(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    require(base / "2750", entry.key)
    ds = _make(_tv().EuroSAT, base, str(base.parent))
    samples = [(p, ds.classes[y]) for p, y in ds.samples
               if stable_split(str(Path(p).relative_to(base)), test_fraction=0.2) == split]
    return _files(entry, base, split, [p for p, _ in samples], [n for _, n in samples], base / "2750")


def gtsrb(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    require(base / "GTSRB" / ("Training" if split == "train" else "Final_Test/Images"), entry.key)
    if split == "test":
        require(base / "GT-final_test.csv", entry.key)
    ds = _make(_tv().GTSRB, base, str(base.parent), split=split)
    cmap = _class_map(entry)
    # Train labels: the class-id folder name (torchvision's index is the folder's position among those present).
    items = [(Path(p), cmap.by_label(int(Path(p).parent.name) if split == "train" else y, base / "GTSRB"))
             for p, y in ds._samples]
    return image_list(entry.key, split, base, list(entry.classes), items)


def country211(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    folder = require(base / ("valid" if split == "val" else split), entry.key)
    ds = _make(_tv().Country211, base, str(base.parent), split="valid" if split == "val" else split)
    return _files(entry, base, split, [p for p, _ in ds.samples], [ds.classes[y] for _, y in ds.samples], folder)


def rendered_sst2(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    folder = require(base / ("valid" if split == "val" else split), entry.key)
    ds = _make(_tv().RenderedSST2, base, str(base.parent), split=split)
    return _files(entry, base, split, [p for p, _ in ds._samples],
                  [Path(p).parent.name for p, _ in ds._samples], folder)


def pcam(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    import h5py

    name = {"train": "train", "val": "valid", "test": "test"}[split]
    x_file = require(base / f"camelyonpatch_level_2_split_{name}_x.h5", entry.key)
    y_file = require(base / f"camelyonpatch_level_2_split_{name}_y.h5", entry.key)
    with h5py.File(y_file, "r") as f:
        ys = np.asarray(f["y"]).reshape(-1)
    ds = _make(_tv().PCAM, base, str(base.parent), split=split)
    check_counts(len(ds), len(ys), x_file, y_file)
    cmap = _class_map(entry)
    labels = [cmap.by_label(int(y), y_file) for y in ys]
    return EvalSet(key=entry.key, split=split, root=base, classes=list(entry.classes),
                   ids=[f"{x_file.name}#{i}" for i in range(len(labels))], labels=labels,
                   load_image=lambda i: ds[i][0])


def voc2007(entry: DatasetEntry, base: Path, split: str) -> EvalSet:
    """Multi-label: the label is the sorted tuple of classes with at least one object not marked difficult."""
    list_file = require(base / "ImageSets" / "Main" / f"{split}.txt", entry.key)
    tvd = _tv()
    ds = _make(tvd.VOCDetection, base, str(base.parent.parent), year="2007", image_set=split)
    cmap = _class_map(entry)
    items = []
    for image, annotation in zip(ds.images, ds.annotations, strict=True):
        try:
            parsed = ds.parse_voc_xml(ET.parse(annotation).getroot())["annotation"]
        except (ET.ParseError, FileNotFoundError, KeyError) as exc:
            raise FormatError(f"{annotation}: not a VOC annotation ({exc}); listed in {list_file}") from exc
        objects = parsed.get("object", [])
        objects = objects if isinstance(objects, list) else [objects]
        present = {cmap(o["name"], annotation) for o in objects if str(o.get("difficult", "0")) != "1"}
        items.append((Path(image), tuple(sorted(present))))
    return image_list(entry.key, split, base, list(entry.classes), items)
