"""Photo search with the shipped model (clip.runtime.index, clip.formats.index, `clip-pipeline index` / `search`,
the pyfunc model's search): real bundles (tests/support/bundles.py: random weights, so ranking is checked with
known vectors and against the bundle's own embeddings), real photo files, real subprocesses.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clip.formats.errors import FormatError
from clip.formats.index import (
    INDEX_NAME,
    PARTS_DIR,
    IndexHeader,
    PhotoFile,
    bundle_sha256,
    list_parts,
    write_index,
)
from clip.runtime import Bundle, load_image
from clip.runtime.index import FAIL_AFTER_PARTS_ENV, SearchIndex, build_index, exact_top_k
from tests.support.bundles import BLOCK_TORCH, make_bundle
from tests.support.images import random_scene

REPO = Path(__file__).resolve().parents[1]
GOOD = ["a.jpg", "b.png", "c.jpg", "d.png", "nested/e.jpg", "nested/f.png", "nested/deeper/g.jpg"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_bundle(tmp_path_factory.mktemp("search") / "bundle")


@pytest.fixture(scope="module")
def bundle(bundle_dir: str) -> Bundle:
    return Bundle.load(bundle_dir)


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Another model (other random weights): another bundle sha256."""
    return Bundle.load(make_bundle(tmp_path_factory.mktemp("search") / "other", seed=1))


def _photos(folder: Path) -> Path:
    """GOOD (decodable), two undecodable image files, and files that are not photos at all."""
    rng = np.random.default_rng(5)
    for i, name in enumerate(GOOD):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        random_scene(rng, (90 + 9 * i, 70)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    good_png = (folder / "b.png").read_bytes()
    (folder / "nested" / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (folder / "notes.txt").write_text("not a photo")
    (folder / ".hidden.jpg").write_bytes(b"ignored")
    return folder


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`clip-pipeline ARGS` in a fresh process where importing torch raises."""
    code = BLOCK_TORCH + "from pipelines.cli import main\nsys.argv = ['clip-pipeline', *sys.argv[1:]]\nmain()\n"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    full_env.pop("CLIP_PIPELINE_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_index_and_search_commands_without_torch(bundle_dir: str, bundle: Bundle, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "photos.index"
    result = _cli("index", "--bundle", bundle_dir, str(photos), "--out", str(out), "--part-size", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "indexed 7 photos" in result.stdout and "2 undecodable" in result.stdout
    assert "skipped broken.jpg: image broken.jpg cannot be decoded" in result.stderr
    assert "skipped nested/truncated.png" in result.stderr

    index = SearchIndex.open(str(out))
    assert [f.path for f in index.header.files] == sorted(GOOD)
    assert sorted(s.file.path for s in index.header.skipped) == ["broken.jpg", "nested/truncated.png"]
    assert index.header.bundle_sha256 == bundle_sha256(bundle.manifest)
    assert index.embeddings.dtype == np.float16 and list_parts(str(out)) == []
    expected = bundle.encode_images([load_image(photos / p) for p in sorted(GOOD)], normalize=True)
    np.testing.assert_allclose(np.asarray(index.embeddings, np.float32), expected, atol=2e-3)

    # Text search: the bundle's own ranking of the same photos (Bundle.rank), top 4, scores to float16 precision.
    ranked = bundle.rank([load_image(photos / p) for p in sorted(GOOD)], "a red circle")
    result = _cli("search", str(out), "a red circle", "--top", "4", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    hits = json.loads(result.stdout)["hits"]
    assert [h["file"] for h in hits] == [str(photos / sorted(GOOD)[i]) for i, _ in ranked[:4]]
    np.testing.assert_allclose([h["score"] for h in hits], [s for _, s in ranked[:4]], atol=2e-3)

    # Image-to-image: a photo finds itself first.
    result = _cli("search", str(out), "--image", str(photos / "c.jpg"), "--top", "2", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads(result.stdout)["hits"][0]
    assert first["file"] == str(photos / "c.jpg") and first["score"] == pytest.approx(1.0, abs=2e-3)


def test_an_index_is_refused_with_another_bundle(bundle: Bundle, other_bundle: Bundle, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos")
    out = str(tmp_path / "photos.index")
    build_index(bundle, photos, out)
    other = other_bundle
    ours, theirs = bundle_sha256(bundle.manifest), bundle_sha256(other.manifest)
    assert ours != theirs
    index = SearchIndex.open(out)
    with pytest.raises(FormatError, match=f"built with bundle sha256 {ours}.*sha256 {theirs}"):
        index.search_text(other, "a red circle")
    with pytest.raises(FormatError, match=f"built with bundle sha256 {ours}.*sha256 {theirs}"):
        build_index(other, photos, out)  # nor added to
    result = _cli("search", out, "a dog", "--bundle", other.folder, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert line.startswith("error: search: FormatError") and ours in line and theirs in line


def test_exact_search_ranks_known_vectors(tmp_path: Path) -> None:
    vectors = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0.8, 0.6, 0], [0, 0, 1], [0.6, 0.8, 0]], np.float16)
    files = [PhotoFile(f"p{i}.jpg", 1, 1) for i in range(len(vectors))]
    header = IndexHeader(bundle_sha256="0" * 64, bundle="b", model="m", embed_dim=3, root=str(tmp_path),
                         files=files, skipped=[], embeddings="", embeddings_sha256="")
    write_index(str(tmp_path / "idx"), header, vectors)
    index = SearchIndex.open(str(tmp_path / "idx"))
    hits = index.search_vectors(np.array([0.8, 0.6, 0.0]), top=4, chunk_rows=2)[0]  # merges across 3 chunks
    assert [Path(h.file).name for h in hits] == ["p3.jpg", "p1.jpg", "p5.jpg", "p0.jpg"]  # p1, p5 tie: file order
    np.testing.assert_allclose([h.score for h in hits], [1.0, 0.96, 0.96, 0.8], atol=1e-3)

    # Ties are broken by file order whatever the chunking: 400 identical vectors, the best 250 are rows 0-249.
    same = np.tile(np.array([[0.6, 0.8]], np.float16), (400, 1))
    for chunk_rows in (1, 7, 64, 1000):
        rows, _ = exact_top_k(same, np.array([0.6, 0.8]), 250, chunk_rows=chunk_rows)
        assert rows.tolist() == [list(range(250))]

    # Chunked top-k = brute force, many queries at once, on random unit vectors.
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(1000, 16)).astype(np.float16)
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    rows, scores = exact_top_k(embeddings, queries, 7, chunk_rows=64)
    full = queries @ embeddings.astype(np.float32).T
    np.testing.assert_array_equal(rows, np.argsort(-full, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :7], rtol=1e-6)


def test_interrupted_index_resumes_without_reembedding(bundle: Bundle, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    photos = _photos(tmp_path / "photos")
    out = str(tmp_path / "photos.index")
    monkeypatch.setenv(FAIL_AFTER_PARTS_ENV, "1")
    with pytest.raises(RuntimeError, match=f"{FAIL_AFTER_PARTS_ENV}=1: stopped after 1 parts"):
        build_index(bundle, photos, out, part_size=4, batch_size=3)
    parts = list_parts(out)
    assert len(parts) == 1 and not (tmp_path / "photos.index" / INDEX_NAME).exists()
    monkeypatch.delenv(FAIL_AFTER_PARTS_ENV)

    encoded: list[int] = []  # images each encoder call received: the real encoder, counted
    counting = Bundle.load(bundle.folder)
    counting.encode_images = lambda images, **kw: (  # type: ignore[method-assign]
        encoded.append(len(images)), Bundle.encode_images(counting, images, **kw))[1]
    resumed = build_index(counting, photos, out, part_size=4, batch_size=3)
    # By path, part 0 held a.jpg, b.png, broken.jpg, c.jpg; left: d, g, e, f (decodable) and truncated.png.
    assert resumed.reused == 4 and sum(encoded) == 4
    assert resumed.embedded == 4 and resumed.parts_written == 2
    assert list_parts(out) == [] and not (tmp_path / "photos.index" / PARTS_DIR).exists()

    fresh = build_index(bundle, photos, str(tmp_path / "fresh.index"))
    assert resumed.index.files == fresh.index.files and resumed.index.skipped == fresh.index.skipped
    assert resumed.index.embeddings_sha256 == fresh.index.embeddings_sha256  # the same bytes as one run

    # A rerun embeds nothing; a new photo alone is embedded; a removed one leaves the index.
    encoded.clear()
    assert build_index(counting, photos, out).embedded == 0 and encoded == []
    random_scene(np.random.default_rng(9), (60, 60)).save(photos / "new.png")
    (photos / "a.jpg").unlink()
    again = build_index(counting, photos, out)
    assert sum(encoded) == 1 and again.embedded == 1
    assert [f.path for f in again.index.files] == sorted(set(GOOD) - {"a.jpg"} | {"new.png"})


def test_pyfunc_searches_an_index(bundle_dir: str, bundle: Bundle, other_bundle: Bundle, tmp_path: Path,
                                  mlflow_store: dict) -> None:
    import mlflow
    import pandas as pd

    from clip.runtime.mlflow_model import log_bundle_model

    photos = _photos(tmp_path / "photos")
    out = str(tmp_path / "photos.index")
    build_index(bundle, photos, out)
    expected = SearchIndex.open(out).search_text(bundle, "a green square", top=3)

    experiment = mlflow.create_experiment("search", artifact_location=mlflow_store["artifact_location"])
    with mlflow.start_run(experiment_id=experiment):
        info = log_bundle_model(bundle_dir, name="clip", include_code=False)
    model = mlflow.pyfunc.load_model(info.model_uri)  # params pass through the logged signature
    frame = model.predict(pd.DataFrame({"text": ["a green square", None]}), params={"index": out, "top": 3})
    assert frame["files"][0] == [h.file for h in expected]
    np.testing.assert_allclose(frame["scores"][0], [h.score for h in expected], atol=1e-6)
    assert not isinstance(frame["files"][1], list)
    by_column = model.predict(pd.DataFrame({"text": ["a green square"], "index": [out]}))
    assert by_column["files"][0][:3] == [h.file for h in expected]
    assert "text_embedding" in model.predict(pd.DataFrame({"text": ["a green square"]})).columns  # unchanged
    image = base64.b64encode((photos / "c.jpg").read_bytes()).decode("ascii")
    by_image = model.predict(pd.DataFrame({"image": [image]}), params={"index": out, "top": 2})
    assert by_image["files"][0][0] == str(photos / "c.jpg")  # image-to-image: finds itself first

    other_index = str(tmp_path / "other.index")
    build_index(other_bundle, photos, other_index)
    with pytest.raises(FormatError, match=bundle_sha256(bundle.manifest)):
        model.predict(pd.DataFrame({"text": ["a dog"]}), params={"index": other_index})


def test_faiss_backend_says_how_to_get_it(tmp_path: Path) -> None:
    try:
        import faiss  # noqa: F401
        pytest.skip("faiss is installed here")
    except ImportError:
        pass
    header = IndexHeader(bundle_sha256="0" * 64, bundle="b", model="m", embed_dim=2, root=str(tmp_path),
                         files=[PhotoFile("a.jpg", 1, 1)], skipped=[], embeddings="", embeddings_sha256="")
    write_index(str(tmp_path / "idx"), header, np.array([[1, 0]], np.float16))
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        SearchIndex.open(str(tmp_path / "idx")).search_vectors(np.array([1.0, 0.0]), backend="faiss")


def test_index_on_s3_resumes_and_searches(bundle: Bundle, tmp_path: Path, s3_bucket: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    photos = _photos(tmp_path / "photos")
    out = f"s3://{s3_bucket}/photos.index"
    monkeypatch.setenv(FAIL_AFTER_PARTS_ENV, "1")
    with pytest.raises(RuntimeError):
        build_index(bundle, photos, out, part_size=5)
    assert len(list_parts(out)) == 1
    monkeypatch.delenv(FAIL_AFTER_PARTS_ENV)
    built = build_index(bundle, photos, out, part_size=5)
    assert built.reused == 5 and built.index.count == len(GOOD) and list_parts(out) == []
    local = build_index(bundle, photos, str(tmp_path / "local.index"))
    assert built.index.embeddings_sha256 == local.index.embeddings_sha256
    hits = SearchIndex.open(out).search_text(bundle, "a blue triangle", top=3)
    assert hits == SearchIndex.open(str(tmp_path / "local.index")).search_text(bundle, "a blue triangle", top=3)
