"""The promotion stage: register the exported bundle in MLflow and move the `champion` alias only when the new
version's evaluation beats the current champion's (clip/promote/stage.py; the model registry calls in
clip/promote/registry.py)."""
