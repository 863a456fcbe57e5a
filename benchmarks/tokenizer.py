"""Caption tokenisation throughput: clip.tokenizer (CLIP's BPE on the `tokenizers` fast path) vs open_clip's
SimpleTokenizer (pure Python, with its per-word cache), both producing [N, 77] LongTensors.

    RAYON_NUM_THREADS=1 .venv/bin/python benchmarks/tokenizer.py --captions 50000

Captions: 5-25 words drawn Zipf-like from the ~30k whole-word entries of CLIP's vocabulary, capitalised, with a
full stop; tokenised in batches of 256 (a data-loader batch). Reports wall and CPU time; on a shared box the
CPU figures are the ones to compare. Needs open_clip_torch (test extra) for the peer and the BPE file.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable, Sequence

from clip.tokenizer import Tokenizer


def make_captions(words: Sequence[str], count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(words))]
    return [" ".join(rng.choices(words, weights, k=rng.randint(5, 25))).capitalize() + "." for _ in range(count)]


def measure(tokenize: Callable[[list[str]], object], captions: list[str], batch: int) -> tuple[float, float]:
    """(captions per wall second, captions per CPU second)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(captions), batch):
        tokenize(captions[start : start + batch])
    return len(captions) / (time.perf_counter() - wall), len(captions) / (time.process_time() - cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)

    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    bpe_path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    peer = SimpleTokenizer(bpe_path)
    ours = Tokenizer.from_clip_bpe(bpe_path)
    words = [t[: -len("</w>")] for t in list(peer.encoder)[512:-2] if t.endswith("</w>") and t[:-4].isalpha()]
    captions = make_captions(words, args.captions)
    assert ours(captions[:1000]).equal(peer(captions[:1000])), "token ids differ from open_clip"

    threads = os.environ.get("RAYON_NUM_THREADS", "all cores")
    print(f"{len(captions)} captions, batch {args.batch}, tokenizers threads: {threads}")
    runs = [
        ("clip.tokenizer", ours),
        ("open_clip, cold word cache", peer),
        ("open_clip, warm word cache", peer),
        ("clip.tokenizer (repeat)", ours),
    ]
    for name, tokenize in runs:
        per_wall, per_cpu = measure(tokenize, captions, args.batch)
        print(f"{name:28s} {per_wall:9,.0f} captions/s wall   {per_cpu:9,.0f} captions/s per CPU-second")


if __name__ == "__main__":
    main()
