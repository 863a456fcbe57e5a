"""Retries of the pipeline flow (flows/pipeline.py) under real `dvc repro`, on a temporary copy of this repository:
a crashed network stage is retried (and completes), a stage that refused its input is not, and each failure
carries the stage's own words, not DVC's generic closing line.

The crash is real: CLIP_DEBUG_KILL_ONCE makes the collect stage SIGKILL itself on its first attempt only (a marker
file). The retry waits are cut to nothing through the flow's `retry_delays_s`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines._common import KILL_ONCE_ENV
from pipelines.params import apply_overrides
from tests.test_flow import TINY, repo_copy

NO_WAIT = [0, 0]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of this repository on tiny settings, tracking off (the parent MLflow run is not what is tested)."""
    copy = repo_copy(tmp_path / "repo")
    apply_overrides(copy / "params.yaml", TINY + ["tracking.enabled=false"])
    return copy


@pytest.fixture
def kill_collect_once(tmp_path: Path) -> Iterator[Path]:
    """CLIP_DEBUG_KILL_ONCE for the collect stage meanwhile; yields the marker file its first attempt creates."""
    marker = tmp_path / "collect-killed"
    os.environ[KILL_ONCE_ENV] = f"collect:{marker}"
    try:
        yield marker
    finally:
        os.environ.pop(KILL_ONCE_ENV, None)


def _attempts(flow_state: Any, task_name: str) -> int:
    """How many times the flow run ran the task `task_name` (Prefect's own count, retries included)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return sum(run.run_count for run in runs if run.name.startswith(task_name))


def test_a_killed_stage_is_retried_and_completes(repo: Path, kill_collect_once: Path, prefect_harness: None) -> None:
    from flows.pipeline import pipeline

    state = pipeline(repo=str(repo), stages=["collect"], retry_delays_s=NO_WAIT, return_state=True)
    assert kill_collect_once.exists(), "the first attempt did not run (nothing was killed)"
    assert state.is_completed(), state.message
    assert _attempts(state, "collect") == 2
    [outcome] = state.result()
    assert not outcome["skipped"] and outcome["metrics"]
    assert (repo / "data" / "raw").is_dir()


def test_bad_input_is_not_retried_and_a_crash_says_why(repo: Path, prefect_harness: None) -> None:
    from flows.pipeline import StageFailed, pipeline

    # a value the typed config accepts but the stage refuses when it runs: its one-line error, no retry
    state = pipeline(repo=str(repo), stages=["collect"], retry_delays_s=NO_WAIT, return_state=True,
                     overrides=["collect.source=table", "collect.table.paths=[missing.tsv]"])
    assert state.is_failed()
    assert "stage collect: error: collect: SourceError: input file missing.tsv does not exist" in state.message
    with pytest.raises(StageFailed, match="missing.tsv does not exist") as failure:
        state.result()
    assert failure.value.bad_input
    assert _attempts(state, "collect") == 1

    # an error that is not one of the stage's one-line refusals (a library's traceback) is a crash: every retry
    # runs, and the failure quotes the stage's own last lines, ending with the exception, not DVC's summary
    (repo / "broken.parquet").write_bytes(b"not parquet")
    state = pipeline(repo=str(repo), stages=["collect"], retry_delays_s=NO_WAIT, return_state=True,
                     overrides=["collect.source=table", "collect.table.paths=[broken.parquet]"])
    assert state.is_failed()
    assert _attempts(state, "collect") == 3
    assert "stage collect crashed" in state.message
    assert "ArrowInvalid: Parquet magic bytes not found" in state.message


@pytest.mark.parametrize(("error", "recorded"), [
    ("storage", False),   # an endpoint down past the storage layer's retries: the flow retries the stage
    ("missing", True),    # a missing input object: bad input, no retry
    ("config", True),     # one of our own one-line errors: bad input
])
def test_only_errors_a_retry_cannot_fix_are_recorded_as_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    error: str, recorded: bool) -> None:
    from clip.config import ConfigError
    from clip.storage import ObjectNotFound, StorageError
    from pipelines._common import STAGE_RESULT_ENV, exit_on_user_error, read_bad_input

    raised = {"storage": StorageError("reading s3://bkt/x: EndpointConnectionError: could not connect"),
              "missing": ObjectNotFound("s3://bkt/manifest.json does not exist"),
              "config": ConfigError("train.batch_size: must be > 0")}[error]
    result = tmp_path / "result.json"
    monkeypatch.setenv(STAGE_RESULT_ENV, str(result))
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error("shard"):
        raise raised
    assert exit_info.value.code == 1
    assert (read_bad_input(result) is not None) is recorded
