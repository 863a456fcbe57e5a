"""The collect stage's map tasks over source partitions: caption n-gram counts and query matches.

Both are top-level functions because Dask pickles task functions by reference; each runs on one partition,
in this process or on a worker, and returns a small picklable result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clip.collect import queries as query_lib
from clip.collect.matching import QueryMatcher
from clip.collect.sources import CandidateSource, Partition

_MATCHER_CACHE: dict[str, QueryMatcher] = {}


def _matcher(queries: list[str], digest: str) -> QueryMatcher:
    """One matcher per worker process and query list: building it for 500k queries takes about a second."""
    matcher = _MATCHER_CACHE.get(digest)
    if matcher is None:
        _MATCHER_CACHE.clear()
        matcher = _MATCHER_CACHE[digest] = QueryMatcher(queries)
    return matcher


def caption_too_long(caption: str, max_bytes: int) -> bool:
    """More than `max_bytes` UTF-8 bytes (`collect.max_caption_bytes`). Such captions are refused before matching
    (reason `caption_too_long`): one long run of a letter made tokenizer training take minutes."""
    # A character is at most 4 bytes, so short captions need no encoding; lone surrogates count, never raise.
    return len(caption) * 4 > max_bytes and len(caption.encode("utf-8", "surrogatepass")) > max_bytes


def count_partition(source: CandidateSource, max_caption_bytes: int, part: Partition) -> query_lib.NgramCounts:
    """Word / bigram counts of one partition's captions (for mining queries from the pool)."""
    return query_lib.NgramCounts().add_texts(
        c.caption for c in source.iter_candidates(part) if not caption_too_long(c.caption, max_caption_bytes))


@dataclass
class PartitionMatches:
    """The queries each candidate of one partition matched, as CSR arrays, plus the matched rows' texts."""

    index: int
    num_rows: int
    offsets: np.ndarray  # [num_rows + 1] int64, CSR over rows
    query_ids: np.ndarray  # [total matches] int32
    texts: dict[int, tuple[str, str | None]]  # row -> (caption, url), matched rows only


def match_partition(source: CandidateSource, queries: list[str], digest: str, max_caption_bytes: int,
                    part: Partition) -> PartitionMatches:
    """Match every caption of `part` against all `queries`; `digest` names the query list (matcher cache key).
    Captions over `max_caption_bytes` match nothing, so they never get a key."""
    matcher = _matcher(queries, digest)
    captions: list[str] = []
    urls: list[str | None] = []
    for cand in source.iter_candidates(part):
        captions.append("" if caption_too_long(cand.caption, max_caption_bytes) else cand.caption)
        urls.append(cand.url)
    offsets, query_ids = matcher.match_many(captions)
    matched = np.flatnonzero(np.diff(offsets)).tolist()
    texts = {row: (captions[row], urls[row]) for row in matched}
    return PartitionMatches(part.index, len(captions), offsets, query_ids, texts)
