"""Our S3 retry policy's building blocks: which failures are worth another attempt, and how long to wait.

botocore's own retries are switched off (see `s3.py`), so this is the whole policy: throttling (SlowDown,
429, 503), other 5xx, connection errors and damaged bodies are retried with exponential backoff and jitter;
anything else (403, a bad request...) fails at once. "Not found" is recognised separately so callers get
`ObjectNotFound`.
"""

from __future__ import annotations

import http.client
import random

from clip.storage.redact import redact

_MAX_BACKOFF_S = 20.0

# Error codes (S3 XML <Code>) worth another attempt: throttling, server trouble, bodies damaged on the way.
_RETRYABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "RequestLimitExceeded", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException",
    "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchBucket"})


class ChecksumMismatch(Exception):
    """Content read back does not match its stored SHA-256 (treated as a transient fault: read again)."""


def client_error_parts(exc: BaseException | None) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError; ("", 0) for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_not_found(exc: BaseException) -> bool:
    code, status = client_error_parts(exc)
    return code in _NOT_FOUND_CODES or status == 404


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt can help: throttling, 5xx, dropped/reset/timed-out connections, damaged bodies."""
    from botocore import exceptions as bexc
    from urllib3 import exceptions as uexc

    if isinstance(exc, bexc.ClientError):
        code, status = client_error_parts(exc)
        return code in _RETRYABLE_CODES or status == 429 or status >= 500
    retryable_types: tuple[type[BaseException], ...] = (
        bexc.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
        bexc.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ...
        bexc.IncompleteReadError,
        bexc.ResponseStreamingError,
        uexc.ProtocolError,
        uexc.ReadTimeoutError,
        uexc.IncompleteRead,
        uexc.NewConnectionError,
        http.client.IncompleteRead,
        http.client.RemoteDisconnected,
        ConnectionError,  # reset, aborted, refused, broken pipe
        TimeoutError,
        ChecksumMismatch,
    )
    return isinstance(exc, retryable_types)


def describe(exc: BaseException) -> str:
    """A one-line description of an error, for messages: its type and its whole text on one line, redacted.

    Whole: botocore puts the reason on the lines after the first ("Parameter validation failed:" / "Invalid bucket
    name ..."). Redacted: botocore quotes the endpoint URL, user:password@ included when the endpoint has one."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def backoff_delay(attempt: int, base_s: float, cap_s: float = _MAX_BACKOFF_S) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): exponential with 'equal jitter'.

    Half of base * 2^(attempt-1) (capped) is fixed, the other half random, so concurrent clients spread out
    but none retries immediately.
    """
    ceiling = min(cap_s, base_s * (2 ** (attempt - 1)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
