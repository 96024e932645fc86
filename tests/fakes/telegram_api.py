"""A protocol-faithful fake of the Telegram Bot API, served over real HTTP on 127.0.0.1.

Tests and the load bench point the real python-telegram-bot at it through ``base_url``
(``http://127.0.0.1:<port>/bot``), so every request goes through PTB's own request code.
It speaks the Bot API's JSON shapes and error responses (status code, ``ok``,
``error_code``, ``description``, ``parameters.retry_after``), validates what it receives
the way Telegram does (HTML entities, 4096 characters after entity parsing, unknown
chats, unchanged edits, forum threads, callback-query ids) and records every call.

Tests play the users: :meth:`FakeTelegram.send_text` and friends queue updates that the
bot then receives by long polling (``getUpdates`` with offsets) or, after ``setWebhook``,
as webhook POSTs carrying ``X-Telegram-Bot-Api-Secret-Token``. Failures can be injected
(429 with ``retry_after``, 5xx; for every chat or one) to prove the client copes. Files
uploaded as ``multipart/form-data`` (``sendPhoto``) are kept byte for byte: a photo must be
a PNG or JPEG of at most 10 MB, width + height at most 10,000 and a side ratio of at most
20, as the Bot API documents; :meth:`FakeTelegram.photo_bytes` returns what was sent.

Known deviations, all deliberate: ``setWebhook`` accepts ``http://`` URLs on loopback
hosts (the fake stands in for the TLS-terminating proxy in front of the bot); only the
HTML parse mode is implemented; webhook delivery uses one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import ClientError, ClientSession, ClientTimeout, web

__all__ = [
    "ApiError", "Call", "FakeTelegram", "SentMessage", "TgChat", "TgUser", "Upload", "parse_html",
]

DEFAULT_TOKEN = "123456:TEST-token_for-the-fake"
MAX_TEXT = 4096
MAX_CALLBACK_DATA = 64
MAX_CAPTION = 1024
MAX_PHOTO_BYTES = 10 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHAT_ACTIONS = frozenset({
    "typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
    "upload_document", "choose_sticker", "find_location", "record_video_note",
    "upload_video_note",
})
UPDATE_TYPES = frozenset({
    "message", "edited_message", "channel_post", "edited_channel_post", "business_connection",
    "business_message", "edited_business_message", "deleted_business_messages",
    "message_reaction", "message_reaction_count", "inline_query", "chosen_inline_result",
    "callback_query", "shipping_query", "pre_checkout_query", "purchased_paid_media", "poll",
    "poll_answer", "my_chat_member", "chat_member", "chat_join_request", "chat_boost",
    "removed_chat_boost",
})
# "Specify an empty list to receive all update types except chat_member, message_reaction,
# and message_reaction_count (default)."
DEFAULT_EXCLUDED = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup "
    "are exactly the same as a current content and reply markup of the message"
)
_COMMAND_RE = re.compile(r"/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?")
_MENTION_RE = re.compile(r"@[A-Za-z0-9_]{5,32}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")
_BOT_COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")


class ApiError(Exception):
    """An error response, shaped exactly as the Bot API sends it."""

    def __init__(self, status: int, description: str, parameters: dict[str, Any] | None = None):
        super().__init__(description)
        self.status = status
        self.description = description
        self.parameters = parameters

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ok": False, "error_code": self.status, "description": self.description,
        }
        if self.parameters:
            body["parameters"] = self.parameters
        return body


def _bad(description: str) -> ApiError:
    return ApiError(400, f"Bad Request: {description}")


def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an uploaded photo, refused the way the Bot API refuses it."""
    if len(data) > MAX_PHOTO_BYTES:
        raise _bad("file is too big")
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    elif data.startswith(b"\xff\xd8\xff"):
        return 800, 600  # a JPEG; the fake does not read its dimensions
    else:
        raise _bad("IMAGE_PROCESS_FAILED")
    if not width or not height or width + height > 10_000 or max(
            width / height, height / width) > 20:
        raise _bad("PHOTO_INVALID_DIMENSIONS")
    return width, height


@dataclass(frozen=True, slots=True)
class Call:
    """One request the fake received and what it answered."""

    method: str
    params: dict[str, Any]
    status: int
    response: dict[str, Any]
    at: float

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def result(self) -> Any:
        return self.response.get("result")


@dataclass(frozen=True, slots=True)
class Upload:
    """A file part of a ``multipart/form-data`` request, as received."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class TgUser:
    id: int
    first_name: str
    username: str | None = None
    last_name: str | None = None
    is_bot: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id, "is_bot": self.is_bot, "first_name": self.first_name,
        }
        if self.last_name:
            data["last_name"] = self.last_name
        if self.username:
            data["username"] = self.username
        if not self.is_bot:
            data["language_code"] = "en"
        return data


@dataclass(frozen=True, slots=True)
class TgChat:
    id: int
    type: str
    title: str | None = None
    is_forum: bool = False
    user: TgUser | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.type == "private" and self.user is not None:
            data["first_name"] = self.user.first_name
            if self.user.last_name:
                data["last_name"] = self.user.last_name
            if self.user.username:
                data["username"] = self.user.username
        else:
            data["title"] = self.title or ""
        if self.is_forum:
            data["is_forum"] = True
        return data


@dataclass(frozen=True, slots=True)
class SentMessage:
    """A bot message as the user sees it now (text after entity parsing, buttons, edits)."""

    chat_id: int
    message_id: int
    text: str
    entities: tuple[dict[str, Any], ...]
    buttons: tuple[tuple[str, str], ...]
    """(label, callback_data or url) for each inline button, row by row."""
    thread_id: int | None
    edits: int
    kind: str

    @property
    def key(self) -> str:
        return f"{self.chat_id}:{self.message_id}"


# --- HTML parse mode ------------------------------------------------------------------

_TAG_ENTITY = {
    "b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline",
    "ins": "underline", "s": "strikethrough", "strike": "strikethrough",
    "del": "strikethrough", "tg-spoiler": "spoiler", "span": "spoiler", "a": "text_link",
    "code": "code", "pre": "pre", "blockquote": "blockquote", "tg-emoji": "custom_emoji",
}
_NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_ATTR_RE = re.compile(
    r"""\s*([a-zA-Z-]+)\s*(?:=\s*(?:"([^"]*)"|'([^']*)'|([^\s>"']+)))?"""
)


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _decode_entity(src: str, i: int) -> tuple[str, int] | None:
    """``&name;`` or ``&#N;``/``&#xN;`` at ``i``; None leaves a bare ``&`` as text."""
    end = src.find(";", i + 1, i + 12)
    if end == -1:
        return None
    name = src[i + 1 : end]
    if name in _NAMED_ENTITIES:
        return _NAMED_ENTITIES[name], end + 1 - i
    try:
        if name.startswith(("#x", "#X")):
            return chr(int(name[2:], 16)), end + 1 - i
        if name.startswith("#"):
            return chr(int(name[1:])), end + 1 - i
    except (ValueError, OverflowError):
        return None
    return None


def parse_html(src: str) -> tuple[str, list[dict[str, Any]]]:
    """Telegram's HTML parse mode: plain text and entities, or ``ApiError`` as Telegram words it."""
    out: list[str] = []
    pos16 = 0
    stack: list[tuple[str, int, dict[str, str]]] = []
    entities: list[dict[str, Any]] = []
    i = 0
    n = len(src)

    def fail(message: str) -> ApiError:
        return _bad(f"can't parse entities: {message}")

    while i < n:
        ch = src[i]
        if ch == "&":
            decoded = _decode_entity(src, i)
            text, step = decoded if decoded else ("&", 1)
            out.append(text)
            pos16 += _utf16_len(text)
            i += step
            continue
        if ch != "<":
            out.append(ch)
            pos16 += _utf16_len(ch)
            i += 1
            continue
        offset = len(src[:i].encode())
        if src.startswith("</", i):
            end = src.find(">", i)
            if end == -1:
                raise fail(f"Unclosed end tag at byte offset {offset}")
            name = src[i + 2 : end].strip().lower()
            if not stack:
                raise fail(f"Unexpected end tag at byte offset {offset}")
            open_name, start16, attrs = stack.pop()
            if name != open_name:
                raise fail(
                    f'Unmatched end tag at byte offset {offset}, expected "</{open_name}>", '
                    f'found "</{name}>"'
                )
            if pos16 > start16:
                entity: dict[str, Any] = {
                    "type": _TAG_ENTITY[open_name], "offset": start16, "length": pos16 - start16,
                }
                if open_name == "a":
                    if not attrs.get("href"):
                        entity = {}
                    else:
                        entity["url"] = attrs["href"]
                if entity:
                    entities.append(entity)
            i = end + 1
            continue
        j = i + 1
        while j < n and (src[j].isalnum() or src[j] == "-"):
            j += 1
        name = src[i + 1 : j].lower()
        if name not in _TAG_ENTITY:
            raise fail(f'Unsupported start tag "{name}" at byte offset {offset}')
        end = src.find(">", j)
        if end == -1:
            raise fail(f"Unclosed start tag at byte offset {offset}")
        attrs: dict[str, str] = {}
        for match in _ATTR_RE.finditer(src[j:end]):
            if match.group(1):
                value = next((g for g in match.groups()[1:] if g is not None), "")
                attrs[match.group(1).lower()] = value
        if name == "span" and attrs.get("class") != "tg-spoiler":
            raise fail(f'Unsupported start tag "span" at byte offset {offset}')
        stack.append((name, pos16, attrs))
        i = end + 1
    if stack:
        raise fail(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    return "".join(out), sorted(entities, key=lambda e: (e["offset"], -e["length"]))


def _strip(text: str, entities: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Telegram trims surrounding whitespace; entities move with the text."""
    lead = _utf16_len(text) - _utf16_len(text.lstrip())
    stripped = text.strip()
    total = _utf16_len(stripped)
    kept = []
    for entity in entities:
        start = max(entity["offset"] - lead, 0)
        stop = min(entity["offset"] + entity["length"] - lead, total)
        if stop > start:
            kept.append({**entity, "offset": start, "length": stop - start})
    return stripped, kept


# --- parameters ------------------------------------------------------------------------


class _Params:
    """Request parameters with Telegram's coercions (form strings, JSON-encoded objects)."""

    __slots__ = ("raw",)

    def __init__(self, raw: dict[str, Any]):
        self.raw = raw

    def has(self, name: str) -> bool:
        return self.raw.get(name) not in (None, "")

    def str(self, name: str, *, required: str | None = None) -> str | None:
        value = self.raw.get(name)
        if value is None or value == "":
            if required:
                raise _bad(required)
            return None
        return value if isinstance(value, str) else json.dumps(value)

    def int(self, name: str, *, required: str | None = None) -> int | None:
        value = self.raw.get(name)
        if value is None or value == "":
            if required:
                raise _bad(required)
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise _bad(f"invalid {name} specified") from None

    def bool(self, name: str) -> bool:
        value = self.raw.get(name)
        if isinstance(value, bool):
            return value
        return str(value).lower() in {"true", "1"}

    def json(self, name: str) -> Any:
        value = self.raw.get(name)
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise _bad(f"can't parse {name} JSON object") from None
        return value


# --- the server ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Webhook:
    url: str
    secret: str | None
    max_connections: int
    last_error: str | None = None
    last_error_date: int | None = None


@dataclass(slots=True)
class _Injection:
    method: str
    status: int
    retry_after: int | None
    times: int
    description: str | None
    chat_id: int | None = None


@dataclass(slots=True)
class _State:
    """Everything the server knows; mutated only by the handlers and the test helpers."""

    chats: dict[int, TgChat] = field(default_factory=dict)
    next_message_id: dict[int, int] = field(default_factory=dict)
    messages: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    edits: dict[tuple[int, int], int] = field(default_factory=dict)
    topics: dict[tuple[int, int], str] = field(default_factory=dict)
    pending: list[dict[str, Any]] = field(default_factory=list)
    history: dict[int, dict[str, Any]] = field(default_factory=dict)
    allowed_updates: frozenset[str] = UPDATE_TYPES - DEFAULT_EXCLUDED
    open_callbacks: dict[str, int] = field(default_factory=dict)
    answered_callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    commands: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    webhook: _Webhook | None = None
    dropped: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)


class FakeTelegram:
    """The fake Bot API server. ``async with FakeTelegram() as tg: ...`` or start()/close()."""

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        *,
        bot_username: str = "support_test_bot",
        first_update_id: int = 700_000,
        webhook_retry_s: float = 0.2,
    ):
        self.token = token
        bot_id = int(token.split(":", 1)[0])
        self.bot = TgUser(bot_id, "Support", username=bot_username, is_bot=True)
        self.calls: list[Call] = []
        self.webhook_deliveries: list[tuple[int, int]] = []
        """(update_id, HTTP status or 0 for a connection error) per webhook POST."""
        self._state = _State()
        self._update_ids = itertools.count(first_update_id)
        self._callback_ids = itertools.count(4_000_000_000_000)
        self._injections: list[_Injection] = []
        self._changed = asyncio.Condition()
        self._poll_generation = 0
        self._webhook_retry_s = webhook_retry_s
        self._webhook_task: asyncio.Task[None] | None = None
        self._webhook_wakeup = asyncio.Event()
        self._client: ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.port = 0

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> FakeTelegram:
        app = web.Application(client_max_size=60 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_route("GET", "/file/bot{token}/{path:.+}", self._file)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        self._client = ClientSession(timeout=ClientTimeout(total=10))
        return self

    async def close(self) -> None:
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
        if self._webhook_task:
            self._webhook_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._webhook_task
        if self._client:
            await self._client.close()
        if self._runner:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeTelegram:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # --- the test's side: chats and users ----------------------------------------------

    def user(self, user_id: int, first_name: str = "Ann", username: str | None = None,
             last_name: str | None = None) -> TgUser:
        """A person; their private chat with the bot exists from now on (they pressed Start)."""
        person = TgUser(user_id, first_name, username=username, last_name=last_name)
        self._state.chats.setdefault(user_id, TgChat(user_id, "private", user=person))
        return person

    def group(self, chat_id: int, title: str = "A group", *, forum: bool = False) -> TgChat:
        """A supergroup the bot is a member (and admin) of; ``forum`` enables topics."""
        if chat_id >= 0:
            raise ValueError("group chat ids are negative")
        chat = TgChat(chat_id, "supergroup", title=title, is_forum=forum)
        self._state.chats[chat_id] = chat
        return chat

    def chat(self, chat_id: int) -> TgChat:
        return self._state.chats[chat_id]

    # --- the test's side: updates --------------------------------------------------------

    def send_text(self, chat_id: int, sender: TgUser, text: str, *,
                  thread_id: int | None = None, reply_to: int | None = None,
                  queue: bool = True) -> dict[str, Any]:
        """The user writes ``text``; bot commands and @mentions get their entities.
        ``queue=False``: the update is only returned, for a test that POSTs it itself."""
        entities = []
        command = _COMMAND_RE.match(text)
        if command:
            entities.append({"type": "bot_command", "offset": 0,
                             "length": _utf16_len(command.group())})
        for mention in _MENTION_RE.finditer(text):
            entities.append({"type": "mention", "offset": _utf16_len(text[: mention.start()]),
                             "length": _utf16_len(mention.group())})
        extra: dict[str, Any] = {"text": text}
        if entities:
            extra["entities"] = entities
        return self.send_message(chat_id, sender, extra, thread_id=thread_id, reply_to=reply_to,
                                 queue=queue)

    def send_message(self, chat_id: int, sender: TgUser, content: dict[str, Any], *,
                     thread_id: int | None = None, reply_to: int | None = None,
                     queue: bool = True) -> dict[str, Any]:
        """Any user message; ``content`` holds its fields (``sticker``, ``photo``, ``caption``)."""
        chat = self._state.chats[chat_id]
        message = self._new_message(chat, sender, content, thread_id=thread_id)
        if reply_to is not None:
            message["reply_to_message"] = self._state.messages[(chat_id, reply_to)]
        return self.push_update({"message": message}, queue=queue)

    def send_sticker(self, chat_id: int, sender: TgUser, emoji: str = "👍") -> dict[str, Any]:
        sticker = {"file_id": f"CAACAgI{next(self._callback_ids)}", "file_unique_id": "AgADsticker",
                   "type": "regular", "width": 512, "height": 512, "is_animated": False,
                   "is_video": False, "emoji": emoji}
        return self.send_message(chat_id, sender, {"sticker": sticker})

    def send_photo(self, chat_id: int, sender: TgUser, caption: str = "") -> dict[str, Any]:
        sizes = [{"file_id": f"AgACAgI{next(self._callback_ids)}{w}", "file_unique_id": f"AQ{w}",
                  "width": w, "height": w, "file_size": w * 40} for w in (90, 320, 800)]
        content: dict[str, Any] = {"photo": sizes}
        if caption:
            content["caption"] = caption
        return self.send_message(chat_id, sender, content)

    def send_voice(self, chat_id: int, sender: TgUser, duration: int = 3) -> dict[str, Any]:
        voice = {"file_id": f"AwACAgI{next(self._callback_ids)}", "file_unique_id": "AgADvoice",
                 "duration": duration, "mime_type": "audio/ogg", "file_size": 4000}
        return self.send_message(chat_id, sender, {"voice": voice})

    def send_document(self, chat_id: int, sender: TgUser, file_name: str = "invoice.pdf"
                      ) -> dict[str, Any]:
        document = {"file_id": f"BQACAgI{next(self._callback_ids)}",
                    "file_unique_id": "AgADdoc", "file_name": file_name,
                    "mime_type": "application/pdf", "file_size": 12000}
        return self.send_message(chat_id, sender, {"document": document})

    def press_button(self, chat_id: int, sender: TgUser, message_id: int, data: str,
                     *, queue: bool = True) -> dict[str, Any]:
        """The user presses an inline button carrying ``data`` under a bot message."""
        message = self._state.messages[(chat_id, message_id)]
        buttons = [b.get("callback_data") for row in
                   (message.get("reply_markup") or {}).get("inline_keyboard", []) for b in row]
        if data not in buttons:
            raise ValueError(f"message {message_id} has no button with data {data!r}")
        query_id = str(next(self._callback_ids))
        self._state.open_callbacks[query_id] = chat_id
        return self.push_update({"callback_query": {
            "id": query_id, "from": sender.to_json(), "message": message,
            "chat_instance": f"-{abs(chat_id) * 7919}", "data": data,
        }}, queue=queue)

    def react(self, chat_id: int, sender: TgUser, message_id: int, emoji: str,
              old: Iterable[str] = ()) -> dict[str, Any] | None:
        """The user sets a reaction; dropped unless the bot asked for ``message_reaction``."""
        if (chat_id, message_id) not in self._state.messages:
            raise ValueError(f"no message {message_id} in chat {chat_id}")
        new = [{"type": "emoji", "emoji": emoji}] if emoji else []
        return self.push_update({"message_reaction": {
            "chat": self._state.chats[chat_id].to_json(), "message_id": message_id,
            "user": sender.to_json(), "date": int(time.time()),
            "old_reaction": [{"type": "emoji", "emoji": e} for e in old],
            "new_reaction": new,
        }})

    def push_update(self, body: dict[str, Any], *, queue: bool = True) -> dict[str, Any]:
        """Queue a raw update (one field besides ``update_id``); returns it with its id."""
        (kind,) = body.keys()
        if kind not in UPDATE_TYPES:
            raise ValueError(f"not an update type: {kind}")
        update = {"update_id": next(self._update_ids), **body}
        self._state.history[update["update_id"]] = update
        if not queue:
            return update
        if kind not in self._state.allowed_updates:
            self._state.dropped.append(update)
            return update
        self._state.pending.append(update)
        self._changed_now()
        return update

    def redeliver(self, update_id: int) -> None:
        """Serve an update again, as Telegram does when its confirmation was lost.

        By long polling the copy is served to a client that has not confirmed past it (a
        restarted bot starts at offset 0); a webhook gets it POSTed again.
        """
        update = self._state.history[update_id]
        self._state.pending.append(update)
        self._state.pending.sort(key=lambda u: u["update_id"])
        self._changed_now()

    # --- the test's side: failures -------------------------------------------------------

    def inject(self, method: str, status: int = 429, *, times: int = 1,
               retry_after: int | None = None, description: str | None = None,
               chat_id: int | None = None) -> None:
        """The next ``times`` calls of ``method`` (into ``chat_id`` only, when given) fail
        with ``status`` (429 needs retry_after)."""
        if status == 429 and retry_after is None:
            retry_after = 1
        self._injections.append(
            _Injection(method.lower(), status, retry_after, times, description, chat_id))

    # --- the test's side: inspection ------------------------------------------------------

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method.lower() == method.lower()]

    def bot_messages(self, chat_id: int, thread_id: int | None = None) -> list[SentMessage]:
        """What the bot shows in a chat (or one forum topic) now, oldest first."""
        found = []
        for (cid, _mid), message in sorted(self._state.messages.items()):
            if cid != chat_id or message.get("from", {}).get("id") != self.bot.id:
                continue
            if "forum_topic_created" in message:
                continue
            if thread_id is not None and message.get("message_thread_id") != thread_id:
                continue
            found.append(self._view(message))
        return found

    def message(self, chat_id: int, message_id: int) -> SentMessage:
        return self._view(self._state.messages[(chat_id, message_id)])

    def photo_bytes(self, chat_id: int, message_id: int) -> bytes:
        """The bytes of the largest size of a photo the bot uploaded."""
        message = self._state.messages[(chat_id, message_id)]
        return self._state.files[message["photo"][-1]["file_id"]]

    def uploads(self, method: str) -> list[Upload]:
        """Every file part received by ``method``, in order (failed calls included)."""
        return [v for c in self.calls_to(method) for v in c.params.values()
                if isinstance(v, Upload)]

    def topics(self, chat_id: int) -> dict[int, str]:
        """Forum topics of a chat: thread id -> name."""
        return {tid: name for (cid, tid), name in self._state.topics.items() if cid == chat_id}

    def callback_answer(self, query_id: str) -> dict[str, Any] | None:
        return self._state.answered_callbacks.get(query_id)

    @property
    def pending(self) -> list[dict[str, Any]]:
        return list(self._state.pending)

    @property
    def dropped(self) -> list[dict[str, Any]]:
        """Updates the bot never gets because ``allowed_updates`` excluded their type."""
        return list(self._state.dropped)

    @property
    def webhook_url(self) -> str | None:
        return self._state.webhook.url if self._state.webhook else None

    @property
    def commands(self) -> dict[str, list[dict[str, Any]]]:
        """``setMyCommands`` lists by scope (JSON of the scope, ``default`` when unset)."""
        return dict(self._state.commands)

    async def wait_for(self, predicate: Callable[[], Any], within: float = 5.0) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked after each call and update)."""
        async def watch() -> Any:
            async with self._changed:
                while not (value := predicate()):
                    await self._changed.wait()
                return value

        try:
            return await asyncio.wait_for(watch(), within)
        except TimeoutError:
            raise AssertionError(f"condition not met within {within}s") from None

    # --- internals -----------------------------------------------------------------------

    def _changed_now(self) -> None:
        self._webhook_wakeup.set()

        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(notify())

    def _view(self, message: dict[str, Any]) -> SentMessage:
        markup = message.get("reply_markup") or {}
        buttons = tuple(
            (b["text"], b.get("callback_data") or b.get("url") or "")
            for row in markup.get("inline_keyboard", []) for b in row
        )
        kind = "photo" if "photo" in message else "text"
        key = (message["chat"]["id"], message["message_id"])
        return SentMessage(
            chat_id=key[0], message_id=key[1],
            text=message.get("text", message.get("caption", "")),
            entities=tuple(message.get("entities", message.get("caption_entities", []))),
            buttons=buttons, thread_id=message.get("message_thread_id"),
            edits=self._state.edits.get(key, 0), kind=kind,
        )

    def _new_message(self, chat: TgChat, sender: TgUser, content: dict[str, Any], *,
                     thread_id: int | None) -> dict[str, Any]:
        message_id = self._state.next_message_id.get(chat.id, 1)
        self._state.next_message_id[chat.id] = message_id + 1
        message: dict[str, Any] = {
            "message_id": message_id, "from": sender.to_json(), "chat": chat.to_json(),
            "date": int(time.time()),
        }
        if thread_id is not None:
            if (chat.id, thread_id) not in self._state.topics:
                raise _bad("message thread not found")
            message["message_thread_id"] = thread_id
            message["is_topic_message"] = True
            message["reply_to_message"] = self._state.messages[(chat.id, thread_id)]
        message.update(content)
        self._state.messages[(chat.id, message_id)] = message
        return message

    def _chat_of(self, params: _Params) -> TgChat:
        raw = params.raw.get("chat_id")
        if raw is None or raw == "":
            raise _bad("chat_id is empty")
        try:
            chat_id = int(raw)
        except (TypeError, ValueError):
            raise _bad("chat not found") from None
        chat = self._state.chats.get(chat_id)
        if chat is None:
            raise _bad("chat not found")
        return chat

    def _thread_of(self, chat: TgChat, params: _Params) -> int | None:
        thread_id = params.int("message_thread_id")
        if thread_id is None:
            return None
        if not chat.is_forum or (chat.id, thread_id) not in self._state.topics:
            raise _bad("message thread not found")
        return thread_id

    @staticmethod
    def _formatted(params: _Params, text_field: str, *, required: bool
                   ) -> tuple[str, list[dict[str, Any]]]:
        source = params.str(text_field) or ""
        mode = (params.str("parse_mode") or "").lower()
        if mode == "html":
            text, entities = parse_html(source)
        elif mode == "":
            text, entities = source, list(params.json("entities") or [])
        elif mode in {"markdown", "markdownv2"}:
            raise _bad(f"the fake implements only HTML, not {mode}")
        else:
            raise _bad(f"unsupported parse_mode {params.str('parse_mode')}")
        text, entities = _strip(text, entities)
        if required and not text:
            raise _bad("message text is empty")
        return text, entities

    @staticmethod
    def _markup(params: _Params) -> dict[str, Any] | None:
        markup = params.json("reply_markup")
        if markup is None:
            return None
        if not isinstance(markup, dict):
            raise _bad("can't parse reply keyboard markup JSON object")
        rows = markup.get("inline_keyboard")
        if rows is None:
            return markup
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise _bad("field \"inline_keyboard\" of the InlineKeyboardMarkup must be an Array")
        for row in rows:
            for button in row:
                if not isinstance(button, dict) or not button.get("text"):
                    raise _bad("text buttons are unallowed in the inline keyboard")
                data = button.get("callback_data")
                url = button.get("url")
                if data is None and url is None:
                    raise _bad("can't find field \"callback_data\"")
                if data is not None and not 1 <= len(data.encode()) <= MAX_CALLBACK_DATA:
                    raise _bad("BUTTON_DATA_INVALID")
                if url is not None and not re.match(r"(https?|tg)://\S+$", url):
                    raise _bad(f"inline keyboard button URL '{url}' is invalid: Wrong HTTP URL")
        return markup

    def _check_length(self, text: str) -> None:
        if _utf16_len(text) > MAX_TEXT:
            raise _bad("message is too long")

    # --- HTTP -----------------------------------------------------------------------------

    async def _read_params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.method != "POST" or not request.can_read_body:
            return params
        ctype = request.content_type
        if ctype == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise _bad("can't parse JSON object") from None
            if isinstance(body, dict):
                params.update(body)
        elif ctype == "multipart/form-data":
            reader = await request.multipart()
            parts: dict[str, Any] = {}
            async for part in reader:
                if part.filename:
                    data = bytes(await part.read())
                    parts[part.name or ""] = Upload(
                        part.name or "", part.filename,
                        part.headers.get("Content-Type", "application/octet-stream"), data)
                else:
                    parts[part.name or ""] = await part.text()
            # "attach://<name>" points a parameter at the file part of that name.
            for name, value in list(parts.items()):
                if isinstance(value, str) and value.startswith("attach://"):
                    target = parts.get(value.removeprefix("attach://"))
                    if not isinstance(target, Upload):
                        raise _bad(f"file {value} not found in the request")
                    parts[name] = target
            params.update(parts)
        else:
            params.update(dict(await request.post()))
        return params

    def _injected(self, method: str, params: dict[str, Any]) -> ApiError | None:
        for injection in self._injections:
            if injection.chat_id is not None and str(params.get("chat_id")) != str(
                    injection.chat_id):
                continue
            if injection.method == method.lower() and injection.times > 0:
                injection.times -= 1
                if injection.status == 429:
                    wait = injection.retry_after or 1
                    return ApiError(429, injection.description or
                                    f"Too Many Requests: retry after {wait}",
                                    {"retry_after": wait})
                return ApiError(injection.status, injection.description or
                                {500: "Internal Server Error", 502: "Bad Gateway",
                                 503: "Service Unavailable"}.get(injection.status, "Error"))
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        try:
            raw = await self._read_params(request)
        except ApiError as exc:
            return self._record(method, {}, exc.status, exc.body())
        except ConnectionResetError:
            return web.Response(status=499)  # the client hung up mid-request
        if request.match_info["token"] != self.token:
            return self._record(method, raw, 401,
                                {"ok": False, "error_code": 401, "description": "Unauthorized"})
        handler = getattr(self, f"_m_{method.lower()}", None)
        if handler is None:
            return self._record(method, raw, 404,
                                {"ok": False, "error_code": 404, "description": "Not Found"})
        injected = self._injected(method, raw)
        if injected is not None:
            return self._record(method, raw, injected.status, injected.body())
        try:
            result = await handler(_Params(raw))
        except ApiError as exc:
            return self._record(method, raw, exc.status, exc.body())
        return self._record(method, raw, 200, {"ok": True, "result": result})

    def _record(self, method: str, params: dict[str, Any], status: int,
                body: dict[str, Any]) -> web.Response:
        self.calls.append(Call(method, params, status, body, asyncio.get_running_loop().time()))
        self._changed_now()
        return web.json_response(body, status=status)

    async def _file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        return web.Response(body=b"fake file: " + request.match_info["path"].encode())

    # --- methods (``_m_<lowercase name>``; Bot API method names are case-insensitive) ----

    async def _m_getme(self, params: _Params) -> dict[str, Any]:
        return {**self.bot.to_json(), "can_join_groups": True,
                "can_read_all_group_messages": False, "supports_inline_queries": False,
                "can_connect_to_business": False, "has_main_web_app": False}

    async def _m_logout(self, params: _Params) -> bool:
        return True

    async def _m_getupdates(self, params: _Params) -> list[dict[str, Any]]:
        if self._state.webhook is not None:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                "use deleteWebhook to delete the webhook first")
        offset = params.int("offset") or 0
        limit = params.int("limit") or 100
        if not 1 <= limit <= 100:
            limit = 100
        timeout = min(max(params.int("timeout") or 0, 0), 50)
        allowed = params.json("allowed_updates")
        if allowed is not None:
            self._set_allowed(allowed)
        if offset > 0:
            self._state.pending = [u for u in self._state.pending if u["update_id"] >= offset]
        deadline = asyncio.get_running_loop().time() + timeout

        def ready() -> list[dict[str, Any]]:
            if offset < 0:
                return self._state.pending[offset:][:limit]
            return [u for u in self._state.pending if u["update_id"] >= offset][:limit]

        async with self._changed:
            self._poll_generation += 1
            generation = self._poll_generation
            self._changed.notify_all()
            while True:
                batch = ready()
                if batch or self._closing:
                    break
                if generation != self._poll_generation:
                    raise ApiError(409, "Conflict: terminated by other getUpdates request; make "
                                        "sure that only one bot instance is running")
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
        return batch

    def _set_allowed(self, allowed: Any) -> None:
        if not isinstance(allowed, list):
            raise _bad("can't parse allowed updates")
        unknown = [a for a in allowed if a not in UPDATE_TYPES]
        if unknown:
            raise _bad(f"unsupported update type {unknown[0]}")
        self._state.allowed_updates = (
            frozenset(allowed) if allowed else UPDATE_TYPES - DEFAULT_EXCLUDED
        )

    async def _m_setwebhook(self, params: _Params) -> bool:
        url = params.str("url") or ""
        if not url:
            return await self._m_deletewebhook(params)
        parts = urlsplit(url)
        loopback = parts.hostname in {"127.0.0.1", "localhost", "::1"}
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
            raise _bad("bad webhook: An HTTPS URL must be provided for webhook")
        secret = params.str("secret_token")
        if secret is not None and not _SECRET_RE.fullmatch(secret):
            raise _bad("bad webhook: secret token contains unallowed characters")
        allowed = params.json("allowed_updates")
        if allowed is not None:
            self._set_allowed(allowed)
        if params.bool("drop_pending_updates"):
            self._state.pending.clear()
        max_connections = params.int("max_connections") or 40
        self._state.webhook = _Webhook(url, secret, max_connections)
        if self._webhook_task is None or self._webhook_task.done():
            self._webhook_task = asyncio.get_running_loop().create_task(self._deliver_webhooks())
        self._webhook_wakeup.set()
        return True

    async def _m_deletewebhook(self, params: _Params) -> bool:
        self._state.webhook = None
        if params.bool("drop_pending_updates"):
            self._state.pending.clear()
        self._webhook_wakeup.set()
        return True

    async def _m_getwebhookinfo(self, params: _Params) -> dict[str, Any]:
        hook = self._state.webhook
        info: dict[str, Any] = {
            "url": hook.url if hook else "", "has_custom_certificate": False,
            "pending_update_count": len(self._state.pending),
        }
        if hook:
            info["max_connections"] = hook.max_connections
            info["allowed_updates"] = sorted(self._state.allowed_updates)
            if hook.last_error:
                info["last_error_date"] = hook.last_error_date
                info["last_error_message"] = hook.last_error
        return info

    async def _deliver_webhooks(self) -> None:
        """Telegram's side of a webhook: POST each update in order, retry until 2xx."""
        assert self._client is not None
        while not self._closing:
            hook = self._state.webhook
            if hook is None or not self._state.pending:
                self._webhook_wakeup.clear()
                await self._webhook_wakeup.wait()
                continue
            update = self._state.pending[0]
            headers = {"X-Telegram-Bot-Api-Secret-Token": hook.secret} if hook.secret else {}
            try:
                async with self._client.post(hook.url, json=update, headers=headers) as resp:
                    status = resp.status
                    reason = resp.reason
            except (OSError, ClientError, TimeoutError) as exc:
                status, reason = 0, f"Connection failed: {exc.__class__.__name__}"
            self.webhook_deliveries.append((update["update_id"], status))
            if 200 <= status < 300:
                with contextlib.suppress(ValueError):
                    self._state.pending.remove(update)
                self._changed_now()
                continue
            hook.last_error = (f"Wrong response from the webhook: {status} {reason}"
                               if status else reason)
            hook.last_error_date = int(time.time())
            self._changed_now()
            await asyncio.sleep(self._webhook_retry_s)

    async def _m_sendmessage(self, params: _Params) -> dict[str, Any]:
        chat = self._chat_of(params)
        thread_id = self._thread_of(chat, params)
        if not params.has("text"):
            raise _bad("message text is empty")
        text, entities = self._formatted(params, "text", required=True)
        self._check_length(text)
        markup = self._markup(params)
        content: dict[str, Any] = {"text": text}
        if entities:
            content["entities"] = entities
        if markup:
            content["reply_markup"] = markup
        reply = params.json("reply_parameters")
        if reply:
            target = (chat.id, int(reply.get("message_id", 0)))
            if target not in self._state.messages:
                raise _bad("message to be replied not found")
            content["reply_to_message"] = self._state.messages[target]
        message = self._new_message(chat, self.bot, content, thread_id=thread_id)
        return message

    async def _m_sendphoto(self, params: _Params) -> dict[str, Any]:
        chat = self._chat_of(params)
        thread_id = self._thread_of(chat, params)
        photo = params.raw.get("photo")
        if not photo:
            raise _bad("there is no photo in the request")
        caption, entities = self._formatted(params, "caption", required=False)
        if _utf16_len(caption) > MAX_CAPTION:
            raise _bad("message caption is too long")
        file_id = f"AgACAgI{next(self._callback_ids)}"
        width, height, size = 800, 600, 51200
        if isinstance(photo, Upload):
            width, height = _image_size(photo.data)
            size = len(photo.data)
            self._state.files[file_id] = photo.data
        content: dict[str, Any] = {"photo": [{
            "file_id": file_id, "file_unique_id": f"AQ{file_id[-8:]}",
            "width": width, "height": height, "file_size": size,
        }]}
        if caption:
            content["caption"] = caption
        if entities:
            content["caption_entities"] = entities
        markup = self._markup(params)
        if markup:
            content["reply_markup"] = markup
        return self._new_message(chat, self.bot, content, thread_id=thread_id)

    async def _m_editmessagetext(self, params: _Params) -> dict[str, Any]:
        if params.has("inline_message_id"):
            raise _bad("the fake has no inline messages")
        chat = self._chat_of(params)
        message_id = params.int("message_id", required="message identifier is not specified")
        key = (chat.id, message_id)
        message = self._state.messages.get(key)
        if message is None:
            raise _bad("message to edit not found")
        if message["from"]["id"] != self.bot.id:
            raise _bad("message can't be edited")
        if "text" not in message:
            raise _bad("there is no text in the message to edit")
        if not params.has("text"):
            raise _bad("message text is empty")
        text, entities = self._formatted(params, "text", required=True)
        self._check_length(text)
        markup = self._markup(params)
        same = (text == message["text"] and entities == message.get("entities", [])
                and markup == message.get("reply_markup"))
        if same:
            raise _bad(NOT_MODIFIED)
        message["text"] = text
        message["edit_date"] = int(time.time())
        if entities:
            message["entities"] = entities
        else:
            message.pop("entities", None)
        if markup:
            message["reply_markup"] = markup
        else:
            message.pop("reply_markup", None)
        self._state.edits[key] = self._state.edits.get(key, 0) + 1
        return message

    async def _m_deletemessage(self, params: _Params) -> bool:
        chat = self._chat_of(params)
        message_id = params.int("message_id", required="message identifier is not specified")
        if self._state.messages.pop((chat.id, message_id), None) is None:
            raise _bad("message to delete not found")
        return True

    async def _m_sendchataction(self, params: _Params) -> bool:
        chat = self._chat_of(params)
        self._thread_of(chat, params)
        action = params.str("action", required="action is empty")
        if action not in CHAT_ACTIONS:
            raise _bad("wrong parameter action in request")
        return True

    async def _m_answercallbackquery(self, params: _Params) -> bool:
        query_id = params.str("callback_query_id", required="query_id is empty") or ""
        if query_id not in self._state.open_callbacks:
            raise _bad("query is too old and response timeout expired or query ID is invalid")
        text = params.str("text") or ""
        if len(text) > 200:
            raise _bad("MESSAGE_TOO_LONG")
        del self._state.open_callbacks[query_id]
        self._state.answered_callbacks[query_id] = {
            "text": text, "show_alert": params.bool("show_alert"), "url": params.str("url"),
        }
        return True

    async def _m_createforumtopic(self, params: _Params) -> dict[str, Any]:
        chat = self._chat_of(params)
        if not chat.is_forum:
            raise _bad("the chat is not a forum")
        name = params.str("name") or ""
        if not 1 <= len(name) <= 128:
            raise _bad("TOPIC_TITLE_EMPTY" if not name else "TOPIC_TITLE_TOO_LONG")
        icon_color = params.int("icon_color") or 7322096
        created = {"forum_topic_created": {"name": name, "icon_color": icon_color}}
        message = self._new_message(chat, self.bot, created, thread_id=None)
        thread_id = message["message_id"]
        message["message_thread_id"] = thread_id
        message["is_topic_message"] = True
        self._state.topics[(chat.id, thread_id)] = name
        return {"message_thread_id": thread_id, "name": name, "icon_color": icon_color}

    async def _m_setmycommands(self, params: _Params) -> bool:
        commands = params.json("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise _bad("can't parse commands JSON object")
        for command in commands:
            name = command.get("command", "") if isinstance(command, dict) else ""
            if not _BOT_COMMAND_NAME.fullmatch(name):
                raise _bad("BOT_COMMAND_INVALID")
            if not 1 <= len(command.get("description", "")) <= 256:
                raise _bad("command description is empty")
        scope = params.json("scope")
        self._state.commands[json.dumps(scope, sort_keys=True) if scope else "default"] = commands
        return True

    async def _m_getmycommands(self, params: _Params) -> list[dict[str, Any]]:
        scope = params.json("scope")
        return self._state.commands.get(
            json.dumps(scope, sort_keys=True) if scope else "default", [])

    async def _m_deletemycommands(self, params: _Params) -> bool:
        scope = params.json("scope")
        self._state.commands.pop(json.dumps(scope, sort_keys=True) if scope else "default", None)
        return True

    async def _m_getchat(self, params: _Params) -> dict[str, Any]:
        chat = self._chat_of(params)
        return {**chat.to_json(), "accent_color_id": 0, "max_reaction_count": 11,
                "accepted_gift_types": {"unlimited_gifts": False, "limited_gifts": False,
                                        "unique_gifts": False, "premium_subscription": False}}
