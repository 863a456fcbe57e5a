"""Orchestration: overlapping deployment runs queue (flows/deploy.py), stage output reaches the flow run's logs as
the stage runs (flows/pipeline.py), and `clip.data.published` is emitted once per new data version only
(pipelines/events.py, pipelines/shard.py).

- Queueing, on a real `prefect server start` on 127.0.0.1 with real serve processes: a tiny flow that waits on a
  gate file, deployed with `queueing_options()` and served through `serve_deployments()`, the very functions the
  pipeline's deployments use. While the first run holds its gate, a second run of the same deployment (picked up
  by a second serve process) waits as AwaitingConcurrencySlot, and a run of the other deployment waits as Late;
  nothing else starts until the gate opens, then every run completes, one after the other (a journal file).
- Logs: a stand-in stage (a real `dvc repro` of a script) prints a line, then waits until that line is in the
  flow run's logs on the Prefect API, which only happens when the flow reads the output while the stage runs;
  the real pipeline on tiny settings logs train's loss line, the evaluation table and the promote decision.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow

from tests.test_prefect_cli import prefect_api  # noqa: F401 - the `prefect server start` fixture, used below

REPO = Path(__file__).resolve().parents[1]
GATE_TIMEOUT_S = 300  # the tiny flow gives up on its gate after this (a hung test must end)


@flow(name="queue-check")
def gated(name: str, journal: str, gate: str = "") -> None:
    """Journal `start <name>`, wait for the file `gate` (when given), journal `end <name>`."""
    with open(journal, "a") as handle:
        handle.write(f"start {name}\n")
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while gate and not Path(gate).exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gate {gate} never opened")
        time.sleep(0.2)
    with open(journal, "a") as handle:
        handle.write(f"end {name}\n")


QUEUE_DEPLOYMENTS = ("first", "second")


def serve_queue_check() -> None:
    """What a serve process of the test runs: both tiny deployments, exactly as flows/deploy.py serves its own."""
    from flows.deploy import queueing_options, serve_deployments

    serve_deployments(*(gated.to_deployment(name=name, **queueing_options()) for name in QUEUE_DEPLOYMENTS))


@pytest.fixture
def queue_server(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    """A `prefect server start` (tests/test_prefect_cli.py) that retries a queued run after 1 s instead of 30 s
    and marks late runs every second."""
    monkeypatch.setenv("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "1")
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS", "1")
    return request.getfixturevalue("prefect_api")


def _serve(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from tests.test_flow_queue import serve_queue_check as s; s()"],
                            cwd=REPO, env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


@pytest.mark.heavy  # a real server and two serve processes: about a minute here
def test_overlapping_deployment_runs_queue_and_all_complete(queue_server: tuple[str, dict[str, str]],
                                                            tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.test_deployments import _stop

    api, env = queue_server
    journal, gate = tmp_path / "journal.txt", tmp_path / "gate"
    journal.touch()
    serving = [_serve(env, tmp_path / "serve-1.log")]
    # Prefect's own client: it retries the 503s a busy SQLite-backed server answers now and then
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        try:
            _queue_checks(client, serving, env, journal, gate, tmp_path)
        finally:
            gate.touch()
            for proc in serving:
                _stop(proc)


def _queue_checks(client: Any, serving: list[subprocess.Popen], env: dict[str, str], journal: Path, gate: Path,
                  tmp_path: Path) -> None:
    from prefect.exceptions import ObjectNotFound

    from tests.test_deployments import _wait
    from tests.test_prefect_cli import _prefect

    def deployment_ids() -> dict[str, Any]:
        try:
            return {name: client.read_deployment_by_name(f"queue-check/{name}").id for name in QUEUE_DEPLOYMENTS}
        except ObjectNotFound:
            return {}

    ids = _wait(deployment_ids, 120, "the served deployments", serving[0])

    def create(deployment: str, name: str, gated_run: bool = False) -> Any:
        parameters = {"name": name, "journal": str(journal), "gate": str(gate) if gated_run else ""}
        return client.create_flow_run_from_deployment(ids[deployment], parameters=parameters).id

    def state(run_id: Any) -> tuple[str, str]:
        run_state = client.read_flow_run(run_id).state
        return run_state.type.value, run_state.name

    def only_first_started() -> None:
        started = [line for line in journal.read_text().splitlines() if line.startswith("start")]
        assert started == ["start a1"], f"a run started while a1 held the checkout: {started}"

    a1 = create("first", "a1", gated_run=True)
    _wait(lambda: state(a1)[0] == "RUNNING", 120, "a1 to run", serving[0])

    # Same deployment, second serve process (a second machine serving it): the server's concurrency limit puts the
    # run back as AwaitingConcurrencySlot.
    serving.append(_serve(env, tmp_path / "serve-2.log"))
    a2 = create("first", "a2")
    _wait(lambda: only_first_started() or state(a2) == ("SCHEDULED", "AwaitingConcurrencySlot"), 120,
          "a2 to wait for a concurrency slot", serving[1])
    assert state(a1)[0] == "RUNNING"
    listed = _prefect(env, "flow-run", "ls", "--state", "AwaitingConcurrencySlot")
    assert str(a2) in listed, listed  # what a user asking for the queued runs sees
    # gone without a word: a serve process that stops cleanly pauses the deployments it serves (Prefect's
    # pause_on_shutdown), for the other serve process too
    serving[1].kill()
    serving.pop().wait()

    # The other deployment, same serve process: the runner's limit keeps its run Scheduled (then Late).
    b1 = create("second", "b1")
    _wait(lambda: only_first_started() or state(b1) == ("SCHEDULED", "Late"), 120, "b1 to wait", serving[0])
    assert state(a1)[0] == "RUNNING"
    only_first_started()

    gate.touch()
    _wait(lambda: all(state(run)[0] in ("COMPLETED", "FAILED", "CRASHED") for run in (a1, a2, b1)), 240,
          "every run to finish", serving[0])
    assert [state(run)[0] for run in (a1, a2, b1)] == ["COMPLETED"] * 3, (tmp_path / "serve-1.log").read_text()
    lines = journal.read_text().splitlines()
    assert lines[:2] == ["start a1", "end a1"], lines
    assert sorted(lines[2:]) == ["end a2", "end b1", "start a2", "start b1"] and \
        lines[2][len("start "):] == lines[3][len("end "):], f"the queued runs overlapped: {lines}"


@pytest.fixture
def api_for_stages(prefect_harness: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The session's Prefect backend, exported as PREFECT_API_URL to the stage processes `dvc repro` starts (as a
    served deployment's environment has it)."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    assert api, "the test harness has no API URL"
    monkeypatch.setenv("PREFECT_API_URL", api)
    yield api


# A stand-in train stage: one line that carries a credential, one redrawn in place, then it waits until its first
# line is in the flow run's logs on the API, and only then ends.
TALKER = """\
import os, sys, time, httpx
api, run_id = os.environ["PREFECT_API_URL"], os.environ["{flow_run_env}"]
print("train 1/2 loss 3.500 reading http://admin:hunter2@127.0.0.1:9/bucket", flush=True)
print("step 1 of 2\\rstep 2 of 2", flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    logs = httpx.post(f"{{api}}/logs/filter", json={{"logs": {{"flow_run_id": {{"any_": [run_id]}}}}}}).json()
    if any(log["message"].startswith("train 1/2 loss 3.500") for log in logs):
        print("the first line reached the flow run's logs", flush=True)
        sys.exit(0)
    time.sleep(0.5)
print("error: the first line never reached the flow run's logs while the stage ran", flush=True)
sys.exit(1)
"""


def _flow_run_logs(flow_run_id: Any) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the logs of the flow run still waiting for their batch
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_stage_output_reaches_the_flow_run_logs_while_the_stage_runs(api_for_stages: str, tmp_path: Path) -> None:
    from flows.pipeline import pipeline
    from pipelines._common import FLOW_RUN_ENV

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "talk.py").write_text(TALKER.format(flow_run_env=FLOW_RUN_ENV))
    (repo / "dvc.yaml").write_text("stages:\n  train:\n    cmd: python talk.py\n")
    (repo / "params.yaml").write_text("tracking:\n  enabled: false\n")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)

    state = pipeline(repo=str(repo), stages=["train"], return_state=True)
    assert state.is_completed(), state.message
    messages = _flow_run_logs(state.state_details.flow_run_id)
    assert "train 1/2 loss 3.500 reading http://***@127.0.0.1:9/bucket" in messages, messages
    assert "step 2 of 2" in messages and "the first line reached the flow run's logs" in messages, messages
    assert not [m for m in messages if "hunter2" in m or "step 1 of 2" in m], messages


def _published_events(data_versions: list[str]) -> list[str]:
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from pipelines.events import DATA_PUBLISHED_EVENT, RESOURCE_PREFIX

    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(event=EventNameFilter(name=[DATA_PUBLISHED_EVENT]),
                                              resource=EventResourceFilter(
                                                  id=[RESOURCE_PREFIX + v for v in data_versions])),
                                  limit=50)  # the server's maximum (the client's default, 100, is refused)
    return [event.resource["clip.data_version"] for event in page.events]


@pytest.mark.heavy  # the whole pipeline on tiny settings, then two more shard runs: about 1.5 min here
def test_pipeline_logs_and_data_events(api_for_stages: str, tmp_path: Path) -> None:
    from flows.pipeline import pipeline
    from pipelines.params import apply_overrides
    from tests.test_deployments import _wait
    from tests.test_flow import TINY, repo_copy

    repo = repo_copy(tmp_path / "repo")
    apply_overrides(repo / "params.yaml", TINY + ["evaluate.datasets=[synthetic-shapes]"])

    state = pipeline(repo=str(repo), return_state=True)
    assert state.is_completed(), state.message
    messages = _flow_run_logs(state.state_details.flow_run_id)
    assert any(m.startswith("train ") and " loss " in m for m in messages), messages  # train's loss line
    assert any("synthetic-shapes" in m and "zeroshot" in m for m in messages), messages  # the evaluation table
    promote = json.loads((repo / "reports" / "metrics" / "promote.json").read_text())
    assert f"promote decision: clip-tiny-vit v1 -> champion ({promote['reason']})" in messages, messages

    def shard(*overrides: str) -> dict[str, Any]:
        args = [arg for override in overrides for arg in ("--set", override)]
        subprocess.run([sys.executable, "-m", "pipelines.shard", *args, "--metrics", "reports/metrics/shard.json"],
                       cwd=repo, check=True, capture_output=True)
        return json.loads((repo / "reports" / "metrics" / "shard.json").read_text())

    # the flow run published a new version and trained it: no event (on-new-data would train it again)
    in_flow = json.loads((repo / "reports" / "metrics" / "shard.json").read_text())
    assert not in_flow["already_published"] and in_flow["data_published_event"] is False
    again = shard()  # the same data again: the version exists, nothing to announce
    assert again["already_published"] and again["data_version"] == in_flow["data_version"]
    assert again["data_published_event"] is False
    new = shard("shard.samples_per_shard=40")  # other shards: a new version, announced once
    assert not new["already_published"] and new["data_published_event"] is True
    versions = [in_flow["data_version"], new["data_version"]]
    _wait(lambda: new["data_version"] in _published_events(versions), 60, "the new version's event")
    assert _published_events(versions) == [new["data_version"]]


def test_a_busy_checkout_is_waited_for_visibly_then_refused_naming_the_lock(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from flows.pipeline import LOCK_NAME, PipelineBusy, checkout_lock

    log = logging.getLogger("test.checkout")
    with checkout_lock(tmp_path, timeout_s=1), caplog.at_level(logging.WARNING, logger=log.name):
        with pytest.raises(PipelineBusy, match=rf"checkout {tmp_path} is busy: .*{LOCK_NAME} \(pid {os.getpid()} "
                                               r"since .*\); gave up after 1 s\. .*--lock-timeout-s"):
            with checkout_lock(tmp_path, timeout_s=1, log=log):
                pass
    assert [r.getMessage() for r in caplog.records] == [
        f"checkout {tmp_path} is busy (pid {os.getpid()} since {_holder_since(tmp_path)} holds "
        f"{tmp_path / '.dvc' / 'tmp' / LOCK_NAME}): waiting up to 1 s"]
    with checkout_lock(tmp_path, timeout_s=1):  # released: the next run takes it at once
        pass


def _holder_since(repo: Path) -> str:
    from flows.pipeline import LOCK_NAME

    return (repo / ".dvc" / "tmp" / LOCK_NAME).read_text().split(" since ", 1)[1].strip()
