"""`clip-pipeline predict`: zero-shot probabilities for images from an export bundle, without torch.

    clip-pipeline predict --bundle models/bundle cat.jpg dog.png --labels "cat,dog,car"
    clip-pipeline predict --bundle s3://bucket/bundle *.jpg --labels "cat,dog" --template "a photo of a {}."

Prints one table row per image (the probability of each label, the best label). An image that cannot be
decoded is reported by name and the others still run (exit status 1 if any failed); a tampered or missing
bundle is one line naming the file (pipelines._common.exit_on_user_error). Not a stage: it reads a bundle
and writes nothing. The work is clip.runtime's; this module only parses, prints and reports.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from clip.config import DEFAULT_PARAMS
from pipelines._common import exit_on_user_error, load_stage_config

err_console = Console(stderr=True)


def predict(
    images: Annotated[list[str], typer.Argument(help="image files to classify")],
    bundle: Annotated[str, typer.Option("--bundle", help="export bundle folder or s3:// prefix")],
    labels: Annotated[str, typer.Option("--labels", help='comma-separated class names, e.g. "cat,dog,car"')],
    template: Annotated[list[str] | None, typer.Option(
        "--template", help='prompt template with {} for the label (repeatable; default "a photo of a {}.")')] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per encoder batch")] = 32,
    int8: Annotated[bool, typer.Option("--int8", help="use the bundle's int8 image encoder")] = False,
    params: Annotated[str, typer.Option("--params", help="params file (only its storage section is used)")] = DEFAULT_PARAMS,
) -> None:
    """Zero-shot probabilities for images from an export bundle (onnxruntime, no torch)."""
    from clip.runtime import DEFAULT_TEMPLATES, Bundle, load_image  # lazy: keeps `clip-pipeline --help` fast

    label_list = [label.strip() for label in labels.split(",") if label.strip()]
    with exit_on_user_error("predict"):
        if not label_list:
            raise ValueError(f"--labels {labels!r}: give at least one label, comma-separated")
        storage_cfg = load_stage_config(params, []).storage
        model = Bundle.load(bundle, storage_cfg, int8=int8)
        decoded, failed = [], []
        for path in images:
            try:
                decoded.append((path, load_image(path)))
            except Exception as exc:  # noqa: BLE001 - every unreadable image is reported and skipped
                failed.append(path)
                err_console.print(f"error: predict: {exc}", soft_wrap=True, highlight=False, markup=False)
        templates = tuple(template) if template else DEFAULT_TEMPLATES
        probabilities = (model.classify([image for _, image in decoded], label_list, templates, batch_size=batch_size)
                         if decoded else None)
    table = Table(title=f"zero-shot probabilities ({model.info.get('model', 'bundle')})")
    table.add_column("image", overflow="fold")
    for label in label_list:
        table.add_column(label, justify="right")
    table.add_column("best")
    for row, (path, _) in enumerate(decoded):
        assert probabilities is not None
        table.add_row(path, *(f"{p:.4f}" for p in probabilities[row]), label_list[int(probabilities[row].argmax())])
    if decoded:
        Console(width=200).print(table)
    if failed:
        err_console.print(f"{len(failed)} of {len(images)} images could not be read: {', '.join(failed)}",
                          soft_wrap=True, highlight=False, markup=False)
        raise typer.Exit(1)
