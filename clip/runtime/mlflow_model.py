"""Log an export bundle as an MLflow pyfunc model that serves without torch.

    with mlflow.start_run():
        info = log_bundle_model("models/bundle", name="clip")          # -> mlflow ModelInfo (info.model_uri)
    mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"text": ["a dog"]}))

What is logged, and why:
- **The model class is `clip.runtime.pyfunc.BundleModel`** (input and output columns documented there). It
  lives in the torch-free runtime so that unpickling it imports clip.runtime only, never a stage package.
  This module is here too (not in the export stage) because the promote stage registers bundles through
  clip.tracking, and stages meet only through shared modules.
- **The bundle is the `bundle` artifact**, copied file by file from the manifest (local folder or s3://, read
  through clip.storage after `verify_bundle`), so the served model is exactly the verified bundle and is
  checked again against its manifest every time it is loaded.
- **The `clip` package goes along as code** (`code_paths`), so `mlflow models serve` works where clip-pipeline
  is not installed; only its runtime path is imported at serving time.
- **pip requirements without torch**: onnxruntime, numpy, pillow, tokenizers, pandas, pydantic, pyyaml and
  mlflow, pinned to the versions installed here. A signature declares the optional `image` / `text` /
  `labels` columns and the `labels`, `templates`, `normalize`, `batch_size` params, so a serving request may
  pass them.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import clip
from clip.config import StorageConfig
from clip.formats.bundle import BUNDLE_MANIFEST_NAME, BundleManifest, verify_bundle

# Distribution names of what the runtime path imports (clip.runtime, clip.formats.bundle, clip.storage,
# clip.config, clip.tokenizer); torch is deliberately absent.
SERVING_PACKAGES = ("mlflow", "onnxruntime", "numpy", "pillow", "tokenizers", "pandas", "pydantic", "pyyaml")


def serving_requirements() -> list[str]:
    """`name==version` for each serving package installed here (just `name` where it is not installed)."""
    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def bundle_signature() -> Any:
    """Optional string columns image (base64) / text / labels / index; params labels, templates, normalize,
    batch_size, index, top."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "text", required=False),
                     ColSpec("string", "labels", required=False), ColSpec("string", "index", required=False)])
    params = ParamSchema([
        ParamSpec("labels", "string", [], shape=(-1,)),
        ParamSpec("templates", "string", [], shape=(-1,)),
        ParamSpec("normalize", "boolean", True),
        ParamSpec("batch_size", "long", 32),
        ParamSpec("index", "string", ""),  # search (clip.runtime.index): the index to query, and how many hits
        ParamSpec("top", "long", 10),
    ])
    return ModelSignature(inputs=inputs, params=params)


def _copy_bundle(bundle_dir: str, target: Path, storage_cfg: StorageConfig | None) -> BundleManifest:
    """Copy the bundle file by file as it is verified (each file read once), the manifest last, as the bundle
    writer does: what gets logged is exactly what the manifest says."""
    manifest = verify_bundle(bundle_dir, storage_cfg, on_file=lambda name, data: (target / name).write_bytes(data))
    (target / BUNDLE_MANIFEST_NAME).write_bytes(manifest.to_bytes())  # the manifest that was verified
    return manifest


def log_bundle_model(bundle_dir: str | Path, name: str = "model", *, storage_cfg: StorageConfig | None = None,
                     registered_model_name: str | None = None, include_code: bool = True,
                     metadata: dict[str, Any] | None = None) -> Any:
    """Log the bundle at `bundle_dir` as a pyfunc model under the active (or a new) MLflow run.

    Returns MLflow's ModelInfo (`model_uri`, ...). `registered_model_name` also registers a version.
    `include_code=False` leaves the clip package out (the serving environment must then have it).
    """
    import mlflow.pyfunc
    import pandas as pd

    from clip.runtime.pyfunc import BUNDLE_ARTIFACT, BundleModel

    with tempfile.TemporaryDirectory(prefix="clip-pyfunc-") as tmp:
        local = Path(tmp) / BUNDLE_ARTIFACT
        local.mkdir()
        info = _copy_bundle(str(bundle_dir), local, storage_cfg).info
        meta = {"clip_model": info.get("model"), "clip_data_version": info.get("data_version"),
                "clip_train_run_id": info.get("train_run_id"), **(metadata or {})}
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=BundleModel(),
            artifacts={BUNDLE_ARTIFACT: str(local)},
            code_paths=[str(Path(clip.__file__).parent)] if include_code else None,
            pip_requirements=serving_requirements(),
            signature=bundle_signature(),
            registered_model_name=registered_model_name,
            metadata={key: value for key, value in meta.items() if value is not None},
            # MLflow runs the model on this example while logging: a model that cannot predict is not logged.
            input_example=pd.DataFrame({"text": ["a photo of a dog."]}),
        )
