"""`clip-pipeline index` and `clip-pipeline search`: search your photos with the exported model, without torch.

    clip-pipeline index --bundle models/bundle ~/Photos --out photos.index      # resumable: rerun to continue
    clip-pipeline search photos.index "a red car at night" --top 10
    clip-pipeline search photos.index --image query.jpg --top 5 --json

`index` embeds every photo under the folder (a progress bar on stderr; parts written as it goes, so an
interrupted run continues where it stopped and a rerun after adding photos embeds only the new ones) and lists
the files it could not decode. `search` embeds the query with the bundle the index was built with (or `--bundle`,
which must be that same bundle: another is refused, naming both sha256s) and prints the best files with their
cosine similarity; `--json` prints `{"query", "index", "hits": [{"file", "score"}, ...]}`. Not stages: they read a
bundle and write only the index. The work is clip.runtime.index's; this module parses, prints and reports.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipelines._common import exit_on_user_error, load_stage_config

err_console = Console(stderr=True)
ParamsOpt = Annotated[str | None, typer.Option("--params", help="params file (only its storage section is used)")]


def _say(text: str) -> None:
    err_console.print(text, soft_wrap=True, highlight=False, markup=False)


def index(
    photos: Annotated[str, typer.Argument(help="folder of photos (searched recursively)")],
    bundle: Annotated[str, typer.Option("--bundle", help="export bundle folder or s3:// prefix")],
    out: Annotated[str, typer.Option("--out", help="index folder or s3:// prefix to write (or to continue)")],
    part_size: Annotated[int, typer.Option(min=1, help="photos per part written while indexing")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="images per encoder batch")] = 32,
    int8: Annotated[bool, typer.Option("--int8", help="use the bundle's int8 image encoder")] = False,
    params: ParamsOpt = None,
) -> None:
    """Embed every photo in a folder into a search index (resumable; undecodable files are skipped and listed)."""
    from clip.runtime import Bundle
    from clip.runtime.index import build_index
    from pipelines._progress import rich_progress

    with exit_on_user_error("index"):
        storage_cfg = load_stage_config(params, []).storage
        model = Bundle.load(bundle, storage_cfg, int8=int8)
        with rich_progress(err_console) as progress:
            built = build_index(model, photos, out, part_size=part_size, batch_size=batch_size,
                                storage_cfg=storage_cfg, progress=progress)
    header = built.index
    for entry in header.skipped:
        _say(f"skipped {entry.file.path}: {entry.error}")
    typer.echo(f"indexed {header.count} photos into {out} ({built.embedded} embedded now, {built.reused} files "
               f"done before); {len(header.skipped)} undecodable")


def search(
    index: Annotated[str, typer.Argument(help="index folder or s3:// prefix")],
    query: Annotated[str | None, typer.Argument(help="text to search for")] = None,
    image: Annotated[str | None, typer.Option("--image", help="search by this image instead of text")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="files shown, best first")] = 10,
    bundle: Annotated[str | None, typer.Option(
        "--bundle", help="the bundle to embed the query with [default: the one the index was built from]")] = None,
    backend: Annotated[str, typer.Option(help="exact (matrix product) or faiss (optional: pip install faiss-cpu)")
                       ] = "exact",
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout")] = False,
    params: ParamsOpt = None,
) -> None:
    """Search an index by text (or --image): the best-matching files with their cosine similarity."""
    from clip.runtime import load_image
    from clip.runtime.index import SearchIndex

    with exit_on_user_error("search"):
        if (query is None) == (image is None):
            raise ValueError("give a text query or --image QUERY.jpg (one of them)")
        storage_cfg = load_stage_config(params, []).storage
        # One query per process: converting float16 chunk by chunk beats building a float32 copy to keep
        opened = SearchIndex.open(index, storage_cfg, resident_bytes=0)
        model = opened.load_bundle(bundle)
        hits = (opened.search_text(model, query, top, backend=backend) if query is not None else
                opened.search_image(model, load_image(image), top, backend=backend))  # type: ignore[arg-type]
    shown = query if query is not None else f"image {image}"
    if as_json:
        typer.echo(json.dumps({"query": shown, "index": index,
                               "hits": [{"file": hit.file, "score": hit.score} for hit in hits]}, indent=2))
        return
    table = Table(title=f"{shown!r}: top {len(hits)} of {len(opened)} photos")
    for column, justify in (("rank", "right"), ("score", "right"), ("file", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for rank, hit in enumerate(hits, 1):
        table.add_row(str(rank), f"{hit.score:.4f}", hit.file)
    Console(width=200).print(table)
