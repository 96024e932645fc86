"""The chat sent to the generator: system prompt, recent turns within a token budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from core.generation import ChatMessage


def build_chat(
    system: str,
    history: Sequence[tuple[str, str]],
    question: str,
    *,
    count_tokens: Callable[[str], int],
    token_budget: int,
) -> list[ChatMessage]:
    """``history`` is (role, text) oldest first; the newest turns that fit are kept.

    The question itself is always sent; older turns are dropped first, and a turn that
    would overflow the budget ends the history there (no gaps in the middle).
    """
    used = count_tokens(system) + count_tokens(question)
    kept: list[ChatMessage] = []
    for role, text in reversed(history):
        cost = count_tokens(text) + 4
        if used + cost > token_budget:
            break
        used += cost
        kept.append(ChatMessage("assistant" if role == "assistant" else "user", text))
    kept.reverse()
    # Chat templates expect turns to alternate; merge neighbours from the same side.
    merged: list[ChatMessage] = []
    for message in kept:
        if merged and merged[-1].role == message.role:
            merged[-1] = ChatMessage(message.role, f"{merged[-1].content}\n{message.content}")
        else:
            merged.append(message)
    if merged and merged[-1].role == "user":
        question = f"{merged.pop().content}\n{question}"
    return [ChatMessage("system", system), *merged, ChatMessage("user", question)]
