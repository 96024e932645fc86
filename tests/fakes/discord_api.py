"""A protocol-faithful fake Discord: gateway WebSocket and REST API (v10) on 127.0.0.1.

Why: the Discord adapter is proven with the real discord.py over real sockets, so the fake
speaks the wire protocol the library expects: HELLO with a heartbeat interval, IDENTIFY,
heartbeats and ACKs, READY (with ``resume_gateway_url``), GUILD_CREATE, sequenced dispatches,
RESUME with replay of missed events, RECONNECT (op 7), INVALID_SESSION (op 9), session close
codes, sharding (IDENTIFY's ``shard: [id, count]``; a guild's events go only to shard
``(guild_id >> 22) % count`` and DMs only to shard 0, READY lists only the shard's guilds;
a bad pair is closed with 4010), zlib-stream transport compression, intent filtering
(message content is blanked without the privileged intent, as Discord does), and the REST
routes with Discord's JSON shapes, error bodies, rate-limit headers and 429s. Every REST
call is recorded.
Messages with files arrive as ``multipart/form-data`` (``payload_json`` plus ``files[n]``
parts, referenced by ``attachments[].id``); the bytes are kept (:meth:`attachment_bytes`),
and a file over 25 MiB is refused with 413 / 40005 as Discord does. Server errors (5xx)
can be injected like 429s, to prove the client's retries and error reporting.

discord.py is pointed here by configuration only: ``discord.http.Route.BASE = fake.api_base``
and ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
API_PREFIX = "/api/v10"

# Gateway intents (https://discord.com/developers/docs/topics/gateway#gateway-intents).
GUILDS = 1 << 0
GUILD_MEMBERS = 1 << 1
GUILD_PRESENCES = 1 << 8
GUILD_MESSAGES = 1 << 9
GUILD_MESSAGE_REACTIONS = 1 << 10
DIRECT_MESSAGES = 1 << 12
DIRECT_MESSAGE_REACTIONS = 1 << 13
MESSAGE_CONTENT = 1 << 15
PRIVILEGED = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT
ALL_INTENTS = (1 << 26) - 1

# Channel types.
GUILD_TEXT = 0
DM = 1
PUBLIC_THREAD = 11
PRIVATE_THREAD = 12
THREAD_TYPES = (PUBLIC_THREAD, PRIVATE_THREAD)

EPHEMERAL = 1 << 6
MAX_CONTENT = 2000
MAX_UPLOAD = 25 * 1024 * 1024
SERVER_ERRORS = {500: "500: Internal Server Error", 502: "502: Bad Gateway",
                 503: "503: Service Unavailable", 504: "504: Gateway Timeout"}

Json = dict[str, Any]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None
          ) -> web.Response:
    """Discord sends a bare ``application/json`` content type; discord.py insists on it."""
    body = json.dumps(data, separators=(",", ":")).encode()
    return web.Response(body=body, status=status, headers=headers,
                        content_type="application/json")


def _sniff(data: bytes, declared: str) -> str:
    """Discord reports the type it detects, not the one the client declared."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return declared or "application/octet-stream"


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class Snowflakes:
    """Real-shaped snowflakes: creation time in the top bits, so ids sort by time."""

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = itertools.count()

    def next(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (1 << 17) | (next(self._counter) & 0xFFF)


@dataclass(frozen=True, slots=True)
class FilePart:
    """One ``files[n]`` part of a multipart request, as received."""

    name: str
    filename: str
    content_type: str
    data: bytes


_FILES = web.RequestKey("files", tuple[FilePart, ...])


@dataclass(frozen=True, slots=True)
class Call:
    """One REST request as the fake saw it (before any injected error was applied)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]
    status: int
    at: float
    files: tuple[FilePart, ...] = ()

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(slots=True)
class _Injected:
    method: str
    pattern: re.Pattern[str]
    retry_after: float
    remaining: int
    is_global: bool
    status: int = 429


@dataclass(slots=True)
class _Bucket:
    limit: int
    window_s: float
    used: int = 0
    reset_at: float = 0.0


@dataclass(slots=True)
class GatewayEvent:
    seq: int
    name: str
    data: Json


@dataclass(slots=True, eq=False)
class _Session:
    id: str
    intents: int
    shard: tuple[int, int] = (0, 1)
    """(shard id, shard count) from IDENTIFY; an unsharded connection is shard 0 of 1."""
    events: list[GatewayEvent] = field(default_factory=list)
    seq: int = 0
    conn: _Conn | None = None
    valid: bool = True
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(slots=True, eq=False)
class _Conn:
    ws: web.WebSocketResponse
    request: web.Request
    url: str
    zlib_ctx: Any = None
    session: _Session | None = None
    heartbeats: int = 0
    sends: list[float] = field(default_factory=list)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class GatewayClosed(Exception):
    """Raised inside a connection handler to close it with a Discord close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class FakeDiscord:
    """The fake server; build a world (guilds, channels, users), then drive the bot."""

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        heartbeat_interval_ms: int = 41250,
        privileged_intents: int = MESSAGE_CONTENT,
        interaction_ack_timeout_s: float = 3.0,
        bucket_limit: int = 50,
        bucket_window_s: float = 1.0,
        echo_bot_messages: bool = True,
    ) -> None:
        self.token = token
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.privileged_intents = privileged_intents
        self.interaction_ack_timeout_s = interaction_ack_timeout_s
        self.bucket_limit = bucket_limit
        self.bucket_window_s = bucket_window_s
        self.echo_bot_messages = echo_bot_messages
        self.ids = Snowflakes()

        self.users: dict[int, Json] = {}
        self.guilds: dict[int, Json] = {}
        self.channels: dict[int, Json] = {}
        self.messages: dict[int, Json] = {}
        self.interactions: dict[int, Json] = {}
        self.commands: dict[str, list[Json]] = {}
        self.dm_by_user: dict[int, int] = {}
        self.files: dict[int, bytes] = {}

        self.calls: list[Call] = []
        self.record_calls = True
        self.listeners: list[Callable[[str, Json], None]] = []
        """Called with ("create" | "edit", message) whenever the bot writes a message."""
        self.typing: list[tuple[int, float]] = []
        self.gateway_log: list[tuple[str, int | None, str | None]] = []
        self.connections: list[str] = []
        self.close_codes: list[int] = []
        self.identify_count = 0
        self.identifies: list[Json] = []
        """Every accepted IDENTIFY's ``d`` (without the token), in order."""
        self.resume_count = 0
        self.heartbeat_count = 0
        self.sessions: dict[str, _Session] = {}
        self.session: _Session | None = None

        self._injected: list[_Injected] = []
        self._buckets: dict[str, _Bucket] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._conns: set[_Conn] = set()
        self.port = 0

        self.application_id = self.ids.next()
        self.owner = self.add_user("owner")
        self.bot_user = self.add_user("supportbot", bot=True, user_id=self.application_id)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_get("/", self._gateway)
        app.router.add_get("/resume", self._gateway)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        for conn in list(self._conns):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def resume_gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/resume"

    # -- world building ----------------------------------------------------------------------

    def add_user(self, name: str, *, bot: bool = False, user_id: int | None = None) -> Json:
        uid = user_id or self.ids.next()
        user = {
            "id": str(uid),
            "username": name,
            "discriminator": "0",
            "global_name": None if bot else name.title(),
            "avatar": None,
            "bot": bot,
            "public_flags": 0,
            "flags": 0,
        }
        self.users[uid] = user
        return user

    @staticmethod
    def shard_of(guild_id: int | str, shard_count: int) -> int:
        """The shard Discord sends a guild's events to."""
        return (int(guild_id) >> 22) % shard_count

    def _snowflake_on(self, shard: tuple[int, int]) -> int:
        """A fresh snowflake whose timestamp puts it on ``shard`` (at most count-1 ms ahead)."""
        shard_id, count = shard
        base = self.ids.next()
        ms = base >> 22
        ms += (shard_id - ms) % count
        return (ms << 22) | (base & ((1 << 22) - 1))

    def add_guild(self, name: str, *, shard: tuple[int, int] | None = None) -> Json:
        """A guild the bot is in; ``shard=(id, count)`` picks an id routed to that shard."""
        gid = self.ids.next() if shard is None else self._snowflake_on(shard)
        everyone = self._role(gid, "@everyone", position=0)
        guild = {
            "id": str(gid),
            "name": name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": self.owner["id"],
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "features": [],
            "roles": [everyone],
            "emojis": [],
            "stickers": [],
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "vanity_url_code": None,
            "application_id": None,
            "max_members": 500000,
            "max_video_channel_users": 25,
            "joined_at": now_iso(),
            "large": False,
            "unavailable": False,
            "member_count": 0,
            "members": [],
            "channels": [],
            "threads": [],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }
        self.guilds[gid] = guild
        self.add_member(guild, self.bot_user)
        return guild

    def _role(self, guild_id: int, name: str, position: int, role_id: int | None = None) -> Json:
        return {
            "id": str(role_id or guild_id),
            "name": name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": position,
            "permissions": "1071698660929" if position == 0 else "8",
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }

    def add_role(self, guild: Json, name: str) -> Json:
        role = self._role(int(guild["id"]), name, len(guild["roles"]), self.ids.next())
        guild["roles"].append(role)
        return role

    def add_member(self, guild: Json, user: Json, roles: tuple[Json, ...] = ()) -> Json:
        member = {
            "user": user,
            "nick": None,
            "avatar": None,
            "banner": None,
            "roles": [r["id"] for r in roles],
            "joined_at": now_iso(),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }
        guild["members"].append(member)
        guild["member_count"] = len(guild["members"])
        return member

    def add_text_channel(self, guild: Json, name: str) -> Json:
        cid = self.ids.next()
        channel = {
            "id": str(cid),
            "type": GUILD_TEXT,
            "guild_id": guild["id"],
            "name": name,
            "position": len(guild["channels"]),
            "permission_overwrites": [],
            "topic": None,
            "nsfw": False,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
            "flags": 0,
        }
        guild["channels"].append(channel)
        self.channels[cid] = channel
        return channel

    def dm_channel(self, user: Json) -> Json:
        """The DM channel between the bot and ``user`` (created like POST /users/@me/channels)."""
        uid = int(user["id"])
        if uid in self.dm_by_user:
            return self.channels[self.dm_by_user[uid]]
        cid = self.ids.next()
        channel = {"id": str(cid), "type": DM, "last_message_id": None,
                   "recipients": [user], "flags": 0}
        self.channels[cid] = channel
        self.dm_by_user[uid] = cid
        return channel

    def member_of(self, guild_id: int, user_id: int) -> Json | None:
        guild = self.guilds.get(guild_id)
        if guild is None:
            return None
        return next((m for m in guild["members"] if m["user"]["id"] == str(user_id)), None)

    # -- observation -------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, predicate: Callable[[], Any], within: float = 10.0) -> Any:
        """Wait for a condition (woken by the fake's own changes, else polled every 50 ms)."""
        async def _wait() -> Any:
            async with self._changed:
                while True:
                    value = predicate()
                    if value:
                        return value
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), 0.05)

        try:
            return await asyncio.wait_for(_wait(), within)
        except TimeoutError:
            raise AssertionError(f"fake Discord: condition not met within {within}s") from None

    def calls_to(self, method: str, pattern: str) -> list[Call]:
        rx = re.compile(pattern)
        return [c for c in self.calls if c.method == method and rx.fullmatch(c.path)]

    def channel_messages(self, channel_id: int | str) -> list[Json]:
        cid = str(channel_id)
        return sorted((m for m in self.messages.values() if m["channel_id"] == cid),
                      key=lambda m: int(m["id"]))

    def bot_messages(self, channel_id: int | str) -> list[Json]:
        return [m for m in self.channel_messages(channel_id)
                if m["author"]["id"] == self.bot_user["id"]]

    def threads_of(self, channel_id: int | str) -> list[Json]:
        return [c for c in self.channels.values()
                if c["type"] in THREAD_TYPES and c.get("parent_id") == str(channel_id)]

    def inject_429(self, method: str, path_pattern: str, *, retry_after: float = 0.5,
                   count: int = 1, is_global: bool = False) -> None:
        """The next ``count`` matching requests get a 429 with ``retry_after``."""
        self._injected.append(_Injected(method, re.compile(path_pattern), retry_after, count,
                                        is_global))

    def inject_server_error(self, method: str, path_pattern: str, *, status: int = 503,
                            count: int = 1) -> None:
        """The next ``count`` matching requests fail with a 5xx, as Discord's edge sends it."""
        if status not in SERVER_ERRORS:
            raise ValueError(f"not a server error the fake knows: {status}")
        self._injected.append(_Injected(method, re.compile(path_pattern), 0.0, count, False,
                                        status))

    def attachment_bytes(self, attachment: Json) -> bytes:
        """What was uploaded for an attachment of a message the bot sent."""
        return self.files[int(attachment["id"])]

    # -- gateway: test-side controls ---------------------------------------------------------

    def _require_session(self) -> _Session:
        """The most recently identified session (the only one, unsharded)."""
        if self.session is None or not self.session.valid:
            raise RuntimeError("fake Discord: no identified gateway session")
        return self.session

    async def wait_connected(self, within: float = 10.0) -> None:
        await self.wait_until(
            lambda: self.session is not None and self.session.conn is not None, within)

    async def dispatch(self, name: str, data: Json) -> int:
        """Send a dispatch (op 0) to the shard that owns it, as Discord routes: a guild's
        events to shard ``(guild_id >> 22) % count``, the rest (DMs) to shard 0. Kept for
        replay while that shard is disconnected; lost, as on Discord, when no session of
        that shard exists. Returns its sequence number (0: not sent)."""
        live = [s for s in self.sessions.values() if s.valid]
        if not live:
            raise RuntimeError("fake Discord: no identified gateway session")
        guild_id = self._guild_of(name, data)
        seq = 0
        for session in live:
            if self._owns(session, guild_id):
                seq = await self._dispatch_to(session, name, data)
        return seq

    @staticmethod
    def _guild_of(name: str, data: Json) -> int | None:
        if name in ("GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE"):
            return int(data["id"])
        guild_id = data.get("guild_id")
        return int(guild_id) if guild_id is not None else None

    def _owns(self, session: _Session, guild_id: int | None) -> bool:
        shard_id, count = session.shard
        return shard_id == 0 if guild_id is None else self.shard_of(guild_id, count) == shard_id

    async def _dispatch_to(self, session: _Session, name: str, data: Json) -> int:
        if not self._wanted(session.intents, name, data):
            return 0
        data = self._filter_content(session.intents, name, data)
        async with session.lock:
            session.seq += 1
            event = GatewayEvent(session.seq, name, data)
            session.events.append(event)
            if session.conn is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self._send(session.conn, {"op": 0, "s": event.seq, "t": name, "d": data})
        await self._notify()
        return event.seq

    async def redeliver(self, seq: int) -> int:
        """Send an already delivered dispatch again under a new sequence number."""
        session = self._require_session()
        event = next(e for e in session.events if e.seq == seq)
        return await self.dispatch(event.name, event.data)

    async def drop(self, code: int | None = None) -> None:
        """Kill the live connection: abort the TCP stream, or close with a gateway code."""
        session = self._require_session()
        async with session.lock:
            conn, session.conn = session.conn, None
        if conn is None:
            return
        self._conns.discard(conn)
        if code is None:
            transport = conn.request.transport
            if transport is not None:
                transport.abort()
        else:
            with contextlib.suppress(Exception):
                await conn.ws.close(code=code, message=b"fake drop")
        await self._notify()

    async def send_reconnect(self) -> None:
        """Op 7: the client must close and RESUME."""
        session = self._require_session()
        if session.conn is not None:
            await self._send(session.conn, {"op": 7, "d": None, "s": None, "t": None})

    async def invalidate_session(self, *, resumable: bool = False) -> None:
        """Op 9 on the live connection; a non-resumable one forgets the session."""
        session = self._require_session()
        conn = session.conn
        if not resumable:
            session.valid = False
        if conn is not None:
            await self._send(conn, {"op": 9, "d": resumable, "s": None, "t": None})

    # -- gateway: protocol -------------------------------------------------------------------

    async def _send(self, conn: _Conn, payload: Json) -> None:
        text = json.dumps(payload, separators=(",", ":"))
        op = payload.get("op")
        self.gateway_log.append(("send", op, payload.get("t")))
        async with conn.send_lock:
            if conn.zlib_ctx is not None:
                ctx = conn.zlib_ctx
                await conn.ws.send_bytes(ctx.compress(text.encode()) + ctx.flush(zlib.Z_SYNC_FLUSH))
            else:
                await conn.ws.send_str(text)

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=4096)
        await ws.prepare(request)
        conn = _Conn(ws=ws, request=request, url=str(request.rel_url))
        self._conns.add(conn)
        self.connections.append(str(request.rel_url))
        try:
            await self._serve(conn)
        except GatewayClosed as exc:
            self.close_codes.append(exc.code)
            with contextlib.suppress(Exception):
                await ws.close(code=exc.code, message=exc.reason.encode())
        finally:
            self._conns.discard(conn)
            session = conn.session
            if session is not None and session.conn is conn:
                async with session.lock:
                    if session.conn is conn:
                        session.conn = None
            await self._notify()
        return ws

    async def _serve(self, conn: _Conn) -> None:
        query = conn.request.query
        if query.get("v") != "10":
            raise GatewayClosed(4012, "Invalid API version.")
        if query.get("encoding", "json") != "json":
            raise GatewayClosed(4002, "Error while decoding payload.")
        compress = query.get("compress")
        if compress == "zlib-stream":
            conn.zlib_ctx = zlib.compressobj()
        elif compress is not None:
            raise GatewayClosed(4002, f"Unsupported compression {compress}.")
        await self._send(conn, {"op": 10, "s": None, "t": None,
                                "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
        timeout = self.heartbeat_interval_ms / 1000 * 1.5 + 1
        while True:
            try:
                msg = await conn.ws.receive(timeout=timeout)
            except TimeoutError:
                raise GatewayClosed(4009, "Session timed out.") from None
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            if msg.type is not WSMsgType.TEXT:
                raise GatewayClosed(4002, "Error while decoding payload.")
            try:
                payload = json.loads(msg.data)
                op = payload["op"]
            except (ValueError, KeyError, TypeError):
                raise GatewayClosed(4002, "Error while decoding payload.") from None
            self.gateway_log.append(("recv", op, None))
            now = time.monotonic()
            conn.sends = [t for t in conn.sends if now - t < 60] + [now]
            if len(conn.sends) > 120:
                raise GatewayClosed(4008, "Rate limited.")
            await self._handle_op(conn, op, payload.get("d"))

    async def _handle_op(self, conn: _Conn, op: int, data: Any) -> None:
        if op == 1:
            conn.heartbeats += 1
            self.heartbeat_count += 1
            await self._send(conn, {"op": 11, "s": None, "t": None, "d": None})
            await self._notify()
        elif op == 2:
            await self._identify(conn, data)
        elif op == 6:
            await self._resume(conn, data)
        elif op in (3, 4, 8):
            if conn.session is None:
                raise GatewayClosed(4003, "Not authenticated.")
        else:
            raise GatewayClosed(4001, "Unknown opcode.")

    async def _identify(self, conn: _Conn, data: Json) -> None:
        if conn.session is not None:
            raise GatewayClosed(4005, "Already authenticated.")
        if not isinstance(data, dict) or data.get("token") != self.token:
            raise GatewayClosed(4004, "Authentication failed.")
        intents = data.get("intents")
        if not isinstance(intents, int) or intents < 0 or intents & ~ALL_INTENTS:
            raise GatewayClosed(4013, "Invalid intent(s).")
        if intents & PRIVILEGED & ~self.privileged_intents:
            raise GatewayClosed(4014, "Disallowed intent(s).")
        shard = data.get("shard", [0, 1])
        if not (isinstance(shard, list) and len(shard) == 2
                and all(type(n) is int for n in shard) and 0 <= shard[0] < shard[1]):
            raise GatewayClosed(4010, "Invalid shard.")
        self.identify_count += 1
        self.identifies.append({k: v for k, v in data.items() if k != "token"})
        session = _Session(id=uuid.uuid4().hex, intents=intents, shard=(shard[0], shard[1]))
        for earlier in self.sessions.values():  # a new IDENTIFY replaces its shard's session
            if earlier.shard == session.shard:
                earlier.valid = False
        self.sessions[session.id] = session
        self.session = session
        conn.session = session
        async with session.lock:
            session.conn = conn
        guilds = [g for g in self.guilds.values() if self._owns(session, int(g["id"]))]
        ready = {
            "v": 10,
            "user": self.bot_user,
            "user_settings": {},
            "guilds": [{"id": g["id"], "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.resume_gateway_url,
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "geo_ordered_rtc_regions": ["us-east"],
            "guild_join_requests": [],
            "application": {"id": str(self.application_id), "flags": 1 << 19},
            "_trace": ["fake-gateway"],
        }
        if "shard" in data:
            ready["shard"] = list(session.shard)
        await self._dispatch_to(session, "READY", ready)
        if intents & GUILDS:
            for guild in guilds:
                await self._dispatch_to(session, "GUILD_CREATE", guild)

    async def _resume(self, conn: _Conn, data: Json) -> None:
        if conn.session is not None:
            raise GatewayClosed(4005, "Already authenticated.")
        if not isinstance(data, dict) or data.get("token") != self.token:
            raise GatewayClosed(4004, "Authentication failed.")
        session = self.sessions.get(str(data.get("session_id")))
        if session is None or not session.valid:
            await self._send(conn, {"op": 9, "d": False, "s": None, "t": None})
            return
        seq = data.get("seq")
        if not isinstance(seq, int) or seq > session.seq:
            raise GatewayClosed(4007, "Invalid seq.")
        self.resume_count += 1
        async with session.lock:
            if session.conn is not None and session.conn is not conn:
                with contextlib.suppress(Exception):
                    await session.conn.ws.close(code=4000)
            conn.session = session
            for event in session.events:
                if event.seq > seq:
                    await self._send(conn, {"op": 0, "s": event.seq, "t": event.name,
                                            "d": event.data})
            session.seq += 1
            resumed = GatewayEvent(session.seq, "RESUMED", {"_trace": ["fake-gateway"]})
            session.events.append(resumed)
            await self._send(conn, {"op": 0, "s": resumed.seq, "t": "RESUMED",
                                    "d": resumed.data})
            session.conn = conn
        await self._notify()

    @staticmethod
    def _wanted(intents: int, name: str, data: Json) -> bool:
        in_guild = "guild_id" in data
        if name in ("MESSAGE_CREATE", "MESSAGE_UPDATE", "MESSAGE_DELETE"):
            return bool(intents & (GUILD_MESSAGES if in_guild else DIRECT_MESSAGES))
        if name.startswith("MESSAGE_REACTION"):
            wanted = GUILD_MESSAGE_REACTIONS if in_guild else DIRECT_MESSAGE_REACTIONS
            return bool(intents & wanted)
        if name.startswith(("GUILD_", "CHANNEL_", "THREAD_")):
            return bool(intents & GUILDS)
        return True

    def _filter_content(self, intents: int, name: str, data: Json) -> Json:
        """Without MESSAGE_CONTENT, guild messages arrive blank unless they mention the bot."""
        if name not in ("MESSAGE_CREATE", "MESSAGE_UPDATE") or intents & MESSAGE_CONTENT:
            return data
        if "guild_id" not in data or data["author"]["id"] == self.bot_user["id"]:
            return data
        if any(u["id"] == self.bot_user["id"] for u in data.get("mentions", [])):
            return data
        return {**data, "content": "", "embeds": [], "attachments": [], "components": []}

    # -- customer/operator actions (what a Discord user would do) ----------------------------

    def _member_payload(self, guild_id: int, user: Json) -> Json | None:
        member = self.member_of(guild_id, int(user["id"]))
        if member is None:
            return None
        return {k: v for k, v in member.items() if k != "user"}

    def _message(self, channel: Json, author: Json, content: str, **extra: Any) -> Json:
        mid = extra.pop("message_id", None) or self.ids.next()
        msg: Json = {
            "id": str(mid),
            "channel_id": channel["id"],
            "author": author,
            "content": content,
            "timestamp": now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
            "components": [],
        }
        msg.update(extra)
        if "guild_id" in channel:
            msg["guild_id"] = channel["guild_id"]
            member = self._member_payload(int(channel["guild_id"]), author)
            if member is not None:
                msg["member"] = member
        channel["last_message_id"] = msg["id"]
        if channel["type"] in THREAD_TYPES:
            channel["message_count"] = channel.get("message_count", 0) + 1
            channel["total_message_sent"] = channel.get("total_message_sent", 0) + 1
        self.messages[mid] = msg
        return msg

    async def user_message(self, channel: Json, author: Json, content: str, *,
                           mention_bot: bool = False, attachments: tuple[Json, ...] = (),
                           sticker: bool = False, reply_to: Json | None = None) -> Json:
        """A person posts a message; it arrives at the bot as MESSAGE_CREATE."""
        extra: Json = {}
        mentions = []
        if mention_bot:
            content = f"<@{self.bot_user['id']}> {content}"
        for uid in re.findall(r"<@!?(\d+)>", content):
            user = self.users.get(int(uid))
            if user is not None:
                mentions.append(user)
        extra["mentions"] = mentions
        extra["attachments"] = [
            {"id": str(self.ids.next()), "filename": a.get("filename", "file.bin"),
             "size": a.get("size", 1024), "url": "http://127.0.0.1/a", "proxy_url":
             "http://127.0.0.1/a", "content_type": a.get("content_type")} for a in attachments
        ]
        if sticker:
            extra["sticker_items"] = [{"id": str(self.ids.next()), "name": "wave",
                                       "format_type": 1}]
        if reply_to is not None:
            extra["type"] = 19
            extra["message_reference"] = {"message_id": reply_to["id"],
                                          "channel_id": reply_to["channel_id"]}
            extra["referenced_message"] = reply_to
        msg = self._message(channel, author, content, **extra)
        await self.dispatch("MESSAGE_CREATE", msg)
        return msg

    def _interaction(self, itype: int, channel: Json, user: Json, data: Json,
                     message: Json | None = None) -> Json:
        iid = self.ids.next()
        interaction: Json = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": itype,
            "data": data,
            "channel_id": channel["id"],
            "channel": {k: channel[k] for k in ("id", "type", "name", "parent_id",
                                                "guild_id", "thread_metadata", "flags")
                        if k in channel},
            "token": f"itoken{iid}",
            "version": 1,
            "locale": "en-US",
            "app_permissions": "562949953421311",
            "entitlements": [],
            "authorizing_integration_owners": {"0": channel.get("guild_id", "0")},
            "context": 0 if "guild_id" in channel else 1,
            "attachment_size_limit": 10485760,
        }
        if "guild_id" in channel:
            interaction["guild_id"] = channel["guild_id"]
            interaction["guild_locale"] = "en-US"
            member = self._member_payload(int(channel["guild_id"]), user)
            interaction["member"] = {**(member or {}), "user": user,
                                     "permissions": "562949953421311"}
        else:
            interaction["user"] = user
        if message is not None:
            interaction["message"] = message
        self.interactions[iid] = {"data": interaction, "at": time.monotonic(),
                                  "responses": [], "followups": []}
        return interaction

    async def click_button(self, message: Json, custom_id: str, user: Json) -> Json:
        """A person presses a button on a message: INTERACTION_CREATE type 3."""
        channel = self.channels[int(message["channel_id"])]
        interaction = self._interaction(
            3, channel, user, {"custom_id": custom_id, "component_type": 2}, message)
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction

    async def slash_command(self, channel: Json, user: Json, name: str,
                            options: dict[str, str] | None = None) -> Json:
        """A person runs an application command: INTERACTION_CREATE type 2."""
        registered = [c for cmds in self.commands.values() for c in cmds if c["name"] == name]
        if not registered:
            raise AssertionError(f"fake Discord: /{name} was never registered by the bot")
        cmd = registered[-1]
        data: Json = {"id": cmd["id"], "name": name, "type": 1}
        if options:
            data["options"] = [{"name": k, "type": 3, "value": v} for k, v in options.items()]
        if "guild_id" in channel:
            data["guild_id"] = channel["guild_id"]
        interaction = self._interaction(2, channel, user, data)
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction

    async def react(self, message: Json, user: Json, emoji: str) -> None:
        """A person adds a unicode reaction: MESSAGE_REACTION_ADD."""
        data: Json = {
            "user_id": user["id"],
            "channel_id": message["channel_id"],
            "message_id": message["id"],
            "emoji": {"id": None, "name": emoji},
            "burst": False,
            "burst_colors": [],
            "type": 0,
        }
        if "guild_id" in message:
            data["guild_id"] = message["guild_id"]
            data["message_author_id"] = message["author"]["id"]
            member = self._member_payload(int(message["guild_id"]), user)
            if member is not None:
                data["member"] = {**member, "user": user}
        message.setdefault("reactions", []).append({"emoji": emoji, "user_id": user["id"]})
        await self.dispatch("MESSAGE_REACTION_ADD", data)

    def interaction_responses(self, interaction: Json) -> list[Json]:
        return self.interactions[int(interaction["id"])]["responses"]

    # -- REST --------------------------------------------------------------------------------

    _ROUTES: tuple[tuple[str, str, str], ...] = (
        ("GET", r"/gateway", "_get_gateway"),
        ("GET", r"/gateway/bot", "_get_gateway_bot"),
        ("GET", r"/users/@me", "_get_me"),
        ("GET", r"/oauth2/applications/@me", "_get_application"),
        ("GET", r"/applications/@me", "_get_application"),
        ("POST", r"/users/@me/channels", "_create_dm"),
        ("GET", r"/channels/(?P<channel_id>\d+)", "_get_channel"),
        ("PATCH", r"/channels/(?P<channel_id>\d+)", "_edit_channel"),
        ("POST", r"/channels/(?P<channel_id>\d+)/messages", "_create_message"),
        ("GET", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)", "_get_message"),
        ("PATCH", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)",
         "_edit_message"),
        ("DELETE", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)",
         "_delete_message"),
        ("POST", r"/channels/(?P<channel_id>\d+)/typing", "_typing"),
        ("POST", r"/channels/(?P<channel_id>\d+)/threads", "_create_thread"),
        ("POST", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)/threads",
         "_create_thread"),
        ("PUT", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)/reactions/"
         r"(?P<emoji>[^/]+)/@me", "_add_reaction"),
        ("POST", r"/interactions/(?P<interaction_id>\d+)/(?P<token>[^/]+)/callback",
         "_interaction_callback"),
        ("PATCH", r"/webhooks/(?P<application_id>\d+)/(?P<token>[^/]+)/messages/"
         r"(?P<message_id>@original|\d+)", "_edit_webhook_message"),
        ("POST", r"/webhooks/(?P<application_id>\d+)/(?P<token>[^/]+)", "_followup"),
        ("GET", r"/applications/(?P<application_id>\d+)/commands", "_get_commands"),
        ("PUT", r"/applications/(?P<application_id>\d+)/commands", "_put_commands"),
        ("GET", r"/applications/(?P<application_id>\d+)/guilds/(?P<guild_id>\d+)/commands",
         "_get_commands"),
        ("PUT", r"/applications/(?P<application_id>\d+)/guilds/(?P<guild_id>\d+)/commands",
         "_put_commands"),
    )
    _COMPILED = tuple((m, re.compile(p), h) for m, p, h in _ROUTES)

    @staticmethod
    def _error(status: int, code: int, message: str, errors: Json | None = None) -> web.Response:
        body: Json = {"message": message, "code": code}
        if errors:
            body["errors"] = errors
        return _json(body, status=status)

    @classmethod
    def _form_error(cls, field_name: str, code: str, message: str) -> web.Response:
        return cls._error(400, 50035, "Invalid Form Body",
                          {field_name: {"_errors": [{"code": code, "message": message}]}})

    async def _read_body(self, request: web.Request) -> Any:
        if request.method in ("GET", "DELETE") or not request.can_read_body:
            return None
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            payload: Any = {}
            files: list[FilePart] = []
            async for part in reader:
                if part.name == "payload_json":
                    try:
                        payload = json.loads(await part.text())
                    except ValueError:
                        return ValueError
                elif part.filename is not None:
                    files.append(FilePart(part.name or "", part.filename,
                                          part.headers.get("Content-Type", ""),
                                          bytes(await part.read())))
            request[_FILES] = tuple(files)
            return payload
        text = await request.text()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return ValueError

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body = await self._read_body(request)
        route = next(((h, m) for meth, rx, h in self._COMPILED
                      if meth == request.method and (m := rx.fullmatch(path))), None)
        response = await self._answer(request, path, body, route)
        self.calls.append(Call(request.method, path, dict(request.query),
                               body if self.record_calls else None,
                               dict(request.headers) if self.record_calls else {},
                               response.status, time.monotonic(),
                               request.get(_FILES, ()) if self.record_calls else ()))
        await self._notify()
        return response

    async def _answer(self, request: web.Request, path: str, body: Any,
                      route: tuple[str, re.Match[str]] | None) -> web.Response:
        if route is None:
            return self._error(404, 0, "404: Not Found")
        handler_name, match = route
        params = match.groupdict()
        webhook = handler_name in ("_interaction_callback", "_edit_webhook_message", "_followup")
        if not webhook and request.headers.get("Authorization") != f"Bot {self.token}":
            return self._error(401, 0, "401: Unauthorized")
        if body is ValueError:
            return self._error(400, 50109, "The request body contains invalid JSON.")
        injected = self._take_injected(request.method, path)
        if injected is not None and injected.status != 429:
            return self._error(injected.status, 0, SERVER_ERRORS[injected.status])
        if injected is not None:
            return self._too_many(injected.retry_after, injected.is_global, "user")
        major = params.get("channel_id") or params.get("guild_id") or params.get("token") or ""
        template = match.re.pattern
        bucket, limited = self._spend(f"{request.method} {template} {major}")
        if limited is not None:
            return self._too_many(limited, False, "user")
        handler: Callable[..., Awaitable[web.Response]] = getattr(self, handler_name)
        response = await handler(request, body, **params)
        reset_after = max(0.0, bucket.reset_at - time.monotonic())
        response.headers.update({
            "X-RateLimit-Limit": str(bucket.limit),
            "X-RateLimit-Remaining": str(max(0, bucket.limit - bucket.used)),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": uuid.uuid5(uuid.NAMESPACE_URL, template).hex[:16],
        })
        return response

    def _take_injected(self, method: str, path: str) -> _Injected | None:
        for inj in self._injected:
            if inj.remaining > 0 and inj.method == method and inj.pattern.fullmatch(path):
                inj.remaining -= 1
                return inj
        return None

    def _spend(self, key: str) -> tuple[_Bucket, float | None]:
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None or now >= bucket.reset_at:
            bucket = _Bucket(self.bucket_limit, self.bucket_window_s, 0, now + self.bucket_window_s)
            self._buckets[key] = bucket
        if bucket.used >= bucket.limit:
            return bucket, bucket.reset_at - now
        bucket.used += 1
        return bucket, None

    @staticmethod
    def _too_many(retry_after: float, is_global: bool, scope: str) -> web.Response:
        body = {"message": "You are being rate limited.", "retry_after": round(retry_after, 3),
                "global": is_global, "code": 0}
        headers = {
            "Retry-After": str(math.ceil(retry_after)),
            "X-RateLimit-Scope": "global" if is_global else scope,
            "Via": "1.1 google",
        }
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        else:
            headers.update({"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                            "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}"})
        return _json(body, status=429, headers=headers)

    # REST handlers --------------------------------------------------------------------------

    async def _get_gateway(self, request: web.Request, body: Any) -> web.Response:
        return _json({"url": self.gateway_url.rstrip("/")})

    async def _get_gateway_bot(self, request: web.Request, body: Any) -> web.Response:
        return _json({
            "url": self.gateway_url.rstrip("/"),
            "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 1000 - self.identify_count,
                                    "reset_after": 86400000, "max_concurrency": 1},
        })

    async def _get_me(self, request: web.Request, body: Any) -> web.Response:
        return _json({**self.bot_user, "verified": True, "mfa_enabled": False,
                                  "locale": "en-US", "email": None})

    async def _get_application(self, request: web.Request, body: Any) -> web.Response:
        return _json({
            "id": str(self.application_id),
            "name": "supportbot",
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "rpc_origins": [],
            "bot_public": False,
            "bot_require_code_grant": False,
            "bot": self.bot_user,
            "owner": self.owner,
            "team": None,
            "verify_key": "0" * 64,
            "flags": (1 << 19) | (1 << 15),
            "interactions_endpoint_url": None,
            "redirect_uris": [],
            "tags": [],
            "approximate_guild_count": len(self.guilds),
            "integration_types_config": {"0": {}},
        })

    async def _create_dm(self, request: web.Request, body: Any) -> web.Response:
        recipient = self.users.get(int((body or {}).get("recipient_id", 0) or 0))
        if recipient is None:
            return self._form_error("recipient_id", "NUMBER_TYPE_COERCE",
                                    "Value is not snowflake.")
        return _json(self.dm_channel(recipient))

    def _channel_or_404(self, channel_id: str) -> Json | web.Response:
        channel = self.channels.get(int(channel_id))
        if channel is None:
            return self._error(404, 10003, "Unknown Channel")
        return channel

    async def _get_channel(self, request: web.Request, body: Any, channel_id: str
                           ) -> web.Response:
        channel = self._channel_or_404(channel_id)
        return channel if isinstance(channel, web.Response) else _json(channel)

    async def _edit_channel(self, request: web.Request, body: Any, channel_id: str
                            ) -> web.Response:
        channel = self._channel_or_404(channel_id)
        if isinstance(channel, web.Response):
            return channel
        body = body or {}
        if "name" in body:
            if not 1 <= len(body["name"]) <= 100:
                return self._form_error("name", "BASE_TYPE_BAD_LENGTH",
                                        "Must be between 1 and 100 in length.")
            channel["name"] = body["name"]
        if channel["type"] in THREAD_TYPES:
            meta = channel["thread_metadata"]
            for key in ("archived", "locked", "auto_archive_duration"):
                if key in body:
                    meta[key] = body[key]
            meta["archive_timestamp"] = now_iso()
            await self.dispatch("THREAD_UPDATE", channel)
        else:
            await self.dispatch("CHANNEL_UPDATE", channel)
        return _json(channel)

    def _validate_message(self, body: Json, *, editing: bool) -> web.Response | None:
        content = body.get("content")
        if content is not None and not isinstance(content, str):
            return self._form_error("content", "STRING_TYPE_CONVERT", "Could not interpret.")
        if content is not None and len(content) > MAX_CONTENT:
            return self._form_error("content", "BASE_TYPE_MAX_LENGTH",
                                    f"Must be {MAX_CONTENT} or fewer in length.")
        rows = body.get("components") or []
        if len(rows) > 5:
            return self._form_error("components", "BASE_TYPE_MAX_LENGTH",
                                    "Must be 5 or fewer in length.")
        for row in rows:
            buttons = row.get("components", [])
            if row.get("type") != 1 or not 1 <= len(buttons) <= 5:
                return self._form_error("components", "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                                        "The specified component exceeds the maximum width")
            for button in buttons:
                if len(button.get("label") or "") > 80:
                    return self._form_error("components", "BASE_TYPE_MAX_LENGTH",
                                            "Must be 80 or fewer in length.")
                custom_id = button.get("custom_id")
                if button.get("style") != 5 and not custom_id:
                    return self._form_error("components", "BASE_TYPE_REQUIRED",
                                            "This field is required")
                if custom_id is not None and len(custom_id) > 100:
                    return self._form_error("components", "BASE_TYPE_MAX_LENGTH",
                                            "Must be 100 or fewer in length.")
        if not editing and not (content or body.get("embeds") or rows
                                or body.get("sticker_ids") or body.get("attachments")):
            return self._error(400, 50006, "Cannot send an empty message")
        return None

    def _resolve_mentions(self, content: str, allowed: Json | None, reply_to: Json | None
                          ) -> Json:
        """Who a bot message actually pings, applying allowed_mentions like Discord does."""
        parse = ["users", "roles", "everyone"] if allowed is None else allowed.get("parse", [])
        allowed_users = set() if allowed is None else set(allowed.get("users", []))
        allowed_roles = set() if allowed is None else set(allowed.get("roles", []))
        mentions = []
        for uid in dict.fromkeys(re.findall(r"<@!?(\d+)>", content)):
            if ("users" in parse or uid in allowed_users) and int(uid) in self.users:
                mentions.append(self.users[int(uid)])
        if reply_to is not None and (allowed is None or allowed.get("replied_user", False)):
            author = reply_to["author"]
            if all(u["id"] != author["id"] for u in mentions):
                mentions.append(author)
        roles = [rid for rid in dict.fromkeys(re.findall(r"<@&(\d+)>", content))
                 if "roles" in parse or rid in allowed_roles]
        everyone = "everyone" in parse and bool(re.search(r"@(everyone|here)", content))
        return {"mentions": mentions, "mention_roles": roles, "mention_everyone": everyone}

    async def _create_message(self, request: web.Request, body: Any, channel_id: str
                              ) -> web.Response:
        channel = self._channel_or_404(channel_id)
        if isinstance(channel, web.Response):
            return channel
        body = body or {}
        invalid = self._validate_message(body, editing=False)
        if invalid is not None:
            return invalid
        if channel["type"] in THREAD_TYPES and channel["thread_metadata"].get("locked"):
            return self._error(403, 50083, "Thread is archived")
        if channel["type"] in THREAD_TYPES:
            channel["thread_metadata"]["archived"] = False
        reply_to = None
        ref = body.get("message_reference")
        if ref is not None:
            reply_to = self.messages.get(int(ref.get("message_id", 0)))
            if reply_to is None and ref.get("fail_if_not_exists", True):
                return self._form_error("message_reference", "REPLIES_UNKNOWN_MESSAGE",
                                        "Unknown message")
        attachments = self._attachments(body, request.get(_FILES, ()))
        if isinstance(attachments, web.Response):
            return attachments
        content = body.get("content") or ""
        extra: Json = self._resolve_mentions(content, body.get("allowed_mentions"), reply_to)
        extra["attachments"] = attachments
        extra["components"] = body.get("components") or []
        extra["embeds"] = body.get("embeds") or []
        extra["flags"] = int(body.get("flags") or 0)
        extra["nonce"] = body.get("nonce")
        extra["allowed_mentions_sent"] = body.get("allowed_mentions")
        if reply_to is not None:
            extra["type"] = 19
            extra["message_reference"] = {"message_id": reply_to["id"],
                                          "channel_id": reply_to["channel_id"]}
            extra["referenced_message"] = reply_to
        msg = self._message(channel, self.bot_user, content, **extra)
        for listener in self.listeners:
            listener("create", msg)
        if self.echo_bot_messages:
            await self.dispatch("MESSAGE_CREATE", msg)
        return _json(msg)

    def _attachments(self, body: Json, files: tuple[FilePart, ...]) -> list[Json] | web.Response:
        """Uploaded ``files[n]`` as message attachments (``attachments[].id`` is the n)."""
        described = {str(a.get("id")): a for a in body.get("attachments") or []}
        out: list[Json] = []
        for part in files:
            match = re.fullmatch(r"files\[(\d+)\]", part.name)
            if match is None:
                return self._form_error("files", "BASE_TYPE_BAD", "Invalid file field name.")
            if len(part.data) > MAX_UPLOAD:
                return self._error(413, 40005, "Request entity too large")
            meta = described.get(match[1], {})
            filename = meta.get("filename") or part.filename
            aid = self.ids.next()
            self.files[aid] = part.data
            url = f"https://cdn.discordapp.com/attachments/0/{aid}/{filename}"
            attachment: Json = {"id": str(aid), "filename": filename, "size": len(part.data),
                                "url": url, "proxy_url": url,
                                "content_type": _sniff(part.data, part.content_type)}
            if attachment["content_type"] == "image/png" and len(part.data) >= 24:
                attachment["width"] = int.from_bytes(part.data[16:20], "big")
                attachment["height"] = int.from_bytes(part.data[20:24], "big")
            if meta.get("description"):
                attachment["description"] = meta["description"]
            out.append(attachment)
        return out

    def _message_or_error(self, channel_id: str, message_id: str) -> Json | web.Response:
        if int(channel_id) not in self.channels:
            return self._error(404, 10003, "Unknown Channel")
        msg = self.messages.get(int(message_id))
        if msg is None or msg["channel_id"] != channel_id or msg.get("deleted"):
            return self._error(404, 10008, "Unknown Message")
        return msg

    async def _get_message(self, request: web.Request, body: Any, channel_id: str,
                           message_id: str) -> web.Response:
        msg = self._message_or_error(channel_id, message_id)
        return msg if isinstance(msg, web.Response) else _json(msg)

    async def _edit_message(self, request: web.Request, body: Any, channel_id: str,
                            message_id: str) -> web.Response:
        msg = self._message_or_error(channel_id, message_id)
        if isinstance(msg, web.Response):
            return msg
        if msg["author"]["id"] != self.bot_user["id"]:
            return self._error(403, 50005, "Cannot edit a message authored by another user")
        body = body or {}
        invalid = self._validate_message(body, editing=True)
        if invalid is not None:
            return invalid
        for key in ("content", "components", "embeds", "flags"):
            if key in body and body[key] is not None:
                msg[key] = body[key]
        if "content" in body:
            msg.setdefault("edits", []).append(body["content"])
            allowed = body.get("allowed_mentions")
            msg["allowed_mentions_sent"] = allowed
            msg.update(self._resolve_mentions(msg["content"], allowed, None))
        msg["edited_timestamp"] = now_iso()
        for listener in self.listeners:
            listener("edit", msg)
        if self.echo_bot_messages:
            await self.dispatch("MESSAGE_UPDATE", msg)
        return _json(msg)

    async def _delete_message(self, request: web.Request, body: Any, channel_id: str,
                              message_id: str) -> web.Response:
        msg = self._message_or_error(channel_id, message_id)
        if isinstance(msg, web.Response):
            return msg
        msg["deleted"] = True
        del self.messages[int(message_id)]
        data: Json = {"id": message_id, "channel_id": channel_id}
        if "guild_id" in msg:
            data["guild_id"] = msg["guild_id"]
        await self.dispatch("MESSAGE_DELETE", data)
        return web.Response(status=204)

    async def _typing(self, request: web.Request, body: Any, channel_id: str) -> web.Response:
        channel = self._channel_or_404(channel_id)
        if isinstance(channel, web.Response):
            return channel
        self.typing.append((int(channel_id), time.monotonic()))
        return web.Response(status=204)

    async def _add_reaction(self, request: web.Request, body: Any, channel_id: str,
                            message_id: str, emoji: str) -> web.Response:
        msg = self._message_or_error(channel_id, message_id)
        if isinstance(msg, web.Response):
            return msg
        msg.setdefault("reactions", []).append({"emoji": emoji, "user_id": self.bot_user["id"]})
        return web.Response(status=204)

    async def _create_thread(self, request: web.Request, body: Any, channel_id: str,
                             message_id: str | None = None) -> web.Response:
        parent = self._channel_or_404(channel_id)
        if isinstance(parent, web.Response):
            return parent
        if parent["type"] != GUILD_TEXT:
            return self._error(400, 50024, "Cannot execute action on this channel type")
        body = body or {}
        name = body.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            return self._form_error("name", "BASE_TYPE_BAD_LENGTH",
                                    "Must be between 1 and 100 in length.")
        if message_id is not None:
            source = self._message_or_error(channel_id, message_id)
            if isinstance(source, web.Response):
                return source
            if int(message_id) in self.channels:
                return self._error(400, 160004,
                                   "A thread has already been created for this message")
            tid = int(message_id)
            ttype = PUBLIC_THREAD
        else:
            tid = self.ids.next()
            ttype = int(body.get("type") or PRIVATE_THREAD)
        thread = {
            "id": str(tid),
            "type": ttype,
            "guild_id": parent["guild_id"],
            "parent_id": parent["id"],
            "owner_id": self.bot_user["id"],
            "name": name,
            "last_message_id": None,
            "message_count": 0,
            "member_count": 1,
            "total_message_sent": 0,
            "rate_limit_per_user": int(body.get("rate_limit_per_user") or 0),
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": int(body.get("auto_archive_duration") or 4320),
                "archive_timestamp": now_iso(),
                "locked": False,
                "create_timestamp": now_iso(),
                "invitable": True,
            },
            "member": {"id": str(tid), "user_id": self.bot_user["id"],
                       "join_timestamp": now_iso(), "flags": 0},
        }
        self.channels[tid] = thread
        guild = self.guilds[int(parent["guild_id"])]
        guild["threads"].append(thread)
        await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return _json(thread, status=201)

    async def _interaction_callback(self, request: web.Request, body: Any,
                                    interaction_id: str, token: str) -> web.Response:
        record = self.interactions.get(int(interaction_id))
        if record is None or record["data"]["token"] != token:
            return self._error(404, 10062, "Unknown interaction")
        if time.monotonic() - record["at"] > self.interaction_ack_timeout_s:
            return self._error(404, 10062, "Unknown interaction")
        if record["responses"]:
            return self._error(400, 40060, "Interaction has already been acknowledged.")
        body = body or {}
        rtype = body.get("type")
        if rtype not in (1, 4, 5, 6, 7, 8, 9):
            return self._form_error("type", "BASE_TYPE_CHOICES", f"Value must be one of {{1, 4, "
                                    f"5, 6, 7, 8, 9}}. got {rtype}")
        record["responses"].append(body)
        interaction = record["data"]
        data = body.get("data") or {}
        message: Json | None = None
        channel = self.channels[int(interaction["channel_id"])]
        if rtype == 4:
            invalid = self._validate_message(data, editing=False)
            if invalid is not None:
                record["responses"].clear()
                return invalid
            extra = self._resolve_mentions(data.get("content") or "",
                                           data.get("allowed_mentions"), None)
            message = self._message(channel, self.bot_user, data.get("content") or "",
                                    components=data.get("components") or [],
                                    flags=int(data.get("flags") or 0),
                                    allowed_mentions_sent=data.get("allowed_mentions"),
                                    interaction_id=interaction["id"], **extra)
            if not message["flags"] & EPHEMERAL and self.echo_bot_messages:
                await self.dispatch("MESSAGE_CREATE", message)
        elif rtype == 7 and "message" in interaction:
            target = self.messages[int(interaction["message"]["id"])]
            for key in ("content", "components"):
                if key in data:
                    target[key] = data[key]
            message = target
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        result: Json = {"interaction": {
            "id": interaction["id"],
            "type": interaction["type"],
            "response_message_loading": rtype == 5,
            "response_message_ephemeral": bool(int(data.get("flags") or 0) & EPHEMERAL),
        }}
        if message is not None:
            result["interaction"]["response_message_id"] = message["id"]
            result["resource"] = {"type": rtype, "message": message}
        return _json(result)

    def _interaction_by_token(self, token: str) -> Json | None:
        return next((r for r in self.interactions.values() if r["data"]["token"] == token), None)

    async def _edit_webhook_message(self, request: web.Request, body: Any, application_id: str,
                                    token: str, message_id: str) -> web.Response:
        record = self._interaction_by_token(token)
        if record is None or application_id != str(self.application_id):
            return self._error(404, 10015, "Unknown Webhook")
        if not record["responses"]:
            return self._error(404, 10008, "Unknown Message")
        record["followups"].append(body or {})
        return _json({"id": message_id, "content": (body or {}).get("content", "")})

    async def _followup(self, request: web.Request, body: Any, application_id: str,
                        token: str) -> web.Response:
        record = self._interaction_by_token(token)
        if record is None or application_id != str(self.application_id):
            return self._error(404, 10015, "Unknown Webhook")
        channel = self.channels[int(record["data"]["channel_id"])]
        body = body or {}
        record["followups"].append(body)
        msg = self._message(channel, self.bot_user, body.get("content") or "",
                            flags=int(body.get("flags") or 0),
                            allowed_mentions_sent=body.get("allowed_mentions"))
        return _json(msg)

    async def _get_commands(self, request: web.Request, body: Any, application_id: str,
                            guild_id: str | None = None) -> web.Response:
        return _json(self.commands.get(guild_id or "global", []))

    async def _put_commands(self, request: web.Request, body: Any, application_id: str,
                            guild_id: str | None = None) -> web.Response:
        if application_id != str(self.application_id):
            return self._error(403, 50001, "Missing Access")
        if not isinstance(body, list):
            return self._form_error("_root", "LIST_TYPE_CONVERT", "Must be an array.")
        name_rx = re.compile(r"^[-_\w]{1,32}$")
        out = []
        for i, cmd in enumerate(body):
            name = cmd.get("name", "")
            if not name_rx.match(name) or name != name.lower():
                return self._form_error(f"{i}.name", "APPLICATION_COMMAND_INVALID_NAME",
                                        "Command name is invalid")
            if int(cmd.get("type", 1)) == 1 and not 1 <= len(cmd.get("description", "")) <= 100:
                return self._form_error(f"{i}.description", "BASE_TYPE_BAD_LENGTH",
                                        "Must be between 1 and 100 in length.")
            saved = {"id": str(self.ids.next()), "application_id": application_id,
                     "version": str(self.ids.next()), "type": 1, "options": [],
                     "default_member_permissions": None, "dm_permission": True, "nsfw": False,
                     "contexts": None, "integration_types": [0], **cmd}
            if guild_id is not None:
                saved["guild_id"] = guild_id
            out.append(saved)
        self.commands[guild_id or "global"] = out
        return _json(out)
