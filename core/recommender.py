"""Help-article suggestions shown beside bot replies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from core.messages import Suggestion


@dataclass(frozen=True, slots=True)
class SuggestionRequest:
    user_id: int
    conversation_id: int
    text: str
    recent_texts: Sequence[str] = ()


@runtime_checkable
class Recommender(Protocol):
    async def suggest(self, request: SuggestionRequest, k: int) -> list[Suggestion]: ...

    def describe(self, item_id: str) -> Suggestion | None:
        """The article behind a suggestion id (to answer a click), if known."""
        ...


class NoSuggestions:
    """Used when suggestions are switched off."""

    __slots__ = ()

    async def suggest(self, request: SuggestionRequest, k: int) -> list[Suggestion]:
        return []

    def describe(self, item_id: str) -> Suggestion | None:
        return None
