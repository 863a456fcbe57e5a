"""The `export` section."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from clip.config.base import PositiveFloat, Section, Uri


class ExportConfig(Section):
    """export: ONNX encoders + tokenizer + preprocessing, checked against the checkpoint -> models/bundle/."""

    checkpoint: Uri | None = Field(
        None, description="a checkpoint file (final.pt) or a training run folder (its final.pt); null: the run of "
                          "the data version train.data's latest.json names (train.output, else "
                          "<runs_dir>/<train.model>-<data_version[:12]>)")
    runs_dir: Uri = Field("models/runs", description="where the training runs are when checkpoint is null")
    output_dir: Uri = Field(
        "models/bundle", description="where the bundle is written (local folder or s3://bucket/prefix); replaced "
                                     "only once the new export passed the parity gate")
    opset: Annotated[int, Field(ge=18)] = Field(18, description="ONNX opset version (18 or newer)")
    parity_min_cosine: Annotated[float, Field(gt=0, le=1)] = Field(
        0.9999, description="parity gate: smallest cosine similarity allowed between an ONNX embedding and the "
                            "PyTorch float32 one (every image and text pair)")
    parity_max_abs_diff: PositiveFloat = Field(
        1e-4, description="parity gate: largest absolute difference allowed between the normalised ONNX and "
                          "PyTorch embeddings")
    parity_seed: int = Field(0, description="seed of the parity gate's random images")
    int8: bool = Field(
        False, description="also write a dynamically quantized int8 image encoder beside the float one "
                           "(image_encoder.int8.onnx; its size, speed and embedding difference in the metrics)")
