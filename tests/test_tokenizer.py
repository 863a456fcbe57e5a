"""Tokenizer: token ids equal open_clip's SimpleTokenizer with CLIP's published BPE on a hard corpus;
the text clean-up equals ftfy + html where we claim it does; the trained BPE has CLIP's layout (specials
last), is deterministic across processes, applies merges like a brute-force BPE, round-trips text,
and survives JSON / file / pickle round trips."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip import storage
from clip.tokenizer import (
    EOT_TOKEN,
    MIN_VOCAB_SIZE,
    SOT_TOKEN,
    Tokenizer,
    byte_symbols,
    clean_caption,
    fix_text,
)

REPO = Path(__file__).resolve().parents[1]

LONG_CAPTION = " ".join(f"word{i} and, more words!" for i in range(60))  # ~300 tokens
# Captions where ftfy's behaviour is reproduced (no mojibake): every script and trick we care about.
PARITY_CORPUS = [
    "a photo of a cat.",
    "A Photo Of A DOG, sitting on the grass!!!",
    "Hello,   World!!  it's 2024 :) don't we'll they've I'M SHE'D you're",
    "price: $12.99 (was $15) -- 50% off?! #deal @shop ~~~ ***",
    "emoji 🐶🐱🏳️‍🌈 👍🏽 🇯🇵 ❤️ and ✓ marks",
    "東京タワーの夜景 and 北京 天安门 서울 야경",
    "Привет, мир! Москва ёлка",
    "مرحبا بالعالم القاهرة",
    "नमस्ते दुनिया भारत",
    "Ελληνικά γράμματα, עברית, ไทย",
    "café naïve résumé Øresund Straße",
    "cafe\u0301 decomposed accents: e\u0301 a\u0300 n\u0303",  # NFC composes them
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#233;t&#xE9;",
    "&amp;lt;b&amp;gt; double escaped &amp;amp;amp;",
    "P&EACUTE;REZ, ALL-CAPS entities &NTILDE;",
    "entities without semicolons: &amp &copy &not that",
    "<b>bold</b> &amp; real html keeps &lt;entities&gt; once",
    "line one &amp;\n<p>line two &amp;amp;</p>",
    "“curly” ‘quotes’ and ﬁne ligatures ﬂow, ＦＵＬＬ ｗｉｄｔｈ １２３, ｶﾀｶﾅ",
    "\x1b[31mred terminal text\x1b[0m and \x07bell \x00nul",
    "c1 controls \x85 \x91quoted\x92 \x96 dash",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic\u2028separator",
    "zero\u200bwidth and\ufeffbom",
    "   leading and trailing   ",
    "",
    "!!!",
    "1234567890 3.14159 1,000,000",
    "x" * 200,
    LONG_CAPTION,
    "Ümlauts ÄÖÜ and İstanbul and ǅ digraph",
]


@pytest.fixture(scope="module")
def clip_bpe_path() -> str:
    open_clip = pytest.importorskip("open_clip")
    return os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def clip_tok(clip_bpe_path: str) -> Tokenizer:
    return Tokenizer.from_clip_bpe(clip_bpe_path)


@pytest.fixture(scope="module")
def reference(clip_bpe_path: str):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(clip_bpe_path)


# ----------------------------------------------------------------------------------------------------------
# CLIP's BPE: parity with open_clip


def test_clip_bpe_layout(clip_tok: Tokenizer) -> None:
    assert clip_tok.vocab_size == 49408
    assert (clip_tok.sot_token_id, clip_tok.eot_token_id) == (49406, 49407)
    assert clip_tok.context_length == 77


@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_equal_open_clip(clip_tok: Tokenizer, reference, context_length: int) -> None:
    got = clip_tok(PARITY_CORPUS, context_length=context_length)
    want = reference(PARITY_CORPUS, context_length=context_length)
    assert got.dtype == torch.long and got.shape == want.shape == (len(PARITY_CORPUS), context_length)
    for text, g, w in zip(PARITY_CORPUS, got, want, strict=True):
        assert g.tolist() == w.tolist(), f"token ids differ for {text!r}"


def test_encode_and_decode_equal_open_clip(clip_tok: Tokenizer, reference) -> None:
    for text in PARITY_CORPUS:
        ids = clip_tok.encode(text)
        assert ids == reference.encode(text), f"encode differs for {text!r}"
        assert clip_tok.decode(ids) == reference.decode(ids).strip(), f"decode differs for {text!r}"


def test_open_clip_singleton_tokenizer_agrees(clip_tok: Tokenizer) -> None:
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.get_tokenizer("ViT-B-32")
    torch.testing.assert_close(clip_tok(PARITY_CORPUS), reference(PARITY_CORPUS), rtol=0, atol=0)


def test_clean_up_equals_ftfy_and_html_on_corpus() -> None:
    ftfy = pytest.importorskip("ftfy")
    from open_clip.tokenizer import _clean_lower

    for text in PARITY_CORPUS:
        assert fix_text(text) == ftfy.fix_text(text), f"fix_text differs from ftfy for {text!r}"
        assert clean_caption(text) == _clean_lower(text), f"clean-up differs for {text!r}"


def test_documented_difference_mojibake_is_not_repaired() -> None:
    ftfy = pytest.importorskip("ftfy")
    mojibake = "cafÃ© crÃ¨me"  # UTF-8 read as Latin-1: ftfy repairs it, we do not (see module docstring)
    assert ftfy.fix_text(mojibake) == "café crème"
    assert clean_caption(mojibake) == "cafã© crã¨me"


def test_truncation_keeps_end_token_and_pads_with_zeros(clip_tok: Tokenizer) -> None:
    ids = clip_tok([LONG_CAPTION, "a dog"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == clip_tok.sot_token_id and ids[0, -1] == clip_tok.eot_token_id
    assert ids[0, 1:-1].tolist() == clip_tok.encode(LONG_CAPTION)[:75]
    n = len(clip_tok.encode("a dog"))
    assert ids[1, n + 1] == clip_tok.eot_token_id and ids[1, n + 2 :].eq(0).all()
    assert ids.argmax(-1).tolist() == [76, n + 1]  # the text encoder pools here
    single = clip_tok("a dog")
    assert single.shape == (1, 77) and torch.equal(single[0], ids[1])


def test_literal_special_token_text_is_plain_text(clip_tok: Tokenizer) -> None:
    # open_clip would emit the special id here; we keep a caption from moving the pooling position.
    ids = clip_tok(f"a {EOT_TOKEN} b {SOT_TOKEN}")[0]
    assert (ids == clip_tok.eot_token_id).sum() == 1 and (ids == clip_tok.sot_token_id).sum() == 1


def test_bad_inputs(clip_tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="caption must be str"):
        clip_tok([None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="context_length"):
        clip_tok("x", context_length=1)
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.from_clip_bpe(tmp_path / "missing.txt.gz")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.from_json("{oops")
    with pytest.raises(ValueError, match="format"):
        Tokenizer.from_json(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        clip_tok.decode([10**6])
    assert clip_tok([]).shape == (0, 77)


# ----------------------------------------------------------------------------------------------------------
# trained BPE

TRAIN_WORDS = ("red blue green yellow circle square triangle star small large tiny huge left right above "
               "below two three four a photo of the on next to and with").split()


def _captions(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(TRAIN_WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "." for _ in range(n)]


def _brute_force_bpe(word_symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Textbook BPE: repeatedly merge the lowest-ranked adjacent pair, all its occurrences left to right."""
    symbols = list(word_symbols)
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:], strict=False)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(_captions(2000), vocab_size=560, context_length=32)


def test_trained_layout_specials_highest(trained: Tokenizer) -> None:
    assert trained.vocab_size == 560  # the corpus has pairs for more than these 46 merges
    assert trained.eot_token_id == trained.vocab_size - 1 and trained.sot_token_id == trained.vocab_size - 2
    vocab = json.loads(trained.to_json())["hf_tokenizer"]["model"]["vocab"]
    by_id = sorted(vocab, key=vocab.get)
    symbols = sorted(byte_symbols(), key=ord)
    assert by_id[:512] == symbols + [s + "</w>" for s in symbols]
    ids = trained(["a red circle", "huge"])
    assert ids.shape == (2, 32) and ids.max() == trained.eot_token_id
    assert ids.argmax(-1).tolist() == [(row == trained.eot_token_id).nonzero()[0].item() for row in ids]


def test_trained_merges_apply_like_brute_force_bpe(trained: Tokenizer) -> None:
    model = json.loads(trained.to_json())["hf_tokenizer"]["model"]
    ranks = {tuple(m if isinstance(m, list) else m.split(" ")): i for i, m in enumerate(model["merges"])}
    vocab = model["vocab"]
    symbols = byte_symbols()
    for caption in ["a red circle next to two huge stars.", "unseen words: zebra quux ünïcode 🐶", "redredred"]:
        want = []
        for piece in caption.lower().replace(".", " .").replace(":", " :").split():
            chars = [symbols[b] for b in piece.encode("utf-8")]
            chars[-1] += "</w>"
            want += [vocab[t] for t in _brute_force_bpe(chars, ranks)]
        assert trained.encode(caption) == want, caption


def test_trained_round_trip_text_and_unseen_characters(trained: Tokenizer) -> None:
    for caption in ["A red circle above two tiny squares.", "Zebra! 東京 🐶 naïve", "x" * 50]:
        decoded = trained.decode(trained.encode(caption))
        assert decoded.replace(" ", "") == clean_caption(caption).replace(" ", "")


def test_training_is_deterministic_across_processes(trained: Tokenizer, tmp_path: Path) -> None:
    again = Tokenizer.train(_captions(2000), vocab_size=560, context_length=32)
    assert again.to_json() == trained.to_json()
    # A fresh interpreter with another hash seed: the Rust trainer's hash maps are seeded per process.
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
        "from test_tokenizer import _captions; from clip.tokenizer import Tokenizer;"
        "from pathlib import Path;"
        "Path(sys.argv[3]).write_text(Tokenizer.train(_captions(2000), vocab_size=560, context_length=32).to_json())"
    )
    out = tmp_path / "tok.json"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", script, str(REPO / "tests"), str(REPO), str(out)], check=True, env=env)
    assert Tokenizer.from_json(out.read_text()).to_json() == trained.to_json()


def test_small_corpus_gives_smaller_vocab_and_minimum_is_enforced() -> None:
    tiny = Tokenizer.train(["red circle", "red square"], vocab_size=4096)
    assert tiny.vocab_size < 4096 and tiny.eot_token_id == tiny.vocab_size - 1
    assert tiny.decode(tiny.encode("Blue circle!")) == "blue circle !"
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        Tokenizer.train(["x"], vocab_size=MIN_VOCAB_SIZE - 1)


# ----------------------------------------------------------------------------------------------------------
# serialisation


@pytest.mark.parametrize("which", ["trained", "clip"])
def test_json_file_and_pickle_round_trips(which: str, trained: Tokenizer, clip_tok: Tokenizer, tmp_path: Path) -> None:
    tok = trained if which == "trained" else clip_tok
    texts = PARITY_CORPUS[:12]
    want = tok(texts)
    restored = Tokenizer.from_json(tok.to_json())
    path = tmp_path / "sub" / "tokenizer.json"
    storage.write_bytes(str(path), tok.to_json().encode("utf-8"))
    loaded = Tokenizer.from_json(storage.read_bytes(str(path)).decode("utf-8"))
    unpickled = pickle.loads(pickle.dumps(tok))
    for other in (restored, loaded, unpickled):
        assert other.vocab_size == tok.vocab_size and other.context_length == tok.context_length
        assert torch.equal(other(texts), want)
        assert other.eot_token_id == tok.eot_token_id and other.sot_token_id == tok.sot_token_id


def test_json_round_trips_through_s3(trained: Tokenizer, s3_bucket: str) -> None:
    """The JSON document stored on S3 through clip.storage (moto server, AWS_ENDPOINT_URL set) gives the same ids."""
    uri = f"s3://{s3_bucket}/models/checkpoints/tokenizer.json"
    storage.write_bytes(uri, trained.to_json().encode("utf-8"))
    loaded = Tokenizer.from_json(storage.read_bytes(uri).decode("utf-8"))
    assert loaded.to_json() == trained.to_json()
    texts = ["a red circle above two tiny squares", "Zebra! 東京 🐶"]
    assert torch.equal(loaded(texts), trained(texts))


def test_random_mixed_script_captions_equal_open_clip(clip_tok: Tokenizer, reference) -> None:
    """1000 seeded random captions over many scripts, entities, emoji, whitespace and contractions.

    The pool leaves out Windows-1252 punctuation (’ “ ” … — œ): next to accented letters it can spell
    UTF-8 mojibake that ftfy repairs and we do not (the fixed corpus covers those characters alone).
    """
    import random

    pool = [
        *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()-_/#@$%*+=<>[]{}|\\^`~",
        *"éèêñüßÉÑçøåæ東京北京タワーの夜景서울야경Приветмирёлкаمرحبابالعالمनमस्तेदुनिया",
        "🐶", "🐱", "👍🏽", "🇯🇵", "❤️", "&amp;", "&lt;", "&gt;", "&#233;", "  ", "\t", "\n", "'s", "'ll", "N'T", "ﬁ", "Ｆ",
        "\u0301",
    ]  # fmt: skip
    texts = []
    for seed in range(1000):
        rng = random.Random(seed)
        texts.append("".join(rng.choice(pool) for _ in range(rng.randint(0, 60))))
    got, want = clip_tok(texts), reference(texts)
    mismatched = [t for t, g, w in zip(texts, got, want, strict=True) if not torch.equal(g, w)]
    assert not mismatched, f"{len(mismatched)} captions differ, e.g. {mismatched[:3]!r}"
