"""Analytics queries on a store seeded with a known day of traffic (and the day before)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core import analytics
from core.analytics import Analytics, AnalyticsError, TimeRange
from tests.conftest import SEEDED, seed_history


@pytest.fixture
async def seeded(tmp_path: Path) -> tuple[Path, datetime]:
    path = tmp_path / "seeded.db"
    now = datetime.now(UTC)
    await seed_history(path, now)
    return path, now


async def test_every_chart_matches_the_seeded_day(seeded: tuple[Path, datetime]) -> None:
    path, now = seeded
    reader = Analytics(path)
    try:
        d = await reader.dashboard(TimeRange(now - timedelta(hours=24), now))
    finally:
        await reader.close()
    assert d["bucket"] == "hour" and len(d["sentiment"]["labels"]) in (24, 25)
    s = d["sentiment"]
    assert s["totals"] == {k: SEEDED[k] for k in ("negative", "neutral", "positive")}
    assert s["total"] == sum(s["volume"]) == SEEDED["messages"]
    assert s["share_negative"] == pytest.approx(0.4)

    e = d["escalations"]
    assert e["total"] == SEEDED["escalations"] and e["reasons"] == SEEDED["reasons"]
    assert e["conversations_total"] == 2 and e["rate_total"] == 1.0

    o = d["operators"]
    assert (o["tickets"], o["answered"], o["resolved"]) == (2, 1, 1)
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


async def test_customer_history_lists_every_conversation_of_the_account(
    seeded: tuple[Path, datetime],
) -> None:
    path, _ = seeded
    reader = Analytics(path)
    try:
        rows = await reader.call(lambda conn: analytics.customer_history(conn, 903))
    finally:
        await reader.close()
    assert [r["id"] for r in rows] == [903, 902, 901]
    current = rows[0]
    assert current["current"] and current["messages"] == 7 and current["tickets"] == 1
    assert current["reasons"] == "negative_sentiment"
    assert current["last_text"] == "Where is my refund? This is awful."


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
