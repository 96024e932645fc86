"""The analytics page and the sentiment report on SQLite and on PostgreSQL: the same rows
in both stores give the same charts, the same report and the same `supportbot report`.

Both databases get their schema from their store's migrations and then the same rows, in
the same order (so the same ids), written with plain INSERTs: the stores stamp what they
write with the current time, and these rows need fixed times (on hour edges, at a range's
start and end, several at one instant). One more test writes through the stores' own API.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bots import report as report_cli
from core import analytics, report
from core.analytics import HANDED_OVER, Analytics, AnalyticsError, TimeRange, iso, open_analytics
from core.config import parse_settings
from core.messages import Inbound, User
from core.store import Scores, SQLiteStore
from core.store_postgres import PostgresStore
from tests.conftest import REPO
from tests.postgres_cluster import Cluster

NOW = datetime(2024, 5, 1, 12, 20, tzinfo=UTC)
RANGES = {
    "24 h by hour": TimeRange(NOW - timedelta(hours=24), NOW),
    "7 days by day": TimeRange(NOW - timedelta(days=7), NOW),
    "30 days": TimeRange(NOW - timedelta(days=30), NOW),
    "90 min off the hour": TimeRange(datetime(2024, 5, 1, 10, 45, tzinfo=UTC),
                                     datetime(2024, 5, 1, 12, 15, tzinfo=UTC)),
    "a quiet day": TimeRange(NOW - timedelta(days=400), NOW - timedelta(days=399)),
}
PHRASES = (  # label, p_negative, text: "refund" ties on p_negative in two texts
    ("negative", 0.9, "My refund still has not arrived, write to jo@example.com"),
    ("negative", 0.9, "The refund is late again? 100% unacceptable"),
    ("negative", 0.77, "You charged my card twice for the café order"),
    ("negative", 0.85, "Nobody answers about my parcel’s delivery"),
    ("neutral", 0.2, "How do I change my delivery address?"),
    ("neutral", 0.1, "What is the status of my order"),
    ("positive", 0.02, "Thanks, the replacement arrived today"),
    ("positive", 0.05, "Great help with the return label"),
)
REASONS = ("customer_requested", "negative_sentiment", "no_answer", None)
ARTICLES = ("refund-policy", "Refund-Policy", "track-order", "área-envío", "zz-last", None)
FEEDBACK = ("👍", "👍", "👎", "great", "Bad", "nice bot", "thumbs_up", None, "slow")

Row = tuple[str, int, dict[str, Any]]
"""(table, the id it must get, columns)."""


def history(now: datetime = NOW) -> list[Row]:
    """Nine days of traffic before ``now``, random but fixed, with the edge cases placed."""
    rng = random.Random(20240501)
    rows: list[Row] = []
    ids: dict[str, int] = {}

    def add(table: str, **row: Any) -> int:
        ids[table] = ids.get(table, 0) + 1
        rows.append((table, ids[table], row))
        return ids[table]

    def ago(ms: int) -> str:
        return iso(now - timedelta(milliseconds=ms))

    def anywhen() -> int:
        return rng.randrange(1, 9 * 86_400_000)

    hour = 3_600_000
    users = [add("users", platform=p, platform_user_id=f"u{i}", display_name=f"User {i}",
                 created_at=ago(10 * 86_400_000))
             for i, p in enumerate(("web", "telegram", "discord"))]
    # At the 24-hour range's start (in it), on an hour edge, at its end (outside it).
    edges = [24 * hour, 2 * hour + 20 * 60_000, 0]
    conversations = []
    for ms in edges + [anywhen() for _ in range(37)]:
        user = rng.choice(users)
        conversations.append((add(
            "conversations", platform="web", conversation_key=f"c{len(conversations)}",
            user_id=user, state="bot", created_at=ago(ms), updated_at=ago(ms),
        ), user))
    instants = edges + [edges[1] + 1] + [anywhen() for _ in range(300)]
    instants += instants[-20:]  # twenty pairs of messages at one instant
    for n, ms in enumerate(instants):
        conversation, user = rng.choice(conversations)
        label, p_negative, text = rng.choice(PHRASES)
        kind = "reaction" if n % 37 == 5 else "text"
        message = add(
            "messages", conversation_id=conversation, direction="in", sender="customer",
            platform="web", platform_message_id=f"m{n}", kind=kind, text=text,
            status="answered", created_at=ago(ms), sentiment=label, p_negative=p_negative,
        )
        add("events", ts=ago(ms), type="message", user_id=user, conversation_id=conversation,
            message_id=message, value=None if n % 41 == 7 else label, data="{}")
        if rng.random() < 0.7:
            status = rng.choice(("sent", "sent", "sent", "failed", "pending"))
            latency = rng.randrange(300, 6000) if status != "pending" else None
            add("messages", conversation_id=conversation, direction="out", sender="bot",
                platform="web", kind="text", text="ok", status=status, reply_to=message,
                created_at=ago(max(0, ms - rng.randrange(500, 9000))), latency_ms=latency,
                first_token_ms=latency // 10 if latency else None,
                error=rng.choice(("timeout", HANDED_OVER, None)) if status == "failed" else None)
    for ms in edges + [anywhen() for _ in range(30)]:
        conversation, user = rng.choice(conversations)
        add("events", ts=ago(ms), type="escalated", user_id=user, conversation_id=conversation,
            value=rng.choice(REASONS), data="{}")
    for type_, count in (("suggestion_shown", 200), ("suggestion_clicked", 40)):
        for _ in range(count):
            conversation, user = rng.choice(conversations)
            add("events", ts=ago(anywhen()), type=type_, user_id=user,
                conversation_id=conversation, item_id=rng.choice(ARTICLES), data="{}")
    for ms in edges + [anywhen() for _ in range(60)]:
        conversation, user = rng.choice(conversations)
        add("events", ts=ago(ms), type="feedback", user_id=user, conversation_id=conversation,
            value=rng.choice(FEEDBACK), data="{}")
    for ms in edges + [anywhen() for _ in range(25)]:
        conversation, _ = rng.choice(conversations)
        state = rng.choice(("open", "claimed", "resolved", "handed_back"))
        first = ms - rng.randrange(1, 40) * 300 if state in ("claimed", "resolved") else None
        closed = first - rng.randrange(1, 600) * 1000 if state == "resolved" and first else None
        add("tickets", conversation_id=conversation, state=state, reason="negative_sentiment",
            scores="{}", created_at=ago(ms), announced_at=ago(ms),
            first_response_at=ago(first) if first is not None else None,
            closed_at=ago(closed) if closed is not None else None)
    return rows


def insert(conn: sqlite3.Connection | psycopg.Connection[Any], mark: str, rows: list[Row]) -> None:
    """The rows in one transaction, each checked to get the id the others refer to."""
    for table, expected, row in rows:
        sql = (f"INSERT INTO {table} ({', '.join(row)}) VALUES "
               f"({', '.join([mark] * len(row))}) RETURNING id")
        got = conn.execute(sql, list(row.values())).fetchone()  # type: ignore[call-overload]
        assert got is not None and got[0] == expected, (table, expected, got)


def seed_sqlite(path: Path, rows: list[Row]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        insert(conn, "?", rows)
        conn.execute("COMMIT")
    finally:
        conn.close()


def seed_postgres(url: str, rows: list[Row]) -> None:
    with psycopg.connect(url) as conn:  # one transaction, committed on leaving
        insert(conn, "%s", rows)


def dashboards(conn: analytics.Conn) -> dict[str, Any]:
    """Every range's dashboard, without the timings."""
    out = {}
    for name, r in RANGES.items():
        d = analytics.dashboard(conn, r)
        d.pop("query_ms")
        out[name] = d
    return out


@pytest.fixture
async def stores(tmp_path: Path, pg_cluster: Cluster) -> AsyncIterator[
        tuple[SQLiteStore, PostgresStore]]:
    """An opened store of each kind, both empty."""
    lite = SQLiteStore(tmp_path / "store.db")
    pg = PostgresStore(pg_cluster.create_database())
    await lite.open()
    try:
        await pg.open()
        try:
            yield lite, pg
        finally:
            await pg.close()
    finally:
        await lite.close()


@pytest.fixture
async def seeded(stores: tuple[SQLiteStore, PostgresStore]) -> tuple[SQLiteStore, PostgresStore]:
    lite, pg = stores
    rows = history()
    seed_sqlite(lite.path, rows)
    seed_postgres(pg.url, rows)
    return lite, pg


async def test_every_chart_is_the_same_on_both_databases(
    seeded: tuple[SQLiteStore, PostgresStore],
) -> None:
    """Without the analytics indexes (SQLite then counts the suggestions another way) and
    with them, through the facade."""
    lite, pg = seeded
    conn = analytics.connect_readonly(lite.path)
    try:
        plain_sqlite = dashboards(conn)
    finally:
        conn.close()
    with analytics.connect_postgres(pg.url) as pg_conn:
        plain_pg = dashboards(pg_conn)
    readers = [await open_analytics(s, create_indexes=True) for s in (lite, pg)]
    try:
        indexed_sqlite, indexed_pg = [await reader.call(dashboards) for reader in readers]
        via_facade = [await reader.dashboard(RANGES["24 h by hour"]) for reader in readers]
    finally:
        for reader in readers:
            await reader.close()
    for d in via_facade:
        assert set(d.pop("query_ms")) == set(analytics.QUERIES)
    assert via_facade[0] == via_facade[1] == indexed_sqlite["24 h by hour"]
    for name in RANGES:  # as JSON: in the same order too, as the page and report show it
        assert len({json.dumps(d[name]) for d in (plain_sqlite, plain_pg, indexed_sqlite,
                                                  indexed_pg)}) == 1, name

    # The comparison is not between two empty pages: the seeded edges and ties are in it.
    day, month = indexed_pg["24 h by hour"], indexed_pg["30 days"]
    assert len(day["sentiment"]["labels"]) == 25 and day["sentiment"]["volume"][0] >= 1
    lo, hi = RANGES["30 days"].bounds
    assert month["sentiment"]["total"] == sum(
        1 for table, _, row in history() if table == "events" and row["type"] == "message"
        and lo <= row["ts"] < hi)
    assert month["escalations"]["reasons"]["unknown"] > 0
    assert list(month["escalations"]["reasons"].values()) == sorted(
        month["escalations"]["reasons"].values(), reverse=True)
    assert {a["id"] for a in month["suggestions"]["articles"]} == set(ARTICLES) - {None}
    assert month["operators"]["unanswered"] > 0 and month["operators"]["resolved"] > 0
    assert month["generator"]["failed_total"] > 0 and month["feedback"]["score"] is not None
    refund = next(t for t in month["topics"]["topics"] if t["term"] == "refund")
    assert refund["share_negative"] == 1.0
    assert indexed_pg["a quiet day"]["sentiment"]["total"] == 0


async def test_the_report_is_the_same_on_both_databases(
    seeded: tuple[SQLiteStore, PostgresStore],
) -> None:
    lite, pg = seeded
    readers = [await open_analytics(s) for s in (lite, pg)]
    try:
        for r in (RANGES["24 h by hour"], RANGES["7 days by day"], RANGES["90 min off the hour"]):
            a, b = [await reader.call(lambda conn, r=r: report.build(conn, r))
                    for reader in readers]
            assert a.data == b.data and a.summary == b.summary
            assert a.chart_png == b.chart_png
    finally:
        for reader in readers:
            await reader.close()
    assert "jo@example.com" not in a.summary
    assert a.data.messages > 0 and a.data.topics


async def test_messages_of_one_instant_are_taken_newest_first(
    stores: tuple[SQLiteStore, PostgresStore],
) -> None:
    """Which of two equally negative messages of one instant is a topic's example does not
    depend on the order a database happens to return them in."""
    at = iso(NOW - timedelta(hours=1))
    rows: list[Row] = [
        ("users", 1, {"platform": "web", "platform_user_id": "u", "created_at": at}),
        ("conversations", 1, {"platform": "web", "conversation_key": "c", "user_id": 1,
                              "created_at": at, "updated_at": at}),
        *[("messages", i, {"conversation_id": 1, "direction": "in", "sender": "customer",
                           "platform": "web", "platform_message_id": f"m{i}", "kind": "text",
                           "text": text, "status": "answered", "created_at": at,
                           "sentiment": "negative", "p_negative": 0.9})
          for i, text in enumerate(("refund one", "refund two", "refund three"), 1)],
    ]
    lite, pg = stores
    seed_sqlite(lite.path, rows)
    seed_postgres(pg.url, rows)
    for store in stores:
        reader = await open_analytics(store, create_indexes=True)
        try:
            found = await reader.query("topics", RANGES["24 h by hour"], sample=2)
        finally:
            await reader.close()
        assert found["sampled"] == 2
        assert found["topics"][0] == {"term": "refund", "messages": 2, "share_negative": 1.0,
                                      "example": "refund three"}


async def test_the_stores_own_writes_read_the_same(
    stores: tuple[SQLiteStore, PostgresStore],
) -> None:
    """Rows written through the stores' API (now-stamped, so compared as totals)."""
    started = datetime.now(UTC)
    for store in stores:
        for n, (label, p_negative, text) in enumerate(PHRASES):
            got = await store.record_inbound(Inbound(
                "web", f"c{n % 3}", User("web", f"u{n % 2}", "Ann"), f"m{n}", text))
            assert got is not None
            await store.set_sentiment(got.message_id, Scores(label, p_negative, 0.0, 0.0))
            await store.log_event("message", user_id=got.user_id,
                                  conversation_id=got.conversation_id,
                                  message_id=got.message_id, value=label)
            reply = await store.begin_outbound(got.conversation_id, "web", "bot", got.message_id)
            await store.finish_outbound(reply, status="sent" if n % 4 else "failed", text="ok",
                                        latency_ms=1000.0 + n, first_token_ms=100.0,
                                        error=None if n % 4 else "timeout")
        await store.log_events([{"type": "suggestion_shown", "item_id": a, "position": i}
                                for i, a in enumerate(("refund-policy", "track-order"))])
        await store.log_event("suggestion_clicked", item_id="refund-policy")
        await store.log_event("feedback", value="👍")
        await store.log_event("escalated", conversation_id=got.conversation_id,
                              value="customer_requested")
        ticket = await store.open_ticket(got.conversation_id, "customer_requested", {})
        assert ticket is not None
        assert await store.claim_ticket(ticket, "web:Dana", iso(datetime.now(UTC)))
        await store.update_ticket(ticket, first_response_at=iso(datetime.now(UTC)))
    r = TimeRange(started - timedelta(hours=1), datetime.now(UTC) + timedelta(seconds=1))
    pages = []
    for store in stores:
        reader = await open_analytics(store)
        try:
            pages.append(await reader.dashboard(r))
        finally:
            await reader.close()

    def totals(d: dict[str, Any]) -> dict[str, Any]:
        o = d["operators"]
        return {
            "sentiment": d["sentiment"]["totals"], "escalations": d["escalations"]["reasons"],
            "conversations": d["escalations"]["conversations_total"],
            "operators": (o["tickets"], o["answered"], o["unanswered"]),
            "feedback": d["feedback"]["top_values"], "suggestions": d["suggestions"],
            "topics": [(t["term"], t["messages"], t["example"]) for t in d["topics"]["topics"]],
            "generator": (d["generator"]["total"], d["generator"]["failed_total"],
                          d["generator"]["latency_ms_overall"]),
        }

    assert totals(pages[0]) == totals(pages[1])
    assert pages[1]["sentiment"]["total"] == len(PHRASES)
    assert pages[1]["generator"]["failed_total"] == 2 and pages[1]["operators"]["answered"] == 1


async def test_postgres_indexes_are_built_once_and_used(
    stores: tuple[SQLiteStore, PostgresStore],
) -> None:
    """Two replicas starting together build each index once; the queries can use them (a
    collation other than the timestamps' "C" would make the range scans impossible)."""
    _, pg = stores
    seed_postgres(pg.url, history())
    built: list[list[str]] = []
    threads = [threading.Thread(target=lambda: built.append(analytics.ensure_pg_indexes(pg.url)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(built[0] + built[1]) == sorted(analytics.PG_INDEXES)
    assert analytics.ensure_pg_indexes(pg.url) == []
    lo, hi = RANGES["24 h by hour"].bounds
    with psycopg.connect(pg.url, autocommit=True) as conn:
        valid = conn.execute("SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c "
                             "ON c.oid = i.indexrelid WHERE c.relname = ANY(%s)",
                             [list(analytics.PG_INDEXES)]).fetchall()
        assert dict(valid) == dict.fromkeys(analytics.PG_INDEXES, True)
        conn.execute("ANALYZE")  # what autovacuum gives a real database
        for plan in ("seqscan", "bitmapscan", "sort"):  # as on a table too big for those
            conn.execute(f"SET enable_{plan} = off")
        for sql, index in (
            ("SELECT COUNT(CASE WHEN value = 'negative' THEN 1 END), COUNT(*) FROM events "
             "WHERE type = 'message' AND ts >= %s AND ts < %s", "events_analytics_value"),
            ("SELECT COUNT(*), AVG(latency_ms) FROM messages WHERE direction = 'out' AND "
             "sender = 'bot' AND status = 'sent' AND created_at >= %s AND created_at < %s",
             "messages_analytics_bot"),
            ("SELECT text FROM messages WHERE direction = 'in' AND kind = 'text' AND "
             "created_at >= %s AND created_at < %s ORDER BY created_at DESC, id DESC LIMIT 50",
             "messages_analytics_customer"),
            ("SELECT substr(created_at, 1, 13), created_at, first_response_at, closed_at, state "
             "FROM tickets WHERE created_at >= %s AND created_at < %s",
             "tickets_analytics_created"),
        ):
            plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql, [lo, hi]))
            assert index in plan and "Sort" not in plan, plan


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_the_analytics_connection_only_reads(
    stores: tuple[SQLiteStore, PostgresStore], backend: str,
) -> None:
    reader = await open_analytics(stores[1 if backend == "postgresql" else 0])
    try:
        with pytest.raises(AnalyticsError, match=r"read-?only"):
            await reader.call(lambda conn: analytics._execute(
                conn, "INSERT INTO events (ts, type, data) VALUES (?, 'feedback', '{}')",
                [iso(NOW)]))
        assert (await reader.query("feedback", RANGES["30 days"]))["total"] == 0
    finally:
        await reader.close()


async def test_a_lost_postgres_connection_is_replaced(
    seeded: tuple[SQLiteStore, PostgresStore],
) -> None:
    """A server restart or failover drops the connection: the next page still loads."""
    _, pg = seeded
    reader = await open_analytics(pg)
    try:
        before = await reader.query("sentiment", RANGES["7 days by day"])
        pid = await reader.call(lambda conn: analytics._execute(
            conn, "SELECT pg_backend_pid()").fetchone()[0])
        with psycopg.connect(pg.url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        assert await reader.query("sentiment", RANGES["7 days by day"]) == before
        assert await reader.call(lambda conn: analytics._execute(
            conn, "SELECT pg_backend_pid()").fetchone()[0]) != pid
    finally:
        await reader.close()


async def test_analytics_refuses_a_database_that_is_not_a_store(pg_cluster: Cluster) -> None:
    url = pg_cluster.create_database()
    with pytest.raises(AnalyticsError, match=r"/t_\d+: not a supportbot database"):
        analytics.connect_postgres(url)
    with pytest.raises(AnalyticsError, match=r"postgresql://supportbot@127\.0\.0\.1:\d+/nope: "):
        analytics.connect_postgres(url.rsplit("/", 1)[0] + "/nope")
    with pytest.raises(ValueError, match="give one"):
        Analytics()


# -- supportbot report ---------------------------------------------------------------------


PASSWORD_ENV = "SUPPORTBOT_TEST_PG_PASSWORD"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), PASSWORD_ENV: "not-needed-with-trust"}
    return subprocess.run([sys.executable, "-m", "bots.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def pg_config(tmp_path: Path, url: str, name: str = "pg.toml") -> Path:
    config = tmp_path / name
    config.write_text(f'[store]\nurl = "{url}"\npassword_env = "{PASSWORD_ENV}"\n',
                      encoding="utf-8")
    return config


async def test_the_report_command_on_postgres_writes_what_sqlite_writes(
    seeded: tuple[SQLiteStore, PostgresStore], tmp_path: Path,
) -> None:
    lite, pg = seeded
    sqlite_config = tmp_path / "lite.toml"
    sqlite_config.write_text(f'[store]\npath = "{lite.path}"\n', encoding="utf-8")
    summaries = []
    for config, out in ((sqlite_config, "lite"), (pg_config(tmp_path, pg.url), "pg")):
        done = run_cli("report", "--since", "24h", "--until", iso(NOW), "--config", str(config),
                       "--out", str(tmp_path / out), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        [txt] = (tmp_path / out).glob("sentiment-*.txt")
        [png] = (tmp_path / out).glob("sentiment-*.png")
        summaries.append((txt.name, txt.read_text(encoding="utf-8"), png.read_bytes()))
    assert summaries[0] == summaries[1]
    assert summaries[0][1].startswith("Sentiment report, 2024-04-30 12:20 to 2024-05-01 12:20")
    # It only reads: the analytics indexes are the service's to build.
    with psycopg.connect(pg.url) as conn:
        names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes")}
    assert not names & set(analytics.PG_INDEXES)


async def test_the_report_command_names_a_postgres_it_cannot_read(
    pg_cluster: Cluster, tmp_path: Path,
) -> None:
    url = pg_cluster.create_database()
    missing = url.rsplit("/", 1)[0] + "/nope"
    for target, message in ((url, "not a supportbot database"),
                            (missing, 'database "nope" does not exist')):
        done = run_cli("report", "--config", str(pg_config(tmp_path, target)),
                       "--out", str(tmp_path / "out"), cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert done.stderr.startswith("error: postgresql://supportbot@127.0.0.1:")
        assert "Traceback" not in done.stderr and "not-needed" not in done.stderr


async def test_the_report_command_sends_the_password_from_the_environment(
    pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The URL in the config has none; the command connects with the one the environment
    holds, as the service does, and names the database without it."""
    url = pg_cluster.create_database()
    store = PostgresStore(url)
    await store.open()
    await store.close()
    settings = parse_settings({"store": {"url": url, "password_env": PASSWORD_ENV}}, "test")
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    conn, where = report_cli.connect(settings, None)
    try:
        assert conn.info.password == "s3cret" and "s3cret" not in where
    finally:
        conn.close()
