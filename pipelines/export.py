"""Export stage: ONNX image and text encoders of a training checkpoint, proven equal to it, as one bundle.

    clip-pipeline export [--params params.yaml] [--set export.checkpoint=models/runs/<run>/final.pt]
    python -m pipelines.export --set export.output_dir=s3://bucket/bundles/v1

Reads `export.checkpoint` (null: the newest finished run under `export.runs_dir`); writes image_encoder.onnx,
text_encoder.onnx, tokenizer.json, preprocess.json, model_card.md and manifest.json (last) to `export.output_dir`,
a local folder or s3:// (docs/formats.md "Export bundle"), metrics (parity figures) to reports/metrics/export.json.
"""

from __future__ import annotations

from clip.config import PipelineConfig
from clip.export import stage
from clip.progress import Progress
from clip.result import StageResult
from pipelines._common import stage_main


def run(cfg: PipelineConfig, progress: Progress | None = None) -> StageResult:
    return stage.run(cfg.export, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking, progress=progress)


def main(argv: list[str] | None = None) -> None:
    stage_main("export", run, argv)


if __name__ == "__main__":
    main()
