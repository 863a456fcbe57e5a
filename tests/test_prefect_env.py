"""Prefect flows run in tests without a server: the session-wide ephemeral backend from conftest."""

from __future__ import annotations

import asyncio
import os


def test_flow_runs_on_ephemeral_backend(prefect_harness: None) -> None:
    from prefect import flow, task
    from prefect.client.orchestration import get_client

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow(name="env-check")
    def add_doubles(values: list[int]) -> int:
        return sum(double.map(values).result())

    state = add_doubles([1, 2, 3], return_state=True)
    assert state.is_completed() and state.result() == 12
    assert os.environ["PREFECT_HOME"]

    async def recorded_state(flow_run_id: object) -> str:
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).state.type.value

    # The run was recorded by the backend, not just executed in-process.
    assert asyncio.run(recorded_state(state.state_details.flow_run_id)) == "COMPLETED"
