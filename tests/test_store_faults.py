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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from bots.service import Service
from core import metrics
from core.channels import CustomerChannel, ReplyStream
from core.logs import ConversationFilter
from core.messages import Inbound, Kind, Reply, User
from core.operators import ACTION_FAILED_TEXT
from core.pipeline import STORE_FALLBACK_TEXT, Pipeline
from core.store import SQLiteStore, StoreError
from tests.conftest import OPERATOR_TOKEN, make_settings, wait_for

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


class WritesFailStore(FlakyStore):
    """A full disk as SQLite sees it: reads work, and so does a write transaction that
    changes nothing; any row written fails. TEMP triggers raise on every row changed."""

    __slots__ = ("arm_writes_after_inbound", "writes_fail")

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes_fail = False
        self.arm_writes_after_inbound = False

    def _open(self) -> None:
        super()._open()
        conn = self.db.conn
        conn.create_function("writes_fail", 0, lambda: int(self.writes_fail))
        for table in ("messages", "conversations", "users", "events", "tickets"):
            for op in ("INSERT", "UPDATE", "DELETE"):
                conn.execute(
                    f"CREATE TEMP TRIGGER full_{table}_{op.lower()} BEFORE {op} ON main.{table} "
                    f"WHEN writes_fail() BEGIN SELECT RAISE(ABORT, '{FULL}'); END"
                )

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            return super()._call(fn, args)
        except sqlite3.IntegrityError as exc:  # what RAISE(ABORT) is; the disk says "full"
            if str(exc) == FULL:
                raise sqlite3.OperationalError(FULL) from None
            raise

    async def record_inbound(self, inbound: Inbound) -> Any:
        stored = await super().record_inbound(inbound)
        if self.arm_writes_after_inbound:
            self.writes_fail, self.arm_writes_after_inbound = True, False
        return stored


class HookStore(FlakyStore):
    """Runs test code just before and just after recovery's query."""

    __slots__ = ("after_unfinished", "before_unfinished")

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.before_unfinished: Callable[[], Awaitable[None]] | None = None
        self.after_unfinished: Callable[[], Awaitable[None]] | None = None

    async def unfinished_inbound(self, skip: Any = (), conversations: Any = None) -> list[dict]:
        if self.before_unfinished is not None:
            await self.before_unfinished()
        rows = await super().unfinished_inbound(skip, conversations)
        if self.after_unfinished is not None:
            await self.after_unfinished()
        return rows


class Platform(CustomerChannel):
    """The web platform, with a test-chosen step before each whole message goes out."""

    __slots__ = ("before", "inner")
    platform = "web"

    def __init__(self, inner: CustomerChannel,
                 before: Callable[[Reply], Awaitable[None]]) -> None:
        self.inner, self.before = inner, before

    def open_reply(self, conversation_key: str) -> ReplyStream:
        return self.inner.open_reply(conversation_key)

    async def deliver(self, conversation_key: str, reply: Reply) -> str:
        await self.before(reply)
        return await self.inner.deliver(conversation_key, reply)


def _pipeline(service: Service) -> Pipeline:
    assert service.pipeline is not None
    return service.pipeline


async def _settled(service: Service, timeout: float = 60) -> None:
    """Nothing queued, running, held, owed or healing: a duplicate would be sent by now."""
    await wait_for(lambda: _pipeline(service).idle, timeout=timeout, step=0.05)


def _value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or None) or 0.0


def _settings(tmp_path: Path, **service: Any) -> Any:
    return make_settings(
        tmp_path, generator={"max_new_tokens": 12}, grounding={"enabled": False},
        recommender={"enabled": False}, service=service,
    )


async def _service(tmp_path: Path, store_type: type[FlakyStore]) -> Service:
    settings = _settings(tmp_path)
    service = Service(settings)
    service.store = store_type(Path(settings.store.path))
    await service.start()
    return service


async def _stop(service: Service) -> None:
    store: FlakyStore = service.store  # type: ignore[assignment]
    store.fault = None
    if isinstance(store, WritesFailStore):
        store.writes_fail = False
    await service.stop()


async def _running(tmp_path: Path, store_type: type[FlakyStore]) -> AsyncIterator[Service]:
    service = await _service(tmp_path, store_type)
    try:
        yield service
    finally:
        await _stop(service)


@pytest.fixture
async def flaky_service(tmp_path: Path) -> AsyncIterator[Service]:
    async for service in _running(tmp_path, FlakyStore):
        yield service


@pytest.fixture
async def writes_fail_service(tmp_path: Path) -> AsyncIterator[Service]:
    async for service in _running(tmp_path, WritesFailStore):
        yield service


@pytest.fixture
async def hook_service(tmp_path: Path) -> AsyncIterator[Service]:
    async for service in _running(tmp_path, HookStore):
        yield service


class Tab:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def say(self, text: str, client_id: str | None = None) -> str:
        client_id = client_id or uuid.uuid4().hex[:10]
        await self.ws.send_json({"type": "message", "id": client_id, "text": text})
        return client_id

    async def command(self, name: str) -> str:
        client_id = uuid.uuid4().hex[:10]
        await self.ws.send_json({"type": "command", "id": client_id, "name": name, "text": ""})
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


async def _accepted_then_apologised(tab: Tab, text: str) -> None:
    """The customer says ``text``: it is acknowledged, then the store-failure apology comes."""
    client_id = await tab.say(text)
    assert (await tab.until(lambda f: f.get("id") == client_id))["type"] == "ack"
    apology = await tab.until(lambda f: f["type"] in ("message", "reply"), timeout=30)
    assert apology["text"] == STORE_FALLBACK_TEXT


async def test_disk_full_before_the_reply_apologises_then_answers_when_it_ends(
    flaky_service: Service,
) -> None:
    store: FlakyStore = flaky_service.store  # type: ignore[assignment]
    apologies = _value("supportbot_store_fallbacks_total")
    async with aiohttp.ClientSession() as http:
        tab = await _tab(http, flaky_service, "disk-full-processing")
        store.arm_after_inbound = FULL
        await _accepted_then_apologised(tab, "How long does delivery take?")
        assert _value("supportbot_store_fallbacks_total") == apologies + 1
        errors = _value("supportbot_store_errors_total", kind="full")
        # Still full: the healer keeps trying (more errors), and nothing reaches the tab.
        with pytest.raises(TimeoutError):
            await tab.until(lambda f: True, timeout=3.5)
        assert _value("supportbot_store_errors_total", kind="full") > errors
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
        await _settled(flaky_service)
        with pytest.raises(TimeoutError):  # no second answer
            await tab.until(lambda f: f["type"] in ("reply", "message"), timeout=0.2)
    rows = await store.query("SELECT status, text FROM messages WHERE direction = 'out'")
    assert rows == [{"status": "sent", "text": first["text"]}]


async def test_disk_full_for_writes_only_apologises_once_then_answers(
    writes_fail_service: Service,
) -> None:
    """Reads work and an empty write transaction succeeds, but no row can be written: the
    healer must not take that for a working database (requeue, fail, apologise again)."""
    store: WritesFailStore = writes_fail_service.store  # type: ignore[assignment]
    apologies = _value("supportbot_store_fallbacks_total")
    async with aiohttp.ClientSession() as http:
        tab = await _tab(http, writes_fail_service, "writes-fail")
        store.arm_writes_after_inbound = True
        await _accepted_then_apologised(tab, "How long does delivery take?")
        errors = _value("supportbot_store_errors_total", kind="full")
        with pytest.raises(TimeoutError):  # one apology, however long the disk stays full
            await tab.until(lambda f: True, timeout=4.5)
        assert _value("supportbot_store_fallbacks_total") == apologies + 1
        assert _value("supportbot_store_errors_total", kind="full") > errors  # still trying
        store.writes_fail = False
        reply = await tab.until(lambda f: f["type"] in ("message", "reply"), timeout=120)
        assert reply["type"] == "reply" and reply["text"] != STORE_FALLBACK_TEXT
        await _settled(writes_fail_service)
    assert await _count(store, "SELECT count(*) AS n FROM messages WHERE direction = 'in' "
                               "AND status = 'answered'") == 1


async def test_reply_cut_off_by_shutdown_is_never_sent_twice(tmp_path: Path) -> None:
    """Shutdown cancels a reply in the middle of its send. It may already have reached the
    customer, so it stays 'sending', which counts as sent: the next start does not answer
    the question again (the last hop is at most once)."""
    settings = _settings(tmp_path, shutdown_grace_s=0.2)
    service = Service(settings)
    await service.start()
    pipeline = _pipeline(service)
    sending = asyncio.Event()

    async def hang(reply: Reply) -> None:
        sending.set()
        await asyncio.Event().wait()

    pipeline.attach(Platform(pipeline.channels["web"], hang))
    stopped = False
    try:
        async with aiohttp.ClientSession() as http:
            tab = await _tab(http, service, "cut-by-shutdown")
            client_id = await tab.command("help")
            assert (await tab.until(lambda f: f.get("id") == client_id))["type"] == "ack"
            await asyncio.wait_for(sending.wait(), timeout=60)
            stopped = True
            await service.stop()
    finally:
        if not stopped:
            await service.stop()
    store = SQLiteStore(settings.store.path)
    await store.open()
    try:
        assert await store.query("SELECT status FROM messages WHERE direction = 'out'") \
            == [{"status": "sending"}]
        assert await store.unfinished_inbound() == []
    finally:
        await store.close()


async def test_platform_refuses_while_disk_full_the_message_is_answered_later(
    flaky_service: Service,
) -> None:
    """Double fault: the platform refuses the reply, then the disk is full when that is
    recorded. The 'failed' record is owed, written when the disk has room, and the
    question is answered then (not taken for sent)."""
    store: FlakyStore = flaky_service.store  # type: ignore[assignment]
    pipeline = _pipeline(flaky_service)
    web = pipeline.channels["web"]

    async def refuse_once(reply: Reply) -> None:
        pipeline.attach(web)
        store.fault = FULL
        raise ConnectionError("the platform refused the message")

    pipeline.attach(Platform(web, refuse_once))
    async with aiohttp.ClientSession() as http:
        tab = await _tab(http, flaky_service, "refused-then-full")
        client_id = await tab.command("help")
        assert (await tab.until(lambda f: f.get("id") == client_id))["type"] == "ack"
        await asyncio.sleep(1.5)
        store.fault = None
        answer = await tab.until(lambda f: f["type"] == "message", timeout=60)
        assert answer["text"] != STORE_FALLBACK_TEXT
        await _settled(flaky_service)
    rows = await store.query("SELECT status, error FROM messages WHERE direction = 'out' "
                             "ORDER BY id")
    assert rows == [{"status": "failed", "error": "the platform refused the message"},
                    {"status": "sent", "error": None}]


async def test_recovery_does_not_queue_a_message_that_finished_meanwhile(
    hook_service: Service,
) -> None:
    """A message submitted while recovery reads the database, and answered before it
    queues what it read, is not answered a second time."""
    store: HookStore = hook_service.store  # type: ignore[assignment]
    async with aiohttp.ClientSession() as http:
        tab = await _tab(http, hook_service, "recovery-race")

        async def submit() -> None:
            client_id = await tab.command("help")
            assert (await tab.until(lambda f: f.get("id") == client_id))["type"] == "ack"

        async def answered() -> None:
            await wait_for(lambda: _count(
                store, "SELECT count(*) AS n FROM messages WHERE direction = 'in' "
                       "AND status = 'answered'"), timeout=30)

        store.before_unfinished, store.after_unfinished = submit, answered
        await _pipeline(hook_service).recover()
        store.before_unfinished = store.after_unfinished = None
        await _settled(hook_service)
    assert await _count(store, "SELECT count(*) AS n FROM messages WHERE direction = 'out'") == 1


async def test_at_startup_older_unanswered_messages_are_answered_first(tmp_path: Path) -> None:
    """A message arriving after the adapters start but before recovery has run waits for
    the older unanswered ones of its conversation."""
    settings = _settings(tmp_path)
    seed = SQLiteStore(settings.store.path)
    await seed.open()
    old = await seed.record_inbound(Inbound("web", "restart-order", User("web", "u1"),
                                            "restart-order:old", "", Kind.COMMAND, "help"))
    await seed.close()
    assert old is not None
    service = Service(settings)
    store = HookStore(Path(settings.store.path))
    service.store = store
    new_id: list[int] = []

    async def arrives() -> None:
        store.before_unfinished = None
        await _pipeline(service).submit(Inbound(
            "web", "restart-order", User("web", "u1"), "restart-order:new", "", Kind.COMMAND,
            "start"))
        new_id.extend(r["id"] for r in await store.query(
            "SELECT id FROM messages WHERE platform_message_id = 'restart-order:new'"))
        await asyncio.sleep(0.5)  # time enough to answer it, were it queued now

    store.before_unfinished = arrives
    await service.start()
    try:
        await _settled(service)
        rows = await store.query("SELECT reply_to FROM messages WHERE direction = 'out' "
                                 "ORDER BY id")
    finally:
        await _stop(service)
    assert [r["reply_to"] for r in rows] == [old.message_id, *new_id]


async def test_a_store_fault_keeps_the_conversation_in_order(flaky_service: Service) -> None:
    """While the apology for a failed message is on its way, a newer message of the same
    conversation is committed; it is answered after the failed one, not before."""
    store: FlakyStore = flaky_service.store  # type: ignore[assignment]
    pipeline = _pipeline(flaky_service)
    web = pipeline.channels["web"]
    apologising, newer_in = asyncio.Event(), asyncio.Event()

    async def slow_apology(reply: Reply) -> None:
        if reply.text == STORE_FALLBACK_TEXT:
            store.fault = None
            apologising.set()
            await newer_in.wait()
            await asyncio.sleep(0.5)  # time enough to answer the newer one, were it queued

    pipeline.attach(Platform(web, slow_apology))
    async with aiohttp.ClientSession() as http:
        tab = await _tab(http, flaky_service, "fault-order")
        store.arm_after_inbound = FULL
        first = await tab.command("help")
        assert (await tab.until(lambda f: f.get("id") == first))["type"] == "ack"
        await asyncio.wait_for(apologising.wait(), timeout=60)
        second = await tab.command("start")
        assert (await tab.until(lambda f: f.get("id") == second))["type"] == "ack"
        newer_in.set()
        await _settled(flaky_service)
    rows = await store.query(
        "SELECT i.platform_message_id AS question FROM messages o JOIN messages i "
        "ON i.id = o.reply_to WHERE o.direction = 'out' ORDER BY o.id")
    assert [r["question"] for r in rows] == [f"fault-order:{first}", f"fault-order:{second}"]


class PoisonedSentStore(FlakyStore):
    """Recording a sent reply fails: first the disk is full, then (from the backlog) the
    write itself is bad, forever (a real foreign-key violation)."""

    __slots__ = ("sent_writes",)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.sent_writes = 0

    async def finish_outbound(self, message_id: int, **fields: Any) -> None:
        if fields.get("status") != "sent":
            return await super().finish_outbound(message_id, **fields)
        self.sent_writes += 1
        if self.sent_writes == 1:
            self.fault = FULL
            try:
                return await super().finish_outbound(message_id, **fields)
            finally:
                self.fault = None
        return await super().finish_outbound(message_id, **fields, reply_to=10**9)


class Lines(logging.Handler):
    """Records as an operator's log handler sees them: stamped with the conversation."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(ConversationFilter())
        self.seen: list[tuple[str, int | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), getattr(record, "conversation_id", None)))


async def test_a_write_that_always_fails_is_set_aside_and_the_healer_goes_on(
    tmp_path: Path,
) -> None:
    service = await _service(tmp_path, PoisonedSentStore)
    pipeline = _pipeline(service)
    pipeline._store_retry_s = pipeline._retry_delay = 0.05  # five rounds in well under 2 s
    lines = Lines()
    logging.getLogger("core.pipeline").addHandler(lines)
    lost = _value("supportbot_store_writes_lost_total", reason="failing")
    try:
        async with aiohttp.ClientSession() as http:
            tab = await _tab(http, service, "poisoned-write")
            await tab.command("help")
            first = await tab.until(lambda f: f["type"] == "message", timeout=60)
            await _settled(service)
            assert _value("supportbot_store_writes_lost_total", reason="failing") == lost + 1
            await tab.command("start")  # the service goes on answering
            second = await tab.until(lambda f: f["type"] == "message", timeout=60)
            assert second["text"] != first["text"]
            await _settled(service)
            # Its record is refused at once (no disk fault first): a StoreError the
            # database gives while working is counted too, so it is set aside as well.
            await wait_for(lambda: _value("supportbot_store_writes_lost_total",
                                          reason="failing") == lost + 2, timeout=30)
    finally:
        logging.getLogger("core.pipeline").removeHandler(lines)
        await _stop(service)
    healer = [("set aside" if "set aside" in m else "works again", c)
              for m, c in lines.seen if "set aside" in m or "works again" in m]
    assert healer == [("set aside", None), ("works again", None)] * 2, lines.seen


async def test_close_writes_what_is_owed_to_the_database(tmp_path: Path) -> None:
    """The reply went out while the disk was full; the disk has room again when the
    service stops, before the healer's next try: the record is written on the way out."""
    service = await _service(tmp_path, FlakyStore)
    store: FlakyStore = service.store  # type: ignore[assignment]
    try:
        async with aiohttp.ClientSession() as http:
            tab = await _tab(http, service, "owed-at-close")
            store.arm_on_sent = FULL
            await tab.command("help")
            await tab.until(lambda f: f["type"] == "message", timeout=60)
            # The "sent" record really is owed (the fault fired), so stop() has to write it.
            await wait_for(lambda: _pipeline(service)._backlog, timeout=10)
            store.fault = None
    finally:
        await service.stop()
    check = SQLiteStore(store.path)
    await check.open()
    try:
        assert await check.query("SELECT status FROM messages WHERE direction = 'out'") \
            == [{"status": "sent"}]
        assert await check.query("SELECT status FROM messages WHERE direction = 'in'") \
            == [{"status": "answered"}]
    finally:
        await check.close()


async def test_operator_reply_hit_by_a_database_fault_says_check_before_repeating(
    flaky_service: Service,
) -> None:
    """The console keeps the operator's text on an error; a database fault may strike after
    the customer got the answer, so the console says to check the ticket, not 'try again'."""
    store: FlakyStore = flaky_service.store  # type: ignore[assignment]
    base = f"http://127.0.0.1:{flaky_service.adapters[0].port}"
    auth = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        tab = await _tab(http, flaky_service, "operator-fault")
        await tab.command("human")
        for _ in range(200):
            async with http.get(f"{base}/api/operator/tickets", headers=auth) as r:
                tickets = (await r.json())["tickets"]
            if tickets:
                break
            await asyncio.sleep(0.1)
        ticket = tickets[0]["id"]
        async with http.post(f"{base}/api/operator/tickets/{ticket}/claim",
                             json={}, headers=auth) as r:
            assert r.status == 200
        store.fault = FULL
        async with http.post(f"{base}/api/operator/tickets/{ticket}/reply",
                             json={"text": "Your refund is on its way."}, headers=auth) as r:
            assert r.status == 500
            assert (await r.json())["error"] == ACTION_FAILED_TEXT
        store.fault = None


class SendingSeenStore(FlakyStore):
    """Records what each reply carries as it is marked ``sending``."""

    __slots__ = ("sending",)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.sending: list[dict[str, Any]] = []

    async def finish_outbound(self, message_id: int, **fields: Any) -> None:
        if fields.get("status") == "sending":
            self.sending.append(fields)
        await super().finish_outbound(message_id, **fields)


async def test_a_reply_never_recorded_as_sent_is_redrawn_under_its_id(tmp_path: Path) -> None:
    """The reply reached the tab; its replica died before recording it as sent. A tab
    that reconnects (elsewhere) is shown it under the id it drew it with, not a question
    left without its answer."""
    service = await _service(tmp_path, SendingSeenStore)
    store: SendingSeenStore = service.store  # type: ignore[assignment]
    try:
        async with aiohttp.ClientSession() as http:
            tab = await _tab(http, service, "died-before-sent")
            await tab.say("How can I track my order?")
            reply = await tab.until(lambda f: f["type"] == "reply", timeout=120)
            await _settled(service)
            assert [f.get("platform_message_id") for f in store.sending] == [
                f"web-{reply['reply']}"]
            await asyncio.to_thread(_unsend, store.path)
            ws = await http.ws_connect(
                f"http://127.0.0.1:{service.adapters[0].port}/ws?session=died-before-sent")
            hello = await ws.receive_json(timeout=10)
            await ws.close()
    finally:
        await _stop(service)
    shown = [line for line in hello["transcript"] if line["direction"] == "out"]
    assert [(line["reply"], line["text"]) for line in shown] == [(reply["reply"], reply["text"])]


def _unsend(path: Path) -> None:
    """The state a replica killed mid-send leaves: the reply handed over, still 'sending'."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("UPDATE messages SET status = 'sending' WHERE direction = 'out'")
        conn.commit()
    finally:
        conn.close()
