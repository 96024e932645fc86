"""The database failing under a running service: locked, or full.

A real lock is taken by a second SQLite connection on the same file. A full disk is the
real ``sqlite3.OperationalError`` raised at the store boundary (every database call passes
through ``SQLiteStore._call``) while the test says the disk is full; everything else is
the real service: the web adapter, the pipeline, SmolLM2, MiniLM.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from bots.service import Service
from core import metrics
from core.messages import Inbound, User
from core.pipeline import STORE_FALLBACK_TEXT
from core.store import SQLiteStore, StoreError
from tests.conftest import make_settings, wait_for

T = TypeVar("T")
FULL = "database or disk is full"


class FlakyStore(SQLiteStore):
    """The real store, whose database calls fail with ``fault`` while it is set."""

    __slots__ = ("arm_after_inbound", "arm_on_sent", "fault")

    def __init__(self, path: Path) -> None:
        super().__init__(path, busy_timeout_ms=50)
        self.fault: str | None = None
        self.arm_after_inbound: str | None = None  # fail from the moment a message is in
        self.arm_on_sent: str | None = None  # fail when a sent reply is being recorded

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self.fault is not None:
            raise sqlite3.OperationalError(self.fault)
        return super()._call(fn, args)

    async def record_inbound(self, inbound: Inbound) -> Any:
        stored = await super().record_inbound(inbound)
        if self.arm_after_inbound is not None:
            self.fault, self.arm_after_inbound = self.arm_after_inbound, None
        return stored

    async def finish_outbound(self, message_id: int, **fields: Any) -> None:
        if fields.get("status") == "sent" and self.arm_on_sent is not None:
            self.fault, self.arm_on_sent = self.arm_on_sent, None
        await super().finish_outbound(message_id, **fields)


def _value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or None) or 0.0


@pytest.fixture
async def flaky_service(tmp_path: Path) -> AsyncIterator[Service]:
    settings = make_settings(
        tmp_path, generator={"max_new_tokens": 12}, grounding={"enabled": False},
        recommender={"enabled": False},
    )
    service = Service(settings)
    service.store = FlakyStore(Path(settings.store.path))
    await service.start()
    try:
        yield service
    finally:
        service.store.fault = None  # type: ignore[attr-defined]
        await service.stop()


class Tab:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def say(self, text: str, client_id: str | None = None) -> str:
        client_id = client_id or uuid.uuid4().hex[:10]
        await self.ws.send_json({"type": "message", "id": client_id, "text": text})
        return client_id

    async def until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict:
        while True:
            frame = await self.ws.receive_json(timeout=timeout)
            if pred(frame):
                return frame


async def _tab(http: aiohttp.ClientSession, service: Service, session: str) -> Tab:
    ws = await http.ws_connect(f"http://127.0.0.1:{service.adapters[0].port}/ws?session={session}")
    assert (await ws.receive_json(timeout=10))["type"] == "hello"
    return Tab(ws)


async def _count(store: SQLiteStore, sql: str, params: list[Any] | None = None) -> int:
    return int((await store.query(sql, params or []))[0]["n"])


async def test_a_lock_held_briefly_is_waited_out(tmp_path: Path) -> None:
    """Another process holds the write lock for longer than the busy timeout: the write
    is retried with backoff and succeeds; the caller never sees the lock."""
    store = SQLiteStore(tmp_path / "locked.db", busy_timeout_ms=20)
    await store.open()
    other = sqlite3.connect(tmp_path / "locked.db", check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.4, other.commit).start()
    retries = _value("supportbot_store_retries_total")
    started = time.monotonic()
    stored = await store.record_inbound(Inbound("web", "k", User("web", "u"), "lock:1", "hi"))
    assert stored is not None
    assert 0.3 < time.monotonic() - started < 3.0
    assert _value("supportbot_store_retries_total") > retries
    # Held for good: a clear error naming the database, after the retries.
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(StoreError, match=r"locked\.db: database is locked"):
        await store.record_inbound(Inbound("web", "k", User("web", "u"), "lock:2", "hi"))
    other.rollback()
    other.close()
    assert await _count(store, "SELECT count(*) AS n FROM messages") == 1
    await store.close()


async def test_message_not_accepted_while_disk_full_then_accepted_on_retry(
    flaky_service: Service, caplog: pytest.LogCaptureFixture,
) -> None:
    store: FlakyStore = flaky_service.store  # type: ignore[assignment]
    errors = _value("supportbot_store_errors_total", kind="full")
    async with aiohttp.ClientSession() as http:
        tab = await _tab(http, flaky_service, "disk-full-inbound")
        store.fault = FULL
        with caplog.at_level(logging.ERROR, logger="core.store"):
            client_id = await tab.say("Do you ship to Canada?")
            frame = await tab.until(lambda f: f.get("id") == client_id)
        assert frame == {"type": "error", "id": client_id,
                         "error": "we could not accept your message, please retry"}
        assert _value("supportbot_store_errors_total", kind="full") > errors
        assert any(FULL in r.getMessage() for r in caplog.records)
        store.fault = None
        assert await _count(store, "SELECT count(*) AS n FROM messages") == 0  # nothing half-done
        await tab.say("Do you ship to Canada?", client_id)  # what the page does on an error
        ack = await tab.until(lambda f: f.get("id") == client_id)
        assert ack == {"type": "ack", "id": client_id, "duplicate": False}
        reply = await tab.until(lambda f: f["type"] == "reply")
        assert reply["text"].strip()


async def test_disk_full_before_the_reply_apologises_then_answers_when_it_ends(
    flaky_service: Service,
) -> None:
    store: FlakyStore = flaky_service.store  # type: ignore[assignment]
    apologies = _value("supportbot_store_fallbacks_total")
    async with aiohttp.ClientSession() as http:
        tab = await _tab(http, flaky_service, "disk-full-processing")
        store.arm_after_inbound = FULL
        client_id = await tab.say("How long does delivery take?")
        assert (await tab.until(lambda f: f.get("id") == client_id))["type"] == "ack"
        apology = await tab.until(lambda f: f["type"] in ("message", "reply"), timeout=30)
        assert apology["text"] == STORE_FALLBACK_TEXT
        assert _value("supportbot_store_fallbacks_total") == apologies + 1
        await asyncio.sleep(2.5)  # still full: the healer keeps trying, the service runs
        assert flaky_service.pipeline is not None
        store.fault = None
        reply = await tab.until(lambda f: f["type"] == "reply", timeout=120)
        assert reply["text"].strip() and reply["text"] != STORE_FALLBACK_TEXT
        # Later messages are answered normally.
        await tab.say("Thanks. Can I pay with a gift card?")
        assert (await tab.until(lambda f: f["type"] == "reply"))["text"].strip()
    async def answered() -> bool:
        return await _count(store, "SELECT count(*) AS n FROM messages WHERE direction = 'in' "
                                   "AND status = 'answered'") == 2

    await wait_for(answered, timeout=10)
    assert await _count(store, "SELECT count(*) AS n FROM messages WHERE direction = 'out' "
                               "AND status = 'sent' AND sender = 'bot'") == 2


async def test_disk_full_after_the_reply_went_out_never_sends_it_again(
    flaky_service: Service,
) -> None:
    """The reply reached the customer but could not be recorded as sent: the record is
    retried until the disk has room, and the message is not answered a second time, even
    by the recovery that runs when the fault ends."""
    store: FlakyStore = flaky_service.store  # type: ignore[assignment]
    async with aiohttp.ClientSession() as http:
        tab = await _tab(http, flaky_service, "disk-full-after-send")
        store.arm_on_sent = FULL
        await tab.say("Where can I see my order status?")
        first = await tab.until(lambda f: f["type"] == "reply")
        assert first["text"].strip()
        assert store.fault == FULL
        await asyncio.sleep(1.5)
        store.fault = None
        await wait_for(lambda: _count(
            store, "SELECT count(*) AS n FROM messages WHERE direction = 'in' "
                   "AND status = 'answered'"), timeout=30)
        await asyncio.sleep(2.0)
        with pytest.raises(TimeoutError):  # no second answer
            await tab.until(lambda f: f["type"] in ("reply", "message"), timeout=2)
    rows = await store.query("SELECT status, text FROM messages WHERE direction = 'out'")
    assert rows == [{"status": "sent", "text": first["text"]}]
