"""Telegram: customers chat with the bot; operators work tickets in a forum supergroup.

Built on python-telegram-bot's ``Application`` (its ``ExtBot`` with ``AIORateLimiter``
and, for long polling, its ``Updater``). Webhook mode uses a small aiohttp server of
ours instead of PTB's tornado one: it checks ``X-Telegram-Bot-Api-Secret-Token`` and
answers 200 only after the update was handed to the core, so an update that could not
be stored is retried by Telegram rather than lost.

Delivery guarantees:

* Exactly once: every event gets a ``platform_message_id`` that a redelivered update
  reproduces (``<chat>:<message>`` for messages, ``cb:<query id>`` for button presses,
  ``re:<chat>:<message>:<user>:<emoji>:<date>`` for reactions); the core refuses a
  repeat, and the adapter then does nothing more.
* Nothing lost to rate limits: a 429 waits ``retry_after`` and retries (AIORateLimiter,
  ``max_retries``); a 5xx, or a request that never left (connect, write or pool
  timeout), is retried with backoff. A send that timed out waiting for the answer is not
  retried, since Telegram may have delivered it; an edit is.
* Pacing: sends and edits into one chat are at least ``edit_interval_s`` apart (Telegram
  allows about one message per second per chat); a streamed reply is edited at most that
  often, and the typing action is refreshed every ``typing_interval_s``.
* Flood control: a user who sends more than ``flood_messages`` in ``flood_window_s`` is
  asked once per window to slow down; every message is still accepted and answered in
  order, so nothing is lost.

Model output is escaped for the HTML parse mode and split at 4,096 UTF-16 units on
paragraph, line or word boundaries before it is escaped, so it can neither break a
message nor inject markup.

Operator group (``operator_chat_id``, a forum): each escalation opens a topic named
``#<ticket> <customer>``; the topic gets the reason, the sentiment trend and the recent
transcript, then every customer message and state change. Text written in a topic is
relayed to the customer; ``/claim``, ``/resolve [note]`` and ``/bot`` change the ticket.
Who may act: the ``operator_user_ids`` when that list is set, else any member of the
operator group. The periodic report goes to the group's General topic as a photo
(``sendPhoto``, multipart) with the summary as caption, or as a following text when the
summary is over the 1,024-character caption limit. Ticket-to-topic links are kept in
memory and recovered from the topic name (``#<ticket>``) after a restart. Operator
messages are not core events, so their redelivery is caught in memory only (the last
10,000 message ids). An operator whose answer cannot be delivered is told so in the topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import logging
import os
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from aiohttp import web
from telegram import (
    BotCommand,
    BotCommandScopeAllPrivateChats,
    BotCommandScopeChat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    LinkPreviewOptions,
    Message,
    MessageEntity,
    MessageReactionUpdated,
    ReactionTypeEmoji,
    Update,
)
from telegram.constants import ChatAction, ChatType, ParseMode
from telegram.error import BadRequest, NetworkError, TelegramError, TimedOut
from telegram.ext import AIORateLimiter, Application, ApplicationBuilder, ContextTypes, TypeHandler

from core.adapter import Adapter
from core.channels import CustomerChannel, OperatorChannel, ReplyStream
from core.config import TelegramSettings
from core.messages import Inbound, Kind, Reply, Sender, Suggestion, User
from core.operators import ACTION_FAILED_TEXT, Operator, OperatorError
from core.pipeline import Pipeline
from core.store import StoreError
from core.ticket_threads import Shown, TicketThreads
from core.tickets import TicketView

log = logging.getLogger(__name__)

PLATFORM = "telegram"
MAX_MESSAGE = 4096
MAX_CAPTION = 1024
REPORT_FILENAME = "sentiment-report.png"
MAX_CALLBACK_DATA = 64
SUGGESTION_PREFIX = "s:"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
TYPING_CAP_S = 600.0
# Reactions must be asked for: Telegram leaves them out of the default set.
ALLOWED_UPDATES = ("message", "callback_query", "message_reaction")
CUSTOMER_COMMANDS = {
    "start": "Start talking to support",
    "help": "How this bot works",
    "human": "Talk to a person",
    "feedback": "Tell us how we did",
}
OPERATOR_COMMANDS = {
    "claim": "Take this ticket",
    "resolve": "Close this ticket, optionally with a note",
    "bot": "Hand the customer back to the bot",
}
ATTACHMENT_KINDS = (
    "sticker", "photo", "voice", "audio", "video", "video_note", "animation", "document",
    "location", "contact", "poll", "dice",
)
_TICKET_IN_TOPIC = re.compile(r"#(\d+)")
_SPARKS = "▁▂▃▄▅▆▇█"
_SENDER_LABEL = {"in": "Customer", "bot": "Bot", "operator": "Operator", "system": "Notice"}

T = TypeVar("T")
# What PTB's TimedOut wraps when the request never reached the server.
_UNSENT = (httpx.ConnectTimeout, httpx.ConnectError, httpx.WriteTimeout, httpx.PoolTimeout)


# --- pure helpers -----------------------------------------------------------------------


def utf16_len(text: str) -> int:
    """Telegram measures text in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def _fitting_prefix(text: str, limit: int) -> int:
    """Length (in code points) of the longest prefix of ``text`` within ``limit`` units."""
    cut = min(len(text), limit)
    while (excess := utf16_len(text[:cut]) - limit) > 0:
        cut -= max(1, (excess + 1) // 2)
    return cut


def split_text(text: str, limit: int = MAX_MESSAGE) -> list[str]:
    """Cut ``text`` into pieces of at most ``limit`` UTF-16 units.

    Cuts fall on a paragraph break, else a line break, else a space, in the second half
    of the piece; only a run without any whitespace is cut mid-word.
    """
    text = text.strip()
    pieces: list[str] = []
    while utf16_len(text) > limit:
        cut = _fitting_prefix(text, limit)
        window = text[:cut]
        at = -1
        for separator in ("\n\n", "\n", " "):
            found = window.rfind(separator)
            if found >= cut // 2:
                at = found
                break
        if at <= 0:
            at = window.rfind(" ")
        head, rest = (window, text[cut:]) if at <= 0 else (window[:at], text[at:])
        pieces.append(head.rstrip())
        text = rest.lstrip()
    if text:
        pieces.append(text)
    return pieces


def escape(text: str) -> str:
    """Text for the HTML parse mode: ``&``, ``<`` and ``>`` become entities."""
    return html.escape(text, quote=False)


def _link(title: str, url: str) -> str:
    if url.startswith(("https://", "http://")):
        return f'<a href="{html.escape(url, quote=True)}">{escape(title)}</a>'
    return escape(title)


def render(reply: Reply, limit: int = MAX_MESSAGE) -> list[str]:
    """A reply as HTML messages of at most ``limit`` visible characters each."""
    header, header_len = "", 0
    if reply.sender is Sender.OPERATOR:
        header, header_len = "<b>Support team</b>\n", len("Support team\n")
    pieces = split_text(reply.text, limit - header_len)
    rendered = [escape(p) for p in pieces]
    if rendered and header:
        rendered[0] = header + rendered[0]
    if reply.citations:
        titles = [c.title for c in reply.citations]
        footer = "Sources: " + ", ".join(_link(c.title, c.url) for c in reply.citations)
        footer_len = len("Sources: ") + sum(utf16_len(t) for t in titles) + 2 * (len(titles) - 1)
        last_len = utf16_len(pieces[-1]) + (header_len if len(pieces) == 1 else 0) if pieces else 0
        if rendered and last_len + 2 + footer_len <= limit:
            rendered[-1] += "\n\n" + footer
        else:
            rendered.append(footer)
    return rendered


def keyboard(suggestions: Sequence[Suggestion]) -> InlineKeyboardMarkup | None:
    """One button per suggestion: a callback carrying its id, or its link if the id is long."""
    rows = []
    for item in suggestions:
        label = item.title[:64] or item.id
        data = SUGGESTION_PREFIX + item.id
        if len(data.encode()) <= MAX_CALLBACK_DATA:
            rows.append([InlineKeyboardButton(label, callback_data=data)])
        elif item.url.startswith(("https://", "http://")):
            rows.append([InlineKeyboardButton(label, url=item.url)])
    return InlineKeyboardMarkup(rows) if rows else None


def sparkline(values: Sequence[float]) -> str:
    """Negative-sentiment probabilities in [0, 1] as bars, oldest first."""
    top = len(_SPARKS) - 1
    return "".join(_SPARKS[min(top, max(0, round(v * top)))] for v in values)


def message_key(chat_id: int, message_id: int) -> str:
    return f"{chat_id}:{message_id}"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a message goes: a chat and, in a forum, a topic."""

    chat_id: int
    thread_id: int | None = None

    @property
    def conversation_key(self) -> str:
        return str(self.chat_id) if self.thread_id is None else f"{self.chat_id}/{self.thread_id}"

    @classmethod
    def parse(cls, conversation_key: str) -> Target:
        chat, _, thread = conversation_key.partition("/")
        try:
            return cls(int(chat), int(thread) if thread else None)
        except ValueError:
            raise ValueError(f"not a Telegram conversation key: {conversation_key!r}") from None


def parse_command(message: Message, bot_username: str) -> tuple[str, str] | None:
    """``(name, arguments)`` for ``/name[@bot] args`` addressed to this bot, else None."""
    text = message.text or ""
    entity = next((e for e in message.entities if e.offset == 0), None)
    if entity is None or entity.type != MessageEntity.BOT_COMMAND:
        return None
    command = message.parse_entity(entity)[1:]
    name, _, target = command.partition("@")
    if target and target.lower() != bot_username.lower():
        return None
    arguments = text[len(message.parse_entity(entity)):].strip()
    return name.lower(), arguments


# --- pacing and flood control --------------------------------------------------------------


class ChatPacer:
    """Spaces sends into one chat ``interval`` apart, in the order they were asked for."""

    __slots__ = ("_interval", "_next")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next: dict[int, float] = {}

    async def wait(self, chat_id: int) -> None:
        now = time.monotonic()
        if len(self._next) > 10_000:
            self._next = {c: t for c, t in self._next.items() if t > now}
        slot = max(now, self._next.get(chat_id, 0.0))
        self._next[chat_id] = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


class FloodGate:
    """Counts a user's messages in a sliding window; says when to warn (once a window)."""

    __slots__ = ("_limit", "_recent", "_warned_until", "_window")

    def __init__(self, limit: int, window_s: float) -> None:
        self._limit = limit
        self._window = window_s
        self._recent: dict[int, deque[float]] = {}
        self._warned_until: dict[int, float] = {}

    def hit(self, user_id: int, now: float | None = None) -> bool:
        """Record a message; True when this one crosses the limit and no warning is due yet."""
        now = time.monotonic() if now is None else now
        if len(self._recent) > 10_000:
            self._sweep(now)
        recent = self._recent.setdefault(user_id, deque())
        recent.append(now)
        while recent and recent[0] <= now - self._window:
            recent.popleft()
        if len(recent) <= self._limit or self._warned_until.get(user_id, 0.0) > now:
            return False
        self._warned_until[user_id] = now + self._window
        return True

    def _sweep(self, now: float) -> None:
        for user_id in [u for u, d in self._recent.items() if not d or d[-1] <= now - self._window]:
            del self._recent[user_id]
            self._warned_until.pop(user_id, None)


RESEND_TEXT = "Sorry, I could not take that message just now. Please send it again."
RETRY_PRESS_TEXT = "Sorry, that did not work just now. Please try again."
SLOW_DOWN = (
    "You're sending messages faster than I can answer. I've got all of them and will reply "
    "in order. Please give me a moment."
)


# --- the streamed reply -----------------------------------------------------------------------


class TelegramReplyStream(ReplyStream):
    """A bot reply shown as it grows: typing action, one message edited at most every
    ``edit_interval_s``, then the final text (split if long) with the suggestion buttons."""

    __slots__ = (
        "_adapter", "_dirty", "_flusher", "_latest", "_message_id", "_shown", "_stop",
        "_target", "_typing",
    )

    def __init__(self, adapter: TelegramAdapter, target: Target) -> None:
        self._adapter = adapter
        self._target = target
        self._latest = ""
        self._shown = ""
        self._message_id: int | None = None
        self._dirty = asyncio.Event()
        self._stop = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._typing: asyncio.Task[None] | None = None

    async def begin(self) -> None:
        self._typing = self._adapter.keep_alive(self._keep_typing())

    async def update(self, text_so_far: str) -> None:
        self._latest = text_so_far
        self._dirty.set()
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())

    async def finish(self, reply: Reply) -> str:
        await self._quiesce()
        pieces = render(reply)
        if not pieces:
            await self._withdraw()
            return ""
        markup = keyboard(reply.suggestions)
        self._adapter.remember(reply.suggestions)
        last_id = 0
        for index, piece in enumerate(pieces):
            piece_markup = markup if index == len(pieces) - 1 else None
            if index == 0 and self._message_id is not None:
                if piece != self._shown or piece_markup is not None:
                    self._message_id = await self._adapter.edit(
                        self._target, self._message_id, piece, piece_markup)
                last_id = self._message_id
            else:
                last_id = await self._adapter.send(self._target, piece, piece_markup)
        return message_key(self._target.chat_id, last_id)

    async def abort(self) -> None:
        await self._quiesce()
        await self._withdraw()

    async def _withdraw(self) -> None:
        if self._message_id is not None:
            await self._adapter.delete(self._target, self._message_id)
            self._message_id = None

    async def _quiesce(self) -> None:
        """Stop previews (letting one in flight land) and the typing action."""
        self._stop.set()
        self._dirty.set()
        if self._flusher is not None:
            await self._flusher
        if self._typing is not None:
            self._typing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._typing

    async def _keep_typing(self) -> None:
        """Refresh "typing…" (Telegram shows it for about 5 s) until the reply is done,
        for at most ``TYPING_CAP_S`` should the reply never be finished."""
        interval = self._adapter.settings.typing_interval_s
        for _ in range(max(1, int(TYPING_CAP_S / interval))):
            await self._adapter.typing(self._target)
            await asyncio.sleep(interval)

    async def _flush(self) -> None:
        interval = self._adapter.settings.edit_interval_s
        while True:
            await self._dirty.wait()
            if self._stop.is_set():
                return
            self._dirty.clear()
            pieces = split_text(self._latest)
            preview = escape(pieces[0]) if pieces else ""
            if preview and preview != self._shown:
                try:
                    if self._message_id is None:
                        self._message_id = await self._adapter.send(self._target, preview)
                    else:
                        self._message_id = await self._adapter.edit(
                            self._target, self._message_id, preview)
                    self._shown = preview
                except TelegramError as exc:
                    log.info("preview in %s not shown: %s", self._target.chat_id, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)
                return


# --- the operator group -------------------------------------------------------------------------


class TelegramOperatorRoom(OperatorChannel):
    """Tickets as forum topics in the operator group; operators act by writing there.

    Which topic holds a ticket, what it shows, and which operator messages were acted on
    live in the store's shared state, so replicas behind one webhook agree on them."""

    __slots__ = ("_adapter", "_chat_id", "_locks", "_shared_threads", "_threads")

    def __init__(self, adapter: TelegramAdapter, chat_id: int) -> None:
        self._adapter = adapter
        self._chat_id = chat_id
        self._threads: dict[int, int] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._shared_threads: TicketThreads | None = None

    @property
    def chat_id(self) -> int:
        return self._chat_id

    @property
    def shared(self) -> TicketThreads:
        if self._shared_threads is None:
            self._shared_threads = TicketThreads(
                self._adapter.pipeline.store, f"{PLATFORM}:{self._chat_id}")
        return self._shared_threads

    def topic_of(self, ticket_id: int) -> int | None:
        """The topic this replica knows for a ticket."""
        return next((t for t, known in self._threads.items() if known == ticket_id), None)

    # -- news from the desk ----------------------------------------------------------------

    async def ticket_opened(self, ticket: TicketView) -> None:
        thread, created = await self.shared.thread_for(
            ticket.id, lambda: self._create_topic(ticket))
        await self.shared.show(ticket.id, self._shown(ticket))
        await self._post(thread, await self._summary(ticket, reannounced=not created))

    async def ticket_updated(self, ticket: TicketView) -> None:
        thread = await self.shared.thread(ticket.id)
        if thread is None:
            await self.ticket_opened(ticket)
            return
        before = await self.shared.show(ticket.id, self._shown(ticket))
        if before is None or before.state != ticket.state:
            text = await self._state_line(ticket)
        elif ticket.last_customer_text and ticket.last_customer_text != before.customer_text:
            # Unchanged state: the customer wrote. (The same text again is news only of
            # an attachment or a repeated claim; the text itself was already posted.)
            who = escape(ticket.customer.display_name or "Customer")
            text = f"<b>{who}:</b> {escape(ticket.last_customer_text)}"
        else:
            return
        await self._post(thread, text)

    @staticmethod
    def _shown(ticket: TicketView) -> Shown:
        return Shown(ticket.state, ticket.claimed_by or "", ticket.last_customer_text)

    async def _create_topic(self, ticket: TicketView) -> int:
        customer = ticket.customer.display_name or ticket.customer.platform_user_id
        name = f"#{ticket.id} {customer} · {ticket.platform}"[:128]
        topic = await self._adapter.call(lambda: self._adapter.bot.create_forum_topic(
            self._chat_id, name))
        self._threads[topic.message_thread_id] = ticket.id
        return topic.message_thread_id

    async def _summary(self, ticket: TicketView, *, reannounced: bool) -> str:
        customer = escape(ticket.customer.display_name or ticket.customer.platform_user_id)
        lines = [
            f"<b>Ticket #{ticket.id}</b>{' (still waiting)' if reannounced else ''}: "
            f"{customer} on {escape(ticket.platform)}",
            f"Reason: {escape(ticket.reason)}",
        ]
        if ticket.sentiment_trend:
            lines.append(
                f"Negative sentiment: {sparkline(ticket.sentiment_trend)} "
                f"(latest {ticket.sentiment_trend[-1]:.2f})"
            )
        transcript = await self._transcript(ticket)
        if transcript:
            lines.append("")
            lines.append("<b>Recent messages</b>")
            lines.extend(transcript)
        lines.append("")
        lines.append("Write here to answer the customer. /claim to take the ticket, "
                     "/resolve [note] to close it, /bot to hand it back to the bot.")
        return "\n".join(lines)

    async def _transcript(self, ticket: TicketView) -> list[str]:
        try:
            rows = await self._adapter.pipeline.store.transcript(ticket.conversation_id, 8)
        except Exception:
            log.exception("no transcript for ticket %s", ticket.id)
            rows = []
        lines = []
        for row in rows:
            if not row.text.strip():
                continue
            who = _SENDER_LABEL["in"] if row.direction == "in" else _SENDER_LABEL.get(
                row.sender, row.sender)
            text = row.text if len(row.text) <= 300 else row.text[:299] + "…"
            lines.append(f"<b>{who}:</b> {escape(text)}")
        if not lines and ticket.last_customer_text:
            lines.append(f"<b>Customer:</b> {escape(ticket.last_customer_text)}")
        return lines

    async def _state_line(self, ticket: TicketView) -> str:
        name = await self.shared.name(ticket.claimed_by) if ticket.claimed_by else None
        by = escape(name or ticket.claimed_by or "someone")
        if ticket.state == "claimed":
            return f"🙋 Claimed by {by}."
        if ticket.state == "resolved":
            note = f" Note: {escape(ticket.note)}" if ticket.note else ""
            return f"✅ Resolved by {by}.{note}"
        if ticket.state == "handed_back":
            return "🤖 Handed back to the bot."
        return f"Ticket is {escape(ticket.state)}."

    async def _post(self, thread_id: int, html_text: str) -> None:
        target = Target(self._chat_id, thread_id)
        for piece in split_html_lines(html_text):
            await self._adapter.send(target, piece)

    async def post_report(self, summary: str, chart_png: bytes) -> None:
        """The chart as a photo in the group's General topic, the summary as its caption.

        A caption holds 1,024 characters: a longer summary follows the photo as text
        messages (split at 4,096), and the photo is captioned with its first line.
        """
        summary = summary.strip()
        fits = utf16_len(summary) <= MAX_CAPTION
        first_line = summary.split("\n", 1)[0]
        caption = summary if fits else split_text(first_line, MAX_CAPTION)[0] if first_line else ""
        await self._adapter.send_photo(Target(self._chat_id), chart_png, escape(caption))
        if not fits:
            for piece in split_text(summary):
                await self._adapter.send(Target(self._chat_id), escape(piece))

    # -- operators writing in the group ---------------------------------------------------

    def ticket_for(self, message: Message) -> int | None:
        """The ticket a topic message belongs to: known, or read from the topic's name (a
        topic another replica made, or one made before a restart)."""
        if not message.is_topic_message or message.message_thread_id is None:
            return None
        thread = message.message_thread_id
        if thread in self._threads:
            return self._threads[thread]
        created = message.reply_to_message and message.reply_to_message.forum_topic_created
        if created and (match := _TICKET_IN_TOPIC.match(created.name)):
            self._threads[thread] = int(match.group(1))
            return int(match.group(1))
        return None

    def _authorised(self, user_id: int) -> bool:
        allowed = self._adapter.settings.operator_user_ids
        return not allowed or user_id in allowed

    async def on_message(self, message: Message) -> None:
        """Check who wrote what where, then act in the background, in order per ticket
        (a message any replica saw before, a redelivered update, is not acted on again)."""
        user = message.from_user
        if user is None or user.is_bot:
            return
        try:
            if not await self.shared.first_sight(str(message.message_id)):
                return
        except StoreError:
            log.exception("operator message %s not checked", message.message_id)
            self._adapter.spawn(self._reply(message.message_thread_id, f"⚠️ {ACTION_FAILED_TEXT}"))
            return
        command = parse_command(message, self._adapter.bot_username)
        name, args = command if command else ("", "")
        if command and name not in OPERATOR_COMMANDS:
            return
        ticket_id = self.ticket_for(message)
        thread = message.message_thread_id if message.is_topic_message else None
        if ticket_id is None:
            if command:
                self._adapter.spawn(
                    self._reply(thread, "Use this command inside a ticket's topic."))
            return
        if not self._authorised(user.id):
            self._adapter.spawn(self._reply(thread, "Sorry, only operators can act on tickets."))
            return
        operator = Operator(PLATFORM, str(user.id), user.full_name)
        lock = self._locks.setdefault(ticket_id, asyncio.Lock())
        self._adapter.spawn(self._in_turn(lock, ticket_id, operator, name, args, message))

    async def _in_turn(self, lock: asyncio.Lock, ticket_id: int, operator: Operator,
                       command: str, args: str, message: Message) -> None:
        async with lock:
            try:
                await self.shared.remember_name(operator.label, operator.name)
                thread = message.message_thread_id
                if thread is not None and self.shared.cached(ticket_id) is None:
                    await self.shared.learn(ticket_id, thread)
                await self._act(ticket_id, operator, command, args, message)
            except OperatorError as exc:
                await self._reply(message.message_thread_id, f"⚠️ {exc}")
            except StoreError:
                # Part of it may have happened (the customer may have the answer already).
                log.exception("operator action on ticket %s failed", ticket_id)
                await self._reply(message.message_thread_id, f"⚠️ {ACTION_FAILED_TEXT}")
            except Exception as exc:  # the customer's platform failed: say so, never drop it
                log.exception("operator action on ticket %s failed", ticket_id)
                await self._reply(message.message_thread_id,
                                  f"⚠️ Could not deliver that to the customer "
                                  f"({type(exc).__name__}); try again.")

    async def _act(self, ticket_id: int, operator: Operator, command: str, args: str,
                   message: Message) -> None:
        desk = self._adapter.pipeline.operators
        if command == "claim":
            await desk.claim(ticket_id, operator)
        elif command == "resolve":
            await desk.resolve(ticket_id, operator, args)
        elif command == "bot":
            await desk.hand_back(ticket_id, operator)
        elif message.text:
            await desk.reply(ticket_id, operator, message.text)
        else:
            raise OperatorError("only text can be relayed to the customer")

    async def _reply(self, thread_id: int | None, text: str) -> None:
        await self._adapter.send(Target(self._chat_id, thread_id), escape(text))


def split_html_lines(html_text: str, limit: int = MAX_MESSAGE) -> list[str]:
    """Our own HTML (tags closed within each line) cut between lines to fit ``limit``.

    A single line too long to fit loses its markup and is split as plain text.
    """
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in html_text.split("\n"):
        plain = html.unescape(re.sub(r"<[^>]+>", "", line))
        lines = [line] if utf16_len(plain) < limit else [
            escape(chunk) for chunk in split_text(plain, limit - 1)]
        for part in lines:
            visible = utf16_len(html.unescape(re.sub(r"<[^>]+>", "", part))) + 1
            if current and size + visible > limit:
                pieces.append("\n".join(current))
                current, size = [], 0
            current.append(part)
            size += visible
    if current:
        pieces.append("\n".join(current))
    return [p for p in pieces if p.strip()]


# --- the adapter --------------------------------------------------------------------------------


class TelegramAdapter(Adapter, CustomerChannel):
    """The Telegram platform: customer chats, and the operator group when configured."""

    __slots__ = (
        "_app", "_flood", "_pacer", "_pipeline", "_room", "_runner", "_suggestions", "_tasks",
        "_token", "_typing", "_webhook_lock", "_webhook_secret", "settings",
    )
    platform = PLATFORM

    def __init__(self, settings: TelegramSettings, token: str, *,
                 webhook_secret: str | None = None) -> None:
        if not token:
            raise ValueError("the Telegram bot token is empty")
        self.settings = settings
        self._token = token
        self._webhook_secret = webhook_secret
        self._app: Application[Any, Any, Any, Any, Any, Any] | None = None
        self._pipeline: Pipeline | None = None
        self._pacer = ChatPacer(settings.edit_interval_s)
        self._flood = FloodGate(settings.flood_messages, settings.flood_window_s)
        self._room = (TelegramOperatorRoom(self, settings.operator_chat_id)
                      if settings.operator_chat_id else None)
        self._suggestions: OrderedDict[str, Suggestion] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._typing: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._webhook_lock = asyncio.Lock()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def bot(self) -> Any:
        if self._app is None:
            raise RuntimeError("the Telegram adapter is not started")
        return self._app.bot

    @property
    def bot_username(self) -> str:
        return self.bot.username or ""

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError("the Telegram adapter is not started")
        return self._pipeline

    @property
    def operator_room(self) -> TelegramOperatorRoom | None:
        return self._room

    def _build(self) -> Application[Any, Any, Any, Any, Any, Any]:
        s = self.settings
        builder = (
            ApplicationBuilder()
            .token(self._token)
            .base_url(s.base_url)
            .base_file_url(s.base_file_url)
            .rate_limiter(AIORateLimiter(
                overall_max_rate=s.overall_max_rate, group_max_rate=s.group_max_rate,
                max_retries=s.max_retries,
            ))
            .pool_timeout(60.0)
            .read_timeout(30.0)
            .write_timeout(30.0)
            .concurrent_updates(False)
        )
        if s.mode == "webhook":
            builder = builder.updater(None)
        app = builder.build()
        app.add_handler(TypeHandler(Update, self._on_ptb_update))
        app.add_error_handler(self._on_ptb_error)
        return app

    async def start(self, pipeline: Pipeline) -> None:
        s = self.settings
        secret = None
        if s.mode == "webhook":
            secret = self._webhook_secret or os.environ.get(s.webhook_secret_env, "")
            if not secret:
                raise RuntimeError(
                    f"Telegram webhook mode needs a secret token: set ${s.webhook_secret_env}")
            if not s.webhook_url:
                raise RuntimeError("Telegram webhook mode needs telegram.webhook_url")
            self._webhook_secret = secret
        self._pipeline = pipeline
        app = self._app = self._build()
        await app.initialize()
        pipeline.attach(self)
        if self._room is not None:
            pipeline.operators.attach(self._room)
        await self._set_commands()
        await app.start()
        if s.mode == "webhook":
            await self._start_webhook()
        else:
            assert app.updater is not None
            await app.updater.start_polling(
                timeout=10, allowed_updates=list(ALLOWED_UPDATES),
                drop_pending_updates=s.drop_pending_updates,
            )
        log.info("telegram adapter running as @%s (%s)", self.bot_username, s.mode)

    async def stop(self) -> None:
        app = self._app
        if app is None:
            return
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        for task in list(self._typing):
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=5.0)
            for task in pending:
                task.cancel()
        if app.running:
            await app.stop()
        await app.shutdown()
        self._app = None

    async def _set_commands(self) -> None:
        try:
            await self.bot.set_my_commands(
                [BotCommand(n, d) for n, d in CUSTOMER_COMMANDS.items()],
                scope=BotCommandScopeAllPrivateChats(),
            )
            if self._room is not None:
                await self.bot.set_my_commands(
                    [BotCommand(n, d) for n, d in OPERATOR_COMMANDS.items()],
                    scope=BotCommandScopeChat(self._room.chat_id),
                )
        except TelegramError as exc:
            log.warning("could not register bot commands: %s", exc)

    async def _start_webhook(self) -> None:
        s = self.settings
        path = urlsplit(s.webhook_url).path or "/"
        server = web.Application(client_max_size=2 * 1024 * 1024)
        server.router.add_post(path, self._on_webhook)
        self._runner = web.AppRunner(server, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, s.webhook_listen, s.webhook_port).start()
        await self.bot.set_webhook(
            url=s.webhook_url, secret_token=self._webhook_secret,
            allowed_updates=list(ALLOWED_UPDATES), drop_pending_updates=s.drop_pending_updates,
        )

    async def _on_webhook(self, request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), (self._webhook_secret or "").encode()):
            return web.Response(status=403, text="wrong secret token")
        try:
            update = Update.de_json(await request.json(), self.bot)
        except Exception:
            return web.Response(status=400, text="not an update")
        async with self._webhook_lock:
            try:
                await self.dispatch(update)
            except Exception:
                log.exception("update %s failed; Telegram will redeliver it", update.update_id)
                return web.Response(status=500)
        return web.Response(status=200)

    async def _on_ptb_update(self, update: Update, _: ContextTypes.DEFAULT_TYPE) -> None:
        try:
            await self.dispatch(update)
        except Exception:
            # Polling has already moved past this update, so Telegram will not send it
            # again: ask the customer to, rather than drop the message silently.
            log.exception("update %s could not be accepted", update.update_id)
            message = update.message
            if update.callback_query is not None:
                # Answered, so the button stops spinning and says what to do.
                self.spawn(self._answer_query(update.callback_query.id, RETRY_PRESS_TEXT))
            elif message is not None:
                target = Target(message.chat.id,
                                message.message_thread_id if message.is_topic_message else None)
                operators = self._room is not None and message.chat.id == self._room.chat_id
                # An operator's answer may already have reached the customer before the
                # failure: tell operators to check, never to simply send it again.
                self.spawn(self.send(target, ACTION_FAILED_TEXT if operators else RESEND_TEXT))

    async def _on_ptb_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("telegram update %r failed", update, exc_info=context.error)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Background work that ``stop`` waits for (briefly); failures are logged."""
        return self._track(work, self._tasks)

    def keep_alive(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Background work that ``stop`` cancels (typing indicators)."""
        return self._track(work, self._typing)

    @staticmethod
    def _track(work: Coroutine[Any, Any, Any], tasks: set[asyncio.Task[Any]]
               ) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("telegram background work failed", exc_info=t.exception())

        task.add_done_callback(done)
        return task

    # -- Bot API calls ----------------------------------------------------------------------

    async def call(self, request: Callable[[], Awaitable[T]], *, idempotent: bool = False) -> T:
        """One Bot API call; 429s are the rate limiter's to retry, this retries the rest.

        A 5xx or a request that never reached Telegram (connect, write or pool timeout)
        is retried with backoff. A request that timed out waiting for the answer may have
        been carried out, so it is retried only when ``idempotent`` (edits, deletes).
        """
        attempts = self.settings.max_retries + 1
        for attempt in range(attempts):
            try:
                return await request()
            except BadRequest:
                raise
            except NetworkError as exc:
                unsent = isinstance(exc.__cause__, _UNSENT)
                if attempt == attempts - 1 or (
                        isinstance(exc, TimedOut) and not unsent and not idempotent):
                    raise
                delay = min(5.0, 0.25 * 2**attempt)
                log.info("Bot API error (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def send(self, target: Target, html_text: str,
                   markup: InlineKeyboardMarkup | None = None) -> int:
        await self._pacer.wait(target.chat_id)
        message = await self.call(lambda: self.bot.send_message(
            target.chat_id, html_text, parse_mode=ParseMode.HTML, reply_markup=markup,
            message_thread_id=target.thread_id,
            link_preview_options=LinkPreviewOptions(is_disabled=True),
        ))
        return int(message.message_id)

    async def send_photo(self, target: Target, png: bytes, html_caption: str = "") -> int:
        """Upload a picture (multipart); a 5xx is retried with the same bytes."""
        await self._pacer.wait(target.chat_id)
        message = await self.call(lambda: self.bot.send_photo(
            target.chat_id, InputFile(png, filename=REPORT_FILENAME), caption=html_caption or None,
            parse_mode=ParseMode.HTML, message_thread_id=target.thread_id,
        ))
        return int(message.message_id)

    async def edit(self, target: Target, message_id: int, html_text: str,
                   markup: InlineKeyboardMarkup | None = None) -> int:
        """Edit a message; returns its id, or a new message's if the old one is gone."""
        await self._pacer.wait(target.chat_id)
        try:
            await self.call(lambda: self.bot.edit_message_text(
                html_text, chat_id=target.chat_id, message_id=message_id,
                parse_mode=ParseMode.HTML, reply_markup=markup,
                link_preview_options=LinkPreviewOptions(is_disabled=True),
            ), idempotent=True)
        except BadRequest as exc:
            reason = str(exc).lower()
            if "not modified" in reason:
                return message_id
            if "not found" in reason:
                return await self.send(target, html_text, markup)
            raise
        return message_id

    async def delete(self, target: Target, message_id: int) -> None:
        try:
            await self.call(lambda: self.bot.delete_message(target.chat_id, message_id),
                            idempotent=True)
        except TelegramError as exc:
            log.info("could not delete message %s in %s: %s", message_id, target.chat_id, exc)

    async def typing(self, target: Target) -> None:
        try:
            await self.bot.send_chat_action(
                target.chat_id, ChatAction.TYPING, message_thread_id=target.thread_id)
        except TelegramError as exc:
            log.debug("typing action failed in %s: %s", target.chat_id, exc)

    def remember(self, suggestions: Sequence[Suggestion]) -> None:
        """Keep shown suggestions so a press can be answered with the article's title and link."""
        for item in suggestions:
            self._suggestions[item.id] = item
            self._suggestions.move_to_end(item.id)
        while len(self._suggestions) > 5_000:
            self._suggestions.popitem(last=False)

    # -- CustomerChannel --------------------------------------------------------------------

    def open_reply(self, conversation_key: str) -> ReplyStream:
        return TelegramReplyStream(self, Target.parse(conversation_key))

    async def deliver(self, conversation_key: str, reply: Reply) -> str:
        target = Target.parse(conversation_key)
        pieces = render(reply)
        if not pieces:
            return ""
        markup = keyboard(reply.suggestions)
        self.remember(reply.suggestions)
        last_id = 0
        for index, piece in enumerate(pieces):
            last_id = await self.send(
                target, piece, markup if index == len(pieces) - 1 else None)
        return message_key(target.chat_id, last_id)

    # -- incoming -----------------------------------------------------------------------------

    async def dispatch(self, update: Update) -> None:
        """Turn one update into core events; raising means it should be delivered again."""
        if update.callback_query is not None:
            await self._on_callback(update)
        elif update.message_reaction is not None:
            await self._on_reaction(update.message_reaction)
        elif update.message is not None:
            message = update.message
            if self._room is not None and message.chat.id == self._room.chat_id:
                await self._room.on_message(message)
            else:
                await self._on_customer_message(message)

    def _addressed(self, message: Message) -> bool:
        """In groups the bot answers only when mentioned, replied to, or commanded."""
        if message.chat.type == ChatType.PRIVATE:
            return True
        reply = message.reply_to_message
        if reply is not None and reply.from_user is not None and reply.from_user.id == self.bot.id:
            return True
        if parse_command(message, self.bot_username) is not None:
            return True
        mention = "@" + self.bot_username.lower()
        entities = message.parse_entities([MessageEntity.MENTION])
        return any(text.lower() == mention for text in entities.values())

    def _strip_mention(self, text: str) -> str:
        return re.sub(rf"@{re.escape(self.bot_username)}\b", "", text, flags=re.I).strip()

    async def _on_customer_message(self, message: Message) -> None:
        sender = message.from_user
        if sender is None or sender.is_bot or not self._addressed(message):
            return
        target = Target(message.chat.id,
                        message.message_thread_id if message.is_topic_message else None)
        kind, payload, text = Kind.TEXT, "", message.text or ""
        command = parse_command(message, self.bot_username)
        if command is not None and command[0] in CUSTOMER_COMMANDS:
            kind, payload, text = Kind.COMMAND, command[0], command[1]
        elif message.text is not None:
            text = self._strip_mention(message.text) if target.chat_id < 0 else message.text
        else:
            found = next((k for k in ATTACHMENT_KINDS if getattr(message, k, None)), None)
            if found is None:
                return
            kind, payload = Kind.ATTACHMENT, "file" if found == "document" else found
            text = message.caption or (message.sticker.emoji or "" if message.sticker else "")
        inbound = Inbound(
            platform=PLATFORM,
            conversation_key=target.conversation_key,
            user=User(PLATFORM, str(sender.id), sender.full_name),
            platform_message_id=message_key(message.chat.id, message.message_id),
            text=text, kind=kind, payload=payload,
            sent_at=message.date or datetime.now(UTC),
        )
        if not await self.pipeline.submit(inbound):
            log.info("update for %s seen before; not answered again",
                     inbound.platform_message_id)
            return
        if self._flood.hit(sender.id):
            self.spawn(self.deliver(target.conversation_key, Reply(SLOW_DOWN, Sender.SYSTEM)))

    async def _on_callback(self, update: Update) -> None:
        query = update.callback_query
        assert query is not None
        data = query.data or ""
        if not data.startswith(SUGGESTION_PREFIX):
            self.spawn(self._answer_query(query.id, ""))
            return
        item_id = data[len(SUGGESTION_PREFIX):]
        shown = query.message
        chat = shown.chat.id if shown is not None else query.from_user.id
        topic = getattr(shown, "is_topic_message", False)
        target = Target(chat, getattr(shown, "message_thread_id", None) if topic else None)
        known = self._suggestions.get(item_id) or self.pipeline.describe(item_id)
        inbound = Inbound(
            platform=PLATFORM, conversation_key=target.conversation_key,
            user=User(PLATFORM, str(query.from_user.id), query.from_user.full_name),
            platform_message_id=f"cb:{query.id}", text=known.title if known else "",
            kind=Kind.SUGGESTION_CLICK, payload=item_id,
        )
        if not await self.pipeline.submit(inbound):
            return
        self.spawn(self._answer_query(query.id, known.title if known else ""))
        if known is not None and known.url.startswith(("https://", "http://")):
            self.spawn(self.send(target, f"📖 {_link(known.title, known.url)}"))

    async def _answer_query(self, query_id: str, text: str) -> None:
        try:
            await self.call(lambda: self.bot.answer_callback_query(query_id, text=text[:200]))
        except TelegramError as exc:
            log.info("callback query %s not answered: %s", query_id, exc)

    async def _on_reaction(self, reaction: MessageReactionUpdated) -> None:
        user = reaction.user
        if user is None or user.is_bot:
            return
        if self._room is not None and reaction.chat.id == self._room.chat_id:
            return
        old = {r.emoji for r in reaction.old_reaction if isinstance(r, ReactionTypeEmoji)}
        added = [r.emoji for r in reaction.new_reaction
                 if isinstance(r, ReactionTypeEmoji) and r.emoji not in old]
        if not added:
            return
        chat_id = reaction.chat.id
        stamp = int(reaction.date.timestamp())
        inbound = Inbound(
            platform=PLATFORM, conversation_key=str(chat_id),
            user=User(PLATFORM, str(user.id), user.full_name),
            platform_message_id=(
                f"re:{chat_id}:{reaction.message_id}:{user.id}:{added[0]}:{stamp}"),
            text=message_key(chat_id, reaction.message_id),
            kind=Kind.REACTION, payload=added[0], sent_at=reaction.date,
        )
        await self.pipeline.submit(inbound)
