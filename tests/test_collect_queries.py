"""The query builder: frequent words, high-PMI bigrams (checked against hand-computed values), user lists."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from clip.collect.queries import (
    NgramCounts,
    bigram_pmi,
    build_queries,
    corpus_counts,
    normalize_list_entry,
    normalize_query,
    scaled_thresholds,
    write_queries,
)
from clip.config import QueriesConfig

# 25 x "new york city", 10 x "the big dog", 5 x "big city lights":
# words (120): new 25, york 25, city 30, the 10, big 15, dog 10, lights 5
# bigrams (80): new york 25, york city 25, the big 10, big dog 10, big city 5, city lights 5
CORPUS = ["New York City"] * 25 + ["the big dog."] * 10 + ["Big city lights"] * 5


def _write_corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS) + "\n")
    return str(path)


def test_pmi_by_hand(tmp_path: Path) -> None:
    counts = corpus_counts([_write_corpus(tmp_path)])
    assert counts.total_words == 120 and counts.total_bigrams == 80 and counts.num_texts == 40
    assert counts.words["city"] == 30 and counts.bigrams[("new", "york")] == 25
    hand = {
        ("new", "york"): math.log2((25 / 80) / ((25 / 120) * (25 / 120))),  # log2(7.2) = 2.848
        ("york", "city"): math.log2(6.0),
        ("big", "dog"): math.log2(12.0),
        ("big", "city"): 1.0,
        ("city", "lights"): math.log2(6.0),
    }
    for (first, second), value in hand.items():
        assert bigram_pmi(counts, first, second) == pytest.approx(value)
    assert bigram_pmi(counts, "dog", "new") == -math.inf


def test_build_queries_thresholds(tmp_path: Path) -> None:
    counts = corpus_counts([_write_corpus(tmp_path)])
    cfg = QueriesConfig(min_word_count=10, min_bigram_count=5, min_pmi=2.7)
    # Words >= 10 except the stopword "the"; bigrams >= 5 occurrences with PMI >= 2.7 (new york 2.85, big dog 3.58).
    assert build_queries(counts, cfg) == ["big", "big dog", "city", "dog", "new", "new york", "york"]
    # A lower PMI bar lets york city and city lights (2.585) in, never big city (1.0).
    looser = build_queries(counts, cfg.model_copy(update={"min_pmi": 2.5}))
    assert "york city" in looser and "city lights" in looser  # a bigram needs its own count, not its words'
    assert "big city" not in looser and "lights" not in looser
    # max_queries keeps the most frequent (city 30, then the 25s in name order: new, new york, york).
    assert build_queries(counts, cfg.model_copy(update={"max_queries": 3})) == ["city", "new", "new york"]


def test_user_lists_are_normalised_and_merged(tmp_path: Path) -> None:
    counts = NgramCounts().add_texts(["dog dog dog"])
    cfg = QueriesConfig(min_word_count=3)
    extra = ["  Golden   Retriever!! ", "hot_dog.n.01", "ice_cream", "dog", "...", "", "Kölner Dom"]
    assert build_queries(counts, cfg, extra) == ["dog", "golden retriever", "hot dog", "ice cream", "kölner dom"]
    assert normalize_query("  The   Matrix (1999) ") == "the matrix (1999"
    assert normalize_list_entry("dog.n.01") == "dog"
    out = tmp_path / "q" / "queries.txt"
    write_queries(["a b", "c"], str(out))
    assert out.read_text() == "a b\nc\n"


def test_scaled_thresholds_for_small_pools() -> None:
    cfg = QueriesConfig()
    assert scaled_thresholds(cfg, 4096) == (20, 8)
    assert scaled_thresholds(cfg, 10) == (2, 2)
    assert scaled_thresholds(cfg, 10**9) == (100, 20)  # never above the configured values
