"""The synthetic pool stays diverse under dedup's own near-duplicate criteria, and stays deterministic (issue 16.6).

Images are hashed exactly as collect stores them (clip.collect.images.encode_image: pHash of the rendered image,
JPEG at the default quality) and compared exactly as dedup compares them: pHash Hamming distance within
`near_dup_threshold`, confirmed by the colour signature of the decoded JPEG within `color_tolerance`, clustered
transitively; a cluster of k images removes k - 1.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clip import synthetic
from clip.collect.images import encode_image
from clip.config import DedupConfig, FetchConfig
from clip.dedup.neardup import cluster_labels, color_distance
from clip.formats.raw import color_signature

POOL_SIZE = 4096  # the embedded default's collect.synthetic.num_samples
IMAGE_SIZE = 64  # ... and its collect.synthetic.image_size


@pytest.fixture
def flat_appearance(monkeypatch: pytest.MonkeyPatch):
    """The generator as it was before issue 16.6: flat named backgrounds, exact palette colours.

    With the appearance draws zeroed the layout and captions are unchanged, so this renders the old images
    pixel for pixel (checked against the old module when this test was written).
    """
    monkeypatch.setattr(synthetic, "SHADING_STD", 0.0)
    monkeypatch.setattr(synthetic, "COLOR_JITTER", 0)
    monkeypatch.setattr(synthetic, "BACKGROUND_LEVEL_JITTER", 0.0)
    synthetic._shading_scale.cache_clear()
    yield
    synthetic._shading_scale.cache_clear()


def _removed_as_near_duplicates(n: int, seed: int = 0) -> int:
    """How many of the first n training scenes dedup's near-duplicate pass would remove."""
    fetch_cfg, dedup_cfg = FetchConfig(), DedupConfig()
    hashes = np.empty(n, dtype=np.uint64)
    signatures = np.empty((n, 192), dtype=np.float32)
    for i in range(n):
        processed = encode_image(synthetic.training_image(seed, i, IMAGE_SIZE), fetch_cfg)
        hashes[i] = int(processed.phash, 16)
        with Image.open(io.BytesIO(processed.jpeg)) as decoded:
            signatures[i] = color_signature(decoded)
    pairs = []
    for i in range(n - 1):  # brute force: every pair i < j
        js = np.flatnonzero(np.bitwise_count(hashes[i] ^ hashes[i + 1:]) <= dedup_cfg.near_dup_threshold) + i + 1
        pairs.extend((i, int(j)) for j in js)
    pair_array = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    close = color_distance(signatures[pair_array[:, 0]], signatures[pair_array[:, 1]])
    confirmed = pair_array[close <= dedup_cfg.color_tolerance]
    return n - len(np.unique(cluster_labels(n, confirmed)))


def test_default_pool_loses_almost_nothing_to_near_duplicates() -> None:
    # Measured when written: 0 of 4,096 (the flat generator: 46, 1.1%). At 100,000 / 200,000 scenes the pair
    # rate is ~2e-9, which extrapolates to < 0.1% of a 1M pool (see the clip.synthetic docstring).
    removed = _removed_as_near_duplicates(POOL_SIZE)
    assert removed <= POOL_SIZE * 0.002, f"{removed} of {POOL_SIZE} synthetic scenes are near duplicates"


def test_flat_generator_exceeds_the_bound(flat_appearance: None) -> None:
    """Self-check: the bound above is one the old generator fails (46 of 4,096 removed when written)."""
    removed = _removed_as_near_duplicates(POOL_SIZE)
    assert removed > POOL_SIZE * 0.005


def _digest(seed: int, n: int) -> str:
    pool = hashlib.sha256()
    for i in range(n):
        scene = synthetic.make_scene(seed, i)
        pool.update(scene.caption.encode())
        pool.update(synthetic.render_scene(scene, IMAGE_SIZE).tobytes())
    return pool.hexdigest()


def test_same_seed_same_images_in_another_process() -> None:
    here = _digest(7, 50)
    code = "from tests.test_synthetic_diversity import _digest; print(_digest(7, 50))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == here
    assert _digest(8, 50) != here


def test_appearance_keeps_the_classes() -> None:
    """Jittered colours stay nearest their own palette colour; the background shading is grey (never a colour)."""
    palette = np.asarray(list(synthetic.COLORS.values()), dtype=np.float64)  # [colours, 3]
    names = list(synthetic.COLORS)
    for i in range(2000):
        scene = synthetic.make_scene(0, i)
        for obj in scene.objects:
            nearest = names[int(np.argmin(np.abs(palette - np.asarray(obj.rgb)).sum(axis=1)))]
            assert nearest == obj.color, (i, obj)
    for i in range(20):
        background = synthetic._background(synthetic.make_scene(0, i), IMAGE_SIZE)  # [side, side] grey
        assert background.ndim == 2 and background.std() > 4  # shaded, not flat
    for name in synthetic.EVAL_SET_NAMES:
        classes = synthetic.eval_classnames(name)
        pairs = synthetic.generate_eval_set(name, seed=0, n=len(classes), image_size=IMAGE_SIZE)
        assert [label for _, label in pairs] == classes
