"""The MLflow pyfunc model of an export bundle: what `mlflow models serve` runs, with no torch.

    model = mlflow.pyfunc.load_model("models:/clip/1")
    model.predict(pd.DataFrame({"image": [b64_jpeg, ...]}), params={"labels": ["cat", "dog"]})
    model.predict(pd.DataFrame({"text": ["a red circle"]}))

Input, a DataFrame with any of these columns (one request row each):
- `image`: base64 of the encoded image file (JPEG, PNG, ...);
- `text`: a caption;
- `labels`: comma-separated class names (the same in every row; the `labels` param wins when both are given);
- `index`: a search index location (likewise; the `index` param wins).
Params (all optional): `labels` (list of class names or one comma-separated string), `templates` (prompt
templates with `{}`; default "a photo of a {}."), `normalize` (embeddings as unit vectors, default true),
`batch_size` (default 32), `index` and `top` (search, below).

Output, one row per input row: with labels, image rows get `label` (the most probable) and `probabilities`
(a list in label order); without labels, image rows get `image_embedding`; text rows get `text_embedding`
(lists of floats). A row whose image cannot be decoded gets `error` (naming the row) and the others run.

Search: with the `index` param (or an `index` column; a search index folder or s3:// prefix that
`clip-pipeline index` built with this same bundle, clip.runtime.index), each text row (and each image row:
image-to-image) is a query instead, and gets `files` (its `top` best photos, default 10, best first) and
`scores` (their cosine similarities). An index built with another bundle is refused, naming both sha256s.
Each index is opened once per loaded model and kept.

    model.predict(pd.DataFrame({"text": ["a red car at night"]}), params={"index": "photos.index", "top": 5})

The class lives here, in the torch-free runtime, and not in clip/export: loading the pickled model imports
only this module's package (clip.runtime), whatever the export stage package imports. The bundle travels as
the model's `bundle` artifact and is verified against its manifest on load (clip.runtime.Bundle.load).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from clip.runtime.bundle import DEFAULT_TEMPLATES, Bundle, load_image
from clip.runtime.index import SearchIndex

BUNDLE_ARTIFACT = "bundle"


def _as_list(value: Any, name: str) -> list[str]:
    """A param or column value as a list of non-empty strings ("a,b" or ["a", "b"])."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",") if name == "labels" else [value]
    elif isinstance(value, list | tuple | np.ndarray):
        items = [str(v) for v in value]
    else:
        raise ValueError(f"param {name!r} must be a string or a list of strings, got {type(value).__name__}")
    return [item.strip() for item in items if str(item).strip()]


def _present(value: Any) -> bool:
    return isinstance(value, str) and value != ""


class BundleModel(mlflow.pyfunc.PythonModel):
    """Embeddings or zero-shot probabilities from the bundle artifact (see the module docstring)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.bundle = Bundle.load(context.artifacts[BUNDLE_ARTIFACT])
        self.indexes: dict[str, SearchIndex] = {}

    def _index(self, location: str) -> SearchIndex:
        if location not in self.indexes:
            index = SearchIndex.open(location)
            index.check_bundle(self.bundle)
            self.indexes[location] = index
        return self.indexes[location]

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        params = dict(params or {})
        if not {"image", "text"} & set(model_input.columns):
            raise ValueError(f"input needs an 'image' (base64) or 'text' column; got {list(model_input.columns)}")
        labels = _as_list(params.get("labels"), "labels")
        if not labels and "labels" in model_input.columns:
            present = [v for v in model_input["labels"] if _present(v)]
            labels = _as_list(present[0], "labels") if present else []
        index_location = params.get("index") or next(
            (v for v in model_input.get("index", []) if _present(v)), None)
        index = self._index(str(index_location)) if index_location else None
        top = int(params.get("top") or 10)
        templates = tuple(_as_list(params.get("templates"), "templates")) or DEFAULT_TEMPLATES
        normalize = bool(params.get("normalize", True))
        batch_size = int(params.get("batch_size") or 32)

        rows: list[dict[str, Any]] = [{} for _ in range(len(model_input))]
        images, image_rows = [], []
        for row, value in enumerate(model_input["image"] if "image" in model_input.columns else []):
            if not _present(value):
                continue
            try:
                images.append(load_image(base64.b64decode(value, validate=True), name=f"in row {row}"))
                image_rows.append(row)
            except (binascii.Error, ValueError) as exc:  # FormatError is a ValueError too
                rows[row]["error"] = f"image in row {row}: {exc}"
        if images and index is not None:
            queries = self.bundle.encode_images(images, batch_size=batch_size, normalize=True)
            for row, hits in zip(image_rows, index.search_vectors(queries, top), strict=True):
                rows[row].update(files=[hit.file for hit in hits], scores=[hit.score for hit in hits])
        elif images and labels:
            probabilities = self.bundle.classify(images, labels, templates, batch_size=batch_size)
            for row, probs in zip(image_rows, probabilities, strict=True):
                rows[row]["label"] = labels[int(probs.argmax())]
                rows[row]["probabilities"] = probs.astype(float).tolist()
        elif images:
            embeddings = self.bundle.encode_images(images, batch_size=batch_size, normalize=normalize)
            for row, embedding in zip(image_rows, embeddings, strict=True):
                rows[row]["image_embedding"] = embedding.astype(float).tolist()
        if "text" in model_input.columns:
            text_rows = [row for row, value in enumerate(model_input["text"]) if _present(value)]
            texts = [model_input["text"].iloc[row] for row in text_rows]
            if texts and index is not None:
                queries = self.bundle.encode_texts(texts, batch_size=batch_size, normalize=True)
                for row, hits in zip(text_rows, index.search_vectors(queries, top), strict=True):
                    rows[row].update(files=[hit.file for hit in hits], scores=[hit.score for hit in hits])
            elif texts:
                embeddings = self.bundle.encode_texts(texts, batch_size=batch_size, normalize=normalize)
                for row, embedding in zip(text_rows, embeddings, strict=True):
                    rows[row]["text_embedding"] = embedding.astype(float).tolist()
        answer = pd.DataFrame(rows, index=model_input.index).astype(object)
        return answer.where(answer.notna(), None)  # a key one row lacks is null in JSON, not NaN (not JSON)
