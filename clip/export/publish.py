"""Publishing the bundle folder (docs/formats.md "Export bundle"): complete or absent, local or s3://.

    text = model_card(info)                         # markdown, with a marked evaluation section
    manifest = publish_bundle(folder, contents, info, storage_cfg)

What a reader can rely on:
- Nothing is written before the parity gate has passed, so a failing export (missing checkpoint, mismatched
  weights, export error, parity failure) leaves whatever bundle was at the location untouched.
- Publishing first removes the old `manifest.json` (a reader never sees an old manifest over new files), then
  writes every file through `clip.storage` (atomic per file) and the manifest last via
  `clip.formats.bundle.write_bundle`. If writing fails, the files written so far are removed again and no
  manifest exists: the location holds no bundle rather than a mixed one.
- model_card.md keeps a section between `EVALUATION_BEGIN` and `EVALUATION_END` (clip.formats.bundle). The bundle
  is never rewritten: the evaluation stage writes a copy of the card with that section filled beside its results,
  and the promote stage makes it the registered version's description.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from clip import storage
from clip.config import StorageConfig
from clip.formats.bundle import (
    BUNDLE_MANIFEST_NAME,
    EVALUATION_BEGIN,
    EVALUATION_END,
    BundleManifest,
    write_bundle,
)

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
        "(the parity gate). Inputs: `image` float32 [B, 3, S, S] preprocessed as `preprocess.json` describes,",
        "`text` int64 [B, context] from `tokenizer.json`. Outputs: unnormalised `embedding`s (and the image",
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


def publish_bundle(folder: str, contents: dict[str, bytes], info: dict[str, Any],
                   storage_cfg: StorageConfig | None = None) -> BundleManifest:
    """Replace whatever bundle is at `folder` with `contents` + manifest; on failure leave no manifest."""
    manifest_uri = storage.join(folder, BUNDLE_MANIFEST_NAME)
    if storage.exists(manifest_uri, storage_cfg):
        storage.delete(manifest_uri, storage_cfg)
    try:
        return write_bundle(folder, contents, info, storage_cfg)
    except BaseException:
        for name in [BUNDLE_MANIFEST_NAME, *sorted(contents)]:
            try:
                storage.delete(storage.join(folder, name), storage_cfg)
            except Exception as exc:  # keep the original error; report what could not be cleaned
                log.warning("could not remove %s after a failed publish: %s", storage.join(folder, name), exc)
        raise
