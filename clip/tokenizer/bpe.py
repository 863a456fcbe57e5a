"""CLIP's byte-level BPE on the `tokenizers` (Rust) fast path: training, OpenAI's vocabulary, JSON.

* pre-tokenisation with CLIP's pattern: contractions ('s 't 're 've 'm 'll 'd), runs of letters, single
  digits, runs of other non-space symbols; whitespace is dropped;
* each piece as UTF-8 bytes mapped to printable characters (GPT-2's byte alphabet); the last symbol of
  every piece carries the end-of-word suffix `</w>`, so decoding restores the spaces between pieces;
* vocabulary layout: 256 byte symbols, the same 256 with `</w>`, merge results in merge order, then
  `<start_of_text>` and `<end_of_text>`, so `<end_of_text>` is `vocab_size - 1` (the text encoder pools at
  `tokens.argmax(-1)`);
* a row is `[sot] + tokens + [eot]`, truncated to `context_length` with `eot` kept in the last slot,
  zero padded.

Captions are cleaned first (`clip.tokenizer.clean`). A tokenizer is one JSON document (`to_json` / `from_json`);
where that document is stored is its caller's business (this package knows no storage and no config).

torch is imported lazily (only by `__call__`, which returns a LongTensor), so the
torch-free runtime (`clip.runtime`) can load a bundle's tokenizer and use `encode_batch` (an int64 numpy array
with the same ids) where torch is not installed.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import AddedToken, Regex, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from clip.tokenizer.clean import clean_caption

if TYPE_CHECKING:
    import torch

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
# the byte alphabet


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
def _end_symbols() -> list[str]:
    """One character per byte WITH `</w>`, for the trainer (see `Tokenizer.train`): private use area code
    points, which the byte mapping never produces."""
    return [chr(0xE000 + b) for b in range(256)]


# ----------------------------------------------------------------------------------------------------------
# what the Rust trainer sees

# The Rust trainer applies a merge to a word with a Vec insert and two removes per occurrence, so one piece of
# n bytes costs O(n^2) per merge: a 64 KiB run of one letter took seconds, 1 MiB minutes. Longer pieces are
# cut into chunks of at most this many bytes (only the last keeps the end-of-word symbol), which bounds the
# work per byte. Real words are far shorter, so the merges learnt from real captions do not change.
MAX_TRAINER_PIECE_BYTES = 256
# The script that runs the Rust trainer (by path: it imports `tokenizers` only, not the clip package).
_TRAIN_PROCESS = Path(__file__).with_name("train_process.py")


def trainer_words(captions: Iterable[str]) -> Iterator[str]:
    """Per caption, the text the Rust trainer splits on spaces: its CLIP pieces, one character per byte
    (`</w>` folded into the last byte's character), pieces over MAX_TRAINER_PIECE_BYTES cut into chunks."""
    symbols, end_symbols = byte_symbols(), _end_symbols()
    splitter = pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True)
    cache: dict[str, str] = {}  # captions repeat their words: map each distinct piece once

    def encode_piece(piece: str) -> str:
        mapped = cache.get(piece)
        if mapped is None:
            data = piece.encode("utf-8")
            mapped = "".join(symbols[b] for b in data[:-1]) + end_symbols[data[-1]]
            if len(mapped) > MAX_TRAINER_PIECE_BYTES:
                step = MAX_TRAINER_PIECE_BYTES
                mapped = " ".join(mapped[i : i + step] for i in range(0, len(mapped), step))
            cache[piece] = mapped
        return mapped

    for caption in captions:
        pieces = splitter.pre_tokenize_str(clean_caption(caption))
        yield " ".join(encode_piece(piece) for piece, _ in pieces)


def _learn_merges(words: Iterable[str], settings: dict[str, Any]) -> list[Any]:
    """The Rust trainer's merges for `words` (`trainer_words` output), learnt in a child process
    (`train_process.py`, given `settings`: its BpeTrainer arguments).

    Why a process: the trainer never checks for signals, so in this process Ctrl-C waited until it returned
    (minutes on a big or hostile corpus); and a thread cannot be abandoned safely (a daemon thread that
    re-enters Python while the interpreter shuts down aborts the process: "FATAL: exception not rethrown").
    A child can be killed: any exception here, KeyboardInterrupt included, kills it before it propagates.
    The child's errors go to our stderr.
    """
    child = subprocess.Popen([sys.executable, str(_TRAIN_PROCESS)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        try:
            child.stdin.write(json.dumps(settings).encode("utf-8") + b"\n")
            for line in words:
                child.stdin.write(line.encode("utf-8") + b"\n")
            child.stdin.close()
        except BrokenPipeError:
            pass  # the child died: its exit code says so below
        output = child.stdout.read()
        if child.wait() != 0:
            raise RuntimeError(f"BPE training process {_TRAIN_PROCESS.name} failed with exit code {child.returncode} "
                               "(its error is printed above)")
        return json.loads(output)["model"]["merges"]
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout):
            with contextlib.suppress(OSError):  # a pipe to a killed child: nothing left to flush or read
                pipe.close()


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
        alphabet (numbered in code-point order), and the merges are mapped back afterwards. Pieces longer
        than MAX_TRAINER_PIECE_BYTES are learnt from in chunks (see `trainer_words`), and Ctrl-C stops the
        training at once (see `_learn_merges`).
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (512 byte symbols + 2 specials), got {vocab_size}")
        symbols, end_symbols = byte_symbols(), _end_symbols()
        to_bpe_symbol = {s: s for s in symbols} | {e: s + END_OF_WORD for e, s in zip(end_symbols, symbols, strict=True)}
        settings = {
            "vocab_size": vocab_size - 2,  # the trainer's vocabulary = 512 symbols + merges; specials come after
            "min_frequency": min_frequency,
            "show_progress": show_progress,
            "initial_alphabet": symbols + end_symbols,
        }
        learnt = _learn_merges(trainer_words(captions), settings)

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

    def encode_batch(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """int64 array [N, context_length]: [sot] tokens [eot] 0 0 ...; over-long captions keep eot last.
        The ids `__call__` gives, without torch."""
        if isinstance(texts, str):
            texts = [texts]
        context_length = self._context_length if context_length is None else context_length
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end token), got {context_length}")
        if len(texts) == 0:
            return np.zeros((0, context_length), dtype=np.int64)
        cleaned = [clean_caption(t) for t in texts]
        encodings = self._tokenizer_for(context_length).encode_batch_fast(cleaned, add_special_tokens=True)
        # Every row is exactly context_length long (truncated/padded in Rust): one flat copy into int64.
        flat = np.fromiter(
            itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=len(cleaned) * context_length
        )
        return flat.reshape(len(cleaned), context_length)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """LongTensor [N, context_length]: [sot] tokens [eot] 0 0 ...; over-long captions keep eot last."""
        import torch  # lazy: the tokenizer itself needs no torch (see the module docstring)

        return torch.from_numpy(self.encode_batch(texts, context_length))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a token sequence: stops at the first end token (the rest is padding), drops the start
        token, turns `</w>` into spaces. Lower-cased and cleaned, as the text was when encoded."""
        if hasattr(ids, "reshape"):  # a torch tensor or numpy array (no torch import needed to tell)
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
