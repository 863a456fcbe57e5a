"""The evaluation datasets, shared by the evaluation stage and the dedup stage (which decontaminates the training
pool against them): the registry of the CLIP paper's 27 (registry.py), their loaders, the natural distribution
shift sets on ImageNet's classes (imagenet_shifts.py), and CLIP_benchmark's webdataset layout (webdataset.py).
What a loader returns is described in base.py."""

from clip.evalsets.base import ClassMap, DatasetEntry, EvalSet, normalise_name
from clip.evalsets.registry import METRIC_KINDS, get_dataset, list_datasets, list_shift_datasets
from clip.evalsets.webdataset import load_webdataset

__all__ = ["METRIC_KINDS", "ClassMap", "DatasetEntry", "EvalSet", "get_dataset", "list_datasets",
           "list_shift_datasets", "load_webdataset", "normalise_name"]
