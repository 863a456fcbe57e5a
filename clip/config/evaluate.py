"""The `evaluate` section."""

from __future__ import annotations

from pydantic import Field, model_validator

from clip.config.base import NonNegativeInt, PositiveInt, Section, Uri


class EvaluateConfig(Section):
    """evaluate: zero-shot and linear-probe evaluation -> reports/eval/."""

    bundle: Uri = Field("models/bundle", description="the export stage's bundle to evaluate (onnxruntime; the default)")
    checkpoint: Uri | None = Field(
        None, description="a PyTorch checkpoint (final.pt, or a run folder) to evaluate instead of the bundle")
    output_dir: Uri = Field("reports/eval", description="results table and plots (local folder or s3://)")
    data_root: str = Field("data/eval", description="folder holding the real evaluation datasets (--root)")
    datasets: list[str] = Field(
        default_factory=lambda: ["synthetic"],
        description="datasets to evaluate: registry keys (clip.eval.list_datasets()), flickr30k / coco (retrieval), "
                    "synthetic-shapes / synthetic-colors / synthetic-heldout, or 'synthetic' for all three")
    batch_size: PositiveInt = Field(256, description="images per evaluation batch")
    workers: PositiveInt = Field(4, description="threads decoding and preprocessing images ahead of the encoder")
    linear_probe: bool = Field(True, description="also fit and score linear probes on the image features")
    probe_workers: PositiveInt = Field(2, description="logistic regressions fitted in parallel during the C search")
    cache_dir: Uri | None = Field(
        "data/eval_features", description="cache of extracted features per (model, dataset, split); null: no cache")
    synthetic_samples: PositiveInt = Field(300, description="images per split of each built-in synthetic set")
    synthetic_seed: NonNegativeInt = Field(0, description="seed of the built-in synthetic sets (test; train: +1)")
    synthetic_heldout_fraction: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="held-out colour x shape share of synthetic-heldout; set it to collect.synthetic.heldout_fraction "
                    "when that is not the default (null: the generator's default)")
    plots: bool = Field(True, description="write PNG plots (per-dataset bars, confusion matrices)")
    few_shot: list[PositiveInt] = Field(
        default_factory=list,
        description="few-shot linear probes on k labelled train images per class, e.g. [1, 2, 4, 8, 16]; also the "
                    "shots a probe needs to match zero-shot (clip.eval.fewshot); empty: off")
    few_shot_seeds: list[NonNegativeInt] = Field(
        default_factory=lambda: [0, 1, 2],
        description="seeds of the k-shot draws: one probe per seed and k, the mean and spread reported")

    @model_validator(mode="after")
    def _few_shot_lists(self) -> EvaluateConfig:
        for name in ("few_shot", "few_shot_seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"evaluate.{name} repeats a value: {values}")
        if self.few_shot and not self.few_shot_seeds:
            raise ValueError("evaluate.few_shot is set but evaluate.few_shot_seeds is empty: name at least one seed")
        return self
