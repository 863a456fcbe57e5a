"""GPU JPEG decoding (`train.gpu_decode`, CUDA runs): the loader hands JPEG bytes, the GPU decodes them.

Guarantees: the output has the CPU path's shape and normalisation (short side resized to `image_size` with
antialiased bicubic, centre crop, CLIP mean/std); a JPEG nvjpeg cannot decode never stops the run, it is replaced
by a batch neighbour and counted. torchvision's decoder also runs on the CPU, which is how the tests exercise it.
"""

from __future__ import annotations

import torch

from clip.transforms import CLIP_MEAN, CLIP_STD


def gpu_decode_batch(jpegs: list[torch.Tensor], image_size: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Decode JPEG byte tensors on the GPU, resize the short side to `image_size`, centre-crop, normalise.
    A JPEG nvjpeg cannot decode is replaced by its batch neighbour (counted). Returns ([n, 3, S, S], failures)."""
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        failures = 0
    except RuntimeError:
        decoded, failures = [], 0
        for data in jpegs:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
                failures += 1
        good = [d for d in decoded if d is not None]
        if not good:
            raise RuntimeError("no JPEG of the batch could be decoded on the GPU") from None
        decoded = [d if d is not None else good[i % len(good)] for i, d in enumerate(decoded)]
    mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
    out = []
    for img in decoded:  # [3, H, W] uint8
        h, w = img.shape[1:]
        scale = image_size / min(h, w)
        nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
        resized = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        crop = resized[:, top:top + image_size, left:left + image_size].clamp(0, 255) / 255.0
        out.append((crop - mean) / std)
    return torch.stack(out), failures
