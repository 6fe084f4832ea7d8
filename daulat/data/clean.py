"""Cleaning one document's text: Unicode repair and normalisation, control characters, whitespace.

    text = clean_text(raw)        # None when what is left is shorter than min_chars

Mojibake ("cafÃ©" for "café") and other Unicode damage are repaired by `ftfy` (documents extra), which also
normalises to NFC; control characters other than tab and newline are removed; runs of spaces become one,
three or more newlines become two (a paragraph break), and each line loses its trailing spaces.
"""

from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_TRAILING = re.compile(r" +\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, min_chars: int = 20) -> str | None:
    """The cleaned text, or None when fewer than `min_chars` characters remain."""
    import ftfy

    text = ftfy.fix_text(text.replace("\r\n", "\n").replace("\r", "\n"), normalization="NFC")
    text = unicodedata.normalize("NFC", _CONTROL.sub("", text))
    text = _BLANK_LINES.sub("\n\n", _TRAILING.sub("\n", _SPACES.sub(" ", text))).strip()
    return text if len(text) >= min_chars else None
