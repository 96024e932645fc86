"""When a conversation goes to a person, and why.

Signals: an explicit request for a person (``/human`` or plain words), a run of
negative messages (P(negative) above a threshold on N of the last W), and generation
failures. Each decision carries its reason and the scores behind it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.config import EscalationSettings

REASON_REQUESTED = "customer_requested"
REASON_NEGATIVE = "negative_sentiment"
REASON_GENERATION = "generation_failed"
REASON_NO_ANSWER = "no_answer"


@dataclass(frozen=True, slots=True)
class Escalation:
    reason: str
    scores: dict[str, Any] = field(default_factory=dict)


class EscalationPolicy:
    """Stateless rules over the conversation's recent scores; the store keeps the state."""

    __slots__ = ("_human", "_settings")

    def __init__(self, settings: EscalationSettings) -> None:
        self._settings = settings
        phrases = sorted((p.strip().lower() for p in settings.human_phrases if p.strip()), key=len)
        alternatives = "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in reversed(phrases))
        self._human = re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE) if phrases else None

    def asks_for_human(self, text: str) -> bool:
        return bool(self._human and self._human.search(text))

    def decide(self, text: str, negative_history: Sequence[float]) -> Escalation | None:
        """``negative_history``: P(negative) of the customer's messages, oldest first,
        ending with the current one."""
        if self.asks_for_human(text):
            return Escalation(REASON_REQUESTED, {"text": text[:200]})
        window = list(negative_history)[-self._settings.window :]
        hits = sum(p >= self._settings.negative_threshold for p in window)
        if hits >= self._settings.negative_hits:
            return Escalation(
                REASON_NEGATIVE,
                {"p_negative": [round(p, 3) for p in window], "hits": hits,
                 "threshold": self._settings.negative_threshold},
            )
        return None
