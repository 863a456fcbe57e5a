"""The evaluation stage: the CLIP paper's zero-shot and linear-probe suite, retrieval and the synthetic sets.

The 27 datasets themselves (registry, class names, templates, loaders) are `clip.evalsets`, a shared package:
the dedup stage reads the same datasets to decontaminate the training pool. Here: encoders (the ONNX bundle by
default, a checkpoint on request), features with a cache, zero-shot, the paper's linear probe, retrieval, the
results table and plots (clip/eval/stage.py); `clip.eval.metrics` computes the paper's metrics.
"""

from clip.eval.encoders import BundleEncoder, CheckpointEncoder, Encoder, load_encoder
from clip.eval.features import cached_extract, extract
from clip.eval.probe import linear_probe, parametric_search
from clip.eval.retrieval import RETRIEVAL_SETS, load_captions, retrieval_recalls
from clip.eval.synthetic_sets import synthetic_set
from clip.eval.zeroshot import class_embeddings, zeroshot_scores
from clip.evalsets import DatasetEntry, EvalSet, get_dataset, list_datasets, load_webdataset

__all__ = [
    "RETRIEVAL_SETS", "BundleEncoder", "CheckpointEncoder", "DatasetEntry", "Encoder", "EvalSet", "cached_extract",
    "class_embeddings", "extract", "get_dataset", "linear_probe", "list_datasets", "load_captions", "load_encoder",
    "load_webdataset", "parametric_search", "retrieval_recalls", "synthetic_set", "zeroshot_scores",
]
