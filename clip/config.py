"""One typed configuration for the whole pipeline, loaded from params.yaml.

Each top-level section of params.yaml is one pydantic model below; a stage receives its own section
(and `storage` / `tracking` / `compute` where it needs them), never the whole tree; `debug` holds test and
debug aids of the training loop. Unknown keys, wrong types and impossible values are refused before anything
starts, with the dotted key and the value named. Every field carries a description: `explain_config(cfg)`
(`clip-pipeline config show --explain`) lists every dotted key with its type, default and description.

    cfg = load_config("params.yaml", overrides=["train.batch_size=64"])
    cfg.train.batch_size  # 64
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

DEFAULT_PARAMS = "params.yaml"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every offending key and value."""


# Where the pipeline finds a team stack when params.yaml does not name it (README "Run it on your team's stack"):
# the variables MLflow and Dask themselves read.
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DASK_SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"

# AWS bucket naming rules: 3-63 characters; lowercase letters, digits, dots and hyphens; a letter or digit at each end.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _check_uri(value: str) -> str:
    """A location: a local path or s3://bucket[/prefix] with a valid bucket name."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty path or s3:// URL")
    if "://" in value:
        scheme, rest = value.split("://", 1)
        if scheme != "s3":
            raise ValueError(f"unsupported URL scheme {scheme!r}; use a local path or s3://bucket/prefix")
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise ValueError("s3 URL has no bucket; expected s3://bucket/prefix")
        if not _BUCKET_NAME.fullmatch(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}: 3-63 characters, lowercase letters, digits, dots "
                             "and hyphens, starting and ending with a letter or digit")
    return value


def check_host_port(value: str | None) -> str | None:
    """A rendezvous endpoint: host:port (IPv6 as [addr]:port), port 1-65535."""
    if value is None:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port, e.g. head-node:29400")
    return value


def _no_credentials(value: str | None) -> str | None:
    """A service URL without credentials: params.yaml is committed, printed and logged as MLflow params."""
    from clip.storage.redact import redact  # here, not at the top: clip.storage imports this module

    if value is not None and redact(value) != value:
        raise ValueError("must not carry credentials (user:password@ or a secret query value); they come from the "
                         "environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile for S3, "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for MLflow")
    return value


def _default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, checked here so that a refusal names the variable; else the local store."""
    from clip.storage.redact import redact

    value = os.environ.get(TRACKING_URI_ENV)
    if not value:
        return "sqlite:///mlflow.db"
    try:
        return str(_no_credentials(value))
    except ValueError as exc:
        raise ConfigError(f"{TRACKING_URI_ENV}: {exc} (got {redact(value)!r})") from None


Uri = Annotated[str, AfterValidator(_check_uri)]
HostPort = Annotated[str | None, AfterValidator(check_host_port)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated, and types are strict: `true`
    is not the number 1, 1.5 or "3" not an integer (an integer is still a valid float). YAML already types the
    values of params.yaml and of `--set`, so strictness refuses only what was mistyped."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


# ----------------------------------------------------------------------------------------------------------
# Shared sections


class StorageConfig(Section):
    """Where objects live. Credentials never come from here: boto3's standard chain supplies them."""

    endpoint_url: Annotated[str | None, AfterValidator(_no_credentials)] = Field(
        None, description="S3-compatible endpoint URL (MinIO, Ceph, ...); AWS_ENDPOINT_URL overrides it when set; "
                          "null: AWS S3")
    region: str | None = Field(None, description="S3 region name passed to boto3; null: boto3's own default")
    multipart_threshold_mb: PositiveInt = Field(64, description="objects at least this big (MiB) go up in parts")
    multipart_chunk_mb: PositiveInt = Field(16, description="size (MiB) of each part of a multipart upload")
    max_attempts: PositiveInt = Field(
        8, description="attempts per S3 request, on throttling, 5xx and connection errors")
    backoff_base_s: PositiveFloat = Field(
        0.2, description="base delay (seconds) of the exponential backoff with jitter between attempts")
    max_concurrency: PositiveInt = Field(8, description="parallel part / object uploads")


class TrackingConfig(Section):
    """MLflow tracking of runs (params, metrics, artifacts, data version)."""

    enabled: bool = Field(True, description="log runs to MLflow; false: no tracking at all")
    uri: Annotated[str, AfterValidator(_no_credentials)] = Field(
        default_factory=lambda: _default_tracking_uri(),
        description=f"MLflow tracking URI: a local SQLite store or an http(s):// server; unset: {TRACKING_URI_ENV} "
                    "when set (a team server; its login: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), "
                    "else sqlite:///mlflow.db")
    artifact_location: str | None = Field(
        None, description="artifact root of the experiment; only used when the experiment is created. Unset: "
                          "mlartifacts beside a local store, mlflow-artifacts:/<experiment> on an http(s) server "
                          "(the server's own artifact store, e.g. its --artifacts-destination bucket)")
    experiment: str = Field("clip", description="MLflow experiment name the runs are logged under")
    parent_run_id: str | None = Field(
        None, description="nest every stage run under this MLflow run (set by the pipeline flow for one execution)")
    run_tags: dict[str, str] = Field(
        default_factory=dict, description="extra tags on every stage run (the flow sets the Prefect flow run id)")

    @model_validator(mode="before")
    @classmethod
    def _artifacts_follow_the_store(cls, data: Any) -> Any:
        """An unset artifact_location follows the store, so that pointing MLFLOW_TRACKING_URI at a server is
        enough: a local folder written by this machine would be unreachable for the server's other users."""
        if not isinstance(data, dict) or data.get("artifact_location") is not None:
            return data
        uri = data.get("uri") or os.environ.get(TRACKING_URI_ENV) or ""
        served = isinstance(uri, str) and uri.startswith(("http://", "https://"))
        experiment = data.get("experiment", "clip")
        return {**data, "artifact_location": f"mlflow-artifacts:/{experiment}" if served else "mlartifacts"}


class ComputeConfig(Section):
    """Devices, processes and the Dask cluster the stages run on."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="training device: auto (CUDA when available, else CPU), cpu, or cuda (refused without one)")
    nproc_per_node: PositiveInt = Field(
        1, description="training processes per node (torchrun --nproc-per-node); more than one process in all "
                    "makes the train stage launch torchrun")
    nnodes: PositiveInt = Field(1, description="number of nodes of a training job (torchrun --nnodes)")
    rdzv_endpoint: HostPort = Field(None, description="host:port of the c10d rendezvous for multi-node training")
    node_rank: NonNegativeInt | None = Field(
        None, description="this node's rank in a multi-node training job (torchrun --node-rank); null: assigned by "
                          "the c10d rendezvous")
    max_restarts: NonNegativeInt = Field(
        0, description="torchrun --max-restarts: times the training workers are restarted after a failure (they "
                       "resume from the newest checkpoint); more than 0 makes the train stage launch torchrun")
    dask_scheduler: str | None = Field(
        default_factory=lambda: os.environ.get(DASK_SCHEDULER_ENV) or None,
        description=f"address of an existing Dask cluster (tcp://host:8786); unset: {DASK_SCHEDULER_ENV} when set "
                    "(Dask's own variable), else null; null starts a local cluster")
    dask_workers: PositiveInt = Field(2, description="worker processes of the local Dask cluster")
    threads_per_worker: PositiveInt = Field(1, description="threads per worker of the local Dask cluster")


class DebugConfig(Section):
    """Test and debug aids, read by every training rank. Leave them at their defaults in real runs."""

    keys_log: str | None = Field(
        None, description="test/debug aid: each training rank appends JSON lines to <keys_log>.rank<R>: "
                          "{event: start, from_step, restart} at start and {step, keys} per trained step (the sample "
                          "keys of its part of the global batch); null: off")
    fault_nonfinite_steps: list[PositiveInt] = Field(
        default_factory=list, description="test/debug aid: make the training loss NaN at these 1-based steps "
                                          "(exercises the non-finite loss guard); []: off")
    fault_step_delay_s: Annotated[float, Field(ge=0)] = Field(
        0.0, description="test/debug aid: sleep this many seconds after every training step (tests that kill a "
                         "worker mid-run); 0: off")


# ----------------------------------------------------------------------------------------------------------
# collect


class TableSourceConfig(Section):
    """(url, caption) metadata tables: the form CC3M, CC12M, LAION and DataComp publish."""

    paths: list[str] = Field(
        default_factory=list, description="metadata files or globs (local or s3://): .parquet, .csv, .tsv, .jsonl")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = Field(
        "auto", description="file format; auto: from each file's extension")
    url_column: str = Field("url", description="column holding the image URL")
    caption_column: str = Field("caption", description="column holding the caption")


class FolderSourceConfig(Section):
    """A folder of images with sidecar caption files (img.jpg + img.txt)."""

    path: str | None = Field(None, description="the folder of images and captions; required for source: folder")
    caption_extension: str = Field(".txt", description="extension of the caption file next to each image")


class WebdatasetSourceConfig(Section):
    """Existing webdataset tars of (image, caption) samples."""

    urls: list[str] = Field(default_factory=list, description="tar paths, brace patterns or s3:// URLs")
    caption_key: str = Field("txt", description="member extension of the caption in each sample")
    image_keys: list[str] = Field(
        default_factory=lambda: ["jpg", "jpeg", "png", "webp"],
        description="member extensions tried, in order, for the image of each sample")


class SyntheticSourceConfig(Section):
    """Built-in generator: deterministic scenes (shapes, colours, sizes, counts, positions, words)."""

    num_samples: PositiveInt = Field(4096, description="number of generated (image, caption) candidates")
    image_size: PositiveInt = Field(64, description="side (pixels) of the generated square images")
    heldout_fraction: Fraction = Field(
        0.2, description="share of attribute combinations never shown in training (held out for evaluation)")


class QueriesConfig(Section):
    """The query list captions are matched against (data/queries.txt), as in the CLIP paper."""

    corpus_paths: list[str] = Field(default_factory=list, description="text files to mine words and bigrams from")
    extra_lists: list[str] = Field(
        default_factory=list, description="user query lists (titles, synsets), one query per line")
    min_word_count: PositiveInt = Field(
        100, description="a word becomes a query when it occurs at least this often (the paper's value: 100)")
    min_bigram_count: PositiveInt = Field(20, description="a bigram is a candidate query when it occurs this often")
    min_pmi: float = Field(3.0, description="minimum pointwise mutual information of a bigram kept as a query")
    max_queries: PositiveInt = Field(500_000, description="at most this many mined queries, the most frequent kept")
    from_captions: bool = Field(
        True, description="when no corpus is given, mine the candidate captions themselves")


class FetchConfig(Section):
    """Downloading images: politeness, safety limits, and image validation and re-encoding."""

    threads: PositiveInt = Field(64, description="concurrent download threads")
    timeout_s: PositiveFloat = Field(
        10.0, description="per request, in seconds: DNS look-up, connect and read each")
    total_timeout_s: PositiveFloat | None = Field(
        None, description="bound (seconds) on a whole exchange incl. the body (slow-drip bound); null: 3 x timeout_s")
    retries: NonNegativeInt = Field(2, description="retries of a request that failed with a retryable error")
    backoff_base_s: PositiveFloat = Field(
        0.5, description="base delay (seconds) of the exponential backoff with jitter between retries")
    max_retry_after_s: PositiveFloat = Field(
        30.0, description="cap (seconds) on a server's Retry-After wait; longer waits are cut to it")
    max_bytes: PositiveInt = Field(20_000_000, description="largest image body (bytes); reading stops past it")
    user_agent: str = Field(
        "clip-pipeline/0.1 (+https://github.com/clip-pipeline/clip-pipeline)",
        description="User-Agent header sent with every request")
    respect_robots_txt: bool = Field(False, description="fetch and obey each host's robots.txt")
    respect_x_robots_tag: bool = Field(
        True, description="skip images served with X-Robots-Tag noai / noimageai (read from the headers)")
    allow_private_addresses: bool = Field(
        False, description="private, loopback, link-local, metadata addresses: refused unless true")
    allow_loopback: bool = Field(
        False, description="let loopback addresses (127.0.0.0/8, ::1) only through; for local tests")
    per_host_concurrency: PositiveInt = Field(8, description="concurrent requests to one host")
    per_host_rate: PositiveFloat = Field(50.0, description="requests per second per host")
    dns_ttl_s: PositiveFloat = Field(300.0, description="how long (seconds) a host's DNS answer is cached")
    max_redirects: NonNegativeInt = Field(5, description="redirects followed per request, each hop checked again")
    # image validation and re-encoding
    min_size: PositiveInt = Field(32, description="images with a side shorter than this (pixels) are rejected")
    max_aspect_ratio: PositiveFloat = Field(
        3.0, description="images whose long side exceeds this multiple of the short side are rejected")
    max_pixels: PositiveInt = Field(
        89_478_485, description="decompression-bomb limit: width x height above it is rejected (PIL's default)")
    max_side: PositiveInt = Field(
        256, description="stored images are shrunk so the longest side is at most this (pixels); never upscaled")
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = Field(90, description="JPEG quality of the re-encoded images")
    retry_failed: bool = Field(
        False, description="on a rerun, try again candidates that failed with a retryable error")


class CollectConfig(Section):
    """collect: build queries, match and balance candidate pairs, fetch and validate images -> data/raw/."""

    source: Literal["synthetic", "table", "folder", "webdataset"] = Field(
        "synthetic", description="where candidate pairs come from (the matching sub-section configures it)")
    output_dir: Uri = Field(
        "data/raw", description="raw shards, candidates.parquet and stats (local path or s3://bucket/prefix)")
    queries_path: str = Field("data/queries.txt", description="where the query list is written, one per line")
    per_query_cap: PositiveInt = Field(20_000, description="K: at most this many pairs per query")
    samples_per_shard: PositiveInt = Field(1000, description="samples per raw webdataset shard")
    partition_size: PositiveInt = Field(10_000, description="candidates per Dask partition")
    max_caption_bytes: PositiveInt = Field(
        4096, description="captions longer than this many UTF-8 bytes are refused (reason caption_too_long)")
    seed: int = Field(0, description="random seed of the synthetic generator and of the per-query balancing")
    queries: QueriesConfig = Field(default_factory=QueriesConfig, description="the query list")
    table: TableSourceConfig = Field(default_factory=TableSourceConfig, description="settings of source: table")
    folder: FolderSourceConfig = Field(default_factory=FolderSourceConfig, description="settings of source: folder")
    webdataset: WebdatasetSourceConfig = Field(
        default_factory=WebdatasetSourceConfig, description="settings of source: webdataset")
    synthetic: SyntheticSourceConfig = Field(
        default_factory=SyntheticSourceConfig, description="settings of source: synthetic")
    fetch: FetchConfig = Field(default_factory=FetchConfig, description="image downloading and validation")

    @model_validator(mode="after")
    def _source_has_input(self) -> CollectConfig:
        if self.source == "table" and not self.table.paths:
            raise ValueError("collect.source is 'table' but collect.table.paths is empty")
        if self.source == "folder" and not self.folder.path:
            raise ValueError("collect.source is 'folder' but collect.folder.path is not set")
        if self.source == "webdataset" and not self.webdataset.urls:
            raise ValueError("collect.source is 'webdataset' but collect.webdataset.urls is empty")
        return self


# ----------------------------------------------------------------------------------------------------------
# dedup and shard


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
    use_dask: bool = Field(
        False, description="partition the near-duplicate search over a Dask cluster (compute section)")
    report_examples: PositiveInt = Field(
        10, description="example matches listed per evaluation dataset in the overlap report")
    # pHash sees grey levels only: a pHash match also needs 8x8 RGB thumbnails within this largest absolute
    # difference (0-255) to count, so same-layout images in different colours are not merged; null: pHash alone.
    color_tolerance: Annotated[float, Field(ge=0)] | None = Field(
        40.0, description="a pHash match also needs 8x8 RGB thumbnails within this largest absolute difference "
                          "(0-255), so same-layout images in different colours are not merged; null: pHash alone")


class ShardConfig(Section):
    """shard: write shuffled webdataset shards + manifest, publish to local disk or S3 -> data/shards/."""

    input_dir: Uri = Field("data/raw", description="the collect stage's output (local path or s3://bucket/prefix)")
    dedup_dir: str = Field("data/dedup", description="the dedup stage's output (its keep-list is applied)")
    output: Uri = Field(
        "data/shards", description="local folder or s3://bucket/prefix: each data version is published to "
                                   "<output>/<data_version>/ (never rewritten), then <output>/latest.json points at it")
    staging_dir: str = Field(
        "data/shards-staging", description="local folder for shards on their way to S3 (at most upload_workers at "
                                           "once, each deleted once uploaded) and for raw shards read from S3")
    samples_per_shard: PositiveInt = Field(1000, description="samples per training shard")
    max_shard_bytes: PositiveInt = Field(
        256 * 1024 * 1024,
        description="a shard is cut before it grows past this many bytes (a larger single sample gets a shard alone)")
    seed: int = Field(0, description="seed of the shuffle of samples across shards")
    upload_workers: PositiveInt = Field(
        8, description="parallel shard uploads when output is s3; also the most shard files on local disk at once")


# ----------------------------------------------------------------------------------------------------------
# train


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


# ----------------------------------------------------------------------------------------------------------
# export, evaluate, promote (stages that later issues fill in)


class ExportConfig(Section):
    """export: ONNX encoders + tokenizer + preprocessing, checked against the checkpoint -> models/bundle/."""

    checkpoint: Uri | None = Field(
        None, description="a checkpoint file (final.pt) or a training run folder (its final.pt); null: the run of "
                          "the data version train.data's latest.json names (train.output, else "
                          "<runs_dir>/<train.model>-<data_version[:12]>)")
    runs_dir: Uri = Field("models/runs", description="where the training runs are when checkpoint is null")
    output_dir: Uri = Field(
        "models/bundle", description="where the bundle is written (local folder or s3://bucket/prefix); replaced "
                                     "only once the new export passed the parity gate")
    opset: Annotated[int, Field(ge=18)] = Field(18, description="ONNX opset version (18 or newer)")
    parity_min_cosine: Annotated[float, Field(gt=0, le=1)] = Field(
        0.9999, description="parity gate: smallest cosine similarity allowed between an ONNX embedding and the "
                            "PyTorch float32 one (every image and text pair)")
    parity_max_abs_diff: PositiveFloat = Field(
        1e-4, description="parity gate: largest absolute difference allowed between the normalised ONNX and "
                          "PyTorch embeddings")
    parity_seed: int = Field(0, description="seed of the parity gate's random images")
    int8: bool = Field(
        False, description="also write a dynamically quantized int8 image encoder beside the float one "
                           "(image_encoder.int8.onnx; its size, speed and embedding difference in the metrics)")


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


class PipelineConfig(Section):
    """The whole params.yaml: one section per stage plus the shared sections."""

    collect: CollectConfig = Field(default_factory=CollectConfig, description=CollectConfig.__doc__)
    dedup: DedupConfig = Field(default_factory=DedupConfig, description=DedupConfig.__doc__)
    shard: ShardConfig = Field(default_factory=ShardConfig, description=ShardConfig.__doc__)
    train: TrainConfig = Field(default_factory=TrainConfig, description=TrainConfig.__doc__)
    export: ExportConfig = Field(default_factory=ExportConfig, description=ExportConfig.__doc__)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description=EvaluateConfig.__doc__)
    promote: PromoteConfig = Field(default_factory=PromoteConfig, description=PromoteConfig.__doc__)
    storage: StorageConfig = Field(default_factory=StorageConfig, description=StorageConfig.__doc__)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description=TrackingConfig.__doc__)
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description=ComputeConfig.__doc__)
    debug: DebugConfig = Field(default_factory=DebugConfig, description=DebugConfig.__doc__)


# ----------------------------------------------------------------------------------------------------------
# loading


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (PyYAML keeps the last silently) and reading `1e-3` as a
    number (YAML 1.2; PyYAML's YAML 1.1 rules make it a string, which strict float fields refuse)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: keys written next to it override the merged ones, by design
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, Hashable) and key in seen:
                    raise ConfigError(f"{key_node.start_mark.name}: duplicate key {key!r} at lines {seen[key]} and "
                                      f"{line} (give each key once)")
                if isinstance(key, Hashable):
                    seen[key] = line
        return super().construct_mapping(node, deep)


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load_yaml(text: str, name: str) -> Any:
    """Parse `text` with _ParamsLoader; `name` (a file, an override) is what error messages name."""
    loader = _ParamsLoader(text)
    loader.name = name  # marks (and so our messages) name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _format_validation_error(err: ValidationError, data: dict[str, Any]) -> str:
    from clip.storage.redact import redact  # a refused value may be a URL with credentials: never echo them

    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc) if loc else "<root>"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (value {item['input']!r})")
        elif item["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif loc and item["type"] in ("value_error", "assertion_error") and isinstance(item["input"], dict):
            lines.append(f"{key}: {msg}")  # a section-level rule; the message names its keys
        else:
            lines.append(redact(f"{key}: {msg} (got {item['input']!r})"))
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"  # one line for one mistake
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_override(override: str) -> tuple[list[str], Any]:
    """`train.batch_size=64` -> (["train", "batch_size"], 64); the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. train.batch_size=64)")
    key, raw = override.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {override!r} has an empty key part")
    try:
        value = _load_yaml(raw, f"--set {key}") if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for override in overrides:
        path, value = parse_override(override)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, data)) from None


def load_config(path: str | Path | None = DEFAULT_PARAMS, overrides: list[str] | None = None) -> PipelineConfig:
    """Load params.yaml (missing file: all defaults) and apply `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        try:
            loaded = _load_yaml(Path(path).read_text(), str(path))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    elif path is not None and Path(path) != Path(DEFAULT_PARAMS):
        raise ConfigError(f"params file {path} does not exist")
    return config_from_dict(apply_overrides(data, list(overrides or [])))


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------
# documentation: every key with its type, default and description (`clip-pipeline config show --explain`)


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def iter_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every field of `model` and of its nested sections, depth first: (dotted key, field info)."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key, info
        if _is_section(info.annotation):
            yield from iter_fields(info.annotation, key + ".")


def missing_descriptions(model: type[BaseModel] = PipelineConfig) -> list[str]:
    """Dotted keys of the fields (nested sections included) that have no non-empty description."""
    return [key for key, info in iter_fields(model) if not (info.description or "").strip()]


_CONSTRAINTS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _type_name(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """A short human name of a field's type: `int > 0`, `'auto' | 'cpu'`, `str (path or s3:// URL) | null`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0], list(args[1:]))
    if origin is Literal:
        name = " | ".join(repr(a) for a in args)
    elif origin in (Union, UnionType):
        name = " | ".join(_type_name(a) for a in args)
    elif annotation is type(None):
        name = "null"
    elif annotation is Any:
        name = "any"
    elif origin is not None:
        name = f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    else:
        name = getattr(annotation, "__name__", str(annotation))
    bounds = []
    for item in metadata:
        for group in getattr(item, "metadata", None) or [item]:  # a nested Field(...) carries its own metadata
            for attr, symbol in _CONSTRAINTS:
                bound = getattr(group, attr, None)
                if bound is not None:
                    bounds.append(f"{symbol} {bound}")
        func = getattr(item, "func", None)
        if func is _check_uri:
            name += " (path or s3:// URL)"
        elif func is check_host_port:
            name = "host:port | null"
    return f"{name} {', '.join(bounds)}" if bounds else name


def _render(value: Any) -> str:
    """A value as it would be written after `--set key=` (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def explain_config(cfg: PipelineConfig | None = None) -> str:
    """Every dotted key, nested sections included: type, default, the current value where it differs, description."""
    cfg = cfg if cfg is not None else PipelineConfig()
    lines: list[str] = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, info in type(model).model_fields.items():
            key, value = f"{prefix}{name}", getattr(model, name)
            description = " ".join((info.description or "").split())
            if _is_section(info.annotation):
                lines.extend(["", f"{key}  [section]", f"    {description}"])
                walk(value, key + ".")
                continue
            default = _plain(info.get_default(call_default_factory=True))
            head = f"{key}  [{_type_name(info.annotation, info.metadata)}]  default: {_render(default)}"
            if _plain(value) != default:
                head += f"  current: {_render(_plain(value))}"
            lines.extend([head, f"    {description}"])

    walk(cfg, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _plain(value: Any) -> Any:
    """Models, tuples and nested containers as plain YAML-able data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
