"""Caption clean-up as CLIP does it ("lower"): a standard-library stand-in for ftfy, then html and whitespace.

`clean_caption` = `fix_text` (below), HTML unescaping twice, whitespace collapsed to single spaces, stripped,
lower-cased. `fix_text` re-implements the ftfy steps that matter for captions and need no heuristics: HTML
entity decoding (ftfy's semicolon-only rule, upper-case entity names, and its "no decoding when the line
contains '<'" rule), C1 control characters read as Windows-1252, Latin ligatures, full-/half-width forms,
curly quotes, line breaks, ANSI terminal escapes, invisible control characters, lone surrogates, NFC
normalisation, repeated until nothing changes as ftfy does. NOT implemented: ftfy's mojibake repair
(`fix_encoding`: "cafÃ©" stays "cafã©" instead of "café"). Captions that are already valid text come out as
ftfy would make them, so ftfy is not a dependency.
"""

from __future__ import annotations

import html
import html.entities
import re
import unicodedata
from functools import lru_cache


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
