"""What a response's headers decide before any of its body is read.

Guarantees: pure functions of the header values (no I/O, no state), so a refusal costs no body bytes:
- `opt_out_in_headers`: X-Robots-Tag noai / noimageai, honouring per-bot scoping ("otherbot: noai");
- `refusal_in_headers`: the reason to stop ("opt_out_header", "content_type") or None;
- `parse_retry_after`: Retry-After as seconds (delta-seconds or HTTP date), None when absent or unreadable.
"""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime
from email.message import Message

OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
# X-Robots-Tag directives that take a value after a colon; "name: ..." with any other name scopes to a bot.
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview", "indexifembedded"}
)
# Non-image content types that image hosts commonly send for images; the decoder has the last word.
ACCEPTED_CONTENT_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})


def bot_name_of(user_agent: str) -> str:
    """The product token X-Robots-Tag scopes by: "clip-pipeline/0.1 (+url)" -> "clip-pipeline"."""
    product = user_agent.split("/", 1)[0].split()
    return product[0] if product else "*"


def opt_out_in_headers(values: list[str], bot_name: str) -> bool:
    """True when an X-Robots-Tag header value opts this crawler out of AI use (noai / noimageai).

    `X-Robots-Tag: noai, noimageai` applies to every bot; `X-Robots-Tag: otherbot: noai` only to `otherbot`.
    """
    bot_name = bot_name.lower()
    for value in values:
        text = value.strip().lower()
        head, sep, rest = text.partition(":")
        head = head.strip()
        if sep and head and " " not in head and "," not in head and head not in _VALUED_DIRECTIVES:
            if head not in (bot_name, "*"):
                continue  # directives for another crawler
            text = rest
        tokens = {token.strip() for token in text.split(",")}
        if tokens & OPT_OUT_DIRECTIVES:
            return True
    return False


def refusal_in_headers(headers: Message, *, bot_name: str, respect_x_robots_tag: bool) -> str | None:
    """Reasons to stop before reading the body: AI opt-out, non-image content type."""
    if respect_x_robots_tag:
        values = headers.get_all("X-Robots-Tag") or []
        if values and opt_out_in_headers(values, bot_name):
            return "opt_out_header"
    content_type = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    if content_type and not content_type.startswith("image/") and content_type not in ACCEPTED_CONTENT_TYPES:
        return "content_type"
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)
