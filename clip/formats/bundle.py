"""The export bundle: what gets deployed (docs/formats.md "Export bundle").

A folder (local or s3:// prefix) holding `image_encoder.onnx`, `text_encoder.onnx`, `tokenizer.json`,
`preprocess.json`, `model_card.md` and, written last, `manifest.json`:

    {"format": "clip-pipeline/bundle/v1", "files": {"image_encoder.onnx": {"bytes": N, "sha256": "..."}, ...},
     "info": {...}}

A bundle is complete or absent: the manifest is written only after every file it names, and `verify_bundle`
refuses a bundle whose manifest is missing, names a missing file, or whose file bytes differ, naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clip import storage
from clip.config import StorageConfig
from clip.formats.errors import FormatError, MissingInputError
from clip.formats.jsondoc import parse_format_doc

BUNDLE_FORMAT = "clip-pipeline/bundle/v1"
BUNDLE_MANIFEST_NAME = "manifest.json"
IMAGE_ENCODER_NAME = "image_encoder.onnx"
TEXT_ENCODER_NAME = "text_encoder.onnx"
TOKENIZER_NAME = "tokenizer.json"
PREPROCESS_NAME = "preprocess.json"
MODEL_CARD_NAME = "model_card.md"
INT8_IMAGE_ENCODER_NAME = "image_encoder.int8.onnx"  # optional (export.int8): never replaces the float encoder
REQUIRED_FILES = (IMAGE_ENCODER_NAME, TEXT_ENCODER_NAME, TOKENIZER_NAME, PREPROCESS_NAME)
# model_card.md's evaluation section. The bundle never changes after export (its manifest, DVC and the parity
# gate vouch for it): the evaluation stage writes the card with this section filled beside its results, and the
# promote stage makes that the registered model version's description.
EVALUATION_BEGIN = "<!-- evaluation:begin -->"
EVALUATION_END = "<!-- evaluation:end -->"


def fill_model_card(card: str, evaluation_markdown: str) -> str:
    """The card with its evaluation section replaced (appended when the card has no marked section)."""
    start, end = card.find(EVALUATION_BEGIN), card.find(EVALUATION_END)
    body = f"{EVALUATION_BEGIN}\n{evaluation_markdown.strip()}\n{EVALUATION_END}"
    if start < 0 or end < start:
        return card.rstrip("\n") + "\n\n## Evaluation\n\n" + body + "\n"
    return card[:start] + body + card[end + len(EVALUATION_END):]


@dataclass(frozen=True)
class BundleManifest:
    files: dict[str, dict[str, Any]]  # name -> {"bytes", "sha256"}
    info: dict[str, Any] = field(default_factory=dict)  # model config, data version, parity figures, ...

    @classmethod
    def build(cls, contents: dict[str, bytes], info: dict[str, Any] | None = None) -> BundleManifest:
        files = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                 for name, data in sorted(contents.items())}
        return cls(files=files, info=dict(info or {}))

    def to_bytes(self) -> bytes:
        doc = {"format": BUNDLE_FORMAT, "files": self.files, "info": self.info}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def parse_bundle_manifest(raw: bytes, uri: str) -> BundleManifest:
    doc = parse_format_doc(raw, uri, BUNDLE_FORMAT, "bundle manifest")
    files = doc.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v for v in files.values()):
        raise FormatError(f"{uri}: `files` must map each file name to its bytes and sha256")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise FormatError(f"{uri}: the bundle manifest does not list {missing}")
    return BundleManifest(files=files, info=dict(doc.get("info") or {}))


def write_bundle(folder: str, contents: dict[str, bytes], info: dict[str, Any] | None = None,
                 storage_cfg: StorageConfig | None = None) -> BundleManifest:
    """Write every file, then the manifest last (a reader that finds the manifest finds a complete bundle)."""
    manifest = BundleManifest.build(contents, info)
    for name, data in sorted(contents.items()):
        storage.write_bytes(storage.join(folder, name), data, storage_cfg)
    storage.write_bytes(storage.join(folder, BUNDLE_MANIFEST_NAME), manifest.to_bytes(), storage_cfg)
    return manifest


def verify_bundle(folder: str, storage_cfg: StorageConfig | None = None,
                  on_file: Callable[[str, bytes], None] | None = None) -> BundleManifest:
    """Check every file the manifest names against its size and sha256; raise naming the first bad file.
    `on_file(name, data)` receives each file's bytes once verified (a copy reads the bundle once)."""
    uri = storage.join(folder, BUNDLE_MANIFEST_NAME)
    try:
        manifest = parse_bundle_manifest(storage.read_bytes(uri, storage_cfg), uri)
    except FileNotFoundError:
        raise MissingInputError(f"no bundle at {folder}: {BUNDLE_MANIFEST_NAME} is missing "
                                "(run the export stage)") from None
    for name, expected in sorted(manifest.files.items()):
        file_uri = storage.join(folder, name)
        try:
            data = storage.read_bytes(file_uri, storage_cfg)
        except FileNotFoundError:
            raise FormatError(f"bundle {folder}: {name} is missing") from None
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise FormatError(f"bundle {folder}: {name} was altered (sha256 differs from the bundle manifest)")
        if on_file is not None:
            on_file(name, data)
    return manifest
