"""This project's code inside Prefect flows on the session-wide ephemeral backend from conftest (no server):
the typed config goes in as a flow parameter, tasks load configs and a stage helper writes metrics, and the
backend records the run with the config's values."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

# Module level: Prefect resolves the flow's (string) annotations in this module's globals.
from clip.config import PipelineConfig, load_config
from pipelines._common import write_metrics

REPO = Path(__file__).resolve().parents[1]


def test_flow_runs_project_code_on_ephemeral_backend(prefect_harness: None, tmp_path: Path) -> None:
    from prefect import flow, task
    from prefect.client.orchestration import get_client

    @task
    def configured_batch_size(override: str) -> int:
        return load_config(REPO / "params.yaml", [override]).train.batch_size

    @flow(name="project-code-in-flow")
    def batch_sizes(cfg: PipelineConfig, extra: list[int], metrics_path: str) -> dict[str, list[int]]:
        sizes = [cfg.train.batch_size, *configured_batch_size.map([f"train.batch_size={b}" for b in extra]).result()]
        metrics = {"batch_sizes": sizes}
        write_metrics(metrics_path, metrics)
        return metrics

    cfg = load_config(REPO / "params.yaml", ["train.batch_size=48"])
    metrics_path = tmp_path / "metrics.json"
    state = batch_sizes(cfg, [16, 32], str(metrics_path), return_state=True)
    assert state.is_completed() and state.result() == {"batch_sizes": [48, 16, 32]}
    assert json.loads(metrics_path.read_text()) == {"batch_sizes": [48, 16, 32]}
    assert os.environ["PREFECT_HOME"]

    async def recorded(flow_run_id: object) -> tuple[str, dict]:
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            return run.state.type.value, run.parameters

    # The run was recorded by the backend, not just executed in-process, with the config's values.
    state_type, parameters = asyncio.run(recorded(state.state_details.flow_run_id))
    assert state_type == "COMPLETED"
    assert parameters["cfg"]["train"]["batch_size"] == 48 and parameters["extra"] == [16, 32]
