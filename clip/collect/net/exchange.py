"""One HTTP GET over one pinned connection, classified into an `Exchange` without ever raising for the network.

Guarantees of `exchange_once`:
- the whole exchange (connect if needed, request, headers, body) is bounded by `total_timeout_s` through the
  watchdog, besides the connection's own per-operation timeout; one cut short by the deadline is reported
  as a retryable "timeout" whatever error the shut socket produced;
- status, headers and Content-Length are judged before any body byte is read (`refuse`, `limit`), and no
  more than `limit` bytes are ever kept;
- network and protocol failures become reasons (timeout, connect_timeout, connect_failed, tls, truncated,
  bad_response, connection, http_<status>); 429 and 5xx are retryable; None is returned only when a reused
  keep-alive connection turned out closed before any response (not the URL's fault: try a fresh one);
- `release` is called exactly once, after the deadline is disarmed, with whether the connection may go back
  to the pool (a complete response with keep-alive, or a small error / redirect body read to its end).
"""

from __future__ import annotations

import http.client
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message

from clip.collect.net.connections import PinnedConnection
from clip.collect.net.watchdog import Watchdog

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024
_DRAIN_MAX = 64 * 1024  # read (and keep the connection for) error / redirect bodies up to this size


@dataclass
class Exchange:
    """The outcome of one HTTP request (one hop, all retries included)."""

    reason: str | None = None  # failure reason; None: got a response we can use (2xx or a redirect)
    retryable: bool = False
    status: int | None = None
    headers: Message | None = None
    body: bytes | None = None
    download_ms: float | None = None


def exchange_once(
    conn: PinnedConnection,
    path: str,
    request_headers: dict[str, str],
    *,
    watchdog: Watchdog,
    total_timeout_s: float,
    limit: int,
    oversize_refused: bool,
    refuse: Callable[[Message], str | None] | None,
    on_download: Callable[[float], None] | None,
    reused: bool,
    release: Callable[[bool], None],
) -> Exchange | None:
    """GET `path` on `conn` (connecting it first unless it is a reused keep-alive one).

    `limit`: most body bytes kept; past it the response is refused as "too_large" when `oversize_refused`
    (images: Content-Length is checked first), else cut to `limit` (robots.txt, RFC 9309). `refuse(headers)`
    names a reason to stop before the body of a 2xx response, or None. `on_download(ms)` gets the time from
    the request to the end of a usable body.
    """
    started = time.perf_counter()
    timer = watchdog.arm(time.monotonic() + total_timeout_s, conn)
    keep = False
    stage = "connect"
    try:
        if conn.sock is None:
            try:
                conn.connect()
            except TimeoutError:
                return Exchange(reason="timeout" if timer.expired else "connect_timeout", retryable=True)
            except ssl.SSLError:
                return Exchange(reason="tls")
            except OSError:
                if timer.expired:
                    return Exchange(reason="timeout", retryable=True)
                return Exchange(reason="connect_failed", retryable=True)
            if timer.expired:
                return Exchange(reason="timeout", retryable=True)
        stage = "request"
        conn.request("GET", path, headers=request_headers)
        response = conn.getresponse()
        stage = "body"
        status = response.status
        headers = response.msg
        if status in REDIRECT_STATUSES or not 200 <= status < 300:
            keep = _drain(response)
            if status in REDIRECT_STATUSES:
                return Exchange(status=status, headers=headers)
            return Exchange(
                reason=f"http_{status}", retryable=status == 429 or status >= 500, status=status,
                headers=headers,
            )
        if refuse is not None:
            refusal = refuse(headers)
            if refusal is not None:
                return Exchange(reason=refusal, status=status, headers=headers)
        if response.length is not None and response.length > limit and oversize_refused:
            return Exchange(reason="too_large", status=status, headers=headers)
        body, complete = _read_body(response, limit)
        if not complete:
            if oversize_refused:
                return Exchange(reason="too_large", status=status, headers=headers)
            # e.g. robots.txt past the limit: parse what fits (RFC 9309), the rest is ignored
        elif not response.will_close:
            keep = True
        download_ms = (time.perf_counter() - started) * 1000.0
        if on_download is not None:
            on_download(download_ms)
        return Exchange(status=status, headers=headers, body=body, download_ms=round(download_ms, 3))
    except http.client.IncompleteRead:
        if timer.expired:
            return Exchange(reason="timeout", retryable=True)
        return Exchange(reason="truncated")
    except TimeoutError:
        return Exchange(reason="timeout", retryable=True)
    except ssl.SSLError:
        if timer.expired:
            return Exchange(reason="timeout", retryable=True)
        return Exchange(reason="tls")
    except (OSError, http.client.HTTPException) as exc:
        if timer.expired:
            return Exchange(reason="timeout", retryable=True)
        if reused and stage == "request" and isinstance(
            exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
        ):
            return None  # the server had closed the idle connection; not the URL's fault
        if isinstance(exc, http.client.HTTPException) and not isinstance(
            exc, (http.client.RemoteDisconnected, http.client.IncompleteRead)
        ):
            return Exchange(reason="bad_response")  # a malformed status line or headers
        return Exchange(reason="connection", retryable=True)
    finally:
        timer.cancel()
        release(keep and not timer.expired)


def _drain(response: http.client.HTTPResponse) -> bool:
    """Read a small error/redirect body so the connection can be reused; False: close it instead."""
    if response.will_close or response.length is None or response.length > _DRAIN_MAX:
        return False
    response.read()
    return True


def _read_body(response: http.client.HTTPResponse, limit: int) -> tuple[bytes, bool]:
    """(body, complete); stops reading once more than `limit` bytes arrived (complete=False)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = response.read(_READ_CHUNK)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            return b"".join(chunks)[:limit], False
    if response.length:  # Content-Length promised more than arrived
        raise http.client.IncompleteRead(b"".join(chunks), response.length)
    return b"".join(chunks), True
