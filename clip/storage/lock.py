"""One writer per output: a lock object `<output>/.lock`, local or s3://, held while a stage publishes there.

    from clip.storage.lock import output_lock
    with output_lock("data/shards", "shard", storage_cfg):   # LockHeld (one line, naming the holder) if taken
        ...

The lock holds a small JSON record of its holder: purpose (the stage), pid, host, start time and a random token.
- **Local**: `<output>/.lock` is held with `fcntl.flock`, which the kernel releases when the holder dies, however
  it dies (SIGKILL included). A second run is refused at once; a lock file left by a process that died is taken
  over, with a warning naming that process. The file is removed on release. flock is per host: on a network
  filesystem shared by several hosts, use one host per output.
- **S3**: `<output>/.lock` is created with a conditional PUT (`If-None-Match: *`): of two runs exactly one
  creates it. A lock whose holder ran on this host and is no longer running, or one older than `stale_after_s`
  (`S3_STALE_AFTER_S`, 24 hours: longer than any publish), is broken with a warning and created again
  (conditionally again, so of two breakers one wins). Released by deleting it, only while it is still ours.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clip.config import StorageConfig
from clip.storage.base import StorageError
from clip.storage.retry import client_error_parts
from clip.storage.s3 import S3Storage
from clip.storage.uri import is_s3_uri, join, parse_s3_uri, to_local_path

log = logging.getLogger("clip.storage")

LOCK_NAME = ".lock"
S3_STALE_AFTER_S = 24 * 3600.0
_HELD_CODES = ("PreconditionFailed", "ConditionalRequestConflict")  # S3's answers to a create that lost


class LockHeld(StorageError):
    """Another run holds the output's lock; the message names the holder."""


def _new_record(purpose: str) -> dict[str, Any]:
    now = time.time()
    return {"purpose": purpose, "pid": os.getpid(), "host": socket.gethostname(), "started": now,
            "started_at": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "token": uuid.uuid4().hex}


def _parse_record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def describe_holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process (it has not recorded itself yet)"
    return (f"{record.get('purpose', '?')} (pid {record.get('pid', '?')} on {record.get('host', '?')}, "
            f"since {record.get('started_at', '?')})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def stale_reason(record: dict[str, Any] | None, stale_after_s: float, now: float | None = None) -> str | None:
    """Why an S3 lock record may be broken (its holder died on this host, or it is too old); None: it holds."""
    if record is None:
        return "its record is unreadable"
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) \
            and not _pid_alive(record["pid"]):
        return f"process {record['pid']} is no longer running on this host"
    age = (time.time() if now is None else now) - float(record.get("started") or 0)
    if age > stale_after_s:
        return f"it is {age / 3600:.1f} h old (older than {stale_after_s / 3600:.1f} h)"
    return None


def _held_message(output: str, lock_uri: str, record: dict[str, Any] | None) -> str:
    return (f"{output} is in use by {describe_holder(record)}: wait for it to finish, or remove {lock_uri} "
            "if that run is gone")


def _acquire_local(output: str, record: dict[str, Any]) -> int:
    path = to_local_path(join(output, LOCK_NAME))
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse_record(os.pread(fd, 65536, 0))
            os.close(fd)
            raise LockHeld(_held_message(output, str(path), holder)) from None
        try:  # the holder before us may have removed the file between our open and flock: lock the new one
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)
    left = os.pread(fd, 65536, 0)
    if left:  # a holder that died (a released lock file is removed): its lock is gone with it
        log.warning("%s: taking over the lock left by %s, which no longer holds it", path,
                    describe_holder(_parse_record(left)))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    return fd


def _release_local(output: str, fd: int) -> None:
    try:
        Path(to_local_path(join(output, LOCK_NAME))).unlink(missing_ok=True)  # while still holding it
    finally:
        os.close(fd)


def _read_s3_record(store: S3Storage, uri: str) -> dict[str, Any] | None:
    try:
        return _parse_record(store.read_bytes(uri))
    except FileNotFoundError:
        return None


def _acquire_s3(output: str, record: dict[str, Any], store: S3Storage, stale_after_s: float) -> None:
    uri = join(output, LOCK_NAME)
    bucket, key = parse_s3_uri(uri)
    body = json.dumps(record).encode()
    broken = False
    while True:
        try:
            store._attempt("PUT (if absent)", uri, lambda: store.client.put_object(
                Bucket=bucket, Key=key, Body=body, IfNoneMatch="*"))
            return
        except StorageError as exc:
            if client_error_parts(exc.__cause__)[0] not in _HELD_CODES:
                raise
        holder = _read_s3_record(store, uri)
        if holder is not None and holder.get("token") == record["token"]:
            return  # a retried PUT whose first try went through
        if holder is None and not store.exists(uri):
            continue  # released meanwhile: try again
        why = stale_reason(holder, stale_after_s)
        if why is None or broken:
            raise LockHeld(_held_message(output, uri, holder))
        log.warning("%s: breaking the lock of %s: %s", uri, describe_holder(holder), why)
        store.delete(uri)
        broken = True


def _release_s3(output: str, record: dict[str, Any], store: S3Storage) -> None:
    uri = join(output, LOCK_NAME)
    holder = _read_s3_record(store, uri)
    if holder is not None and holder.get("token") == record["token"]:
        store.delete(uri)
    else:
        log.warning("%s: the lock is no longer ours (broken by another run?); left alone", uri)


@contextmanager
def output_lock(output: str, purpose: str, storage_cfg: StorageConfig | None = None, *,
                stale_after_s: float = S3_STALE_AFTER_S) -> Iterator[dict[str, Any]]:
    """Hold `<output>/.lock` for the block (yields our record); LockHeld naming the holder when another run has
    it. See the module doc for stale locks."""
    record = _new_record(purpose)
    if is_s3_uri(output):
        store = S3Storage(storage_cfg)
        _acquire_s3(output, record, store, stale_after_s)
        try:
            yield record
        finally:
            _release_s3(output, record, store)
    else:
        fd = _acquire_local(output, record)
        try:
            yield record
        finally:
            _release_local(output, fd)
