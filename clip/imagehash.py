"""64-bit perceptual hash (DCT pHash) for near-duplicate detection.

The collect stage stores `phash64(image)` in every sample's JSON as 16 hex characters; dedup compares them by
Hamming distance. Re-encoding, resizing and slight crops move a pHash by a few bits; unrelated images sit near 32.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

_HASH_SIDE = 8  # 8 x 8 low-frequency DCT coefficients -> 64 bits
_RESIZE_SIDE = 32


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix [n, n]: row k is the k-th cosine basis vector."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    mat = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    mat[0] /= np.sqrt(2.0)
    return mat


def phash64(image: Image.Image) -> int:
    """Perceptual hash of an image as an unsigned 64-bit int."""
    gray = image.convert("L").resize((_RESIZE_SIDE, _RESIZE_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)
    dct = _dct_matrix(_RESIZE_SIDE)
    coeffs = dct @ pixels @ dct.T  # 2-D DCT [32, 32]
    low = coeffs[:_HASH_SIDE, :_HASH_SIDE].flatten()
    # Median without the DC term, which only carries mean brightness and would skew the threshold.
    bits = low > np.median(low[1:])
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def phash_hex(image: Image.Image) -> str:
    """`phash64` as the 16-character lower-case hex string stored in sample JSON."""
    return f"{phash64(image):016x}"


def hex_to_int(phash: str) -> int:
    if len(phash) != 16:
        raise ValueError(f"pHash must be 16 hex characters, got {phash!r}")
    return int(phash, 16)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
