"""The export bundle: what gets deployed (docs/formats.md "Export bundle").

A bundle is a set of files, `image_encoder.onnx`, `text_encoder.onnx`, `tokenizer.json`, `preprocess.json`,
`model_card.md`, described by `manifest.json`, written after every file it names:

    {"format": "clip-pipeline/bundle/v1", "files": {"image_encoder.onnx": {"bytes": N, "sha256": "..."}, ...},
     "info": {...}, "version": "20260101T120000.000000Z-0123456789ab"}

Two layouts, told apart by the manifest's `version`:
- **published** (what the export stage writes, local folder or s3:// prefix): the files of each export lie in
  their own folder `<bundle>/versions/<version>/` (with its own manifest, a bundle by itself), and the top
  `<bundle>/manifest.json` is the pointer: the same manifest plus `version`, naming the folder the files are in.
  Replacing it (one atomic write) switches readers from one complete bundle to the next (clip.export.publish);
- **flat** (no `version`): the files beside the manifest (a version folder, a copied bundle, a test bundle).
Readers resolve a file through the manifest (`bundle_files_location`, `bundle_file_uri`). `verify_bundle`
refuses a bundle whose manifest is missing, names a missing file, or whose file bytes differ, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
VERSIONS_DIR = "versions"  # published layout: <bundle>/versions/<version>/ holds each export's files
VERSION_PATTERN = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{12}")  # UTC publish time - manifest sha256[:12]
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
    version: str | None = None  # published layout: the folder under versions/ holding the files; None: flat

    @classmethod
    def build(cls, contents: dict[str, bytes], info: dict[str, Any] | None = None) -> BundleManifest:
        files = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                 for name, data in sorted(contents.items())}
        return cls(files=files, info=dict(info or {}))

    def to_bytes(self) -> bytes:
        """The manifest of a flat bundle (`version` left out: the files lie beside it)."""
        doc = {"format": BUNDLE_FORMAT, "files": self.files, "info": self.info}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")

    def pointer_bytes(self, version: str) -> bytes:
        """The top manifest of a published bundle whose files lie in `versions/<version>/`."""
        doc = {"format": BUNDLE_FORMAT, "files": self.files, "info": self.info, "version": version}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def new_version_name(manifest: BundleManifest) -> str:
    """`<UTC publish time>-<manifest sha256[:12]>`: sorts by publish time, unique per content and moment."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{stamp}-{hashlib.sha256(manifest.to_bytes()).hexdigest()[:12]}"


def bundle_files_location(folder: str, manifest: BundleManifest) -> str:
    """Where the files `manifest` names lie: its version folder (published layout), else `folder` itself."""
    return folder if manifest.version is None else storage.join(folder, VERSIONS_DIR, manifest.version)


def read_bundle_manifest(folder: str, storage_cfg: StorageConfig | None = None) -> BundleManifest:
    """The manifest of the bundle at `folder`; MissingInputError when there is none."""
    uri = storage.join(folder, BUNDLE_MANIFEST_NAME)
    try:
        return parse_bundle_manifest(storage.read_bytes(uri, storage_cfg), uri)
    except FileNotFoundError:
        raise MissingInputError(f"no bundle at {folder}: {BUNDLE_MANIFEST_NAME} is missing "
                                "(run the export stage)") from None


def bundle_file_uri(folder: str, name: str, storage_cfg: StorageConfig | None = None) -> str:
    """Where the bundle at `folder` keeps its file `name` now (through its manifest's `version`)."""
    return storage.join(bundle_files_location(folder, read_bundle_manifest(folder, storage_cfg)), name)


def parse_bundle_manifest(raw: bytes, uri: str) -> BundleManifest:
    doc = parse_format_doc(raw, uri, BUNDLE_FORMAT, "bundle manifest")
    files = doc.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v for v in files.values()):
        raise FormatError(f"{uri}: `files` must map each file name to its bytes and sha256")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise FormatError(f"{uri}: the bundle manifest does not list {missing}")
    version = doc.get("version")
    if version is not None and not (isinstance(version, str) and VERSION_PATTERN.fullmatch(version)):
        raise FormatError(f"{uri}: `version` {version!r} is not a bundle version name (<UTC time>-<sha256[:12]>)")
    return BundleManifest(files=files, info=dict(doc.get("info") or {}), version=version)


def write_bundle(folder: str, contents: dict[str, bytes], info: dict[str, Any] | None = None,
                 storage_cfg: StorageConfig | None = None,
                 on_written: Callable[[str], None] | None = None) -> BundleManifest:
    """Write a flat bundle: every file, then the manifest last (a reader that finds the manifest finds a complete
    bundle). `on_written(name)` is called after each file (clip.export.publish's fault injection)."""
    manifest = BundleManifest.build(contents, info)
    for name, data in sorted(contents.items()):
        storage.write_bytes(storage.join(folder, name), data, storage_cfg)
        if on_written is not None:
            on_written(name)
    storage.write_bytes(storage.join(folder, BUNDLE_MANIFEST_NAME), manifest.to_bytes(), storage_cfg)
    return manifest


def verify_bundle(folder: str, storage_cfg: StorageConfig | None = None,
                  on_file: Callable[[str, bytes], None] | None = None) -> BundleManifest:
    """Check every file the manifest names (in its version folder, for a published bundle) against its sha256;
    raise naming the first bad file.
    `on_file(name, data)` receives each file's bytes once verified (a copy reads the bundle once)."""
    manifest = read_bundle_manifest(folder, storage_cfg)
    location = bundle_files_location(folder, manifest)
    for name, expected in sorted(manifest.files.items()):
        file_uri = storage.join(location, name)
        try:
            data = storage.read_bytes(file_uri, storage_cfg)
        except FileNotFoundError:
            raise FormatError(f"bundle {folder}: {name} is missing") from None
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise FormatError(f"bundle {folder}: {name} was altered (sha256 differs from the bundle manifest)")
        if on_file is not None:
            on_file(name, data)
    return manifest
