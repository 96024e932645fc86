"""Scripted stand-ins for the two models, shared by the adapter tests and the load benches.

The platform tests and benches measure the platform path (fake server, real library,
adapter, pipeline, SQLite), so they need model output that is exact and instant: a
chosen answer streamed in pieces like a model streams it, and a fixed sentiment score.
Everything else stays real. ``settled`` waits on the real store for a conversation
to be fully answered.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Sequence

from core.config import Settings
from core.generation import ChatMessage, GenerationParams
from core.grounding import Grounder
from core.store import Scores, SQLiteStore

__all__ = ["NeutralClassifier", "ScriptedGenerator", "open_grounder", "settled"]


def _default_answer(question: str) -> str:
    return f"Thanks! About '{question}': here is what I know."


class ScriptedGenerator:
    """Streams a known reply like a model would; the caller chooses the words.

    The reply is ``replies[question]`` or ``answer(question)``, where the question is the
    last line of the last turn (the core merges earlier unanswered turns into it). It is
    streamed word by word, or in ``pieces`` equal parts, ``delay_s`` apart.
    """

    __slots__ = ("_stream", "answer", "calls", "delay_s", "pieces", "prompts", "replies",
                 "saturated")

    def __init__(self, answer: Callable[[str], str] = _default_answer, *,
                 delay_s: float = 0.03, pieces: int = 0) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.pieces = pieces
        self.replies: dict[str, str] = {}
        self.prompts: list[Sequence[ChatMessage]] = []
        self.calls = 0
        self.saturated = False
        """Set by a test: the model is busy, as a one-slot backend reports it."""
        self._stream = self._words

    def stream(self, messages: Sequence[ChatMessage], params: GenerationParams
               ) -> AsyncIterator[str]:
        self.calls += 1
        self.prompts.append(messages)
        question = messages[-1].content.splitlines()[-1]
        return self._stream(self.replies.get(question) or self.answer(question))

    def _split(self, text: str) -> list[str]:
        if self.pieces <= 0:
            return re.findall(r"\S+\s*", text) or [text]
        step = max(1, len(text) // self.pieces)
        return [text[at:at + step] for at in range(0, len(text), step)]

    async def _words(self, text: str) -> AsyncIterator[str]:
        for piece in self._split(text):
            await asyncio.sleep(self.delay_s)
            yield piece

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def start(self) -> None:
        """Nothing to load."""

    async def close(self) -> None:
        """Nothing to free."""


class NeutralClassifier:
    """A fixed neutral score, for runs that should not pay for the sentiment model."""

    __slots__ = ()

    async def classify(self, text: str) -> Scores:
        return Scores("neutral", 0.05, 0.9, 0.05)

    async def start(self) -> None:
        """Nothing to load."""

    async def close(self) -> None:
        """Nothing to free."""


_BUSY_SQL = (
    "SELECT SUM(direction = 'in') AS got, SUM((direction = 'in' AND status IN "
    "('received', 'processing')) OR (direction = 'out' AND status IN ('pending', 'sending'))) "
    "AS busy FROM messages"
)


async def settled(store: SQLiteStore, inbound: int, within: float = 20.0) -> None:
    """Wait until ``inbound`` customer events are stored and every one is handled."""

    async def done() -> bool:
        [row] = await store.query(_BUSY_SQL)
        return (row["got"] or 0) >= inbound and not row["busy"]

    async with asyncio.timeout(within):
        while not await done():  # noqa: ASYNC110 (the store has no change event)
            await asyncio.sleep(0.05)


async def open_grounder(settings: Settings) -> Grounder:
    """The knowledge-base grounder exactly as the service builds it from ``settings``."""
    from bots.service import build_grounder, open_retriever

    grounder = build_grounder(settings, await open_retriever(settings))
    if grounder is None:
        raise ValueError("grounding is disabled in these settings ([grounding] enabled)")
    return grounder
