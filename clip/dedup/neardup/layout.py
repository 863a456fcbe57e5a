"""The buckets of the multi-index search: bands tiling the 64 bits, keys combining `agree` of them
(`search_layout`, package docstring "Pigeonhole"), and the helpers every search shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

HASH_BITS = 64
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing constant: spreads key values over partitions
_MAX_KEYS = 256  # most keys (band combinations) search_layout accepts


def band_layout(threshold: int, num_bands: int | None = None) -> list[tuple[int, int]]:
    """(shift, width) of each band tiling the 64 bits (default `threshold + 1` bands); widths differ by <= 1."""
    if not 0 <= threshold < HASH_BITS:
        raise ValueError(f"near-duplicate threshold must be in [0, {HASH_BITS - 1}], got {threshold}")
    num_bands = threshold + 1 if num_bands is None else num_bands
    if not threshold < num_bands <= HASH_BITS:
        raise ValueError(f"num_bands must be in [{threshold + 1}, {HASH_BITS}], got {num_bands}")
    base, extra = divmod(HASH_BITS, num_bands)
    layout = []
    shift = 0
    for band in range(num_bands):
        width = base + (1 if band < extra else 0)
        layout.append((shift, width))
        shift += width
    return layout


def _band_mask(shift: int, width: int) -> int:
    return ((1 << width) - 1) << shift


@dataclass(frozen=True)
class SearchLayout:
    """The buckets of the bounded search: `num_bands = threshold + agree` bands, a key per choice of `agree`."""

    threshold: int
    num_bands: int
    agree: int
    key_masks: tuple[int, ...]  # one 64-bit mask per key: the union of its `agree` bands

    @property
    def num_keys(self) -> int:
        return len(self.key_masks)


def search_layout(num_hashes: int, threshold: int) -> SearchLayout:
    """The layout for `num_hashes` hashes: `agree` (k) minimising keys * (sort + expected random bucket).

    Cost model per hash and key: ~log2(n) for the sort plus the expected random bucket n / 2**key_bits.
    """
    band_layout(threshold)  # validates threshold

    def layout_for(k: int) -> SearchLayout:
        bands = band_layout(threshold, threshold + k)
        masks = tuple(sum(_band_mask(*bands[b]) for b in chosen) for chosen in combinations(range(len(bands)), k))
        return SearchLayout(threshold, len(bands), k, masks)

    best, best_cost = 1, math.inf
    k = 1
    while threshold + k <= HASH_BITS and math.comb(threshold + k, k) <= _MAX_KEYS:
        key_bits = min(bin(mask).count("1") for mask in layout_for(k).key_masks)
        cost = math.comb(threshold + k, k) * (math.log2(max(num_hashes, 2)) + num_hashes / 2.0**key_bits)
        if cost < best_cost:
            best, best_cost = k, cost
        if num_hashes / 2.0**key_bits < 1:
            break  # a larger k only adds keys
        k += 1
    return layout_for(best)


def band_values(hashes: np.ndarray, shift: int, width: int) -> np.ndarray:
    mask = np.uint64((1 << width) - 1) if width < HASH_BITS else np.uint64(0xFFFFFFFFFFFFFFFF)
    return (hashes >> np.uint64(shift)) & mask


def partition_of(values: np.ndarray, num_partitions: int) -> np.ndarray:
    """Partition index of each band value: a multiplicative hash, so nearby values land in different partitions."""
    mixed = values * _MIX  # wraps modulo 2**64 (intended)
    return (mixed >> np.uint64(32)) % np.uint64(num_partitions)


def as_hash_array(hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Hashes as a 1-D uint64 array (accepts Python ints up to 2**64 - 1)."""
    arr = np.asarray(hashes, dtype=np.uint64) if not isinstance(hashes, np.ndarray) else hashes
    if arr.dtype != np.uint64:
        arr = arr.astype(np.uint64)
    if arr.ndim != 1:
        raise ValueError(f"hashes must be a 1-D array, got shape {arr.shape}")
    return arr


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Sorted, de-duplicated [m, 2] pair list (each row i < j)."""
    if pairs.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0)
