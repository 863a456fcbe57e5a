"""The `dedup` section."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from clip.config.base import PositiveInt, Section, Uri


class DedupConfig(Section):
    """dedup: remove exact and near duplicates and evaluation-set overlap -> data/dedup/."""

    input_dir: Uri = Field("data/raw", description="the collect stage's output (local path or s3://bucket/prefix)")
    output_dir: str = Field("data/dedup", description="keep-list, removed pairs with reasons, overlap report")
    near_dup_threshold: Annotated[int, Field(ge=0, le=32)] = Field(
        4, description="max Hamming distance of 64-bit pHashes for two images to be near duplicates")
    exact_caption_image: bool = Field(
        True, description="remove pairs with the same normalised caption and the same image bytes")
    near_duplicates: bool = Field(True, description="remove near-duplicate images (pHash within near_dup_threshold)")
    eval_dirs: list[str] = Field(
        default_factory=list, description="evaluation image folders to decontaminate against")
    eval_datasets: list[str] | None = Field(
        None, description="evaluation datasets of the registry (clip.evalsets) to decontaminate against, every "
                          "split, read through the evaluation loaders; null: the evaluation stage's "
                          "evaluate.datasets (one list of evaluation data); [] : none")
    eval_root: str | None = Field(
        None, description="where those datasets lie (their folders under it); null: evaluate.data_root")
    decontaminate_synthetic: bool | None = Field(
        None, description="also decontaminate against the built-in synthetic evaluation sets; null: only when the "
                          "raw pool came from the synthetic source (its stats.json says so)")
    use_dask: bool | None = Field(
        None, description="run the near-duplicate search on the Dask cluster of the compute section: null decides "
                          "as collect does (always with compute.dask_scheduler set, never with one local worker, "
                          "else from pools of 10,000,000 samples), true / false force it either way")
    report_examples: PositiveInt = Field(
        10, description="example matches listed per evaluation dataset in the overlap report")
    # pHash sees grey levels only: a pHash match also needs 8x8 RGB thumbnails within this largest absolute
    # difference (0-255) to count, so same-layout images in different colours are not merged; null: pHash alone.
    color_tolerance: Annotated[float, Field(ge=0)] | None = Field(
        40.0, description="a pHash match also needs 8x8 RGB thumbnails within this largest absolute difference "
                          "(0-255), so same-layout images in different colours are not merged; null: pHash alone")
