"""Benchmark: matching captions against a query list, and the global balancing step.

    .venv/bin/python benchmarks/matching.py [--captions 1000000] [--queries 10000] [--json out.json]

Synthetic but realistic text: a 50,000-word vocabulary with Zipfian word frequencies, captions of 4-20 words
with mixed case and punctuation, queries = frequent-to-rare unigrams plus bigrams / trigrams taken from real
caption positions (so multi-word queries do match). Reports captions/s for matching (one process) and the time
of balancing the matches with a per-query cap. Figures go to BENCHMARKS.md ("Collection: matching").
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from clip.collect.matching import QueryMatcher, balance


def _words(count: int, rng: np.random.Generator) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out: set[str] = set()
    while len(out) < count:
        length = int(rng.integers(3, 10))
        out.add("".join(letters[rng.integers(0, 26, length)]))
    return sorted(out)


def make_data(num_captions: int, num_queries: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    vocab = _words(50_000, rng)
    ranks = np.arange(1, len(vocab) + 1)
    probs = 1.0 / ranks**1.05
    probs /= probs.sum()
    lengths = rng.integers(4, 21, num_captions)
    word_ids = rng.choice(len(vocab), size=int(lengths.sum()), p=probs)
    punctuation = np.array(["", "", "", "", ",", ".", "!", "'s"])
    marks = punctuation[rng.integers(0, len(punctuation), len(word_ids))]
    vocab_arr = np.array(vocab, dtype=object)
    tokens = vocab_arr[word_ids] + marks
    captions: list[str] = []
    start = 0
    for i, length in enumerate(lengths.tolist()):
        text = " ".join(tokens[start:start + length])
        captions.append(text.capitalize() if i % 3 == 0 else text)
        start += length
    # Queries: 70% unigrams over the frequency range, 30% bigrams / trigrams from caption positions.
    n_uni = int(num_queries * 0.7)
    queries: set[str] = set()
    for word in vocab_arr[rng.choice(len(vocab), size=n_uni * 20, p=probs)].tolist():
        queries.add(word)
        if len(queries) == n_uni:
            break
    while len(queries) < num_queries:
        pos = int(rng.integers(0, len(word_ids) - 3))
        n = int(rng.choice([2, 3]))
        queries.add(" ".join(vocab_arr[word_ids[pos:pos + n]].tolist()))
    return captions, sorted(queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--cap", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    t0 = time.perf_counter()
    captions, queries = make_data(args.captions, args.queries)
    gen_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    matcher = QueryMatcher(queries)
    build_s = time.perf_counter() - t0

    # Wall and CPU time: on a shared machine the CPU time is the figure that does not depend on the load.
    t0, c0 = time.perf_counter(), time.process_time()
    offsets, query_ids = matcher.match_many(captions)
    match_s, match_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    result = balance(offsets, query_ids, len(queries), args.cap, seed=0)
    balance_s, balance_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    words = sum(len(c.split()) for c in captions[:100_000]) / min(len(captions), 100_000)
    out = {
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
        "captions": len(captions), "queries": len(queries), "mean_words_per_caption": round(words, 1),
        "data_generation_s": round(gen_s, 2),
        "matcher_build_s": round(build_s, 3),
        "match_s": round(match_s, 2),
        "match_cpu_s": round(match_cpu_s, 2),
        "captions_per_s": round(len(captions) / match_s),
        "captions_per_cpu_s": round(len(captions) / match_cpu_s),
        "matches": int(offsets[-1]),
        "captions_with_match": int(np.count_nonzero(np.diff(offsets))),
        "balance_s": round(balance_s, 2),
        "balance_cpu_s": round(balance_cpu_s, 2),
        "per_query_cap": args.cap,
        "kept": int((result.assigned >= 0).sum()),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)


if __name__ == "__main__":
    main()
