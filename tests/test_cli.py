"""The `clip-pipeline` command as a user runs it: a real subprocess of the installed console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

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
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "dedup").mkdir()
    (tmp_path / "raw").mkdir()
    empty = pa.table({"key": pa.array([], pa.string()), "shard": pa.array([], pa.string()),
                      "sha256": pa.array([], pa.string()), "caption_digest": pa.array([], pa.string())})
    pq.write_table(empty, tmp_path / "dedup" / "keep.parquet")
    ours = run_cli("shard", "--set", f"shard.dedup_dir={tmp_path / 'dedup'}", "--set",
                   f"shard.input_dir={tmp_path / 'raw'}", "--set", f"shard.output={tmp_path / 'out'}", cwd=tmp_path)
    assert ours.returncode == 1 and "Traceback" not in ours.stderr, ours.stderr
    assert "error: shard: ValueError:" in ours.stderr and "nothing to shard" in ours.stderr
