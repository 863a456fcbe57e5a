"""Robustness to natural distribution shift (clip.evalsets.imagenet_shifts, clip.eval.robustness): the five shift
sets read from tiny fixtures in each release's layout (tests/support/evalsets.py), the class subsets and
ObjectNet's mapping against hand-computed ImageNet indices, zero-shot restricted to the subset on a toy encoder
whose answers are known, effective robustness against hand-computed figures, and the evaluate stage end to end
on a tiny real checkpoint.

The toy encoder stands in for a real model where the test needs known embeddings (and where ImageNetV2/Sketch
zero-shot over all 1000 classes x 80 templates would take the tiny model minutes on CPU); the end-to-end test uses
the sets whose subsets are small, so the real model prompts only a handful of classes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip.eval import robustness
from clip.eval.features import extract
from clip.evalsets import get_dataset, list_datasets, list_shift_datasets
from clip.formats.errors import FormatError
from clip.formats.results import ResultRow, ResultsTable
from tests.support import evalsets

WRITERS = {"imagenetv2": evalsets.write_imagenetv2, "imagenet_sketch": evalsets.write_imagenet_sketch,
           "imagenet_r": evalsets.write_imagenet_r, "imagenet_a": evalsets.write_imagenet_a,
           "objectnet": evalsets.write_objectnet}


class GreyLevelEncoder:
    """A real encoder (the evaluator's three-method contract) whose embeddings are known: an image embeds to
    `images[level]`, `level` the median grey level of its pixels (the nearest listed one: JPEG blurs a little);
    a prompt embeds to the one-hot axis of the class name it contains (`axes`), or to zeros."""

    name = "toy-grey"
    fingerprint = "toy-grey-v1"
    logit_scale = 100.0
    image_size = 8

    def __init__(self, images: dict[int, list[float]], axes: dict[str, int]) -> None:
        self.images, self.axes = images, axes
        self.prompts = 0

    def preprocess(self, images):
        levels = []
        for im in images:
            levels.append([float(np.median(np.asarray(im.convert("L"))))])
        return np.asarray(levels, dtype=np.float32)

    def forward_pixels(self, pixels):
        known = sorted(self.images)
        out = np.asarray([self.images[min(known, key=lambda v: abs(v - p[0]))] for p in pixels], dtype=np.float32)
        return out, out

    def encode_texts(self, texts):
        self.prompts += len(texts)
        out = np.zeros((len(texts), len(next(iter(self.images.values())))), dtype=np.float32)
        for i, text in enumerate(texts):
            for name, axis in self.axes.items():
                if name in text:
                    out[i, axis] = 1.0
        return out


def _names(shift_set) -> list:
    return [tuple(shift_set.classes[i] for i in label) if isinstance(label, tuple) else shift_set.classes[label]
            for label in shift_set.labels]


def test_registry_has_the_five_shift_sets_beside_the_27() -> None:
    assert len(list_datasets()) == 27 and not set(list_datasets()) & set(list_shift_datasets())
    assert list_shift_datasets() == ["imagenetv2", "imagenet_sketch", "imagenet_r", "imagenet_a", "objectnet"]
    imagenet = get_dataset("imagenet")
    counts = {"imagenetv2": 1000, "imagenet_sketch": 1000, "imagenet_r": 200, "imagenet_a": 200, "objectnet": 113}
    for key, count in counts.items():
        entry = get_dataset(key)
        assert entry.num_classes == count and entry.splits == ("test",) and entry.metric == "accuracy"
        assert entry.classes == imagenet.classes and entry.class_ids == imagenet.class_ids
        assert entry.templates == imagenet.templates and len(entry.templates) == 80
    assert get_dataset("imagenetv2").subdir == "imagenetv2-matched-frequency-format-val"
    assert [get_dataset(k).subdir for k in ("imagenet_sketch", "imagenet_r", "imagenet_a", "objectnet")] == [
        "sketch", "imagenet-r", "imagenet-a", "objectnet-1.0"]


@pytest.mark.parametrize("key", sorted(WRITERS))
def test_shift_set_reads_its_release_layout(tmp_path: Path, key: str) -> None:
    expected = WRITERS[key](tmp_path)
    entry = get_dataset(key)
    assert entry.available(tmp_path)
    shift_set = entry.load(tmp_path, "test")
    assert shift_set.imagenet_indices == expected["imagenet_indices"]
    assert shift_set.classes == [entry.classes[i] for i in expected["imagenet_indices"]]
    assert sorted(_names(shift_set)) == sorted(expected["test"])
    images = list(shift_set)
    assert len(images) == len(expected["test"]) and shift_set.skipped == 0
    assert shift_set.templates == list(entry.templates)


def test_subsets_and_objectnet_mapping_against_hand_computed_indices(tmp_path: Path) -> None:
    """ImageNet-R's subset is its folders' wnids in ImageNet order: goldfish 1, hammerhead shark 4, ostrich 9.
    ObjectNet's is the union of its mapping: analog clock 409, digital clock 530, park bench 703, banana 954;
    an Alarm clock image may be either clock, and the Air freshener folder (no ImageNet class) is left out."""
    evalsets.write_imagenet_r(tmp_path)
    r = get_dataset("imagenet_r").load(tmp_path)
    assert r.imagenet_indices == [1, 4, 9]
    assert r.classes == ["goldfish", "hammerhead shark", "ostrich"]
    assert sorted(r.labels) == [0, 0, 0, 1, 2] and r.partial == "3 of the release's 200 class folders"
    evalsets.write_objectnet(tmp_path)
    objectnet = get_dataset("objectnet").load(tmp_path)
    assert objectnet.imagenet_indices == [409, 530, 703, 954]
    assert objectnet.classes == ["analog clock", "digital clock", "park bench", "banana"]
    by_folder = {Path(i).parent.name: label for i, label in zip(objectnet.ids, objectnet.labels, strict=True)}
    assert by_folder == {"alarm_clock": (0, 1), "banana": (3,), "bench": (2,)}
    assert len(objectnet) == 4 and "air_freshener" not in by_folder


def test_objectnet_images_lose_their_red_border(tmp_path: Path) -> None:
    evalsets.write_objectnet(tmp_path)
    for image, _ in get_dataset("objectnet").load(tmp_path):
        pixels = np.asarray(image)
        assert image.size == (8, 8) and not ((pixels[..., 0] == 255) & (pixels[..., 1] == 0)).any()


def test_objectnet_ids_counted_from_one_give_the_same_mapping(tmp_path: Path) -> None:
    evalsets.write_objectnet(tmp_path / "zero")
    evalsets.write_objectnet(tmp_path / "one", first_id=1)
    zero = get_dataset("objectnet").load(tmp_path / "zero")
    one = get_dataset("objectnet").load(tmp_path / "one")
    assert one.imagenet_indices == zero.imagenet_indices and one.labels == zero.labels


def test_planted_errors_in_the_mappings_are_named(tmp_path: Path) -> None:
    evalsets.write_objectnet(tmp_path)
    mappings = tmp_path / "objectnet-1.0" / "mappings"
    to_imagenet = mappings / "objectnet_to_imagenet_1k.json"
    good = to_imagenet.read_text()
    to_imagenet.write_text(json.dumps({"Banana": "bananna, n07753592"}))
    with pytest.raises(FormatError, match=r"objectnet_to_imagenet_1k.json.*'bananna, n07753592'.*imagenet_to_label"):
        get_dataset("objectnet").load(tmp_path)
    to_imagenet.write_text(good)
    ids = mappings / "pytorch_to_imagenet_2012_id.json"
    twice = {str(i): 0 if i < 2 else evalsets.objectnet_line(i) for i in range(1000)}  # two classes, one id
    ids.write_text(json.dumps(twice))
    with pytest.raises(FormatError, match="pytorch_to_imagenet_2012_id.json: .*not a one-to-one"):
        get_dataset("objectnet").load(tmp_path)
    evalsets.write_imagenet_r(tmp_path)
    evalsets.image(tmp_path / "imagenet-r" / "n99999999" / "x.jpg", fmt="JPEG")
    with pytest.raises(FormatError, match=r"imagenet-r/n99999999: folder 'n99999999' is not one of ImageNet"):
        get_dataset("imagenet_r").load(tmp_path)
    (tmp_path / "imagenetv2-matched-frequency-format-val" / "1000").mkdir(parents=True)
    with pytest.raises(FormatError, match=r"1000: ImageNetV2's class folders are ImageNet class indices 0..999"):
        get_dataset("imagenetv2").load(tmp_path)


def _score(shift_set, encoder: GreyLevelEncoder):
    classifier = robustness.ImageNetClassifier(encoder)
    return robustness.score_shift_set(shift_set, extract(encoder, shift_set, workers=1), classifier,
                                      encoder.logit_scale)


def test_zeroshot_is_restricted_to_the_subset_hand_computed(tmp_path: Path) -> None:
    """Axes: goldfish, hammerhead shark, ostrich, tench. Images 100 and 160 lie closest to tench, which is not an
    ImageNet-R class: restricted to the subset they are right; image 140 is a planted model error (closer to
    hammerhead shark). Top-1 4/5, top-5 5/5 (three classes)."""
    evalsets.write_imagenet_r(tmp_path)
    encoder = GreyLevelEncoder(
        images={100: [1, 0, 0, 3], 120: [1, 0, 0, 0], 140: [0.2, 0.6, 0, 0], 160: [0, 1, 0, 3], 180: [0, 0.3, 1, 0]},
        axes={"goldfish": 0, "hammerhead shark": 1, "ostrich": 2, "tench": 3})
    scored = _score(get_dataset("imagenet_r").load(tmp_path), encoder)
    assert scored.accuracy == pytest.approx(0.8) and scored.top5 == 1.0 and scored.classes == 3
    assert sorted(scored.predictions.tolist()) == [1, 1, 4, 4, 9]  # ImageNet indices
    assert encoder.prompts == 3 * 80  # the subset's classes only, each with ImageNet's 80 templates


def test_objectnet_counts_any_mapped_class_as_right_hand_computed(tmp_path: Path) -> None:
    """Alarm clock images predicted as digital clock and as analog clock are both right; the banana image is a
    planted error (closest to park bench); the bench image is right: 3/4."""
    evalsets.write_objectnet(tmp_path)
    encoder = GreyLevelEncoder(
        images={30: [0, 1, 0, 0], 50: [1, 0, 0, 0], 70: [0, 0, 1, 0.5], 90: [0, 0, 1, 0]},
        axes={"analog clock": 0, "digital clock": 1, "park bench": 2, "banana": 3})
    scored = _score(get_dataset("objectnet").load(tmp_path), encoder)
    assert scored.accuracy == pytest.approx(0.75) and scored.classes == 4
    assert sorted(scored.predictions.tolist()) == [409, 530, 703, 703]


def test_classifier_rows_are_the_subset_computed_directly() -> None:
    from clip.eval.zeroshot import class_embeddings

    encoder = GreyLevelEncoder(images={0: [0, 0, 0, 0]}, axes={"goldfish": 0, "tench": 1, "ostrich": 2, "banana": 3})
    classifier = robustness.ImageNetClassifier(encoder)
    imagenet = get_dataset("imagenet")
    first = classifier.rows([9, 0])
    again = classifier.rows([0, 1, 954])  # 0 is reused, 1 and 954 are added
    assert encoder.prompts == 4 * 80
    direct = class_embeddings(encoder, ["ostrich", "tench", "goldfish", "banana"], imagenet.templates)
    np.testing.assert_allclose(first, direct[:2])
    np.testing.assert_allclose(again, direct[[1, 2, 3]])


def _zs(key: str, value: float, samples: int = 10) -> ResultRow:
    return ResultRow(key, "zeroshot", "accuracy", value, samples)


def test_effective_robustness_hand_computed() -> None:
    """Baseline: logit(b) = logit(anchor_set) + (logit(x) - logit(0.762)). ImageNet 0.5: ImageNet-R's baseline
    sigmoid(logit(0.377) - logit(0.762)) = 0.158961, ImageNetV2's sigmoid(logit(0.643) - logit(0.762)) = 0.360022."""
    assert robustness.baseline_accuracy("imagenetv2", 0.762) == pytest.approx(0.643, abs=1e-12)
    rows = [_zs("imagenet", 0.5, 50), _zs("imagenetv2", 0.4, 20), _zs("imagenet_r", 0.5, 30),
            ResultRow("objectnet", "zeroshot", "accuracy", None, status="skipped", note="no data at x")]
    summary = {(r.dataset, r.task): r for r in robustness.summary_rows(rows)}
    assert set(summary) == {("imagenetv2", "effective_robustness"), ("imagenet_r", "effective_robustness"),
                            ("imagenet_shifts", "shift_mean"), ("imagenet_shifts", "effective_robustness")}
    assert summary["imagenet_r", "effective_robustness"].value == pytest.approx(0.5 - 0.158961, abs=1e-6)
    assert summary["imagenetv2", "effective_robustness"].value == pytest.approx(0.4 - 0.360022, abs=1e-6)
    assert "baseline=0.1590" in summary["imagenet_r", "effective_robustness"].details
    assert "approximate" in summary["imagenet_r", "effective_robustness"].details
    mean = summary["imagenet_shifts", "shift_mean"]
    assert mean.value == pytest.approx(0.45) and mean.samples == 50 and "2 of 5" in mean.details
    assert summary["imagenet_shifts", "effective_robustness"].value == pytest.approx(
        0.45 - (0.158961 + 0.360022) / 2, abs=1e-6)
    table = ResultsTable(rows=tuple(rows) + tuple(summary.values()))
    assert table.mean == pytest.approx((0.5 + 0.4 + 0.5) / 3)  # summary rows restate or compare: not in the mean
    assert math.isclose(robustness.baseline_accuracy("imagenet_a", 0.0), 0.0, abs_tol=1e-4)  # 0 has no logit


def test_without_imagenet_effective_robustness_is_skipped_with_the_reason() -> None:
    rows = [_zs("imagenet_a", 0.25, 4)]
    summary = {(r.dataset, r.task): r for r in robustness.summary_rows(rows)}
    gap = summary["imagenet_a", "effective_robustness"]
    assert gap.status == "skipped" and "imagenet is not in evaluate.datasets" in gap.note
    assert summary["imagenet_shifts", "shift_mean"].value == 0.25
    assert summary["imagenet_shifts", "effective_robustness"].status == "skipped"
    assert robustness.summary_rows([_zs("cifar10", 0.9)]) == []


def test_report_draws_the_shift_figure(tmp_path: Path) -> None:
    from clip.eval.report import write_report

    rows = [_zs("imagenet", 0.3), _zs("imagenet_r", 0.2), _zs("objectnet", 0.1)]
    table = ResultsTable(rows=tuple(rows + robustness.summary_rows(rows)))
    outputs = write_report(str(tmp_path), table, [])
    with Image.open(outputs["shift.png"]) as figure:
        assert figure.size[0] > 600
    assert "effective_robustness" in (tmp_path / "results.md").read_text()
    assert "shift.png" not in write_report(str(tmp_path / "none"), ResultsTable(rows=(_zs("cifar10", 0.5),)), [])


def test_decontamination_covers_the_shift_sets() -> None:
    from clip.dedup.decontam import registry_keys

    assert registry_keys(["imagenet_r", "cifar10", "synthetic-colors", "objectnet"]) == [
        "imagenet_r", "cifar10", "objectnet"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from clip.model import create_model
    from clip.tokenizer import Tokenizer
    from tests.support.bundles import CAPTIONS
    from tests.test_eval_stage import save_checkpoint

    torch.manual_seed(0)
    tokenizer = Tokenizer.train(CAPTIONS * 4, vocab_size=700, min_frequency=1)
    model = create_model("tiny-vit", vocab_size=tokenizer.vocab_size).eval()
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("run"))


def test_stage_scores_shift_sets_and_lists_absent_ones(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """The tiny real checkpoint through the evaluate stage, features cached, twice: ImageNet-R, -A and ObjectNet
    are scored (only their few classes are prompted), ImageNetV2, Sketch and ImageNet are absent and listed as
    skipped with the path looked for, so effective robustness is skipped with the reason."""
    from clip.config import ComputeConfig, EvaluateConfig, StorageConfig
    from clip.eval import stage

    data = tmp_path / "data"
    for key in ("imagenet_r", "imagenet_a", "objectnet"):
        WRITERS[key](data)
    cfg = EvaluateConfig(checkpoint=str(tiny_checkpoint), output_dir=str(tmp_path / "eval"), data_root=str(data),
                         datasets=["imagenet", *list_shift_datasets()], batch_size=8, workers=2,
                         cache_dir=str(tmp_path / "cache"))
    results = [stage.run(cfg.model_copy(update={"plots": plots}), storage=StorageConfig(),
                         compute=ComputeConfig(device="cpu")) for plots in (False, True)]
    assert results[0].table == results[1].table  # the second read the cached features (ObjectNet's label sets too)
    result = results[1]
    rows = {(r.dataset, r.task): r for r in result.table.rows}
    for key, samples in (("imagenet_r", 5), ("imagenet_a", 3), ("objectnet", 4)):
        row = rows[key, "zeroshot"]
        assert row.status == "ok" and row.samples == samples and 0 <= row.value <= 1 and "classes=" in row.details
        assert rows[key, "effective_robustness"].status == "skipped"
        assert "imagenet skipped" in rows[key, "effective_robustness"].note
        assert (key, "linear_probe") not in rows  # shift sets have no train split: zero-shot only
    assert "partial copy: 3 of the release's 200 class folders" in rows["imagenet_r", "zeroshot"].details
    for key in ("imagenetv2", "imagenet_sketch", "imagenet"):
        assert rows[key, "zeroshot"].status == "skipped"
        assert str(data / get_dataset(key).subdir) in rows[key, "zeroshot"].note
    mean = rows["imagenet_shifts", "shift_mean"]
    scored = [rows[k, "zeroshot"].value for k in ("imagenet_r", "imagenet_a", "objectnet")]
    assert mean.value == pytest.approx(np.mean(scored)) and "3 of 5" in mean.details
    assert result.metrics["imagenet_shifts/shift_mean"] == pytest.approx(np.mean(scored))
    assert result.metrics["datasets_evaluated"] == 3 and result.metrics["datasets_skipped"] == 3
    assert "shift.png" in result.outputs and Path(result.outputs["shift.png"]).stat().st_size > 0
