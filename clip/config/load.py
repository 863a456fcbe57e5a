"""Loading: params.yaml (strict YAML: no duplicate keys, `1e-3` a number) plus `key=value` overrides, validated
into a `PipelineConfig`; every refusal a `ConfigError` naming the dotted key and the value."""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from clip.config.base import ConfigError
from clip.config.pipeline import PipelineConfig

DEFAULT_PARAMS = "params.yaml"


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (PyYAML keeps the last silently) and reading `1e-3` as a
    number (YAML 1.2; PyYAML's YAML 1.1 rules make it a string, which strict float fields refuse)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: keys written next to it override the merged ones, by design
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, Hashable) and key in seen:
                    raise ConfigError(f"{key_node.start_mark.name}: duplicate key {key!r} at lines {seen[key]} and "
                                      f"{line} (give each key once)")
                if isinstance(key, Hashable):
                    seen[key] = line
        return super().construct_mapping(node, deep)


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load_yaml(text: str, name: str) -> Any:
    """Parse `text` with _ParamsLoader; `name` (a file, an override) is what error messages name."""
    loader = _ParamsLoader(text)
    loader.name = name  # marks (and so our messages) name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _format_validation_error(err: ValidationError, data: dict[str, Any]) -> str:
    from clip.storage.redact import redact  # a refused value may be a URL with credentials: never echo them

    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc) if loc else "<root>"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (value {item['input']!r})")
        elif item["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif loc and item["type"] in ("value_error", "assertion_error") and isinstance(item["input"], dict):
            lines.append(f"{key}: {msg}")  # a section-level rule; the message names its keys
        else:
            lines.append(redact(f"{key}: {msg} (got {item['input']!r})"))
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"  # one line for one mistake
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_override(override: str) -> tuple[list[str], Any]:
    """`train.batch_size=64` -> (["train", "batch_size"], 64); the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. train.batch_size=64)")
    key, raw = override.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {override!r} has an empty key part")
    try:
        value = _load_yaml(raw, f"--set {key}") if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for override in overrides:
        path, value = parse_override(override)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, data)) from None


def load_config(path: str | Path | None = DEFAULT_PARAMS, overrides: list[str] | None = None) -> PipelineConfig:
    """Load params.yaml (missing file: all defaults) and apply `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        try:
            loaded = _load_yaml(Path(path).read_text(), str(path))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    elif path is not None and Path(path) != Path(DEFAULT_PARAMS):
        raise ConfigError(f"params file {path} does not exist")
    return config_from_dict(apply_overrides(data, list(overrides or [])))


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
