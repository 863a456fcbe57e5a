"""What every stage entry point shares: argument parsing into the typed config, metrics output."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clip import storage
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


DEBUG_ENV = "CLIP_PIPELINE_DEBUG"


def is_user_error(err: BaseException) -> bool:
    """The errors this project raises for bad input: its own exception classes, and ValueError."""
    return isinstance(err, ValueError) or type(err).__module__.split(".")[0] == "clip"


def stage_main(run: Callable[[PipelineConfig], dict[str, Any]], description: str, argv: list[str] | None = None) -> None:
    """Entry point body of `python -m pipelines.<stage>`: config errors exit 2 with the message, nothing runs;
    bad input found while running (a missing manifest, a mismatched checkpoint, ...) exits 1 with one line, and
    `CLIP_PIPELINE_DEBUG=1` shows the traceback."""
    try:
        cfg = parse_stage_args(argv, description)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        run(cfg)
    except Exception as err:
        if not is_user_error(err) or os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {type(err).__name__}: {err}\n(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write a stage's metrics JSON atomically (a reader never sees half a file); a local path or s3:// URI."""
    storage.write_bytes(str(path), (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode("utf-8"))
