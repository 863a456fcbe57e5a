"""Export stage: ONNX image and text encoders of a training checkpoint, proven equal to it, as one bundle.

    clip-pipeline export [--params params.yaml] [--set export.checkpoint=models/runs/<run>/final.pt]
    python -m pipelines.export --set export.output_dir=s3://bucket/bundles/v1

Reads `export.checkpoint` (a file, or a run folder: its final.pt, else its highest step-N.pt; null: the training run
of the data version `train.data`'s latest.json names now, by the train stage's own folder rule: `train.output`, else
`<export.runs_dir>/<train.model>-<data_version[:12]>/`; never merely the newest run, so a pointer moved back to an
older version exports that version's model; clip.formats.checkpoint `resolve_checkpoint`);
writes image_encoder.onnx, text_encoder.onnx, tokenizer.json, preprocess.json, model_card.md and manifest.json
(last) to a new version folder `<export.output_dir>/versions/<version>/`, then switches
`<export.output_dir>/manifest.json` to it (a local folder or s3://; docs/formats.md "Export bundle"), metrics
(parity figures) to reports/metrics/export.json.
"""

from __future__ import annotations

from clip.config import PipelineConfig
from clip.export import stage
from clip.formats.checkpoint import run_for_data
from clip.progress import Progress
from clip.result import StageResult
from pipelines._common import stage_main


def run(cfg: PipelineConfig, progress: Progress | None = None) -> StageResult:
    train_run = None if cfg.export.checkpoint else run_for_data(
        cfg.train.data, cfg.train.model, loss=cfg.train.loss, output=cfg.train.output, runs_dir=cfg.export.runs_dir,
        storage_cfg=cfg.storage)
    return stage.run(cfg.export, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking, progress=progress,
                     train_run=train_run)


def main(argv: list[str] | None = None) -> None:
    stage_main("export", run, argv)


if __name__ == "__main__":
    main()
