"""The outcome vocabulary of one fetched URL: a status (ok / failed / filtered) derived from a reason string.

Guarantees: every reason maps to exactly one status, `result_status` is a pure function, and a reason is
"filtered" (we chose not to keep the image) only when it is listed in FILTERED_REASONS; every other reason
means "failed" (we could not get it).

Failed reasons: http_<status>, timeout, connection, dns, tls, truncated, bad_response, bad_url,
too_many_redirects, not_an_image (and error_<Exception> for a bug). Filtered reasons: see FILTERED_REASONS.
"""

from __future__ import annotations

OK, FAILED, FILTERED = "ok", "failed", "filtered"
# Not a fetch outcome: a candidate whose caption is over collect.max_caption_bytes, refused before matching.
CAPTION_TOO_LONG = "caption_too_long"

# Reasons that mean "we chose not to keep it" (policy) rather than "we could not get it".
FILTERED_REASONS = frozenset(
    {
        "opt_out_header",
        "robots_txt",
        "blocked_address",
        "too_large",
        "content_type",
        "too_small",
        "aspect_ratio",
        "decompression_bomb",
        CAPTION_TOO_LONG,
    }
)


def result_status(reason: str | None) -> str:
    """ok / filtered / failed for a reason string."""
    if reason is None:
        return OK
    return FILTERED if reason in FILTERED_REASONS else FAILED
