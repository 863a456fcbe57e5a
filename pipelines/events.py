"""The event the shard stage emits when it publishes a data version, for event-triggered retraining.

`clip.data.published`, resource `clip.data.<data_version>` (labels: the version and the shard location). The
on-new-data deployment (flows/deploy.py) runs train -> export -> evaluate -> promote when it sees one. Emitted only
when all of these hold, so that one data version sets off at most one training:
- a Prefect API is configured (PREFECT_API_URL): a plain `clip-pipeline shard` on a laptop starts no server;
- the version is new: republishing a version that was already complete (same data, same version) says nothing;
- the shard stage does not run inside a pipeline flow run that trains afterwards (the flow sets FLOW_TRAINS_ENV
  for its stages): that run trains the version itself.
"""

from __future__ import annotations

import logging
import os

DATA_PUBLISHED_EVENT = "clip.data.published"
RESOURCE_PREFIX = "clip.data."
# Set by flows/pipeline.py for its stage processes when the flow run includes train: a version the shard stage
# publishes then is trained by that very run, and an event would start a second training of it.
FLOW_TRAINS_ENV = "CLIP_FLOW_TRAINS"

log = logging.getLogger(__name__)


def prefect_api_configured() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def emit_data_published(data_version: str, location: str, already_published: bool = False) -> bool:
    """Emit the event for a newly published version; False (and nothing sent) when the version was already
    published, when a flow run that trains it is the publisher, or when no Prefect API is configured."""
    if not data_version or already_published:
        return False
    if os.environ.get(FLOW_TRAINS_ENV):
        log.info("not emitting %s for data version %s: flow run %s trains it", DATA_PUBLISHED_EVENT, data_version,
                 os.environ[FLOW_TRAINS_ENV])
        return False
    if not prefect_api_configured():
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
