"""When a conversation goes to a person, and why.

Signals, in order: an explicit request for a person (``/human`` or plain words); a run
of negative messages (P(negative) above a threshold on N of the last W); a sustained
negative trend (an exponentially weighted average of P(negative)); the customer asking
the same thing again and again (the bot is not helping); and generation failures (the
pipeline reports those). Each decision carries its reason and the scores behind it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.config import EscalationSettings

REASON_REQUESTED = "customer_requested"
REASON_NEGATIVE = "negative_sentiment"
REASON_TREND = "negative_trend"
REASON_REPEATED = "repeated_question"
REASON_GENERATION = "generation_failed"
REASON_NO_ANSWER = "no_answer"

_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True, slots=True)
class Escalation:
    reason: str
    scores: dict[str, Any] = field(default_factory=dict)


def ewma(values: Sequence[float], alpha: float) -> float:
    average = values[0]
    for value in values[1:]:
        average = alpha * value + (1 - alpha) * average
    return average


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def similarity(a: str, b: str) -> float:
    """Jaccard overlap of the words; cheap, and robust to reordering and punctuation."""
    wa, wb = _words(a), _words(b)
    if not wa or not wb:
        return 0.0
    return len(wa & wb) / len(wa | wb)


class EscalationPolicy:
    """Stateless rules over the conversation so far; the store keeps the state."""

    __slots__ = ("_human", "_settings")

    def __init__(self, settings: EscalationSettings) -> None:
        self._settings = settings
        phrases = sorted((p.strip().lower() for p in settings.human_phrases if p.strip()), key=len)
        alternatives = "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in reversed(phrases))
        self._human = re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE) if phrases else None

    def asks_for_human(self, text: str) -> bool:
        return bool(self._human and self._human.search(text))

    def decide(
        self,
        text: str,
        negative_history: Sequence[float],
        earlier_texts: Sequence[str] = (),
    ) -> Escalation | None:
        """``negative_history``: P(negative) of the customer's messages since the last
        ticket, oldest first, ending with this one; ``earlier_texts``: the customer's
        previous messages in that span, oldest first."""
        s = self._settings
        if self.asks_for_human(text):
            return Escalation(REASON_REQUESTED, {"text": text[:200]})
        window = list(negative_history)[-s.window :]
        hits = sum(p >= s.negative_threshold for p in window)
        rounded = [round(p, 3) for p in window]
        if hits >= s.negative_hits:
            return Escalation(
                REASON_NEGATIVE,
                {"p_negative": rounded, "hits": hits, "threshold": s.negative_threshold},
            )
        if len(negative_history) >= s.ewma_min_messages:
            trend = ewma(list(negative_history), s.ewma_alpha)
            if trend >= s.ewma_threshold:
                return Escalation(REASON_TREND, {"ewma": round(trend, 3), "p_negative": rounded})
        repeats = sum(similarity(text, t) >= s.repeat_similarity for t in earlier_texts)
        if repeats >= s.repeat_limit:
            return Escalation(REASON_REPEATED, {"repeats": repeats, "text": text[:200]})
        return None
