"""A colour signature that confirms pHash matches.

pHash is computed on grey levels of a 32 x 32 thumbnail, so two images with the same layout in different colours
(a red and a blue circle in the same place), or small objects of different shapes, hash alike. A pHash match is
confirmed only when the images' 8 x 8 RGB thumbnails (192 box-averaged values) also agree everywhere: the largest
absolute difference of any cell and channel. Measured on natural-ish test scenes, JPEG re-encoding (quality 20)
moves it by at most 9 units (of 255), 0.6x resizing by 12, a 2% crop by 27; a recoloured or reshaped object moves
the cells it covers by far more (on the synthetic pool, 97% of pHash-only train/eval matches exceed 40).

Collect stores each sample's signature in its `{key}.json` (clip.formats.raw `color`), so dedup reads it with the
metadata and decodes nothing. Only samples of pools written before that field existed are decoded, once each, and
only when they take part in a pHash match (`PoolColors.ensure`; counted in `decoded`, logged).
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict

import numpy as np
from PIL import Image

from clip.config import StorageConfig
from clip.dedup.pool import PoolMetadata
from clip.formats.raw import color_signature, iter_raw_images

log = logging.getLogger(__name__)


class PoolColors:
    """The pool's colour column, completed on demand for samples whose JSON lacks it (older pools)."""

    def __init__(self, pool: PoolMetadata, storage_cfg: StorageConfig | None = None) -> None:
        self.pool = pool
        self.storage_cfg = storage_cfg
        self.decoded = 0  # images decoded because their JSON had no colour signature

    def ensure(self, indices: np.ndarray) -> None:
        """Make pool.color valid at `indices` (pool order), decoding the images of those that lack it."""
        indices = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
        missing = indices[~self.pool.has_color[indices]]
        if missing.size == 0:
            return
        log.info("decoding %d images for their colour signature: their raw JSON predates the color field "
                 "(collect again to store it)", missing.size)
        by_shard: dict[int, dict[str, int]] = defaultdict(dict)
        for idx in missing.tolist():
            by_shard[int(self.pool.shard[idx])][self.pool.key(idx)] = idx
        for shard, wanted in sorted(by_shard.items()):
            uri = self.pool.shard_uris[self.pool.shard_names[shard]]
            for key, jpeg in iter_raw_images(uri, set(wanted), self.storage_cfg):
                with Image.open(io.BytesIO(jpeg)) as image:
                    self.pool.color[wanted[key]] = color_signature(image)
                self.pool.has_color[wanted[key]] = True
                self.decoded += 1

    def get(self, indices: np.ndarray) -> np.ndarray:
        """[len(indices), 192] uint8 signatures (decoding the missing ones first)."""
        self.ensure(indices)
        return self.pool.color[np.asarray(indices, dtype=np.int64).reshape(-1)]
