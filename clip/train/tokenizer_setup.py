"""The tokenizer a run trains with: the checkpoint's when resuming, CLIP's BPE when asked, else one learnt from
the training captions.

Guarantees:
- a resumed run uses exactly the tokenizer its checkpoint carries (token ids never change mid-run);
- a learnt tokenizer is trained once, by rank 0, on the first MAX_TOKENIZER_CAPTIONS captions of the manifest's
  shards in manifest order (the same data gives the same tokenizer), and written to `train.output/tokenizer.json`
  before any other rank reads it (barrier); a `tokenizer.json` already there (an earlier attempt at this run) is
  reused, not retrained.
"""

from __future__ import annotations

from typing import Any

from clip import storage as storage_lib
from clip.config import StorageConfig, TrainConfig
from clip.formats.checkpoint import RUN_TOKENIZER_NAME
from clip.formats.manifest import Manifest
from clip.tokenizer import Tokenizer
from clip.train.distributed import DistInfo, barrier
from clip.train.streams import iter_captions

MAX_TOKENIZER_CAPTIONS = 2_000_000


def setup_tokenizer(tcfg: TrainConfig, storage: StorageConfig, info: DistInfo, manifest: Manifest,
                    checkpoint: dict[str, Any] | None) -> Tokenizer:
    """The run's tokenizer (collective when it is learnt: every rank must call this)."""
    if checkpoint is not None:
        return Tokenizer.from_json(checkpoint["tokenizer"])
    if tcfg.tokenizer.kind == "clip_bpe":
        return Tokenizer.from_clip_bpe(tcfg.tokenizer.bpe_path, context_length=tcfg.tokenizer.context_length)
    uri = storage_lib.join(tcfg.output, RUN_TOKENIZER_NAME)
    if info.is_main and not storage_lib.exists(uri, storage):
        captions = iter_captions(manifest, storage, limit=MAX_TOKENIZER_CAPTIONS)
        tokenizer = Tokenizer.train(captions, tcfg.tokenizer.vocab_size, context_length=tcfg.tokenizer.context_length)
        storage_lib.write_bytes(uri, tokenizer.to_json().encode("utf-8"), storage)
    barrier(info)  # the others wait for rank 0's tokenizer.json
    return Tokenizer.from_json(storage_lib.read_bytes(uri, storage).decode("utf-8"))
