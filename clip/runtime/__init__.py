"""The torch-free runtime: load an export bundle and embed, classify and rank with onnxruntime.

    from clip.runtime import Bundle, load_image
    bundle = Bundle.load("models/bundle")
    probs = bundle.classify([load_image("cat.jpg")], ["cat", "dog"], templates=("a photo of a {}.",))

A shared package beside clip/formats, not a stage package: the export stage (its parity figures, the pyfunc
model) and the evaluation stage both run bundles through it, and a deployment needs nothing else. It needs
only onnxruntime, numpy, pillow and tokenizers (plus clip.formats, clip.storage, clip.config and
clip.tokenizer, none of which imports torch); tests/test_runtime.py imports it where importing torch fails.
`clip.runtime.pyfunc` (the MLflow model) is imported on its own, so this package does not need mlflow.
"""

from clip.runtime.bundle import DEFAULT_TEMPLATES, INT8_IMAGE_ENCODER_NAME, Bundle, load_image, top_k
from clip.runtime.preprocess import Preprocessor

__all__ = ["DEFAULT_TEMPLATES", "INT8_IMAGE_ENCODER_NAME", "Bundle", "Preprocessor", "load_image", "top_k"]
