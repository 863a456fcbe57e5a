"""`PipelineConfig`: the whole params.yaml, one field per section."""

from __future__ import annotations

from pydantic import Field

from clip.config.base import Section
from clip.config.collect import CollectConfig
from clip.config.dedup import DedupConfig
from clip.config.evaluate import EvaluateConfig
from clip.config.export import ExportConfig
from clip.config.promote import PromoteConfig
from clip.config.shard import ShardConfig
from clip.config.shared import ComputeConfig, DebugConfig, StorageConfig, TrackingConfig
from clip.config.train import TrainConfig


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
