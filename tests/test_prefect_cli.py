"""The Prefect CLI's list commands against a real `prefect server start` on 127.0.0.1.

Why: fastapi 0.151 and later reject the `null` filter values Prefect 3.8's client sends, so `prefect deployment ls`,
`flow-run ls`, `automation ls` and `artifact ls` answered 422 (pyproject pins `fastapi<0.151` for this). Each
command runs as its own process, as a user would type it, and must exit 0 and list what the server holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import free_port, wait_until_up


@pytest.fixture
def prefect_api(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A `prefect server start` process on a free loopback port with its own PREFECT_HOME; yields (api URL, the
    environment a CLI process needs to talk to it)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "COLUMNS": "300"}  # Rich tables would otherwise cut the names short
    log = tmp_path / "server.log"
    with open(log, "w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"{api}/health", server, log, timeout_s=180)
        yield api, env
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _prefect(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"prefect {' '.join(args)} exited {result.returncode}:\n" \
                                   f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


@pytest.mark.heavy  # a real server start: 15-25 s here
def test_list_commands_work_against_a_prefect_server(prefect_api: tuple[str, dict[str, str]]) -> None:
    api, env = prefect_api
    # something to list: a flow with a deployment and one run of it (the server's own REST API)
    flow_id = httpx.post(f"{api}/flows/", json={"name": "cli-check"}).raise_for_status().json()["id"]
    deployment_id = httpx.post(f"{api}/deployments/", json={"name": "cli-dep", "flow_id": flow_id}
                               ).raise_for_status().json()["id"]
    run_name = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", json={}
                          ).raise_for_status().json()["name"]

    assert "cli-check/cli-dep" in _prefect(env, "deployment", "ls")
    assert run_name in _prefect(env, "flow-run", "ls")
    _prefect(env, "automation", "ls")
    _prefect(env, "artifact", "ls")
