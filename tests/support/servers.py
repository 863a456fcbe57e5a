"""Helpers for tests that start real server processes on 127.0.0.1 (mlflow server, mlflow models serve, prefect
server): a free loopback port, and a wait for the server's health URL that fails with the server's log when the
process dies or the deadline passes."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Poll `url` until it answers 200; AssertionError with the log's tail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the server exited ({proc.returncode}):\n" + log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up in {timeout_s:.0f} s:\n" + log.read_text()[-3000:]
        time.sleep(1)
