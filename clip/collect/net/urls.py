"""A scraped URL turned into what a request is sent to, or refused as unusable.

Guarantees of `parse_url`: it returns None (never raises) for anything but an http(s) URL with a host and a
valid port; a returned `Target` has a lower-case scheme, a host as DNS sees it (IDNA-encoded unless an IP
literal), an explicit port (80 / 443 by default), and a request path that is pure ASCII without spaces or
control characters (so it cannot inject a header), percent-encoding what browsers would encode.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from clip.collect.net.resolver import is_ip_literal


@dataclass
class Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str  # path + query, as sent in the request line

    @property
    def host_key(self) -> str:
        """What per-host limits are keyed on (name:port, either scheme)."""
        return f"{self.host}:{self.port}"

    @property
    def origin(self) -> tuple[str, str, int]:
        """What connections and robots.txt verdicts are keyed on (scheme, host, port)."""
        return (self.scheme, self.host, self.port)


def parse_url(url: str) -> Target | None:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname
    if not is_ip_literal(host):
        try:
            host = host.encode("idna").decode("ascii")  # internationalised names as DNS sees them
        except UnicodeError:
            return None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return None  # control characters: garbage or a header-injection attempt
    if not path.isascii() or " " in path:
        # Scraped URLs carry raw spaces and non-ASCII; the request line must be ASCII, as browsers send it.
        path = "".join(c if c.isascii() and c != " " else quote(c, safe="") for c in path)
    return Target(url, scheme, host, port or (443 if scheme == "https" else 80), path)
