"""The torch-free runtime (clip.runtime), `clip-pipeline predict` and the int8 image encoder, on a real bundle.

The bundle is a real export (tests/support/bundles.py: tiny-vit, random weights, torch.onnx.export) run in
onnxruntime; the reference is the PyTorch model it came from, and clip.transforms / clip.tokenizer for the
preprocessing and the token ids. The torch-free claims run in fresh subprocesses where importing torch raises.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip.formats.bundle import IMAGE_ENCODER_NAME, TEXT_ENCODER_NAME, TOKENIZER_NAME, write_bundle
from clip.formats.errors import FormatError, MissingInputError
from clip.runtime import INT8_IMAGE_ENCODER_NAME, Bundle, Preprocessor, load_image
from clip.transforms import describe_transforms, eval_transform
from tests.support.bundles import BLOCK_TORCH, build_bundle
from tests.support.images import random_scene

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / ".venv" / "bin" / "clip-pipeline"
LABELS = ["red circle", "green square", "blue triangle"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object, object]:
    folder = tmp_path_factory.mktemp("runtime") / "bundle"
    model, tokenizer = build_bundle(folder)
    return str(folder), model, tokenizer


@pytest.fixture(scope="module")
def bundle(built: tuple[str, object, object]) -> Bundle:
    return Bundle.load(built[0])


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    sizes = [(160, 128), (64, 64), (97, 301), (300, 200), (50, 40), (128, 160), (77, 77), (200, 90), (65, 64)]
    return [random_scene(rng, size) for size in sizes]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# -- preprocessing and tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 224])
def test_preprocess_equals_the_eval_transform(size: int) -> None:
    rng = np.random.default_rng(size)
    pre, reference = Preprocessor.from_description(describe_transforms(size)), eval_transform(size)
    for wh in [(160, 128), (size, size), (63, 200), (301, 97), (500, 375), (40, 30), (size + 1, size)]:
        for mode in ("RGB", "L", "RGBA", "P"):
            image = random_scene(rng, wh).convert(mode)
            ours = pre([image])[0]
            assert ours.dtype == np.float32 and ours.shape == (3, size, size)
            np.testing.assert_allclose(ours, reference(image).numpy(), atol=1e-5, rtol=0)


def test_preprocess_refuses_what_it_cannot_honour() -> None:
    desc = describe_transforms(64)
    desc["resize"]["interpolation"] = "bilinear"
    with pytest.raises(ValueError, match="resize.interpolation"):
        Preprocessor.from_description(desc)
    with pytest.raises(ValueError, match="missing key 'mean'"):
        Preprocessor.from_description({k: v for k, v in describe_transforms(64).items() if k != "mean"})


def test_token_ids_equal_clip_tokenizer(bundle: Bundle, built: tuple) -> None:
    tokenizer = built[2]
    texts = ["a photo of a dog.", "Two RED circles &amp; a cat", "", "x " * 200, "naïve café ☕ 東京"]
    np.testing.assert_array_equal(bundle.tokenize(texts), tokenizer(texts, 77).numpy())


# -- embeddings against the PyTorch model -----------------------------------------------------------------------


def test_image_embeddings_and_features_match_pytorch(bundle: Bundle, built: tuple, images: list) -> None:
    model = built[1]
    pixels = torch.stack([eval_transform(bundle.image_size)(image) for image in images])
    with torch.no_grad():
        expected = model.encode_image(pixels).numpy()
        visual = model.visual
        captured: list[torch.Tensor] = []
        hook = visual.ln_post.register_forward_hook(lambda _m, _i, out: captured.append(out))
        visual(pixels)
        hook.remove()
    ours = bundle.encode_images(images, batch_size=4)  # batches of 4, 4, 1
    assert ours.shape == (len(images), model.config.embed_dim)
    assert _cosine(ours, expected).min() > 0.9999
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(bundle.image_features(images), captured[0].numpy(), atol=1e-4, rtol=1e-3)
    # A preprocessed batch is accepted as is; batch size does not change the numbers.
    np.testing.assert_allclose(bundle.encode_images(bundle.preprocess(images), batch_size=1), ours, atol=1e-5)
    normalised = bundle.encode_images(images, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, atol=1e-5)


def test_text_embeddings_match_pytorch(bundle: Bundle, built: tuple) -> None:
    model, tokenizer = built[1], built[2]
    texts = [f"a photo of {n} {c}" for n in ("one", "two", "a") for c in ("red circle", "blue dog", "cat")]
    with torch.no_grad():
        expected = model.encode_text(tokenizer(texts, 77)).numpy()
    ours = bundle.encode_texts(texts, batch_size=7)  # batches of 7 and 2
    assert _cosine(ours, expected).min() > 0.9999
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-3)
    assert bundle.encode_texts([]).shape == (0, model.config.embed_dim)


def test_resnet_bundle_matches_pytorch(images: list, tmp_path: Path) -> None:
    model, tokenizer = build_bundle(tmp_path / "rn", "tiny-rn")
    rn = Bundle.load(str(tmp_path / "rn"))
    pixels = torch.stack([eval_transform(rn.image_size)(image) for image in images])
    with torch.no_grad():
        expected_images = model.encode_image(pixels).numpy()
        expected_texts = model.encode_text(tokenizer(LABELS, 77)).numpy()
    assert _cosine(rn.encode_images(images, batch_size=4), expected_images).min() > 0.9999
    assert _cosine(rn.encode_texts(LABELS), expected_texts).min() > 0.9999


def test_classify_is_clip_zero_shot(bundle: Bundle, built: tuple, images: list) -> None:
    model, tokenizer = built[1], built[2]
    templates = ("a photo of a {}.", "a drawing of a {}.")
    pixels = torch.stack([eval_transform(bundle.image_size)(image) for image in images])
    with torch.no_grad():
        image_emb = model.encode_image(pixels, normalize=True)
        prompts = tokenizer([t.format(label) for label in LABELS for t in templates], 77)
        per_prompt = model.encode_text(prompts, normalize=True).reshape(len(LABELS), len(templates), -1)
        classes = torch.nn.functional.normalize(per_prompt.mean(1), dim=-1)
        scale = model.scale()
        expected = (scale * image_emb @ classes.T).softmax(-1).numpy()
    probs = bundle.classify(images, LABELS, templates, batch_size=3)
    assert probs.shape == (len(images), len(LABELS))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    assert (probs.argmax(1) == expected.argmax(1)).all()
    assert bundle.logit_scale == pytest.approx(float(scale))
    # Class embeddings are cached per (labels, templates).
    assert bundle.class_embeddings(LABELS, templates) is bundle.class_embeddings(LABELS, templates)
    with pytest.raises(ValueError, match="templates"):
        bundle.classify(images, LABELS, ("no placeholder",))


def test_rank_orders_by_cosine(bundle: Bundle, images: list) -> None:
    ranked = bundle.rank(images, "a red circle", batch_size=5)
    scores = bundle.encode_images(images, normalize=True) @ bundle.encode_texts(["a red circle"], normalize=True)[0]
    assert [i for i, _ in ranked] == list(np.argsort(-scores, kind="stable"))
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)


# -- refusing bad bundles and images ----------------------------------------------------------------------------


def _copy(built: tuple, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(built[0], target)
    return target


def test_tampered_or_missing_files_are_refused_by_name(built: tuple, tmp_path: Path) -> None:
    folder = _copy(built, tmp_path)
    data = bytearray((folder / IMAGE_ENCODER_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / IMAGE_ENCODER_NAME).write_bytes(bytes(data))
    with pytest.raises(FormatError, match=f"{IMAGE_ENCODER_NAME} was altered"):
        Bundle.load(str(folder))
    shutil.copy(Path(built[0]) / IMAGE_ENCODER_NAME, folder / IMAGE_ENCODER_NAME)
    (folder / TOKENIZER_NAME).unlink()
    with pytest.raises(FormatError, match=f"{TOKENIZER_NAME} is missing"):
        Bundle.load(str(folder))
    with pytest.raises(MissingInputError, match="no bundle"):
        Bundle.load(str(tmp_path / "nowhere"))
    with pytest.raises(FormatError, match=INT8_IMAGE_ENCODER_NAME):
        Bundle.load(built[0], int8=True)


def test_a_bundle_with_wrong_model_names_is_refused(built: tuple, tmp_path: Path) -> None:
    source = Path(built[0])
    contents = {p.name: p.read_bytes() for p in source.iterdir() if p.name != "manifest.json"}
    contents[TEXT_ENCODER_NAME] = contents[IMAGE_ENCODER_NAME]  # valid ONNX, wrong contract
    info = json.loads((source / "manifest.json").read_text())["info"]
    write_bundle(str(tmp_path / "swapped"), contents, info)
    with pytest.raises(FormatError, match=f"{TEXT_ENCODER_NAME} has inputs \\['image'\\]"):
        Bundle.load(str(tmp_path / "swapped"))


def test_undecodable_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(FormatError, match="broken.jpg cannot be decoded"):
        load_image(bad)
    good = tmp_path / "good.png"
    random_scene(np.random.default_rng(0), (30, 20)).convert("L").save(good)
    assert load_image(good).mode == "RGB"


# -- torch-free, for real ---------------------------------------------------------------------------------------


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_runtime_loads_and_classifies_where_torch_cannot_be_imported(built: tuple, bundle: Bundle, images: list,
                                                                     tmp_path: Path) -> None:
    paths = []
    for i, image in enumerate(images[:4]):
        paths.append(str(tmp_path / f"img{i}.png"))
        image.save(paths[-1])
    code = f"""
import json
try:
    import torch
    raise SystemExit("torch imported")
except ImportError:
    pass
from clip.runtime import Bundle, load_image
b = Bundle.load({built[0]!r})
probs = b.classify([load_image(p) for p in {paths!r}], {LABELS!r})
print(json.dumps({{"probs": probs.tolist(), "torch": [m for m in sys.modules if m.startswith("torch")]}}))
"""
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["torch"] == []
    np.testing.assert_allclose(np.array(out["probs"]), bundle.classify(images[:4], LABELS), atol=1e-6)


# -- clip-pipeline predict --------------------------------------------------------------------------------------


def _predict(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("CLIP_PIPELINE_DEBUG", None)
    return subprocess.run([str(CLI), "predict", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_predict_prints_probabilities_and_names_a_bad_image(built: tuple, bundle: Bundle, images: list,
                                                            tmp_path: Path) -> None:
    images[0].save(tmp_path / "first.png")
    images[1].convert("RGB").save(tmp_path / "second.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"GIF89a but not really")
    result = _predict("--bundle", built[0], "first.png", "broken.jpg", "second.jpg", "--labels", ",".join(LABELS),
                      cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "broken.jpg cannot be decoded" in result.stderr
    expected = bundle.classify([load_image(tmp_path / "first.png"), load_image(tmp_path / "second.jpg")], LABELS)
    lines = result.stdout.splitlines()
    for name, probs in zip(("first.png", "second.jpg"), expected, strict=True):
        start = next(i for i, line in enumerate(lines) if name in line)  # then one row per label, best first
        cells = [[cell.strip() for cell in line.split("│")[3:5]] for line in lines[start:start + len(LABELS)]]
        assert cells == [[LABELS[j], f"{probs[j]:.4f}"] for j in np.argsort(-probs, kind="stable")]
    assert "broken.jpg" not in result.stdout


def test_predict_on_a_tampered_bundle_is_one_line(built: tuple, tmp_path: Path) -> None:
    folder = _copy(built, tmp_path)
    with open(folder / TEXT_ENCODER_NAME, "ab") as f:
        f.write(b"\0")
    random_scene(np.random.default_rng(1), (40, 40)).save(tmp_path / "a.png")
    result = _predict("--bundle", str(folder), "a.png", "--labels", "a,b", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("error: predict: FormatError") and f"{TEXT_ENCODER_NAME} was altered" in first


# -- int8 -------------------------------------------------------------------------------------------------------


def test_int8_image_encoder_is_written_beside_and_measured(built: tuple, bundle: Bundle, images: list,
                                                           tmp_path: Path) -> None:
    from clip.export.quantize import quantize_image_encoder

    source = Path(built[0])
    float_model = (source / IMAGE_ENCODER_NAME).read_bytes()
    quantized = quantize_image_encoder(float_model, bundle.preprocess(images), repeats=1)
    report = quantized.report
    assert report["int8_bytes"] == len(quantized.model) and report["int8_float_bytes"] == len(float_model)
    assert report["int8_size_ratio"] < 0.5  # int8 weights: about a quarter of float32, plus graph overhead
    assert 0.98 < report["int8_cosine_min"] <= report["int8_cosine_mean"] <= 1.0
    assert report["int8_images_per_s"] > 0 and report["int8_float_images_per_s"] > 0

    contents = {p.name: p.read_bytes() for p in source.iterdir() if p.name != "manifest.json"}
    contents[INT8_IMAGE_ENCODER_NAME] = quantized.model
    info = json.loads((source / "manifest.json").read_text())["info"]
    write_bundle(str(tmp_path / "with-int8"), contents, info)
    int8_bundle = Bundle.load(str(tmp_path / "with-int8"), int8=True)
    float_bundle = Bundle.load(str(tmp_path / "with-int8"))
    assert float_bundle.image_encoder_name == IMAGE_ENCODER_NAME  # the float encoder stays the default
    np.testing.assert_array_equal(float_bundle.encode_images(images), bundle.encode_images(images))
    cosine = _cosine(int8_bundle.encode_images(images), bundle.encode_images(images))
    assert cosine.min() > 0.98
    assert cosine.min() == pytest.approx(report["int8_cosine_min"], abs=1e-5)
