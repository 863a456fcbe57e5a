"""Config loading, overrides and every refusal, with the key and value named in the message."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field
from typer.testing import CliRunner

from clip.config import (
    ConfigError,
    PipelineConfig,
    Section,
    dump_config,
    explain_config,
    iter_fields,
    load_config,
    missing_descriptions,
)

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_loads_and_is_the_embedded_default() -> None:
    cfg = load_config(REPO / "params.yaml")
    assert cfg.collect.source == "synthetic"
    assert cfg.compute.device == "cpu"
    assert cfg.train.model.startswith("tiny-")
    assert cfg.tracking.uri.startswith("sqlite:///")
    for location in (cfg.collect.output_dir, cfg.shard.output, cfg.train.data):
        assert location.startswith("data/")
    assert cfg.train.output is None  # the run location follows the model and the data version


def test_missing_default_file_gives_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config() == PipelineConfig()


def test_explicit_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_file_values_and_overrides(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  batch_size: 32\n  lr: 0.01\nshard:\n  output: s3://bucket/prefix\n")
    cfg = load_config(params, ["train.batch_size=64", "compute.nproc_per_node=4", "collect.synthetic.num_samples=10"])
    assert cfg.train.batch_size == 64  # override beats the file
    assert cfg.train.lr == 0.01  # file beats the default
    assert cfg.shard.output == "s3://bucket/prefix"
    assert cfg.compute.nproc_per_node == 4
    assert load_config(None, ["compute.rdzv_endpoint='[::1]:29400'"]).compute.rdzv_endpoint == "[::1]:29400"
    assert cfg.collect.synthetic.num_samples == 10
    # YAML typing of override values: lists and booleans
    cfg = load_config(params, ["dedup.eval_dirs=[a, b]", "train.compile=true"])
    assert cfg.dedup.eval_dirs == ["a", "b"] and cfg.train.compile is True


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.batch_size=8", "shard.output=s3://bkt/p"])
    params = tmp_path / "resolved.yaml"
    params.write_text(dump_config(cfg))
    assert load_config(params) == cfg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batch_size=-1", ["train.batch_size", "greater than 0", "-1"]),
        ("train.batch_size=abc", ["train.batch_size", "valid integer", "'abc'"]),
        ("shard.samples_per_shard=0", ["shard.samples_per_shard", "greater than 0", "0"]),
        ("shard.output=s3:///prefix", ["shard.output", "no bucket", "s3:///prefix"]),
        ("shard.output=s3://", ["shard.output", "no bucket"]),
        ("train.data=gs://bucket/x", ["train.data", "unsupported URL scheme", "gs"]),
        ("train.bogus=1", ["train.bogus", "unknown key", "1"]),
        ("nonsense.key=1", ["nonsense", "unknown key"]),
        ("collect.source=ftp", ["collect.source", "'ftp'"]),
        ("dedup.near_dup_threshold=65", ["dedup.near_dup_threshold", "65"]),
        ("collect.fetch.jpeg_quality=101", ["collect.fetch.jpeg_quality", "101"]),
        ("train.precision=fp8", ["train.precision", "fp8"]),
        ("train.lr=0", ["train.lr", "greater than 0"]),
        ("train.resampled=true", ["train.samples_per_epoch", "resampled"]),
        ("collect.source=table", ["collect.table.paths"]),
        ("train.tokenizer.kind=clip_bpe", ["train.tokenizer.bpe_path"]),
        ("compute.rdzv_endpoint=head-node", ["compute.rdzv_endpoint", "host:port", "'head-node'"]),
        ("compute.rdzv_endpoint=head:99999", ["compute.rdzv_endpoint", "'head:99999'"]),
        # AdamW divides by 1 - beta**t: beta = 1 is a division by zero at every step (issue 11.9)
        ("train.beta1=1", ["train.beta1", "less than 1", "1"]),
        ("train.beta2=1.0", ["train.beta2", "less than 1", "1.0"]),
        # refused when the config is read, not as a shape error at step 1
        ("train.model_overrides={context_length: 32}",
         ["train.model_overrides.context_length", "32", "train.tokenizer.context_length", "77"]),
    ],
)
def test_refusals_name_key_and_value(override: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_file_refusals_name_key(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  batch_size: -5\n  optimiser: sgd\n")
    with pytest.raises(ConfigError) as info:
        load_config(params)
    assert "train.batch_size" in str(info.value) and "-5" in str(info.value)
    assert "train.optimiser: unknown key" in str(info.value)
    params.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(params)
    params.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(params)


@pytest.mark.parametrize("override", ["train.batch_size", "=3", "train..lr=1", "train.batch_size.x=1"])
def test_malformed_overrides(override: str) -> None:
    with pytest.raises(ConfigError):
        load_config(None, [override])


# ------------------------------------------------------------------------------------------------------
# descriptions and `config show --explain`


def test_every_field_of_every_section_has_a_description() -> None:
    keys = [key for key, _ in iter_fields(PipelineConfig)]
    # the walker reaches nested sections and the debug section
    assert {"collect.fetch.timeout_s", "train.tokenizer.vocab_size", "debug.keys_log", "compute"} <= set(keys)
    assert len(keys) > 150
    assert missing_descriptions(PipelineConfig) == []


def test_the_description_walker_catches_a_field_without_one() -> None:
    class Inner(Section):
        documented: int = Field(1, description="has one")
        bare: int = 2

    class Outer(Section):
        inner: Inner = Field(default_factory=Inner, description="a nested section")
        blank: str = Field("x", description="  ")
        undocumented_section: Inner = Field(default_factory=Inner)

    assert missing_descriptions(Outer) == ["inner.bare", "blank", "undocumented_section",
                                           "undocumented_section.bare"]


def test_explain_lists_every_key_with_type_default_current_value_and_description() -> None:
    text = explain_config(load_config(None, ["collect.fetch.timeout_s=5", "debug.fault_nonfinite_steps=[2, 3]"]))
    lines = text.splitlines()
    heads = {line.split("  ", 1)[0]: (line, lines[i + 1]) for i, line in enumerate(lines) if line and line[0] != " "}
    assert set(heads) == {key for key, _ in iter_fields(PipelineConfig)}  # every key, sections included
    head, description = heads["collect.fetch.timeout_s"]
    assert head == "collect.fetch.timeout_s  [float > 0]  default: 10.0  current: 5.0"
    assert "per request" in description and "DNS" in description
    head, description = heads["train.batch_size"]
    assert head == "train.batch_size  [int > 0]  default: 64"  # equal to the default: no current value shown
    assert "global batch" in description
    head, _ = heads["compute.device"]
    assert head == "compute.device  ['auto' | 'cpu' | 'cuda']  default: auto"
    head, _ = heads["shard.output"]
    assert head == "shard.output  [str (path or s3:// URL)]  default: data/shards"
    head, description = heads["debug.fault_nonfinite_steps"]
    assert head == "debug.fault_nonfinite_steps  [list[int > 0]]  default: []  current: [2, 3]"
    assert "test/debug aid" in description
    head, _ = heads["dedup.color_tolerance"]
    assert head == "dedup.color_tolerance  [float >= 0 | null]  default: 40.0"
    assert heads["collect.fetch"][0] == "collect.fetch  [section]"


def test_config_show_explain_command(tmp_path: Path) -> None:
    from pipelines.cli import app

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 9\n")
    result = CliRunner().invoke(app, ["config", "show", "--explain", "--params", str(params),
                                      "--set", "debug.keys_log=/tmp/keys"])
    assert result.exit_code == 0, result.output
    assert "train.epochs  [int > 0]  default: 4  current: 9\n" in result.output
    assert "debug.keys_log  [str | null]  default: null  current: /tmp/keys\n" in result.output
    assert "collect.fetch.timeout_s  [float > 0]  default: 10.0\n    per request" in result.output
