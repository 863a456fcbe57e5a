"""Matching captions against queries, and balancing the matches to at most K pairs per query.

Matching: a query matches a caption when its words (clip.collect.queries.tokenize) occur consecutively among
the caption's words, i.e. a case-insensitive match on word boundaries. `QueryMatcher` keeps the queries in
hash tables keyed by their word n-grams; a caption's n-grams (n = 1, 2, ...) are intersected with them, and
longer n-grams are only formed while some n-gram of the caption starts a longer query. A caption of L words
costs O(L) per level reached, at most L x (longest query length); the number of queries does not enter.

Balancing (the paper's "up to 20,000 pairs per query"): `balance` assigns every matched candidate to at most
one query so that no query gets more than `cap` pairs. Queries are served rarest first: pairs are taken in
order of (query match count, query id, seeded random candidate priority); a candidate goes to the first query
on that order that still has room. So a candidate is assigned to its rarest matching query with room, a query
with few matches keeps all of them unless they were taken by an even rarer query, and which of a popular
query's matches survive is a seeded random choice.

    matcher = QueryMatcher(queries)
    matcher.match("A red circle on the left")   # -> sorted query ids
    result = balance(offsets, query_ids, len(queries), cap=20000, seed=0)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from clip.collect.queries import _WORD, tokenize


class QueryMatcher:
    """All queries in n-gram hash tables; `match(caption)` returns the ids (indices into `queries`) that match."""

    def __init__(self, queries: Sequence[str]) -> None:
        self.queries = list(queries)
        self._single: dict[str, int] = {}
        # Level n >= 2: (n-word query -> id, n-word prefixes of longer queries). Level 1's prefixes: _starts.
        self._exact: dict[int, dict[tuple[str, ...], int]] = {}
        self._prefixes: dict[int, set[tuple[str, ...]]] = {}
        self._starts: set[str] = set()
        self.max_words = 0
        for query_id, query in enumerate(self.queries):
            words = tuple(tokenize(query))
            if not words:
                raise ValueError(f"query {query!r} (line {query_id + 1}) has no words to match")
            self.max_words = max(self.max_words, len(words))
            if len(words) == 1:
                # Two queries normalising to the same words are the same query: the first id wins.
                self._single.setdefault(words[0], query_id)
                continue
            self._exact.setdefault(len(words), {}).setdefault(words, query_id)
            self._starts.add(words[0])
            for end in range(2, len(words)):
                self._prefixes.setdefault(end, set()).add(words[:end])

    def match_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Query ids whose words occur consecutively in `tokens`, sorted, without repeats.

        Set intersections do the lookups in C: the caption's words against the one-word queries, then its
        n-grams (n = 2, 3, ...) against the n-word queries, stopping as soon as none of its n-grams starts a
        longer query. Cost: O(len(tokens)) per level reached, whatever the number of queries.
        """
        words = set(tokens)
        single = self._single
        found = [single[w] for w in single.keys() & words]
        if words.isdisjoint(self._starts):
            found.sort()
            return found
        for n in range(2, min(self.max_words, len(tokens)) + 1):
            grams = (set(zip(tokens, tokens[1:], strict=False)) if n == 2
                     else set(zip(*[tokens[k:] for k in range(n)], strict=False)))
            exact = self._exact.get(n)
            if exact:
                found.extend([exact[g] for g in exact.keys() & grams])
            prefixes = self._prefixes.get(n)
            if not prefixes or prefixes.isdisjoint(grams):
                break  # no query longer than n can match
        # No repeats possible: each level adds distinct ids, and equal word sequences share one id.
        found.sort()
        return found

    def match(self, caption: str) -> list[int]:
        return self.match_tokens(_WORD.findall(caption.lower()))

    def match_many(self, captions: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """CSR form of the matches of many captions: (offsets [n+1] int64, query_ids [total] int32)."""
        offsets = [0]
        flat: list[int] = []
        findall = _WORD.findall
        match_tokens = self.match_tokens
        for caption in captions:
            flat.extend(match_tokens(findall(caption.lower())))
            offsets.append(len(flat))
        return np.asarray(offsets, dtype=np.int64), np.asarray(flat, dtype=np.int32)


@dataclass
class BalanceResult:
    """`assigned[c]`: the query id candidate c is kept for, -1 when it is not kept."""

    assigned: np.ndarray  # [num_candidates] int32
    match_counts: np.ndarray  # [num_queries] int64: candidates matching each query (before balancing)
    assigned_counts: np.ndarray  # [num_queries] int64: candidates kept for each query (<= cap)


def balance(offsets: np.ndarray, query_ids: np.ndarray, num_queries: int, cap: int, seed: int) -> BalanceResult:
    """Assign candidates (CSR matches: candidate c matched query_ids[offsets[c]:offsets[c+1]]) to queries.

    Deterministic for a given (matches, cap, seed). See the module docstring for the rule.
    """
    if cap < 1:
        raise ValueError(f"per-query cap must be positive, got {cap}")
    num_candidates = len(offsets) - 1
    per_candidate = np.diff(offsets)
    pair_candidate = np.repeat(np.arange(num_candidates, dtype=np.int64), per_candidate)
    pair_query = np.asarray(query_ids, dtype=np.int64)
    if len(pair_query) and (pair_query.min() < 0 or pair_query.max() >= num_queries):
        raise ValueError(f"query ids must be in [0, {num_queries})")
    match_counts = np.bincount(pair_query, minlength=num_queries).astype(np.int64)
    # Rank of each query on the rarest-first order: by match count, ties by id.
    query_rank = np.empty(num_queries, dtype=np.int64)
    query_rank[np.lexsort((np.arange(num_queries), match_counts))] = np.arange(num_queries)
    priority = np.random.default_rng(seed).permutation(num_candidates)
    order = np.lexsort((priority[pair_candidate], query_rank[pair_query]))

    assigned = np.full(num_candidates, -1, dtype=np.int32)
    room = np.full(num_queries, cap, dtype=np.int64)
    # One pass over the pairs in rarest-first order (about matches-per-candidate x pool size iterations);
    # plain lists because element access on numpy arrays is several times slower in a Python loop.
    assigned_list = assigned.tolist()
    room_list = room.tolist()
    for candidate, query in zip(pair_candidate[order].tolist(), pair_query[order].tolist(), strict=True):
        if assigned_list[candidate] < 0 and room_list[query] > 0:
            assigned_list[candidate] = query
            room_list[query] -= 1
    assigned = np.asarray(assigned_list, dtype=np.int32)
    kept = assigned[assigned >= 0]
    assigned_counts = np.bincount(kept, minlength=num_queries).astype(np.int64)
    return BalanceResult(assigned=assigned, match_counts=match_counts, assigned_counts=assigned_counts)
