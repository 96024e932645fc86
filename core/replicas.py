"""Several replicas on one database: which replica answers which conversation.

A replica answers a conversation only while it holds the conversation's lease in the
store (``take_conversation``): one replica at a time per conversation, so its messages
are answered once and in order, while different conversations run on different replicas.
Leases are renewed while held and expire when their replica dies, so another replica
sweeps up what it left unanswered. The last hop is fenced: just before a reply is marked
as going out, the lease is renewed, and a replica that lost it stops there (the new owner
answers), so a reply is never sent by two replicas.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from core.store import Store

log = logging.getLogger(__name__)


def default_replica_id() -> str:
    """The host name: stable across restarts, so a restarted replica takes its own
    conversations back at once instead of waiting for their leases to expire."""
    return socket.gethostname()


class LeaseLost(Exception):
    """Another replica owns the conversation now; this one must not send its reply."""

    def __init__(self, conversation_id: int) -> None:
        super().__init__(f"conversation {conversation_id} is now answered by another replica")
        self.conversation_id = conversation_id


class Leases:
    """This replica's leases on conversations, as the store records them."""

    __slots__ = ("_held", "_store", "owner", "sweep_s", "ttl_s")

    def __init__(self, store: Store, owner: str, ttl_s: float, sweep_s: float) -> None:
        self._store = store
        self.owner = owner
        self.ttl_s = ttl_s
        self.sweep_s = sweep_s
        self._held: set[int] = set()

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    async def take(self, conversation_id: int) -> bool:
        """Take (or renew) the lease; ``False`` when another replica holds it."""
        taken = await self._store.take_conversation(conversation_id, self.owner, self.ttl_s)
        if taken:
            self._held.add(conversation_id)
        else:
            self._held.discard(conversation_id)
        return taken

    async def extend(self, conversation_id: int) -> bool:
        """Extend a lease that never lapsed: ``True`` means no other replica can have
        touched the conversation since this one last held it."""
        extended = await self._store.extend_conversation(conversation_id, self.owner, self.ttl_s)
        if extended:
            self._held.add(conversation_id)
        return extended

    async def fence(self, conversation_id: int, message_id: int) -> str:
        """Renew just before the last hop and read the message's status, in one step;
        :class:`LeaseLost` if the lease went to another."""
        status = await self._store.fence_conversation(
            conversation_id, self.owner, self.ttl_s, message_id)
        if status is None:
            self._held.discard(conversation_id)
            raise LeaseLost(conversation_id)
        self._held.add(conversation_id)
        return status

    async def release(self, conversation_id: int) -> None:
        self._held.discard(conversation_id)
        await self._store.release_conversation(conversation_id, self.owner)

    async def renew(self) -> None:
        """Extend every lease held; those that expired meanwhile are forgotten (their
        replies are stopped by the fence)."""
        renewed = set(await self._store.renew_conversations(self.owner, self.ttl_s))
        lost = self._held - renewed
        if lost:
            log.warning("lost the leases of %d conversations to other replicas", len(lost))
        self._held &= renewed

    async def orphans(self) -> Sequence[int]:
        """Conversations with unanswered messages that no live replica holds (or this one
        holds from before a restart)."""
        return await self._store.orphaned_conversations(self.owner)

    async def release_all(self) -> None:
        for conversation_id in sorted(self._held):
            await self.release(conversation_id)
