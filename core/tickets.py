"""Plain ticket types that operator channels receive and the desk produces.

They live apart from :mod:`core.operators` so that the channel contracts can name them
without depending on the desk.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from core.messages import User


@dataclass(frozen=True, slots=True)
class Operator:
    platform: str
    operator_id: str
    display_name: str = ""

    @property
    def label(self) -> str:
        return f"{self.platform}:{self.operator_id}"

    @property
    def name(self) -> str:
        return self.display_name or "An agent"


@dataclass(frozen=True, slots=True)
class TicketView:
    id: int
    conversation_id: int
    platform: str
    conversation_key: str
    customer: User
    state: str
    reason: str
    scores: dict
    created_at: datetime
    claimed_by: str | None
    last_customer_text: str
    sentiment_trend: tuple[float, ...]
    note: str = ""

    @property
    def waiting_s(self) -> float:
        return (datetime.now(UTC) - self.created_at).total_seconds()
