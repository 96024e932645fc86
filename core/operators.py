"""The operator workflow, platform-neutral: tickets opened, claimed, answered, closed.

Adapters authenticate operators on their platform and call the :class:`OperatorDesk`;
the desk keeps the ticket and conversation states consistent, tells the customer what
is happening, and fans news out to every attached :class:`OperatorChannel`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from core.channels import OperatorChannel
from core.config import EscalationSettings
from core.messages import Reply, Sender, User
from core.store import Store, StoreError, Unsubscribe, now_iso
from core.tickets import Operator, TicketView

log = logging.getLogger(__name__)


ACTION_FAILED_TEXT = ("That did not go through completely because of an internal error. "
                      "Check the ticket before repeating it.")
"""Told to an operator when an action failed part-way (the customer may already have the
answer), so it is checked rather than blindly sent again."""

REANNOUNCED = "tickets:reannounced"
"""Shared-state scope: which ticket's overdue round was re-announced (by one replica)."""
NEWS_CHANNEL = "operator-news"
"""The relay channel on which each replica's desk tells the others what it fanned out, for
their per-replica channels (see :attr:`OperatorChannel.per_replica`)."""


class OperatorError(Exception):
    """An operator action that cannot be done; the message is shown to the operator."""


class OperatorInputError(OperatorError):
    """The operator's request is malformed (a bad platform, a missing field)."""


class OperatorNotFound(OperatorError):
    """The operator named something that does not exist (a ticket, an account)."""


PLATFORMS = ("discord", "telegram", "terminal", "web")
"""Where customers can write from: what an account to link may be on."""


@dataclass(frozen=True, slots=True)
class CustomerHistory:
    """A ticket's customer across the accounts an operator linked: the accounts, every
    conversation on any of them (newest first), and unlinked accounts with the same
    display name that the operator may want to link."""

    ticket_id: int
    user_id: int
    accounts: tuple[dict, ...]
    conversations: tuple[dict, ...]
    candidates: tuple[dict, ...]


class Conversations(Protocol):
    """What the desk needs of the pipeline: to stop the bot, draft for and write to a
    customer. A protocol, so the desk does not depend on the pipeline that owns it."""

    def stop_generation(self, conversation_id: int) -> None: ...

    async def draft_reply(self, conversation_id: int) -> str: ...

    async def send_to_customer(
        self,
        conversation_id: int,
        reply: Reply,
        *,
        reply_to: int | None = None,
        operator: Operator | None = None,
    ) -> None: ...


class OperatorDesk:
    __slots__ = ("_channels", "_pipeline", "_settings", "_store", "_unsubscribe", "_watcher")

    def __init__(
        self, pipeline: Conversations, store: Store, settings: EscalationSettings
    ) -> None:
        self._pipeline = pipeline
        self._store = store
        self._settings = settings
        self._channels: list[OperatorChannel] = []
        self._watcher: asyncio.Task[None] | None = None
        self._unsubscribe: Unsubscribe | None = None

    def attach(self, channel: OperatorChannel) -> None:
        self._channels.append(channel)

    # -- views -----------------------------------------------------------------------

    async def get(self, ticket_id: int) -> TicketView:
        row = await self._store.ticket(ticket_id)
        if row is None:
            raise OperatorError(f"there is no ticket {ticket_id}")
        return await self._view(row)

    async def open_tickets(self) -> list[TicketView]:
        return [await self._view(r) for r in await self._store.tickets(("open", "claimed"))]

    async def _view(self, row: dict) -> TicketView:
        conv = await self._store.conversation(row["conversation_id"])
        last = await self._store.last_customer_text(conv["id"])
        trend = await self._store.recent_negative(conv["id"], 10)
        return TicketView(
            id=row["id"],
            conversation_id=conv["id"],
            platform=conv["platform"],
            conversation_key=conv["conversation_key"],
            customer=User(conv["platform"], conv["platform_user_id"], conv["display_name"]),
            state=row["state"],
            reason=row["reason"],
            scores=json.loads(row["scores"]),
            created_at=datetime.fromisoformat(row["created_at"]),
            claimed_by=row["claimed_by"],
            last_customer_text=last or "",
            sentiment_trend=tuple(round(p, 3) for p in trend),
            note=row["note"],
        )

    # -- notifications from the pipeline ---------------------------------------------

    async def announce(self, ticket_id: int) -> None:
        await self._fan_out("ticket_opened", await self.get(ticket_id))

    async def customer_wrote(self, conversation_id: int) -> None:
        row = await self._store.active_ticket(conversation_id)
        if row is not None:
            await self._fan_out("ticket_updated", await self._view(row))

    async def _fan_out(self, method: str, view: TicketView) -> None:
        await self._tell(self._channels, method, view)
        await self._publish({"news": method, "ticket": view.id})

    async def _tell(self, channels: list[OperatorChannel], method: str, view: TicketView) -> None:
        for channel in channels:
            try:
                await getattr(channel, method)(view)
            except Exception:
                log.exception("operator channel %s failed on %s", type(channel).__name__, method)

    async def _publish(self, news: dict[str, object]) -> None:
        """Best effort: a console on another replica that misses it shows the news at its
        next refresh (the tickets themselves are in the database)."""
        try:
            await self._store.publish(NEWS_CHANNEL, json.dumps(news))
        except StoreError:
            log.exception("operator news not relayed to the other replicas")

    async def _on_news(self, payload: str) -> None:
        """News another replica fanned out, for this replica's per-replica channels."""
        local = [c for c in self._channels if c.per_replica]
        if not local:
            return
        try:
            news = json.loads(payload)
            if news["news"] == "report":
                await self._post_report(local, news["summary"],
                                        base64.b64decode(news["chart_png"]))
            elif news["news"] in ("ticket_opened", "ticket_updated"):
                await self._tell(local, news["news"], await self.get(int(news["ticket"])))
        except Exception:
            log.exception("operator news from another replica not shown: %.200s", payload)

    async def post_report(self, summary: str, chart_png: bytes) -> int:
        """The periodic report into every attached channel; one that fails is logged and
        the others still get it. Returns how many channels took it (consoles on other
        replicas are sent it as well)."""
        posted = await self._post_report(self._channels, summary, chart_png)
        await self._publish({"news": "report", "summary": summary,
                             "chart_png": base64.b64encode(chart_png).decode()})
        return posted

    @staticmethod
    async def _post_report(channels: list[OperatorChannel], summary: str,
                           chart_png: bytes) -> int:
        posted = 0
        for channel in list(channels):
            try:
                await channel.post_report(summary, chart_png)
            except Exception:
                log.exception("operator channel %s could not post the report",
                              type(channel).__name__)
            else:
                posted += 1
        return posted

    # -- operator actions ------------------------------------------------------------

    async def _active(self, ticket_id: int, *states: str) -> dict:
        row = await self._store.ticket(ticket_id)
        if row is None:
            raise OperatorError(f"there is no ticket {ticket_id}")
        if row["state"] not in states:
            raise OperatorError(f"ticket {ticket_id} is {row['state']}")
        return row

    async def claim(self, ticket_id: int, operator: Operator) -> TicketView:
        row = await self._active(ticket_id, "open", "claimed")
        if row["state"] == "open" and not await self._store.claim_ticket(
            ticket_id, operator.label, now_iso()
        ):
            row = await self._active(ticket_id, "claimed")
        if row["state"] == "claimed" and row["claimed_by"] != operator.label:
            raise OperatorError(f"ticket {ticket_id} is already claimed by {row['claimed_by']}")
        if row["state"] == "open":
            self._pipeline.stop_generation(row["conversation_id"])
            await self._pipeline.send_to_customer(
                row["conversation_id"],
                Reply(f"{operator.name} from our support team has joined the chat.", Sender.SYSTEM),
            )
        view = await self.get(ticket_id)
        await self._fan_out("ticket_updated", view)
        return view

    async def reply(self, ticket_id: int, operator: Operator, text: str) -> None:
        text = text.strip()
        if not text:
            raise OperatorError("the reply is empty")
        row = await self._active(ticket_id, "open", "claimed")
        if row["state"] == "open":
            await self.claim(ticket_id, operator)
        elif row["claimed_by"] != operator.label:
            raise OperatorError(f"ticket {ticket_id} is claimed by {row['claimed_by']}")
        await self._pipeline.send_to_customer(
            row["conversation_id"], Reply(text, Sender.OPERATOR), operator=operator
        )
        if not row["first_response_at"]:
            await self._store.update_ticket(ticket_id, first_response_at=now_iso())

    async def draft(self, ticket_id: int) -> str:
        """A reply the bot drafts for the operator to send or edit (agent assist)."""
        row = await self._active(ticket_id, "open", "claimed")
        return await self._pipeline.draft_reply(row["conversation_id"])

    async def resolve(self, ticket_id: int, operator: Operator, note: str = "") -> TicketView:
        row = await self._active(ticket_id, "open", "claimed")
        await self._store.update_ticket(
            ticket_id, "resolved", state="resolved", closed_at=now_iso(), note=note,
            claimed_by=row["claimed_by"] or operator.label,
        )
        await self._store.log_event(
            "resolved", conversation_id=row["conversation_id"], value=operator.label,
            data={"ticket_id": ticket_id, "note": note},
        )
        await self._pipeline.send_to_customer(
            row["conversation_id"],
            Reply(
                "This conversation has been marked as resolved. If you need anything else, "
                "just write here.",
                Sender.SYSTEM,
            ),
        )
        view = await self.get(ticket_id)
        await self._fan_out("ticket_updated", view)
        return view

    async def hand_back(self, ticket_id: int, operator: Operator) -> TicketView:
        row = await self._active(ticket_id, "open", "claimed")
        await self._store.update_ticket(
            ticket_id, "bot", state="handed_back", closed_at=now_iso(),
            claimed_by=row["claimed_by"] or operator.label,
        )
        await self._pipeline.send_to_customer(
            row["conversation_id"],
            Reply("You're back with the assistant. Ask me anything.", Sender.SYSTEM),
        )
        view = await self.get(ticket_id)
        await self._fan_out("ticket_updated", view)
        return view

    # -- customers across accounts ---------------------------------------------------

    async def _customer(self, ticket_id: int) -> tuple[dict, int]:
        """The ticket's row and the user id of the account it came from."""
        row = await self._store.ticket(ticket_id)
        if row is None:
            raise OperatorNotFound(f"there is no ticket {ticket_id}")
        conv = await self._store.conversation(row["conversation_id"])
        return row, int(conv["user_id"])

    async def history(self, ticket_id: int, limit: int = 50) -> CustomerHistory:
        row, user_id = await self._customer(ticket_id)
        accounts = await self._store.linked_users(user_id)
        conversations = await self._store.customer_conversations(user_id, limit)
        me = next(a for a in accounts if a["id"] == user_id)
        candidates: list[dict] = []
        if me["display_name"].strip():
            linked = {a["id"] for a in accounts}
            candidates = [
                r for r in await self._store.users_named(me["display_name"].strip(), 10)
                if r["id"] not in linked
            ][:5]
        for c in conversations:
            c["current"] = c["id"] == row["conversation_id"]
            c["mean_negative"] = (None if c["mean_negative"] is None
                                  else round(c["mean_negative"], 3))
            c["last_text"] = c["last_text"] or ""
        return CustomerHistory(ticket_id, user_id, tuple(accounts), tuple(conversations),
                               tuple(candidates))

    async def _account(self, platform: object, platform_user_id: object) -> dict:
        if not isinstance(platform, str) or platform.strip().lower() not in PLATFORMS:
            raise OperatorInputError(
                f"platform must be one of {', '.join(PLATFORMS)}, not {platform!r}")
        platform = platform.strip().lower()
        if isinstance(platform_user_id, int) and not isinstance(platform_user_id, bool):
            platform_user_id = str(platform_user_id)
        if not isinstance(platform_user_id, str) or not platform_user_id.strip() \
                or len(platform_user_id) > 200:
            raise OperatorInputError(
                "platform_user_id must be the account's id on its platform (a string of "
                "1-200 characters)")
        user = await self._store.user_by_platform_id(platform, platform_user_id.strip())
        if user is None:
            raise OperatorNotFound(
                f"no {platform} user {platform_user_id.strip()} has written to us")
        return user

    async def _user_id(self, user_id: object) -> dict:
        if not isinstance(user_id, int) or isinstance(user_id, bool) or user_id < 1:
            raise OperatorInputError("user_id must be a positive integer")
        user = await self._store.user(user_id)
        if user is None:
            raise OperatorNotFound(f"there is no user {user_id}")
        return user

    async def link(
        self, ticket_id: int, operator: Operator, *, user_id: object = None,
        platform: object = None, platform_user_id: object = None,
    ) -> CustomerHistory:
        """Link the ticket's customer with another account: one picked by its user id, or
        named by platform and the platform's own user id."""
        row, mine = await self._customer(ticket_id)
        if user_id is not None:
            other = await self._user_id(user_id)
        elif platform is not None or platform_user_id is not None:
            other = await self._account(platform, platform_user_id)
        else:
            raise OperatorInputError("give either user_id, or platform and platform_user_id")
        if other["id"] in {a["id"] for a in await self._store.linked_users(mine)}:
            raise OperatorError(f"{other['platform']} user {other['platform_user_id']} is "
                                "already this customer's")
        await self._store.link_users(mine, other["id"])
        await self._store.log_event(
            "customer_linked", user_id=mine, conversation_id=row["conversation_id"],
            value=operator.label,
            data={"ticket_id": ticket_id, "linked_user_id": other["id"],
                  "platform": other["platform"], "platform_user_id": other["platform_user_id"]},
        )
        return await self.history(ticket_id)

    async def unlink(self, ticket_id: int, operator: Operator, user_id: object) -> CustomerHistory:
        """Take one account out of the ticket's customer (the ticket's own account too: it
        then stands alone, and the others stay linked together)."""
        row, mine = await self._customer(ticket_id)
        other = await self._user_id(user_id)
        accounts = await self._store.linked_users(mine)
        if len(accounts) < 2 or other["id"] not in {a["id"] for a in accounts}:
            raise OperatorNotFound(f"{other['platform']} user {other['platform_user_id']} is "
                                   "not linked to this customer")
        await self._store.unlink_user(other["id"])
        await self._store.log_event(
            "customer_unlinked", user_id=mine, conversation_id=row["conversation_id"],
            value=operator.label,
            data={"ticket_id": ticket_id, "unlinked_user_id": other["id"],
                  "platform": other["platform"], "platform_user_id": other["platform_user_id"]},
        )
        return await self.history(ticket_id)

    # -- unclaimed tickets -----------------------------------------------------------

    async def start(self) -> None:
        """Watch for unclaimed tickets, and listen to the other replicas' news."""
        self._watcher = asyncio.create_task(self._watch_unclaimed(), name="claim-timeout")
        self._unsubscribe = await self._store.subscribe(NEWS_CHANNEL, self._on_news)

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._unsubscribe is not None:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            with contextlib.suppress(StoreError):
                await unsubscribe()

    async def _watch_unclaimed(self) -> None:
        timeout = self._settings.claim_timeout_s
        while True:
            await asyncio.sleep(min(timeout / 4, 30.0))
            try:
                await self.reannounce_overdue(timeout)
            except Exception:
                log.exception("claim-timeout check failed")

    async def reannounce_overdue(self, timeout_s: float) -> int:
        """Re-announce tickets nobody claimed in time and tell their customers."""
        now = datetime.now(UTC)
        count = 0
        for row in await self._store.tickets(("open",)):
            if (now - datetime.fromisoformat(row["announced_at"])).total_seconds() < timeout_s:
                continue
            # Every replica watches; the one that records this round first re-announces.
            key, mine = f"{row['id']}:{row['announced_at']}", uuid.uuid4().hex
            if await self._store.share_if(REANNOUNCED, key, mine, None) != mine:
                continue
            count += 1
            await self._store.update_ticket(row["id"], announced_at=now_iso())
            await self._pipeline.send_to_customer(
                row["conversation_id"],
                Reply(
                    "Thanks for waiting. Everyone on our team is busy right now; a person "
                    "will reply here as soon as one is free.",
                    Sender.SYSTEM,
                ),
            )
            await self.announce(row["id"])
        if count:
            await self._store.forget_shared(REANNOUNCED, 7 * 86_400.0)
        return count
