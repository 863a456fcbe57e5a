"""The event the shard stage emits when it publishes a data version, for event-triggered retraining.

`clip.data.published`, resource `clip.data.<data_version>` (labels: the version and the shard location). The
on-new-data deployment (flows/deploy.py) runs train -> export -> evaluate -> promote when it sees one. Emitted only
when a Prefect API is configured (PREFECT_API_URL): a plain `clip-pipeline shard` on a laptop starts no server.
"""

from __future__ import annotations

import logging

DATA_PUBLISHED_EVENT = "clip.data.published"
RESOURCE_PREFIX = "clip.data."

log = logging.getLogger(__name__)


def prefect_api_configured() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def emit_data_published(data_version: str, location: str) -> bool:
    """Emit the event; False (and nothing sent) when no Prefect API is configured."""
    if not data_version or not prefect_api_configured():
        return False
    from prefect.events import emit_event

    emit_event(event=DATA_PUBLISHED_EVENT,
               resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{data_version}",
                         "clip.data_version": data_version, "clip.location": location})
    log.info("emitted %s for data version %s", DATA_PUBLISHED_EVENT, data_version)
    return True


def published_version(params_file: str) -> str | None:
    """The data version `shard.output`'s latest.json names now (None: nothing published with a pointer)."""
    from clip.config import load_config
    from clip.formats.manifest import read_pointer

    cfg = load_config(params_file)
    pointer = read_pointer(cfg.shard.output, cfg.storage)
    return pointer.data_version if pointer else None
