"""URI helpers shared by the backends and by callers: which backend a URI names, and its parts.

A location is either a local path (optionally `file://path`) or `s3://bucket/key`. These functions only look
at the text; none of them touches the disk or the network.
"""

from __future__ import annotations

import os
from pathlib import Path

from clip.storage.base import StorageError

S3_SCHEME = "s3://"


def is_s3_uri(uri: str) -> bool:
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"). The key may be empty (the bucket's root)."""
    if not is_s3_uri(uri):
        raise StorageError(f"not an s3:// URL: {uri!r}")
    rest = uri[len(S3_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"s3 URL {uri!r} has no bucket; expected s3://bucket/prefix")
    return bucket, key


def join(base_uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URL (`join("s3://b/x", "y", "z.tar")` -> "s3://b/x/y/z.tar")."""
    clean = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if is_s3_uri(base_uri):
        return "/".join([base_uri.rstrip("/"), *clean]) if clean else base_uri
    return os.path.join(str(base_uri), *clean)


def basename(uri: str | Path) -> str:
    """The last component of a local path or an s3:// URL, trailing slashes ignored.

    `basename("s3://b/data/shard-00000.tar")` -> "shard-00000.tar", `basename("data/shards/")` -> "shards";
    the root of a bucket (`s3://b/`) gives the bucket's name.
    """
    text = str(uri)
    if is_s3_uri(text):
        bucket, key = parse_s3_uri(text)
        key = key.rstrip("/")
        return key.rsplit("/", 1)[-1] if key else bucket
    return to_local_path(text).name


def to_local_path(uri: str | Path) -> Path:
    """The filesystem path a local URI names (`file://` stripped); any other scheme is refused."""
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise StorageError(f"unsupported URL scheme in {text!r}; use a local path or s3://bucket/prefix")
    return Path(text)
