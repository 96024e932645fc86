"""Shared fixtures: settings on a temporary database, and the real service on a free port.

Models are real: the embedded SmolLM2 (converted once into ``data/models``, shared by
runs) and the MiniLM sentiment encoder with the committed head.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings, parse_settings
from tests.postgres_cluster import Cluster, ClusterError, start_cluster

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]
REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("SUPPORTBOT_TEST_DATA_DIR", REPO / "data"))
OPERATOR_TOKEN = "test-operator-token"


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """Test settings: a fresh SQLite file, the shared model cache, short replies. Answers
    wait for the model (``mode = "generate"``) however loaded the machine is: the ``auto``
    mode's wall-clock budget would pick the extractive answer on a busy CI box, so a test
    of the budget asks for ``mode="auto"`` itself."""
    base: dict[str, dict[str, Any]] = {
        "answers": {"mode": "generate"},
        "service": {"data_dir": str(DATA_DIR), "shutdown_grace_s": 5.0},
        "store": {"path": str(tmp_path / "supportbot.db")},
        "generator": {"max_new_tokens": 24, "temperature": 0.0, "timeout_s": 60.0},
        "web": {"port": 0, "operator_token_env": "SUPPORTBOT_TEST_OPERATOR_TOKEN"},
        "recommender": {"knowledge_dir": str(REPO / "knowledge")},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return parse_settings(base, "test settings")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throwaway PostgreSQL server for the run; each test makes its own database
    (``create_database``). Missing server binaries fail the tests that need it."""
    try:
        cluster = start_cluster()
    except ClusterError as exc:
        pytest.fail(str(exc))
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    """Debian's headless Chromium driven by Playwright, one per test module."""
    from playwright.async_api import async_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install the Debian package chromium (make test does)")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    return lambda **sections: make_settings(tmp_path, **sections)


@pytest.fixture(scope="session", autouse=True)
def _operator_token() -> None:
    os.environ["SUPPORTBOT_TEST_OPERATOR_TOKEN"] = OPERATOR_TOKEN


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, step: float = 0.05) -> Any:
    """Poll until ``predicate()`` (sync or async) is truthy; fail with a clear message."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)


@pytest.fixture
async def web_service(tmp_path: Path) -> AsyncIterator[Any]:
    """The real service (web adapter only) on a free port."""
    from bots.service import Service

    service = Service(make_settings(tmp_path))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


class ScriptedDraftGenerator:
    """A generator that answers with a fixed text: for tests of the operator desk, where
    the bot's wording is not what is checked (and a real model would cost a load)."""

    saturated = False

    def __init__(self, answer: str = "Here is what I found about your order.") -> None:
        self.answer = answer
        self.calls = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1

    async def stream(self, messages: Any, params: Any) -> AsyncIterator[str]:
        self.calls += 1
        for word in self.answer.split(" "):
            yield word + " "


class Desk:
    """The web adapter on a real pipeline: real SQLite store, real sentiment model, a
    scripted generator (no language model is loaded)."""

    def __init__(self, settings: Settings) -> None:
        from adapters.web import WebAdapter
        from core.sentiment import build_classifier
        from core.store import SQLiteStore

        s = settings.sentiment
        self.settings = settings
        self.store = SQLiteStore(settings.store.path)
        self.classifier = build_classifier(
            s.encoder, s.head, s.model, s.max_batch, s.max_wait_ms, quantize=s.quantize
        )
        self.generator = ScriptedDraftGenerator()
        self.web = WebAdapter(settings.web, OPERATOR_TOKEN)
        self.pipeline: Any = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web.port}"

    async def start(self) -> Desk:
        from core.pipeline import Pipeline

        await self.store.open()
        await self.classifier.start()
        self.pipeline = Pipeline(self.settings, self.store, self.classifier, self.generator)
        await self.web.start(self.pipeline)
        await self.pipeline.operators.start()
        self.web.ready = True
        return self

    async def stop(self) -> None:
        self.web.ready = False
        await self.pipeline.close(2.0)
        await self.pipeline.operators.stop()
        await self.web.stop()
        await self.classifier.close()
        await self.store.close()


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    """The operator desk over the web adapter, without the language model."""
    settings = make_settings(
        tmp_path, grounding={"enabled": False}, recommender={"enabled": False}
    )
    running = await Desk(settings).start()
    try:
        yield running
    finally:
        await running.stop()


# -- seeded history for analytics and reports -----------------------------------------------

# (hours before now, label, p_negative, text): the last 24 hours, then the 24 before.
SEEDED_MESSAGES = (
    (1.5, "negative", 0.93, "Where is my refund? This is awful."),
    (2.5, "negative", 0.88, "The refund is late and nobody answers"),
    (3.5, "neutral", 0.20, "How do I change my delivery address"),
    (5.5, "negative", 0.95, "My refund still has not arrived, write to jo@example.com"),
    (6.5, "positive", 0.03, "Thanks, the replacement arrived today"),
    (8.5, "neutral", 0.25, "What is the status of my order"),
    (10.5, "negative", 0.79, "The parcel came broken"),
    (12.5, "positive", 0.05, "Great help with the return label"),
    (16.5, "neutral", 0.30, "Can I pay with a gift card"),
    (20.5, "positive", 0.04, "Thank you, all sorted"),
    (26.5, "negative", 0.90, "Still waiting for my parcel"),
    (30.5, "neutral", 0.20, "Do you ship abroad"),
    (34.5, "neutral", 0.22, "How long does delivery take"),
    (40.5, "positive", 0.04, "Lovely service"),
    (44.5, "positive", 0.06, "Thanks a lot"),
)
SEEDED = {
    "messages": 10, "negative": 4, "neutral": 3, "positive": 3,
    "previous_messages": 5, "previous_negative": 1,
    "escalations": 2, "previous_escalations": 1,
    "reasons": {"negative_sentiment": 1, "customer_requested": 1},
    "replies": 7, "failed": 1, "latency_ms_mean": 3000.0,
    "shown": {"refund-policy": 4, "track-order": 2}, "clicked": {"refund-policy": 1,
                                                                 "track-order": 1},
    "feedback": {"positive": 2, "negative": 1, "other": 1},
    "first_response_min": 5.0, "resolution_min": 30.0,
}


async def empty_store(path: Path) -> None:
    """A store's database with its schema (from the store's own migrations) and no rows."""
    from core.store import SQLiteStore

    store = SQLiteStore(path)
    await store.open()
    await store.close()


async def seed_history(path: Path, now: Any) -> None:
    """Write a known day of traffic (and the day before) into a store's database.

    The schema comes from the store's own migrations; rows are written directly because
    the store stamps everything with the current time.
    """
    await empty_store(path)
    await asyncio.to_thread(_seed, path, now)


def _seed(path: Path, now: Any) -> None:
    import sqlite3
    from datetime import timedelta

    def at(hours: float) -> str:
        return (now - timedelta(hours=hours)).isoformat(timespec="milliseconds")

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO users (id, platform, platform_user_id, display_name, created_at) "
                 "VALUES (901, 'telegram', '4242', 'Seeded Sam', ?)", (at(47),))
    for conv, hours in ((901, 46.0), (902, 21.0), (903, 11.0)):
        conn.execute(
            "INSERT INTO conversations (id, platform, conversation_key, user_id, state, "
            "created_at, updated_at) VALUES (?, 'telegram', ?, 901, 'bot', ?, ?)",
            (conv, f"seeded-{conv}", at(hours), at(hours)),
        )
    for i, (hours, label, p_neg, text) in enumerate(reversed(SEEDED_MESSAGES)):  # oldest first
        conv = 901 if hours > 24 else (902 if hours > 11 else 903)
        mid = 9000 + i
        conn.execute(
            "INSERT INTO messages (id, conversation_id, direction, sender, platform, "
            "platform_message_id, kind, text, status, created_at, sentiment, p_negative) "
            "VALUES (?, ?, 'in', 'customer', 'telegram', ?, 'text', ?, 'answered', ?, ?, ?)",
            (mid, conv, f"seed-{mid}", text, at(hours), label, p_neg),
        )
        conn.execute(
            "INSERT INTO events (ts, type, user_id, conversation_id, message_id, value, data) "
            "VALUES (?, 'message', 901, ?, ?, ?, '{}')", (at(hours), conv, mid, label),
        )
    replies = [(1.4, "sent", 1000, None), (2.4, "sent", 2000, None), (3.4, "sent", 3000, None),
               (6.4, "sent", 4000, None), (8.4, "sent", 5000, None),
               (12.4, "failed", 900, "timeout"), (16.4, "failed", 500, "handed to an operator")]
    for j, (hours, status, latency, error) in enumerate(replies):
        conn.execute(
            "INSERT INTO messages (id, conversation_id, direction, sender, platform, kind, text, "
            "status, created_at, latency_ms, first_token_ms, error) VALUES "
            "(?, 903, 'out', 'bot', 'telegram', 'text', 'ok', ?, ?, ?, ?, ?)",
            (9500 + j, status, at(hours), latency, latency / 10, error),
        )
    events = [
        (5.4, "escalated", "negative_sentiment", None), (2.0, "escalated", "customer_requested",
                                                         None),
        (27.0, "escalated", "customer_requested", None),
        *[(h, "suggestion_shown", None, "refund-policy") for h in (1.4, 2.4, 3.4, 6.4)],
        *[(h, "suggestion_shown", None, "track-order") for h in (8.4, 12.4)],
        (1.3, "suggestion_clicked", None, "refund-policy"),
        (8.3, "suggestion_clicked", None, "track-order"),
        (30.0, "suggestion_shown", None, "refund-policy"),
        (4.0, "feedback", "👍", None), (7.0, "feedback", "👍", None),
        (9.0, "feedback", "👎", None), (11.0, "feedback", "nice bot", None),
    ]
    for hours, type_, value, item in events:
        conn.execute(
            "INSERT INTO events (ts, type, user_id, conversation_id, item_id, value, data) "
            "VALUES (?, ?, 901, 903, ?, ?, '{}')", (at(hours), type_, item, value),
        )
    conn.execute(
        "INSERT INTO tickets (conversation_id, state, reason, created_at, announced_at, "
        "claimed_by, claimed_at, first_response_at, closed_at) VALUES "
        "(903, 'resolved', 'negative_sentiment', ?, ?, 'web:Dana', ?, ?, ?)",
        (at(5.4), at(5.4), at(5.4 - 5 / 60), at(5.4 - 5 / 60), at(5.4 - 30 / 60)),
    )
    conn.execute(
        "INSERT INTO tickets (conversation_id, state, reason, created_at, announced_at) "
        "VALUES (902, 'handed_back', 'customer_requested', ?, ?)", (at(2.0), at(2.0)),
    )
    conn.execute("COMMIT")
    conn.close()

