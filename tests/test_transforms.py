"""Image transforms: eval output against a numpy reference and against open_clip; train transform shape,
dtype and seeded determinism; the portable description round-trips."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from clip.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    describe_transforms,
    eval_transform,
    train_transform,
    transform_from_description,
)


def _photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    """A smooth gradient plus noise, so resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels, "RGB").convert(mode)


def _numpy_reference(image: PIL.Image.Image, size: int) -> np.ndarray:
    """Shortest side -> size (PIL bicubic), centre crop, /255, normalise, CHW: written out by hand."""
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    resized = np.asarray(image.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC), dtype=np.float64)
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    crop = resized[top : top + size, left : left + size] / 255.0
    normalised = (crop - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return normalised.transpose(2, 0, 1).astype(np.float32)


@pytest.mark.parametrize(("width", "height"), [(97, 61), (40, 130), (64, 64), (33, 32)])
def test_eval_matches_numpy_reference(width: int, height: int) -> None:
    image = _photo(width, height)
    out = eval_transform(32)(image)
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 32, 32)
    np.testing.assert_allclose(out.numpy(), _numpy_reference(image, 32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_eval_matches_open_clip(mode: str) -> None:
    open_clip_transform = pytest.importorskip("open_clip.transform")
    image = _photo(120, 90, mode=mode, seed=1)
    want = open_clip_transform.image_transform(48, is_train=False)(image)
    got = eval_transform(48)(image)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_palette_images_are_converted_before_resizing() -> None:
    # PIL resizes mode "P" with NEAREST whatever filter is asked (open_clip converts after resizing);
    # we convert to RGB first, so a palette image gives the same result as its RGB conversion.
    image = _photo(120, 90, mode="P", seed=1)
    torch.testing.assert_close(eval_transform(48)(image), eval_transform(48)(image.convert("RGB")), rtol=0, atol=0)


def test_eval_accepts_uint8_tensors_close_to_pil() -> None:
    image = _photo(80, 60, seed=2)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # uint8 [3, H, W]
    from_tensor = eval_transform(32)(tensor)
    from_pil = eval_transform(32)(image)
    assert from_tensor.dtype == torch.float32 and tuple(from_tensor.shape) == (3, 32, 32)
    # torch's antialiased bicubic vs PIL's: about one grey level (1/255/std ~ 0.015 after normalising)
    assert (from_tensor - from_pil).abs().mean() < 0.02
    grey = tensor[:1]
    assert tuple(eval_transform(32)(grey).shape) == (3, 32, 32)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        eval_transform(32)(torch.zeros(4, 10, 10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        eval_transform(32)(torch.zeros(3, 10, 10))


def test_train_transform_shape_dtype_and_seeded_determinism() -> None:
    image = _photo(80, 80, seed=3)  # near-square: most random crops fit, fewer fall back to the centre
    transform = train_transform(40)
    torch.manual_seed(7)
    first = [transform(image) for _ in range(5)]
    torch.manual_seed(7)
    second = [transform(image) for _ in range(5)]
    for a, b in zip(first, second, strict=True):
        assert a.dtype == torch.float32 and tuple(a.shape) == (3, 40, 40)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(first[0], other) for other in first[1:]), "crops should differ between draws"
    tensor_in = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    assert tuple(transform(tensor_in).shape) == (3, 40, 40)
    assert tuple(transform(image.convert("L")).shape) == (3, 40, 40)


def test_train_crop_with_full_scale_and_square_input_is_the_eval_output() -> None:
    # scale (1, 1) and a square image leave one possible crop: the whole image, so train == eval.
    image = _photo(50, 50, seed=4)
    got = train_transform(32, scale=(1.0, 1.0))(image)
    torch.testing.assert_close(got, eval_transform(32)(image), atol=1e-6, rtol=0)


def test_description_round_trip() -> None:
    desc = describe_transforms(64)
    text = json.dumps(desc)  # JSON-serialisable
    rebuilt = transform_from_description(json.loads(text))
    image = _photo(90, 70, seed=5)
    torch.testing.assert_close(rebuilt(image), eval_transform(64)(image), rtol=0, atol=0)
    assert desc["mean"] == list(CLIP_MEAN) and desc["std"] == list(CLIP_STD)
    assert desc["resize"]["size"] == 64 and desc["input"]["channel_order"] == "RGB"


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="image_size"):
        eval_transform(0)
    with pytest.raises(ValueError, match="scale"):
        train_transform(32, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="format"):
        transform_from_description({"format": "something-else"})
    broken = describe_transforms(32)
    del broken["mean"]
    with pytest.raises(ValueError, match="mean"):
        transform_from_description(broken)
    broken = describe_transforms(32)
    broken["resize"]["interpolation"] = "nearest"
    with pytest.raises(ValueError, match="interpolation"):
        transform_from_description(broken)
