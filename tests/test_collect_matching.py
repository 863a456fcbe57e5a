"""Query matching and per-query balancing against brute-force references."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from clip.collect.matching import QueryMatcher, balance
from clip.collect.queries import tokenize

VOCAB = ["red", "car", "blue", "sky", "new", "york", "city", "dog", "park", "the", "a", "big", "São", "Straße",
         "x2", "hot", "cat", "of"]
SEPARATORS = [" ", " ", " ", ", ", " - ", "! ", "'", " (", ") ", "_", "\n", ".  "]


def _random_caption(rng: random.Random) -> str:
    words = [rng.choice(VOCAB) for _ in range(rng.randint(0, 14))]
    words = [w.upper() if rng.random() < 0.1 else (w.title() if rng.random() < 0.2 else w) for w in words]
    text = ""
    for word in words:
        text += word + rng.choice(SEPARATORS)
    return rng.choice(["", "\"", "  "]) + text


def _regex_matches(caption: str, queries: list[str]) -> list[int]:
    """Reference: a word-boundary regular expression per query, searched in the lower-cased caption."""
    found = []
    for query_id, query in enumerate(queries):
        words = tokenize(query)
        pattern = r"(?<![^\W_])" + r"[\W_]+".join(re.escape(w) for w in words) + r"(?![^\W_])"
        if re.search(pattern, caption.lower()):
            found.append(query_id)
    return found


def test_matching_equals_regex_reference_on_random_captions() -> None:
    rng = random.Random(7)
    captions = [_random_caption(rng) for _ in range(600)]
    queries = set()
    while len(queries) < 150:
        n = rng.choice([1, 1, 2, 2, 3, 4])
        queries.add(" ".join(rng.choice(VOCAB).lower() for _ in range(n)))
    # Queries taken from captions, so that long ones match too; and prefixes of one another.
    for caption in captions[:40]:
        tokens = tokenize(caption)
        if len(tokens) >= 3:
            start = rng.randrange(len(tokens) - 2)
            queries.add(" ".join(tokens[start:start + 3]))
            queries.add(" ".join(tokens[start:start + 2]))
    queries_list = sorted(queries)
    matcher = QueryMatcher(queries_list)
    total = 0
    for caption in captions:
        expected = _regex_matches(caption, queries_list)
        assert matcher.match(caption) == expected, caption
        total += len(expected)
    assert total > 500  # the test exercises real matches, multi-word ones included
    offsets, ids = matcher.match_many(captions)
    assert offsets[-1] == total
    assert [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(3)] == [matcher.match(c) for c in captions[:3]]


def test_matching_word_boundaries_and_case() -> None:
    matcher = QueryMatcher(["cat", "new york", "new york city", "hot dog"])
    assert matcher.match("A CAT.") == [0]
    assert matcher.match("concatenate catalogue") == []
    assert matcher.match("I love New-York, city of dreams") == [1, 2]
    assert matcher.match("new yorkshire") == []
    assert matcher.match("hot, dog!") == [3]
    assert matcher.match("") == []
    with pytest.raises(ValueError, match="no words"):
        QueryMatcher(["ok", "!!!"])


def _random_matches(rng: np.random.Generator, num_candidates: int, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    popularity = rng.zipf(1.6, num_queries).astype(float)
    popularity /= popularity.sum()
    offsets, flat = [0], []
    for _ in range(num_candidates):
        k = int(rng.choice([0, 1, 1, 2, 3]))
        chosen = sorted(set(rng.choice(num_queries, size=k, p=popularity).tolist())) if k else []
        flat.extend(chosen)
        offsets.append(len(flat))
    return np.asarray(offsets, np.int64), np.asarray(flat, np.int32)


def _reference_balance(offsets: np.ndarray, ids: np.ndarray, num_queries: int, cap: int, seed: int) -> np.ndarray:
    """The documented rule, written the slow, obvious way: queries rarest first, each takes its unassigned
    candidates in seeded priority order while it has room."""
    n = len(offsets) - 1
    matches = [set(ids[offsets[c]:offsets[c + 1]].tolist()) for c in range(n)]
    match_count = [sum(q in m for m in matches) for q in range(num_queries)]
    priority = np.random.default_rng(seed).permutation(n)
    assigned = [-1] * n
    for q in sorted(range(num_queries), key=lambda q: (match_count[q], q)):
        room = cap
        for c in sorted((c for c in range(n) if q in matches[c]), key=lambda c: priority[c]):
            if room == 0:
                break
            if assigned[c] < 0:
                assigned[c] = q
                room -= 1
    return np.asarray(assigned)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balance_matches_reference_and_properties(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    num_candidates, num_queries, cap = 1500, 40, 12
    offsets, ids = _random_matches(rng, num_candidates, num_queries)
    result = balance(offsets, ids, num_queries, cap, seed)

    np.testing.assert_array_equal(result.assigned, _reference_balance(offsets, ids, num_queries, cap, seed))

    matches = [set(ids[offsets[c]:offsets[c + 1]].tolist()) for c in range(num_candidates)]
    expected_match_counts = [sum(q in m for m in matches) for q in range(num_queries)]
    assert result.match_counts.tolist() == expected_match_counts
    counts = np.bincount(result.assigned[result.assigned >= 0], minlength=num_queries)
    assert counts.tolist() == result.assigned_counts.tolist()
    assert counts.max() <= cap
    assert (counts == cap).any(), "the random pool should fill some queries"
    rank = {q: (expected_match_counts[q], q) for q in range(num_queries)}
    for c, query in enumerate(result.assigned.tolist()):
        if query >= 0:
            assert query in matches[c]
            # Rarest first: every rarer query of this candidate was already full.
            assert all(counts[q] == cap for q in matches[c] if rank[q] < rank[query])
        else:
            # Skipped only when every matching query is full (never while one has room).
            assert all(counts[q] == cap for q in matches[c])
    # Queries with no more matches than the cap and rarest for all their candidates keep them all.
    for q in range(num_queries):
        if expected_match_counts[q] <= cap:
            holders = [c for c in range(num_candidates) if q in matches[c]]
            if all(min(matches[c], key=rank.get) == q for c in holders):
                assert counts[q] == expected_match_counts[q]


def test_balance_is_deterministic_by_seed() -> None:
    rng = np.random.default_rng(5)
    offsets, ids = _random_matches(rng, 800, 20)
    first = balance(offsets, ids, 20, 10, seed=3).assigned
    np.testing.assert_array_equal(first, balance(offsets, ids, 20, 10, seed=3).assigned)
    other = balance(offsets, ids, 20, 10, seed=4).assigned
    assert not np.array_equal(first, other)  # which over-cap candidates survive is a seeded choice
    assert (first >= 0).sum() == (other >= 0).sum()  # but not how many
    with pytest.raises(ValueError):
        balance(offsets, ids, 5, 10, seed=0)  # query ids out of range
