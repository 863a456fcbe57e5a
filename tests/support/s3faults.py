"""A fault-injecting HTTP proxy for S3 tests: sits on 127.0.0.1 in front of the moto server.

    proxy = FaultProxy("http://127.0.0.1:5000").start()
    proxy.add(method="PUT", path_regex=r"partNumber=2", action="503", times=2)
    ... point AWS_ENDPOINT_URL (or StorageConfig.endpoint_url) at proxy.endpoint ...
    proxy.count("PUT", r"/bucket/shard-00000")   # requests seen, faulted or not
    proxy.stop()

Use it through the conftest fixtures `s3_faults` (the proxy) and `s3_faulty_bucket` ((bucket, proxy) with
AWS_ENDPOINT_URL pointing at the proxy).

Actions (each fires `times` times on requests whose method matches and whose path+query matches
`path_regex` (re.search), after letting the first `skip` matching requests through):
- "503" / "slowdown" / "500" / "429" / "403": answer with that status and an S3 XML error
  (ServiceUnavailable, SlowDown, InternalError, TooManyRequests, AccessDenied); nothing reaches the server.
- "drop": read the whole request, then close the connection without any response.
- "drop_mid_body": read about half of the request body, then close the connection (the client sees a reset).
- "drop_response": forward the request (the server applies it), then close without passing the response on.
- "truncate_response": forward, send the response headers and half of the body, then close.
- "corrupt": flip one byte of the request body, then forward (Content-MD5 makes the server refuse it).

Loopback only; one thread per client connection (ThreadingHTTPServer); keep-alive and chunked request bodies
are handled (chunked bodies are de-chunked and forwarded with a Content-Length); `stop()` closes everything.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

ERROR_ACTIONS: dict[str, tuple[int, str, str]] = {
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "429": (429, "TooManyRequests", "Too many requests."),
    "403": (403, "AccessDenied", "Access Denied"),
}
CONNECTION_ACTIONS = frozenset({"drop", "drop_mid_body", "drop_response", "truncate_response", "corrupt"})
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "expect",
})


@dataclass
class Fault:
    method: str | None  # None: any method
    path_regex: str
    action: str
    times: int = 1
    skip: int = 0  # let this many matching requests through first
    fired: int = 0
    _pattern: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ERROR_ACTIONS and self.action not in CONNECTION_ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; "
                             f"expected one of {sorted(ERROR_ACTIONS) + sorted(CONNECTION_ACTIONS)}")
        self._pattern = re.compile(self.path_regex)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method.upper() == method) and bool(self._pattern.search(path))

    @property
    def remaining(self) -> int:
        return self.times - self.fired


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str  # path and query string, e.g. "/bucket/key?partNumber=2&uploadId=..."
    action: str  # the fault applied, or "forward"


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered by the base class
    timeout = 30  # an idle keep-alive connection ends after this many seconds
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        pass

    # every method goes through the same path
    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _read_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left > 0:
            chunk = self.rfile.read(left)
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self._read_exact(size))
                self._read_exact(2)  # CRLF after each chunk
        return self._read_exact(int(self.headers.get("Content-Length") or 0))

    def _body_length(self) -> int:
        return int(self.headers.get("Content-Length") or 0)

    def _handle(self) -> None:
        proxy = self.server.proxy
        method, path = self.command, self.path
        fault = proxy._take_fault(method, path)
        action = fault.action if fault else "forward"
        proxy._record(SeenRequest(method, path, action))
        try:
            if action == "drop_mid_body":
                length = self._body_length()
                if length:
                    self._read_exact(max(1, length // 2))
                self._drop()
                return
            body = self._read_body()
            if action == "drop":
                self._drop()
                return
            if action in ERROR_ACTIONS:
                self._send_error_xml(*ERROR_ACTIONS[action])
                return
            if action == "corrupt" and body:
                middle = len(body) // 2
                body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
            status, reason, headers, payload = self._forward(method, path, body)
            if action == "drop_response":
                self._drop()
                return
            self._send_upstream(method, status, reason, headers, payload, truncate=action == "truncate_response")
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    def _drop(self) -> None:
        """Close the client connection without a response (a reset if unread data is pending)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_error_xml(self, status: int, code: str, message: str) -> None:
        payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                   f"</Message><RequestId>fault-injected</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()

    def _forward(self, method: str, path: str, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                   and k.lower() != "content-length"]
        if body or method in ("PUT", "POST"):
            headers.append(("Content-Length", str(len(body))))
        last_error: Exception | None = None
        for _ in range(2):  # one fresh connection per request; a second try if the server refused the first
            conn = self.server.proxy._upstream_connection()
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for key, value in headers:
                    conn.putheader(key, value)
                conn.endheaders(body if body else None)
                response = conn.getresponse()
                payload = response.read()
                result = (response.status, response.reason, response.getheaders(), payload)
                conn.close()
                return result
            except (http.client.HTTPException, OSError) as exc:
                last_error = exc
                conn.close()
        raise ConnectionError(f"upstream failed: {last_error}")

    def _send_upstream(self, method: str, status: int, reason: str, headers: list[tuple[str, str]],
                       payload: bytes, truncate: bool) -> None:
        self.send_response_only(status, reason)
        for key, value in headers:
            if key.lower() in _HOP_BY_HOP or (key.lower() == "content-length" and method != "HEAD"):
                continue
            self.send_header(key, value)
        if method != "HEAD":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload[: len(payload) // 2] if truncate else payload)
        self.wfile.flush()
        if truncate:
            self._drop()


class FaultProxy:
    """The proxy: `.endpoint` to give to the S3 client, `.add(...)` to queue faults, `.count(...)` to assert."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"upstream {upstream!r} must be on loopback")
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port or 80
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._seen: list[SeenRequest] = []
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._server = _ProxyServer(self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        with server.sockets_lock:
            for sock in list(server.open_sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _upstream_connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self._upstream_host, self._upstream_port, timeout=60)

    # -- faults --------------------------------------------------------------------------------------------

    def add(self, *, method: str | None = None, path_regex: str = "", action: str = "503", times: int = 1,
            skip: int = 0) -> Fault:
        """Queue a fault; faults are tried in the order added, the first one still armed that matches fires."""
        fault = Fault(method=method, path_regex=path_regex, action=action, times=times, skip=skip)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove all queued faults (counters are kept)."""
        with self._lock:
            self._faults.clear()

    def pending(self) -> int:
        """How many fault firings are still queued (0 once every fault fired all its times)."""
        with self._lock:
            return sum(max(0, f.remaining) for f in self._faults)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.matches(method, path):
                    if fault.skip > 0:
                        fault.skip -= 1
                        return None
                    fault.fired += 1
                    return fault
        return None

    # -- what was seen -------------------------------------------------------------------------------------

    def _record(self, seen: SeenRequest) -> None:
        with self._lock:
            self._seen.append(seen)

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    def count(self, method: str | None = None, path_regex: str = "", *, forwarded_only: bool = False) -> int:
        """Requests seen whose method matches (None: any) and whose path+query matches `path_regex`."""
        pattern = re.compile(path_regex)
        return sum(1 for r in self.requests
                   if (method is None or r.method == method.upper()) and pattern.search(r.path)
                   and (not forwarded_only or r.action == "forward"))

    def reset_counts(self) -> None:
        with self._lock:
            self._seen.clear()
