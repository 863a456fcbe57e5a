"""clip-pipeline: an end-to-end CLIP platform, from raw web (image, text) pairs to an evaluated model."""

__version__ = "0.1.0"
