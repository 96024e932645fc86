"""The PostgreSQL store: the same tables and semantics as :class:`core.store.SQLiteStore`,
for several replicas sharing one database (SQLite stays the embedded default).

psycopg 3 over an async connection pool. What SQLite gets from its single writer, this gets
from the database: a redelivered message is stored once through the unique index
(``INSERT ... ON CONFLICT``), a ticket is claimed by one compare-and-set ``UPDATE``, ticket
opening locks its conversation's row, and the schema migrates under an advisory lock, so two
replicas starting together migrate once. Timestamps stay ISO text, as in SQLite, so rows
compare equal across the two; lease expiry is epoch seconds on the database's clock, so
replicas' clocks need not agree. A lost connection and a serialization failure or
deadlock are retried with backoff; a failure that persists becomes :class:`StoreError`.
The relay between replicas is LISTEN/NOTIFY (:class:`_Relay`).

PostgreSQL text cannot hold NUL characters: they are stored as U+FFFD.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC
from typing import Any, Literal, NoReturn, TypeVar

import psycopg
import psycopg_pool
from psycopg import AsyncConnection, Notify, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from core import metrics
from core.messages import Inbound, User
from core.store import (
    LOCK_RETRY_DELAYS_S,
    NO_REPLY_OUT,
    TRANSCRIPT_LINES,
    UNANSWERED_SELECT,
    ConversationState,
    EventType,
    RelayCallback,
    Scores,
    StoredInbound,
    StoreError,
    TranscriptLine,
    Unsubscribe,
    check_channel,
    event_row,
    now_iso,
    transcript_lines,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = AsyncConnection[dict[str, Any]]
Op = Callable[[Conn], Awaitable[T]]
Params = Sequence[Any] | dict[str, Any] | None

MIGRATION_LOCK_KEY = 0x5B_0751_0001
"""``pg_advisory_xact_lock`` key held while the schema is checked and migrated."""
LINK_LOCK_KEY = 0x5B_0751_0002
"""Held while customers are linked or unlinked: a merge reads two groups, then rewrites
them, and two merges at once must not interleave."""
CONNECT_TIMEOUT_S = 10
"""libpq's ``connect_timeout`` where the URL gives none."""
POOL_TIMEOUT_S = 5.0
"""How long a call waits for a pooled connection (the pool reconnects meanwhile)."""

SERIALIZATION_STATES = frozenset({"40001", "40P01", "55P03"})
"""serialization_failure, deadlock_detected, lock_not_available: rolled back, retry."""
CONNECTION_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})
"""admin/crash shutdown, cannot connect now, too many connections (plus class 08)."""

PG_NOW = "extract(epoch from clock_timestamp())::double precision"
"""Now, in epoch seconds, on the database's clock (the one all replicas share)."""

RELAY_PREFIX = "supportbot."
"""Before a relay channel's name, in PostgreSQL's namespace of channels."""
WAKE_PREFIX = "supportbot-wake."
"""Before a store's own id: the channel that tells its listener to take up new channels."""
NOTIFY_LIMIT_BYTES = 8000
"""A NOTIFY payload must be shorter; a longer one travels through ``relay_messages``."""
RELAY_KEEP_S = 300.0
"""How long a payload waits in ``relay_messages`` for listeners to read it."""
RELAY_PRUNE_EVERY_S = 60.0
"""How often (at most) a publisher deletes payloads older than :data:`RELAY_KEEP_S`."""
RELAY_POLL_S = 5.0
"""The listener's longest wait before it looks at its channels again unwoken."""
RELAY_BACKOFF_S: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
"""Pauses between the listener's reconnection attempts; the last repeats."""
SUBSCRIBE_WAIT_S = 5.0
"""How long :meth:`PostgresStore.subscribe` waits for its LISTEN before returning anyway."""
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
}
"""TCP keepalives for the listener's connection, where the URL sets none: it only waits,
so without them a silently dropped connection would look idle forever."""

PG_MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE users (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        platform TEXT NOT NULL,
        platform_user_id TEXT NOT NULL,
        display_name TEXT NOT NULL DEFAULT '',
        created_at TEXT COLLATE "C" NOT NULL,
        UNIQUE (platform, platform_user_id)
    );
    CREATE TABLE conversations (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        platform TEXT NOT NULL,
        conversation_key TEXT NOT NULL,
        user_id BIGINT NOT NULL REFERENCES users(id),
        state TEXT NOT NULL DEFAULT 'bot'
            CHECK (state IN ('bot', 'escalated', 'operator', 'resolved')),
        created_at TEXT COLLATE "C" NOT NULL,
        updated_at TEXT COLLATE "C" NOT NULL,
        UNIQUE (platform, conversation_key)
    );
    CREATE TABLE messages (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        conversation_id BIGINT NOT NULL REFERENCES conversations(id),
        direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
        sender TEXT NOT NULL,
        author TEXT,
        platform TEXT NOT NULL,
        platform_message_id TEXT,
        kind TEXT NOT NULL,
        text TEXT NOT NULL,
        payload TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL,
        reply_to BIGINT REFERENCES messages(id),
        created_at TEXT COLLATE "C" NOT NULL,
        sentiment TEXT,
        p_negative DOUBLE PRECISION,
        p_neutral DOUBLE PRECISION,
        p_positive DOUBLE PRECISION,
        first_token_ms DOUBLE PRECISION,
        latency_ms DOUBLE PRECISION,
        error TEXT
    );
    CREATE UNIQUE INDEX messages_inbound_once
        ON messages (platform, platform_message_id) WHERE direction = 'in';
    CREATE INDEX messages_conversation ON messages (conversation_id, id);
    CREATE INDEX messages_status ON messages (direction, status);
    CREATE TABLE events (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts TEXT COLLATE "C" NOT NULL,
        type TEXT NOT NULL,
        user_id BIGINT REFERENCES users(id),
        conversation_id BIGINT REFERENCES conversations(id),
        message_id BIGINT REFERENCES messages(id),
        item_id TEXT,
        position INTEGER,
        value TEXT,
        data TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_type_ts ON events (type, ts);
    CREATE INDEX events_user ON events (user_id, ts);
    CREATE TABLE tickets (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        conversation_id BIGINT NOT NULL REFERENCES conversations(id),
        state TEXT NOT NULL CHECK (state IN ('open', 'claimed', 'resolved', 'handed_back')),
        reason TEXT NOT NULL,
        scores TEXT NOT NULL DEFAULT '{}',
        created_at TEXT COLLATE "C" NOT NULL,
        announced_at TEXT COLLATE "C" NOT NULL,
        claimed_by TEXT,
        claimed_at TEXT COLLATE "C",
        first_response_at TEXT COLLATE "C",
        closed_at TEXT COLLATE "C",
        last_message_id BIGINT,
        note TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX tickets_state ON tickets (state, created_at);
    CREATE INDEX tickets_conversation ON tickets (conversation_id);
    """,
    # v2: linked accounts (see core.store.MIGRATIONS).
    """
    ALTER TABLE users ADD COLUMN customer_id BIGINT;
    CREATE INDEX users_customer ON users (customer_id);
    """,
    # v3: the console's same-name lookup (SQLite: COLLATE NOCASE).
    """
    CREATE INDEX users_display_name ON users (lower(display_name));
    """,
    # v4: recovery's "was a reply to it sent" lookup.
    """
    CREATE INDEX messages_reply_to ON messages (reply_to);
    """,
    # v5: conversation leases (see core.store.MIGRATIONS), and the relay's payloads too
    # long for a NOTIFY (created_at in epoch seconds; rows go after RELAY_KEEP_S).
    """
    CREATE TABLE conversation_leases (
        conversation_id BIGINT PRIMARY KEY REFERENCES conversations(id),
        owner TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE relay_messages (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        channel TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
    # v6: state replicas share (see core.store.MIGRATIONS).
    """
    CREATE TABLE shared_state (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (scope, key)
    );
    """,
)

PG_TAKE_LEASE = (
    "INSERT INTO conversation_leases AS l (conversation_id, owner, expires_at) "
    f"VALUES (%(id)s, %(owner)s, {PG_NOW} + %(ttl)s) ON CONFLICT (conversation_id) "
    "DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at "
    f"WHERE l.expires_at <= {PG_NOW} OR l.owner = EXCLUDED.owner RETURNING l.owner"
)
"""See :data:`core.store.TAKE_LEASE`."""

PG_MARK_REPLIED_ANSWERED = (
    "UPDATE messages SET status = 'answered' WHERE direction = 'in' AND status IN "
    "('received', 'processing') AND id <> ALL(%s::bigint[]) "
    "AND EXISTS (SELECT 1 FROM messages o WHERE o.reply_to = messages.id "
    "AND o.direction = 'out' AND o.sender IN ('bot', 'system') AND o.status = 'sent')"
)
"""core.store.MARK_REPLIED_ANSWERED in PostgreSQL (one parameter: the skipped ids)."""


def describe_url(url: str) -> str:
    """``url`` fit for logs: user, host, port and database, never the password."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://(unparsable URL)"
    user = f"{params['user']}@" if params.get("user") else ""
    host = str(params.get("host") or "")
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


def _text(value: str) -> str:
    return value.replace("\x00", "\ufffd")


def _cell(value: Any) -> Any:
    """A value as stored: text without NUL; a dict, list or tuple as JSON (as sqlite-utils
    stores them)."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict | list | tuple):
        return _text(json.dumps(value, ensure_ascii=False))
    return value


def _kind(exc: psycopg.Error) -> Literal["locked", "connection", "full", "other"]:
    state = exc.sqlstate
    if state in SERIALIZATION_STATES:
        return "locked"
    if state == "53100":
        return "full"
    if isinstance(exc, psycopg.OperationalError) and (
        state is None or state.startswith("08") or state in CONNECTION_STATES
    ):
        return "connection"
    return "other"


class _AlreadyStored(Exception):
    """Raised inside record_inbound's transaction to roll it back: a duplicate."""


class _Attempt:
    __slots__ = ("committing",)

    def __init__(self) -> None:
        self.committing = False


async def _one(conn: Conn, query: Any, params: Params = None) -> dict[str, Any] | None:
    cur = await conn.execute(query, params)
    return await cur.fetchone()


async def _all(conn: Conn, query: Any, params: Params = None) -> list[dict[str, Any]]:
    cur = await conn.execute(query, params)
    return await cur.fetchall()


async def _insert(conn: Conn, table: str, row: dict[str, Any]) -> int:
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING id").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, row)),
        sql.SQL(", ").join(sql.Placeholder() * len(row)),
    )
    inserted = await _one(conn, query, [_cell(v) for v in row.values()])
    assert inserted is not None
    return int(inserted["id"])


async def _update(conn: Conn, table: str, row_id: int, fields: dict[str, Any]) -> None:
    """Set ``fields`` on one row; a missing row is an error (as in sqlite-utils)."""
    if fields:
        query = sql.SQL("UPDATE {} SET {} WHERE id = %s").format(
            sql.Identifier(table),
            sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in fields),
        )
        cur = await conn.execute(query, [*map(_cell, fields.values()), row_id])
        found = cur.rowcount > 0
    else:
        found = await _one(
            conn, sql.SQL("SELECT 1 FROM {} WHERE id = %s").format(sql.Identifier(table)),
            [row_id],
        ) is not None
    if not found:
        raise StoreError(f"no {table} row {row_id}")


class _Relay:
    """A store's listening side of the relay: LISTEN on a connection of its own (a pooled
    one goes back to other work and would take the LISTENs with it), kept by one task that
    reconnects with backoff and LISTENs again. Delivery is at most once: what is published
    while the connection is down is lost. A notification reads ``<origin> = <payload>``,
    or ``<origin> # <relay_messages id>`` for a long payload; a store skips its own origin.
    """

    __slots__ = ("_acks", "_callbacks", "_connect_kwargs", "_listening", "_task", "origin",
                 "url", "wake_channel")

    def __init__(self, url: str, connect_kwargs: dict[str, Any]) -> None:
        self.url = url
        self._connect_kwargs = connect_kwargs
        self.origin = uuid.uuid4().hex
        self.wake_channel = WAKE_PREFIX + self.origin
        self._callbacks: dict[str, list[RelayCallback]] = {}
        self._listening: set[str] = set()
        self._acks: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    async def subscribe(
        self, channel: str, callback: RelayCallback, wake: Callable[[], Awaitable[None]]
    ) -> Unsubscribe:
        """Register ``callback``; a channel not yet listened to is waited for (up to
        :data:`SUBSCRIBE_WAIT_S`), so what is published after this returns arrives."""
        callbacks = self._callbacks.setdefault(channel, [])
        callbacks.append(callback)

        async def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                callbacks.remove(callback)
            if not callbacks and self._callbacks.get(channel) is callbacks:
                del self._callbacks[channel]  # UNLISTENed on the listener's next pass

        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"relay {self.origin[:8]}")
        if channel not in self._listening and asyncio.current_task() is not self._task:
            ack = asyncio.get_running_loop().create_future()
            self._acks.append(ack)
            try:
                await wake()
                await asyncio.wait_for(asyncio.shield(ack), SUBSCRIBE_WAIT_S)
            except TimeoutError:
                log.warning("relay: not listening on %s yet (%s unreachable); it starts "
                            "when the database answers", channel, describe_url(self.url))
            except BaseException:  # cancelled: the caller never gets its unsubscribe
                await unsubscribe()
                raise
        return unsubscribe

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._listening.clear()
        self._callbacks.clear()
        for ack in self._acks:
            if not ack.done():
                ack.set_result(None)
        self._acks.clear()

    async def _run(self) -> None:
        """Connect, LISTEN and deliver; after a failure, the same again after a pause that
        grows while failures follow one another."""
        failures = 0
        while True:
            try:
                conn = await AsyncConnection.connect(self.url, **self._connect_kwargs)
                async with conn:
                    await conn.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(self.wake_channel)))
                    await self._sync(conn)
                    if failures:
                        log.warning("relay: listening again on %s", describe_url(self.url))
                        failures = 0
                    await self._listen(conn)
            except psycopg.Error as exc:
                delay = self._backoff(failures)
                log.warning("relay: connection to %s lost or refused (%s); reconnecting in "
                            "%.1f s", describe_url(self.url), exc, delay)
            except Exception:  # a bug: logged in full, and the relay carries on
                delay = self._backoff(failures)
                log.exception("relay: the listener failed; restarting in %.1f s", delay)
            self._listening.clear()
            failures += 1
            await asyncio.sleep(delay)

    @staticmethod
    def _backoff(failures: int) -> float:
        return RELAY_BACKOFF_S[min(failures, len(RELAY_BACKOFF_S) - 1)]

    async def _listen(self, conn: Conn) -> NoReturn:
        """Deliver until the connection fails."""
        while True:
            # Collected first: the connection is locked while notifies() runs.
            notes = [n async for n in conn.notifies(timeout=RELAY_POLL_S, stop_after=1)]
            for note in notes:
                if note.channel != self.wake_channel:
                    await self._deliver(conn, note)
            await self._sync(conn)

    async def _sync(self, conn: Conn) -> None:
        """LISTEN to the channels with subscribers, UNLISTEN the rest, then acknowledge
        the subscriptions made before this pass began."""
        waiting = len(self._acks)
        wanted = {c for c, callbacks in self._callbacks.items() if callbacks}
        for channel in sorted(wanted - self._listening):
            await conn.execute(sql.SQL("LISTEN {}").format(
                sql.Identifier(RELAY_PREFIX + channel)))
            self._listening.add(channel)
        for channel in sorted(self._listening - wanted):
            await conn.execute(sql.SQL("UNLISTEN {}").format(
                sql.Identifier(RELAY_PREFIX + channel)))
            self._listening.discard(channel)
        acks = self._acks[:waiting]
        del self._acks[:waiting]
        for ack in acks:
            if not ack.done():
                ack.set_result(None)

    async def _deliver(self, conn: Conn, note: Notify) -> None:
        """One notification to this store's subscribers, in order; a subscriber's failure
        is logged and the others still get it."""
        channel = note.channel.removeprefix(RELAY_PREFIX)
        origin, _, rest = note.payload.partition(" ")
        kind, _, payload = rest.partition(" ")
        if origin == self.origin:
            return
        if kind == "#" and payload.isdigit():
            row = await _one(conn, "SELECT payload FROM relay_messages WHERE id = %s",
                             [int(payload)])
            if row is None:
                log.warning("relay: a message on %s was deleted before it was read", channel)
                return
            payload = row["payload"]
        elif kind != "=":
            log.warning("relay: ignored a notification on %s not sent by a store", channel)
            return
        for callback in list(self._callbacks.get(channel, ())):
            try:
                result = callback(payload)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("relay: a subscriber to %s failed", channel)


class PostgresStore:
    """All persistence, on a pool of connections to one PostgreSQL database."""

    __slots__ = ("_connect_kwargs", "_pool", "_pruned_at", "_relay", "_version", "max_size",
                 "min_size", "url")

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 4) -> None:
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error:
            raise StoreError("invalid PostgreSQL URL") from None
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self._connect_kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
        if "connect_timeout" not in params:
            self._connect_kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
        self._pool: psycopg_pool.AsyncConnectionPool[Conn] | None = None
        self._version: int | None = None
        keepalives = {k: v for k, v in KEEPALIVES.items() if k not in params}
        self._relay = _Relay(url, {**keepalives, **self._connect_kwargs})
        self._pruned_at = float("-inf")

    def __repr__(self) -> str:
        return f"PostgresStore({describe_url(self.url)!r})"

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Check and migrate the schema on a connection of its own (a refused connection
        gets libpq's own message, not a pool timeout), then open the pool."""
        self._version = await self._retrying(self._migrate_once)
        pool: psycopg_pool.AsyncConnectionPool[Conn] = psycopg_pool.AsyncConnectionPool(
            self.url, connection_class=AsyncConnection, kwargs=self._connect_kwargs,
            min_size=self.min_size, max_size=self.max_size, open=False,
            timeout=POOL_TIMEOUT_S, name="supportbot-store",
        )
        try:
            await pool.open(wait=True, timeout=POOL_TIMEOUT_S)
        except psycopg.Error as exc:
            await pool.close()
            metrics.STORE_ERRORS.labels("connection").inc()
            log.error("database error (connection) on %s: %s", describe_url(self.url), exc)
            raise StoreError(f"{describe_url(self.url)}: {exc}") from exc
        self._pool = pool

    async def _migrate_once(self, attempt: _Attempt) -> int:
        conn = await AsyncConnection.connect(self.url, **self._connect_kwargs)
        async with conn:
            async with conn.transaction():
                version = await self._migrate(conn)
                attempt.committing = True
            return version

    async def _migrate(self, conn: Conn) -> int:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK_KEY])
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (one BOOLEAN PRIMARY KEY DEFAULT TRUE "
            "CHECK (one), version INTEGER NOT NULL)"
        )
        await conn.execute("INSERT INTO schema_version (version) VALUES (0) ON CONFLICT DO NOTHING")
        row = await _one(conn, "SELECT version FROM schema_version")
        assert row is not None
        version = int(row["version"])
        if version > len(PG_MIGRATIONS):
            raise StoreError(
                f"{describe_url(self.url)}: schema version {version} is newer than this code "
                f"({len(PG_MIGRATIONS)}); upgrade supportbot"
            )
        for script in PG_MIGRATIONS[version:]:
            await conn.execute(script)
        if version < len(PG_MIGRATIONS):
            await conn.execute("UPDATE schema_version SET version = %s", [len(PG_MIGRATIONS)])
        return len(PG_MIGRATIONS)

    async def close(self) -> None:
        await self._relay.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> psycopg_pool.AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise StoreError("store not opened")
        return self._pool

    @property
    def schema_version(self) -> int:
        """The version read (and migrated to) when the store was opened."""
        if self._version is None:
            raise StoreError("store not opened")
        return self._version

    async def _retrying(self, attempt_fn: Callable[[_Attempt], Awaitable[T]]) -> T:
        """``attempt_fn`` until it works: a serialization failure or deadlock (rolled back)
        and a lost connection are retried with backoff, except a connection lost while
        committing (the commit may have happened; a retry could apply it twice). Any other
        failure, or one that persists, becomes :class:`StoreError`, counted and logged."""
        for delay in (*LOCK_RETRY_DELAYS_S, None):
            attempt = _Attempt()
            try:
                return await attempt_fn(attempt)
            except psycopg_pool.PoolTimeout as exc:  # the pool already waited and retried
                kind, error = "connection", exc
            except psycopg.Error as exc:
                kind, error = _kind(exc), exc
                retry = kind == "locked" or (kind == "connection" and not attempt.committing)
                if delay is not None and retry:
                    metrics.STORE_RETRIES.inc()
                    await asyncio.sleep(delay)
                    continue
            metrics.STORE_ERRORS.labels(kind).inc()
            log.error("database error (%s) on %s: %s", kind, describe_url(self.url), error)
            raise StoreError(f"{describe_url(self.url)}: {error}",
                             rejected=isinstance(error, psycopg.IntegrityError)) from error
        raise AssertionError("unreachable")

    async def _tx(self, op: Op[T]) -> T:
        """``op`` in one transaction on a pooled connection, retried as a whole."""

        async def attempt_fn(attempt: _Attempt) -> T:
            async with self.pool.connection() as conn, conn.transaction():
                result = await op(conn)
                attempt.committing = True
            return result

        return await self._retrying(attempt_fn)

    async def _single(self, op: Op[T]) -> T:
        """One idempotent statement in autocommit (its own transaction, no BEGIN and
        COMMIT round trips): safe to retry, since running it twice leaves what once does."""
        return await self._read(op)

    async def _read(self, op: Op[T]) -> T:
        """``op`` outside a transaction (reads only: always safe to retry)."""

        async def attempt_fn(attempt: _Attempt) -> T:
            async with self.pool.connection() as conn:
                return await op(conn)

        return await self._retrying(attempt_fn)

    async def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict]:
        """Read-only SQL for reports and tests, in PostgreSQL's dialect (``%s``)."""
        args = params or None  # none: a literal % needs no escaping
        return await self._read(lambda conn: _all(conn, sql, args))

    # -- inbound ---------------------------------------------------------------------

    async def record_inbound(self, inbound: Inbound) -> StoredInbound | None:
        """Commit an inbound event; ``None`` when the platform already delivered it, also
        when another replica stores the same delivery at the same moment."""
        try:
            return await self._tx(lambda conn: self._record_inbound(conn, inbound))
        except _AlreadyStored:
            return None

    async def _record_inbound(self, conn: Conn, inbound: Inbound) -> StoredInbound:
        platform, message_id = _text(inbound.platform), _text(inbound.platform_message_id)
        seen = await _one(
            conn,
            "SELECT 1 FROM messages WHERE direction = 'in' AND platform = %s "
            "AND platform_message_id = %s",
            [platform, message_id],
        )
        if seen:
            raise _AlreadyStored
        user_id = await self._user_id(conn, inbound.user)
        key = _text(inbound.conversation_key)
        find = "SELECT id, state FROM conversations WHERE platform = %s AND conversation_key = %s"
        row = await _one(conn, find, [platform, key])
        if row is None:
            ts = now_iso()
            row = await _one(
                conn,
                "INSERT INTO conversations (platform, conversation_key, user_id, state, "
                "created_at, updated_at) VALUES (%s, %s, %s, 'bot', %s, %s) "
                "ON CONFLICT (platform, conversation_key) DO NOTHING RETURNING id, state",
                [platform, key, user_id, ts, ts],
            ) or await _one(conn, find, [platform, key])
            assert row is not None
        stored = await _one(
            conn,
            "INSERT INTO messages (conversation_id, direction, sender, platform, "
            "platform_message_id, kind, text, payload, status, created_at) "
            "VALUES (%s, 'in', 'customer', %s, %s, %s, %s, %s, 'received', %s) "
            "ON CONFLICT (platform, platform_message_id) WHERE direction = 'in' DO NOTHING "
            "RETURNING id",
            [
                row["id"], platform, message_id, inbound.kind.value, _text(inbound.text),
                _text(inbound.payload),
                inbound.sent_at.astimezone(UTC).isoformat(timespec="milliseconds"),
            ],
        )
        if stored is None:  # another replica stored it since the check: undo ours
            raise _AlreadyStored
        return StoredInbound(int(stored["id"]), int(row["id"]), user_id, row["state"])

    @staticmethod
    async def _user_id(conn: Conn, user: User) -> int:
        platform, platform_user_id = _text(user.platform), _text(user.platform_user_id)
        name = _text(user.display_name)
        find = "SELECT id, display_name FROM users WHERE platform = %s AND platform_user_id = %s"
        row = await _one(conn, find, [platform, platform_user_id])
        if row is not None and (not name or row["display_name"] == name):
            return int(row["id"])
        # New, or renamed: insert or update in one statement, whoever else is at it.
        row = await _one(
            conn,
            "INSERT INTO users (platform, platform_user_id, display_name, created_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (platform, platform_user_id) DO UPDATE "
            "SET display_name = EXCLUDED.display_name WHERE EXCLUDED.display_name <> '' "
            "AND users.display_name <> EXCLUDED.display_name RETURNING id",
            [platform, platform_user_id, name, now_iso()],
        ) or await _one(conn, find, [platform, platform_user_id])
        assert row is not None
        return int(row["id"])

    async def set_inbound_status(self, message_id: int, status: str) -> None:
        await self._tx(lambda conn: _update(conn, "messages", message_id, {"status": status}))

    async def set_sentiment(self, message_id: int, scores: Scores) -> None:
        fields = {
            "sentiment": scores.label, "p_negative": scores.negative,
            "p_neutral": scores.neutral, "p_positive": scores.positive,
        }
        await self._tx(lambda conn: _update(conn, "messages", message_id, fields))

    async def unfinished_inbound(
        self, skip: Sequence[int] = (), conversations: Sequence[int] | None = None
    ) -> list[dict]:
        """Inbound messages accepted but never answered; see
        :meth:`core.store.SQLiteStore.unfinished_inbound` for the rules."""
        scope, args = "", [[int(i) for i in skip]]
        if conversations is not None:
            scope = " AND conversation_id = ANY(%s::bigint[])"
            args.append([int(c) for c in conversations])

        async def op(conn: Conn) -> list[dict]:
            await conn.execute(
                "UPDATE messages SET status = 'sent' WHERE direction = 'out' AND status = "
                "'sending' AND (reply_to IS NULL OR reply_to <> ALL(%s::bigint[]))" + scope,
                args,
            )
            await conn.execute(PG_MARK_REPLIED_ANSWERED + scope, args)
            await conn.execute(
                "UPDATE messages SET status = 'failed', error = 'interrupted' "
                "WHERE direction = 'out' AND status = 'pending' AND (reply_to IS NULL OR "
                "reply_to <> ALL(%s::bigint[]))" + scope,
                args,
            )
            return await _all(
                conn, UNANSWERED_SELECT + "AND m.id <> ALL(%s::bigint[])" + scope
                + " ORDER BY m.id", args,
            )

        return await self._tx(op)

    async def unanswered_inbound(self, conversation_id: int) -> list[dict]:
        """See :meth:`core.store.SQLiteStore.unanswered_inbound`."""
        return await self.query(
            UNANSWERED_SELECT + NO_REPLY_OUT + "AND m.conversation_id = %s ORDER BY m.id",
            [conversation_id])

    # -- leases: one replica at a time per conversation ----------------------------------

    async def take_conversation(self, conversation_id: int, owner: str, ttl_s: float) -> bool:
        """See :meth:`core.store.SQLiteStore.take_conversation`. Of two takers at once, the
        second waits for the first's row and then finds it live and not its own."""
        row = await self._single(lambda conn: _one(
            conn,
            PG_TAKE_LEASE,
            {"id": conversation_id, "owner": _text(owner), "ttl": float(ttl_s)},
        ))
        return row is not None

    async def extend_conversation(self, conversation_id: int, owner: str, ttl_s: float
                                  ) -> bool:
        """See :meth:`core.store.SQLiteStore.extend_conversation`."""
        row = await self._single(lambda conn: _one(
            conn,
            f"UPDATE conversation_leases SET expires_at = {PG_NOW} + %s WHERE "
            f"conversation_id = %s AND owner = %s AND expires_at > {PG_NOW} "
            "RETURNING conversation_id",
            [float(ttl_s), conversation_id, _text(owner)],
        ))
        return row is not None

    async def fence_conversation(self, conversation_id: int, owner: str, ttl_s: float,
                                 message_id: int) -> str | None:
        """See :meth:`core.store.SQLiteStore.fence_conversation`: one statement, the lease
        taken in a CTE, the status read beside it."""
        row = await self._single(lambda conn: _one(
            conn,
            f"WITH lease AS ({PG_TAKE_LEASE}) "
            "SELECT (SELECT status FROM messages WHERE id = %(message)s AND direction = 'in') "
            "AS status FROM lease",
            {"id": conversation_id, "owner": _text(owner), "ttl": float(ttl_s),
             "message": message_id},
        ))
        if row is None:
            return None
        return "" if row["status"] is None else str(row["status"])

    async def renew_conversations(self, owner: str, ttl_s: float) -> list[int]:
        """See :meth:`core.store.SQLiteStore.renew_conversations`."""
        rows = await self._single(lambda conn: _all(
            conn,
            f"UPDATE conversation_leases SET expires_at = {PG_NOW} + %s WHERE owner = %s "
            "RETURNING conversation_id",
            [float(ttl_s), _text(owner)],
        ))
        return sorted(int(r["conversation_id"]) for r in rows)

    async def release_conversation(self, conversation_id: int, owner: str) -> None:
        """See :meth:`core.store.SQLiteStore.release_conversation`."""
        await self._single(lambda conn: conn.execute(
            "DELETE FROM conversation_leases WHERE conversation_id = %s AND owner = %s",
            [conversation_id, _text(owner)],
        ))

    async def orphaned_conversations(self, owner: str, limit: int = 100) -> list[int]:
        """See :meth:`core.store.SQLiteStore.orphaned_conversations`."""
        rows = await self.query(
            "SELECT m.conversation_id FROM messages m "
            "LEFT JOIN conversation_leases l ON l.conversation_id = m.conversation_id "
            "WHERE m.direction = 'in' AND m.status IN ('received', 'processing') "
            f"AND (l.owner IS NULL OR l.owner = %s OR l.expires_at <= {PG_NOW}) "
            "GROUP BY m.conversation_id ORDER BY MIN(m.id) LIMIT %s",
            [_text(owner), limit],
        )
        return [int(r["conversation_id"]) for r in rows]

    # -- state replicas share ----------------------------------------------------------

    async def shared(self, scope: str, key: str) -> str | None:
        """See :meth:`core.store.SQLiteStore.shared`."""
        row = await self._read(lambda conn: _one(
            conn, "SELECT value FROM shared_state WHERE scope = %s AND key = %s",
            [_text(scope), _text(key)]))
        return None if row is None else str(row["value"])

    async def share_if(self, scope: str, key: str, value: str, expected: str | None) -> str:
        """See :meth:`core.store.SQLiteStore.share_if`. Of two writers at once the second
        waits for the first's row, then finds its expectation met or not."""
        args = {"scope": _text(scope), "key": _text(key), "value": _text(value),
                "expected": None if expected is None else _text(expected)}

        async def op(conn: Conn) -> str:
            if expected is None:
                await conn.execute(
                    "INSERT INTO shared_state (scope, key, value, updated_at) VALUES "
                    f"(%(scope)s, %(key)s, %(value)s, {PG_NOW}) ON CONFLICT DO NOTHING", args)
            else:
                await conn.execute(
                    f"UPDATE shared_state SET value = %(value)s, updated_at = {PG_NOW} "
                    "WHERE scope = %(scope)s AND key = %(key)s AND value = %(expected)s", args)
            row = await _one(conn, "SELECT value FROM shared_state "
                                   "WHERE scope = %(scope)s AND key = %(key)s", args)
            return "" if row is None else str(row["value"])

        return await self._tx(op)

    async def forget_shared(self, scope: str, older_than_s: float) -> int:
        """See :meth:`core.store.SQLiteStore.forget_shared`."""

        async def op(conn: Conn) -> int:
            cur = await conn.execute(
                f"DELETE FROM shared_state WHERE scope = %s AND updated_at < {PG_NOW} - %s",
                [_text(scope), float(older_than_s)])
            return int(cur.rowcount)

        return await self._tx(op)

    # -- relay between replicas ------------------------------------------------------------

    async def publish(self, channel: str, payload: str) -> None:
        """Send ``payload`` to the subscribers of ``channel`` in every other store on this
        database (this one's own are skipped), in order, at most once. One too long for a
        NOTIFY is stored in ``relay_messages`` and the notification names its row; now and
        then a publisher deletes the rows listeners have had time to read."""
        name = RELAY_PREFIX + check_channel(channel)
        text = _text(payload)
        inline = f"{self._relay.origin} = {text}"
        notify = "SELECT pg_notify(%s, %s)"
        if len(inline.encode()) < NOTIFY_LIMIT_BYTES:
            await self._tx(lambda conn: conn.execute(notify, [name, inline]))
            return
        prune = time.monotonic() - self._pruned_at > RELAY_PRUNE_EVERY_S

        async def op(conn: Conn) -> None:
            row = await _one(
                conn,
                "INSERT INTO relay_messages (channel, payload, created_at) "
                f"VALUES (%s, %s, {PG_NOW}) RETURNING id",
                [channel, text],
            )
            assert row is not None
            await conn.execute(notify, [name, f"{self._relay.origin} # {row['id']}"])
            if prune:
                await conn.execute(
                    f"DELETE FROM relay_messages WHERE created_at < {PG_NOW} - %s",
                    [RELAY_KEEP_S],
                )

        await self._tx(op)
        if prune:
            self._pruned_at = time.monotonic()

    async def subscribe(self, channel: str, callback: RelayCallback) -> Unsubscribe:
        """Call ``callback`` with each payload other stores publish on ``channel``, from
        when this returns, in order, until the returned unsubscribe is awaited. Callbacks
        run one at a time on the listener's task: a slow one delays the rest."""
        check_channel(channel)
        if self._pool is None:
            raise StoreError("store not opened")
        return await self._relay.subscribe(channel, callback, self._wake_listener)

    async def _wake_listener(self) -> None:
        """Best effort: the listener takes a new channel up now instead of at its next
        poll (within :data:`RELAY_POLL_S`)."""
        try:
            async with self.pool.connection() as conn:
                await conn.execute("SELECT pg_notify(%s, '')", [self._relay.wake_channel])
        except psycopg.Error as exc:
            log.debug("relay: could not wake the listener: %s", exc)

    # -- outbound --------------------------------------------------------------------

    async def begin_outbound(
        self, conversation_id: int, platform: str, sender: str, reply_to: int | None,
        text: str = "", status: Literal["pending", "sending"] = "pending",
    ) -> int:
        """Record an outbound message before it is sent: ``pending`` while its text is
        still being generated, ``sending`` once it is complete and about to go out."""
        row = {
            "conversation_id": conversation_id, "direction": "out", "sender": sender,
            "platform": platform, "kind": "text", "text": text, "status": status,
            "reply_to": reply_to, "created_at": now_iso(),
        }
        return await self._tx(lambda conn: _insert(conn, "messages", row))

    async def finish_outbound(self, message_id: int, **fields: Any) -> None:
        """Mark an outbound message sent or failed, with its text and timings."""
        await self._tx(lambda conn: _update(conn, "messages", message_id, fields))

    async def outbound_by_platform_id(self, platform: str, platform_message_id: str) -> dict | None:
        """The message the bot sent with this platform id (what a reaction points at)."""
        rows = await self.query(
            "SELECT * FROM messages WHERE direction = 'out' AND platform = %s "
            "AND platform_message_id = %s ORDER BY id DESC LIMIT 1",
            [_text(platform), _text(platform_message_id)],
        )
        return rows[0] if rows else None

    # -- conversations ---------------------------------------------------------------

    async def conversation(self, conversation_id: int) -> dict:
        rows = await self.query(
            "SELECT c.*, u.platform_user_id, u.display_name FROM conversations c "
            "JOIN users u ON u.id = c.user_id WHERE c.id = %s",
            [conversation_id],
        )
        if not rows:
            raise StoreError(f"no conversation {conversation_id}")
        return rows[0]

    async def conversation_by_key(self, platform: str, conversation_key: str) -> dict | None:
        rows = await self.query(
            "SELECT * FROM conversations WHERE platform = %s AND conversation_key = %s",
            [_text(platform), _text(conversation_key)],
        )
        return rows[0] if rows else None

    async def set_state(self, conversation_id: int, state: ConversationState) -> None:
        fields = {"state": state, "updated_at": now_iso()}
        await self._tx(lambda conn: _update(conn, "conversations", conversation_id, fields))

    async def history(self, conversation_id: int, before_id: int, limit: int) -> list[dict]:
        """Recent text turns before a message, oldest first, for the prompt."""
        rows = await self.query(
            "SELECT id, direction, sender, text FROM messages WHERE conversation_id = %s "
            "AND id < %s AND kind = 'text' AND text <> '' AND status <> 'failed' "
            "ORDER BY id DESC LIMIT %s",
            [conversation_id, before_id, limit],
        )
        return rows[::-1]

    async def recent_negative(self, conversation_id: int, limit: int) -> list[float]:
        """P(negative) of the customer's latest messages since the last closed ticket."""
        rows = await self.recent_customer_messages(conversation_id, limit)
        return [r["p_negative"] for r in rows]

    async def recent_customer_messages(self, conversation_id: int, limit: int) -> list[dict]:
        """The customer's latest scored text messages since the last closed ticket,
        oldest first (text and p_negative), for the escalation policy."""
        rows = await self.query(
            "SELECT text, p_negative FROM messages WHERE conversation_id = %s "
            "AND direction = 'in' AND p_negative IS NOT NULL AND id > COALESCE((SELECT "
            "MAX(last_message_id) FROM tickets WHERE conversation_id = %s AND closed_at IS "
            "NOT NULL), 0) ORDER BY id DESC LIMIT %s",
            [conversation_id, conversation_id, limit],
        )
        return rows[::-1]

    async def last_customer_text(self, conversation_id: int) -> str | None:
        """The customer's latest text message (what an operator sees first)."""
        rows = await self.query(
            "SELECT text FROM messages WHERE conversation_id = %s AND direction = 'in' "
            "AND kind = 'text' ORDER BY id DESC LIMIT 1",
            [conversation_id],
        )
        return rows[0]["text"] if rows else None

    async def inbound_status(self, message_id: int) -> str | None:
        """See :meth:`core.store.SQLiteStore.inbound_status`."""
        rows = await self.query(
            "SELECT status FROM messages WHERE id = %s AND direction = 'in'", [message_id])
        return rows[0]["status"] if rows else None

    async def transcript(self, conversation_id: int, limit: int = 200) -> list[TranscriptLine]:
        rows = await self.query(
            "SELECT id, direction, sender, text, created_at, sentiment, p_negative, "
            "platform_message_id, payload FROM messages WHERE conversation_id = %s "
            f"AND {TRANSCRIPT_LINES} ORDER BY id DESC LIMIT %s",
            [conversation_id, limit],
        )
        return transcript_lines(rows)

    # -- behavior log ----------------------------------------------------------------

    async def log_event(
        self,
        type: EventType,
        *,
        user_id: int | None = None,
        conversation_id: int | None = None,
        message_id: int | None = None,
        item_id: str | None = None,
        position: int | None = None,
        value: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        row = event_row(type, user_id=user_id, conversation_id=conversation_id,
                        message_id=message_id, item_id=item_id, position=position,
                        value=value, data=data)
        await self._tx(lambda conn: _insert(conn, "events", row))

    async def log_events(self, rows: Sequence[dict[str, Any]]) -> None:
        """Several events in one transaction (the items of one suggestion list)."""
        if not rows:
            return
        ts = now_iso()
        full = [{"ts": ts, "data": "{}", **r} for r in rows]
        columns = list(dict.fromkeys(c for r in full for c in r))  # missing ones are NULL
        query = sql.SQL("INSERT INTO events ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        )
        values = [[_cell(r.get(c)) for c in columns] for r in full]

        async def op(conn: Conn) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(query, values)

        await self._tx(op)

    async def user_events(self, user_id: int) -> list[dict]:
        """See :meth:`core.store.SQLiteStore.user_events`."""
        return await self.query(
            "SELECT type, item_id, conversation_id, value FROM events WHERE user_id = %s "
            "AND item_id IS NOT NULL AND type IN "
            "('suggestion_shown', 'suggestion_clicked', 'article_viewed', 'feedback') "
            "ORDER BY id",
            [user_id],
        )

    # -- tickets ---------------------------------------------------------------------

    async def open_ticket(self, conversation_id: int, reason: str, scores: dict) -> int | None:
        """Open a ticket and mark the conversation escalated; ``None`` if one is open.
        The conversation's row is locked first, so two replicas cannot both open one."""

        async def op(conn: Conn) -> int | None:
            await conn.execute(
                "SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", [conversation_id]
            )
            open_row = await _one(
                conn,
                "SELECT id FROM tickets WHERE conversation_id = %s "
                "AND state IN ('open', 'claimed')",
                [conversation_id],
            )
            if open_row:
                return None
            ts = now_iso()
            ticket_id = await _insert(conn, "tickets", {
                "conversation_id": conversation_id, "state": "open", "reason": reason,
                "scores": json.dumps(scores), "created_at": ts, "announced_at": ts,
            })
            await _update(conn, "conversations", conversation_id,
                          {"state": "escalated", "updated_at": ts})
            return ticket_id

        return await self._tx(op)

    async def claim_ticket(self, ticket_id: int, claimed_by: str, claimed_at: str) -> bool:
        """Claim an open ticket, its conversation going to the operator: ``True`` only for
        the one caller that moved it from open to claimed (a concurrent ``UPDATE`` waits for
        the first and then finds the ticket no longer open)."""

        async def op(conn: Conn) -> bool:
            row = await _one(
                conn,
                "UPDATE tickets SET state = 'claimed', claimed_by = %s, claimed_at = %s "
                "WHERE id = %s AND state = 'open' RETURNING conversation_id",
                [_text(claimed_by), claimed_at, ticket_id],
            )
            if row is None:
                return False
            await _update(conn, "conversations", row["conversation_id"],
                          {"state": "operator", "updated_at": now_iso()})
            return True

        return await self._tx(op)

    async def update_ticket(
        self, ticket_id: int, conversation_state: ConversationState | None = None, **fields: Any
    ) -> None:
        """Change a ticket (and its conversation's state) in one transaction; closing it
        records the conversation's last message, where the next escalation window starts."""

        async def op(conn: Conn) -> None:
            row = await _one(
                conn, "SELECT conversation_id FROM tickets WHERE id = %s FOR UPDATE", [ticket_id]
            )
            if row is None:
                raise StoreError(f"no ticket {ticket_id}")
            conversation_id = row["conversation_id"]
            changes = dict(fields)
            if changes.get("closed_at"):
                last = await _one(
                    conn, "SELECT MAX(id) AS id FROM messages WHERE conversation_id = %s",
                    [conversation_id],
                )
                changes["last_message_id"] = last["id"] if last else None
            await _update(conn, "tickets", ticket_id, changes)
            if conversation_state is not None:
                await _update(conn, "conversations", conversation_id,
                              {"state": conversation_state, "updated_at": now_iso()})

        await self._tx(op)

    async def ticket(self, ticket_id: int) -> dict | None:
        rows = await self.query("SELECT * FROM tickets WHERE id = %s", [ticket_id])
        return rows[0] if rows else None

    async def active_ticket(self, conversation_id: int) -> dict | None:
        rows = await self.query(
            "SELECT * FROM tickets WHERE conversation_id = %s "
            "AND state IN ('open', 'claimed') ORDER BY id DESC LIMIT 1",
            [conversation_id],
        )
        return rows[0] if rows else None

    async def tickets(self, states: Sequence[str]) -> list[dict]:
        return await self.query(
            "SELECT * FROM tickets WHERE state = ANY(%s::text[]) ORDER BY created_at, id",
            [list(states)],
        )

    # -- customers: one person's linked accounts -----------------------------------------

    async def user(self, user_id: int) -> dict | None:
        rows = await self.query("SELECT * FROM users WHERE id = %s", [user_id])
        return rows[0] if rows else None

    async def user_by_platform_id(self, platform: str, platform_user_id: str) -> dict | None:
        rows = await self.query(
            "SELECT * FROM users WHERE platform = %s AND platform_user_id = %s",
            [_text(platform), _text(platform_user_id)],
        )
        return rows[0] if rows else None

    async def users_named(self, display_name: str, limit: int) -> list[dict]:
        """See :meth:`core.store.SQLiteStore.users_named` (the index is on ``lower``)."""
        return await self.query(
            "SELECT id, platform, platform_user_id, display_name FROM users "
            "WHERE lower(display_name) = lower(%s) ORDER BY id DESC LIMIT %s",
            [_text(display_name), limit],
        )

    @staticmethod
    async def _group(conn: Conn, user_id: int) -> list[int]:
        """The ids of every user linked with ``user_id`` (itself included), ascending."""
        row = await _one(conn, "SELECT customer_id FROM users WHERE id = %s", [user_id])
        if row is None:
            raise StoreError(f"no user {user_id}")
        if row["customer_id"] is None:
            return [user_id]
        rows = await _all(
            conn, "SELECT id FROM users WHERE customer_id = %s ORDER BY id", [row["customer_id"]]
        )
        return [int(r["id"]) for r in rows]

    @staticmethod
    async def _set_customer(conn: Conn, customer_id: int | None, ids: Iterable[int]) -> None:
        await conn.execute(
            "UPDATE users SET customer_id = %s WHERE id = ANY(%s::bigint[])",
            [customer_id, list(ids)],
        )

    async def linked_users(self, user_id: int) -> list[dict]:
        """Every account of the customer ``user_id`` belongs to (itself included)."""

        async def op(conn: Conn) -> list[dict]:
            return await _all(
                conn,
                "SELECT id, platform, platform_user_id, display_name, created_at FROM users "
                "WHERE id = ANY(%s::bigint[]) ORDER BY id",
                [await self._group(conn, user_id)],
            )

        return await self._tx(op)

    async def link_users(self, user_id: int, other_id: int) -> list[int]:
        """Make two users (and everyone already linked with either) one customer; returns
        the merged group's user ids."""

        async def op(conn: Conn) -> list[int]:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [LINK_LOCK_KEY])
            merged = sorted({*await self._group(conn, user_id), *await self._group(conn, other_id)})
            await self._set_customer(conn, merged[0], merged)
            return merged

        return await self._tx(op)

    async def unlink_user(self, user_id: int) -> list[int]:
        """Take one user out of its customer; returns the ids left linked together (empty
        when the user was linked to nobody, or one account remains alone)."""

        async def op(conn: Conn) -> list[int]:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [LINK_LOCK_KEY])
            group = await self._group(conn, user_id)
            if len(group) < 2:
                return []
            rest = [i for i in group if i != user_id]
            await self._set_customer(conn, None, [user_id])
            await self._set_customer(conn, rest[0] if len(rest) > 1 else None, rest)
            return rest if len(rest) > 1 else []

        return await self._tx(op)

    async def customer_conversations(self, user_id: int, limit: int = 50) -> list[dict]:
        """The conversations of every account linked with ``user_id``, most recently
        active first: platform, account, state, size, mood, tickets, last words."""

        async def op(conn: Conn) -> list[dict]:
            return await _all(
                conn,
                "SELECT c.id, c.platform, c.conversation_key, c.user_id, u.platform_user_id, "
                "u.display_name, c.state, c.created_at, c.updated_at, "
                "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id "
                " AND m.direction = 'in' AND m.kind = 'text') AS messages, "
                "(SELECT AVG(p_negative) FROM messages m WHERE m.conversation_id = c.id "
                " AND m.direction = 'in' AND m.p_negative IS NOT NULL) AS mean_negative, "
                "(SELECT COUNT(*) FROM tickets t WHERE t.conversation_id = c.id) AS tickets, "
                "(SELECT string_agg(reason, ', ' ORDER BY t.id) FROM tickets t "
                " WHERE t.conversation_id = c.id) AS reasons, "
                "(SELECT text FROM messages m WHERE m.conversation_id = c.id "
                " AND m.direction = 'in' AND m.kind = 'text' ORDER BY m.id DESC LIMIT 1) "
                " AS last_text, "
                "COALESCE((SELECT MAX(created_at) FROM messages m "
                " WHERE m.conversation_id = c.id), c.updated_at) AS last_at "
                "FROM conversations c JOIN users u ON u.id = c.user_id "
                "WHERE c.user_id = ANY(%s::bigint[]) "
                "ORDER BY last_at DESC, c.id DESC LIMIT %s",
                [await self._group(conn, user_id), limit],
            )

        return await self._tx(op)
