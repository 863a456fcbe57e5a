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
"""

from __future__ import annotations

import gzip
import html
import html.entities
import itertools
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
END_OF_WORD = "</w>"
DEFAULT_CONTEXT_LENGTH = 77
FORMAT = "clip-pipeline/tokenizer/v1"
# 256 byte symbols + 256 byte symbols with </w> + the two specials: a vocabulary with no merges at all.
MIN_VOCAB_SIZE = 2 * 256 + 2
# CLIP's pre-tokenisation pattern; (?i) as CLIP compiles it with IGNORECASE.
CLIP_SPLIT_PATTERN = r"""(?i)'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
# CLIP's merges file holds more merges than the 49408-token vocabulary uses: 49408 - 512 - 2 of them.
CLIP_NUM_MERGES = 49408 - 2 * 256 - 2


# ----------------------------------------------------------------------------------------------------------
# text clean-up


@lru_cache(maxsize=1)
def byte_symbols() -> list[str]:
    """The printable character standing for each byte value 0..255 (GPT-2 / CLIP byte alphabet).

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, soft hyphen...) are moved to
    U+0100 onwards in byte order, so no symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    next_free = 256
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(next_free)
            next_free += 1
    return [symbols[b] for b in range(256)]


@lru_cache(maxsize=1)
def _symbol_to_byte() -> dict[str, int]:
    return {symbol: byte for byte, symbol in enumerate(byte_symbols())}


@lru_cache(maxsize=1)
def _html_entities() -> dict[str, str]:
    """'&name;' -> text for HTML5 entities that end with ';', plus ALL-CAPS spellings of lower-case names
    that do not already mean something else (ftfy reads 'P&EACUTE;REZ' as 'PÉREZ')."""
    table: dict[str, str] = {}
    for name, value in html.entities.html5.items():
        if not name.endswith(";"):
            continue
        table["&" + name] = value
        if name == name.lower():
            upper = "&" + name.upper()
            if html.unescape(upper) == upper:
                table[upper] = value.upper()
    return table


_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_ESCAPE_RE = re.compile("\x1b\\[((?:\\d|;)*)([a-zA-Z])")
_C1_RE = re.compile("[\x80-\x9f]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _decode_entity(match: re.Match[str]) -> str:
    entity = match.group(0)
    decoded = _html_entities().get(entity)
    if decoded is not None:
        return decoded
    if entity.startswith("&#"):
        numeric = html.unescape(entity)
        return entity if ";" in numeric else numeric  # only whole references, semicolon consumed
    return entity


def _c1_as_cp1252(match: re.Match[str]) -> str:
    char = match.group(0)
    try:
        return char.encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:  # 0x81 0x8d 0x8f 0x90 0x9d are unassigned in cp1252: keep them
        return char


def _join_surrogates(match: re.Match[str]) -> str:
    pair = match.group(0)
    return chr(0x10000 + ((ord(pair[0]) - 0xD800) << 10) + (ord(pair[1]) - 0xDC00))


@lru_cache(maxsize=1)
def _character_table() -> dict[int, str]:
    """One str.translate table for ftfy's ligature, character-width and curly-quote fixes."""
    table: dict[int, str] = {}
    ligatures = {
        "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
        "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
        "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
    }  # fmt: skip
    table.update({ord(k): v for k, v in ligatures.items()})
    # Full-width ASCII and half-width Katakana/Hangul to their usual width; ideographic space to a space.
    table[0x3000] = " "
    for code in range(0xFF01, 0xFFF0):
        normal = unicodedata.normalize("NFKC", chr(code))
        if normal != chr(code):
            table[code] = normal
    for code in [0x02BC, *range(0x2018, 0x201C)]:
        table[code] = "'"
    for code in range(0x201C, 0x2020):
        table[code] = '"'
    return table


# Invisible control characters ftfy removes (tab, line feed and carriage return stay: they are whitespace).
_CONTROL_TABLE: dict[int, None] = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)


def _fix_segment(text: str, unescape: bool) -> str:
    """The ftfy steps we implement, in ftfy's order, repeated until the text stops changing."""
    table = _character_table()
    while True:
        before = text
        if unescape and "&" in text:
            text = _ENTITY_RE.sub(_decode_entity, text)
        if not text.isascii():
            text = _C1_RE.sub(_c1_as_cp1252, text)
            text = text.translate(table)
        if "\r" in text or not text.isascii():  # line breaks: after the C1 fix (\x85 is '…' by then)
            for separator in ("\r\n", "\r", "\u2028", "\u2029", "\x85"):
                text = text.replace(separator, "\n")
        if not text.isascii():
            if _SURROGATE_RE.search(text):
                text = _SURROGATE_RE.sub("\ufffd", _SURROGATE_PAIR_RE.sub(_join_surrogates, text))
        if "\x1b" in text:
            text = _ANSI_ESCAPE_RE.sub("", text)
        text = text.translate(_CONTROL_TABLE)  # after the escapes: ESC itself is a control character
        if not text.isascii():
            text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text(text: str) -> str:
    """Standard-library stand-in for `ftfy.fix_text` with its defaults, minus mojibake repair.

    Like ftfy, the text is fixed one line at a time and HTML entities are left alone from the first
    line that contains '<' onwards (it may be real HTML).
    """
    if "\n" not in text:
        return _fix_segment(text, unescape="<" not in text)
    pieces = []
    unescape = True
    for line in _split_after_newlines(text):
        if "<" in line:
            unescape = False
        pieces.append(_fix_segment(line, unescape))
    return "".join(pieces)


def _split_after_newlines(text: str) -> list[str]:
    # ftfy cuts segments after '\n' only (not '\r' or the other separators str.splitlines knows).
    return [part for part in re.split(r"(?<=\n)", text) if part]


def clean_caption(text: str) -> str:
    """CLIP's 'lower' clean-up: fix_text, html.unescape twice, strip, collapse whitespace, lower-case."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be str, got {type(text).__name__}")
    text = fix_text(text)
    if "&" in text:
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


# ----------------------------------------------------------------------------------------------------------
# the tokenizer


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _build_hf_tokenizer(merges: Sequence[tuple[str, str]]) -> HFTokenizer:
    """CLIP-layout vocabulary from merges (in priority order): bytes, bytes+</w>, merge results, specials."""
    # CLIP's order: the printable bytes (standing for themselves) first, then the remapped ones.
    symbols = sorted(byte_symbols(), key=ord)
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + END_OF_WORD for s in symbols)]:
        vocab[token] = len(vocab)
    for left, right in merges:
        for part in (left, right):
            if part not in vocab:
                raise ValueError(f"merge ({left!r}, {right!r}) uses {part!r}, which no earlier merge produced")
        vocab.setdefault(left + right, len(vocab))  # two merges may spell the same token: keep the first id
    sot_id, eot_id = len(vocab), len(vocab) + 1
    vocab[SOT_TOKEN], vocab[EOT_TOKEN] = sot_id, eot_id

    hf = HFTokenizer(models.BPE(vocab=vocab, merges=list(merges), end_of_word_suffix=END_OF_WORD))
    hf.pre_tokenizer = _pre_tokenizer()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (SOT_TOKEN, EOT_TOKEN)])
    hf.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TOKEN} $A {EOT_TOKEN}", special_tokens=[(SOT_TOKEN, sot_id), (EOT_TOKEN, eot_id)]
    )
    return hf


class Tokenizer:
    """CLIP-style byte-level BPE; call it on captions to get a zero-padded LongTensor [N, context_length]."""

    def __init__(self, hf_tokenizer: HFTokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end token), got {context_length}")
        self._hf = hf_tokenizer
        self._hf.encode_special_tokens = True  # "<end_of_text>" typed in a caption is text, not the special
        self._hf.no_truncation()
        self._hf.no_padding()
        sot_id, eot_id = self._hf.token_to_id(SOT_TOKEN), self._hf.token_to_id(EOT_TOKEN)
        size = self._hf.get_vocab_size(with_added_tokens=True)
        if sot_id is None or eot_id is None or eot_id != size - 1 or sot_id != size - 2:
            raise ValueError(
                f"tokenizer must end its vocabulary with {SOT_TOKEN}, {EOT_TOKEN} (ids {size - 2}, {size - 1}); "
                f"found ids {sot_id}, {eot_id}"
            )
        self._sot_id, self._eot_id, self._vocab_size = sot_id, eot_id, size
        self._context_length = context_length
        self._id_to_token: list[str] | None = None  # built on the first decode()
        self._truncating: dict[int, HFTokenizer] = {}  # context length -> copy with truncation + padding

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        captions: Iterable[str],
        vocab_size: int,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Learn `vocab_size - 514` BPE merges from captions (fewer if the captions run out of pairs seen
        `min_frequency` times: then `vocab_size` is smaller than asked). Deterministic for the same input.

        The Rust trainer breaks count ties by symbol id, and it numbers the `x</w>` symbols in hash-map
        order; so each byte symbol and each byte symbol with `</w>` is first written as ONE character
        (bytes as themselves, end-of-word bytes as U+E000 + byte), all 512 are given as the initial
        alphabet (numbered in code-point order), and the merges are mapped back afterwards.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (512 byte symbols + 2 specials), got {vocab_size}")
        symbols = byte_symbols()
        end_symbols = [chr(0xE000 + b) for b in range(256)]  # private use area: never produced by the mapping
        to_bpe_symbol = {s: s for s in symbols} | {e: s + END_OF_WORD for e, s in zip(end_symbols, symbols, strict=True)}
        splitter = pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True)
        word_cache: dict[str, str] = {}

        def encode_word(word: str) -> str:
            mapped = word_cache.get(word)
            if mapped is None:
                data = word.encode("utf-8")
                mapped = "".join(symbols[b] for b in data[:-1]) + end_symbols[data[-1]]
                word_cache[word] = mapped
            return mapped

        def mapped_captions() -> Iterable[str]:
            for caption in captions:
                pieces = splitter.pre_tokenize_str(clean_caption(caption))
                yield " ".join(encode_word(piece) for piece, _ in pieces)

        trainer_model = HFTokenizer(models.BPE())
        trainer_model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 2,  # the trainer's vocabulary = 512 symbols + merges; specials come after
            min_frequency=min_frequency,
            show_progress=show_progress,
            initial_alphabet=symbols + end_symbols,
            special_tokens=[],
        )
        trainer_model.train_from_iterator(mapped_captions(), trainer=trainer)
        learnt = json.loads(trainer_model.to_str())["model"]["merges"]

        def unmap(token: str) -> str:
            return "".join(to_bpe_symbol[c] for c in token)

        merges = [(unmap(left), unmap(right)) for left, right in _merge_pairs(learnt)]
        return cls(_build_hf_tokenizer(merges[: vocab_size - MIN_VOCAB_SIZE]), context_length)

    @classmethod
    def from_clip_bpe(cls, path: str | os.PathLike[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
        """Load OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (gzip text: a header line, then one merge
        'left right' per line) into the 49408-token vocabulary open_clip builds from it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE merges file not found: {path}")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merge_lines = lines[1 : 1 + CLIP_NUM_MERGES]
        merges = []
        for number, line in enumerate(merge_lines, start=2):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}: line {number} is not a 'left right' merge: {line!r}")
            merges.append((parts[0], parts[1]))
        if len(merges) != CLIP_NUM_MERGES:
            raise ValueError(f"{path}: expected {CLIP_NUM_MERGES} merges, found {len(merges)}")
        return cls(_build_hf_tokenizer(merges), context_length)

    # -- serialisation -------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """One JSON document: our metadata plus the `tokenizers` serialisation (vocab, merges, pipeline)."""
        return json.dumps(
            {
                "format": FORMAT,
                "context_length": self._context_length,
                "clean": "clip-lower",
                "sot_token": SOT_TOKEN,
                "eot_token": EOT_TOKEN,
                "vocab_size": self._vocab_size,
                "hf_tokenizer": json.loads(self._hf.to_str()),
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tokenizer JSON is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"not a {FORMAT} tokenizer document (format: {found!r})")
        return cls(HFTokenizer.from_str(json.dumps(doc["hf_tokenizer"])), int(doc["context_length"]))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to_json() to `path` atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    # -- properties ----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def sot_token_id(self) -> int:
        return self._sot_id

    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def context_length(self) -> int:
        return self._context_length

    # -- encoding ------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption, without start/end tokens and without truncation."""
        return self._hf.encode(clean_caption(text), add_special_tokens=False).ids

    def _tokenizer_for(self, context_length: int) -> HFTokenizer:
        """A copy of the Rust tokenizer that truncates (keeping the end token) and pads to context_length;
        copies per length, so concurrent calls with different lengths never share mutable settings."""
        hf = self._truncating.get(context_length)
        if hf is None:
            hf = HFTokenizer.from_str(self._hf.to_str())
            hf.encode_special_tokens = True
            # Truncation counts the two specials the template adds: [sot] + first L-2 tokens + [eot].
            hf.enable_truncation(max_length=context_length, strategy="longest_first", direction="right")
            hf.enable_padding(direction="right", pad_id=0, pad_token=self._hf.id_to_token(0), length=context_length)
            self._truncating[context_length] = hf
        return hf

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """LongTensor [N, context_length]: [sot] tokens [eot] 0 0 ...; over-long captions keep eot last."""
        if isinstance(texts, str):
            texts = [texts]
        context_length = self._context_length if context_length is None else context_length
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end token), got {context_length}")
        if len(texts) == 0:
            return torch.zeros(0, context_length, dtype=torch.long)
        cleaned = [clean_caption(t) for t in texts]
        encodings = self._tokenizer_for(context_length).encode_batch_fast(cleaned, add_special_tokens=True)
        # Every row is exactly context_length long (truncated/padded in Rust): one flat copy into int64.
        flat = np.fromiter(
            itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=len(cleaned) * context_length
        )
        return torch.from_numpy(flat.reshape(len(cleaned), context_length))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a token sequence: stops at the first end token (the rest is padding), drops the start
        token, turns `</w>` into spaces. Lower-cased and cleaned, as the text was when encoded."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        if self._id_to_token is None:
            vocab = self._hf.get_vocab(with_added_tokens=True)
            table = [""] * self._vocab_size
            for token, index in vocab.items():
                table[index] = token
            self._id_to_token = table
        byte_of = _symbol_to_byte()
        pieces = []
        for index in ids:
            if index == self._eot_id:
                break
            if index == self._sot_id:
                continue
            if not 0 <= index < self._vocab_size:
                raise ValueError(f"token id {index} is outside the vocabulary (size {self._vocab_size})")
            pieces.append(self._id_to_token[index])
        symbols = "".join(pieces).replace(END_OF_WORD, " ")
        data = bytearray()
        for char in symbols:
            data.extend(b" " if char == " " else bytes([byte_of[char]]))
        return data.decode("utf-8", errors="replace").strip()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size}, context_length={self._context_length})"

    # Pickling (DataLoader workers started with spawn) goes through the JSON form.
    def __getstate__(self) -> dict[str, Any]:
        return {"json": self.to_json()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = Tokenizer.from_json(state["json"])
        self.__dict__.update(other.__dict__)


def _merge_pairs(raw: list[Any]) -> list[tuple[str, str]]:
    """`tokenizers` writes merges as [left, right] lists (recent) or 'left right' strings (older)."""
    pairs = []
    for item in raw:
        if isinstance(item, str):
            left, right = item.split(" ", 1)
        else:
            left, right = item
        pairs.append((left, right))
    return pairs
