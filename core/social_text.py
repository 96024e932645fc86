"""Normalising social-media text the same way for sentiment training and at run time.

@handles become ``@user`` and links ``http`` (names and links say nothing about mood and
are personal); HTML entities are decoded. Case, "!!!" and emoji are kept; an emoji is
also written as ``:its name:``, because the MiniLM vocabulary maps emoji to [UNK].
"""

from __future__ import annotations

import html
import re
import unicodedata

NORMALIZATION = "social-v1"
"""Names this normalisation; stored with trained models so a mismatch can be detected."""

_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_HANDLE = re.compile(r"(?<![\w@])@\w+")
_SPACE = re.compile(r"\s+")
_QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "…": "...", "—": " - "})
_INVISIBLE = frozenset({"\ufe0e", "\ufe0f", "\u200d"})


def normalize(text: str) -> str:
    text = html.unescape(text).translate(_QUOTES)
    text = _URL.sub("http", text)
    text = _HANDLE.sub("@user", text)
    parts: list[str] = []
    for ch in text:
        if ch in _INVISIBLE or 0x1F3FB <= ord(ch) <= 0x1F3FF:
            continue
        if unicodedata.category(ch) == "So":
            name = unicodedata.name(ch, "").lower()
            parts.append(f" {ch} :{name}: " if name else ch)
        else:
            parts.append(ch)
    return _SPACE.sub(" ", "".join(parts)).strip()
