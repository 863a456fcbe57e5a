"""One typed configuration for the whole pipeline, loaded from params.yaml.

Each top-level section of params.yaml is one pydantic model; a stage receives its own section (and `storage` /
`tracking` / `compute` where it needs them), never the whole tree; `debug` holds test and debug aids of the
training loop. Unknown keys, wrong types and impossible values are refused before anything starts, with the dotted
key and the value named. Every field carries a description: `explain_config(cfg)` (`clip-pipeline config show
--explain`) lists every dotted key with its type, default and description.

    cfg = load_config("params.yaml", overrides=["train.batch_size=64"])
    cfg.train.batch_size  # 64

Modules: base (`Section`, the checked value types, `ConfigError`), one per stage section (collect, dedup, shard,
train, export, evaluate, promote), shared (storage, tracking, compute, debug), pipeline (`PipelineConfig`, the
whole file), load (reading params.yaml and `--set` overrides), explain (the documentation of every key). Import
from this package: `from clip.config import TrainConfig, load_config`.
"""

from clip.config.base import (
    DASK_SCHEDULER_ENV,
    TRACKING_URI_ENV,
    ConfigError,
    Fraction,
    HostPort,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Section,
    Uri,
    check_host_port,
)
from clip.config.collect import (
    CollectConfig,
    FetchConfig,
    FolderSourceConfig,
    QueriesConfig,
    SyntheticSourceConfig,
    TableSourceConfig,
    WebdatasetSourceConfig,
)
from clip.config.dedup import DedupConfig
from clip.config.evaluate import EvaluateConfig
from clip.config.explain import explain_config, iter_fields, missing_descriptions
from clip.config.export import ExportConfig
from clip.config.load import (
    DEFAULT_PARAMS,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)
from clip.config.pipeline import PipelineConfig
from clip.config.promote import PromoteConfig
from clip.config.shard import ShardConfig
from clip.config.shared import ComputeConfig, DebugConfig, StorageConfig, TrackingConfig
from clip.config.train import TokenizerConfig, TrainConfig

__all__ = [
    "DASK_SCHEDULER_ENV", "DEFAULT_PARAMS", "TRACKING_URI_ENV", "CollectConfig", "ComputeConfig", "ConfigError",
    "DebugConfig", "DedupConfig", "EvaluateConfig", "ExportConfig", "FetchConfig", "FolderSourceConfig", "Fraction",
    "HostPort", "NonNegativeInt", "PipelineConfig", "PositiveFloat", "PositiveInt", "PromoteConfig", "QueriesConfig",
    "Section", "ShardConfig", "StorageConfig", "SyntheticSourceConfig", "TableSourceConfig", "TokenizerConfig",
    "TrackingConfig", "TrainConfig", "Uri", "WebdatasetSourceConfig", "apply_overrides", "check_host_port",
    "config_from_dict", "dump_config", "explain_config", "iter_fields", "load_config", "missing_descriptions",
    "parse_override",
]
