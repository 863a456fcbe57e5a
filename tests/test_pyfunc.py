"""The MLflow pyfunc model of a bundle: logged to a real SQLite MLflow store, loaded and run in a fresh process
where importing torch raises, and compared with the runtime's own numbers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clip.formats.bundle import IMAGE_ENCODER_NAME
from clip.formats.errors import FormatError
from clip.runtime import Bundle
from tests.support.bundles import BLOCK_TORCH, make_bundle
from tests.support.images import random_scene

REPO = Path(__file__).resolve().parents[1]
LABELS = ["red circle", "green square"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_bundle(tmp_path_factory.mktemp("pyfunc") / "bundle")


def _b64_images(count: int) -> tuple[list[str], list]:
    rng = np.random.default_rng(7)
    images, encoded = [], []
    for i in range(count):
        image = random_scene(rng, (90 + 10 * i, 70))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(image)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded, images


def test_pyfunc_logs_loads_and_predicts_without_torch(bundle_dir: str, mlflow_store: dict, tmp_path: Path) -> None:
    import mlflow

    from clip.runtime.mlflow_model import log_bundle_model

    experiment = mlflow.create_experiment("pyfunc", artifact_location=mlflow_store["artifact_location"])
    with mlflow.start_run(experiment_id=experiment):
        info = log_bundle_model(bundle_dir, name="clip")
    requirements = Path(mlflow_store["artifact_location"]).rglob("requirements.txt")
    pins = "\n".join(p.read_text() for p in requirements)
    assert "onnxruntime==" in pins and "torch" not in pins

    encoded, images = _b64_images(3)
    request = {"image": [encoded[0], "not base64!", encoded[1], encoded[2]]}
    code = f"""
import json
import mlflow.pyfunc
import pandas as pd
model = mlflow.pyfunc.load_model({info.model_uri!r})
zero_shot = model.predict(pd.DataFrame({request!r}), params={{"labels": {LABELS!r}}})
by_column = model.predict(pd.DataFrame({{"image": [{encoded[0]!r}], "labels": [{",".join(LABELS)!r}]}}))
texts = model.predict(pd.DataFrame({{"text": ["a red circle", "a green square"]}}))
mixed = model.predict(pd.DataFrame({{"image": [{encoded[0]!r}, None], "text": [None, "a dog"]}}),
                      params={{"normalize": False}})
def column(frame, name):
    return [v if isinstance(v, (list, str)) else None for v in frame[name]] if name in frame else None
print(json.dumps({{
    "labels": column(zero_shot, "label"), "probs": column(zero_shot, "probabilities"),
    "errors": column(zero_shot, "error"), "by_column": column(by_column, "probabilities"),
    "text": column(texts, "text_embedding"), "mixed_image": column(mixed, "image_embedding"),
    "mixed_text": column(mixed, "text_embedding"),
    "torch": [m for m in sys.modules if m.startswith("torch")],
    "clip_from": sys.modules["clip"].__file__,
}}))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store["uri"], "MLFLOW_ENABLE_TELEMETRY": "false",
           "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["torch"] == []
    assert "/code/clip/" in out["clip_from"]  # the clip package logged with the model, not this checkout

    runtime = Bundle.load(bundle_dir)
    expected = runtime.classify(images, LABELS)
    probs = [out["probs"][i] for i in (0, 2, 3)]
    np.testing.assert_allclose(np.array(probs), expected, atol=1e-6)
    assert [out["labels"][i] for i in (0, 2, 3)] == [LABELS[int(k)] for k in expected.argmax(1)]
    assert out["probs"][1] is None and "row 1" in out["errors"][1]
    np.testing.assert_allclose(np.array(out["by_column"]), expected[:1], atol=1e-6)
    np.testing.assert_allclose(np.array(out["text"]), runtime.encode_texts(["a red circle", "a green square"],
                                                                           normalize=True), atol=1e-6)
    np.testing.assert_allclose(np.array(out["mixed_image"][0]), runtime.encode_images(images[:1])[0], atol=1e-5)
    assert out["mixed_image"][1] is None and out["mixed_text"][0] is None
    np.testing.assert_allclose(np.array(out["mixed_text"][1]), runtime.encode_texts(["a dog"])[0], atol=1e-5)


def test_log_refuses_a_tampered_bundle(bundle_dir: str, mlflow_store: dict, tmp_path: Path) -> None:
    import shutil

    import mlflow

    from clip.runtime.mlflow_model import log_bundle_model

    folder = tmp_path / "tampered"
    shutil.copytree(bundle_dir, folder)
    with open(folder / IMAGE_ENCODER_NAME, "ab") as f:
        f.write(b"\0")
    experiment = mlflow.create_experiment("tampered", artifact_location=mlflow_store["artifact_location"])
    with mlflow.start_run(experiment_id=experiment), pytest.raises(FormatError, match=f"{IMAGE_ENCODER_NAME} was"):
        log_bundle_model(str(folder), name="clip")
