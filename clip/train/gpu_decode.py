"""GPU JPEG decoding (`train.gpu_decode`, CUDA runs): the loader hands JPEG bytes and a crop box, the GPU decodes.

Guarantees:
* The same augmentation as the CPU path. The loader worker reads only the image header (its size), draws the
  random-resized-crop box from the per-sample seed with the CPU path's own `RandomResizedCrop` (`crop_box`: the
  same generator calls in the same order), and the GPU crops that box and resizes it to `image_size` (bicubic,
  antialiased), then applies CLIP's mean/std. Only the decoder and the resampling kernel differ (nvjpeg and
  torch's bicubic instead of libjpeg and PIL's), which moves pixel values slightly, never the crop.
* A sample whose header cannot be read is skipped and counted by the loader, exactly as on the CPU path.
* An image nvjpeg cannot decode (a PNG, a CMYK or lossless JPEG) is decoded on the CPU instead; one that no decoder
  can read is dropped from the batch together with its caption and counted. It is never replaced by another
  image: a copy would put one image with two captions into the contrastive batch, one of them a false negative.
  The batch of that rank is then one pair smaller; the loss handles uneven per-rank batches (clip/loss.py).
torchvision's decoder also runs on the CPU (device "cpu"), which is how the tests exercise this path.
"""

from __future__ import annotations

import io
from functools import lru_cache

import torch

from clip.transforms import CLIP_MEAN, CLIP_STD

CropBox = tuple[int, int, int, int]  # top, left, height, width in the decoded image


@lru_cache(maxsize=8)
def _random_resized_crop(image_size: int):  # -> v2.RandomResizedCrop
    from torchvision.transforms import v2

    from clip.transforms import train_transform

    return next(t for t in train_transform(image_size).transforms if isinstance(t, v2.RandomResizedCrop))


def crop_box(image_bytes: bytes, image_size: int, seed: int) -> CropBox | None:
    """The CPU path's random-resized-crop box for this sample, from the image header only (no decode);
    None when the header cannot be read (a corrupt sample)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as img:  # lazy: reads the header, not the pixels
            torch.manual_seed(seed)  # as decode_sample does before the CPU transform
            params = _random_resized_crop(image_size).make_params([img])
    except Exception:  # any unreadable header (bad bytes, unknown format, decompression bomb) = corrupt sample
        return None
    return int(params["top"]), int(params["left"]), int(params["height"]), int(params["width"])


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """[3, H, W] uint8 on `device`: nvjpeg first, then the CPU decoders (any format); None when none can."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return decode_image(data, mode=ImageReadMode.RGB).to(device)
    except RuntimeError:
        return None


def gpu_decode_batch(items: list[tuple[torch.Tensor, CropBox]], image_size: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Decode (JPEG bytes, crop box) pairs on `device`, crop, resize to `image_size`, normalise.
    Returns (images [k, 3, S, S], keep [n] bool: which samples are in `images`, failures = n - k)."""
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [data for data, _ in items]
    try:
        decoded: list[torch.Tensor | None] = list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad image fails the batched call: decode one by one
        decoded = [_decode_one(data, device) for data in jpegs]
    mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
    out, keep = [], []
    for img, (_, (top, left, height, width)) in zip(decoded, items, strict=True):
        usable = img is not None and top + height <= img.shape[1] and left + width <= img.shape[2]
        keep.append(usable)
        if not usable:  # undecodable, or decoded to another size than its header said
            continue
        crop = img[None, :, top:top + height, left:left + width].float()
        resized = F.interpolate(crop, size=(image_size, image_size), mode="bicubic", antialias=True,
                                align_corners=False)[0]
        out.append((resized.clamp(0, 255) / 255.0 - mean) / std)
    failures = keep.count(False)
    if not out:
        raise RuntimeError("no image of the batch could be decoded (GPU and CPU decoders)")
    return torch.stack(out), torch.tensor(keep, dtype=torch.bool), failures
