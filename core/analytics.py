"""Read-only analytics over the store: sentiment, escalations, operators, suggestions, model.

The queries read the ``events``, ``messages``, ``conversations`` and ``tickets`` tables on
a read-only connection of their own, SQLite or PostgreSQL, on one worker thread, so the
event loop never waits and the store's writers are never blocked (WAL lets SQLite's readers
run beside its writer). One set of queries serves both databases: they are written with
``?`` placeholders (:func:`_execute` hands psycopg ``%s``), timestamps are ISO text in
both (PostgreSQL's with ``COLLATE "C"``, so they compare and cut like SQLite's), time
arithmetic happens in Python, and SQLite alone gets ``INDEXED BY`` hints (:func:`_index`).
The covering indexes the queries need are created once by :func:`ensure_indexes` (SQLite)
or :func:`ensure_pg_indexes`; with them a 30-day range over a million events stays an
index scan.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, LiteralString, Protocol, TypeVar, cast

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow, tuple_row

from core.store import SQLiteStore
from core.store_postgres import PostgresStore, describe_url

log = logging.getLogger(__name__)

T = TypeVar("T")
Bucket = Literal["hour", "day"]
PgConnection = psycopg.Connection[TupleRow]
Conn = sqlite3.Connection | PgConnection
"""What every query takes: the store's SQLite file or its PostgreSQL database."""
DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
"""What a query can raise from either database (a caller turns them into a message)."""

TABLES = ("events", "messages", "tickets", "conversations")
PG_CONNECT_TIMEOUT_S = 10
"""libpq's ``connect_timeout`` where the URL gives none."""
PG_INDEX_LOCK_KEY = 0x5B_0751_A001
"""``pg_advisory_xact_lock`` key held while an analytics index is built, so replicas that
start together build each once (the store's keys are ``0x5B_0751_000n``)."""

# name -> DDL; every statement is idempotent so any process may run them at any time.
INDEXES: dict[str, str] = {
    "events_analytics_value": "CREATE INDEX IF NOT EXISTS events_analytics_value "
    "ON events (type, ts, value)",
    "events_analytics_article": "CREATE INDEX IF NOT EXISTS events_analytics_article "
    "ON events (type, item_id, ts)",
    "conversations_analytics_created": "CREATE INDEX IF NOT EXISTS "
    "conversations_analytics_created ON conversations (created_at)",
    "conversations_analytics_user": "CREATE INDEX IF NOT EXISTS conversations_analytics_user "
    "ON conversations (user_id, updated_at)",
    "tickets_analytics_created": "CREATE INDEX IF NOT EXISTS tickets_analytics_created "
    "ON tickets (created_at, reason, first_response_at, closed_at, state)",
    "messages_analytics_bot": "CREATE INDEX IF NOT EXISTS messages_analytics_bot "
    "ON messages (status, created_at, latency_ms, first_token_ms, error, direction, sender) "
    "WHERE direction = 'out' AND sender = 'bot'",
    "messages_analytics_customer": "CREATE INDEX IF NOT EXISTS messages_analytics_customer "
    "ON messages (created_at) WHERE direction = 'in' AND kind = 'text'",
}
# The same on PostgreSQL: the columns only read go in INCLUDE, the topics' tie-break (id)
# joins the key (SQLite's index ends with the rowid anyway).
PG_INDEXES: dict[str, str] = {
    "events_analytics_value": "CREATE INDEX IF NOT EXISTS events_analytics_value "
    "ON events (type, ts) INCLUDE (value)",
    "events_analytics_article": "CREATE INDEX IF NOT EXISTS events_analytics_article "
    "ON events (type, item_id, ts)",
    "conversations_analytics_created": "CREATE INDEX IF NOT EXISTS "
    "conversations_analytics_created ON conversations (created_at) INCLUDE (id)",
    "conversations_analytics_user": "CREATE INDEX IF NOT EXISTS conversations_analytics_user "
    "ON conversations (user_id, updated_at)",
    "tickets_analytics_created": "CREATE INDEX IF NOT EXISTS tickets_analytics_created "
    "ON tickets (created_at) INCLUDE (reason, first_response_at, closed_at, state)",
    "messages_analytics_bot": "CREATE INDEX IF NOT EXISTS messages_analytics_bot "
    "ON messages (status, created_at) INCLUDE (latency_ms, first_token_ms, error) "
    "WHERE direction = 'out' AND sender = 'bot'",
    "messages_analytics_customer": "CREATE INDEX IF NOT EXISTS messages_analytics_customer "
    "ON messages (created_at, id) WHERE direction = 'in' AND kind = 'text'",
}

# Reactions and words a customer uses to rate an answer; anything else is "other".
POSITIVE_FEEDBACK = frozenset(
    {"👍", "❤️", "❤", "😀", "😃", "🙂", "😊", "🎉", "+1", "thumbs_up", "up", "good", "great"}
)
NEGATIVE_FEEDBACK = frozenset(
    {"👎", "😡", "😠", "😞", "🙁", "💩", "-1", "thumbs_down", "down", "bad", "terrible"}
)
HANDED_OVER = "handed to an operator"  # a reply stopped because a person took over: no failure
TOPIC_SAMPLE = 5000
_WORD = re.compile(r"[a-z][a-z'’]+")
STOPWORDS = frozenset(
    """a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do does
    doesn't doing don't down during each few for from further get got had hadn't has hasn't
    have haven't having he her here hers herself him himself his how i i'd i'll i'm i've if in
    into is isn't it it's its itself just let's like me more most my myself no nor not now of
    off on once only or other ought our ours ourselves out over own please same she should
    shouldn't so some still such than thank thanks that that's the their theirs them
    themselves then there there's these they they're this those through to too under until
    up us very was wasn't we we're were weren't what what's when where which while who whom
    why will with won't would wouldn't yes yet you you'd you'll you're you've your yours
    yourself hi hello hey ok okay really one also want need know help can't i'm im dont
    cant""".split()
)


class AnalyticsError(Exception):
    """A bad range or an unreadable database; the message names what is wrong."""


@dataclass(frozen=True, slots=True)
class TimeRange:
    """A half-open UTC interval ``[start, end)`` and the bucket its charts use."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        # Labels, titles and file names say UTC: a caller's zone (or none) becomes UTC here.
        for name in ("start", "end"):
            object.__setattr__(self, name, as_utc(getattr(self, name)))

    @property
    def bucket(self) -> Bucket:
        return "hour" if self.end - self.start <= timedelta(days=2) else "day"

    @property
    def width(self) -> int:
        """Characters of an ISO timestamp that name its bucket (``2024-05-01T13``)."""
        return 13 if self.bucket == "hour" else 10

    @property
    def bounds(self) -> tuple[str, str]:
        return iso(self.start), iso(self.end)

    def previous(self) -> TimeRange:
        return TimeRange(self.start - (self.end - self.start), self.start)

    def labels(self) -> list[str]:
        """Every bucket of the range, so quiet hours show as zero instead of vanishing."""
        step = timedelta(hours=1) if self.bucket == "hour" else timedelta(days=1)
        moment = self.start.replace(minute=0, second=0, microsecond=0)
        if self.bucket == "day":
            moment = moment.replace(hour=0)
        out = []
        while moment < self.end:
            out.append(iso(moment)[: self.width])
            moment += step
        return out

    @classmethod
    def last(cls, seconds: float, end: datetime | None = None) -> TimeRange:
        end = end or datetime.now(UTC)
        return cls(end - timedelta(seconds=seconds), end)


def as_utc(moment: datetime) -> datetime:
    """The same instant in UTC; a naive time is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def iso(moment: datetime) -> str:
    """The store's timestamp form, so ranges compare as strings."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, name: str = "duration") -> float:
    """``90m``, ``24h``, ``7d``, ``2w`` in seconds."""
    match = _DURATION.match(text or "")
    if not match or float(match[1]) <= 0:
        raise AnalyticsError(f"{name} '{text}' is not a duration like 90m, 24h, 7d or 2w")
    return float(match[1]) * _UNIT[match[2]]


def parse_moment(text: str, name: str) -> datetime:
    """An ISO date or date-time, in UTC (one with another zone is converted)."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise AnalyticsError(
            f"{name} '{text}' is not an ISO date or date-time (e.g. 2024-05-01T12:00)"
        ) from None
    return as_utc(moment)


def parse_range(
    since: str | None = None, start: str | None = None, end: str | None = None,
    *, max_days: float = 366,
) -> TimeRange:
    """From ``since`` (a duration back from now or from ``end``) or ``start``/``end``."""
    stop = parse_moment(end, "end") if end else datetime.now(UTC)
    if start:
        first = parse_moment(start, "start")
    else:
        first = stop - timedelta(seconds=parse_duration(since or "24h", "since"))
    if first >= stop:
        raise AnalyticsError(f"start {iso(first)} is not before end {iso(stop)}")
    if stop - first > timedelta(days=max_days):
        raise AnalyticsError(f"the range is longer than {max_days:g} days")
    return TimeRange(first, stop)


# -- schema ---------------------------------------------------------------------------------


def ensure_indexes(path: str | Path, busy_timeout_ms: int = 30000) -> list[str]:
    """Create the analytics indexes that are missing; returns the names created."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        created = []
        for name, ddl in INDEXES.items():
            if name not in have:
                conn.execute(ddl)
                created.append(name)
        return created
    finally:
        conn.close()


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    path = Path(path)
    if not path.is_file():
        raise AnalyticsError(f"{path}: database not found")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        found = conn.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' "
            "AND name IN ('events', 'messages', 'tickets', 'conversations')"
        ).fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise AnalyticsError(f"{path}: not a supportbot database ({exc})") from None
    if found != 4:
        conn.close()
        raise AnalyticsError(f"{path}: not a supportbot database (tables missing)")
    return conn


def _pg_connect(url: str) -> PgConnection:
    """An autocommit connection: each query reads its own snapshot (as SQLite's reads do
    under WAL) and none is left idle in a transaction, holding back vacuum."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        raise AnalyticsError("invalid PostgreSQL URL") from None
    timeout = {} if "connect_timeout" in params else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    try:
        return psycopg.connect(url, autocommit=True, row_factory=tuple_row, **timeout)
    except psycopg.Error as exc:
        raise AnalyticsError(f"{describe_url(url)}: {exc}") from None


def ensure_pg_indexes(url: str) -> list[str]:
    """Create the missing :data:`PG_INDEXES`; returns the names created.

    Each is built in a transaction of its own under :data:`PG_INDEX_LOCK_KEY`, so replicas
    starting together build it once. A build holds writes to its table until it is done
    (as a migration would), which is why the service runs this before taking traffic.
    """
    def exists(conn: PgConnection, name: str) -> bool:
        # A query of the catalog, not to_regclass: its cache may predate the lock.
        return conn.execute(
            "SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() AND indexname = %s",
            [name],
        ).fetchone() is not None

    created = []
    with _pg_connect(url) as conn:
        for name, ddl in PG_INDEXES.items():
            if exists(conn, name):
                continue
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [PG_INDEX_LOCK_KEY])
                if not exists(conn, name):  # another replica may have built it meanwhile
                    conn.execute(ddl)
                    created.append(name)
    return created


def connect_postgres(url: str) -> PgConnection:
    """A read-only connection to the store's PostgreSQL database (``url`` as the store has
    it, password included)."""
    where = describe_url(url)
    conn = _pg_connect(url)
    try:
        conn.execute("SET default_transaction_read_only = on")
        row = conn.execute(
            "SELECT COUNT(*) FROM unnest(%s::text[]) AS t(name) WHERE to_regclass(name) "
            "IS NOT NULL", [list(TABLES)],
        ).fetchone()
    except psycopg.Error as exc:
        conn.close()
        raise AnalyticsError(f"{where}: {exc}") from None
    if not row or row[0] != len(TABLES):
        conn.close()
        raise AnalyticsError(f"{where}: not a supportbot database (tables missing)")
    return conn


# -- queries (synchronous; each takes a connection and a range) ----------------------------


class Rows(Protocol):
    """The cursor either driver returns."""

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


def _execute(conn: Conn, sql: str, params: Sequence[Any] = ()) -> Rows:
    """``sql`` written with ``?`` placeholders, on either database: psycopg takes ``%s``.
    No query here has a literal ``?`` or ``%`` (values always travel as parameters)."""
    if isinstance(conn, sqlite3.Connection):
        return conn.execute(sql, params)
    return conn.execute(cast("LiteralString", sql.replace("?", "%s")), params)


def _series(labels: list[str], counts: dict[str, float], default: float | None = 0) -> list:
    return [counts.get(label, default) for label in labels]


def _ranked(counts: Counter[str], limit: int | None = None) -> dict[str, int]:
    """Most first, ties by name: the databases return rows in different orders, and the
    charts and the report must not depend on it."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit])


def _index(conn: Conn, name: str) -> str:
    """``INDEXED BY name`` where the analytics index exists (without statistics SQLite
    would pick the store's narrower index and sort); nothing on PostgreSQL, whose planner
    has statistics and picks it unaided."""
    if not isinstance(conn, sqlite3.Connection):
        return ""
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)
    ).fetchone()
    return f" INDEXED BY {name}" if found else ""


def _per_bucket(conn: Conn, r: TimeRange, sql: str, params: tuple = ()) -> dict[str, tuple]:
    """Run an aggregate once per bucket (``sql`` ends with the two bounds' placeholders).

    One ungrouped aggregate per bucket walks the covering index in order; a single
    ``GROUP BY substr(ts, ...)`` over a month would push every row through a temporary
    B-tree, several times slower.
    """
    labels = r.labels()
    lo_all, hi_all = r.bounds
    out = {}
    for i, label in enumerate(labels):
        lo = max(label, lo_all)
        hi = min(labels[i + 1], hi_all) if i + 1 < len(labels) else hi_all
        out[label] = _execute(conn, sql, (*params, lo, hi)).fetchone()
    return out


SENTIMENTS = ("negative", "neutral", "positive")


def sentiment(conn: Conn, r: TimeRange) -> dict[str, Any]:
    """Customer messages per bucket by sentiment label (the volume chart too)."""
    rows = _per_bucket(
        conn, r,
        "SELECT " + ", ".join(f"COUNT(CASE WHEN value = '{s}' THEN 1 END)" for s in SENTIMENTS)
        + f", COUNT(*) FROM events{_index(conn, 'events_analytics_value')} "
        "WHERE type = 'message' AND ts >= ? AND ts < ?",
    )
    labels = r.labels()
    series = {s: [rows[b][i] for b in labels] for i, s in enumerate(SENTIMENTS)}
    volume = [rows[b][len(SENTIMENTS)] for b in labels]
    totals = {label: sum(v) for label, v in series.items()}
    total = sum(volume)
    return {
        "labels": labels,
        "series": series,
        "volume": volume,
        "totals": totals,
        "total": total,
        "share_negative": totals["negative"] / total if total else 0.0,
    }


def escalations(conn: Conn, r: TimeRange) -> dict[str, Any]:
    """Escalations by reason, and per bucket the share of the conversations started there
    that escalated in the range (each conversation counted once, so never above 100%)."""
    rows = _execute(
        conn,
        f"SELECT substr(ts, 1, {r.width}) AS b, value, COUNT(*) FROM events "
        "WHERE type = 'escalated' AND ts >= ? AND ts < ? GROUP BY b, value",
        r.bounds,
    ).fetchall()
    started = dict(_execute(
        conn,
        f"SELECT substr(created_at, 1, {r.width}) AS b, COUNT(*) FROM conversations "
        "WHERE created_at >= ? AND created_at < ? GROUP BY b",
        r.bounds,
    ).fetchall())
    # The escalated conversations of the range as a set first (events has no index on
    # conversation_id, so a join driven from conversations would scan it per row).
    escalated = dict(_execute(
        conn,
        f"SELECT substr(created_at, 1, {r.width}) AS b, COUNT(*) FROM conversations "
        "WHERE created_at >= ? AND created_at < ? AND id IN (SELECT conversation_id "
        "FROM events WHERE type = 'escalated' AND ts >= ? AND ts < ?) GROUP BY b",
        (*r.bounds, *r.bounds),
    ).fetchall())
    per_bucket: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for bucket, reason, n in rows:
        per_bucket[bucket] += n
        reasons[reason or "unknown"] += n
    labels = r.labels()
    counts = _series(labels, per_bucket)
    conversations = _series(labels, started)
    escalated_started = _series(labels, escalated)
    total, total_started = sum(counts), sum(conversations)
    total_escalated = sum(escalated_started)
    return {
        "labels": labels,
        "count": counts,
        "conversations": conversations,
        "escalated_conversations": escalated_started,
        "rate": [round(e / c, 4) if c else None
                 for e, c in zip(escalated_started, conversations, strict=True)],
        "reasons": _ranked(reasons),
        "total": total,
        "conversations_total": total_started,
        "escalated_conversations_total": total_escalated,
        "rate_total": total_escalated / total_started if total_started else 0.0,
    }


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)]


def _moment(value: str | None) -> datetime | None:
    """A stored timestamp; ``None`` for none or one that is not ISO (SQL's NULL)."""
    if value is None:
        return None
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        return None


def _minutes(start: datetime | None, end: datetime | None) -> float | None:
    """In Python, not in SQL: the databases' date arithmetic differs (SQLite's julianday
    is a float of days), and these must come out the same from both."""
    if start is None or end is None:
        return None
    return (end - start).total_seconds() / 60


def operators(conn: Conn, r: TimeRange) -> dict[str, Any]:
    """Minutes to the first operator reply and to resolution, for tickets opened in range;
    and the tickets nobody has answered yet (medians alone would hide them)."""
    now = min(r.end, datetime.now(UTC))
    rows = _execute(
        conn,
        f"SELECT substr(created_at, 1, {r.width}), created_at, first_response_at, closed_at, "
        "state FROM tickets WHERE created_at >= ? AND created_at < ?",
        r.bounds,
    ).fetchall()
    first: dict[str, list[float]] = {}
    resolve: dict[str, list[float]] = {}
    waits: list[float] = []
    for bucket, created_at, first_response_at, closed_at, state in rows:
        created = _moment(created_at)
        to_first = _minutes(created, _moment(first_response_at))
        if to_first is not None:
            first.setdefault(bucket, []).append(to_first)
        to_resolve = _minutes(created, _moment(closed_at)) if state == "resolved" else None
        if to_resolve is not None:
            resolve.setdefault(bucket, []).append(to_resolve)
        wait = _minutes(created, now) if first_response_at is None and state in (
            "open", "claimed") else None
        if wait is not None:
            waits.append(wait)
    labels = r.labels()

    def medians(groups: dict[str, list[float]]) -> list[float | None]:
        return [_round(_percentile(groups.get(b, []), 0.5)) for b in labels]

    all_first = [v for vs in first.values() for v in vs]
    all_resolve = [v for vs in resolve.values() for v in vs]
    return {
        "labels": labels,
        "first_response_min_p50": medians(first),
        "resolution_min_p50": medians(resolve),
        "tickets": len(rows),
        "answered": len(all_first),
        "resolved": len(all_resolve),
        "unanswered": len(waits),
        "oldest_wait_min": _round(max(waits)) if waits else None,
        "first_response_min": {"p50": _round(_percentile(all_first, 0.5)),
                               "p90": _round(_percentile(all_first, 0.9))},
        "resolution_min": {"p50": _round(_percentile(all_resolve, 0.5)),
                           "p90": _round(_percentile(all_resolve, 0.9))},
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def feedback_score(value: str | None) -> int:
    """+1, -1 or 0 (a comment or a reaction that says neither)."""
    v = (value or "").strip().lower()
    if v in POSITIVE_FEEDBACK:
        return 1
    if v in NEGATIVE_FEEDBACK:
        return -1
    return 0


def feedback(conn: Conn, r: TimeRange) -> dict[str, Any]:
    """Reactions and /feedback per bucket: positive, negative, other."""
    rows = _execute(
        conn,
        f"SELECT substr(ts, 1, {r.width}) AS b, value, COUNT(*) FROM events "
        "WHERE type = 'feedback' AND ts >= ? AND ts < ? GROUP BY b, value",
        r.bounds,
    ).fetchall()
    groups: dict[int, Counter[str]] = {1: Counter(), -1: Counter(), 0: Counter()}
    values: Counter[str] = Counter()
    for bucket, value, n in rows:
        groups[feedback_score(value)][bucket] += n
        values[value if feedback_score(value) else "(comment or other)"] += n
    labels = r.labels()
    pos, neg = sum(groups[1].values()), sum(groups[-1].values())
    return {
        "labels": labels,
        "positive": _series(labels, groups[1]),
        "negative": _series(labels, groups[-1]),
        "other": _series(labels, groups[0]),
        "top_values": _ranked(values, 8),
        "score": round((pos - neg) / (pos + neg), 3) if pos + neg else None,
        "total": sum(values.values()),
    }


def _items(conn: sqlite3.Connection, type_: str, hint: str) -> list[str]:
    """Distinct item ids of one event type by index seeks (a loose index scan), instead
    of reading every row."""
    rows = conn.execute(
        "WITH RECURSIVE items(id) AS ("
        f"SELECT MIN(item_id) FROM events{hint} WHERE type = ? AND item_id IS NOT NULL "
        f"UNION ALL SELECT (SELECT MIN(item_id) FROM events{hint} WHERE type = ? "
        "AND item_id > items.id) FROM items WHERE items.id IS NOT NULL) "
        "SELECT id FROM items WHERE id IS NOT NULL",
        (type_, type_),
    ).fetchall()
    return [row[0] for row in rows]


def suggestions(conn: Conn, r: TimeRange, limit: int = 15) -> dict[str, Any]:
    """Click-through by article: clicks over times shown, most shown first. SQLite with
    its index counts per article by seeks; otherwise (PostgreSQL, or no index) one
    grouped count."""
    hint = _index(conn, "events_analytics_article")
    counts: dict[str, list[int]] = {}
    for slot, type_ in enumerate(("suggestion_shown", "suggestion_clicked")):
        if hint and isinstance(conn, sqlite3.Connection):
            for item in _items(conn, type_, hint):
                n = conn.execute(
                    f"SELECT COUNT(*) FROM events{hint} WHERE type = ? AND item_id = ? "
                    "AND ts >= ? AND ts < ?",
                    (type_, item, *r.bounds),
                ).fetchone()[0]
                if n:
                    counts.setdefault(item, [0, 0])[slot] = n
        else:
            for item, n in _execute(
                conn,
                "SELECT item_id, COUNT(*) FROM events WHERE type = ? AND ts >= ? AND ts < ? "
                "AND item_id IS NOT NULL GROUP BY item_id",
                (type_, *r.bounds),
            ):
                counts.setdefault(item, [0, 0])[slot] = n
    rows = sorted(((item, s, c) for item, (s, c) in counts.items()),
                  key=lambda row: (-row[1], -row[2], row[0]))
    shown, clicked = sum(row[1] for row in rows), sum(row[2] for row in rows)
    return {
        "articles": [
            {"id": item, "shown": s, "clicked": c, "ctr": round(c / s, 4) if s else None}
            for item, s, c in rows[:limit]
        ],
        "shown": shown,
        "clicked": clicked,
        "ctr": round(clicked / shown, 4) if shown else None,
    }


def terms(text: str) -> set[str]:
    return {w.replace("’", "'") for w in _WORD.findall(text.lower())} - STOPWORDS


def topics(
    conn: Conn, r: TimeRange, limit: int = 10, *, negative_only: bool = False,
    sample: int = TOPIC_SAMPLE, redact: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """The words customers use most (in their latest ``sample`` messages of the range),
    with how often a message using them was negative and the most negative example.

    ``redact`` runs on the whole example before it is cut to 200 characters, so a cut
    cannot leave half an e-mail address that the redaction no longer recognises. Messages
    of one instant are taken newest id first, so both databases sample the same ones.
    """
    where = " AND sentiment = 'negative'" if negative_only else ""
    rows = _execute(
        conn,
        "SELECT text, sentiment, p_negative FROM messages"
        f"{_index(conn, 'messages_analytics_customer')} "
        "WHERE direction = 'in' AND kind = 'text' AND created_at >= ? AND created_at < ?"
        f"{where} ORDER BY created_at DESC, id DESC LIMIT ?",
        (*r.bounds, sample),
    ).fetchall()
    counts: Counter[str] = Counter()
    negative: Counter[str] = Counter()
    example: dict[str, tuple[float, str]] = {}
    for text, label, p_neg in rows:
        for term in terms(text):
            counts[term] += 1
            if label == "negative":
                negative[term] += 1
            score = p_neg if p_neg is not None else -1.0
            if term not in example or score > example[term][0]:
                example[term] = (score, text)
    return {
        "sampled": len(rows),
        "topics": [
            {"term": term, "messages": n, "share_negative": round(negative[term] / n, 3),
             "example": (redact(example[term][1]) if redact else example[term][1])[:200]}
            for term, n in _ranked(counts, limit).items()
        ],
    }


def generator(conn: Conn, r: TimeRange) -> dict[str, Any]:
    """Bot replies per bucket: mean time to first token and to the whole reply, failures."""
    hint = _index(conn, "messages_analytics_bot")
    where = (f"FROM messages{hint} WHERE direction = 'out' AND sender = 'bot' AND status = ? "
             "AND created_at >= ? AND created_at < ?")
    sent = _per_bucket(
        conn, r, f"SELECT COUNT(*), AVG(latency_ms), AVG(first_token_ms) {where}", ("sent",)
    )
    failed = _per_bucket(
        conn, r, f"SELECT COUNT(*), COUNT(CASE WHEN COALESCE(error, '') <> ? THEN 1 END) {where}",
        (HANDED_OVER, "failed"),
    )
    # (replies, real failures, mean latency, mean first token, sent)
    by = {b: (sent[b][0] + failed[b][0], failed[b][1], sent[b][1], sent[b][2], sent[b][0])
          for b in sent}
    labels = r.labels()
    replies = [by[b][0] for b in labels]
    failures = [by[b][1] for b in labels]
    total, total_failed = sum(replies), sum(failures)
    weighted = [(by[b][4], by[b][2]) for b in labels if by[b][2] is not None]
    n_sent = sum(n for n, _ in weighted)
    return {
        "labels": labels,
        "replies": replies,
        "failed": failures,
        "failure_rate": [round(f / n, 4) if n else None for f, n in zip(failures, replies,
                                                                       strict=True)],
        "latency_ms_mean": [_round(by[b][2], 1) for b in labels],
        "first_token_ms_mean": [_round(by[b][3], 1) for b in labels],
        "total": total,
        "failed_total": total_failed,
        "failure_rate_total": total_failed / total if total else 0.0,
        "latency_ms_overall": _round(sum(n * lat for n, lat in weighted) / n_sent, 1)
        if n_sent else None,
    }


QUERIES: dict[str, Callable[[Conn, TimeRange], dict[str, Any]]] = {
    "sentiment": sentiment,
    "escalations": escalations,
    "operators": operators,
    "feedback": feedback,
    "suggestions": suggestions,
    "topics": topics,
    "generator": generator,
}


def dashboard(conn: Conn, r: TimeRange) -> dict[str, Any]:
    """Every chart's data for a range, and how long each query took (ms)."""
    out: dict[str, Any] = {"start": iso(r.start), "end": iso(r.end), "bucket": r.bucket}
    timings = {}
    for name, query in QUERIES.items():
        started = time.perf_counter()
        out[name] = query(conn, r)
        timings[name] = round((time.perf_counter() - started) * 1000, 1)
    out["query_ms"] = timings
    return out


# -- async facade -------------------------------------------------------------------------


class Analytics:
    """The queries on a read-only connection owned by one worker thread: the SQLite file
    at ``path`` or the PostgreSQL database at ``url`` (password included)."""

    __slots__ = ("_conn", "_executor", "path", "url")

    def __init__(self, path: str | Path | None = None, *, url: str | None = None) -> None:
        if (path is None) == (url is None):
            raise ValueError("Analytics reads a SQLite path or a PostgreSQL url: give one")
        self.path = Path(path) if path is not None else None
        self.url = url
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="analytics")
        self._conn: Conn | None = None

    @property
    def where(self) -> str:
        """The database, fit for messages and logs (never the password)."""
        return describe_url(self.url) if self.url is not None else str(self.path)

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except (sqlite3.OperationalError, psycopg.Error) as exc:
            raise AnalyticsError(f"{self.where}: {exc}") from exc

    def _connection(self) -> Conn:
        if self._conn is None:
            if self.url is not None:
                self._conn = connect_postgres(self.url)
            else:
                assert self.path is not None
                ensure_indexes(self.path)
                self._conn = connect_readonly(self.path)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _read(self, fn: Callable[[Conn], T]) -> T:
        """``fn`` on the connection. A PostgreSQL connection found lost (a server restart,
        a failover) is replaced and ``fn`` run once more: it only reads."""
        conn = self._connection()
        try:
            return fn(conn)
        except psycopg.OperationalError:
            if not (isinstance(conn, psycopg.Connection) and conn.broken):
                raise
            self._drop()
        return fn(self._connection())

    async def ensure_indexes(self) -> list[str]:
        """Create the analytics indexes that are missing (on a connection of its own: this
        one is read-only); returns the names created."""
        url, path = self.url, self.path
        if url is not None:
            return await self._run(lambda: ensure_pg_indexes(url))
        assert path is not None
        return await self._run(lambda: ensure_indexes(path))

    async def open(self) -> None:
        await self._run(self._connection)

    async def dashboard(self, r: TimeRange) -> dict[str, Any]:
        return await self._run(lambda: self._read(lambda conn: dashboard(conn, r)))

    async def query(self, name: str, r: TimeRange, **kwargs: Any) -> dict[str, Any]:
        fn = QUERIES[name]
        return await self._run(lambda: self._read(lambda conn: fn(conn, r, **kwargs)))

    async def call(self, fn: Callable[[Conn], T]) -> T:
        """Any read on this connection, in the worker thread (the report uses it)."""
        return await self._run(lambda: self._read(fn))

    async def close(self) -> None:
        await self._run(self._drop)
        await asyncio.to_thread(self._executor.shutdown, True)


async def open_analytics(
    store: SQLiteStore | PostgresStore, *, create_indexes: bool = False
) -> Analytics:
    """The analytics of an opened store, on a read-only connection of their own, connected
    now so that a problem shows at start rather than on the first chart. With
    ``create_indexes`` the missing analytics indexes are built first (the service does,
    before it takes traffic; anything else only reads)."""
    if isinstance(store, SQLiteStore):
        reader = Analytics(store.path)
    elif isinstance(store, PostgresStore):
        reader = Analytics(url=store.url)
    else:
        raise TypeError(f"no analytics for {type(store).__name__}")
    try:
        if create_indexes:
            created = await reader.ensure_indexes()
            if created:
                log.info("created analytics indexes: %s", ", ".join(created))
        await reader.open()
    except BaseException:
        await reader.close()
        raise
    return reader
