"""The platform-neutral message model every adapter speaks.

Adapters translate platform events into :class:`Inbound` and render :class:`Reply`;
nothing platform-specific crosses this line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum


class Kind(StrEnum):
    """What an inbound event is."""

    TEXT = "text"
    SUGGESTION_CLICK = "suggestion_click"
    REACTION = "reaction"
    COMMAND = "command"
    ATTACHMENT = "attachment"


class Sender(StrEnum):
    """Who wrote an outbound message."""

    BOT = "bot"
    OPERATOR = "operator"
    SYSTEM = "system"


def utcnow() -> datetime:
    return datetime.now(UTC)


def well_formed(text: str) -> str:
    """``text`` as valid Unicode: a lone surrogate (JSON allows ``"\\ud800"``; UTF-8 and
    SQLite do not) becomes U+FFFD, a split pair is joined. Everything else is kept."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


@dataclass(frozen=True, slots=True)
class User:
    """A person on one platform; ``platform_user_id`` is the platform's own id."""

    platform: str
    platform_user_id: str
    display_name: str = ""

    def __post_init__(self) -> None:
        for name in ("platform_user_id", "display_name"):
            object.__setattr__(self, name, well_formed(getattr(self, name)))


@dataclass(frozen=True, slots=True)
class Inbound:
    """One event from a customer.

    ``conversation_key`` identifies the chat on its platform (a Telegram chat id, a
    Discord channel or thread id, a web session id). ``platform_message_id`` is unique
    per platform and is how redelivered events are recognised. ``payload`` carries the
    kind-specific detail: the suggestion id for a click, the emoji for a reaction, the
    command name (without slash) for a command (``text`` then holds its arguments).
    """

    platform: str
    conversation_key: str
    user: User
    platform_message_id: str
    text: str
    kind: Kind = Kind.TEXT
    payload: str = ""
    sent_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        # Whatever a platform or a browser sent, the core gets text it can store and print.
        for name in ("conversation_key", "platform_message_id", "text", "payload"):
            object.__setattr__(self, name, well_formed(getattr(self, name)))


@dataclass(frozen=True, slots=True)
class Suggestion:
    """A help article offered in the chat; adapters render it as a button or link."""

    id: str
    title: str
    url: str = ""


@dataclass(frozen=True, slots=True)
class Citation:
    """A knowledge-base article an answer was grounded in."""

    id: str
    title: str
    url: str = ""


@dataclass(frozen=True, slots=True)
class Reply:
    """One outbound message to a customer (or to an operator channel)."""

    text: str
    sender: Sender = Sender.BOT
    suggestions: tuple[Suggestion, ...] = ()
    citations: tuple[Citation, ...] = ()

    def __post_init__(self) -> None:
        # An operator's text comes from a browser's JSON; every platform needs valid Unicode.
        object.__setattr__(self, "text", well_formed(self.text))
