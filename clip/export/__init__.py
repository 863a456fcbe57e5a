"""The export stage: a training checkpoint -> a checked, deployable ONNX bundle (docs/formats.md "Export bundle").

    clip-pipeline export [--set export.checkpoint=models/runs/tiny-vit-0123456789ab]

- `onnx_export`: both towers as ONNX models (dynamo exporter, dynamic batch, one file each, checked);
- `parity`: the gate: onnxruntime against the PyTorch checkpoint on images and captions at batch 1 and 7;
- `publish`: the model card and the complete-or-absent bundle write;
- `stage`: `run(cfg.export, storage=..., compute=...) -> ExportResult`.
"""

from clip.export.parity import ParityError

__all__ = ["ParityError"]
