"""The `clip-pipeline` command as a user runs it: a real subprocess of the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.abort_repro import run_many, write_empty_keep_list

REPO = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).with_name("clip-pipeline"))]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_stage() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for stage in ("collect", "dedup", "shard", "train", "export", "evaluate", "promote", "config", "all"):
        assert stage in result.stdout


def test_config_show_prints_resolved_yaml_with_overrides() -> None:
    result = run_cli("config", "show", "--set", "train.batch_size=48", "--set", "shard.output=s3://bkt/data")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["batch_size"] == 48
    assert shown["shard"]["output"] == "s3://bkt/data"
    assert set(shown) >= {"collect", "dedup", "shard", "train", "export", "evaluate", "storage", "tracking", "compute"}


def test_bad_config_is_refused_before_anything_starts(tmp_path: Path) -> None:
    result = run_cli("collect", "--params", str(REPO / "params.yaml"), "--set", "collect.samples_per_shard=0",
                     "--set", f"collect.output_dir={tmp_path / 'raw'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "collect.samples_per_shard" in result.stderr
    assert not (tmp_path / "raw").exists()
    assert not any(tmp_path.iterdir())


def test_stage_module_entry_point_refuses_bad_config(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c",
         "from pipelines._common import stage_main; stage_main('x', lambda cfg, progress=None: None)",
         "--set", "train.batch_size=-3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "train.batch_size" in result.stderr and "-3" in result.stderr


def test_stage_input_errors_are_one_clear_line(tmp_path: Path) -> None:
    result = run_cli("train", "--set", f"train.data={tmp_path / 'none'}", "--set", "tracking.enabled=false",
                     "--set", f"train.output={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "error: train: MissingInputError: no shard manifest at" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_launcher_options_are_checked(tmp_path: Path) -> None:
    for option, value in (("--nproc-per-node", "0"), ("--nnodes", "-1"), ("--max-restarts", "-2")):
        result = run_cli("train", option, value, cwd=tmp_path)
        message = " ".join(result.stderr.split())
        assert result.returncode == 2 and f"Invalid value for '{option}'" in message, result.stderr
        assert not any(tmp_path.iterdir())


def test_stage_module_gives_one_line_for_missing_input(tmp_path: Path) -> None:
    """What DVC runs (`python -m pipelines.<stage>`) reports bad input like the CLI does: one line, status 1."""
    result = subprocess.run([sys.executable, "-m", "pipelines.shard", "--params", str(REPO / "params.yaml")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "keep.parquet" in result.stderr and "dedup" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_and_stage_module_share_one_error_path(tmp_path: Path) -> None:
    """`clip-pipeline shard` and `python -m pipelines.shard` report the same bad input with the same line."""
    params = str(REPO / "params.yaml")
    via_cli = run_cli("shard", "--params", params, cwd=tmp_path)
    via_module = subprocess.run([sys.executable, "-m", "pipelines.shard", "--params", params],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
    errors = []
    for result in (via_cli, via_module):
        assert result.returncode == 1 and "Traceback" not in result.stderr
        errors.append([line for line in result.stderr.splitlines() if line.startswith("error:")])
    assert errors[0] == errors[1] and len(errors[0]) == 1
    assert errors[0][0].startswith("error: shard: MissingInputError:") and "keep.parquet" in errors[0][0]
    assert not (tmp_path / "reports").exists()  # a failed stage writes no metrics


def test_a_library_value_error_keeps_its_traceback_ours_is_one_line(tmp_path: Path) -> None:
    """Bad input found by our code is one line; a ValueError raised inside a library (here the standard json
    module) is a bug to see whole, so its traceback is not hidden (issue 11.8)."""
    library = subprocess.run(
        [sys.executable, "-c", "import json; from pipelines._common import stage_main; "
         "stage_main('x', lambda cfg, progress: json.loads('{not json'))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert library.returncode == 1
    assert "Traceback" in library.stderr and "JSONDecodeError" in library.stderr
    ours = run_cli(*write_empty_keep_list(tmp_path), cwd=tmp_path)
    assert ours.returncode == 1 and "Traceback" not in ours.stderr, ours.stderr
    assert "error: shard: ValueError:" in ours.stderr and "nothing to shard" in ours.stderr


# Runs the shard stage's entry point in a fresh interpreter and prints the native threads it left running (OS
# threads that are not Python threads and did not exist before the run), by their /proc name.
_THREADS_LEFT_BY_THE_RUN = """
import json, os, sys, threading
from pipelines.shard import main

def native_threads():
    return set(os.listdir("/proc/self/task")) - {str(t.native_id) for t in threading.enumerate()}

before = native_threads()
try:
    main(sys.argv[1:])
except SystemExit as exit:
    status = exit.code
left = {t: open(f"/proc/self/task/{t}/comm").read().strip() for t in sorted(native_threads() - before)}
print(json.dumps({"status": status, "left": left}))
"""


def test_refusing_a_keep_list_leaves_no_native_thread_behind(tmp_path: Path) -> None:
    """The cause of the shard CLI's rare abort at exit ('terminate called without an active exception', SIGABRT):
    pq.read_table decoded the keep-list on an Arrow CPU-pool thread (use_threads=False or not), and that thread
    held the last reference to the keep-list's bytes; run late, it released them while the interpreter was
    finalizing, CPython ended it inside a C++ destructor and std::terminate aborted the process. The read now
    starts no thread: none is left running when the stage exits."""
    probe = subprocess.run([sys.executable, "-c", _THREADS_LEFT_BY_THE_RUN, *write_empty_keep_list(tmp_path)[1:]],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report["status"] == 1 and "nothing to shard" in probe.stderr, probe.stderr
    assert report["left"] == {}, f"native threads still running after the shard run: {report['left']}"


@pytest.mark.heavy
def test_shard_cli_refusing_its_input_never_aborts_beside_busy_processes(tmp_path: Path) -> None:
    """The symptom, under the conditions it was seen in (a fresh-clone `make test` on busy CPUs): the command that
    refuses an empty keep-list exits with 1 every time, never SIGABRT (benchmarks/abort_repro.py runs it 200
    times)."""
    counts, stderr_of = run_many(runs=10, busy=3, cwd=tmp_path)
    assert counts == {"exit 1": 10}, (counts, stderr_of)
