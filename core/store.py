"""The SQLite store: conversations, messages, the behavior log and tickets.

sqlite-utils over one connection in WAL mode. Every call runs on a single dedicated
thread, so writes are serialised and the event loop never blocks on disk. The schema is
versioned: ``MIGRATIONS[i]`` takes the database from version ``i`` to ``i + 1``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import sqlite_utils

from core import metrics
from core.messages import Inbound, User

log = logging.getLogger(__name__)

T = TypeVar("T")

# A lock the busy timeout could not wait out is retried this many more times, with
# these pauses (seconds) between tries; anything else fails at once.
LOCK_RETRY_DELAYS_S: Sequence[float] = (0.05, 0.1, 0.2, 0.4, 0.8)

ConversationState = Literal["bot", "escalated", "operator", "resolved"]
EventType = Literal[
    "message", "suggestion_shown", "suggestion_clicked", "article_viewed", "feedback",
    "escalated", "resolved", "attachment", "command", "customer_linked", "customer_unlinked",
]

MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        platform_user_id TEXT NOT NULL,
        display_name TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        UNIQUE (platform, platform_user_id)
    );
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        conversation_key TEXT NOT NULL,
        user_id INTEGER NOT NULL REFERENCES users(id),
        state TEXT NOT NULL DEFAULT 'bot'
            CHECK (state IN ('bot', 'escalated', 'operator', 'resolved')),
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        UNIQUE (platform, conversation_key)
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id),
        direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
        sender TEXT NOT NULL,
        author TEXT,
        platform TEXT NOT NULL,
        platform_message_id TEXT,
        kind TEXT NOT NULL,
        text TEXT NOT NULL,
        payload TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL,
        reply_to INTEGER REFERENCES messages(id),
        created_at TEXT NOT NULL,
        sentiment TEXT,
        p_negative REAL,
        p_neutral REAL,
        p_positive REAL,
        first_token_ms REAL,
        latency_ms REAL,
        error TEXT
    );
    CREATE UNIQUE INDEX messages_inbound_once
        ON messages (platform, platform_message_id) WHERE direction = 'in';
    CREATE INDEX messages_conversation ON messages (conversation_id, id);
    CREATE INDEX messages_status ON messages (direction, status);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        ts TEXT NOT NULL,
        type TEXT NOT NULL,
        user_id INTEGER REFERENCES users(id),
        conversation_id INTEGER REFERENCES conversations(id),
        message_id INTEGER REFERENCES messages(id),
        item_id TEXT,
        position INTEGER,
        value TEXT,
        data TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_type_ts ON events (type, ts);
    CREATE INDEX events_user ON events (user_id, ts);
    CREATE TABLE tickets (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id),
        state TEXT NOT NULL CHECK (state IN ('open', 'claimed', 'resolved', 'handed_back')),
        reason TEXT NOT NULL,
        scores TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        announced_at TEXT NOT NULL,
        claimed_by TEXT,
        claimed_at TEXT,
        first_response_at TEXT,
        closed_at TEXT,
        last_message_id INTEGER,
        note TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX tickets_state ON tickets (state, created_at);
    CREATE INDEX tickets_conversation ON tickets (conversation_id);
    """,
    # One person's accounts on several platforms, linked by an operator: users sharing a
    # customer_id are one customer (the id is the smallest member's user id); NULL is a
    # user linked to nobody.
    """
    ALTER TABLE users ADD COLUMN customer_id INTEGER;
    CREATE INDEX users_customer ON users (customer_id);
    """,
    # v3: the console offers accounts with the same display name for linking; without this
    # index that lookup scans every user on the store's one thread.
    """
    CREATE INDEX users_display_name ON users (display_name COLLATE NOCASE);
    """,
    # v4: recovery at start asks, for each unfinished message, whether a reply to it was
    # sent; without this index each asks by scanning every message (1.8 s for 200 on
    # 137,000 messages, growing with both).
    """
    CREATE INDEX messages_reply_to ON messages (reply_to);
    """,
    # v5: several replicas on one database: a conversation is handled by the replica
    # holding its lease (expires_at in epoch seconds), and a dead replica's leases lapse.
    """
    CREATE TABLE conversation_leases (
        conversation_id INTEGER PRIMARY KEY REFERENCES conversations(id),
        owner TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    # v6: what replicas must agree on beyond messages and tickets, as small values under
    # (scope, key): which platform thread holds a ticket, what was posted there last,
    # an operator message already acted on (updated_at in epoch seconds).
    """
    CREATE TABLE shared_state (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (scope, key)
    );
    """,
)

RelayCallback = Callable[[str], Awaitable[None] | None]
"""Called with each payload published on a subscribed channel (awaited if async)."""
Unsubscribe = Callable[[], Awaitable[None]]

_CHANNEL = re.compile(r"[A-Za-z0-9_.:-]{1,48}")


def check_channel(channel: str) -> str:
    """A relay channel name, or :class:`ValueError`: PostgreSQL channels are identifiers of
    at most 63 bytes, and the store prefixes its own."""
    if not _CHANNEL.fullmatch(channel):
        raise ValueError(f"relay channel {channel!r}: 1 to 48 of A-Z a-z 0-9 _ . : -")
    return channel


TRANSCRIPT_LINES = (
    "(direction = 'in' OR status = 'sent' "
    "OR (status = 'sending' AND platform_message_id IS NOT NULL))"
)
"""What a transcript shows: the customer's messages, the replies sent, and those handed to
the platform under the id the adapter chose (a replica may have died before recording them
as sent; recovery counts them as sent, and a tab already drew them under that id)."""
TAKE_LEASE = (
    "INSERT INTO conversation_leases (conversation_id, owner, expires_at) "
    "VALUES (:id, :owner, :until) ON CONFLICT (conversation_id) DO UPDATE "
    "SET owner = excluded.owner, expires_at = excluded.expires_at "
    "WHERE conversation_leases.expires_at <= :now "
    "OR conversation_leases.owner = excluded.owner RETURNING owner"
)
"""A conversation's lease taken: free, lapsed, or the taker's own (renewed)."""
UNANSWERED_SELECT = (
    "SELECT m.*, c.conversation_key, c.user_id, c.state, u.platform_user_id, u.display_name "
    "FROM messages m JOIN conversations c ON c.id = m.conversation_id "
    "JOIN users u ON u.id = c.user_id "
    "WHERE m.direction = 'in' AND m.status IN ('received', 'processing') "
)
"""The unanswered-message rows, as recovery and adoption give them to the pipeline."""
NO_REPLY_OUT = (
    "AND NOT EXISTS (SELECT 1 FROM messages o WHERE o.reply_to = m.id AND o.direction = "
    "'out' AND o.sender IN ('bot', 'system') AND o.status IN ('sending', 'sent')) "
)
"""What recovery would mark answered (a reply sent or handed to the platform), left out
by a read that changes nothing."""

MARK_REPLIED_ANSWERED = (
    "UPDATE messages SET status = 'answered' WHERE direction = 'in' AND status IN "
    "('received', 'processing') AND id NOT IN (SELECT value FROM json_each(?)) "
    "AND EXISTS (SELECT 1 FROM messages o WHERE o.reply_to = messages.id "
    "AND o.direction = 'out' AND o.sender IN ('bot', 'system') AND o.status = 'sent')"
)
"""Recovery: an unfinished message whose reply was already sent is answered (one
parameter: the JSON list of ids this process is handling)."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class StoredInbound:
    message_id: int
    conversation_id: int
    user_id: int
    state: ConversationState


@dataclass(frozen=True, slots=True)
class Scores:
    label: str
    negative: float
    neutral: float
    positive: float


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    message_id: int
    direction: str
    sender: str
    text: str
    created_at: str
    sentiment: str | None
    p_negative: float | None
    platform_message_id: str | None = None
    """What the platform calls it: a chat tab's client id or a sent reply's id, so a
    reconnecting client can tell which of its messages and replies are stored."""
    withheld: tuple[str, ...] = ()
    """Sentences of a generated answer the faithfulness check kept from the customer:
    for operators' eyes only."""


def _withheld(payload: str | None) -> tuple[str, ...]:
    """The withheld sentences recorded with a reply (``payload.answer.withheld``)."""
    try:
        answer = json.loads(payload or "{}").get("answer") or {}
        return tuple(str(w["text"]) for w in answer.get("withheld", ()))
    except (ValueError, TypeError, KeyError, AttributeError):
        return ()


def transcript_lines(rows: Sequence[dict]) -> list[TranscriptLine]:
    """Transcript rows, newest first as both stores read them, as lines oldest first."""
    return [
        TranscriptLine(
            r["id"], r["direction"], r["sender"], r["text"], r["created_at"],
            r["sentiment"], r["p_negative"], r["platform_message_id"],
            _withheld(r["payload"]) if r["direction"] == "out" else (),
        )
        for r in rows[::-1]
    ]


def event_row(type: EventType, **fields: Any) -> dict[str, Any]:
    """One behavior-log row as both stores insert it (``data`` as JSON text)."""
    return {"ts": now_iso(), "type": type, **fields, "data": json.dumps(fields.get("data") or {})}


class StoreError(Exception):
    """The database refused an operation (locked, disk full, corrupt, a broken constraint).

    ``rejected``: the operation itself was wrong (a constraint, a row that is gone), so the
    database works and retrying the same operation cannot help."""

    def __init__(self, message: str, *, rejected: bool = False) -> None:
        super().__init__(message)
        self.rejected = rejected


def _is_lock(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class Store(Protocol):
    """What the pipeline and the operator desk need from persistence: :class:`SQLiteStore`
    (the embedded default) and ``core.store_postgres.PostgresStore`` (one database for
    several replicas) implement it with the same semantics."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def query(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[dict]: ...
    async def record_inbound(self, inbound: Inbound) -> StoredInbound | None: ...
    async def set_inbound_status(self, message_id: int, status: str) -> None: ...
    async def set_sentiment(self, message_id: int, scores: Scores) -> None: ...
    async def unfinished_inbound(
        self, skip: Sequence[int] = (), conversations: Sequence[int] | None = None
    ) -> list[dict]: ...
    async def take_conversation(self, conversation_id: int, owner: str, ttl_s: float) -> bool: ...
    async def extend_conversation(self, conversation_id: int, owner: str, ttl_s: float
                                  ) -> bool: ...
    async def fence_conversation(self, conversation_id: int, owner: str, ttl_s: float,
                                 message_id: int) -> str | None: ...
    async def unanswered_inbound(self, conversation_id: int) -> list[dict]: ...
    async def renew_conversations(self, owner: str, ttl_s: float) -> list[int]: ...
    async def release_conversation(self, conversation_id: int, owner: str) -> None: ...
    async def orphaned_conversations(self, owner: str, limit: int = 100) -> list[int]: ...
    async def publish(self, channel: str, payload: str) -> None: ...
    async def shared(self, scope: str, key: str) -> str | None: ...
    async def share_if(self, scope: str, key: str, value: str, expected: str | None) -> str: ...
    async def forget_shared(self, scope: str, older_than_s: float) -> int: ...
    async def subscribe(self, channel: str, callback: RelayCallback) -> Unsubscribe: ...
    async def last_customer_text(self, conversation_id: int) -> str | None: ...
    async def inbound_status(self, message_id: int) -> str | None: ...
    async def begin_outbound(
        self, conversation_id: int, platform: str, sender: str, reply_to: int | None,
        text: str = "", status: Literal["pending", "sending"] = "pending",
    ) -> int: ...
    async def finish_outbound(self, message_id: int, **fields: Any) -> None: ...
    async def outbound_by_platform_id(
        self, platform: str, platform_message_id: str
    ) -> dict | None: ...
    async def conversation(self, conversation_id: int) -> dict: ...
    async def conversation_by_key(self, platform: str, conversation_key: str) -> dict | None: ...
    async def set_state(self, conversation_id: int, state: ConversationState) -> None: ...
    async def history(self, conversation_id: int, before_id: int, limit: int) -> list[dict]: ...
    async def recent_negative(self, conversation_id: int, limit: int) -> list[float]: ...
    async def recent_customer_messages(self, conversation_id: int, limit: int) -> list[dict]: ...
    async def transcript(self, conversation_id: int, limit: int = 200) -> list[TranscriptLine]: ...
    async def log_event(
        self, type: EventType, *, user_id: int | None = None,
        conversation_id: int | None = None, message_id: int | None = None,
        item_id: str | None = None, position: int | None = None, value: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None: ...
    async def log_events(self, rows: Sequence[dict[str, Any]]) -> None: ...
    async def open_ticket(self, conversation_id: int, reason: str, scores: dict) -> int | None: ...
    async def claim_ticket(self, ticket_id: int, claimed_by: str, claimed_at: str) -> bool: ...
    async def update_ticket(
        self, ticket_id: int, conversation_state: ConversationState | None = None, **fields: Any
    ) -> None: ...
    async def ticket(self, ticket_id: int) -> dict | None: ...
    async def active_ticket(self, conversation_id: int) -> dict | None: ...
    async def tickets(self, states: Sequence[str]) -> list[dict]: ...
    async def user(self, user_id: int) -> dict | None: ...
    async def user_by_platform_id(self, platform: str, platform_user_id: str) -> dict | None: ...
    async def linked_users(self, user_id: int) -> list[dict]: ...
    async def link_users(self, user_id: int, other_id: int) -> list[int]: ...
    async def unlink_user(self, user_id: int) -> list[int]: ...
    async def customer_conversations(self, user_id: int, limit: int = 50) -> list[dict]: ...
    async def users_named(self, display_name: str, limit: int) -> list[dict]: ...
    async def user_events(self, user_id: int) -> list[dict]: ...


async def _unsubscribed() -> None:
    """Nothing to undo: SQLite's subscriptions are never made."""


class SQLiteStore:
    """All persistence, on one connection owned by one worker thread."""

    __slots__ = ("_busy_timeout_ms", "_db", "_executor", "_version", "path")

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="store")
        self._db: sqlite_utils.Database | None = None
        self._busy_timeout_ms = busy_timeout_ms
        self._version: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        self._db = sqlite_utils.Database(conn)
        self._db.enable_wal()
        self._migrate()

    def _migrate(self) -> None:
        """Each step under the write lock, the version read again inside it: two processes
        opening a new file at once migrate it once (the second finds it done)."""
        db = self.db
        while True:
            db.conn.execute("BEGIN IMMEDIATE")
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > len(MIGRATIONS):
                    raise StoreError(
                        f"{self.path}: schema version {version} is newer than this code "
                        f"({len(MIGRATIONS)}); upgrade supportbot"
                    )
                if version == len(MIGRATIONS):
                    db.conn.execute("COMMIT")
                    self._version = version
                    return
                for statement in filter(str.strip, MIGRATIONS[version].split(";")):
                    db.conn.execute(statement)
                db.conn.execute(f"PRAGMA user_version = {version + 1}")
                db.conn.execute("COMMIT")
            except BaseException:
                if db.conn.in_transaction:
                    db.conn.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.conn.close)
        self._executor.shutdown(wait=True)

    @property
    def db(self) -> sqlite_utils.Database:
        if self._db is None:
            raise StoreError("store not opened")
        return self._db

    @property
    def schema_version(self) -> int:
        """The version read (and migrated to) at open: the connection belongs to the store
        thread, and this is read from the event loop."""
        if self._version is None:
            raise StoreError("store not opened")
        return self._version

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn`` on the store thread. A lock is retried with backoff (another process, or
        a checkpoint, may hold it briefly); a persistent failure becomes :class:`StoreError`,
        counted and logged, so callers decide what the customer sees."""
        loop = asyncio.get_running_loop()
        for delay in (*LOCK_RETRY_DELAYS_S, None):
            try:
                return await loop.run_in_executor(self._executor, self._call, fn, args)
            except sqlite3.OperationalError as exc:
                if delay is not None and _is_lock(exc):
                    metrics.STORE_RETRIES.inc()
                    await asyncio.sleep(delay)
                    continue
                kind = "locked" if _is_lock(exc) else "full" if "full" in str(exc) else "other"
                metrics.STORE_ERRORS.labels(kind).inc()
                log.error("database error (%s): %s", kind, exc)
                raise StoreError(f"{self.path}: {exc}") from exc
            except (sqlite3.DatabaseError, sqlite_utils.db.NotFoundError) as exc:
                # A constraint, a corrupt file, a row gone: as on PostgreSQL, the caller
                # sees a StoreError and decides what the customer is told.
                metrics.STORE_ERRORS.labels("other").inc()
                log.error("database error (other): %s", exc)
                rejected = isinstance(exc, sqlite3.IntegrityError | sqlite_utils.db.NotFoundError)
                raise StoreError(f"{self.path}: {exc}", rejected=rejected) from exc
        raise AssertionError("unreachable")

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """The one place every database operation passes through, on the store thread."""
        return fn(*args)

    def _tx(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        db = self.db
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            db.conn.execute("COMMIT")
        except BaseException:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise
        return result

    async def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict]:
        """Read-only SQL for reports and tests."""
        return await self._run(lambda: list(self.db.query(sql, params)))

    # -- inbound ---------------------------------------------------------------------

    async def record_inbound(self, inbound: Inbound) -> StoredInbound | None:
        """Commit an inbound event; ``None`` when the platform already delivered it."""
        return await self._run(self._tx, lambda db: self._record_inbound(db, inbound))

    def _record_inbound(self, db: sqlite_utils.Database, inbound: Inbound) -> StoredInbound | None:
        seen = db.execute(
            "SELECT 1 FROM messages WHERE direction = 'in' AND platform = ? "
            "AND platform_message_id = ?",
            [inbound.platform, inbound.platform_message_id],
        ).fetchone()
        if seen:
            return None
        user_id = self._user_id(db, inbound.user)
        ts = now_iso()
        row = db.execute(
            "SELECT id, state FROM conversations WHERE platform = ? AND conversation_key = ?",
            [inbound.platform, inbound.conversation_key],
        ).fetchone()
        if row is None:
            conversation_id = db["conversations"].insert(
                {
                    "platform": inbound.platform,
                    "conversation_key": inbound.conversation_key,
                    "user_id": user_id,
                    "state": "bot",
                    "created_at": ts,
                    "updated_at": ts,
                }
            ).last_pk
            state = "bot"
        else:
            conversation_id, state = row
        message_id = db["messages"].insert(
            {
                "conversation_id": conversation_id,
                "direction": "in",
                "sender": "customer",
                "platform": inbound.platform,
                "platform_message_id": inbound.platform_message_id,
                "kind": inbound.kind.value,
                "text": inbound.text,
                "payload": inbound.payload,
                "status": "received",
                "created_at": inbound.sent_at.astimezone(UTC).isoformat(timespec="milliseconds"),
            }
        ).last_pk
        return StoredInbound(message_id, conversation_id, user_id, state)

    def _user_id(self, db: sqlite_utils.Database, user: User) -> int:
        row = db.execute(
            "SELECT id, display_name FROM users WHERE platform = ? AND platform_user_id = ?",
            [user.platform, user.platform_user_id],
        ).fetchone()
        if row is not None:
            if user.display_name and row[1] != user.display_name:
                db["users"].update(row[0], {"display_name": user.display_name})
            return int(row[0])
        return int(
            db["users"].insert(
                {
                    "platform": user.platform,
                    "platform_user_id": user.platform_user_id,
                    "display_name": user.display_name,
                    "created_at": now_iso(),
                }
            ).last_pk
        )

    async def set_inbound_status(self, message_id: int, status: str) -> None:
        await self._run(lambda: self.db["messages"].update(message_id, {"status": status}))

    async def set_sentiment(self, message_id: int, scores: Scores) -> None:
        await self._run(
            lambda: self.db["messages"].update(
                message_id,
                {
                    "sentiment": scores.label,
                    "p_negative": scores.negative,
                    "p_neutral": scores.neutral,
                    "p_positive": scores.positive,
                },
            )
        )

    async def unfinished_inbound(
        self, skip: Sequence[int] = (), conversations: Sequence[int] | None = None
    ) -> list[dict]:
        """Inbound messages accepted but never answered (a crash or a hard stop).

        A message whose reply (the bot's answer, or a system message such as the hand-off
        notice or a command's answer) was already sent (the crash came between sending and
        marking the message done) is marked answered here instead, so it is never
        answered twice. Notices that do not answer (the long-message notice) are stored
        without ``reply_to``. A reply stored as ``sending`` (complete, handed to the
        platform when the process died) counts as sent: the last hop is at most once, so
        a customer never gets an answer twice. ``skip``: inbound ids this process is
        handling now (their replies in progress are left alone). ``conversations``: only
        these, replies included (the ones this replica just took over); ``None``, all of
        them, is right only while one process uses the database, since it also settles
        the replies other replicas are writing.
        """
        skipped = json.dumps(list(skip))
        scope, args = "", [skipped]
        if conversations is not None:
            scope = " AND conversation_id IN (SELECT value FROM json_each(?))"
            args.append(json.dumps([int(c) for c in conversations]))

        def op(db: sqlite_utils.Database) -> list[dict]:
            db.execute(
                "UPDATE messages SET status = 'sent' WHERE direction = 'out' AND status = "
                "'sending' AND (reply_to IS NULL OR reply_to NOT IN "
                "(SELECT value FROM json_each(?)))" + scope,
                args,
            )
            db.execute(MARK_REPLIED_ANSWERED + scope, args)
            db.execute(
                "UPDATE messages SET status = 'failed', error = 'interrupted' "
                "WHERE direction = 'out' AND status = 'pending' AND (reply_to IS NULL OR "
                "reply_to NOT IN (SELECT value FROM json_each(?)))" + scope,
                args,
            )
            return list(db.query(
                UNANSWERED_SELECT + "AND m.id NOT IN (SELECT value FROM json_each(?))" + scope
                + " ORDER BY m.id",
                args,
            ))

        return await self._run(self._tx, op)

    async def unanswered_inbound(self, conversation_id: int) -> list[dict]:
        """The conversation's messages :meth:`unfinished_inbound` would give, read without
        settling anything: for a replica whose lease never lapsed since its last message,
        so no other replica can have left a reply half-sent."""
        return await self._run(lambda: list(self.db.query(
            UNANSWERED_SELECT + NO_REPLY_OUT + "AND m.conversation_id = ? ORDER BY m.id",
            [conversation_id],
        )))

    # -- leases: one replica at a time per conversation ----------------------------------

    async def take_conversation(self, conversation_id: int, owner: str, ttl_s: float) -> bool:
        """Hold a conversation for ``ttl_s`` seconds: ``True`` when ``owner`` now holds it
        (it was free, its lease had lapsed, or it was ``owner``'s already and is renewed).
        One statement, so of two replicas taking it at once exactly one wins."""

        def op(db: sqlite_utils.Database) -> bool:
            now = time.time()
            return bool(db.execute(TAKE_LEASE, {
                "id": conversation_id, "owner": owner, "until": now + ttl_s, "now": now,
            }).fetchall())

        return await self._run(self._tx, op)

    async def extend_conversation(self, conversation_id: int, owner: str, ttl_s: float
                                  ) -> bool:
        """Extend ``owner``'s lease only if it has not lapsed: ``True`` means nobody else can
        have held the conversation since ``owner`` last took or extended it."""
        rows = await self._run(lambda: self.db.execute(
            "UPDATE conversation_leases SET expires_at = ? WHERE conversation_id = ? AND "
            "owner = ? AND expires_at > ? RETURNING conversation_id",
            [time.time() + ttl_s, conversation_id, owner, time.time()],
        ).fetchall())
        return bool(rows)

    async def fence_conversation(self, conversation_id: int, owner: str, ttl_s: float,
                                 message_id: int) -> str | None:
        """The last hop's check in one step: take or renew the lease (as
        :meth:`take_conversation`) and read the inbound message's status; ``None`` when
        another replica holds the lease."""

        def op(db: sqlite_utils.Database) -> str | None:
            now = time.time()
            if not db.execute(TAKE_LEASE, {
                "id": conversation_id, "owner": owner, "until": now + ttl_s, "now": now,
            }).fetchall():
                return None
            row = db.execute("SELECT status FROM messages WHERE id = ? AND direction = 'in'",
                             [message_id]).fetchone()
            return str(row[0]) if row else ""

        return await self._run(self._tx, op)

    async def renew_conversations(self, owner: str, ttl_s: float) -> list[int]:
        """Extend every lease ``owner`` holds, lapsed ones nobody took since included;
        returns their conversation ids, ascending: one missing was taken by another."""

        def op(db: sqlite_utils.Database) -> list[int]:
            return sorted(r[0] for r in db.execute(
                "UPDATE conversation_leases SET expires_at = ? WHERE owner = ? "
                "RETURNING conversation_id",
                [time.time() + ttl_s, owner],
            ).fetchall())

        return await self._run(self._tx, op)

    async def release_conversation(self, conversation_id: int, owner: str) -> None:
        """Give a lease up, if ``owner`` still holds it (a lease taken over is not ours)."""
        await self._run(lambda: self.db.execute(
            "DELETE FROM conversation_leases WHERE conversation_id = ? AND owner = ?",
            [conversation_id, owner],
        ))

    async def orphaned_conversations(self, owner: str, limit: int = 100) -> list[int]:
        """Conversations with unfinished inbound messages that no live replica but
        ``owner`` holds (no lease, a lapsed one, or ``owner``'s own), the longest waiting
        first: what ``owner`` should take over and recover."""
        rows = await self.query(
            "SELECT m.conversation_id FROM messages m "
            "LEFT JOIN conversation_leases l ON l.conversation_id = m.conversation_id "
            "WHERE m.direction = 'in' AND m.status IN ('received', 'processing') "
            "AND (l.owner IS NULL OR l.owner = ? OR l.expires_at <= ?) "
            "GROUP BY m.conversation_id ORDER BY MIN(m.id) LIMIT ?",
            [owner, time.time(), limit],
        )
        return [r["conversation_id"] for r in rows]

    # -- relay between replicas ------------------------------------------------------------

    async def publish(self, channel: str, payload: str) -> None:
        """Does nothing: a SQLite database serves one process, whose customers' sockets are
        all its own, so there is no other replica to relay to."""
        check_channel(channel)

    async def subscribe(self, channel: str, callback: RelayCallback) -> Unsubscribe:
        """Never calls back (see :meth:`publish`); the unsubscribe does nothing."""
        check_channel(channel)
        return _unsubscribed

    # -- state replicas share ----------------------------------------------------------

    async def shared(self, scope: str, key: str) -> str | None:
        """The value under ``(scope, key)``, or ``None``."""
        rows = await self._run(lambda: self.db.execute(
            "SELECT value FROM shared_state WHERE scope = ? AND key = ?", [scope, key],
        ).fetchall())
        return rows[0][0] if rows else None

    async def share_if(self, scope: str, key: str, value: str, expected: str | None) -> str:
        """Store ``value`` if the one there now is ``expected`` (``None``: there is none);
        returns the value there afterwards, ``value`` exactly when this call won."""

        def op(db: sqlite_utils.Database) -> str:
            if expected is None:
                db.execute(
                    "INSERT INTO shared_state (scope, key, value, updated_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [scope, key, value, time.time()])
            else:
                db.execute(
                    "UPDATE shared_state SET value = ?, updated_at = ? "
                    "WHERE scope = ? AND key = ? AND value = ?",
                    [value, time.time(), scope, key, expected])
            row = db.execute("SELECT value FROM shared_state WHERE scope = ? AND key = ?",
                             [scope, key]).fetchone()
            return str(row[0]) if row else ""

        return await self._run(self._tx, op)

    async def forget_shared(self, scope: str, older_than_s: float) -> int:
        """Delete the values of ``scope`` untouched for ``older_than_s``; how many went."""
        cursor = await self._run(lambda: self.db.execute(
            "DELETE FROM shared_state WHERE scope = ? AND updated_at < ?",
            [scope, time.time() - older_than_s]))
        return int(cursor.rowcount)

    # -- outbound --------------------------------------------------------------------

    async def begin_outbound(
        self, conversation_id: int, platform: str, sender: str, reply_to: int | None,
        text: str = "", status: Literal["pending", "sending"] = "pending",
    ) -> int:
        """Record an outbound message before it is sent: ``pending`` while its text is
        still being generated, ``sending`` once it is complete and about to go out."""

        def insert() -> int:
            return int(
                self.db["messages"].insert(
                    {
                        "conversation_id": conversation_id,
                        "direction": "out",
                        "sender": sender,
                        "platform": platform,
                        "kind": "text",
                        "text": text,
                        "status": status,
                        "reply_to": reply_to,
                        "created_at": now_iso(),
                    }
                ).last_pk
            )

        return await self._run(insert)

    async def finish_outbound(self, message_id: int, **fields: Any) -> None:
        """Mark an outbound message sent or failed, with its text and timings."""
        await self._run(lambda: self.db["messages"].update(message_id, fields))

    async def outbound_by_platform_id(self, platform: str, platform_message_id: str) -> dict | None:
        """The message the bot sent with this platform id (what a reaction points at)."""
        rows = await self.query(
            "SELECT * FROM messages WHERE direction = 'out' AND platform = ? "
            "AND platform_message_id = ? ORDER BY id DESC LIMIT 1",
            [platform, platform_message_id],
        )
        return rows[0] if rows else None

    # -- conversations ---------------------------------------------------------------

    async def conversation(self, conversation_id: int) -> dict:
        rows = await self.query(
            "SELECT c.*, u.platform_user_id, u.display_name FROM conversations c "
            "JOIN users u ON u.id = c.user_id WHERE c.id = ?",
            [conversation_id],
        )
        if not rows:
            raise StoreError(f"no conversation {conversation_id}")
        return rows[0]

    async def conversation_by_key(self, platform: str, conversation_key: str) -> dict | None:
        rows = await self.query(
            "SELECT * FROM conversations WHERE platform = ? AND conversation_key = ?",
            [platform, conversation_key],
        )
        return rows[0] if rows else None

    async def set_state(self, conversation_id: int, state: ConversationState) -> None:
        await self._run(
            lambda: self.db["conversations"].update(
                conversation_id, {"state": state, "updated_at": now_iso()}
            )
        )

    async def history(self, conversation_id: int, before_id: int, limit: int) -> list[dict]:
        """Recent text turns before a message, oldest first, for the prompt."""
        rows = await self.query(
            "SELECT id, direction, sender, text FROM messages WHERE conversation_id = ? "
            "AND id < ? AND kind = 'text' AND text != '' AND status != 'failed' "
            "ORDER BY id DESC LIMIT ?",
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
            "SELECT text, p_negative FROM messages WHERE conversation_id = ? "
            "AND direction = 'in' AND p_negative IS NOT NULL AND id > COALESCE((SELECT "
            "MAX(last_message_id) FROM tickets WHERE conversation_id = ? AND closed_at IS "
            "NOT NULL), 0) ORDER BY id DESC LIMIT ?",
            [conversation_id, conversation_id, limit],
        )
        return rows[::-1]

    async def last_customer_text(self, conversation_id: int) -> str | None:
        """The customer's latest text message (what an operator sees first)."""
        rows = await self.query(
            "SELECT text FROM messages WHERE conversation_id = ? AND direction = 'in' "
            "AND kind = 'text' ORDER BY id DESC LIMIT 1",
            [conversation_id],
        )
        return rows[0]["text"] if rows else None

    async def inbound_status(self, message_id: int) -> str | None:
        """Where a customer's message stands (``received`` ... ``answered``): a replica
        checks it just before its answer goes out, in case another answered it first."""
        rows = await self.query(
            "SELECT status FROM messages WHERE id = ? AND direction = 'in'", [message_id])
        return rows[0]["status"] if rows else None

    async def transcript(self, conversation_id: int, limit: int = 200) -> list[TranscriptLine]:
        rows = await self.query(
            "SELECT id, direction, sender, text, created_at, sentiment, p_negative, "
            "platform_message_id, payload FROM "
            f"messages WHERE conversation_id = ? AND {TRANSCRIPT_LINES} ORDER BY id DESC LIMIT ?",
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
        await self._run(lambda: self.db["events"].insert(row))

    async def log_events(self, rows: Sequence[dict[str, Any]]) -> None:
        """Several events in one transaction (the items of one suggestion list)."""
        ts = now_iso()
        full = [{"ts": ts, "data": "{}", **r} for r in rows]
        await self._run(self._tx, lambda db: db["events"].insert_all(full))

    async def user_events(self, user_id: int) -> list[dict]:
        """A user's interactions with articles, in order (type, item_id, conversation_id,
        value): what the recommender learns the user's taste from."""
        return await self.query(
            "SELECT type, item_id, conversation_id, value FROM events WHERE user_id = ? "
            "AND item_id IS NOT NULL AND type IN "
            "('suggestion_shown', 'suggestion_clicked', 'article_viewed', 'feedback') "
            "ORDER BY id",
            [user_id],
        )

    # -- tickets ---------------------------------------------------------------------

    async def open_ticket(self, conversation_id: int, reason: str, scores: dict) -> int | None:
        """Open a ticket and mark the conversation escalated; ``None`` if one is open."""

        def op(db: sqlite_utils.Database) -> int | None:
            open_row = db.execute(
                "SELECT id FROM tickets WHERE conversation_id = ? AND state IN ('open', 'claimed')",
                [conversation_id],
            ).fetchone()
            if open_row:
                return None
            ts = now_iso()
            ticket_id = db["tickets"].insert(
                {
                    "conversation_id": conversation_id, "state": "open", "reason": reason,
                    "scores": json.dumps(scores), "created_at": ts, "announced_at": ts,
                }
            ).last_pk
            db["conversations"].update(conversation_id, {"state": "escalated", "updated_at": ts})
            return int(ticket_id)

        return await self._run(self._tx, op)

    async def claim_ticket(self, ticket_id: int, claimed_by: str, claimed_at: str) -> bool:
        """Claim an open ticket, its conversation going to the operator, in one statement:
        ``True`` only for the one caller that moved it from open to claimed, so two
        operators (or two replicas) clicking at once never both take it."""

        def op(db: sqlite_utils.Database) -> bool:
            row = db.execute(
                "UPDATE tickets SET state = 'claimed', claimed_by = ?, claimed_at = ? "
                "WHERE id = ? AND state = 'open' RETURNING conversation_id",
                [claimed_by, claimed_at, ticket_id],
            ).fetchone()
            if row is None:
                return False
            db["conversations"].update(row[0], {"state": "operator", "updated_at": now_iso()})
            return True

        return await self._run(self._tx, op)

    async def update_ticket(
        self, ticket_id: int, conversation_state: ConversationState | None = None, **fields: Any
    ) -> None:
        """Change a ticket (and its conversation's state) in one transaction; closing it
        records the conversation's last message, where the next escalation window starts."""

        def op(db: sqlite_utils.Database) -> None:
            conversation_id = db["tickets"].get(ticket_id)["conversation_id"]
            if fields.get("closed_at"):
                fields["last_message_id"] = db.execute(
                    "SELECT MAX(id) FROM messages WHERE conversation_id = ?", [conversation_id]
                ).fetchone()[0]
            db["tickets"].update(ticket_id, fields)
            if conversation_state is not None:
                db["conversations"].update(
                    conversation_id, {"state": conversation_state, "updated_at": now_iso()}
                )

        await self._run(self._tx, op)

    async def ticket(self, ticket_id: int) -> dict | None:
        rows = await self.query("SELECT * FROM tickets WHERE id = ?", [ticket_id])
        return rows[0] if rows else None

    async def active_ticket(self, conversation_id: int) -> dict | None:
        rows = await self.query(
            "SELECT * FROM tickets WHERE conversation_id = ? AND state IN ('open', 'claimed') "
            "ORDER BY id DESC LIMIT 1",
            [conversation_id],
        )
        return rows[0] if rows else None

    async def tickets(self, states: Sequence[str]) -> list[dict]:
        marks = ",".join("?" for _ in states)
        return await self.query(
            f"SELECT * FROM tickets WHERE state IN ({marks}) ORDER BY created_at, id",
            list(states),
        )

    # -- customers: one person's linked accounts -----------------------------------------

    async def user(self, user_id: int) -> dict | None:
        rows = await self.query("SELECT * FROM users WHERE id = ?", [user_id])
        return rows[0] if rows else None

    async def user_by_platform_id(self, platform: str, platform_user_id: str) -> dict | None:
        rows = await self.query(
            "SELECT * FROM users WHERE platform = ? AND platform_user_id = ?",
            [platform, platform_user_id],
        )
        return rows[0] if rows else None

    async def users_named(self, display_name: str, limit: int) -> list[dict]:
        """Accounts whose display name is ``display_name`` but for case (ASCII letters; how
        other letters fold is up to the database), newest first: the console offers them
        for linking."""
        return await self.query(
            "SELECT id, platform, platform_user_id, display_name FROM users "
            "WHERE display_name = ? COLLATE NOCASE ORDER BY id DESC LIMIT ?",
            [display_name, limit],
        )

    @staticmethod
    def _group(db: sqlite_utils.Database, user_id: int) -> list[int]:
        """The ids of every user linked with ``user_id`` (itself included), ascending."""
        row = db.execute("SELECT customer_id FROM users WHERE id = ?", [user_id]).fetchone()
        if row is None:
            raise StoreError(f"no user {user_id}")
        if row[0] is None:
            return [user_id]
        return [r[0] for r in db.execute(
            "SELECT id FROM users WHERE customer_id = ? ORDER BY id", [row[0]])]

    async def linked_users(self, user_id: int) -> list[dict]:
        """Every account of the customer ``user_id`` belongs to (itself included)."""

        def op(db: sqlite_utils.Database) -> list[dict]:
            ids = json.dumps(self._group(db, user_id))
            return list(db.query(
                "SELECT id, platform, platform_user_id, display_name, created_at FROM users "
                "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id", [ids]))

        return await self._run(lambda: op(self.db))

    async def link_users(self, user_id: int, other_id: int) -> list[int]:
        """Make two users (and everyone already linked with either) one customer; returns
        the merged group's user ids."""

        def op(db: sqlite_utils.Database) -> list[int]:
            merged = sorted({*self._group(db, user_id), *self._group(db, other_id)})
            db.execute(
                "UPDATE users SET customer_id = ? WHERE id IN (SELECT value FROM json_each(?))",
                [merged[0], json.dumps(merged)],
            )
            return merged

        return await self._run(self._tx, op)

    async def unlink_user(self, user_id: int) -> list[int]:
        """Take one user out of its customer; returns the ids left linked together (empty
        when the user was linked to nobody, or one account remains alone)."""

        def op(db: sqlite_utils.Database) -> list[int]:
            group = self._group(db, user_id)
            if len(group) < 2:
                return []
            rest = [i for i in group if i != user_id]
            db.execute("UPDATE users SET customer_id = NULL WHERE id = ?", [user_id])
            # Re-keyed to the smallest remaining id: a user's own id never names a group it
            # is not in (a lone user is its own customer).
            db.execute(
                "UPDATE users SET customer_id = ? WHERE id IN (SELECT value FROM json_each(?))",
                [rest[0] if len(rest) > 1 else None, json.dumps(rest)],
            )
            return rest if len(rest) > 1 else []

        return await self._run(self._tx, op)

    async def customer_conversations(self, user_id: int, limit: int = 50) -> list[dict]:
        """The conversations of every account linked with ``user_id``, most recently
        active first: platform, account, state, size, mood, tickets, last words."""

        def op(db: sqlite_utils.Database) -> list[dict]:
            ids = json.dumps(self._group(db, user_id))
            return list(db.query(
                "SELECT c.id, c.platform, c.conversation_key, c.user_id, u.platform_user_id, "
                "u.display_name, c.state, c.created_at, c.updated_at, "
                "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id "
                " AND m.direction = 'in' AND m.kind = 'text') AS messages, "
                "(SELECT AVG(p_negative) FROM messages m WHERE m.conversation_id = c.id "
                " AND m.direction = 'in' AND m.p_negative IS NOT NULL) AS mean_negative, "
                "(SELECT COUNT(*) FROM tickets t WHERE t.conversation_id = c.id) AS tickets, "
                "(SELECT group_concat(reason, ', ') FROM tickets t "
                " WHERE t.conversation_id = c.id) AS reasons, "
                "(SELECT text FROM messages m WHERE m.conversation_id = c.id "
                " AND m.direction = 'in' AND m.kind = 'text' ORDER BY m.id DESC LIMIT 1) "
                " AS last_text, "
                "COALESCE((SELECT MAX(created_at) FROM messages m "
                " WHERE m.conversation_id = c.id), c.updated_at) AS last_at "
                "FROM conversations c JOIN users u ON u.id = c.user_id "
                "WHERE c.user_id IN (SELECT value FROM json_each(?)) "
                "ORDER BY last_at DESC, c.id DESC LIMIT ?",
                [ids, limit],
            ))

        return await self._run(lambda: op(self.db))
