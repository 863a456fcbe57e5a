"""What every section is built from: the base `Section` (strict, closed), the checked value types (`Uri`,
`HostPort`, `PositiveInt`, ...) with their validators, `ConfigError`, and the environment variables that stand in
for unset keys."""

from __future__ import annotations

import os
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every offending key and value."""


# Where the pipeline finds a team stack when params.yaml does not name it (README "Run it on your team's stack"):
# the variables MLflow and Dask themselves read.
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DASK_SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"

# AWS bucket naming rules: 3-63 characters; lowercase letters, digits, dots and hyphens; a letter or digit at each end.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _check_uri(value: str) -> str:
    """A location: a local path or s3://bucket[/prefix] with a valid bucket name."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty path or s3:// URL")
    if "://" in value:
        scheme, rest = value.split("://", 1)
        if scheme != "s3":
            raise ValueError(f"unsupported URL scheme {scheme!r}; use a local path or s3://bucket/prefix")
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise ValueError("s3 URL has no bucket; expected s3://bucket/prefix")
        if not _BUCKET_NAME.fullmatch(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}: 3-63 characters, lowercase letters, digits, dots "
                             "and hyphens, starting and ending with a letter or digit")
    return value


def check_host_port(value: str | None) -> str | None:
    """A rendezvous endpoint: host:port (IPv6 as [addr]:port), port 1-65535."""
    if value is None:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port, e.g. head-node:29400")
    return value


def _no_credentials(value: str | None) -> str | None:
    """A service URL without credentials: params.yaml is committed, printed and logged as MLflow params."""
    from clip.storage.redact import redact  # here, not at the top: clip.storage imports this module

    if value is not None and redact(value) != value:
        raise ValueError("must not carry credentials (user:password@ or a secret query value); they come from the "
                         "environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile for S3, "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for MLflow")
    return value


def _default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, checked here so that a refusal names the variable; else the local store."""
    from clip.storage.redact import redact

    value = os.environ.get(TRACKING_URI_ENV)
    if not value:
        return "sqlite:///mlflow.db"
    try:
        return str(_no_credentials(value))
    except ValueError as exc:
        raise ConfigError(f"{TRACKING_URI_ENV}: {exc} (got {redact(value)!r})") from None


Uri = Annotated[str, AfterValidator(_check_uri)]
HostPort = Annotated[str | None, AfterValidator(check_host_port)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated, and types are strict: `true`
    is not the number 1, 1.5 or "3" not an integer (an integer is still a valid float). YAML already types the
    values of params.yaml and of `--set`, so strictness refuses only what was mistyped."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)
