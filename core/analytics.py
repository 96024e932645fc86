"""Read-only analytics over the store: sentiment, escalations, operators, suggestions, model.

The queries read the ``events``, ``messages``, ``conversations`` and ``tickets`` tables on
their own SQLite connection, on one worker thread, so the event loop never waits and the
store's writer is never blocked (WAL lets readers run beside it). The covering indexes the
queries need are created once by :func:`ensure_indexes`; with them a 30-day range over a
million events stays an index-only scan.
"""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Bucket = Literal["hour", "day"]

SQLITE_ONLY = "analytics dashboard and reports: SQLite only for now"
"""Why there are none on PostgreSQL: every query here reads the SQLite file directly."""

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


# -- queries (synchronous; each takes a connection and a range) ----------------------------


def _series(labels: list[str], counts: dict[str, float], default: float | None = 0) -> list:
    return [counts.get(label, default) for label in labels]


def _index(conn: sqlite3.Connection, name: str) -> str:
    """``INDEXED BY name`` where the analytics index exists (without statistics SQLite
    would pick the store's narrower index and sort)."""
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)
    ).fetchone()
    return f" INDEXED BY {name}" if found else ""


def _per_bucket(
    conn: sqlite3.Connection, r: TimeRange, sql: str, params: tuple = ()
) -> dict[str, tuple]:
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
        out[label] = conn.execute(sql, (*params, lo, hi)).fetchone()
    return out


SENTIMENTS = ("negative", "neutral", "positive")


def sentiment(conn: sqlite3.Connection, r: TimeRange) -> dict[str, Any]:
    """Customer messages per bucket by sentiment label (the volume chart too)."""
    rows = _per_bucket(
        conn, r,
        "SELECT " + ", ".join(f"SUM(value = '{s}')" for s in SENTIMENTS) + ", COUNT(*) "
        f"FROM events{_index(conn, 'events_analytics_value')} "
        "WHERE type = 'message' AND ts >= ? AND ts < ?",
    )
    labels = r.labels()
    series = {s: [rows[b][i] or 0 for b in labels] for i, s in enumerate(SENTIMENTS)}
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


def escalations(conn: sqlite3.Connection, r: TimeRange) -> dict[str, Any]:
    """Escalations by reason, and per bucket the share of the conversations started there
    that escalated in the range (each conversation counted once, so never above 100%)."""
    rows = conn.execute(
        f"SELECT substr(ts, 1, {r.width}) AS b, value, COUNT(*) FROM events "
        "WHERE type = 'escalated' AND ts >= ? AND ts < ? GROUP BY b, value",
        r.bounds,
    ).fetchall()
    started = dict(conn.execute(
        f"SELECT substr(created_at, 1, {r.width}) AS b, COUNT(*) FROM conversations "
        "WHERE created_at >= ? AND created_at < ? GROUP BY b",
        r.bounds,
    ).fetchall())
    # The escalated conversations of the range as a set first (events has no index on
    # conversation_id, so a join driven from conversations would scan it per row).
    escalated = dict(conn.execute(
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
        "reasons": dict(reasons.most_common()),
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


def operators(conn: sqlite3.Connection, r: TimeRange) -> dict[str, Any]:
    """Minutes to the first operator reply and to resolution, for tickets opened in range;
    and the tickets nobody has answered yet (medians alone would hide them)."""
    now = min(r.end, datetime.now(UTC))
    rows = conn.execute(
        f"SELECT substr(created_at, 1, {r.width}), "
        "(julianday(first_response_at) - julianday(created_at)) * 1440, "
        "CASE WHEN state = 'resolved' THEN "
        "(julianday(closed_at) - julianday(created_at)) * 1440 END, "
        "CASE WHEN first_response_at IS NULL AND state IN ('open', 'claimed') THEN "
        "(julianday(?) - julianday(created_at)) * 1440 END "
        "FROM tickets WHERE created_at >= ? AND created_at < ?",
        (iso(now), *r.bounds),
    ).fetchall()
    first: dict[str, list[float]] = {}
    resolve: dict[str, list[float]] = {}
    waits = [row[3] for row in rows if row[3] is not None]
    for bucket, to_first, to_resolve, _ in rows:
        if to_first is not None:
            first.setdefault(bucket, []).append(to_first)
        if to_resolve is not None:
            resolve.setdefault(bucket, []).append(to_resolve)
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


def feedback(conn: sqlite3.Connection, r: TimeRange) -> dict[str, Any]:
    """Reactions and /feedback per bucket: positive, negative, other."""
    rows = conn.execute(
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
        "top_values": dict(values.most_common(8)),
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


def suggestions(conn: sqlite3.Connection, r: TimeRange, limit: int = 15) -> dict[str, Any]:
    """Click-through by article: clicks over times shown, most shown first."""
    hint = _index(conn, "events_analytics_article")
    counts: dict[str, list[int]] = {}
    for slot, type_ in enumerate(("suggestion_shown", "suggestion_clicked")):
        if hint:
            for item in _items(conn, type_, hint):
                n = conn.execute(
                    f"SELECT COUNT(*) FROM events{hint} WHERE type = ? AND item_id = ? "
                    "AND ts >= ? AND ts < ?",
                    (type_, item, *r.bounds),
                ).fetchone()[0]
                if n:
                    counts.setdefault(item, [0, 0])[slot] = n
        else:
            for item, n in conn.execute(
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
    conn: sqlite3.Connection, r: TimeRange, limit: int = 10, *, negative_only: bool = False,
    sample: int = TOPIC_SAMPLE, redact: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """The words customers use most (in their latest ``sample`` messages of the range),
    with how often a message using them was negative and the most negative example.

    ``redact`` runs on the whole example before it is cut to 200 characters, so a cut
    cannot leave half an e-mail address that the redaction no longer recognises.
    """
    where = " AND sentiment = 'negative'" if negative_only else ""
    rows = conn.execute(
        "SELECT text, sentiment, p_negative FROM messages"
        f"{_index(conn, 'messages_analytics_customer')} "
        "WHERE direction = 'in' AND kind = 'text' AND created_at >= ? AND created_at < ?"
        f"{where} ORDER BY created_at DESC LIMIT ?",
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
            for term, n in counts.most_common(limit)
        ],
    }


def generator(conn: sqlite3.Connection, r: TimeRange) -> dict[str, Any]:
    """Bot replies per bucket: mean time to first token and to the whole reply, failures."""
    hint = _index(conn, "messages_analytics_bot")
    where = (f"FROM messages{hint} WHERE direction = 'out' AND sender = 'bot' AND status = ? "
             "AND created_at >= ? AND created_at < ?")
    sent = _per_bucket(
        conn, r, f"SELECT COUNT(*), AVG(latency_ms), AVG(first_token_ms) {where}", ("sent",)
    )
    failed = _per_bucket(
        conn, r, f"SELECT COUNT(*), SUM(COALESCE(error, '') != ?) {where}", (HANDED_OVER, "failed")
    )
    # (replies, real failures, mean latency, mean first token, sent)
    by = {b: (sent[b][0] + failed[b][0], failed[b][1], sent[b][1], sent[b][2], sent[b][0])
          for b in sent}
    labels = r.labels()
    replies = [by[b][0] for b in labels]
    failed = [by[b][1] or 0 for b in labels]
    total, total_failed = sum(replies), sum(failed)
    weighted = [(by[b][4], by[b][2]) for b in labels if by[b][2] is not None]
    n_sent = sum(n for n, _ in weighted)
    return {
        "labels": labels,
        "replies": replies,
        "failed": failed,
        "failure_rate": [round(f / n, 4) if n else None for f, n in zip(failed, replies,
                                                                       strict=True)],
        "latency_ms_mean": [_round(by[b][2], 1) for b in labels],
        "first_token_ms_mean": [_round(by[b][3], 1) for b in labels],
        "total": total,
        "failed_total": total_failed,
        "failure_rate_total": total_failed / total if total else 0.0,
        "latency_ms_overall": _round(sum(n * lat for n, lat in weighted) / n_sent, 1)
        if n_sent else None,
    }


QUERIES: dict[str, Callable[[sqlite3.Connection, TimeRange], dict[str, Any]]] = {
    "sentiment": sentiment,
    "escalations": escalations,
    "operators": operators,
    "feedback": feedback,
    "suggestions": suggestions,
    "topics": topics,
    "generator": generator,
}


def dashboard(conn: sqlite3.Connection, r: TimeRange) -> dict[str, Any]:
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
    """The queries on a read-only connection owned by one worker thread."""

    __slots__ = ("_conn", "_executor", "path")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="analytics")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            raise AnalyticsError(f"{self.path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            ensure_indexes(self.path)
            self._conn = connect_readonly(self.path)
        return self._conn

    async def open(self) -> None:
        await self._run(self._connection)

    async def dashboard(self, r: TimeRange) -> dict[str, Any]:
        return await self._run(lambda: dashboard(self._connection(), r))

    async def query(self, name: str, r: TimeRange, **kwargs: Any) -> dict[str, Any]:
        fn = QUERIES[name]
        return await self._run(lambda: fn(self._connection(), r, **kwargs))

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Any read on this connection, in the worker thread (the report uses it)."""
        return await self._run(lambda: fn(self._connection()))

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(shut)
        await asyncio.to_thread(self._executor.shutdown, True)
