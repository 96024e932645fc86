"""In-domain unlabeled customer tweets for distilling a sentiment teacher into a student.

The airline data set has about 11,700 labelled training tweets; TwACS holds tens of
thousands of customer tweets to airlines that nobody labelled. A fine-tuned teacher labels
them with its (calibrated) probabilities and a student learns from both, the usual way to
make a small labelled set go further. The texts are normalised exactly like the labelled
ones, deduplicated, and any text equal to a held-out (dev or test) tweet is dropped, so
the held-out splits stay unseen even by accident.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from finetune import conversations
from finetune.sentiment_data import DataError, normalize

EXAMPLE_UNLABELED = Path("../shared/data/twacs-dialogs/airlines_dev.csv.bz2")
DEFAULT_LIMIT = 24_000


@dataclass(frozen=True, slots=True)
class Unlabeled:
    """The sampled texts and what reading dropped, so the model card can say it."""

    path: Path
    texts: tuple[str, ...]
    turns_read: int
    without_words: int
    duplicates: int
    held_out_dropped: int


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def load_unlabeled(
    path: str | Path, held_out: Collection[str], limit: int = DEFAULT_LIMIT, seed: int = 0,
) -> Unlabeled:
    """Customer turns of a TwACS file, normalised, deduplicated and without ``held_out``
    texts (compared case- and space-insensitively); a fixed-seed sample of ``limit`` of them
    (all when ``limit`` is 0). Raises :class:`DataError` naming the file (and line)."""
    path = Path(path)
    if limit < 0:
        raise DataError(f"--unlabeled-limit must be >= 0, not {limit}")
    if not path.is_file():
        raise DataError(f"unlabeled data {path} not found: check --unlabeled (the TwACS file "
                        f"is {EXAMPLE_UNLABELED})")
    banned = {_key(t) for t in held_out}
    seen: set[str] = set()
    texts: list[str] = []
    read = without_words = duplicates = dropped = 0
    try:
        for _, raw in conversations.twacs_customer_turns(path):
            read += 1
            text = normalize(raw)
            key = _key(text)
            if not any(ch.isalpha() for ch in key.replace("@user", "")):
                without_words += 1
                continue
            if key in banned:
                dropped += 1
            elif key in seen:
                duplicates += 1
            else:
                seen.add(key)
                texts.append(text)
    except conversations.DataError as exc:
        raise DataError(str(exc)) from None
    if not texts:
        raise DataError(f"{path}: no customer turns with text")
    if limit and len(texts) > limit:
        texts = random.Random(seed).sample(texts, limit)
    return Unlabeled(path, tuple(texts), read, without_words, duplicates, dropped)
