"""One typed configuration for the whole pipeline, loaded from params.yaml.

Each top-level section of params.yaml is one pydantic model below; a stage receives its own section
(and `storage` / `tracking` / `compute` where it needs them), never the whole tree. Unknown keys, wrong
types and impossible values are refused before anything starts, with the dotted key and the value named.

    cfg = load_config("params.yaml", overrides=["train.batch_size=64"])
    cfg.train.batch_size  # 64
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS = "params.yaml"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every offending key and value."""


def _check_uri(value: str) -> str:
    """A location: a local path or s3://bucket[/prefix]. Refuses an s3 URL with no bucket."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty path or s3:// URL")
    if "://" in value:
        scheme, rest = value.split("://", 1)
        if scheme != "s3":
            raise ValueError(f"unsupported URL scheme {scheme!r}; use a local path or s3://bucket/prefix")
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise ValueError("s3 URL has no bucket; expected s3://bucket/prefix")
    return value


def check_host_port(value: str | None) -> str | None:
    """A rendezvous endpoint: host:port (IPv6 as [addr]:port), port 1-65535."""
    if value is None:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port, e.g. head-node:29400")
    return value


Uri = Annotated[str, AfterValidator(_check_uri)]
HostPort = Annotated[str | None, AfterValidator(check_host_port)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------------------
# Shared sections


class StorageConfig(Section):
    """Where objects live. Credentials never come from here: boto3's standard chain supplies them."""

    endpoint_url: str | None = None  # S3-compatible endpoint; AWS_ENDPOINT_URL overrides when set
    region: str | None = None
    multipart_threshold_mb: PositiveInt = 64  # objects at least this big go up in parts
    multipart_chunk_mb: PositiveInt = 16
    max_attempts: PositiveInt = 8  # per request, on throttling, 5xx and connection errors
    backoff_base_s: PositiveFloat = 0.2
    max_concurrency: PositiveInt = 8  # parallel part / object uploads


class TrackingConfig(Section):
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"  # local SQLite store; an http(s):// server URI works too
    artifact_location: str = "mlartifacts"  # only used when the experiment is created
    experiment: str = "clip"


class ComputeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    nproc_per_node: PositiveInt = 1
    nnodes: PositiveInt = 1
    rdzv_endpoint: HostPort = None  # host:port for multi-node c10d rendezvous
    dask_scheduler: str | None = None  # address of an existing Dask cluster; None starts a local one
    dask_workers: PositiveInt = 2
    threads_per_worker: PositiveInt = 1


# ----------------------------------------------------------------------------------------------------------
# collect


class TableSourceConfig(Section):
    """(url, caption) metadata tables: the form CC3M, CC12M, LAION and DataComp publish."""

    paths: list[str] = Field(default_factory=list)  # files or globs; .parquet, .csv, .tsv, .jsonl
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    url_column: str = "url"
    caption_column: str = "caption"


class FolderSourceConfig(Section):
    """A folder of images with sidecar caption files (img.jpg + img.txt)."""

    path: str | None = None
    caption_extension: str = ".txt"


class WebdatasetSourceConfig(Section):
    urls: list[str] = Field(default_factory=list)  # tar paths, brace patterns or s3:// URLs
    caption_key: str = "txt"
    image_keys: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])


class SyntheticSourceConfig(Section):
    """Built-in generator: deterministic scenes (shapes, colours, sizes, counts, positions, words)."""

    num_samples: PositiveInt = 4096
    image_size: PositiveInt = 64
    heldout_fraction: Fraction = 0.2  # share of attribute combinations never shown in training


class QueriesConfig(Section):
    corpus_paths: list[str] = Field(default_factory=list)  # text files to mine words and bigrams from
    extra_lists: list[str] = Field(default_factory=list)  # user lists (titles, synsets), one per line
    min_word_count: PositiveInt = 100  # the paper kept words occurring at least 100 times
    min_bigram_count: PositiveInt = 20
    min_pmi: float = 3.0
    max_queries: PositiveInt = 500_000
    from_captions: bool = True  # when no corpus is given, mine the candidate captions themselves


class FetchConfig(Section):
    threads: PositiveInt = 64
    timeout_s: PositiveFloat = 10.0  # per request: DNS look-up, connect and read each
    total_timeout_s: PositiveFloat | None = None  # whole exchange incl. body (slow-drip bound); None: 3 x timeout_s
    retries: NonNegativeInt = 2
    backoff_base_s: PositiveFloat = 0.5
    max_retry_after_s: PositiveFloat = 30.0
    max_bytes: PositiveInt = 20_000_000
    user_agent: str = "clip-pipeline/0.1 (+https://github.com/clip-pipeline/clip-pipeline)"
    respect_robots_txt: bool = False
    respect_x_robots_tag: bool = True
    allow_private_addresses: bool = False  # private, loopback, link-local, metadata: refused unless true
    allow_loopback: bool = False
    per_host_concurrency: PositiveInt = 8
    per_host_rate: PositiveFloat = 50.0  # requests per second per host
    dns_ttl_s: PositiveFloat = 300.0
    max_redirects: NonNegativeInt = 5
    # image validation and re-encoding
    min_size: PositiveInt = 32
    max_aspect_ratio: PositiveFloat = 3.0
    max_pixels: PositiveInt = 89_478_485  # decompression-bomb limit (PIL's default)
    max_side: PositiveInt = 256
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 90
    retry_failed: bool = False  # on a rerun, try again candidates that failed with a retryable error


class CollectConfig(Section):
    source: Literal["synthetic", "table", "folder", "webdataset"] = "synthetic"
    output_dir: Uri = "data/raw"
    queries_path: str = "data/queries.txt"
    per_query_cap: PositiveInt = 20_000  # K: at most this many pairs per query
    samples_per_shard: PositiveInt = 1000
    partition_size: PositiveInt = 10_000  # candidates per Dask partition
    seed: int = 0
    queries: QueriesConfig = Field(default_factory=QueriesConfig)
    table: TableSourceConfig = Field(default_factory=TableSourceConfig)
    folder: FolderSourceConfig = Field(default_factory=FolderSourceConfig)
    webdataset: WebdatasetSourceConfig = Field(default_factory=WebdatasetSourceConfig)
    synthetic: SyntheticSourceConfig = Field(default_factory=SyntheticSourceConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)

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
    input_dir: Uri = "data/raw"
    output_dir: str = "data/dedup"
    near_dup_threshold: Annotated[int, Field(ge=0, le=32)] = 4  # max Hamming distance of 64-bit pHashes
    exact_caption_image: bool = True
    near_duplicates: bool = True
    eval_dirs: list[str] = Field(default_factory=list)  # evaluation image folders to decontaminate against
    decontaminate_synthetic: bool = True  # also the built-in synthetic evaluation sets
    use_dask: bool = False  # partition the near-duplicate search over a Dask cluster (compute section)
    report_examples: PositiveInt = 10
    # pHash sees grey levels only: a pHash match also needs 8x8 RGB thumbnails within this largest absolute
    # difference (0-255) to count, so same-layout images in different colours are not merged; null: pHash alone.
    color_tolerance: Annotated[float, Field(ge=0)] | None = 40.0


class ShardConfig(Section):
    input_dir: Uri = "data/raw"
    dedup_dir: str = "data/dedup"
    output: Uri = "data/shards"  # local folder or s3://bucket/prefix: where the data version is published
    staging_dir: str = "data/shards-staging"  # local tars are written here before upload when output is s3
    samples_per_shard: PositiveInt = 1000
    max_shard_bytes: PositiveInt = 256 * 1024 * 1024
    seed: int = 0
    upload_workers: PositiveInt = 8


# ----------------------------------------------------------------------------------------------------------
# train


class TokenizerConfig(Section):
    kind: Literal["train", "clip_bpe"] = "train"
    vocab_size: Annotated[int, Field(ge=514)] = 4096  # for kind=train; 514 = 512 byte symbols + 2 specials
    bpe_path: str | None = None  # CLIP's bpe_simple_vocab_16e6.txt.gz, for kind=clip_bpe
    context_length: Annotated[int, Field(ge=4)] = 77

    @model_validator(mode="after")
    def _bpe_needs_path(self) -> TokenizerConfig:
        if self.kind == "clip_bpe" and not self.bpe_path:
            raise ValueError("train.tokenizer.kind is 'clip_bpe' but train.tokenizer.bpe_path is not set")
        return self


class TrainConfig(Section):
    model: str = "tiny-vit"
    data: Uri = "data/shards"  # the shard stage's output (folder or s3:// prefix holding manifest.json)
    output: Uri = "models/checkpoints"
    batch_size: PositiveInt = 64  # global batch across all ranks
    epochs: PositiveInt = 4
    samples_per_epoch: PositiveInt | None = None  # fixed epoch size; required with resampled
    resampled: bool = False  # sample shards with replacement (multi-node); else sequential epochs
    lr: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.2
    beta1: Fraction = 0.9
    beta2: Fraction = 0.98
    eps: PositiveFloat = 1e-6
    warmup_steps: NonNegativeInt = 20
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 fully_shard; for the large configs
    local_loss: bool = False
    shuffle_buffer: NonNegativeInt = 1000  # samples per deterministic shuffle window of each data stream
    num_workers: NonNegativeInt = 2  # data loader workers per rank
    # Logical data streams (docs in clip/train/data.py); None: world_size * max(1, num_workers). Keep it
    # fixed to resume on a different world size; batch_size must be a multiple, and it of the world size.
    streams: PositiveInt | None = None
    model_overrides: dict[str, Any] = Field(default_factory=dict)  # create_model(model, **overrides), e.g. image_size
    gpu_decode: bool = False
    checkpoint_every: PositiveInt = 100  # steps
    keep_checkpoints: PositiveInt = 3
    max_nonfinite_steps: PositiveInt = 5  # consecutive non-finite losses before the run stops
    log_every: PositiveInt = 1  # steps between metric logs (MLflow writes are asynchronous)
    seed: int = 0
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)

    @model_validator(mode="after")
    def _resampled_needs_epoch_size(self) -> TrainConfig:
        if self.resampled and self.samples_per_epoch is None:
            raise ValueError("train.resampled is true but train.samples_per_epoch is not set")
        return self


# ----------------------------------------------------------------------------------------------------------
# export, evaluate, promote (stages that later issues fill in)


class ExportConfig(Section):
    checkpoint: Uri = "models/checkpoints"  # a checkpoint file or the train output folder (newest final)
    output_dir: str = "models/bundle"
    opset: Annotated[int, Field(ge=13)] = 17
    atol: PositiveFloat = 1e-4


class EvaluateConfig(Section):
    bundle: str = "models/bundle"
    output_dir: str = "reports/eval"
    data_root: str = "data/eval"  # real evaluation datasets, when present on disk
    datasets: list[str] = Field(default_factory=lambda: ["synthetic"])
    batch_size: PositiveInt = 256
    linear_probe: bool = True


class PromoteConfig(Section):
    model_name: str = "clip"
    alias: str = "champion"
    metric: str = "zeroshot_top1_mean"
    min_improvement: float = 0.0


class PipelineConfig(Section):
    collect: CollectConfig = Field(default_factory=CollectConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)


# ----------------------------------------------------------------------------------------------------------
# loading


def _format_validation_error(err: ValidationError, data: dict[str, Any]) -> str:
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
            lines.append(f"{key}: {msg} (got {item['input']!r})")
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
        value = yaml.safe_load(raw) if raw.strip() else ""
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
            loaded = yaml.safe_load(Path(path).read_text())
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
