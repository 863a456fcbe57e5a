"""Image validation and normalisation shared by every collection source.

Every image that goes into a raw shard passes through here, whether it was downloaded, read from a folder or a
webdataset tar, or rendered by the synthetic generator: decode (with a decompression-bomb limit), validate size
and aspect ratio, convert to RGB, shrink so the longest side is at most `max_side`, re-encode as JPEG, and hash
(sha256 of the stored JPEG bytes, 64-bit pHash of the pixels) and take the colour signature (8 x 8 RGB thumbnail,
clip.formats.raw.color_signature) of the same pixels, so that dedup never decodes the image again.

    processed = process_image(raw_bytes, cfg.collect.fetch)   # raises ImageRejected(reason) when unusable
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from clip.config import FetchConfig
from clip.formats.raw import color_signature, encode_color
from clip.imagehash import phash_hex

# Reasons an image is refused; they go into candidates.parquet and stats.json as `reason`.
NOT_AN_IMAGE = "not_an_image"
TOO_SMALL = "too_small"
ASPECT_RATIO = "aspect_ratio"
DECOMPRESSION_BOMB = "decompression_bomb"
TRUNCATED = "truncated"


@dataclass
class ProcessedImage:
    """A validated image as it is stored in a raw shard."""

    jpeg: bytes
    width: int
    height: int
    sha256: str
    phash: str  # 16 lower-case hex characters, clip.imagehash.phash_hex
    color: str  # the raw sample's `color` field: base64 of the 192-byte 8 x 8 RGB signature (clip.formats.raw)


class ImageRejected(ValueError):
    """The bytes are not a usable image; `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _check_geometry(width: int, height: int, cfg: FetchConfig) -> None:
    if width * height > cfg.max_pixels:
        raise ImageRejected(DECOMPRESSION_BOMB, f"{width}x{height} exceeds {cfg.max_pixels} pixels")
    if min(width, height) < cfg.min_size:
        raise ImageRejected(TOO_SMALL, f"{width}x{height} is below the minimum side {cfg.min_size}")
    if max(width, height) > cfg.max_aspect_ratio * min(width, height):
        raise ImageRejected(ASPECT_RATIO, f"{width}x{height} exceeds aspect ratio {cfg.max_aspect_ratio}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB without surprises: transparent pixels become white rather than whatever colour they hid."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def encode_image(image: Image.Image, cfg: FetchConfig, *, check: bool = True) -> ProcessedImage:
    """Validate, resize and JPEG-encode an already decoded image (the synthetic and folder paths use this too)."""
    if check:
        _check_geometry(image.width, image.height, cfg)
    image = _to_rgb(image)
    longest = max(image.width, image.height)
    if longest > cfg.max_side:  # shrink only: upscaling would invent pixels
        scale = cfg.max_side / longest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=cfg.jpeg_quality)
    jpeg = buffer.getvalue()
    return ProcessedImage(
        jpeg=jpeg,
        width=image.width,
        height=image.height,
        sha256=hashlib.sha256(jpeg).hexdigest(),
        phash=phash_hex(image),
        color=encode_color(color_signature(image)),
    )


def _decode_error_reason(exc: Exception) -> str:
    """TRUNCATED when PIL recognised the format but the data ended early, else NOT_AN_IMAGE.

    PIL says "image file is truncated" when the pixel data ends, "Truncated File Read" (capital T) when the
    headers end (a small JPEG cut in half ends inside its tables, during Image.open), "broken data stream"
    for a cut PNG or GIF stream; bytes that are no image at all are UnidentifiedImageError.
    """
    message = str(exc).lower()
    return TRUNCATED if "truncated" in message or "broken data" in message else NOT_AN_IMAGE


def decode_image(data: bytes, cfg: FetchConfig) -> Image.Image:
    """Decode bytes into a fully loaded image, refusing bombs before their pixels are allocated."""
    if not data:
        raise ImageRejected(NOT_AN_IMAGE, "empty body")
    with warnings.catch_warnings():
        # The pixel limit is ours (cfg.max_pixels), checked on the header before decoding; PIL's own global
        # limit would warn or raise with a different threshold.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageRejected(DECOMPRESSION_BOMB, str(exc)) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ImageRejected(_decode_error_reason(exc), str(exc) or type(exc).__name__) from None
        _check_geometry(image.width, image.height, cfg)
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) when the result is still >= max_side:
            # much less work for large photos, same result after the resize below.
            # Ask for the target size itself: draft keeps both sides >= the request, so asking for a square
            # (max_side, max_side) would forbid e.g. the 1/2 scale of a 4:3 photo whose short side ends below it.
            scale = cfg.max_side / max(image.width, image.height)
            if scale < 1:
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageRejected(DECOMPRESSION_BOMB, str(exc)) from None
        except OSError as exc:
            raise ImageRejected(_decode_error_reason(exc), str(exc)) from None
        except (ValueError, SyntaxError, EOFError) as exc:
            raise ImageRejected(NOT_AN_IMAGE, str(exc) or type(exc).__name__) from None
    try:
        image = ImageOps.exif_transpose(image)  # camera orientation: store pixels the way they are seen
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop an otherwise fine image
        pass
    return image


def process_image(data: bytes, cfg: FetchConfig) -> ProcessedImage:
    """Decode, validate, resize, re-encode and hash image bytes; raises ImageRejected with a reason."""
    image = decode_image(data, cfg)
    # Geometry was checked on the header's size in decode_image; a draft-decoded JPEG may be smaller than that
    # (by a factor of 2, 4 or 8, never below max_side) and must not be judged again on its reduced size.
    return encode_image(image, cfg, check=False)
