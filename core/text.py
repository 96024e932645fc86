"""Cleaning customer text before it reaches models and operators."""

from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]"
)


def clean_text(text: str) -> str:
    """Drop control and bidi-override characters, normalise, keep newlines and emoji."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n"))
    return _CONTROL.sub("", text).strip()


def truncate(text: str, limit: int) -> tuple[str, bool]:
    """Cut at a word boundary near ``limit``; says whether anything was cut."""
    if len(text) <= limit:
        return text, False
    cut = text.rfind(" ", int(limit * 0.8), limit)
    return text[: cut if cut > 0 else limit], True
