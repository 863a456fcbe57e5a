"""A loopback HTTP server that serves generated images and the failures the web serves.

Used by the fetcher tests (in a thread) and by benchmarks/fetch.py (as a separate process):

    with ImageServer() as server:                     # binds 127.0.0.1, a free port
        server.route("/flaky.jpg", [Reply(500), Reply.image(64, 48)])   # 500 once, then the image
        url = server.url("/flaky.jpg")
        ...
        server.stats.hits["/flaky.jpg"], server.stats.body_bytes["/flaky.jpg"], server.stats.connections

Built-in paths (no route needed): `/img/{W}x{H}/{seed}.jpg` or `.png` (generated once, cached; the query
string is ignored, so `?n=1`, `?n=2` are distinct URLs for the same image), `/robots.txt` (404 unless routed).
A route is a list of `Reply`s played in order, one per request to that path; the last one repeats.
`ImageServer(tls_context=...)` serves HTTPS; `self_signed_tls(names)` makes a certificate for tests.

Serve for a benchmark (prints the port on stdout, runs until killed):

    python tests/support/webserver.py --host 127.0.0.1 --port 0
"""

from __future__ import annotations

import argparse
import io
import random
import select
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

from PIL import Image, ImageDraw

_CHUNK = 64 * 1024


def make_image(width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A deterministic picture (gradient + shapes) of the given size, encoded as JPEG or PNG."""
    rng = random.Random(seed * 7919 + width * 31 + height)
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(1, max(2, width // 2)), y0 + rng.randrange(1, max(2, height // 2))
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=85) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_pixel_bomb(width: int, height: int) -> bytes:
    """A small PNG file whose header claims width x height pixels (all black: it compresses to little)."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def self_signed_tls(names: list[str], directory: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for a fresh self-signed certificate valid for `names`."""
    import datetime as dt
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


@dataclass
class Reply:
    """One scripted response.

    status/headers/body: what is sent. content_length: the Content-Length header (default len(body); None
    sends no length and closes the connection after the body). stream_bytes: instead of `body`, send this
    many filler bytes. delay_s: wait before the status line. drip_s: wait between body chunks of
    `drip_chunk` bytes. hold_body_s: after the headers, wait up to this long for the client to hang up
    before sending any body (a client that reads headers first and refuses causes zero body bytes).
    close_after_body: drop the connection after the body (with content_length > len(body): a truncated
    transfer). drop_connection: close after a complete response without a Connection: close header, as a
    server does when its keep-alive timeout strikes between requests.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_length: int | None | str = "auto"
    stream_bytes: int = 0
    delay_s: float = 0.0
    drip_s: float = 0.0
    drip_chunk: int = 1
    hold_body_s: float = 0.0
    close_after_body: bool = False
    drop_connection: bool = False  # close after the response without saying so (a keep-alive timeout)

    @classmethod
    def image(cls, width: int, height: int, seed: int = 0, fmt: str = "JPEG", **kwargs: object) -> Reply:
        mime = "image/jpeg" if fmt == "JPEG" else f"image/{fmt.lower()}"
        headers = {"Content-Type": mime, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        return cls(200, headers, make_image(width, height, seed, fmt), **kwargs)  # type: ignore[arg-type]


@dataclass
class ServerStats:
    """What the server saw; all fields are updated under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: int = 0
    requests: int = 0
    hits: Counter = field(default_factory=Counter)  # path -> requests
    body_bytes: Counter = field(default_factory=Counter)  # path -> body bytes written
    active: int = 0
    max_active: int = 0
    active_by_host: Counter = field(default_factory=Counter)  # Host header -> requests in progress now
    max_active_by_host: Counter = field(default_factory=Counter)
    user_agents: set[str] = field(default_factory=set)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # socketserver's default listen backlog of 5 drops SYNs under 64+ concurrent connects, which then
    # stall for the 1 s SYN retransmit: a benchmark would measure the test server, not the client.
    request_queue_size = 1024
    owner: ImageServer

    def process_request(self, request: socket.socket, client_address: tuple) -> None:  # type: ignore[override]
        with self.owner.stats.lock:
            self.owner.stats.connections += 1
        super().process_request(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; with Nagle on, the body of a keep-alive response waits
        # for the client's delayed ACK (~40 ms). Real servers (nginx, CDNs) set TCP_NODELAY; so do we.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - the name BaseHTTPRequestHandler dispatches to
        owner = self.server.owner
        stats = owner.stats
        path = urlsplit(self.path).path
        host = self.headers.get("Host", "")
        with stats.lock:
            stats.requests += 1
            stats.hits[path] += 1
            hit = stats.hits[path]
            stats.active += 1
            stats.max_active = max(stats.max_active, stats.active)
            stats.active_by_host[host] += 1
            stats.max_active_by_host[host] = max(stats.max_active_by_host[host], stats.active_by_host[host])
            stats.user_agents.add(self.headers.get("User-Agent", ""))
        try:
            if owner.request_delay_s:
                time.sleep(owner.request_delay_s)
            self._send(owner.reply_for(path, hit), path)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        finally:
            with stats.lock:
                stats.active -= 1
                stats.active_by_host[host] -= 1

    def _client_hung_up(self, wait_s: float) -> bool:
        readable, _, _ = select.select([self.connection], [], [], wait_s)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _write_body(self, data: bytes, path: str) -> None:
        self.wfile.write(data)
        with self.server.owner.stats.lock:
            self.server.owner.stats.body_bytes[path] += len(data)

    def _send(self, reply: Reply, path: str) -> None:
        if reply.delay_s:
            time.sleep(reply.delay_s)
        size = reply.stream_bytes or len(reply.body)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        length = size if reply.content_length == "auto" else reply.content_length
        if length is None:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        if reply.close_after_body:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.flush()
        if reply.hold_body_s and self._client_hung_up(reply.hold_body_s):
            self.close_connection = True
            return
        if reply.stream_bytes:
            filler = b"\xff" * _CHUNK
            sent = 0
            while sent < reply.stream_bytes:
                piece = filler[: min(_CHUNK, reply.stream_bytes - sent)]
                self._write_body(piece, path)
                sent += len(piece)
        elif reply.drip_s:
            for start in range(0, len(reply.body), reply.drip_chunk):
                self._write_body(reply.body[start : start + reply.drip_chunk], path)
                self.wfile.flush()
                time.sleep(reply.drip_s)
        elif reply.body:
            self._write_body(reply.body, path)
        if reply.drop_connection:
            self.wfile.flush()
            self.close_connection = True


class ImageServer:
    """ThreadingHTTPServer on a loopback address in a background thread; see the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        request_delay_s: float = 0.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """`tls_context`: a server-side SSLContext to serve HTTPS instead of HTTP."""
        if not (host.startswith("127.") or host == "::1"):
            raise ValueError(f"ImageServer binds loopback only, got host {host!r}")
        self.host = host
        self.request_delay_s = request_delay_s  # added to every request (to make concurrency observable)
        self.stats = ServerStats()
        self._routes: dict[str, list[Reply]] = {}
        self._images: dict[tuple[int, int, int, str], bytes] = {}
        self._lock = threading.Lock()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self.scheme = "http"
        if tls_context is not None:
            self._httpd.socket = tls_context.wrap_socket(self._httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def route(self, path: str, replies: list[Reply] | Reply) -> str:
        """Script the replies for `path` (played in order, the last repeats); returns its URL."""
        with self._lock:
            self._routes[path] = list(replies) if isinstance(replies, list) else [replies]
        return self.url(path)

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def reply_for(self, path: str, hit: int) -> Reply:
        with self._lock:
            replies = self._routes.get(path)
        if replies is not None:
            return replies[min(hit, len(replies)) - 1]
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "img" and "x" in parts[1]:
            try:
                width, height = (int(v) for v in parts[1].split("x"))
                seed_text, _, ext = parts[2].partition(".")
                seed = int(seed_text)
            except ValueError:
                return Reply(404, {"Content-Type": "text/plain"}, b"bad image path")
            fmt = "PNG" if ext == "png" else "JPEG"
            key = (width, height, seed, fmt)
            with self._lock:
                data = self._images.get(key)
            if data is None:
                data = make_image(width, height, seed, fmt)
                with self._lock:
                    self._images[key] = data
            return Reply(200, {"Content-Type": "image/png" if fmt == "PNG" else "image/jpeg"}, data)
        return Reply(404, {"Content-Type": "text/plain"}, b"not found")

    def start(self) -> ImageServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (also fine on a server that was never started)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve generated images on a loopback address.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = ImageServer(args.host, args.port)
    print(server.port, flush=True)
    try:
        server._httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    sys.exit(main())
