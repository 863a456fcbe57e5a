"""The 27 datasets of the CLIP paper (Radford et al. 2021, Table 9), one `DatasetEntry` each.

An entry knows its class names and prompt templates (data files in `clip/evalsets/data/`, the paper's as published
in openai/CLIP `data/prompts.md`; see the README there), the metric the paper reports for it, its splits, where
its files lie under a common `--root DIR`, and the loader that reads them. `get_dataset(key).load(root, split)`
returns an `EvalSet` (base.py); `available(root)` says whether the folder is there, so an engine can list a
missing dataset as skipped with `path(root)`, the path it looked for.

Splits are named `train`, `val` and `test` everywhere; `test` is what the paper reports (for Kinetics700, whose
test labels were never released, and for CLEVR, whose test scenes were not, it is the release's validation set;
for Hateful Memes it is `dev_seen`, the labelled set the paper used). `val` exists only where the release has one.

The natural distribution shift sets of the paper's section 3.3 (ImageNetV2, ImageNet-Sketch, ImageNet-R,
ImageNet-A, ObjectNet; clip.evalsets.imagenet_shifts) are entries too, outside the 27 (`list_shift_datasets()`):
ImageNet's class names, WordNet ids and templates, a `test` split only, their own layouts and loaders.

Metric kinds (clip.eval.metrics.compute_metric): `accuracy` (top-1), `mean_per_class` (mean per-class recall:
FGVC Aircraft, Oxford-IIIT Pets, Caltech-101, Oxford Flowers 102), `map_11point` (VOC 2007), `roc_auc` (Hateful
Memes), `top1_top5_mean` (Kinetics700).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from clip.evalsets import imagenet_shifts, release, torchvision_sets, video
from clip.evalsets.base import DatasetEntry

METRIC_KINDS = ("accuracy", "mean_per_class", "map_11point", "roc_auc", "top1_top5_mean")


# key, display name, metric, splits, folder under --root, expected layout
_TABLE: list[tuple[str, str, str, tuple[str, ...], str, str]] = [
    ("food101", "Food-101", "accuracy", ("train", "test"), "food-101",
     "meta/{train,test}.json, images/<class>/<id>.jpg (the release tarball, torchvision Food101)"),
    ("cifar10", "CIFAR-10", "accuracy", ("train", "test"), "cifar-10-batches-py",
     "batches.meta, data_batch_1..5, test_batch (python pickles)"),
    ("cifar100", "CIFAR-100", "accuracy", ("train", "test"), "cifar-100-python",
     "meta, train, test (python pickles)"),
    ("birdsnap", "Birdsnap", "accuracy", ("train", "test"), "birdsnap",
     "species.txt, images.txt, test_images.txt, download/images/<species dir>/<file>.jpg (the release's get_birdsnap.py)"),
    ("sun397", "SUN397", "accuracy", ("train", "test"), "SUN397",
     "ClassName.txt, <letter>/<class path>/*.jpg, Partitions/Training_01.txt, Partitions/Testing_01.txt"),
    ("stanford_cars", "Stanford Cars", "accuracy", ("train", "test"), "stanford_cars",
     "devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/"),
    ("fgvc_aircraft", "FGVC Aircraft", "mean_per_class", ("train", "val", "test"), "fgvc-aircraft-2013b",
     "data/variants.txt, data/images_variant_{train,val,test}.txt, data/images/<id>.jpg"),
    ("voc2007", "PASCAL VOC 2007 classification", "map_11point", ("train", "val", "test"), "VOCdevkit/VOC2007",
     "Annotations/<id>.xml, ImageSets/Main/{train,val,test}.txt, JPEGImages/<id>.jpg"),
    ("dtd", "Describable Textures (DTD)", "accuracy", ("train", "val", "test"), "dtd",
     "dtd/labels/{train,val,test}1.txt, dtd/images/<class>/<file>.jpg (torchvision DTD, partition 1)"),
    ("oxford_pets", "Oxford-IIIT Pets", "mean_per_class", ("train", "test"), "oxford-iiit-pet",
     "annotations/{trainval,test}.txt, images/<Breed_name>_<n>.jpg"),
    ("caltech101", "Caltech-101", "mean_per_class", ("train", "test"), "caltech101",
     "101_ObjectCategories/<class>/image_*.jpg (with BACKGROUND_Google); split: 30 images per class train, "
     "the rest test, chosen by SHA-1 of the path"),
    ("flowers102", "Oxford Flowers 102", "mean_per_class", ("train", "val", "test"), "flowers-102",
     "imagelabels.mat, setid.mat, jpg/image_<05d>.jpg"),
    ("mnist", "MNIST", "accuracy", ("train", "test"), "MNIST",
     "raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"),
    ("fer2013", "FER2013", "accuracy", ("train", "val", "test"), "fer2013",
     "fer2013.csv (emotion,pixels,Usage; Training / PublicTest = val / PrivateTest = test)"),
    ("stl10", "STL-10", "accuracy", ("train", "test"), "stl10_binary",
     "class_names.txt, {train,test}_X.bin, {train,test}_y.bin"),
    ("eurosat", "EuroSAT", "accuracy", ("train", "test"), "eurosat",
     "2750/<ClassFolder>/*.jpg; split: 20% test by SHA-1 of the path"),
    ("resisc45", "RESISC45", "accuracy", ("train", "val", "test"), "NWPU-RESISC45",
     "<class_folder>/<class>_<nnn>.jpg; split 60/20/20 train/val/test by SHA-1 of the path (as VTAB's proportions)"),
    ("gtsrb", "GTSRB", "accuracy", ("train", "test"), "gtsrb",
     "GTSRB/Training/<00000..00042>/*.ppm, GTSRB/Final_Test/Images/*.ppm, GT-final_test.csv"),
    ("kitti_distance", "KITTI (closest vehicle distance)", "accuracy", ("train", "val", "test"), "kitti",
     "training/image_2/<id>.png, training/label_2/<id>.txt (the object-detection release); bins in release.py; "
     "split 80/10/10 by SHA-1 of the id"),
    ("country211", "Country211", "accuracy", ("train", "val", "test"), "country211",
     "{train,valid,test}/<ISO code>/*.jpg"),
    ("pcam", "PatchCamelyon", "accuracy", ("train", "val", "test"), "pcam",
     "camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5"),
    ("ucf101", "UCF101", "accuracy", ("train", "test"), "ucf101",
     "UCF-101/<Class>/v_<Class>_gXX_cXX.avi, ucfTrainTestlist/{trainlist01,testlist01}.txt (middle frame)"),
    ("kinetics700", "Kinetics700", "top1_top5_mean", ("train", "test"), "kinetics700",
     "{train,val}/<label>/<youtube id>_<start>_<end>.mp4 (test = val; middle frame)"),
    ("clevr_counts", "CLEVR Counts", "accuracy", ("train", "test"), "clevr/CLEVR_v1.0",
     "images/{train,val}/*.png, scenes/CLEVR_{train,val}_scenes.json (test = val; 3 to 10 objects)"),
    ("hateful_memes", "Hateful Memes", "roc_auc", ("train", "test"), "hateful_memes",
     "train.jsonl, dev_seen.jsonl (or dev.jsonl) = test, img/<id>.png"),
    ("rendered_sst2", "Rendered SST2", "accuracy", ("train", "val", "test"), "rendered-sst2",
     "{train,valid,test}/{negative,positive}/*.png"),
    ("imagenet", "ImageNet", "accuracy", ("train", "test"), "imagenet",
     "{train,val}/<wnid>/*.JPEG (the ILSVRC-2012 val images sorted into synset folders; test = val)"),
]

_LOADERS = {
    "food101": torchvision_sets.food101, "cifar10": torchvision_sets.cifar, "cifar100": torchvision_sets.cifar,
    "stanford_cars": torchvision_sets.stanford_cars, "fgvc_aircraft": torchvision_sets.fgvc_aircraft,
    "voc2007": torchvision_sets.voc2007, "dtd": torchvision_sets.dtd, "oxford_pets": torchvision_sets.oxford_pets,
    "flowers102": torchvision_sets.flowers102, "mnist": torchvision_sets.mnist, "stl10": torchvision_sets.stl10,
    "eurosat": torchvision_sets.eurosat, "gtsrb": torchvision_sets.gtsrb, "country211": torchvision_sets.country211,
    "pcam": torchvision_sets.pcam, "rendered_sst2": torchvision_sets.rendered_sst2,
    "birdsnap": release.birdsnap, "sun397": release.sun397, "caltech101": release.caltech101,
    "fer2013": release.fer2013, "resisc45": release.resisc45, "kitti_distance": release.kitti_distance,
    "clevr_counts": release.clevr_counts, "hateful_memes": release.hateful_memes, "imagenet": release.imagenet,
    "ucf101": video.ucf101, "kinetics700": video.kinetics700, **imagenet_shifts.LOADERS,
}
# Class counts of the paper's Table 9 (the prompt lists give names; Kinetics700's published list is incomplete).
_NUM_CLASSES = {"kinetics700": 700}


def _read_data(key: str) -> dict:
    text = resources.files("clip.evalsets").joinpath("data", f"{key}.json").read_text(encoding="utf-8")
    return json.loads(text)


@cache
def _entries() -> dict[str, DatasetEntry]:
    entries = {}
    for key, name, metric, splits, subdir, layout in _TABLE:
        data = _read_data(key)
        ids = data.get("class_ids")
        entries[key] = DatasetEntry(
            key=key, name=name, metric=metric, splits=splits, subdir=subdir, layout=layout,
            classes=tuple(data["classes"]), templates=tuple(data["templates"]),
            class_ids=tuple(ids) if ids else None,
            num_classes=_NUM_CLASSES.get(key, len(data["classes"])), source=data["source"],
            loader=_LOADERS[key], class_synonyms=data.get("class_synonyms"))
    imagenet = entries["imagenet"]
    for key, name, subdir, layout, num_classes, source in imagenet_shifts.SHIFT_TABLE:
        entries[key] = DatasetEntry(
            key=key, name=name, metric="accuracy", splits=("test",), subdir=subdir, layout=layout,
            classes=imagenet.classes, templates=imagenet.templates, class_ids=imagenet.class_ids,
            num_classes=num_classes, source=f"{source}; class names, wnids and templates: {imagenet.source}",
            loader=_LOADERS[key])
    return entries


def list_datasets() -> list[str]:
    """The keys of the 27 datasets, in the order of the paper's Table 9."""
    return [row[0] for row in _TABLE]


def list_shift_datasets() -> list[str]:
    """The keys of the natural distribution shift sets (section 3.3): ImageNetV2, -Sketch, -R, -A, ObjectNet."""
    return list(imagenet_shifts.SHIFT_KEYS)


def get_dataset(key: str) -> DatasetEntry:
    entries = _entries()
    if key not in entries:
        raise ValueError(f"unknown evaluation dataset {key!r}; known: {', '.join(entries)}")
    return entries[key]
