"""The generator protocol every backend implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_new_tokens: int = 160
    temperature: float = 0.3
    top_p: float = 0.9
    repetition_penalty: float = 1.15
    no_repeat_ngram_size: int = 4
    seed: int | None = None


class GenerationError(Exception):
    """Generation failed; ``partial`` says whether some text had already been streamed."""

    def __init__(self, message: str, *, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


@runtime_checkable
class Generator(Protocol):
    """Streams a reply to a chat as text pieces.

    Closing the returned iterator early (``aclose``) must stop the work behind it, so
    a conversation handed to a person stops costing compute.
    """

    @property
    def saturated(self) -> bool:
        """True while a new request would wait for a free slot, so a caller with a time
        budget can answer another way instead of queueing."""
        ...

    def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[str]: ...

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` costs in a prompt, for history budgeting."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
