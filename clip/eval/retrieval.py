"""Image-text retrieval recall@1/5/10 on a captions set in the Karpathy-split layout (Flickr30k, COCO).

    captions = load_captions("data/eval", "flickr30k", split="test")   # CaptionSet
    recalls = retrieval_recalls(image_embeddings, text_embeddings, captions.text_to_image)

Layout (Karpathy & Fei-Fei's split files, as most papers use them): `root/<key>/dataset_<key>.json` with
`{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...]}, ...]}`; the image files are
under `root/<key>/images/<filename>` or `root/<key>/<filepath>/<filename>` (COCO's `val2014/...`). `split` is
train / restval / val / test; the paper-style test sets are 1k Flickr30k and 5k COCO images, 5 captions each.

Recall@k: image->text counts an image as found when any of its captions is among the k texts closest to it;
text->image counts a caption when its own image is among the k images closest to it. Cosine similarity; ties
keep the lower index first (stable sort), so the numbers are deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip.evalsets.base import EvalSet
from clip.formats.errors import FormatError, MissingInputError

RETRIEVAL_SETS = {"flickr30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}
RECALL_KS = (1, 5, 10)


@dataclass
class CaptionSet:
    images: EvalSet  # labels: the image's own index
    texts: list[str]
    text_to_image: np.ndarray  # int64 [T]: which image each caption describes


def retrieval_path(root: str | Path, key: str) -> Path:
    return Path(root) / key


def retrieval_available(root: str | Path, key: str) -> bool:
    return retrieval_path(root, key).is_dir()


def load_captions(root: str | Path, key: str, split: str = "test") -> CaptionSet:
    """Read `root/<key>/dataset_<key>.json` and its images; MissingInputError / FormatError name the file."""
    if key not in RETRIEVAL_SETS:
        raise ValueError(f"unknown retrieval set {key!r}; known: {', '.join(RETRIEVAL_SETS)}")
    base = retrieval_path(root, key)
    if not base.is_dir():
        raise MissingInputError(f"{key}: no data at {base}")
    index_file = base / RETRIEVAL_SETS[key]
    if not index_file.is_file():
        raise FormatError(f"{key}: expected {index_file} (Karpathy split file; the folder exists but it is missing)")
    try:
        doc = json.loads(index_file.read_text(encoding="utf-8"))
        entries = [e for e in doc["images"] if e["split"] == split]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{index_file}: not a Karpathy split file ({type(exc).__name__}: {exc})") from None
    paths: list[Path] = []
    texts: list[str] = []
    owners: list[int] = []
    for entry in entries:
        try:
            filename, sentences = entry["filename"], entry["sentences"]
            raw = [s["raw"] for s in sentences]
        except (KeyError, TypeError):
            raise FormatError(f"{index_file}: an image entry lacks filename / sentences[].raw ({entry!r:.80})") from None
        candidates = [base / "images" / filename]
        if entry.get("filepath"):
            candidates.insert(0, base / entry["filepath"] / filename)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FormatError(f"{key}: expected image {candidates[-1]} (listed in {index_file.name})")
        owners.extend([len(paths)] * len(raw))
        texts.extend(str(t).strip() for t in raw)
        paths.append(found)
    if not paths:
        raise FormatError(f"{index_file}: no images in split {split!r}")
    images = EvalSet(key=key, split=split, root=base, classes=[], ids=[str(p) for p in paths],
                     labels=list(range(len(paths))), load_image=lambda i: paths[i])
    return CaptionSet(images=images, texts=texts, text_to_image=np.asarray(owners, dtype=np.int64))


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval_recalls(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_to_image: np.ndarray,
                      ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """{'image_to_text_R@k', 'text_to_image_R@k', 'mean_recall'}; image i's captions: text_to_image == i."""
    images = _normalise(np.asarray(image_embeddings, dtype=np.float32))
    texts = _normalise(np.asarray(text_embeddings, dtype=np.float32))
    owners = np.asarray(text_to_image, dtype=np.int64)
    similarity = images @ texts.T  # [I, T]
    out: dict[str, float] = {}
    # text -> image: the rank of the caption's own image among all images
    order_t2i = np.argsort(-similarity.T, axis=1, kind="stable")  # [T, I]
    rank_t2i = np.argmax(order_t2i == owners[:, None], axis=1)
    # image -> text: the best rank any of the image's captions reaches
    order_i2t = np.argsort(-similarity, axis=1, kind="stable")  # [I, T]
    own = owners[order_i2t] == np.arange(len(images))[:, None]  # [I, T] True where the ranked text is its own
    has_caption = own.any(axis=1)
    rank_i2t = np.where(has_caption, np.argmax(own, axis=1), len(texts))
    for k in ks:
        out[f"image_to_text_R@{k}"] = float(np.mean(rank_i2t < k)) if len(images) else float("nan")
        out[f"text_to_image_R@{k}"] = float(np.mean(rank_t2i < k)) if len(texts) else float("nan")
    out["mean_recall"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image") for k in ks]))
    return out
