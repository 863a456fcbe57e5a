"""`clip-pipeline predict`: zero-shot probabilities for images from an export bundle, without torch.

    clip-pipeline predict --bundle models/bundle cat.jpg dog.png --labels "cat,dog,car"
    clip-pipeline predict --bundle s3://bucket/bundle *.jpg --labels "cat,dog" --template "a photo of a {}."
    clip-pipeline predict --bundle models/bundle *.jpg --labels "$(paste -sd, labels.txt)" --top 3 --json

Prints, per image, its `--top` most probable labels (default 5) with their probabilities, so a run with
thousands of labels stays readable. `--json` prints one JSON document on stdout instead, for scripts:
`{"model", "labels", "top", "images": [{"file", "top": [[label, probability], ...]} or {"file", "error"}]}`, the
images in the order given. An image that cannot be decoded is reported by name (on stderr, and in the JSON) and the
others still run (exit status 1 if any failed); a tampered or missing bundle is one line naming the file
(pipelines._common.exit_on_user_error). Not a stage: it reads a bundle and writes nothing. The work is
clip.runtime's; this module only parses, prints and reports.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipelines._common import exit_on_user_error, load_stage_config

err_console = Console(stderr=True)


def predict(
    images: Annotated[list[str], typer.Argument(help="image files to classify")],
    bundle: Annotated[str, typer.Option("--bundle", help="export bundle folder or s3:// prefix")],
    labels: Annotated[str, typer.Option("--labels", help='comma-separated class names, e.g. "cat,dog,car"')],
    template: Annotated[list[str] | None, typer.Option(
        "--template", help='prompt template with {} for the label (repeatable; default "a photo of a {}.")')] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="labels shown per image, most probable first")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout (per image: file, top labels "
                                                         "with probabilities, or its error)")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="images per encoder batch")] = 32,
    int8: Annotated[bool, typer.Option("--int8", help="use the bundle's int8 image encoder")] = False,
    params: Annotated[str | None, typer.Option("--params", help="params file (only its storage section is used)")] = None,
) -> None:
    """Zero-shot probabilities for images from an export bundle (onnxruntime, no torch): the top labels per image."""
    # imported here, not at the top: keeps `clip-pipeline --help` fast
    from clip.runtime import DEFAULT_TEMPLATES, Bundle, load_image, top_k

    label_list = [label.strip() for label in labels.split(",") if label.strip()]
    with exit_on_user_error("predict"):
        if not label_list:
            raise ValueError(f"--labels {labels!r}: give at least one label, comma-separated")
        storage_cfg = load_stage_config(params, [], note_defaults=False).storage
        model = Bundle.load(bundle, storage_cfg, int8=int8)
        decoded, errors = [], {}
        for index, path in enumerate(images):
            try:
                decoded.append((index, load_image(path)))
            except Exception as exc:  # noqa: BLE001 - every unreadable image is reported and skipped
                errors[index] = str(exc)
                err_console.print(f"error: predict: {exc}", soft_wrap=True, highlight=False, markup=False)
        templates = tuple(template) if template else DEFAULT_TEMPLATES
        probabilities = (model.classify([image for _, image in decoded], label_list, templates, batch_size=batch_size)
                         if decoded else None)
    ranked = top_k(probabilities, label_list, top) if probabilities is not None else []
    best = {index: labels_of_image for (index, _), labels_of_image in zip(decoded, ranked, strict=True)}
    model_name = model.info.get("model", "bundle")
    if as_json:
        entries = [{"file": path, "error": errors[i]} if i in errors else
                   {"file": path, "top": [[label, p] for label, p in best[i]]} for i, path in enumerate(images)]
        typer.echo(json.dumps({"model": model_name, "labels": len(label_list), "top": min(top, len(label_list)),
                               "images": entries}, indent=2))
    elif best:
        table = Table(title=f"zero-shot: top {min(top, len(label_list))} of {len(label_list)} labels ({model_name})")
        for column, justify in (("image", "left"), ("rank", "right"), ("label", "left"), ("probability", "right")):
            table.add_column(column, justify=justify, overflow="fold")
        for i, labels_of_image in best.items():
            for rank, (label, p) in enumerate(labels_of_image, 1):
                table.add_row(images[i] if rank == 1 else "", str(rank), label, f"{p:.4f}",
                              end_section=rank == len(labels_of_image))
        Console(width=200).print(table)
    if errors:
        err_console.print(f"{len(errors)} of {len(images)} images could not be read: "
                          f"{', '.join(images[i] for i in errors)}", soft_wrap=True, highlight=False, markup=False)
        raise typer.Exit(1)
