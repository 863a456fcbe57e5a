"""What every stage's `run(...)` returns: its metrics and the locations of what it wrote.

`pipelines/<stage>.py` writes `metrics` to `reports/metrics/<stage>.json` (clip.formats.metrics) and prints
`outputs`; Prefect tasks hand the whole result to the next task. Each stage subclasses it to add what its
callers need (the dedup result's tables, the shard stage's data version, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)  # flat JSON-able numbers and strings
    outputs: dict[str, str] = field(default_factory=dict)  # what it wrote: name -> URI
