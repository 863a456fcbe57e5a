"""Secrets out of messages: `redact(text)` masks the credentials a URL may carry, wherever the URL appears.

An endpoint such as `AWS_ENDPOINT_URL=http://user:password@minio:9000` reaches botocore, whose error texts quote
the full request URL; a presigned or token-bearing URL carries its secret in the query. Every message and log line
we emit passes through `redact`: storage errors and retry warnings (clip.storage), the entry points' one-line error
and traceback printers, and, once an entry point called `install_log_redaction()`, every log record of the process
(ours, Prefect's, MLflow's), before any handler sees it. What stays: scheme, host, port, path, so the reader still
knows which endpoint failed.

    redact('Could not connect to "http://admin:hunter2@127.0.0.1:9000/b/k?X-Amz-Signature=abc"')
    # 'Could not connect to "http://***@127.0.0.1:9000/b/k?X-Amz-Signature=***"'
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable

MASK = "***"

# scheme://userinfo@ : the userinfo (user, or user:password) is masked whole; a user name is often an access key.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/\s@\"'<>?#]+)@")
# Query or key=value parameters that hold a secret (passwords, tokens, AWS presigned-URL signatures).
_SECRET_PARAM = re.compile(
    r"(?P<name>(?:^|[?&;\s,(\"'])(?:password|passwd|pwd|secret|secret_key|client_secret|token|access_token|"
    r"refresh_token|api_key|apikey|signature|sig|x-amz-signature|x-amz-credential|x-amz-security-token|"
    r"awsaccesskeyid)=)(?P<value>[^&;\s\"'#,)]+)",
    re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with URL credentials (`user:pass@`) and secret query values (`password=`, `token=`, AWS
    signatures, ...) replaced by `***`; everything else unchanged."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['name']}{MASK}", text)


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Redact a log record in place: its formatted message (args merged in) and its exception text."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: let the handler report it as logging always does
        return record
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        # Formatters reuse a cached exc_text instead of formatting exc_info again: fill it, redacted.
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    return record


class RedactingFilter(logging.Filter):
    """A logging filter (for a handler or a logger) that redacts each record and lets it through."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_installed: Callable[..., logging.LogRecord] | None = None


def install_log_redaction() -> None:
    """Redact every log record this process creates, whatever logger and handler it goes to (idempotent).

    A record factory rather than a filter: filters sit on one logger or one handler, while libraries (Prefect,
    MLflow) add their own handlers, sometimes after this call. Records are built only for enabled levels, so
    this costs one pattern match per emitted line. Entry points call it; importing clip changes nothing."""
    global _installed
    if _installed is not None and logging.getLogRecordFactory() is _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        return redact_record(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    _installed = factory


def format_exception_redacted(err: BaseException) -> str:
    """The full traceback of `err` (its causes included), redacted: for entry points that print a crash."""
    return redact("".join(traceback.format_exception(err)))
