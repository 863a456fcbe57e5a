"""One-off overrides, stage commands by hand, and what runs without the venv on PATH (issue 22, items 8 to 10).

- A pipeline run's overrides (`clip-pipeline run --set`, `retrain --set`, a deployment run's `overrides`) apply to
  that run only: real `dvc repro` of a stand-in stage under the Prefect harness sees them (it reruns, dvc.lock
  records them), params.yaml is the user's file after it, failed or not, and the next run reruns with the user's
  values; a run killed while its overrides were in place (a real SIGKILL) is undone at the next run's start.
- A stage run by hand in a DVC checkout leaves DVC's state alone (`dvc status` stays up to date).
- `.venv/bin/dvc repro` runs the real stages with PATH holding no Python of the project (bin/clip-python), and
  `clip-pipeline serve-model` serves a model with the same PATH; served replies hold `null`, never NaN.
- `clip-pipeline serve --timezone/--paused/--stages` reach the deployments.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.params import apply_overrides
from tests.support.servers import free_port, wait_until_up
from tests.test_flow import TINY, repo_copy

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BARE_PATH = "/usr/bin:/bin"  # no Python of the project's (the venv is not activated)

PARAMS = "# my settings\ntracking:\n  enabled: false\ntrain:\n  epochs: 1  # my value\n"
# A stand-in train stage: records the epochs it ran with; fails on 7 (a failing run).
STAGE = """\
import sys, yaml
epochs = yaml.safe_load(open("params.yaml"))["train"]["epochs"]
open("ran.txt", "w").write(str(epochs))
sys.exit(3 if epochs == 7 else 0)
"""
DVC_YAML = """\
stages:
  train:
    cmd: python stage.py
    params:
      - train
    outs:
      - ran.txt
"""


@pytest.fixture
def small_checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text(PARAMS)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    return repo


def _ran(repo: Path, **kwargs: object) -> str | None:
    """Run the flow's train stage; the epochs it ran with, None when DVC skipped it."""
    from flows.pipeline import pipeline

    [outcome] = pipeline(repo=str(repo), stages=["train"], **kwargs)
    return None if outcome["skipped"] else (repo / "ran.txt").read_text()


def test_run_overrides_apply_to_that_run_only(small_checkout: Path, prefect_harness: None) -> None:
    from flows.pipeline import StageFailed

    repo = small_checkout
    assert _ran(repo) == "1"
    assert _ran(repo, overrides=["train.epochs=5"]) == "5"  # DVC saw the override: the stage reran with it
    assert (repo / "params.yaml").read_text() == PARAMS  # ... and the user's file is back, comments and all
    assert "epochs: 5" in (repo / "dvc.lock").read_text()  # dvc.lock says what the outputs were made with
    assert _ran(repo) == "1"  # the next run: params.yaml differs from dvc.lock, so it reruns with the user's value
    assert _ran(repo) is None

    with pytest.raises(StageFailed, match="stage train"):  # a failed one-off run restores the file too
        _ran(repo, overrides=["train.epochs=7"], retry_delays_s=[0, 0])
    assert (repo / "params.yaml").read_text() == PARAMS

    assert _ran(repo, overrides=["train.epochs=2"], save_overrides=True) == "2"  # --save: for good
    assert "epochs: 2  # my value" in (repo / "params.yaml").read_text()


KILLED_RUN = """\
import os, signal, sys
from pipelines.params import one_off_overrides
with one_off_overrides(sys.argv[1], ["train.epochs=9"], sys.argv[2]):
    os.kill(os.getpid(), signal.SIGKILL)  # a lost machine, mid-run
"""


def test_a_killed_runs_overrides_are_undone_when_the_next_run_starts(small_checkout: Path,
                                                                     prefect_harness: None) -> None:
    from flows.pipeline import RUN_PARAMS_DIR

    repo = small_checkout
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(repo / "params.yaml"), str(repo / RUN_PARAMS_DIR)],
                            cwd=REPO, capture_output=True)
    assert killed.returncode == -9
    assert "epochs: 9" in (repo / "params.yaml").read_text()  # what the killed run left
    assert _ran(repo) == "1"  # the next run put the user's file back first, then ran
    assert (repo / "params.yaml").read_text() == PARAMS
    assert not list((repo / RUN_PARAMS_DIR).iterdir())


def test_a_params_file_edited_during_a_one_off_run_is_kept(tmp_path: Path) -> None:
    from pipelines.params import one_off_overrides

    params, state = tmp_path / "params.yaml", tmp_path / "state"
    params.write_text(PARAMS)
    with one_off_overrides(params, ["train.epochs=5"], state):
        params.write_text(params.read_text().replace("enabled: false", "enabled: true"))  # someone's edit
    assert "enabled: true" in params.read_text()  # never overwritten
    [before] = state.glob("params.before-run-*.yaml")
    assert before.read_text() == PARAMS  # and the file from before the run is kept


# ------------------------------------------------------------------------------------------------------------
# the real stages through DVC, without the venv on PATH


def _bare_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("CLIP_PYTHON", "VIRTUAL_ENV")}
    return {**env, "PATH": BARE_PATH, **extra}


@pytest.fixture(scope="module")
def dvc_checkout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A copy of this repository (no .venv in it) on tiny settings, after `.venv/bin/dvc repro dedup` with PATH
    holding no Python of the project."""
    repo = repo_copy(tmp_path_factory.mktemp("checkout"))
    apply_overrides(repo / "params.yaml", TINY + ["tracking.enabled=false"])
    repro = subprocess.run([str(VENV_BIN / "dvc"), "repro", "dedup"], cwd=repo, env=_bare_env(), capture_output=True,
                           text=True, timeout=600)
    return repo, repro


def test_dvc_repro_runs_the_stages_without_the_venv_on_path(
        dvc_checkout: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    repo, repro = dvc_checkout
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert json.loads((repo / "reports/metrics/dedup.json").read_text())["input_samples"] == 192


def test_clip_python_takes_clip_python_then_the_checkouts_venv(tmp_path: Path) -> None:
    launcher = REPO / "bin" / "clip-python"
    root = tmp_path / "checkout"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "clip-python").write_bytes(launcher.read_bytes())
    which = ["-c", "import sys; print(sys.executable)"]

    def picked(**env: str) -> str:
        return subprocess.run(["sh", str(root / "bin" / "clip-python"), *which], env=_bare_env(**env),
                              capture_output=True, text=True, check=True).stdout.strip()

    assert picked(CLIP_PYTHON=sys.executable) == sys.executable
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    assert picked() == str(root / ".venv" / "bin" / "python")


def test_a_stage_run_by_hand_leaves_the_checkouts_dvc_state_alone(
        dvc_checkout: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    repo, repro = dvc_checkout
    assert repro.returncode == 0, repro.stderr[-3000:]
    metrics = repo / "reports/metrics/dedup.json"
    before = metrics.stat().st_mtime_ns
    elsewhere = tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "pipelines.dedup", "--set", f"dedup.output_dir={elsewhere}"], cwd=repo,
                   check=True, capture_output=True)
    assert metrics.stat().st_mtime_ns == before  # DVC's metrics file was not rewritten
    beside = json.loads((tmp_path / "elsewhere.dedup-metrics.json").read_text())  # the run's own, with its output
    assert beside["input_samples"] == 192 and (elsewhere / "keep.parquet").exists()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "dedup"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
    assert "up to date" in status, status


# ------------------------------------------------------------------------------------------------------------
# serving


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> object:
        raise AssertionError(f"{constant} is not JSON: {text[:300]}")

    return json.loads(text, parse_constant=refuse)


def test_a_reply_whose_rows_differ_is_json_with_null() -> None:
    import io

    import pandas as pd
    from mlflow.pyfunc.scoring_server import predictions_to_json

    from clip.runtime.pyfunc import BundleModel

    # row 0 is refused ("error"), row 1 has no image: the rows have different keys
    answer = BundleModel().predict(None, pd.DataFrame({"image": ["not base64!", ""]}))
    out = io.StringIO()
    predictions_to_json(answer, out)  # what `mlflow models serve` sends
    rows = _strict_json(out.getvalue())["predictions"]
    assert rows[0]["error"].startswith("image in row 0") and rows[1] == {"error": None}


@pytest.mark.heavy  # a model server: about 40 s here
def test_serve_model_serves_without_the_venv_on_path(tmp_path: Path, mlflow_store: dict[str, str]) -> None:
    import httpx
    import mlflow

    from clip.runtime.mlflow_model import log_bundle_model
    from tests.support.bundles import make_bundle

    experiment = mlflow.create_experiment("serve", artifact_location=mlflow_store["artifact_location"])
    with mlflow.start_run(experiment_id=experiment):
        info = log_bundle_model(make_bundle(tmp_path / "bundle"), name="clip")
    port = free_port()
    log = tmp_path / "serve.log"
    server = subprocess.Popen([str(VENV_BIN / "clip-pipeline"), "serve-model", info.model_uri, "--port", str(port)],
                              env=_bare_env(MLFLOW_TRACKING_URI=mlflow_store["uri"]), cwd=tmp_path,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/ping", server, log)
        reply = httpx.post(f"{url}/invocations", timeout=60,
                           json={"dataframe_records": [{"text": "a dog"}, {"image": "not base64!"}]})
        assert reply.status_code == 200, reply.text
        first, second = _strict_json(reply.text)["predictions"]
        assert len(first["text_embedding"]) > 0 and first["error"] is None
        assert second["text_embedding"] is None and second["error"].startswith("image in row 1")
    finally:
        server.terminate()
        server.wait(timeout=30)
    # stopping `serve-model` stops the HTTP server mlflow started under it: nothing answers on the port any more
    deadline = time.monotonic() + 20
    while _answers(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _answers(port), f"a server is still listening on 127.0.0.1:{port} after serve-model was stopped"


def _answers(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


# ------------------------------------------------------------------------------------------------------------
# clip-pipeline serve's options


def test_serve_options_reach_the_deployments() -> None:
    from flows.deploy import parse_args
    from pipelines.cli import serve_args

    weekly, on_new_data = parse_args(serve_args("0 4 * * 1", timezone="Europe/Berlin", paused=True,
                                                stages="train,export"))
    [schedule] = weekly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 4 * * 1", "Europe/Berlin")
    assert weekly.paused and on_new_data.paused and not on_new_data.triggers[0].enabled
    assert on_new_data.parameters["stages"] == ["train", "export"]
    weekly, on_new_data = parse_args(serve_args("0 3 * * 1"))
    assert not weekly.paused and on_new_data.triggers[0].enabled
    assert on_new_data.parameters["stages"] == ["train", "export", "evaluate", "promote"]


@pytest.mark.parametrize(("args", "message"), [
    (["--timezone", "Mars/Olympus"], "unknown time zone 'Mars/Olympus' (--timezone)"),
    (["--stages", "train,deploy"], "unknown stage(s) ['deploy']"),
    (["--cron", "every monday"], "--cron 'every monday' is not a cron expression"),
])
def test_serve_refuses_a_bad_option_in_one_line(args: list[str], message: str) -> None:
    serve = subprocess.run([str(VENV_BIN / "clip-pipeline"), "serve", *args], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert serve.returncode == 2 and message in serve.stderr, serve.stderr


def test_dvc_lock_is_per_checkout_neither_committed_nor_ignored() -> None:
    """dvc.lock records what ran in one checkout: not committed (the committed one never matched the code, so
    every first run changed a tracked file), and not git-ignored, since DVC then refuses to run."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "dvc.lock"], cwd=REPO, capture_output=True, text=True, check=True)
    assert tracked.stdout == "", "dvc.lock is tracked: `git rm --cached dvc.lock`"
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc.lock"], cwd=REPO)
    assert ignored.returncode == 1, "dvc.lock is git-ignored: `dvc repro` refuses to run"
