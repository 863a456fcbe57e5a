"""Reading the small JSON documents of clip.formats (manifests, pointers): one-line FormatErrors naming the file."""

from __future__ import annotations

import json
from typing import Any

from clip.formats.errors import FormatError


def parse_json(raw: bytes, uri: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{uri}: not valid JSON ({exc})") from None


def parse_format_doc(raw: bytes, uri: str, fmt: str, what: str) -> dict[str, Any]:
    """A JSON object whose `format` is `fmt`; FormatError "<uri>: not a <what> (format <fmt> expected)" otherwise."""
    doc = parse_json(raw, uri)
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise FormatError(f"{uri}: not a {what} (format {fmt} expected)")
    return doc
