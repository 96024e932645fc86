"""Analytics queries on a store seeded with a known day of traffic (and the day before)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core import analytics
from core.analytics import Analytics, AnalyticsError, TimeRange, iso
from tests.conftest import SEEDED, empty_store, seed_history

# A fixed "now" 20 minutes past an hour: a 24-hour range then spans exactly 25 buckets.
NOW = datetime(2024, 5, 1, 12, 20, tzinfo=UTC)


@pytest.fixture
async def seeded(tmp_path: Path) -> tuple[Path, datetime]:
    path = tmp_path / "seeded.db"
    await seed_history(path, NOW)
    return path, NOW


async def test_every_chart_matches_the_seeded_day(seeded: tuple[Path, datetime]) -> None:
    path, now = seeded
    reader = Analytics(path)
    try:
        d = await reader.dashboard(TimeRange(now - timedelta(hours=24), now))
    finally:
        await reader.close()
    assert d["bucket"] == "hour"
    assert d["sentiment"]["labels"] == [f"2024-04-30T{h:02d}" for h in range(12, 24)] + [
        f"2024-05-01T{h:02d}" for h in range(13)]
    s = d["sentiment"]
    assert s["totals"] == {k: SEEDED[k] for k in ("negative", "neutral", "positive")}
    assert s["total"] == sum(s["volume"]) == SEEDED["messages"]
    assert s["share_negative"] == pytest.approx(0.4)

    e = d["escalations"]
    assert e["total"] == SEEDED["escalations"] and e["reasons"] == SEEDED["reasons"]
    # Both escalations are in conversation 903: one of the two conversations started
    # escalated (50%), not two escalations over two conversations (100%).
    assert e["conversations_total"] == 2 and e["escalated_conversations_total"] == 1
    assert e["rate_total"] == 0.5

    o = d["operators"]
    assert (o["tickets"], o["answered"], o["resolved"]) == (2, 1, 1)
    assert (o["unanswered"], o["oldest_wait_min"]) == (0, None)  # the other was handed back
    assert o["first_response_min"]["p50"] == pytest.approx(SEEDED["first_response_min"], abs=0.01)
    assert o["resolution_min"]["p50"] == pytest.approx(SEEDED["resolution_min"], abs=0.01)

    f = d["feedback"]
    assert (sum(f["positive"]), sum(f["negative"]), sum(f["other"])) == (2, 1, 1)
    assert f["score"] == pytest.approx(1 / 3, abs=0.001)

    sug = d["suggestions"]
    assert {a["id"]: a["shown"] for a in sug["articles"]} == SEEDED["shown"]
    assert {a["id"]: a["clicked"] for a in sug["articles"]} == SEEDED["clicked"]
    assert sug["articles"][0] == {"id": "refund-policy", "shown": 4, "clicked": 1, "ctr": 0.25}
    assert sug["ctr"] == pytest.approx(2 / 6, abs=0.0001)

    g = d["generator"]
    assert (g["total"], g["failed_total"]) == (SEEDED["replies"], SEEDED["failed"])
    assert g["latency_ms_overall"] == SEEDED["latency_ms_mean"]

    top = d["topics"]["topics"][0]
    assert top["term"] == "refund" and top["messages"] == 3 and top["share_negative"] == 1.0
    assert set(d["query_ms"]) == set(analytics.QUERIES)


async def test_the_previous_day_and_a_week_by_day(seeded: tuple[Path, datetime]) -> None:
    path, now = seeded
    conn = analytics.connect_readonly(path)
    try:
        before = analytics.sentiment(conn, TimeRange(now - timedelta(hours=48),
                                                     now - timedelta(hours=24)))
        week = analytics.sentiment(conn, TimeRange(now - timedelta(days=7), now))
    finally:
        conn.close()
    assert before["total"] == SEEDED["previous_messages"]
    assert before["totals"]["negative"] == SEEDED["previous_negative"]
    assert week["labels"][-1] == now.date().isoformat() and len(week["labels"]) == 8
    assert week["total"] == 15


def test_indexes_are_created_once_and_the_month_queries_use_them(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "plans.db"
    asyncio.run(seed_history(path, datetime.now(UTC)))
    assert set(analytics.ensure_indexes(path)) == set(analytics.INDEXES)
    assert analytics.ensure_indexes(path) == []
    conn = sqlite3.connect(path)
    r = TimeRange.last(30 * 86400)
    for sql in (
        "SELECT COUNT(*) FROM events INDEXED BY events_analytics_value WHERE type = 'message' "
        "AND ts >= ? AND ts < ?",
        "SELECT COUNT(*), AVG(latency_ms) FROM messages INDEXED BY messages_analytics_bot "
        "WHERE direction = 'out' AND sender = 'bot' AND status = 'sent' AND created_at >= ? "
        "AND created_at < ?",
    ):
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, r.bounds))
        assert "COVERING INDEX" in plan and "TEMP B-TREE" not in plan, plan
    conn.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"since": "yesterday"}, "since 'yesterday' is not a duration like 90m, 24h, 7d or 2w"),
    ({"start": "2024-13-01"}, "start '2024-13-01' is not an ISO date"),
    ({"start": "2024-05-02", "end": "2024-05-01"}, "is not before end"),
    ({"since": "400d"}, "longer than 366 days"),
])
def test_bad_ranges_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(AnalyticsError, match=message.replace("(", r"\(")):
        analytics.parse_range(**kwargs)


def test_a_file_that_is_not_a_store_is_named(tmp_path: Path) -> None:
    with pytest.raises(AnalyticsError, match=r"missing\.db: database not found"):
        analytics.connect_readonly(tmp_path / "missing.db")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(AnalyticsError, match=r"other\.db: not a supportbot database"):
        analytics.connect_readonly(other)


async def test_range_edges_buckets_escalation_share_and_waiting_tickets(tmp_path: Path) -> None:
    """Half-open ranges on exact hours: an event at ``start`` counts, one at ``end`` does
    not, one on an hour edge opens its bucket; a conversation escalated three times is one
    escalated conversation; a ticket nobody answered shows as waiting."""
    path = tmp_path / "edges.db"
    await empty_store(path)
    end = datetime(2024, 5, 1, 12, tzinfo=UTC)
    start = end - timedelta(hours=24)
    edge = datetime(2024, 5, 1, 6, tzinfo=UTC)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO users (id, platform, platform_user_id, created_at) "
                 "VALUES (1, 'web', 'u1', ?)", (iso(start),))
    for cid, created in ((1, start), (2, edge), (3, end)):
        conn.execute("INSERT INTO conversations (id, platform, conversation_key, user_id, "
                     "created_at, updated_at) VALUES (?, 'web', ?, 1, ?, ?)",
                     (cid, f"c{cid}", iso(created), iso(created)))
    for at, label in ((start, "negative"), (edge, "positive"), (end, "neutral"),
                      (edge - timedelta(milliseconds=1), "neutral")):
        conn.execute("INSERT INTO events (ts, type, value) VALUES (?, 'message', ?)",
                     (iso(at), label))
    for minutes in (0, 5, 10):  # conversation 1 escalates three times
        conn.execute("INSERT INTO events (ts, type, conversation_id, value) VALUES "
                     "(?, 'escalated', 1, 'negative_sentiment')",
                     (iso(start + timedelta(minutes=minutes)),))
    conn.execute("INSERT INTO tickets (conversation_id, state, reason, created_at, "
                 "announced_at) VALUES (2, 'open', 'customer_requested', ?, ?)",
                 (iso(edge), iso(edge)))
    conn.close()

    r = TimeRange(start, end)
    hours = [f"2024-04-30T{h:02d}" for h in range(12, 24)] + [
        f"2024-05-01T{h:02d}" for h in range(12)]
    assert r.labels() == hours and len(hours) == 24
    reader = Analytics(path)
    try:
        d = await reader.dashboard(r)
        week = await reader.query("sentiment", TimeRange(end - timedelta(days=7), end))
        short = await reader.query("sentiment", TimeRange(
            datetime(2024, 5, 1, 10, 45, tzinfo=UTC), datetime(2024, 5, 1, 12, 15, tzinfo=UTC)))
    finally:
        await reader.close()
    s = d["sentiment"]
    assert s["labels"] == hours and s["total"] == 3, "the event at end is outside the range"
    assert s["volume"][0] == 1 and s["series"]["negative"][0] == 1, "the event at start"
    six = hours.index("2024-05-01T06")
    assert s["volume"][six - 1 : six + 1] == [1, 1]
    assert s["series"]["positive"][six] == 1 and s["series"]["neutral"][six - 1] == 1
    assert week["labels"] == [f"2024-04-{d:02d}" for d in range(24, 31)] + ["2024-05-01"]
    assert short["labels"] == ["2024-05-01T10", "2024-05-01T11", "2024-05-01T12"]

    e = d["escalations"]
    assert e["total"] == 3 and e["conversations_total"] == 2  # conversation 3 starts at end
    assert e["escalated_conversations_total"] == 1 and e["rate_total"] == 0.5
    assert e["rate"][0] == 1.0 and e["rate"][six] == 0.0

    o = d["operators"]
    assert (o["tickets"], o["answered"], o["unanswered"]) == (1, 0, 1)
    assert o["oldest_wait_min"] == 360.0  # from 06:00 to the range's end
    assert o["first_response_min"]["p50"] is None


def test_percentiles_are_nearest_rank() -> None:
    p = analytics._percentile
    assert p([2.0, 1.0], 0.5) == 1.0 and p([2.0, 1.0], 0.9) == 2.0
    ten = [float(v) for v in range(10, 0, -1)]
    assert (p(ten, 0.5), p(ten, 0.9), p(ten, 1.0), p(ten, 0.0)) == (5.0, 9.0, 10.0, 1.0)
    assert p([], 0.5) is None


def test_times_in_another_zone_are_converted_to_utc() -> None:
    r = analytics.parse_range("2h", end="2024-05-01T12:00+02:00")
    assert r.end == datetime(2024, 5, 1, 10, tzinfo=UTC) and r.end.utcoffset() == timedelta(0)
    assert r.start.utcoffset() == timedelta(0) and r.labels() == ["2024-05-01T08",
                                                                    "2024-05-01T09"]
    assert analytics.parse_moment("2024-05-01T12:00", "end").tzinfo is UTC
    shifted = TimeRange(datetime.fromisoformat("2024-05-01T08:30-04:00"),
                        datetime.fromisoformat("2024-05-01T14:00-04:00"))
    assert (shifted.start.hour, shifted.end.hour, shifted.start.tzinfo) == (12, 18, UTC)
