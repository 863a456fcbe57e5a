"""Byte-level BPE tokenizer in CLIP's layout, on the `tokenizers` (Rust) fast path.

Two ways to get one:

    tok = Tokenizer.train(captions, vocab_size=4096)          # learnt from the collected captions
    tok = Tokenizer.from_clip_bpe("bpe_simple_vocab_16e6.txt.gz")  # OpenAI CLIP's published 49408-token BPE
    ids = tok(["a photo of a dog", "a red circle"])           # LongTensor [2, 77], zero padded

Both share CLIP's scheme:

* text clean-up (`clean_caption`): a standard-library subset of ftfy's `fix_text` (see below), HTML
  unescaping twice, whitespace collapsed to single spaces, stripped, lower-cased;
* pre-tokenisation with CLIP's pattern: contractions ('s 't 're 've 'm 'll 'd), runs of letters, single
  digits, runs of other non-space symbols; whitespace is dropped;
* each piece as UTF-8 bytes mapped to printable characters (GPT-2's byte alphabet); the last symbol of
  every piece carries the end-of-word suffix `</w>`, so decoding restores the spaces between pieces;
* vocabulary layout: 256 byte symbols, the same 256 with `</w>`, merge results in merge order, then
  `<start_of_text>` and `<end_of_text>`. The specials therefore have the highest ids and `<end_of_text>`
  is `vocab_size - 1`: the text encoder pools at `tokens.argmax(-1)`;
* a row is `[sot] + tokens + [eot]`, truncated to `context_length` with `eot` kept in the last slot,
  zero padded.

With CLIP's file the ids equal open_clip's `SimpleTokenizer` (tests/test_tokenizer.py checks a corpus of
punctuation, emoji, CJK, Cyrillic, Arabic, Devanagari, accents, HTML entities, odd whitespace and over-long
captions).

Differences from open_clip, on purpose:

* ftfy is not a dependency. `clean_caption` re-implements the ftfy steps that matter for captions and
  that need no heuristics: HTML entity decoding (ftfy's semicolon-only rule, upper-case entity names, and
  its "no decoding when the line contains '<'" rule), C1 control characters read as Windows-1252,
  Latin ligatures, full-/half-width forms, curly quotes, line breaks, ANSI terminal escapes, invisible control
  characters, lone surrogates, NFC normalisation, repeated until nothing changes as ftfy does.
  NOT implemented: ftfy's mojibake repair (`fix_encoding`: "cafÃ©" stays "cafã©" instead of "café").
  Captions that are already valid text tokenise identically.
* The literal strings "<start_of_text>" / "<end_of_text>" inside a caption are tokenised as ordinary
  text; open_clip turns them into the special ids, which would move the pooling position.

Layout: `clean.py` (the caption clean-up: `fix_text`, `clean_caption`), `bpe.py` (the byte alphabet, the
`Tokenizer`: training, CLIP's BPE file, JSON), `train_process.py` (the Rust trainer in a child process, so that
Ctrl-C can stop training at once). This module re-exports their public names, so `from clip.tokenizer import
Tokenizer` is the way in. It imports neither clip.config nor clip.storage: where a tokenizer's JSON is kept is
its caller's business.
"""

from clip.tokenizer.bpe import (
    CLIP_NUM_MERGES,
    CLIP_SPLIT_PATTERN,
    DEFAULT_CONTEXT_LENGTH,
    END_OF_WORD,
    EOT_TOKEN,
    FORMAT,
    MIN_VOCAB_SIZE,
    SOT_TOKEN,
    Tokenizer,
    byte_symbols,
)
from clip.tokenizer.clean import clean_caption, fix_text

__all__ = [
    "CLIP_NUM_MERGES", "CLIP_SPLIT_PATTERN", "DEFAULT_CONTEXT_LENGTH", "END_OF_WORD", "EOT_TOKEN", "FORMAT",
    "MIN_VOCAB_SIZE", "SOT_TOKEN", "Tokenizer", "byte_symbols", "clean_caption", "fix_text",
]  # fmt: skip
