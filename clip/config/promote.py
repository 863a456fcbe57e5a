"""The `promote` section."""

from __future__ import annotations

from pydantic import Field

from clip.config.base import Section, Uri


class PromoteConfig(Section):
    """promote: register the model in MLflow; move the champion alias only if it is better."""

    bundle: Uri = Field("models/bundle", description="the export stage's bundle, registered as a new model version")
    results: Uri = Field("reports/eval/results.json", description="the evaluation stage's results table")
    model_name: str | None = Field(
        None, description="MLflow registered model name; null: named after the model config (clip-<model>)")
    alias: str = Field("champion", description="alias moved to the new version when it beats the current holder")
    challenger_alias: str = Field("challenger", description="alias the new version gets when it does not")
    task: str = Field("zeroshot", description="the evaluation rows compared (zeroshot | linear_probe | retrieval)")
    min_improvement: float = Field(
        0.0, description="the new mean must beat the champion's by more than this (same datasets on both sides)")
