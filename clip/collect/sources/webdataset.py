"""The `webdataset` source: existing webdataset tars (local paths, brace patterns, s3:// URLs), one partition per
tar; a truncated or corrupt tar keeps its complete samples."""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterator

from clip.collect.sources.base import (
    Candidate,
    CandidateSource,
    Partition,
    SourceError,
    expand_all,
    open_binary,
)
from clip.config import StorageConfig, WebdatasetSourceConfig
from clip.formats.tar import TruncatedTarError, iter_tar_samples

log = logging.getLogger(__name__)


class WebdatasetSource(CandidateSource):
    """Samples of existing webdataset tars: members sharing a key prefix form one sample."""

    name = "webdataset"

    def __init__(self, cfg: WebdatasetSourceConfig, storage_cfg: StorageConfig | None = None) -> None:
        self.cfg = cfg
        self.storage_cfg = storage_cfg
        self.tars = expand_all(cfg.urls, "collect.webdataset.urls", "tar", storage_cfg)

    def partitions(self) -> list[Partition]:
        for tar in self.tars:
            if not tar.startswith("s3://") and not os.path.isfile(tar):
                raise SourceError(f"collect.webdataset.urls: {tar} does not exist")
        return [Partition(i, ("webdataset", tar)) for i, tar in enumerate(self.tars)]

    def _samples(self, tar_uri: str, with_images: bool) -> Iterator[tuple[str, dict[str, bytes | None]]]:
        """(key, {extension: bytes, or None when not read}) per sample, streaming; image members are read only
        when asked for. Gzip-compressed tars are read too."""
        wanted = {self.cfg.caption_key, *self.cfg.image_keys} if with_images else {self.cfg.caption_key}
        yielded = 0
        try:
            with open_binary(tar_uri, self.storage_cfg) as raw:
                for key, members in iter_tar_samples(raw, want=wanted.__contains__, decompress=True):
                    yield key, members
                    yielded += 1
        except (TruncatedTarError, EOFError, OSError, zlib.error) as exc:
            # A truncated or corrupt tar (common among downloaded shards) must not stop the stage: its complete
            # samples count, the one being read when the damage starts and everything after it are skipped.
            # Every pass over the tar stops at the same place, so the candidate rows stay consistent.
            log.warning("webdataset tar %s is truncated or corrupt after %d samples (%s); the rest is skipped",
                        tar_uri, yielded, exc)

    def iter_candidates(self, part: Partition, with_images: bool = False) -> Iterator[Candidate]:
        tar_uri = part.spec[1]
        for key, fields in self._samples(tar_uri, with_images):
            if not any(k in fields for k in self.cfg.image_keys):
                continue  # no image: not a candidate (e.g. a metadata-only member)
            caption = (fields.get(self.cfg.caption_key) or b"").decode("utf-8", errors="replace").strip()
            image = None
            if with_images:
                image = next((fields[k] for k in self.cfg.image_keys if fields.get(k) is not None), None)
            yield Candidate(f"{tar_uri}#{key}", caption, f"{tar_uri}#{key}", image)
