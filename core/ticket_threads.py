"""Which thread of an operator room holds each ticket, and what that thread shows, kept in
the store's shared state.

With several replicas any of them may post a ticket's news (the one holding the customer's
conversation, or the one an operator's action reached), so what one replica kept in memory
made another open a second thread for the same ticket, announce a change twice, or relay an
operator's redelivered message again. Every operator room (Telegram topics, Discord threads)
asks this instead; on SQLite (one process) it costs a few local reads.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.store import Store

PENDING = "pending:"
"""The value under a ticket while a replica creates its thread (followed by its token)."""
SEEN_KEEP_S = 2 * 86_400.0
"""Platforms redeliver within minutes; a message id is remembered two days."""
SEEN_PRUNE_EVERY = 1_000


@dataclass(frozen=True, slots=True)
class Shown:
    """What a ticket's thread last showed: the ticket's state, who held it, and the
    customer's last text relayed there."""

    state: str
    claimed_by: str = ""
    customer_text: str = ""


class TicketThreads:
    """One operator room's tickets-to-threads map and its news, shared by every replica."""

    __slots__ = ("_locks", "_scope", "_seen_count", "_store", "_threads", "_token", "_wait_s")

    def __init__(self, store: Store, room: str, *, wait_s: float = 15.0) -> None:
        self._store = store
        self._scope = room
        self._threads: dict[int, int] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._token = uuid.uuid4().hex
        self._wait_s = wait_s
        self._seen_count = 0

    def cached(self, ticket_id: int) -> int | None:
        """The thread, if this replica has seen it (a ticket's thread never changes)."""
        return self._threads.get(ticket_id)

    async def thread(self, ticket_id: int) -> int | None:
        """The ticket's thread, if one was made (by any replica)."""
        known = self._threads.get(ticket_id)
        if known is None:
            value = await self._store.shared(f"{self._scope}:thread", str(ticket_id))
            if value is not None and value.isdigit():
                known = self._threads[ticket_id] = int(value)
        return known

    async def learn(self, ticket_id: int, thread_id: int) -> None:
        """A thread found on the platform (its name says the ticket): made before this map
        was shared, so it is recorded unless another is already."""
        self._threads.setdefault(ticket_id, thread_id)
        await self._store.share_if(f"{self._scope}:thread", str(ticket_id), str(thread_id), None)

    async def thread_for(
        self, ticket_id: int, create: Callable[[], Awaitable[int]]
    ) -> tuple[int, bool]:
        """The ticket's thread and whether this call made it: of replicas asking at once,
        one reserves the ticket and calls ``create``, the others wait for its thread. A
        reservation left by a replica that died is taken over after ``wait_s``."""
        async with self._locks.setdefault(ticket_id, asyncio.Lock()):
            known = await self.thread(ticket_id)
            if known is not None:
                return known, False
            scope, key, mine = f"{self._scope}:thread", str(ticket_id), PENDING + self._token
            deadline = time.monotonic() + self._wait_s
            expected: str | None = None
            while True:
                now = await self._store.share_if(scope, key, mine, expected)
                if now == mine:
                    thread_id = await create()
                    await self._store.share_if(scope, key, str(thread_id), mine)
                    self._threads[ticket_id] = thread_id
                    return thread_id, True
                if now.isdigit():
                    self._threads[ticket_id] = int(now)
                    return int(now), False
                if time.monotonic() >= deadline:
                    expected = now  # its maker is gone: take the reservation over
                    continue
                expected = None
                await asyncio.sleep(0.1)

    async def show(self, ticket_id: int, shown: Shown) -> Shown | None:
        """Record that the thread now shows ``shown``; returns what it showed before
        (``None``: nothing known). Of two replicas recording at once, one gets the other's
        as "before", so a piece of news is posted once."""
        scope, key = f"{self._scope}:shown", str(ticket_id)
        mine = json.dumps({"state": shown.state, "by": shown.claimed_by,
                           "text": shown.customer_text, "n": uuid.uuid4().hex})
        current = await self._store.shared(scope, key)
        while True:
            now = await self._store.share_if(scope, key, mine, current)
            if now == mine:
                break
            current = now
        if current is None:
            return None
        was = json.loads(current)
        return Shown(was["state"], was["by"], was["text"])

    async def first_sight(self, message_key: str) -> bool:
        """False for an operator message any replica has acted on (a redelivered update)."""
        scope = f"{self._scope}:seen"
        mine = uuid.uuid4().hex
        first = await self._store.share_if(scope, message_key, mine, None) == mine
        self._seen_count += 1
        if self._seen_count % SEEN_PRUNE_EVERY == 0:
            await self._store.forget_shared(scope, SEEN_KEEP_S)
        return first

    async def name(self, operator: str) -> str | None:
        """The display name an operator acted under, on any replica."""
        return await self._store.shared(f"{self._scope}:name", operator)

    async def remember_name(self, operator: str, name: str) -> None:
        scope = f"{self._scope}:name"
        current = await self._store.shared(scope, operator)
        while current != name:
            current = await self._store.share_if(scope, operator, name, current)
