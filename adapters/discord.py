"""Discord: customers in DMs, support channels and mentions; operators in a channel's threads.

Built on discord.py 2.x, which keeps its own rate-limit buckets, retries 429s after
``retry_after`` and RESUMEs dropped gateway sessions. What this module adds on top:

* every message is sent with ``AllowedMentions.none()``, so model output can never ping;
* replies stream by editing one message at most every ``edit_interval_s``, are split at
  2,000 characters on word boundaries, and broken model markdown is repaired or escaped;
* suggestion buttons use ``DynamicItem`` custom ids (``sb:sg:<id>``), so presses on old
  messages still work after a restart;
* a 503, which discord.py raises at once, is retried (it retries 429 and 500/502/504
  itself); a send that still fails is raised to the pipeline (the message is marked failed)
  or reported to the operator who wrote it, never dropped silently;
* with ``shard_id``/``shard_count`` set, the connection identifies as that shard, so one
  replica per shard gets its guilds' events (and shard 0 the DMs), each event once;
* a replayed or redelivered MESSAGE_CREATE is processed once (the message snowflake is the
  ``platform_message_id`` the pipeline deduplicates on, plus an in-memory guard for the
  operator side), and ``on_ready`` firing again after a reconnect repeats no start-up work.

The periodic report is a message in the operator channel with the chart attached
(multipart ``payload_json`` + ``files[0]``), continued in further messages past 2,000
characters.

Conversation keys: a DM or support-thread id as is (``"123"``); a shared guild channel is
per user (``"<channel id>:<user id>"``) so two customers there never share a conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from core.adapter import Adapter
from core.channels import CustomerChannel, OperatorChannel, ReplyStream
from core.config import DiscordSettings
from core.messages import Inbound, Kind, Reply, Sender, User
from core.operators import ACTION_FAILED_TEXT, Operator, OperatorError
from core.pipeline import Pipeline
from core.store import StoreError
from core.ticket_threads import Shown, TicketThreads
from core.tickets import TicketView

log = logging.getLogger(__name__)

PLATFORM = "discord"
MAX_MESSAGE = 2000
SUGGESTION_PREFIX = "sb:sg:"
CUSTOMER_COMMANDS = frozenset({"start", "help", "human", "feedback"})
OPERATOR_REFUSAL = "Only members with the operator role can work on tickets."
NO_MENTIONS = discord.AllowedMentions.none()
STOP_GRACE_S = 10.0
REPORT_FILENAME = "sentiment-report.png"
SEND_RETRIES = 3
# discord.py retries these itself (five tries, 1 + 2n s apart) and raises any other 5xx at once.
_LIBRARY_RETRIED = frozenset({500, 502, 504, 524})
T = TypeVar("T")

_FENCE = "```"
_FENCE_RUN = re.compile("```")
_FENCE_LANG = re.compile(r"([A-Za-z0-9_+#.-]{1,16})\n")
MIN_SPLIT_LIMIT = len(_FENCE) + 16 + 1 + len("\n" + _FENCE) + 1
"""The smallest limit :func:`split_message` can keep: a reopened fence with the longest
language tag, its newline, the closing fence and one character of text."""
_PAIRED_MARKERS = ("**", "__", "~~", "||")
_TICKET_IN_NAME = re.compile(r"^#(\d+)\b")
_LINKABLE = re.compile(r"https?://[^\s<>]+")
_SPARKS = "▁▂▃▄▅▆▇█"


# -- text rendering (pure) ---------------------------------------------------------------


def _escape_last(text: str, marker: str) -> str:
    at = text.rfind(marker)
    escaped = "".join("\\" + ch for ch in marker)
    return text[:at] + escaped + text[at + len(marker):]


def _fix_prose(text: str) -> str:
    """Escape markers that have no partner (they would swallow the rest of the message)."""
    parts = re.split(r"(`[^`\n]+`)", text)
    prose = parts[0::2]
    prose = [p.replace("`", "\\`") for p in prose]
    for marker in _PAIRED_MARKERS:
        if sum(p.count(marker) for p in prose) % 2:
            last = max(i for i, p in enumerate(prose) if marker in p)
            prose[last] = _escape_last(prose[last], marker)
    parts[0::2] = prose
    return "".join(parts)


def escape_model_markdown(text: str) -> str:
    """Repair model markdown that would break a Discord message; leave the rest alone.

    An unclosed code fence is closed, unpaired ``**``/``__``/``~~``/``||`` and stray
    backticks outside code are escaped. Balanced formatting is kept as the model meant it.
    """
    pieces = re.split(r"(```[\s\S]*?```)", text)
    out = []
    for i, piece in enumerate(pieces):
        if i % 2:
            out.append(piece)
            continue
        fence_at = piece.find(_FENCE)
        if fence_at >= 0:
            code = piece[fence_at:]
            out.append(_fix_prose(piece[:fence_at]))
            out.append(code + ("" if code.endswith("\n") else "\n") + _FENCE)
        else:
            out.append(_fix_prose(piece))
    return "".join(out)


def _open_fence(text: str) -> str | None:
    """The fence to reopen with (``` plus a short language tag) if ``text`` ends inside a
    code block. Fences count wherever they stand, as :func:`escape_model_markdown` and
    Discord count them; a long or odd "language" is not carried over."""
    opened: str | None = None
    for match in _FENCE_RUN.finditer(text):
        if opened is not None:
            opened = None
            continue
        lang = _FENCE_LANG.match(text, match.end())
        opened = _FENCE + (lang.group(1) if lang else "")
    return opened


def _cut_point(text: str, budget: int) -> tuple[int, int]:
    """Where to cut ``text`` to at most ``budget`` characters: (end of piece, start of rest).

    Never inside a ``` fence, which would leave stray backticks on both sides."""
    window = text[: budget + 1]
    end = start = budget
    for sep in ("\n\n", "\n", " "):
        at = window.rfind(sep, budget // 3, budget + 1)
        if at > 0:
            end, start = at, at + len(sep)
            break
    for match in _FENCE_RUN.finditer(text, max(0, end - 2), end + 2):
        if match.start() < end < match.end():
            end = start = match.start() if match.start() > 0 else match.end()
    return end, start


def split_message(text: str, limit: int = MAX_MESSAGE) -> list[str]:
    """Split into messages of at most ``limit`` characters on word boundaries.

    A code block cut in two is closed at the end of one message and reopened (with its
    language) at the start of the next, so both render as code; every message closes the
    blocks it opens.
    """
    if limit < MIN_SPLIT_LIMIT:
        raise ValueError(f"split_message needs a limit of at least {MIN_SPLIT_LIMIT}, "
                         f"not {limit}: a reopened code block alone takes up to "
                         f"{MIN_SPLIT_LIMIT - 1} characters")
    text = text.strip()
    chunks: list[str] = []
    fence: str | None = None
    closing = "\n" + _FENCE
    while text:
        prefix = f"{fence}\n" if fence else ""
        whole = prefix + text
        if len(whole) + (len(closing) if _open_fence(whole) else 0) <= limit:
            chunks.append(whole + closing if _open_fence(whole) else whole)
            break
        end, start = _cut_point(text, limit - len(prefix) - len(closing))
        piece = text[:end].rstrip()
        text = text[start:]
        if not piece.strip():
            continue  # only whitespace up to the cut: nothing to send
        body = prefix + piece
        fence = _open_fence(body)
        chunks.append(body + closing if fence else body)
    return chunks


def sparkline(values: tuple[float, ...]) -> str:
    if not values:
        return "(no scores yet)"
    bars = "".join(_SPARKS[min(len(_SPARKS) - 1, int(v * len(_SPARKS)))] for v in values)
    return f"{bars} {values[0]:.2f} → {values[-1]:.2f}"


def quote(text: str, limit: int = 300) -> str:
    """Customer text shown to operators: escaped, one quoted block, bounded."""
    text = discord.utils.escape_markdown(text.strip())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return "\n".join("> " + line for line in text.splitlines() or [""])


def source_link(title: str, url: str) -> str:
    """A cited article as a masked link; a relative or odd URL would show as raw markdown,
    so only an absolute http(s) URL is linked, else the title stands alone."""
    label = discord.utils.escape_markdown(title).replace("[", "\\[").replace("]", "\\]")
    if _LINKABLE.fullmatch(url):
        return f"[{label}](<{url}>)"
    return label


def conversation_key(channel_id: int, user_id: int | None = None) -> str:
    return str(channel_id) if user_id is None else f"{channel_id}:{user_id}"


def channel_of(key: str) -> int:
    return int(key.split(":", 1)[0])


def who(claimed_by: Any) -> str:
    """An operator as shown in Discord; ``discord:<id>`` renders as a (silent) mention."""
    name = getattr(claimed_by, "display_name", None) or getattr(claimed_by, "operator_id", None)
    if name:
        return str(name)
    text = str(claimed_by or "someone")
    if text.startswith(f"{PLATFORM}:") and text[len(PLATFORM) + 1:].isdigit():
        return f"<@{text[len(PLATFORM) + 1:]}>"
    return discord.utils.escape_markdown(text)


class _Recent:
    """A bounded memory of recent keys (ids already handled, sent message owners)."""

    __slots__ = ("_items", "_size")

    def __init__(self, size: int) -> None:
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._size = size

    def add(self, key: Hashable, value: Any = True) -> bool:
        """Remember ``key``; ``False`` if it was already there."""
        new = key not in self._items
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return new

    def get(self, key: Hashable) -> Any:
        return self._items.get(key)

    def discard(self, key: Hashable) -> None:
        self._items.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


# -- suggestion buttons --------------------------------------------------------------------


class SuggestionButton(discord.ui.DynamicItem[discord.ui.Button[Any]],
                       template=r"sb:sg:(?P<id>.{1,94})"):
    """A help-article button; its custom id carries the article id, so it survives restarts."""

    def __init__(self, suggestion_id: str, label: str = "") -> None:
        super().__init__(discord.ui.Button(
            label=(label or suggestion_id)[:80], style=discord.ButtonStyle.secondary,
            custom_id=SUGGESTION_PREFIX + suggestion_id,
        ))
        self.suggestion_id = suggestion_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> SuggestionButton:
        return cls(match["id"], getattr(item, "label", None) or "")

    async def callback(self, interaction: discord.Interaction) -> None:
        client = interaction.client
        if isinstance(client, _Client):
            await client.adapter.suggestion_clicked(interaction, self.suggestion_id,
                                                    self.item.label or "")


# -- the discord.py client -----------------------------------------------------------------


class _Client(discord.Client):
    """discord.Client whose events go to the adapter; ``setup_hook`` runs once per login."""

    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter
        self.tree = app_commands.CommandTree(self)

    async def setup_hook(self) -> None:
        await self.adapter.setup()

    async def on_ready(self) -> None:
        await self.adapter.on_ready()

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.adapter.on_reaction(payload)


# -- streamed replies ----------------------------------------------------------------------


class DiscordReplyStream(ReplyStream):
    """Typing while the model works, then one message edited at most every interval."""

    __slots__ = ("_adapter", "_done", "_flusher", "_key", "_latest", "_message", "_next_at",
                 "_released", "_shown", "_typing", "_wake")

    def __init__(self, adapter: DiscordAdapter, key: str) -> None:
        self._adapter = adapter
        self._key = key
        self._latest = ""
        self._shown = ""
        self._message: discord.Message | None = None
        self._next_at = 0.0
        self._typing: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._done = False
        self._released = False

    async def begin(self) -> None:
        """Typing first; the first preview waits one interval, so quick answers are sent
        once, complete, instead of as a fragment followed by an edit."""
        self._adapter.busy(+1)
        self._edited()
        self._typing = asyncio.create_task(self._adapter.keep_typing(self._key))

    async def update(self, text_so_far: str) -> None:
        if self._done:
            return
        self._latest = text_so_far
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _wait_turn(self) -> None:
        """Sleep until the next edit is allowed (or until the stream is finished)."""
        delay = self._next_at - asyncio.get_running_loop().time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _edited(self) -> None:
        self._next_at = asyncio.get_running_loop().time() + self._adapter.settings.edit_interval_s

    async def _flush(self) -> None:
        while not self._done and self._latest.strip() and self._latest != self._shown:
            await self._wait_turn()
            if self._done:
                return
            text = self._latest
            preview = escape_model_markdown(text.strip())
            if len(preview) > MAX_MESSAGE:
                preview = split_message(preview, MAX_MESSAGE - 1)[0] + "…"
            try:
                if self._message is None:
                    self._message = await self._adapter.send(self._key, preview)
                else:
                    await self._message.edit(content=preview, allowed_mentions=NO_MENTIONS)
            except Exception as exc:  # a lost preview must not lose the final reply
                log.warning("discord: preview in %s failed: %r", self._key, exc)
            self._shown = text
            self._edited()

    async def _stop(self) -> None:
        self._done = True
        self._wake.set()
        if self._typing is not None:
            self._typing.cancel()
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def finish(self, reply: Reply) -> str:
        try:
            return await self._finish(reply)
        finally:
            self._release()

    def _release(self) -> None:
        if self._typing is not None and not self._released:
            self._released = True
            self._adapter.busy(-1)

    async def _finish(self, reply: Reply) -> str:
        await self._stop()
        chunks = self._adapter.render(reply)
        view = self._adapter.suggestion_view(reply)
        sent: discord.Message | None = None
        if self._message is not None:
            delay = self._next_at - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
            only = len(chunks) == 1
            message = self._message
            try:
                sent = await self._adapter.with_retries(lambda: message.edit(
                    content=chunks[0], allowed_mentions=NO_MENTIONS,
                    **({"view": view} if only and view is not None else {}),
                ))
            except discord.NotFound:  # someone deleted the preview: send the reply anew
                self._message = None
            else:
                self._adapter.remember_sent(sent.id, self._key)
                chunks = chunks[1:]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            sent = await self._adapter.send(self._key, chunk, view if last else None)
        assert sent is not None
        return str(sent.id)

    async def abort(self) -> None:
        try:
            await self._stop()
            if self._message is not None:
                with contextlib.suppress(discord.NotFound):
                    await self._message.delete()
        finally:
            self._release()


# -- the operator channel ------------------------------------------------------------------


class DiscordOperatorChannel(OperatorChannel):
    """Escalations as threads in ``operator_channel_id``; one thread per ticket.

    Which thread holds a ticket and what it shows live in the store's shared state, so a
    replica (shard) that posts a ticket's news uses the thread another one made."""

    __slots__ = ("_adapter", "_by_thread", "_locks", "_shared_threads")

    def __init__(self, adapter: DiscordAdapter) -> None:
        self._adapter = adapter
        self._by_thread: dict[int, int] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._shared_threads: TicketThreads | None = None

    @property
    def shared(self) -> TicketThreads:
        if self._shared_threads is None:
            self._shared_threads = TicketThreads(
                self._adapter.pipeline.store,
                f"{PLATFORM}:{self._adapter.settings.operator_channel_id}")
        return self._shared_threads

    async def has_thread(self, ticket_id: int) -> bool:
        return await self.shared.thread(ticket_id) is not None

    def ticket_of_thread(self, thread: Any) -> int | None:
        """The ticket a thread belongs to: remembered, or read from its name (a thread
        another replica made, or one made before a restart)."""
        known = self._by_thread.get(thread.id)
        if known is not None:
            return known
        match = _TICKET_IN_NAME.match(getattr(thread, "name", None) or "")
        if match is None:
            return None
        self._by_thread[thread.id] = int(match[1])
        return int(match[1])

    async def adopt(self, threads: list[discord.Thread]) -> None:
        """Relearn ticket threads that exist already (made before the map was shared)."""
        for thread in threads:
            ticket_id = self.ticket_of_thread(thread)
            if ticket_id is not None:
                await self.shared.learn(ticket_id, thread.id)

    async def _operator_room(self) -> discord.TextChannel:
        cid = self._adapter.settings.operator_channel_id
        client = self._adapter.client
        channel = client.get_channel(cid) or await client.fetch_channel(cid)
        if not isinstance(channel, discord.TextChannel):
            raise RuntimeError(f"discord: operator_channel_id {cid} is not a text channel")
        return channel

    async def _send(self, thread_id: int, text: str) -> None:
        for chunk in split_message(text):
            await self._adapter.send(str(thread_id), chunk, track=False)

    async def post_report(self, summary: str, chart_png: bytes) -> None:
        """The summary with the chart attached, in the operator channel itself (not a
        ticket thread); a summary over 2,000 characters continues in further messages.

        The summary is plain text (it quotes customers' words), so markdown is escaped and
        it shows exactly as written."""
        room = await self._operator_room()
        chunks = split_message(discord.utils.escape_markdown(summary.strip())) or [""]
        self._adapter.busy(+1)
        try:
            await self._adapter.with_retries(lambda: room.send(
                chunks[0], file=discord.File(io.BytesIO(chart_png), filename=REPORT_FILENAME),
                allowed_mentions=NO_MENTIONS))
            for chunk in chunks[1:]:
                await self._adapter.with_retries(
                    lambda chunk=chunk: room.send(chunk, allowed_mentions=NO_MENTIONS))
        finally:
            self._adapter.busy(-1)

    async def _summary(self, ticket: TicketView) -> str:
        customer = ticket.customer.display_name or ticket.customer.platform_user_id
        lines = [
            f"**Ticket #{ticket.id}** · {discord.utils.escape_markdown(customer)} "
            f"on {ticket.platform}",
            f"**Reason:** {discord.utils.escape_markdown(ticket.reason)}",
            f"**Sentiment (negative):** {sparkline(tuple(ticket.sentiment_trend))}",
        ]
        transcript = await self._adapter.transcript(ticket.conversation_id)
        if transcript:
            lines.append("**Recent messages:**")
            for sender, text in transcript:
                lines.append(f"**{sender}:**\n{quote(text, 200)}")
        elif ticket.last_customer_text:
            lines.append(f"**Customer wrote:**\n{quote(ticket.last_customer_text)}")
        lines.append("Reply in this thread to answer the customer. "
                     "`/claim`, `/resolve [note]`, `/bot` (hand back to the bot).")
        return "\n".join(lines)

    async def _thread_for(self, ticket: TicketView) -> tuple[int, bool]:
        thread_id = await self.shared.thread(ticket.id)
        if thread_id is not None:
            return thread_id, False
        room = await self._operator_room()
        for thread in room.threads:
            if self.ticket_of_thread(thread) == ticket.id:
                await self.shared.learn(ticket.id, thread.id)
                return thread.id, False

        async def create() -> int:
            name = (f"#{ticket.id} · {ticket.customer.display_name or 'customer'} · "
                    f"{ticket.reason}")
            thread = await room.create_thread(
                name=name[:100], type=discord.ChannelType.public_thread,
                auto_archive_duration=1440,
            )
            self._by_thread[thread.id] = ticket.id
            return thread.id

        return await self.shared.thread_for(ticket.id, create)

    def _lock(self, ticket_id: int) -> asyncio.Lock:
        return self._locks.setdefault(ticket_id, asyncio.Lock())

    async def ticket_opened(self, ticket: TicketView) -> None:
        if self._adapter.stopped:  # the desk has no detach; a stopped adapter stays quiet
            return
        async with self._lock(ticket.id):
            thread_id, created = await self._thread_for(ticket)
            if created:
                await self._send(thread_id, await self._summary(ticket))
            else:
                await self._send(thread_id, f"Ticket #{ticket.id} is still waiting for a person "
                                            f"({ticket.state}).")
            await self.shared.show(ticket.id, self._shown(ticket))

    async def ticket_updated(self, ticket: TicketView) -> None:
        if self._adapter.stopped:
            return
        async with self._lock(ticket.id):
            thread_id, created = await self._thread_for(ticket)
            if created:
                await self._send(thread_id, await self._summary(ticket))
            shown = self._shown(ticket)
            before = await self.shared.show(ticket.id, shown)
            # Unknown history (made before the map was shared): only a non-open ticket
            # can have changed.
            changed = ((before.state, before.claimed_by) != (shown.state, shown.claimed_by)
                       if before is not None else ticket.state != "open")
            if changed:
                await self._send(thread_id, self._state_line(ticket))
                if ticket.state in ("resolved", "handed_back"):
                    await self._archive(thread_id)
            elif not created:
                await self._send(thread_id, self._customer_line(ticket, before))

    @staticmethod
    def _shown(ticket: TicketView) -> Shown:
        return Shown(ticket.state, str(ticket.claimed_by or ""), ticket.last_customer_text)

    @staticmethod
    def _customer_line(ticket: TicketView, before: Shown | None) -> str:
        """The customer wrote while escalated; TicketView carries only their last text."""
        if ticket.last_customer_text and (
                before is None or ticket.last_customer_text != before.customer_text):
            return f"**Customer:**\n{quote(ticket.last_customer_text)}"
        return "**Customer** sent a message that is not text (or repeated the last one)."

    @staticmethod
    def _state_line(ticket: TicketView) -> str:
        if ticket.state == "claimed":
            return f"Claimed by {who(ticket.claimed_by)}."
        if ticket.state == "resolved":
            note = getattr(ticket, "note", "")
            extra = f" Note: {discord.utils.escape_markdown(note)}" if note else ""
            return f"Resolved by {who(ticket.claimed_by)}.{extra}"
        if ticket.state == "handed_back":
            return "Handed back to the bot."
        return f"Ticket is {ticket.state}."

    async def _archive(self, thread_id: int) -> None:
        thread = self._adapter.client.get_channel(thread_id)
        if isinstance(thread, discord.Thread):
            with contextlib.suppress(discord.HTTPException):
                await thread.edit(archived=True)


# -- the adapter ---------------------------------------------------------------------------


class DiscordAdapter(Adapter, CustomerChannel):
    """The Discord platform: customer channel, operator channel, gateway connection."""

    __slots__ = ("_client", "_connect", "_idle", "_inflight", "_last_inbound", "_pipeline",
                 "_ready", "_seen", "_sent", "_started_up", "_stopping", "_suggestions",
                 "_token", "operator_channel", "settings", "startup_runs")

    platform = PLATFORM

    def __init__(self, settings: DiscordSettings, token: str) -> None:
        if not token:
            raise ValueError(f"discord: no bot token (set the environment variable "
                             f"{settings.token_env})")
        self.settings = settings
        self._token = token
        self._client: _Client | None = None
        self._connect: asyncio.Task[None] | None = None
        self._pipeline: Pipeline | None = None
        self._ready = asyncio.Event()
        self._started_up = False
        self.startup_runs = 0
        self._seen = _Recent(50_000)
        self._sent = _Recent(50_000)
        self._last_inbound = _Recent(50_000)
        self._suggestions = _Recent(10_000)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self.operator_channel = DiscordOperatorChannel(self)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def client(self) -> _Client:
        if self._client is None:
            raise RuntimeError("discord adapter is not started")
        return self._client

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError("discord adapter is not started")
        return self._pipeline

    def _configure_endpoints(self) -> None:
        """Point discord.py at another REST base and gateway (tests, proxies): config only."""
        if self.settings.api_base:
            discord.http.Route.BASE = self.settings.api_base.rstrip("/")
        if self.settings.gateway_url:
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.settings.gateway_url)

    async def start(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        pipeline.attach(self)
        if self.settings.operator_channel_id:
            pipeline.operators.attach(self.operator_channel)
        if self.settings.operator_channel_id and not self.settings.operator_role_id:
            log.warning("discord: operator_channel_id is set but operator_role_id is 0; "
                        "nobody will be allowed to act on tickets")
        self._configure_endpoints()
        intents = discord.Intents.default()
        intents.message_content = True
        self._client = _Client(
            self, intents=intents, allowed_mentions=NO_MENTIONS,
            guild_ready_timeout=self.settings.guild_ready_timeout_s,
            shard_id=self.settings.shard_id, shard_count=self.settings.shard_count,
        )
        try:
            await self._client.login(self._token)
        except discord.LoginFailure as exc:
            await self._client.close()
            raise RuntimeError(f"discord: login refused ({exc}); check "
                               f"{self.settings.token_env}") from None
        self._connect = asyncio.create_task(self._client.connect(reconnect=True),
                                            name="discord-gateway")
        ready = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait({ready, self._connect},
                                     timeout=self.settings.start_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            if self._connect in done:
                error = self._connect.exception()
                await self.stop()
                raise RuntimeError(f"discord: gateway connection failed: {error!r}")
            await self.stop()
            raise RuntimeError("discord: gateway not ready within "
                               f"{self.settings.start_timeout_s}s")

    @property
    def stopped(self) -> bool:
        return self._stopping

    def busy(self, delta: int) -> None:
        """Count work that must finish before the HTTP session closes (replies, relays)."""
        self._inflight += delta
        if self._inflight:
            self._idle.clear()
        else:
            self._idle.set()

    async def stop(self) -> None:
        """Stop taking events; let in-flight replies and relays finish (bounded); close."""
        self._stopping = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), STOP_GRACE_S)
        if self._client is not None:
            await self._client.close()
        if self._connect is not None:
            await asyncio.gather(self._connect, return_exceptions=True)

    async def setup(self) -> None:
        """Once per login, before the gateway connects: buttons and operator commands."""
        self.client.add_dynamic_items(SuggestionButton)
        if self.settings.operator_channel_id:
            self._register_operator_commands()
            await self.client.tree.sync()

    async def on_ready(self) -> None:
        """Fires after every fresh IDENTIFY (not after RESUME): start-up work runs once."""
        if self._started_up:
            log.info("discord: session re-identified; start-up work already done")
            return
        self._started_up = True
        self.startup_runs += 1
        self._ready.set()
        if self.settings.shard_count is None:
            log.info("discord: ready as %s", self.client.user)
        else:
            log.info("discord: ready as %s, shard %d of %d", self.client.user,
                     self.settings.shard_id, self.settings.shard_count)
        if not self.settings.operator_channel_id:
            return
        room = self.client.get_channel(self.settings.operator_channel_id)
        if isinstance(room, discord.TextChannel):
            await self.operator_channel.adopt(list(room.threads))
        else:
            log.warning("discord: operator channel %s is not a text channel the bot can see",
                        self.settings.operator_channel_id)
        try:  # tickets opened while this adapter was down get their thread now
            for ticket in await self.pipeline.operators.open_tickets():
                if not await self.operator_channel.has_thread(ticket.id):
                    await self.operator_channel.ticket_opened(ticket)
        except Exception:
            log.exception("discord: could not announce open tickets")

    # -- customer side: receiving ----------------------------------------------------

    def _mentions_me(self, message: discord.Message) -> bool:
        me = self.client.user
        return me is not None and any(u.id == me.id for u in message.mentions)

    def _strip_mention(self, text: str) -> str:
        me = self.client.user
        if me is not None:
            text = re.sub(rf"<@!?{me.id}>", "", text)
        return text.strip()

    def _is_operator_room(self, channel: Any) -> bool:
        cid = self.settings.operator_channel_id
        return bool(cid) and isinstance(channel, discord.Thread) and channel.parent_id == cid

    async def _customer_key(self, message: discord.Message) -> str | None:
        """Where the bot answers: DMs, support channels and their threads, mentions."""
        channel = message.channel
        support = self.settings.support_channel_ids
        if message.guild is None:
            return conversation_key(channel.id)
        if isinstance(channel, discord.Thread):
            if channel.parent_id in support:
                return conversation_key(channel.id)
            return conversation_key(channel.id, message.author.id) \
                if self._mentions_me(message) else None
        if channel.id in support:
            if self.settings.use_threads and isinstance(channel, discord.TextChannel):
                return await self._open_thread(message)
            return conversation_key(channel.id, message.author.id)
        if self._mentions_me(message):
            return conversation_key(channel.id, message.author.id)
        return None

    async def _open_thread(self, message: discord.Message) -> str:
        name = f"{message.author.display_name}: {self._strip_mention(message.content)}"
        try:
            thread = await message.create_thread(name=name[:100] or "Support",
                                                 auto_archive_duration=1440)
        except discord.HTTPException as exc:
            if exc.code != 160004:  # a thread exists for this message (a replay): reuse it
                raise
            return conversation_key(message.id)
        return conversation_key(thread.id)

    @staticmethod
    def _attachment_kind(message: discord.Message) -> str:
        if message.stickers:
            return "sticker"
        if message.flags.voice:
            return "voice"
        content_type = (message.attachments[0].content_type or "") if message.attachments else ""
        for prefix, kind in (("image/", "photo"), ("video/", "video"), ("audio/", "audio")):
            if content_type.startswith(prefix):
                return kind
        return "file"

    def _inbound(self, message: discord.Message, key: str) -> Inbound | None:
        author = message.author
        user = User(PLATFORM, str(author.id), author.display_name)
        text = self._strip_mention(message.content)
        base: dict[str, Any] = {
            "platform": PLATFORM, "conversation_key": key, "user": user,
            "platform_message_id": str(message.id), "sent_at": message.created_at,
        }
        if not text:
            if message.attachments or message.stickers:
                return Inbound(text="", kind=Kind.ATTACHMENT,
                               payload=self._attachment_kind(message), **base)
            return None
        match = re.match(r"^[/!](\w+)\b\s*(.*)$", text, re.DOTALL)
        if match and match[1].lower() in CUSTOMER_COMMANDS:
            return Inbound(text=match[2].strip(), kind=Kind.COMMAND,
                           payload=match[1].lower(), **base)
        return Inbound(text=text, **base)

    async def on_message(self, message: discord.Message) -> None:
        if self._stopping or message.author.bot or not self._seen.add(("message", message.id)):
            return
        self.busy(+1)
        try:
            await self._handle_message(message)
        finally:
            self.busy(-1)

    async def _handle_message(self, message: discord.Message) -> None:
        if self._is_operator_room(message.channel):
            await self._operator_message(message)
            return
        key = await self._customer_key(message)
        if key is None:
            return
        inbound = self._inbound(message, key)
        if inbound is None:
            return
        self._last_inbound.add(key, message.id)
        try:
            accepted = await self.pipeline.submit(inbound)
        except Exception:
            # Not stored: forget we saw it and ask for it again rather than drop it silently.
            self._seen.discard(("message", message.id))
            log.exception("discord: could not accept message %s", message.id)
            try:
                await self.send(key, "Sorry, I could not take that message just now. "
                                     "Please send it again.")
            except Exception:
                log.exception("discord: could not ask for message %s again", message.id)
            return
        if not accepted:
            log.info("discord: message %s was delivered before; ignored", message.id)

    def _key_for_channel(self, channel_id: int, guild_id: int | None, user_id: int) -> str:
        channel = self.client.get_channel(channel_id)
        if guild_id is None or isinstance(channel, discord.Thread):
            return conversation_key(channel_id)
        return conversation_key(channel_id, user_id)

    async def on_reaction(self, payload: discord.RawReactionActionEvent) -> None:
        me = self.client.user
        if self._stopping or me is None or payload.user_id == me.id:
            return
        owner = self._sent.get(payload.message_id)
        if owner is None and payload.message_author_id != me.id:
            return
        key = owner or self._key_for_channel(payload.channel_id, payload.guild_id,
                                             payload.user_id)
        member = payload.member or self.client.get_user(payload.user_id)
        name = member.display_name if member is not None else ""
        emoji = str(payload.emoji)
        await self.pipeline.submit(Inbound(
            platform=PLATFORM, conversation_key=key,
            user=User(PLATFORM, str(payload.user_id), name),
            platform_message_id=f"reaction:{payload.message_id}:{payload.user_id}:{emoji}",
            text=str(payload.message_id), kind=Kind.REACTION, payload=emoji,
        ))

    async def suggestion_clicked(self, interaction: discord.Interaction, suggestion_id: str,
                                 label: str) -> None:
        """Acknowledge at once (Discord allows 3 s), then log the click."""
        known = self._suggestions.get(suggestion_id)
        if known is None and (described := self.pipeline.describe(suggestion_id)):
            known = (described.title, described.url)
        title = known[0] if known else label or suggestion_id
        url = known[1] if known else ""
        text = f"**{discord.utils.escape_markdown(title)}**" + (f"\n<{url}>" if url else "")
        await interaction.response.send_message(text, ephemeral=True,
                                                allowed_mentions=NO_MENTIONS)
        user = interaction.user
        channel_id = interaction.channel_id or 0
        key = self._key_for_channel(channel_id, interaction.guild_id, user.id)
        await self.pipeline.submit(Inbound(
            platform=PLATFORM, conversation_key=key,
            user=User(PLATFORM, str(user.id), user.display_name),
            platform_message_id=f"interaction:{interaction.id}", text=title,
            kind=Kind.SUGGESTION_CLICK, payload=suggestion_id,
        ))

    # -- customer side: sending ------------------------------------------------------

    def render(self, reply: Reply) -> list[str]:
        text = escape_model_markdown(reply.text.strip())
        if reply.citations:
            sources = ", ".join(source_link(c.title, c.url) for c in reply.citations)
            text += f"\n-# Sources: {sources}"
        return split_message(text) or ["…"]

    def suggestion_view(self, reply: Reply) -> discord.ui.View | None:
        items = [s for s in reply.suggestions
                 if 0 < len(s.id) <= 94 and "\n" not in s.id][:25]
        if not items:
            return None
        view = discord.ui.View(timeout=None)
        for s in items:
            self._suggestions.add(s.id, (s.title, s.url))
            view.add_item(SuggestionButton(s.id, s.title))
        return view

    async def with_retries(self, request: Callable[[], Awaitable[T]]) -> T:
        """A REST write that survives a passing server error.

        429s and 500/502/504/524 are retried inside discord.py; a 5xx it raises at once
        (503) is retried here with backoff. What still fails is raised, so the pipeline
        marks the message failed and the operator is told: nothing is dropped silently.
        """
        for attempt in range(SEND_RETRIES + 1):
            try:
                return await request()
            except discord.DiscordServerError as exc:
                if attempt == SEND_RETRIES or exc.status in _LIBRARY_RETRIED:
                    raise
                delay = min(4.0, 0.25 * 2**attempt)
                log.warning("discord: server error %s; retrying in %.2fs", exc.status, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def remember_sent(self, message_id: int, key: str) -> None:
        self._sent.add(message_id, key)

    async def send(self, key: str, text: str, view: discord.ui.View | None = None, *,
                   track: bool = True) -> discord.Message:
        """One message into a conversation; in a shared channel it replies to the customer."""
        channel = self.client.get_partial_messageable(channel_of(key))
        options: dict[str, Any] = {"allowed_mentions": NO_MENTIONS}
        if view is not None:
            options["view"] = view
        if ":" in key:
            last = self._last_inbound.get(key)
            if last is not None:
                options["reference"] = discord.MessageReference(
                    message_id=last, channel_id=channel.id, fail_if_not_exists=False)
                options["mention_author"] = False
        message = await self.with_retries(lambda: channel.send(text, **options))
        if track:
            self.remember_sent(message.id, key)
        return message

    async def keep_typing(self, key: str) -> None:
        """Discord shows typing for ~10 s per request; repeat until cancelled."""
        channel = self.client.get_partial_messageable(channel_of(key))
        while True:
            try:
                await channel.typing()
            except Exception as exc:  # typing is cosmetic; never let it break a reply
                log.debug("discord: typing in %s failed: %r", key, exc)
            await asyncio.sleep(self.settings.typing_interval_s)

    def open_reply(self, conversation_key: str) -> ReplyStream:
        return DiscordReplyStream(self, conversation_key)

    async def deliver(self, conversation_key: str, reply: Reply) -> str:
        chunks = self.render(reply)
        view = self.suggestion_view(reply)
        message: discord.Message | None = None
        self.busy(+1)
        try:
            for i, chunk in enumerate(chunks):
                last = i == len(chunks) - 1
                message = await self.send(conversation_key, chunk, view if last else None)
        finally:
            self.busy(-1)
        assert message is not None
        return str(message.id)

    async def transcript(self, conversation_id: int, limit: int = 6) -> list[tuple[str, str]]:
        """The last lines of a conversation for the operator's summary."""
        try:
            lines = await self.pipeline.store.transcript(conversation_id, limit)
        except Exception:
            log.exception("discord: transcript of conversation %s unavailable", conversation_id)
            return []
        names = {"in": "Customer", Sender.BOT.value: "Bot", Sender.OPERATOR.value: "Operator",
                 Sender.SYSTEM.value: "Notice"}
        return [(names["in"] if line.direction == "in" else names.get(line.sender, line.sender),
                 line.text or "") for line in lines if line.text]

    # -- operator side ---------------------------------------------------------------

    def _is_operator(self, member: Any) -> bool:
        role = self.settings.operator_role_id
        return bool(role) and isinstance(member, discord.Member) and \
            member.get_role(role) is not None

    @staticmethod
    def _operator(member: discord.abc.User) -> Operator:
        return Operator(PLATFORM, str(member.id), member.display_name)

    async def _operator_message(self, message: discord.Message) -> None:
        thread = message.channel
        ticket_id = self.operator_channel.ticket_of_thread(thread)
        if ticket_id is None:
            return
        if not self._is_operator(message.author):
            await message.reply(OPERATOR_REFUSAL, allowed_mentions=NO_MENTIONS,
                                mention_author=False)
            return
        text = message.clean_content.strip()  # mentions as names: customers see no <@ids>
        match = re.match(r"^[/!](claim|resolve|bot)\b\s*(.*)$", text, re.DOTALL)
        operator = self._operator(message.author)
        if match:
            outcome = await self._operator_action(ticket_id, operator, match[1], match[2])
            if outcome is not None:
                await message.reply(outcome, allowed_mentions=NO_MENTIONS, mention_author=False)
            return
        if not text:
            await message.reply("Only text is relayed to the customer.",
                                allowed_mentions=NO_MENTIONS, mention_author=False)
            return
        outcome = await self._desk_call(lambda: self.pipeline.operators.reply(
            ticket_id, operator, text))
        if outcome is None:
            with contextlib.suppress(discord.HTTPException):
                await message.add_reaction("✅")
        else:
            await message.reply(outcome, allowed_mentions=NO_MENTIONS, mention_author=False)

    async def _desk_call(self, call: Callable[[], Awaitable[Any]]) -> str | None:
        """Run a desk action; its refusal (OperatorError) becomes the operator's answer."""
        try:
            await call()
        except OperatorError as exc:
            return f"Could not do that: {exc}"
        except StoreError:
            # Part of it may have happened (the customer may have the answer already).
            log.exception("discord: operator action failed")
            return ACTION_FAILED_TEXT
        except Exception as exc:  # the customer's platform failed: say so, never drop it
            log.exception("discord: operator action failed")
            return f"Could not deliver that to the customer ({type(exc).__name__}); try again."
        return None

    async def _operator_action(self, ticket_id: int, operator: Operator, action: str,
                               argument: str) -> str | None:
        desk = self.pipeline.operators
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "claim": lambda: desk.claim(ticket_id, operator),
            "resolve": lambda: desk.resolve(ticket_id, operator, argument.strip()),
            "bot": lambda: desk.hand_back(ticket_id, operator),
        }
        return await self._desk_call(calls[action])

    def _register_operator_commands(self) -> None:
        tree = self.client.tree

        async def run(interaction: discord.Interaction, action: str, argument: str = "") -> None:
            channel = interaction.channel
            ticket_id = (self.operator_channel.ticket_of_thread(channel)
                         if self._is_operator_room(channel) else None)
            if ticket_id is None:
                await interaction.response.send_message(
                    "Use this command inside a ticket thread.", ephemeral=True)
                return
            if not self._is_operator(interaction.user):
                await interaction.response.send_message(OPERATOR_REFUSAL, ephemeral=True)
                return
            await interaction.response.defer(ephemeral=True, thinking=True)
            outcome = await self._operator_action(
                ticket_id, self._operator(interaction.user), action, argument)
            await interaction.followup.send(outcome or "Done.", ephemeral=True,
                                            allowed_mentions=NO_MENTIONS)

        async def claim(interaction: discord.Interaction) -> None:
            await run(interaction, "claim")

        async def resolve(interaction: discord.Interaction, note: str = "") -> None:
            await run(interaction, "resolve", note)

        async def bot(interaction: discord.Interaction) -> None:
            await run(interaction, "bot")

        tree.add_command(app_commands.Command(
            name="claim", description="Take this ticket", callback=claim))
        tree.add_command(app_commands.Command(
            name="resolve", description="Close this ticket", callback=resolve))
        tree.add_command(app_commands.Command(
            name="bot", description="Hand the conversation back to the bot", callback=bot))
