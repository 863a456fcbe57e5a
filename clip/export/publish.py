"""Publishing the bundle (docs/formats.md "Export bundle"): the old one or the new one, never neither; local or s3://.

    text = model_card(info)                         # markdown, with a marked evaluation section
    manifest = publish_bundle(folder, contents, info, storage_cfg)

What a reader can rely on:
- Nothing is written before the parity gate has passed, so a failing export (missing checkpoint, mismatched
  weights, export error, parity failure) leaves whatever bundle was at the location untouched.
- Publishing never touches the files of the bundle being served. The new files go to a folder of their own,
  `<folder>/versions/<version>/` (its own manifest last: a complete flat bundle), and only then is the top
  `<folder>/manifest.json` replaced by one naming that version (one atomic write: a local rename, one S3 PUT).
  That write is the switch: a reader sees the old bundle or the new one. A crash (SIGKILL included) at any
  moment before it leaves the old bundle served and an unfinished version folder, removed by the next publish.
- After the switch, version folders other than the new one and the one it replaced are removed (manifest
  first), so a reader that resolved the old manifest just before the switch still finds its files; the files of
  a flat bundle that was there before (the layout before versions) are removed too.
- One publisher per folder: `<folder>/.lock` (clip.storage.lock) is held while publishing; a second export to
  the same folder is refused naming the first.
- model_card.md keeps a section between `EVALUATION_BEGIN` and `EVALUATION_END` (clip.formats.bundle). The bundle
  is never rewritten: the evaluation stage writes a copy of the card with that section filled beside its results,
  and the promote stage makes it the registered version's description.

Fault injection (tests): with `CLIP_EXPORT_FAULT_KILL_AFTER_FILES=N` in the environment, the process SIGKILLs
itself right after writing the N-th file of the new version folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from dataclasses import replace
from typing import Any

from clip import storage
from clip.config import StorageConfig
from clip.formats.bundle import (
    BUNDLE_MANIFEST_NAME,
    EVALUATION_BEGIN,
    EVALUATION_END,
    PREPROCESS_NAME,
    TOKENIZER_NAME,
    VERSIONS_DIR,
    BundleManifest,
    new_version_name,
    parse_bundle_manifest,
    write_bundle,
)
from clip.formats.errors import FormatError
from clip.storage.lock import output_lock

log = logging.getLogger(__name__)


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def model_card(info: dict[str, Any]) -> str:
    """The bundle's model card: what it is, where it came from, and how closely it matches the checkpoint."""
    parity = info.get("parity", {})
    lines = [
        f"# {info['model']}: exported CLIP encoders",
        "",
        "ONNX image and text encoders exported from a clip-pipeline training checkpoint and checked against it",
        f"(the parity gate). Inputs: `image` float32 [B, 3, S, S] preprocessed as `{PREPROCESS_NAME}` describes,",
        f"`text` int64 [B, context] from `{TOKENIZER_NAME}`. Outputs: unnormalised `embedding`s (and the image",
        "`features` before the projection); similarity logits = logit_scale * cos(image, text).",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        f"| model config | `{info['model']}` |",
        f"| parameters | {info['parameters']:,} |",
        f"| embed dim / image size / context length | {info['embed_dim']} / {info['image_size']} / "
        f"{info['context_length']} |",
        f"| logit scale | {_figure(info['logit_scale'])} |",
        f"| training data version | `{info.get('data_version')}` |",
        f"| training run id (MLflow) | `{info.get('train_run_id')}` |",
        f"| checkpoint | `{info.get('checkpoint')}` |",
        f"| checkpoint sha256 | `{info['checkpoint_sha256']}` |",
        "",
        "## Parity with the checkpoint",
        "",
        "onnxruntime (CPU) against PyTorch float32 eager, on seeded random images and real captions at batch sizes "
        f"{parity.get('batch_sizes')}.",
        "",
        "| figure | value |",
        "|---|---|",
        *[f"| {key} | {_figure(value)} |" for key, value in sorted(parity.items()) if key != "batch_sizes"],
        "",
        "## Model config",
        "",
        "```json",
        json.dumps(info.get("model_config", {}), indent=2, sort_keys=True),
        "```",
        "",
        "## Evaluation",
        "",
        EVALUATION_BEGIN,
        "Not in the bundle: the evaluation stage writes this card with its results filled in here",
        "(reports/eval/model_card.md), and the promote stage makes it the registered version's description.",
        EVALUATION_END,
        "",
    ]
    return "\n".join(lines)


FAULT_KILL_ENV = "CLIP_EXPORT_FAULT_KILL_AFTER_FILES"


def _fault_hook() -> Any:
    """The test hook of the module doc: None unless the environment asks for it."""
    after = int(os.environ.get(FAULT_KILL_ENV, "0") or 0)
    if after <= 0:
        return None
    written: list[str] = []

    def on_written(name: str) -> None:
        written.append(name)
        if len(written) >= after:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_written


def _current(folder: str, storage_cfg: StorageConfig | None) -> BundleManifest | None:
    """The manifest being served at `folder` (None: none, or one that does not parse: nothing to keep)."""
    uri = storage.join(folder, BUNDLE_MANIFEST_NAME)
    try:
        return parse_bundle_manifest(storage.read_bytes(uri, storage_cfg), uri)
    except FileNotFoundError:
        return None
    except FormatError as exc:
        log.warning("%s; replacing it", exc)
        return None


def _remove_version(location: str, storage_cfg: StorageConfig | None) -> None:
    """One version folder: its manifest first (never a complete-looking half), then the rest."""
    storage.delete(storage.join(location, BUNDLE_MANIFEST_NAME), storage_cfg)
    if storage.is_s3_uri(location):
        for info in storage.list_objects(location, storage_cfg):
            storage.delete(info.uri, storage_cfg)
    else:
        shutil.rmtree(storage.to_local_path(location), ignore_errors=True)


def prune_versions(folder: str, keep: set[str], storage_cfg: StorageConfig | None = None) -> list[str]:
    """Remove every version folder under `<folder>/versions/` not in `keep`; returns the removed names."""
    root = storage.join(folder, VERSIONS_DIR)
    if storage.is_s3_uri(root):
        prefix = root.rstrip("/") + "/"
        names = {info.uri[len(prefix):].split("/", 1)[0] for info in storage.list_objects(root, storage_cfg)}
    else:
        path = storage.to_local_path(root)
        names = {entry.name for entry in path.iterdir()} if path.is_dir() else set()
    removed = sorted(names - keep)
    for name in removed:
        try:
            _remove_version(storage.join(root, name), storage_cfg)
        except Exception as exc:  # the switch is done; what is left is removed by the next publish
            log.warning("could not remove the old bundle version %s: %s", storage.join(root, name), exc)
    return removed


def publish_bundle(folder: str, contents: dict[str, bytes], info: dict[str, Any],
                   storage_cfg: StorageConfig | None = None) -> BundleManifest:
    """Write `contents` as a new version of the bundle at `folder`, switch the top manifest to it, prune."""
    with output_lock(folder, "export", storage_cfg):
        previous = _current(folder, storage_cfg)
        manifest = BundleManifest.build(contents, info)
        version = new_version_name(manifest)
        location = storage.join(folder, VERSIONS_DIR, version)
        try:
            write_bundle(location, contents, info, storage_cfg, on_written=_fault_hook())
        except BaseException:
            try:
                _remove_version(location, storage_cfg)
            except Exception as exc:  # keep the original error; the next publish removes the rest
                log.warning("could not remove %s after a failed publish: %s", location, exc)
            raise
        storage.write_bytes(storage.join(folder, BUNDLE_MANIFEST_NAME), manifest.pointer_bytes(version), storage_cfg)
        keep = {version} | ({previous.version} if previous is not None and previous.version else set())
        prune_versions(folder, keep, storage_cfg)
        if previous is not None and previous.version is None:  # a flat bundle was served: its files are stale now
            for name in previous.files:
                storage.delete(storage.join(folder, name), storage_cfg)
    return replace(manifest, version=version)
