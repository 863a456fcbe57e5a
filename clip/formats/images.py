"""Which files and webdataset members hold an image: the one list of image extensions.

- `WEBDATASET_IMAGE_KEYS`: the member extensions of a webdataset sample's image, in the order they are tried
  (the collect stage writes `jpg`; tars made elsewhere may hold any of them).
- `IMAGE_SUFFIXES`: the file suffixes (lower case, with the dot) that a folder of images is listed by: the
  webdataset keys plus the other formats PIL decodes that image datasets ship in (GTSRB's `.ppm`, ...).
"""

from __future__ import annotations

WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
IMAGE_SUFFIXES = frozenset(f".{ext}" for ext in (*WEBDATASET_IMAGE_KEYS, "gif", "bmp", "tif", "tiff", "ppm"))

