"""docs/formats.md against what the code writes: a client outside Python must find every field there.

A real export (the export stage on a tiny-vit checkpoint, int8 encoder included, and a tiny-rn one for the ResNet
feature width) gives the bundle; its `manifest.json` (top and version folder), `preprocess.json` and
`tokenizer.json` keys, its files and its ONNX inputs and outputs (name, dtype, shape) must be the rows of the
matching tables of the "Export bundle" section, both ways: a key the export writes without a row fails, and so does
a row naming a key the export no longer writes. A row whose meaning starts with a JSON literal (`"RGB"`, `true`)
states the value, and it must be the value written. The tokenizing recipe of the `tokenizer.json` table is
followed with the `tokenizers` library alone and must give the runtime's ids. The other formats' JSON documents
(checkpoint sidecar, shard manifest, pointer and index, search index, results table) are written by their
clip.formats writers, and every key they hold must be named in their section.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch

from clip.config import ComputeConfig, ExportConfig, StorageConfig
from clip.export import stage
from clip.formats.bundle import BUNDLE_MANIFEST_NAME, PREPROCESS_NAME, TOKENIZER_NAME
from clip.formats.checkpoint import checkpoint_bytes
from clip.model import create_model
from clip.tokenizer import Tokenizer, clean_caption

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "formats.md"
CAPTIONS = [f"a photo of {n} {c} {s}" for n in ("one", "two", "a") for c in ("red", "green", "blue")
            for s in ("circle", "square", "dog", "cat")]
MANIFEST_TABLE, PREPROCESS_TABLE, TOKENIZER_TABLE = "### `manifest.json`", "### `preprocess.json`", "### `tokenizer.json`"
FILES_TABLE, ONNX_TABLE = "### Files of a bundle", "### ONNX encoders"


# -- reading the document --------------------------------------------------------------------------------------


def section(heading: str, text: str | None = None) -> str:
    """The text under the heading line that starts with `heading`, up to the next heading of its level or above."""
    text = DOC.read_text(encoding="utf-8") if text is None else text
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    assert len(starts) == 1, f"docs/formats.md: expected one heading starting with {heading!r}, found {len(starts)}"
    body = []
    for line in lines[starts[0] + 1:]:
        match = re.match(r"(#+) ", line)
        if match and len(match.group(1)) <= level:
            break
        body.append(line)
    return "\n".join(body)


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row under `text`, header and separator rows left out."""
    rows, previous_was_table = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            previous_was_table = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        is_separator = all(re.fullmatch(r":?-+:?", cell) for cell in cells)
        if previous_was_table and not is_separator:
            rows.append(cells)
        previous_was_table = True  # the first line of a table is its header
    return rows


def code(cell: str) -> str:
    """The one backticked name a table's first cells hold."""
    names = re.findall(r"`([^`]+)`", cell)
    assert len(names) == 1, f"docs/formats.md: expected one `name` in the cell {cell!r}"
    return names[0]


def field_table(heading: str) -> dict[str, list[str]]:
    """field -> its row's cells, from the table of the section `heading`."""
    rows = table_rows(section(heading))
    assert rows, f"docs/formats.md: no table under {heading!r}"
    table = {code(row[0]): row for row in rows}
    assert len(table) == len(rows), f"docs/formats.md: a field is listed twice under {heading!r}"
    return table


def stated_literal(meaning: str) -> tuple[bool, Any]:
    """(True, value) when a row's meaning starts with a backticked JSON literal, the value it states."""
    match = re.match(r"`([^`]+)`", meaning)
    if not match:
        return False, None
    try:
        return True, json.loads(match.group(1))
    except json.JSONDecodeError:
        return False, None


# -- reading what the code wrote -------------------------------------------------------------------------------


def leaves(doc: Any, prefix: str = "", maps: tuple[str, ...] = ()) -> dict[str, Any]:
    """Dotted path -> value of every leaf of a JSON object; the objects at `maps` are name -> entry maps, whose
    names become `<name>`."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if path in maps:
            for entry in value.values():
                out.update(leaves(entry, f"{path}.<name>.", maps))
        elif isinstance(value, dict):
            out.update(leaves(value, f"{path}.", maps))
        else:
            out[path] = value
    return out


def compare_with_table(heading: str, written: dict[str, Any]) -> None:
    table = field_table(heading)
    objects = {path.rsplit(".", i)[0] for path in written for i in range(1, path.count(".") + 1)}
    missing = sorted(set(written) - set(table))  # every leaf needs its row; an object may have one too
    stale = sorted(set(table) - set(written) - objects)
    assert not missing, f"docs/formats.md {heading}: fields written but not documented: {missing}"
    assert not stale, f"docs/formats.md {heading}: documented fields the export no longer writes: {stale}"
    for name, row in table.items():
        has_literal, value = stated_literal(row[2])
        if has_literal:
            assert written[name] == value, f"docs/formats.md {heading}: {name} is documented as {value!r}, " \
                                           f"the export writes {written[name]!r}"


def exported_bundle(folder: Path, model_name: str, int8: bool) -> tuple[Path, Path]:
    """Export a random-weight `model_name` checkpoint with the export stage; (bundle folder, version folder)."""
    tokenizer = Tokenizer.train(CAPTIONS * 4, vocab_size=600, min_frequency=1)
    torch.manual_seed(0)
    model = create_model(model_name, vocab_size=tokenizer.vocab_size)
    checkpoint = folder / "run" / "final.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(checkpoint_bytes({
        "model": model.state_dict(), "model_config": model.config.to_dict(), "tokenizer": tokenizer.to_json(),
        "data_version": "d" * 64, "mlflow_run_id": None, "step": 3,
    }))  # fmt: skip
    cfg = ExportConfig(checkpoint=str(checkpoint), output_dir=str(folder / "bundle"), int8=int8)
    result = stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig())
    return folder / "bundle", Path(result.outputs["files"])


@pytest.fixture(scope="module")
def vit_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return exported_bundle(tmp_path_factory.mktemp("vit"), "tiny-vit", int8=True)


@pytest.fixture(scope="module")
def rn_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return exported_bundle(tmp_path_factory.mktemp("rn"), "tiny-rn", int8=False)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# -- the bundle ------------------------------------------------------------------------------------------------


def test_every_manifest_field_is_documented(vit_bundle: tuple[Path, Path]) -> None:
    top, version = (read_json(folder / BUNDLE_MANIFEST_NAME) for folder in vit_bundle)
    assert top.pop("version") == vit_bundle[1].name and top == version  # the same document, less `version`
    written = {**leaves(version, maps=("files",)), "version": vit_bundle[1].name}
    compare_with_table(MANIFEST_TABLE, written)


def test_every_file_of_the_bundle_is_documented(vit_bundle: tuple[Path, Path]) -> None:
    manifest = read_json(vit_bundle[1] / BUNDLE_MANIFEST_NAME)
    written = set(manifest["files"]) | {BUNDLE_MANIFEST_NAME}
    assert {path.name for path in vit_bundle[1].iterdir()} == written
    documented = {code(row[0]) for row in table_rows(section(FILES_TABLE))}
    assert written == documented, f"bundle files {sorted(written)}; docs/formats.md lists {sorted(documented)}"


def test_every_preprocess_field_is_documented(vit_bundle: tuple[Path, Path]) -> None:
    compare_with_table(PREPROCESS_TABLE, leaves(read_json(vit_bundle[1] / PREPROCESS_NAME)))


def test_every_tokenizer_field_is_documented(vit_bundle: tuple[Path, Path]) -> None:
    doc = read_json(vit_bundle[1] / TOKENIZER_NAME)  # hf_tokenizer: the `tokenizers` library's own format
    compare_with_table(TOKENIZER_TABLE, {key: value for key, value in doc.items()})


def test_the_documented_tokenizing_recipe_gives_the_runtime_ids(vit_bundle: tuple[Path, Path]) -> None:
    """The steps under the `tokenizer.json` table, done with the `tokenizers` library: the ids the runtime gives."""
    from tokenizers import Tokenizer as HFTokenizer

    raw = (vit_bundle[1] / TOKENIZER_NAME).read_text(encoding="utf-8")
    doc = json.loads(raw)
    length, eot = doc["context_length"], doc["vocab_size"] - 1
    hf = HFTokenizer.from_str(json.dumps(doc["hf_tokenizer"]))
    hf.encode_special_tokens = True
    captions = ["A  photo of &amp; a DOG", "the literal <end_of_text> inside", " ".join(["red circle"] * 60), ""]
    rows = []
    for caption in captions:
        ids = hf.encode(clean_caption(caption)).ids  # the post-processor adds the start and end tokens
        if len(ids) > length:
            ids = ids[:length - 1] + [eot]
        rows.append(ids + [0] * (length - len(ids)))
    assert rows[0][0] == hf.token_to_id(doc["sot_token"]) == doc["vocab_size"] - 2
    assert hf.token_to_id(doc["eot_token"]) == eot and rows[2][-1] == eot and rows[3][2] == 0
    assert rows == Tokenizer.from_json(raw).encode_batch(captions).tolist()


def onnx_signature(path: Path) -> set[tuple[str, str, str, str, tuple[str, ...]]]:
    """(file, input|output, name, dtype, shape) of each graph input and output: static axes as their size, the
    dynamic batch axis (named `batch` in the graph) as `B`."""
    graph = onnx.load(str(path)).graph
    out = set()
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            tensor = value.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            shape = tuple("B" if dim.dim_param == "batch" else str(dim.dim_value) for dim in tensor.shape.dim)
            out.add((path.name, kind, value.name, dtype, shape))
    return out


def documented_signature(files: set[str], symbols: dict[str, int]) -> set[tuple[str, str, str, str, tuple[str, ...]]]:
    """The ONNX table's rows for `files`, in `onnx_signature`'s terms: each symbol's size from `symbols`."""
    out = set()
    for row in table_rows(section(ONNX_TABLE)):
        file = code(row[0])
        if file not in files:
            continue
        dims = [dim.strip() for dim in code(row[4]).strip("[]").split(",")]
        shape = tuple(dim if dim == "B" else str(symbols.get(dim, dim)) for dim in dims)
        out.add((file, row[1], code(row[2]), row[3], shape))
    return out


@pytest.mark.parametrize("which", ["vit", "rn"])
def test_onnx_inputs_and_outputs_are_documented(which: str, request: pytest.FixtureRequest) -> None:
    version = request.getfixturevalue(f"{which}_bundle")[1]
    info = read_json(version / BUNDLE_MANIFEST_NAME)["info"]
    vision = info["model_config"]["vision"]
    features = vision["width"] if isinstance(vision["layers"], int) else 32 * vision["width"]
    symbols = {"S": info["image_size"], "E": info["embed_dim"], "L": info["context_length"], "F": features}
    onnx_files = {path.name for path in version.glob("*.onnx")}
    assert len(onnx_files) == (3 if which == "vit" else 2)
    written = set().union(*(onnx_signature(version / name) for name in onnx_files))
    documented = documented_signature(onnx_files, symbols)
    assert written == documented, (f"ONNX inputs/outputs not documented: {sorted(written - documented)}; "
                                   f"documented but not written: {sorted(documented - written)}")


# -- the other JSON documents: every key named in its section --------------------------------------------------


def json_keys(doc: Any) -> set[str]:
    """Every object key in a JSON document, at any depth (inside lists too)."""
    if isinstance(doc, dict):
        return set(doc) | set().union(*(json_keys(value) for value in doc.values()))
    if isinstance(doc, list):
        return set().union(*(json_keys(value) for value in doc))
    return set()


def checkpoint_sidecar() -> bytes:
    from clip.formats.checkpoint import META_KEYS, checkpoint_meta_bytes

    checkpoint = {key: 1 for key in META_KEYS}
    checkpoint["data_state"] = {"epoch": 0, "step_in_epoch": 1, "positions": [0]}
    return checkpoint_meta_bytes(checkpoint, b"checkpoint bytes", "step-00000001.pt")


def shard_manifest() -> bytes:
    from clip.formats.manifest import Manifest, ShardEntry

    entry = ShardEntry(name="shard-00000.tar", samples=2, bytes=10, sha256="a" * 64, index="index-00000.json",
                       index_sha256="b" * 64)
    manifest = Manifest.build([entry])
    return json.dumps({**manifest.to_dict(), "published_at": "2026-12-02T04:00:00.000000Z"}).encode()


def shard_pointer() -> bytes:
    from clip.formats.manifest import Pointer

    return Pointer(data_version="c" * 64, published_at="2026-12-02T04:00:00.000000Z").to_bytes()


def shard_index() -> bytes:
    from clip.formats.shard_index import SampleSpan, ShardIndex

    return ShardIndex(shard="shard-00000.tar", bytes=10, sha256="a" * 64,
                      samples=(SampleSpan("000000001", 0, 10, "b" * 64),)).to_bytes()


def search_index() -> bytes:
    from clip.formats.index import IndexHeader, PhotoFile, SkippedFile

    photo = PhotoFile(path="a.jpg", size=1, mtime_ns=2)
    return IndexHeader(bundle_sha256="a" * 64, bundle="models/bundle", model="tiny-vit", embed_dim=4, root="/photos",
                       files=[photo], skipped=[SkippedFile(photo, "broken")], embeddings="embeddings-0.npy",
                       embeddings_sha256="b" * 64).to_bytes()


def search_index_part() -> bytes:
    import io

    import numpy as np

    from clip.formats.index import IndexPart, PhotoFile, SkippedFile, part_bytes

    photo = PhotoFile(path="a.jpg", size=1, mtime_ns=2)
    part = IndexPart("a" * 64, [photo], np.zeros((1, 4), dtype=np.float16), [SkippedFile(photo, "broken")])
    with np.load(io.BytesIO(part_bytes(part))) as arrays:
        return arrays["meta"].tobytes()


def results_table() -> bytes:
    from clip.formats.results import ResultRow, ResultsTable

    return ResultsTable(rows=(ResultRow(dataset="cifar10", task="zeroshot", metric="accuracy", value=0.5),)).to_json_bytes()


@pytest.mark.parametrize(("heading", "write"), [
    ("## Checkpoints", checkpoint_sidecar),
    ("## Training shards, manifest and data versions", shard_manifest),
    ("## Training shards, manifest and data versions", shard_pointer),
    ("## Training shards, manifest and data versions", shard_index),
    ("## Search index", search_index),
    ("## Search index", search_index_part),
    ("## Evaluation results", results_table),
], ids=["checkpoint-sidecar", "shard-manifest", "latest-pointer", "shard-index", "search-index", "index-part",
        "results"])  # fmt: skip
def test_every_key_of_the_other_documents_is_named(heading: str, write: Any) -> None:
    text = section(heading)
    named = set(re.findall(r'`([^`]+)`', text)) | set(re.findall(r'"([^"]+)"', text))
    named |= {word for quoted in re.findall(r"`([^`]+)`", text) for word in re.findall(r"[A-Za-z_0-9]+", quoted)}
    missing = sorted(json_keys(json.loads(write())) - named)
    assert not missing, f"docs/formats.md {heading}: keys written but never named: {missing}"


# -- the helpers themselves ------------------------------------------------------------------------------------


def test_the_table_reader_sees_a_missing_and_a_stale_row() -> None:
    """The checks above can fail: a table without a written key, or with one no longer written, is caught."""
    doc = "## A\n### `t.json`\n| field | type | meaning |\n|---|---|---|\n| `a.b` | int | x |\n| `c` | str | `\"v\"` |\n"
    table = {code(row[0]): row for row in table_rows(section("### `t.json`", doc))}
    assert set(table) == {"a.b", "c"} and stated_literal(table["c"][2]) == (True, "v")
    written = leaves({"a": {"b": 1, "d": 2}})
    assert set(written) - set(table) == {"a.d"} and set(table) - set(written) == {"c"}
    assert leaves({"files": {"x.onnx": {"bytes": 1}}}, maps=("files",)) == {"files.<name>.bytes": 1}
