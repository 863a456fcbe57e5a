"""The `train` section and its tokenizer sub-section."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from clip.config.base import NonNegativeInt, PositiveFloat, PositiveInt, Section, Uri


class TokenizerConfig(Section):
    """The text tokenizer: a byte-level BPE trained on the captions, or OpenAI CLIP's BPE."""

    kind: Literal["train", "clip_bpe"] = Field(
        "train", description="train: a BPE trained on the collected captions; clip_bpe: OpenAI CLIP's (bpe_path)")
    vocab_size: Annotated[int, Field(ge=514)] = Field(
        4096, description="vocabulary size for kind=train; 514 = 512 byte symbols + 2 specials")
    bpe_path: str | None = Field(None, description="CLIP's bpe_simple_vocab_16e6.txt.gz, for kind=clip_bpe")
    context_length: Annotated[int, Field(ge=4)] = Field(
        77, description="tokens per caption incl. start and end tokens; longer captions are truncated, end token kept")

    @model_validator(mode="after")
    def _bpe_needs_path(self) -> TokenizerConfig:
        if self.kind == "clip_bpe" and not self.bpe_path:
            raise ValueError("train.tokenizer.kind is 'clip_bpe' but train.tokenizer.bpe_path is not set")
        return self


class TrainConfig(Section):
    """train: contrastive training (torchrun, one CPU to many GPU nodes) -> models/runs/<model>-<data version>/."""

    model: str = Field("tiny-vit", description="model preset name (clip.model list_models(), e.g. tiny-vit, ViT-B-32)")
    data: Uri = Field(
        "data/shards", description="the shard stage's output (folder or s3:// prefix): its latest.json is read once at "
                                   "the start and the run trains on that data version; or one version's folder")
    output: Uri | None = Field(
        None, description="where checkpoints, final.pt, tokenizer.json and metrics.json go (path or s3://); null: "
                          "models/runs/<model>-<data_version[:12]>/, so new data starts a new run and the same data "
                          "resumes")
    batch_size: PositiveInt = Field(64, description="global batch across all ranks")
    epochs: PositiveInt = Field(4, description="passes over the data (or over samples_per_epoch when set)")
    samples_per_epoch: PositiveInt | None = Field(
        None, description="fixed epoch size in samples; required with resampled; null: the data set's size")
    resampled: bool = Field(
        False, description="sample shards with replacement (multi-node); else sequential epochs")
    lr: PositiveFloat = Field(1e-3, description="peak learning rate (AdamW), after warm-up, then cosine decay")
    weight_decay: Annotated[float, Field(ge=0)] = Field(
        0.2, description="AdamW weight decay; gains, biases, embeddings and the logit scale are not decayed")
    beta1: Annotated[float, Field(ge=0, lt=1)] = Field(0.9, description="AdamW beta1, in [0, 1)")
    beta2: Annotated[float, Field(ge=0, lt=1)] = Field(0.98, description="AdamW beta2, in [0, 1)")
    eps: PositiveFloat = Field(1e-6, description="AdamW epsilon")
    warmup_steps: NonNegativeInt = Field(20, description="steps of linear learning-rate warm-up")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the model")
    grad_checkpointing: bool = Field(
        False, description="recompute activations in backward instead of storing them (less memory, more time)")
    fsdp: bool = Field(False, description="FSDP2 fully_shard; for the large configs")
    local_loss: bool = Field(
        False, description="each rank computes only its own rows of the global logit matrix (less memory)")
    loss: Literal["clip", "siglip"] = Field(
        "clip", description="clip: CLIP's softmax contrastive loss over the global batch; siglip: SigLIP's pairwise "
                            "sigmoid loss with a learned bias (better at small batch sizes)")
    accum_steps: PositiveInt = Field(
        1, description="micro-batches per rank per step (feature-cache accumulation): the loss and gradients are "
                       "those of the whole global batch while activation memory is that of one micro-batch; the "
                       "per-rank batch must be a multiple of it")
    shuffle_buffer: NonNegativeInt = Field(
        1000, description="samples per deterministic shuffle window of each data stream")
    num_workers: NonNegativeInt = Field(2, description="data loader workers per rank")
    # Logical data streams (docs in clip/train/streams.py). None: a function of batch_size alone (the largest
    # divisor leaving >= 8 samples per stream per step), so a resume on another world size or worker count is exact.
    streams: PositiveInt | None = Field(
        None, description="logical data streams (clip/train/streams.py); null: the largest divisor of batch_size that "
                          "leaves >= 8 samples per stream per step (never depends on the world size or num_workers, "
                          "so a restart on fewer nodes or more workers resumes exactly); batch_size must be a "
                          "multiple of it, and it of the world size")
    model_overrides: dict[str, Any] = Field(
        default_factory=dict, description="create_model(model, **overrides), e.g. {image_size: 32}")
    gpu_decode: bool = Field(False, description="decode JPEGs on the GPU (torchvision); CUDA runs only")
    checkpoint_every: PositiveInt = Field(100, description="steps between checkpoints")
    keep_checkpoints: PositiveInt = Field(3, description="newest step checkpoints kept; older ones are deleted")
    max_nonfinite_steps: PositiveInt = Field(
        5, description="consecutive non-finite losses before the run stops")
    log_every: PositiveInt = Field(
        1, description="steps between metric logs (MLflow writes are asynchronous)")
    zeroshot_sets: list[str] = Field(
        default_factory=list, description="built-in synthetic sets (synthetic-shapes, synthetic-colors, "
        "synthetic-heldout) zero-shot classified after every epoch: the learning curve's per-set accuracy (MLflow, "
        "epoch_curve.csv); for pools of the synthetic source; empty: none")
    seed: int = Field(0, description="seed of model initialisation, shard order and shuffling")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="the text tokenizer")

    @model_validator(mode="after")
    def _resampled_needs_epoch_size(self) -> TrainConfig:
        if self.resampled and self.samples_per_epoch is None:
            raise ValueError("train.resampled is true but train.samples_per_epoch is not set")
        return self

    @model_validator(mode="after")
    def _context_length_agrees_with_tokenizer(self) -> TrainConfig:
        # The text tower's positional table and the tokenizer's padded length must be one number; a mismatch
        # used to surface only at step 1 as a shape error.
        override = self.model_overrides.get("context_length")
        if override is not None and override != self.tokenizer.context_length:
            raise ValueError(f"train.model_overrides.context_length is {override!r} but "
                             f"train.tokenizer.context_length is {self.tokenizer.context_length}; set both to the "
                             "same value")
        return self
