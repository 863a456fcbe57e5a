"""Evaluation data and predict inputs that are hostile or broken (issue 21 items 1, 5, 9, 10c).

- A CIFAR folder whose pickles name a callable (os.system, builtins.exec) is refused by name, nothing runs, through
  the loader and through `clip-pipeline evaluate`; files in the real release's pickle format still load.
- Images and labels that do not pair up (MNIST 50 images / 30 labels, a CIFAR batch) or a label outside the class
  range are refused naming the file and the counts, never scored on the shorter list.
- One broken dataset is a `failed` row; the others are scored and written, and the run fails at the end.
- `clip-pipeline predict` shows the top labels per image; `--json` is one document with the same numbers.
All on real files: fake CIFAR/MNIST in their release formats (tests/support/evalsets.py) and a real export bundle
(tests/support/bundles.py).
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clip.config import ComputeConfig, EvaluateConfig, StorageConfig
from clip.eval import stage
from clip.evalsets import get_dataset
from clip.formats.errors import FormatError
from clip.formats.results import RESULTS_JSON, ResultsTable
from clip.runtime import Bundle, load_image
from tests.support import evalsets
from tests.support.bundles import make_bundle
from tests.support.images import random_scene

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = "cifar-10-batches-py"


class _RunsCommand:
    """Pickles as a call of `function(argument)`: what a crafted file would make pickle.load execute."""

    def __init__(self, function, argument: str):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


def _plant(path: Path, marker: Path, via: str) -> None:
    """Replace `path` with a pickle that, when loaded by plain pickle, creates `marker`."""
    if via == "os.system":
        payload = _RunsCommand(os.system, f"touch {marker}")
    else:
        payload = _RunsCommand(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    path.write_bytes(pickle.dumps({"label_names": payload, "labels": payload, "data": payload}))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_bundle(tmp_path_factory.mktemp("hostile") / "bundle")


# -- item 1: no code from an evaluation folder --------------------------------------------------------------------


@pytest.mark.parametrize("via", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("name", ["batches.meta", "test_batch"])
def test_cifar_pickle_naming_a_callable_is_refused_and_nothing_runs(tmp_path: Path, name: str, via: str) -> None:
    evalsets.write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    _plant(tmp_path / CIFAR10 / name, marker, via)
    with pytest.raises(FormatError) as refused:
        get_dataset("cifar10").load(tmp_path, "test")
    assert not marker.exists()
    message = str(refused.value)
    assert str(tmp_path / CIFAR10 / name) in message
    assert ("posix.system" if via == "os.system" else "builtins.exec") in message  # the refused global, by name


def test_dedup_decontamination_reads_cifar_through_the_same_guard(tmp_path: Path) -> None:
    from clip.dedup.decontam import hash_registry_dataset

    evalsets.write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    _plant(tmp_path / CIFAR10 / "data_batch_3", marker, "os.system")  # a train split: dedup reads every split
    with pytest.raises(FormatError, match="data_batch_3: refused to load global posix.system"):
        hash_registry_dataset("cifar10", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_in_the_release_pickle_format_still_loads(tmp_path: Path, protocol: int) -> None:
    """The release's pickles (dicts of numpy arrays, lists, strings, bytes), at every protocol; at protocol 0/2 the
    globals are respelled `numpy.core.*`, as numpy 1 (which wrote the real release) names them."""
    expected = evalsets.write_cifar10(tmp_path)
    for path in (tmp_path / CIFAR10).iterdir():
        raw = pickle.dumps(pickle.loads(path.read_bytes()), protocol=protocol)
        path.write_bytes(raw.replace(b"numpy._core.", b"numpy.core.") if protocol <= 2 else raw)
    cifar100 = list(get_dataset("cifar100").classes)
    expected100 = evalsets.write_cifar100(tmp_path, cifar100)
    for split in ("train", "test"):
        loaded = get_dataset("cifar10").load(tmp_path, split)
        assert [loaded.classes[y] for y in loaded.labels] == expected[split]
        assert np.asarray(loaded.image(0)).shape == (32, 32, 3)
        loaded100 = get_dataset("cifar100").load(tmp_path, split)
        assert [cifar100[y] for y in loaded100.labels] == expected100[split]


def _run_cli(tmp_path: Path, bundle: str, *args: str) -> subprocess.CompletedProcess[str]:
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"evaluate": {"bundle": bundle, "output_dir": str(tmp_path / "eval"),
                                               "cache_dir": None, "linear_probe": False, "plots": False,
                                               "batch_size": 8, "workers": 1},
                                  "tracking": {"enabled": False}}))
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args, "--params", str(params)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})


def test_evaluate_cli_refuses_a_crafted_cifar_and_scores_the_rest(tmp_path: Path, bundle_dir: str) -> None:
    root = tmp_path / "data"
    evalsets.write_cifar10(root)
    evalsets.write_mnist(root)
    marker = tmp_path / "pwned"
    _plant(root / CIFAR10 / "batches.meta", marker, "os.system")
    done = _run_cli(tmp_path, bundle_dir, "evaluate", "--datasets", "cifar10,mnist", "--root", str(root))
    assert not marker.exists()
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    error = next(line for line in done.stderr.splitlines() if line.startswith("error: evaluate"))
    assert "cifar10" in error and str(root / CIFAR10 / "batches.meta") in error and "posix.system" in error
    rows = {r.dataset: r for r in ResultsTable.from_json_bytes((tmp_path / "eval" / RESULTS_JSON).read_bytes()).rows}
    assert rows["mnist"].status == "ok" and rows["mnist"].samples == 2
    assert rows["cifar10"].status == "failed" and "posix.system" in rows["cifar10"].note
    metrics = json.loads((tmp_path / "reports" / "metrics" / "evaluate.json").read_text())
    assert metrics["datasets_failed"] == 1 and metrics["datasets_evaluated"] == 1


# -- item 5: images and labels must pair up ------------------------------------------------------------------------


def test_mnist_with_more_images_than_labels_is_refused(tmp_path: Path) -> None:
    evalsets.write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    evalsets._idx(raw / "t10k-images-idx3-ubyte", 2051, np.full((50, 28, 28), 200, dtype=np.uint8))
    evalsets._idx(raw / "t10k-labels-idx1-ubyte", 2049, np.arange(30, dtype=np.uint8) % 10)
    with pytest.raises(FormatError) as refused:
        get_dataset("mnist").load(tmp_path, "test")
    message = str(refused.value)
    assert "30 labels for 50 images" in message
    assert str(raw / "t10k-labels-idx1-ubyte") in message and str(raw / "t10k-images-idx3-ubyte") in message


def _rewrite_test_batch(root: Path, labels: list[int], images: int) -> Path:
    path = root / CIFAR10 / "test_batch"
    data = np.zeros((images, 3072), dtype=np.uint8)
    path.write_bytes(pickle.dumps({"data": data, "labels": labels, "batch_label": b"testing batch 1 of 1"}))
    return path


def test_cifar_batch_with_fewer_labels_than_images_is_refused(tmp_path: Path) -> None:
    evalsets.write_cifar10(tmp_path)
    path = _rewrite_test_batch(tmp_path, [1, 2], images=3)
    with pytest.raises(FormatError, match=f"{path}: 2 labels for 3 images"):
        get_dataset("cifar10").load(tmp_path, "test")


@pytest.mark.parametrize("label", [10, -1])
def test_cifar_label_outside_the_class_range_is_refused(tmp_path: Path, label: int) -> None:
    evalsets.write_cifar10(tmp_path)
    path = _rewrite_test_batch(tmp_path, [3, label], images=2)  # -1 would silently index the last class
    with pytest.raises(FormatError, match=f"{path}: label {label} outside 0..9"):
        get_dataset("cifar10").load(tmp_path, "test")


def test_mnist_label_outside_the_class_range_is_refused(tmp_path: Path) -> None:
    evalsets.write_mnist(tmp_path)
    labels = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    evalsets._idx(labels, 2049, np.array([7, 12], dtype=np.uint8))
    with pytest.raises(FormatError, match=f"{labels}: label 12 outside 0..9"):
        get_dataset("mnist").load(tmp_path, "test")


# -- item 10c: one broken dataset fails alone ---------------------------------------------------------------------


def test_broken_dataset_is_a_failed_row_and_the_others_are_written(tmp_path: Path, bundle_dir: str) -> None:
    root = tmp_path / "data"
    evalsets.write_cifar10(root)
    evalsets.write_mnist(root)
    truncated = root / CIFAR10 / "test_batch"
    truncated.write_bytes(truncated.read_bytes()[:200])  # a half-written copy
    cfg = EvaluateConfig(bundle=bundle_dir, output_dir=str(tmp_path / "eval"), data_root=str(root),
                         datasets=["cifar10", "mnist"], linear_probe=False, cache_dir=None, plots=False,
                         batch_size=8, workers=1)
    with pytest.raises(stage.DatasetsFailedError, match="cifar10") as failed:
        stage.run(cfg, storage=StorageConfig(), compute=ComputeConfig(device="cpu"))
    written = ResultsTable.from_json_bytes((tmp_path / "eval" / RESULTS_JSON).read_bytes())
    assert written == failed.value.result.table
    rows = {(r.dataset, r.task): r for r in written.rows}
    assert set(rows) == {("cifar10", "zeroshot"), ("mnist", "zeroshot")}
    assert rows["mnist", "zeroshot"].status == "ok" and rows["mnist", "zeroshot"].samples == 2
    assert rows["cifar10", "zeroshot"].status == "failed" and rows["cifar10", "zeroshot"].value is None
    assert str(truncated) in rows["cifar10", "zeroshot"].note
    assert written.mean == rows["mnist", "zeroshot"].value
    assert failed.value.result.metrics["datasets_failed"] == 1
    assert str(tmp_path / "eval" / RESULTS_JSON) in str(failed.value)


# -- item 9: predict with many labels -----------------------------------------------------------------------------

LABELS = [f"{colour} {shape}" for colour in ("red", "green", "blue", "small", "large")
          for shape in ("circle", "square", "triangle", "dog", "cat", "car", "star", "ring")]  # 40 labels


def _predict(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("CLIP_PIPELINE_DEBUG", None)
    return subprocess.run([str(REPO / ".venv" / "bin" / "clip-pipeline"), "predict", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture
def predict_images(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(5)
    random_scene(rng, (64, 48)).save(tmp_path / "first.png")
    random_scene(rng, (40, 70)).convert("RGB").save(tmp_path / "second.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"GIF89a but not really")
    return ["first.png", "broken.jpg", "second.jpg"]


def _expected_top(bundle_dir: str, folder: Path, names: list[str], k: int) -> list[list[tuple[str, float]]]:
    probabilities = Bundle.load(bundle_dir).classify([load_image(folder / n) for n in names], LABELS)
    return [[(LABELS[j], float(row[j])) for j in np.argsort(-row, kind="stable")[:k]] for row in probabilities]


def test_predict_json_gives_the_top_labels_and_the_error_per_image(tmp_path: Path, bundle_dir: str,
                                                                   predict_images: list[str]) -> None:
    done = _predict(tmp_path, "--bundle", bundle_dir, *predict_images, "--labels", ",".join(LABELS),
                    "--top", "3", "--json")
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)  # one document, nothing else on stdout
    assert doc["labels"] == len(LABELS) and doc["top"] == 3
    assert [entry["file"] for entry in doc["images"]] == predict_images
    first, broken, second = doc["images"]
    assert "broken.jpg" in broken["error"] and "top" not in broken
    expected = _expected_top(bundle_dir, tmp_path, ["first.png", "second.jpg"], 3)
    for entry, want in zip((first, second), expected, strict=True):
        assert [label for label, _ in entry["top"]] == [label for label, _ in want]
        np.testing.assert_allclose([p for _, p in entry["top"]], [p for _, p in want], atol=1e-6)


def test_predict_table_shows_the_top_five_per_image(tmp_path: Path, bundle_dir: str,
                                                     predict_images: list[str]) -> None:
    done = _predict(tmp_path, "--bundle", bundle_dir, "first.png", "second.jpg", "--labels", ",".join(LABELS))
    assert done.returncode == 0, done.stderr
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in done.stdout.splitlines()
            if line.count("│") == 5]
    rows = [row for row in rows if row[1].isdigit()]  # body rows: image, rank, label, probability
    expected = _expected_top(bundle_dir, tmp_path, ["first.png", "second.jpg"], 5)
    want = [[name if rank == 0 else "", str(rank + 1), label, f"{p:.4f}"]
            for name, top in zip(("first.png", "second.jpg"), expected, strict=True)
            for rank, (label, p) in enumerate(top)]
    assert rows == want
