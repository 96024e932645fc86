"""Analytics queries over a million seeded events: each chart's query for a 30-day page.

Seeds a store (the real schema, through ``SQLiteStore``'s migrations) with 30 days of
traffic: conversations, customer messages with sentiment, bot replies with timings,
suggestions shown and clicked, escalations, tickets and feedback, then times every query
of the analytics page twice: with the store's own indexes only (the baseline) and after
``core.analytics.ensure_indexes``. The goal is under 500 ms per query on two cores.

    python bench/analytics.py [--events 1000000] [--days 30] [--db /tmp/analytics.db]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import analytics
from core.store import SQLiteStore

PHRASES = (
    ("negative", "my order never arrived and nobody answers"),
    ("negative", "the refund is late again, this is awful"),
    ("negative", "you charged my card twice"),
    ("neutral", "how do i change my delivery address"),
    ("neutral", "what is the status of my order"),
    ("positive", "thanks, the replacement arrived today"),
    ("positive", "great help with the return label"),
)
REASONS = ("customer_requested", "negative_sentiment", "no_answer", "generation_failed")
ARTICLES = tuple(f"article-{i:02d}" for i in range(40))
FEEDBACK = ("👍", "👍", "👎", "great", "slow answers")


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def seed(path: Path, events: int, days: int, rng: random.Random) -> dict[str, int]:
    """Write about ``events`` behavior-log rows (and the messages behind them)."""
    asyncio.run(_migrate(path))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    end = datetime.now(UTC)
    start = end - timedelta(days=days)
    span = (end - start).total_seconds()
    per_conversation = 20  # events per conversation, on average
    n_conv = max(1, events // per_conversation)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO users (id, platform, platform_user_id, display_name, created_at) "
        "VALUES (?, 'web', ?, '', ?)",
        ((i, f"u{i}", iso(start)) for i in range(1, n_conv + 1)),
    )
    counts = {"events": 0, "messages": 0, "conversations": n_conv, "tickets": 0}
    event_rows: list[tuple] = []
    message_rows: list[tuple] = []
    ticket_rows: list[tuple] = []
    conv_rows: list[tuple] = []
    message_id = 0
    for conv in range(1, n_conv + 1):
        t = start + timedelta(seconds=rng.random() * span * 0.98)
        conv_rows.append((conv, "web", f"s{conv}", conv, "bot", iso(t), iso(t)))
        budget = rng.randint(per_conversation - 6, per_conversation + 6)
        while budget > 0:
            label, text = rng.choice(PHRASES)
            t += timedelta(seconds=rng.randint(5, 120))
            message_id += 1
            cid = message_id
            message_rows.append((cid, conv, "in", "customer", "web", f"m{cid}", "text", text,
                                 "answered", None, iso(t), label,
                                 0.9 if label == "negative" else 0.1, None, None, None))
            event_rows.append((iso(t), "message", conv, conv, cid, None, None, label))
            budget -= 1
            if label == "negative" and rng.random() < 0.04:
                reason = rng.choice(REASONS)
                event_rows.append((iso(t), "escalated", conv, conv, cid, None, None, reason))
                first = t + timedelta(minutes=rng.uniform(1, 30))
                closed = first + timedelta(minutes=rng.uniform(5, 120))
                ticket_rows.append((conv, "resolved", reason, iso(t), iso(t), "web:op",
                                    iso(first), iso(first), iso(closed)))
                event_rows.append((iso(closed), "resolved", conv, conv, None, None, None, "op"))
                budget -= 2
                continue
            message_id += 1
            failed = rng.random() < 0.02
            message_rows.append((message_id, conv, "out", "bot", "web", None, "text", "ok",
                                 "failed" if failed else "sent", cid, iso(t), None, None,
                                 rng.uniform(100, 900), rng.uniform(1000, 6000),
                                 "timeout" if failed else None))
            for pos in range(3 if rng.random() < 0.25 else 0):
                item = ARTICLES[int(rng.paretovariate(1.2)) % len(ARTICLES)]
                event_rows.append((iso(t), "suggestion_shown", conv, conv, message_id, item,
                                   pos, None))
                budget -= 1
                if rng.random() < 0.08:
                    event_rows.append((iso(t), "suggestion_clicked", conv, conv, None, item,
                                       None, None))
                    budget -= 1
            if rng.random() < 0.05:
                event_rows.append((iso(t), "feedback", conv, conv, None, None, None,
                                   rng.choice(FEEDBACK)))
                budget -= 1
        if len(event_rows) > 50_000:
            _flush(conn, conv_rows, message_rows, event_rows, ticket_rows, counts)
    _flush(conn, conv_rows, message_rows, event_rows, ticket_rows, counts)
    conn.execute("COMMIT")
    conn.close()
    return counts


def _flush(conn: sqlite3.Connection, conv_rows: list, message_rows: list, event_rows: list,
           ticket_rows: list, counts: dict[str, int]) -> None:
    conn.executemany("INSERT INTO conversations (id, platform, conversation_key, user_id, state, "
                     "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)", conv_rows)
    conn.executemany(
        "INSERT INTO messages (id, conversation_id, direction, sender, platform, "
        "platform_message_id, kind, text, status, reply_to, created_at, sentiment, p_negative, "
        "first_token_ms, latency_ms, error) VALUES (" + ", ".join("?" * 16) + ")",
        message_rows,
    )
    conn.executemany(
        "INSERT INTO events (ts, type, user_id, conversation_id, message_id, item_id, position, "
        "value) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", event_rows,
    )
    conn.executemany(
        "INSERT INTO tickets (conversation_id, state, reason, created_at, announced_at, "
        "claimed_by, claimed_at, first_response_at, closed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ticket_rows,
    )
    counts["events"] += len(event_rows)
    counts["messages"] += len(message_rows)
    counts["tickets"] += len(ticket_rows)
    for rows in (conv_rows, message_rows, event_rows, ticket_rows):
        rows.clear()


async def _migrate(path: Path) -> None:
    store = SQLiteStore(path)
    await store.open()
    await store.close()


def time_queries(path: Path, r: analytics.TimeRange, repeat: int) -> dict[str, float]:
    """Best of ``repeat`` runs per query, in ms, on a fresh read-only connection."""
    conn = analytics.connect_readonly(path)
    best = {}
    try:
        for name, query in analytics.QUERIES.items():
            runs = []
            for _ in range(repeat):
                started = time.perf_counter()
                query(conn, r)
                runs.append((time.perf_counter() - started) * 1000)
            best[name] = min(runs)
    finally:
        conn.close()
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--db", type=Path, help="where to seed (default: a temporary file)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory(prefix="analytics-bench-")
        args.db = Path(tmp.name) / "bench.db"
    elif args.db.exists():
        parser.error(f"--db {args.db} exists; give a new path")
    try:
        started = time.perf_counter()
        counts = seed(args.db, args.events, args.days, random.Random(args.seed))
        print(f"seeded {counts['events']:,} events, {counts['messages']:,} messages, "
              f"{counts['conversations']:,} conversations, {counts['tickets']:,} tickets "
              f"over {args.days} days in {time.perf_counter() - started:.1f} s "
              f"(cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
        r = analytics.TimeRange.last(args.days * 86400)
        baseline = time_queries(args.db, r, 1)
        started = time.perf_counter()
        created = analytics.ensure_indexes(args.db)
        print(f"created {len(created)} indexes in {time.perf_counter() - started:.1f} s")
        indexed = time_queries(args.db, r, args.repeat)
        print(f"\n{'query':<12} {'store indexes ms':>17} {'analytics ms':>13} {'speed-up':>9}")
        for name in analytics.QUERIES:
            print(f"{name:<12} {baseline[name]:>17.1f} {indexed[name]:>13.1f} "
                  f"{baseline[name] / indexed[name]:>8.1f}x")
        worst = max(indexed.values())
        verdict = "met" if worst < 500 else "MISSED"
        print(f"\nslowest query {worst:.1f} ms (goal < 500 ms): {verdict}")
        return 0 if worst < 500 else 1
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
