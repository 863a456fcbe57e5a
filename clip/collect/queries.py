"""Query lists: what the collection stage searches captions for.

As in the CLIP paper, the base list is every word that occurs at least `min_word_count` times in a text corpus,
plus bigrams with high pointwise mutual information (PMI), merged with user-supplied lists (article titles,
WordNet synset names). Every query is normalised the same way (`normalize_query`): lower-case, whitespace
collapsed, punctuation at both ends stripped; the written list is deduplicated and sorted.

Words are maximal runs of letters and digits (`tokenize`); a query matches a caption when the query's words
occur consecutively among the caption's words (see clip.collect.matching).

    counts = NgramCounts(); counts.add_texts(lines)
    queries = build_queries(counts, cfg.collect.queries, extra=["golden retriever"])
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from clip.config import QueriesConfig, StorageConfig

_WORD = re.compile(r"[^\W_]+")  # letters and digits, any script; underscores and punctuation separate words
_SPACE = re.compile(r"\s+")
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
_SYNSET = re.compile(r"^([\w\-']+)\.[nvasr]\.\d+$")  # WordNet synset name, e.g. hot_dog.n.01

# Function words: frequent in any corpus but useless as search queries (they would match nearly every caption).
STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for with from into onto over under about as is are was were be been
    being am it its this that these those there here he she they we you i me my our your his her their them him us
    not no so than then too very can will would should could may might must do does did done has have had having
    s t d ll m re ve also which who whom whose what when where why how all any each few more most other some such
    only own same just up down out off again further once""".split()
)


def tokenize(text: str) -> list[str]:
    """Lower-cased words of `text` (runs of letters and digits)."""
    return _WORD.findall(text.lower())


def normalize_query(text: str) -> str:
    """Lower-case, collapse whitespace, strip punctuation at both ends; '' when nothing is left."""
    text = _SPACE.sub(" ", text.lower()).strip()
    return _EDGE_PUNCT.sub("", text)


def normalize_list_entry(line: str) -> str:
    """A user list entry: synset names (`hot_dog.n.01`) become their lemma (`hot dog`)."""
    line = line.strip()
    synset = _SYNSET.match(line)
    if synset:
        line = synset.group(1)
    if "_" in line and " " not in line:
        line = line.replace("_", " ")
    return normalize_query(line)


@dataclass
class NgramCounts:
    """Word and adjacent-word-pair counts of a corpus; bigrams never span two texts (lines / captions)."""

    words: Counter = field(default_factory=Counter)
    bigrams: Counter = field(default_factory=Counter)
    num_texts: int = 0

    def add_text(self, text: str) -> None:
        tokens = tokenize(text)
        self.num_texts += 1
        self.words.update(tokens)
        self.bigrams.update(zip(tokens, tokens[1:], strict=False))

    def add_texts(self, texts: Iterable[str]) -> NgramCounts:
        for text in texts:
            self.add_text(text)
        return self

    def merge(self, other: NgramCounts) -> NgramCounts:
        self.words.update(other.words)
        self.bigrams.update(other.bigrams)
        self.num_texts += other.num_texts
        return self

    @property
    def total_words(self) -> int:
        return sum(self.words.values())

    @property
    def total_bigrams(self) -> int:
        return sum(self.bigrams.values())


def bigram_pmi(counts: NgramCounts, first: str, second: str, totals: tuple[int, int] | None = None) -> float:
    """log2( p(first second) / (p(first) p(second)) ), probabilities over all words / all adjacent pairs.

    `totals`: (total words, total bigrams) when the caller has them already (a loop over every bigram)."""
    pair = counts.bigrams.get((first, second), 0)
    if pair == 0:
        return -math.inf
    total, total_bigrams = totals if totals is not None else (counts.total_words, counts.total_bigrams)
    p_pair = pair / total_bigrams
    return math.log2(p_pair / ((counts.words[first] / total) * (counts.words[second] / total)))


def mine_queries(
    counts: NgramCounts, min_word_count: int, min_bigram_count: int, min_pmi: float
) -> dict[str, int]:
    """Frequent non-stopwords and high-PMI bigrams of non-stopwords -> {query: corpus count}."""
    found: dict[str, int] = {}
    for word, count in counts.words.items():
        if count >= min_word_count and word not in STOPWORDS:
            found[word] = count
    totals = (counts.total_words, counts.total_bigrams)
    if totals[1]:
        for (first, second), count in counts.bigrams.items():
            if count < min_bigram_count or first in STOPWORDS or second in STOPWORDS:
                continue
            if bigram_pmi(counts, first, second, totals) >= min_pmi:
                found[f"{first} {second}"] = count
    return found


def scaled_thresholds(cfg: QueriesConfig, num_texts: int) -> tuple[int, int]:
    """Count thresholds for mining a candidate pool's own captions instead of a large corpus.

    The paper's 100 occurrences suit Wikipedia's billions of words; a pool of a few thousand captions needs
    thresholds proportional to its size (0.5% of captions for words, 0.2% for bigrams, at least 2), never
    above the configured ones.
    """
    words = min(cfg.min_word_count, max(2, round(num_texts * 0.005)))
    bigrams = min(cfg.min_bigram_count, max(2, round(num_texts * 0.002)))
    return words, bigrams


def build_queries(
    counts: NgramCounts | None,
    cfg: QueriesConfig,
    extra: Iterable[str] = (),
    *,
    min_word_count: int | None = None,
    min_bigram_count: int | None = None,
) -> list[str]:
    """Mined queries (capped at cfg.max_queries, the most frequent kept) + `extra` entries, normalised and sorted."""
    queries: set[str] = set()
    if counts is not None:
        mined = mine_queries(
            counts,
            cfg.min_word_count if min_word_count is None else min_word_count,
            cfg.min_bigram_count if min_bigram_count is None else min_bigram_count,
            cfg.min_pmi,
        )
        ranked = sorted(mined.items(), key=lambda item: (-item[1], item[0]))[: cfg.max_queries]
        queries.update(normalize_query(q) for q, _ in ranked)
    queries.update(normalize_list_entry(line) for line in extra)
    queries.discard("")
    # A query must contain at least one word to be matchable; pure punctuation entries are dropped.
    return sorted(q for q in queries if tokenize(q))


class QueryFileMissing(FileNotFoundError):
    """A file named in collect.queries (corpus_paths, extra_lists) is not there; the CLI reports it in one line."""


def read_lines(path: str) -> Iterator[str]:
    """Lines of a local text file or an s3:// object (streamed), UTF-8."""
    if path.startswith("s3://"):
        import io

        from clip import storage

        with storage.open_read(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as text:
            yield from text
        return
    file = Path(path)
    if not file.exists():
        raise QueryFileMissing(
            f"query list / corpus file {path} does not exist (collect.queries.extra_lists / corpus_paths)"
        )
    with file.open(encoding="utf-8", errors="replace") as text:
        yield from text


def corpus_counts(paths: Iterable[str]) -> NgramCounts:
    """NgramCounts of text files, one text per line."""
    counts = NgramCounts()
    for path in paths:
        counts.add_texts(read_lines(path))
    return counts


def write_queries(queries: list[str], path: str, storage_cfg: StorageConfig | None = None) -> None:
    """queries.txt: one query per line, written atomically (local path or s3:// URI)."""
    from clip import storage

    storage.write_bytes(path, ("\n".join(queries) + "\n" if queries else "").encode("utf-8"), storage_cfg)
