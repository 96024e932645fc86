"""Contracts between the core and the platform adapters.

The core never imports an adapter. It holds :class:`CustomerChannel` objects keyed by
platform name and :class:`OperatorChannel` objects that fan out operator work; each
adapter module implements them for its platform. They stand on plain types only
(messages and tickets), so the pipeline and the operator desk can both depend on them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from core.messages import Reply
from core.tickets import TicketView


class ReplyStream(ABC):
    """One bot reply being generated, shown to the customer while it grows.

    The core calls :meth:`begin` once, :meth:`update` with the whole text so far as
    tokens arrive (the adapter decides how often to really edit a message), then
    exactly one of :meth:`finish` or :meth:`abort`.
    """

    __slots__ = ()

    @abstractmethod
    async def begin(self) -> None:
        """Show that a reply is coming (a typing indicator)."""

    @abstractmethod
    async def update(self, text_so_far: str) -> None:
        """Show the partial reply; may be throttled or ignored by the platform."""

    @abstractmethod
    async def finish(self, reply: Reply) -> str:
        """Show the final reply; returns the platform message id of what was sent."""

    @abstractmethod
    async def abort(self) -> None:
        """Withdraw a partial reply (the conversation was handed to a person)."""

    @property
    def known_id(self) -> str | None:
        """The platform id the reply will have, where the adapter picks it before sending
        (the web chat does): stored as the reply goes out, so one that reached the customer
        but was never recorded as sent (its replica died) still carries it, and a tab that
        reconnects shows it as the reply it already drew."""
        return None


class CustomerChannel(ABC):
    """The customer-facing side of one platform."""

    __slots__ = ()
    platform: str

    @abstractmethod
    def open_reply(self, conversation_key: str) -> ReplyStream:
        """Start a streamed bot reply in a conversation."""

    @abstractmethod
    async def deliver(self, conversation_key: str, reply: Reply) -> str:
        """Send a whole message (an operator's answer, a notice); returns its platform id."""


class OperatorChannel(ABC):
    """Somewhere operators are told about escalations and act on them."""

    __slots__ = ()

    per_replica: ClassVar[bool] = False
    """True for a channel whose audience is connected to this replica alone (the web
    console's sockets): the desk passes it the news other replicas publish too. A platform
    room (a Telegram group, a Discord channel) is one for all replicas and gets each piece
    of news once, from the replica it happened on."""

    @abstractmethod
    async def ticket_opened(self, ticket: TicketView) -> None:
        """A conversation needs a person (also called when it is re-announced)."""

    @abstractmethod
    async def ticket_updated(self, ticket: TicketView) -> None:
        """Claimed, resolved, handed back, or a new customer message while escalated."""

    async def post_report(self, summary: str, chart_png: bytes) -> None:
        """Post the periodic sentiment report: a text summary and a PNG chart.

        Channels that cannot show a picture may post the summary alone; the default
        refuses, so a channel that forgot to implement it is noticed in tests.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot post reports")
