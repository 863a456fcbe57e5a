"""What every stage entry point shares: argument parsing into the typed config, metrics output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clip.config import DEFAULT_PARAMS, ConfigError, PipelineConfig, load_config


def parse_stage_args(argv: list[str] | None, description: str) -> PipelineConfig:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.batch_size=64 (repeatable)",
    )
    args = parser.parse_args(argv)
    return load_config(args.params, args.overrides)


def stage_main(run: Callable[[PipelineConfig], dict[str, Any]], description: str, argv: list[str] | None = None) -> None:
    """Entry point body of `python -m pipelines.<stage>`: config errors exit 2 with the message, nothing runs."""
    try:
        cfg = parse_stage_args(argv, description)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    run(cfg)


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write a stage's metrics JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
