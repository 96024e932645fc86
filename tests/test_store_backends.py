"""The store's contract, on SQLite and on PostgreSQL alike: what the pipeline and the
operator desk rely on, and what two replicas on one database must never do twice.

PostgreSQL is a real throwaway cluster (``tests/postgres_cluster.py``), started once for
the module; each test gets its own database. SQLite's second "replica" is a second store
on the same file.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core import metrics, store_postgres
from core.messages import Inbound, Kind, User
from core.store import MIGRATIONS, Scores, SQLiteStore, StoredInbound, StoreError, now_iso
from core.store_postgres import NOTIFY_LIMIT_BYTES, PG_MIGRATIONS, PostgresStore, describe_url
from tests import postgres_cluster
from tests.postgres_cluster import Cluster, ClusterError, start_cluster

AnyStore = SQLiteStore | PostgresStore


class Backend:
    """One empty database of one kind; :meth:`open` gives another store (replica) on it."""

    __slots__ = ("_make", "_set_version", "name", "opened")

    def __init__(
        self, name: str, make: Callable[[], AnyStore], set_version: Callable[[int], None]
    ) -> None:
        self.name = name
        self._make = make
        self._set_version = set_version
        self.opened: list[AnyStore] = []

    def new(self) -> AnyStore:
        return self._make()

    async def open(self) -> AnyStore:
        store = self._make()
        await store.open()
        self.opened.append(store)
        return store

    def set_version(self, version: int) -> None:
        """Write the schema version behind the stores' backs (a newer release ran)."""
        self._set_version(version)


def _sqlite_backend(path: Path) -> Backend:
    def set_version(version: int) -> None:
        conn = sqlite3.connect(path)
        try:
            conn.execute(f"PRAGMA user_version = {int(version)}")
        finally:
            conn.close()

    return Backend("sqlite", lambda: SQLiteStore(path), set_version)


def _postgres_backend(url: str) -> Backend:
    def set_version(version: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE schema_version SET version = %s", [version])

    return Backend("postgresql", lambda: PostgresStore(url), set_version)


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        made = _sqlite_backend(tmp_path / "s.db")
    else:
        made = _postgres_backend(request.getfixturevalue("pg_cluster").create_database())
    try:
        yield made
    finally:
        for store in reversed(made.opened):
            await store.close()


@pytest.fixture
async def store(backend: Backend) -> AnyStore:
    return await backend.open()


def inbound(
    message_id: str, text: str = "hello", *, key: str = "c1", user: str = "u1",
    name: str = "Ann", platform: str = "web", kind: Kind = Kind.TEXT,
) -> Inbound:
    return Inbound(platform, key, User(platform, user, name), message_id, text, kind)


async def rows(store: AnyStore, table: str) -> list[dict[str, Any]]:
    return await store.query(f"SELECT * FROM {table} ORDER BY id")


async def stored(store: AnyStore, event: Inbound) -> StoredInbound:
    result = await store.record_inbound(event)
    assert result is not None, f"{event.platform_message_id} was not stored"
    return result


def scores(negative: float) -> Scores:
    return Scores("negative" if negative > 0.5 else "neutral", negative, 1 - negative, 0.0)


# -- inbound -------------------------------------------------------------------------------


async def test_a_redelivered_message_is_stored_once(store: AnyStore) -> None:
    first = await stored(store, inbound("m1"))
    assert first.state == "bot"
    assert await store.record_inbound(inbound("m1", "hello again")) is None
    assert await store.record_inbound(inbound("m1", platform="telegram")) is not None
    messages = await rows(store, "messages")
    assert [(m["platform"], m["platform_message_id"], m["text"]) for m in messages] == [
        ("web", "m1", "hello"), ("telegram", "m1", "hello"),
    ]
    assert messages[0]["status"] == "received" and messages[0]["sender"] == "customer"


async def test_users_and_conversations_are_created_once_and_names_follow(store: AnyStore) -> None:
    a = await stored(store, inbound("m1"))
    b = await stored(store, inbound("m2", name="Ann B"))
    c = await stored(store, inbound("m3", name=""))
    d = await stored(store, inbound("m4", key="c2"))
    assert a.user_id == b.user_id == c.user_id == d.user_id
    assert a.conversation_id == b.conversation_id == c.conversation_id != d.conversation_id
    user = await store.user_by_platform_id("web", "u1")
    assert user is not None and user["id"] == a.user_id
    assert user["display_name"] == "Ann", "the latest non-empty name wins"
    assert await store.user(a.user_id) == user
    assert await store.user_by_platform_id("web", "nobody") is None
    assert len(await rows(store, "users")) == 1
    assert len(await rows(store, "conversations")) == 2
    convo = await store.conversation(a.conversation_id)
    assert (convo["conversation_key"], convo["platform_user_id"], convo["display_name"]) == (
        "c1", "u1", "Ann",
    )
    by_key = await store.conversation_by_key("web", "c2")
    assert by_key is not None and by_key["id"] == d.conversation_id
    assert await store.conversation_by_key("web", "nope") is None
    with pytest.raises(StoreError):
        await store.conversation(10_000)


async def test_status_and_sentiment_feed_the_escalation_window(store: AnyStore) -> None:
    ids = [(await stored(store, inbound(f"m{i}", f"text {i}"))).message_id for i in range(4)]
    await stored(store, inbound("unscored"))
    for message_id, p in zip(ids, (0.1, 0.25, 0.75, 0.9), strict=True):
        await store.set_sentiment(message_id, scores(p))
    await store.set_inbound_status(ids[0], "answered")
    conversation_id = (await store.conversation_by_key("web", "c1"))["id"]  # type: ignore[index]
    assert await store.recent_customer_messages(conversation_id, 3) == [
        {"text": "text 1", "p_negative": 0.25}, {"text": "text 2", "p_negative": 0.75},
        {"text": "text 3", "p_negative": 0.9},
    ]
    assert await store.recent_negative(conversation_id, 10) == [0.1, 0.25, 0.75, 0.9]
    first = (await rows(store, "messages"))[0]
    assert (first["status"], first["sentiment"], first["p_neutral"]) == ("answered", "neutral", 0.9)


# -- outbound ------------------------------------------------------------------------------


async def test_a_reply_handed_over_under_a_known_id_is_in_the_transcript(
    store: AnyStore,
) -> None:
    """Its replica died between handing it over and recording it as sent: the tab drew it
    under that id, so a tab's transcript shows it (one with no id yet is not shown)."""
    question = await stored(store, inbound("m1", "do you ship to Canada"))
    cid = question.conversation_id
    handed = await store.begin_outbound(cid, "web", "bot", question.message_id)
    await store.finish_outbound(handed, status="sending", text="Yes, we do.",
                                platform_message_id="web-abc123")
    unknown = await store.begin_outbound(cid, "web", "system", None, "Hold on", status="sending")
    lines = await store.transcript(cid)
    assert [(x.message_id, x.text, x.platform_message_id) for x in lines] == [
        (question.message_id, "do you ship to Canada", "m1"),
        (handed, "Yes, we do.", "web-abc123"),
    ]
    assert unknown not in [x.message_id for x in lines]


async def test_outbound_replies_transcript_and_history(store: AnyStore) -> None:
    question = await stored(store, inbound("m1", "where is my order"))
    cid = question.conversation_id
    out = await store.begin_outbound(cid, "web", "bot", question.message_id)
    assert [line.direction for line in await store.transcript(cid)] == ["in"]
    withheld = {"answer": {"withheld": [{"text": "It ships from Mars."}]}}
    await store.finish_outbound(
        out, status="sent", text="It ships tomorrow.", payload=json.dumps(withheld),
        platform_message_id="p1", latency_ms=12.5,
    )
    failed = await store.begin_outbound(cid, "web", "bot", question.message_id, "half")
    await store.finish_outbound(failed, status="failed", error="boom")
    notice = await store.begin_outbound(cid, "web", "system", None, "", status="sending")
    await store.finish_outbound(notice, status="sent")
    later = await stored(store, inbound("m2", "thanks"))

    lines = await store.transcript(cid)
    assert [(x.message_id, x.direction, x.sender, x.text) for x in lines] == [
        (question.message_id, "in", "customer", "where is my order"),
        (out, "out", "bot", "It ships tomorrow."),
        (notice, "out", "system", ""),
        (later.message_id, "in", "customer", "thanks"),
    ]
    assert lines[1].withheld == ("It ships from Mars.",) and lines[1].platform_message_id == "p1"
    assert lines[0].withheld == () and lines[0].platform_message_id == "m1"
    assert [x.message_id for x in await store.transcript(cid, limit=2)] == [
        notice, later.message_id,
    ]
    assert await store.history(cid, later.message_id, 10) == [
        {"id": question.message_id, "direction": "in", "sender": "customer",
         "text": "where is my order"},
        {"id": out, "direction": "out", "sender": "bot", "text": "It ships tomorrow."},
    ]
    assert [r["id"] for r in await store.history(cid, later.message_id, 1)] == [out]
    found = await store.outbound_by_platform_id("web", "p1")
    assert found is not None and (found["id"], found["latency_ms"]) == (out, 12.5)
    assert await store.outbound_by_platform_id("web", "m1") is None, "inbound ids do not count"
    assert await store.outbound_by_platform_id("telegram", "p1") is None


async def test_recovery_marks_replied_messages_answered_and_interrupts_pending(
    store: AnyStore,
) -> None:
    msgs = {n: await stored(store, inbound(n, n)) for n in ("sending", "pending", "mine",
                                                            "sent", "none")}
    cid = msgs["sending"].conversation_id
    sending = await store.begin_outbound(cid, "web", "bot", msgs["sending"].message_id,
                                         "done", status="sending")
    pending = await store.begin_outbound(cid, "web", "bot", msgs["pending"].message_id)
    mine = await store.begin_outbound(cid, "web", "bot", msgs["mine"].message_id)
    sent = await store.begin_outbound(cid, "web", "system", msgs["sent"].message_id, "notice")
    await store.finish_outbound(sent, status="sent")
    await store.set_inbound_status(msgs["sent"].message_id, "processing")
    orphan = await store.begin_outbound(cid, "web", "bot", None)

    unfinished = await store.unfinished_inbound(skip=[msgs["mine"].message_id])
    assert [r["id"] for r in unfinished] == [msgs["pending"].message_id, msgs["none"].message_id]
    assert {k: unfinished[0][k] for k in (
        "conversation_key", "user_id", "state", "platform_user_id", "display_name", "text",
    )} == {"conversation_key": "c1", "user_id": msgs["pending"].user_id, "state": "bot",
           "platform_user_id": "u1", "display_name": "Ann", "text": "pending"}
    status = {m["id"]: (m["status"], m["error"]) for m in await rows(store, "messages")}
    assert status[sending] == ("sent", None), "a reply handed to the platform counts as sent"
    assert status[msgs["sending"].message_id] == ("answered", None)
    assert status[msgs["sent"].message_id] == ("answered", None)
    assert status[pending] == ("failed", "interrupted")
    assert status[orphan] == ("failed", "interrupted")
    assert status[mine] == ("pending", None), "the skipped message's reply is left alone"
    assert status[msgs["mine"].message_id] == ("received", None)
    assert [r["id"] for r in await store.unfinished_inbound()] == [
        msgs["pending"].message_id, msgs["mine"].message_id, msgs["none"].message_id,
    ]


async def test_recovery_limited_to_some_conversations_leaves_the_others_alone(
    store: AnyStore,
) -> None:
    """What a replica taking over one conversation settles: that one's replies, never the
    ones another replica is writing in its own conversations."""
    mine = {n: await stored(store, inbound(f"a-{n}", n, key="a")) for n in ("sending", "pending")}
    theirs = {n: await stored(store, inbound(f"b-{n}", n, key="b")) for n in ("sending",
                                                                              "pending")}
    replies = {}
    for side, msgs in (("mine", mine), ("theirs", theirs)):
        cid = msgs["sending"].conversation_id
        replies[side, "sending"] = await store.begin_outbound(
            cid, "web", "bot", msgs["sending"].message_id, "done", status="sending")
        replies[side, "pending"] = await store.begin_outbound(
            cid, "web", "bot", msgs["pending"].message_id)
    a, b = mine["sending"].conversation_id, theirs["sending"].conversation_id

    assert await store.unfinished_inbound(conversations=[]) == []
    unfinished = await store.unfinished_inbound(conversations=[a])
    assert [r["id"] for r in unfinished] == [mine["pending"].message_id]
    status = {m["id"]: (m["status"], m["error"]) for m in await rows(store, "messages")}
    assert status[replies["mine", "sending"]] == ("sent", None)
    assert status[mine["sending"].message_id] == ("answered", None)
    assert status[replies["mine", "pending"]] == ("failed", "interrupted")
    assert status[replies["theirs", "sending"]] == ("sending", None)
    assert status[replies["theirs", "pending"]] == ("pending", None)
    assert status[theirs["sending"].message_id] == ("received", None)
    assert [r["id"] for r in await store.unfinished_inbound(
        skip=[theirs["pending"].message_id], conversations=[a, b])] == [
        mine["pending"].message_id,
    ]
    status = {m["id"]: m["status"] for m in await rows(store, "messages")}
    assert status[replies["theirs", "sending"]] == "sent"
    assert status[replies["theirs", "pending"]] == "pending", "skipped: still being written"


# -- leases: one replica per conversation --------------------------------------------------


async def leases(store: AnyStore) -> list[dict[str, Any]]:
    return await store.query("SELECT * FROM conversation_leases ORDER BY conversation_id")


async def _lease(store: AnyStore, conversation_id: int) -> dict[str, Any] | None:
    return next((r for r in await leases(store) if r["conversation_id"] == conversation_id),
                None)


async def test_two_replicas_taking_one_conversation_one_wins(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    for i in range(20):
        cid = (await stored(a, inbound(f"m{i}", key=f"k{i}"))).conversation_id
        won = await asyncio.gather(a.take_conversation(cid, "A", 30),
                                   b.take_conversation(cid, "B", 30))
        assert sorted(won) == [False, True], (i, won)
        winner, loser = (("A", a), ("B", b)) if won[0] else (("B", b), ("A", a))
        lease = await _lease(a, cid)
        assert lease is not None and lease["owner"] == winner[0]
        assert await winner[1].take_conversation(cid, winner[0], 30) is True, "renewed"
        assert await loser[1].take_conversation(cid, loser[0], 30) is False
    assert len(await leases(b)) == 20


async def test_a_lapsed_lease_is_taken_over_and_its_old_owner_learns_it(
    backend: Backend,
) -> None:
    a, b = await backend.open(), await backend.open()
    cid = (await stored(a, inbound("m1"))).conversation_id
    other = (await stored(a, inbound("m2", key="c2"))).conversation_id
    assert await a.take_conversation(cid, "A", 0.2)
    assert await a.take_conversation(other, "A", 30)
    assert await b.take_conversation(cid, "B", 30) is False
    lease = await _lease(a, cid)
    assert lease is not None and 0 < lease["expires_at"] - time.time() < 5, "epoch seconds"
    await asyncio.sleep(0.3)
    assert await b.take_conversation(cid, "B", 30) is True
    assert await a.renew_conversations("A", 30) == [other]
    assert await b.renew_conversations("B", 30) == [cid]
    assert await a.take_conversation(cid, "A", 30) is False
    assert await a.renew_conversations("nobody", 30) == []


async def test_a_lease_extends_only_while_it_never_lapsed(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    cid = (await stored(a, inbound("m1"))).conversation_id
    assert await a.extend_conversation(cid, "A", 30) is False, "nothing to extend"
    assert await a.take_conversation(cid, "A", 0.2)
    assert await a.extend_conversation(cid, "A", 0.2) is True
    assert await b.extend_conversation(cid, "B", 30) is False, "not B's"
    await asyncio.sleep(0.3)
    assert await a.extend_conversation(cid, "A", 30) is False, "lapsed: someone may have had it"
    assert await b.take_conversation(cid, "B", 30)
    assert await a.extend_conversation(cid, "A", 30) is False


async def test_the_fence_takes_the_lease_and_reads_the_status_in_one_step(
    backend: Backend,
) -> None:
    a, b = await backend.open(), await backend.open()
    m1 = await stored(a, inbound("m1"))
    cid = m1.conversation_id
    assert await a.fence_conversation(cid, "A", 30, m1.message_id) == "received"
    await a.set_inbound_status(m1.message_id, "processing")
    assert await a.fence_conversation(cid, "A", 30, m1.message_id) == "processing"
    assert await b.fence_conversation(cid, "B", 30, m1.message_id) is None, "A holds it"
    await a.set_inbound_status(m1.message_id, "answered")
    assert await a.fence_conversation(cid, "A", 30, m1.message_id) == "answered"
    lease = await _lease(b, cid)
    assert lease is not None and lease["owner"] == "A"


async def test_unanswered_inbound_reads_what_recovery_would_give_without_settling(
    backend: Backend,
) -> None:
    store = await backend.open()
    first = await stored(store, inbound("m1", "one"))
    cid = first.conversation_id
    second = await stored(store, inbound("m2", "two"))
    third = await stored(store, inbound("m3", "three"))
    await stored(store, inbound("x1", "elsewhere", key="c2"))
    sent = await store.begin_outbound(cid, "web", "bot", first.message_id, "a1", status="sending")
    await store.begin_outbound(cid, "web", "bot", second.message_id, "half")  # pending
    assert [r["id"] for r in await store.unanswered_inbound(cid)] == [
        second.message_id, third.message_id]
    out = next(r for r in await rows(store, "messages") if r["id"] == sent)
    assert out["status"] == "sending", "nothing settled"
    recovered = await store.unfinished_inbound((), [cid])
    assert [r["id"] for r in recovered] == [second.message_id, third.message_id]
    assert set(recovered[0]) == set((await store.unanswered_inbound(cid))[0])


async def test_only_the_owner_releases_a_lease(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    cid = (await stored(a, inbound("m1"))).conversation_id
    assert await a.take_conversation(cid, "A", 30)
    await b.release_conversation(cid, "B")
    await b.release_conversation(10_000, "B")
    assert await b.take_conversation(cid, "B", 30) is False
    await a.release_conversation(cid, "A")
    assert await _lease(a, cid) is None
    assert await b.take_conversation(cid, "B", 30) is True


async def test_orphaned_conversations_are_unfinished_and_held_by_no_live_replica(
    backend: Backend,
) -> None:
    a, b = await backend.open(), await backend.open()
    older = await stored(a, inbound("old", key="older"))  # answered: only its later one counts
    await a.set_inbound_status(older.message_id, "answered")
    free = await stored(a, inbound("free", key="free"))
    held = await stored(a, inbound("held", key="held"))
    lapsed = await stored(a, inbound("lapsed", key="lapsed"))
    own = await stored(a, inbound("own", key="own"))
    later = await stored(a, inbound("later", key="older"))
    done = await stored(a, inbound("done", key="done"))
    await a.set_inbound_status(done.message_id, "answered")
    await a.set_inbound_status(own.message_id, "processing")
    assert await b.take_conversation(held.conversation_id, "B", 30)
    assert await b.take_conversation(lapsed.conversation_id, "B", 0.05)
    assert await a.take_conversation(own.conversation_id, "A", 30)
    assert await b.take_conversation(done.conversation_id, "B", 0.05)
    await asyncio.sleep(0.1)

    expected = [free.conversation_id, lapsed.conversation_id, own.conversation_id,
                later.conversation_id]
    assert await a.orphaned_conversations("A") == expected
    assert await a.orphaned_conversations("A", limit=2) == expected[:2]
    assert await b.orphaned_conversations("B") == [
        free.conversation_id, held.conversation_id, lapsed.conversation_id,
        later.conversation_id,
    ], "B's own live lease is its to recover; A's is not"


# -- what callers used to ask in SQLite's dialect -------------------------------------------


async def test_the_customers_last_text(store: AnyStore) -> None:
    cid = (await stored(store, inbound("m1", "first"))).conversation_id
    assert await store.last_customer_text(cid) == "first"
    await stored(store, inbound("m2", "latest"))
    await stored(store, inbound("m3", "👍", kind=Kind.REACTION))
    await store.begin_outbound(cid, "web", "bot", None, "a reply", status="sending")
    assert await store.last_customer_text(cid) == "latest"
    other = (await stored(store, inbound("m4", "", key="c2", kind=Kind.ATTACHMENT)))
    assert await store.last_customer_text(other.conversation_id) is None
    assert await store.last_customer_text(10_000) is None


async def test_users_named_alike(store: AnyStore) -> None:
    ids = [(await stored(store, inbound(f"m{i}", key=f"k{i}", user=f"u{i}", name=name,
                                        platform=platform))).user_id
           for i, (name, platform) in enumerate((
               ("Ann Lee", "web"), ("ann lee", "telegram"), ("Ann Leeds", "web"),
               ("ANN LEE", "discord"), ("Bob", "web")))]
    found = await store.users_named("aNN lEE", 10)
    assert [u["id"] for u in found] == [ids[3], ids[1], ids[0]]
    assert found[0] == {"id": ids[3], "platform": "discord", "platform_user_id": "u3",
                        "display_name": "ANN LEE"}
    assert [u["id"] for u in await store.users_named("Ann Lee", 2)] == [ids[3], ids[1]]
    assert await store.users_named("Ann", 10) == []


async def test_user_events_are_the_article_signals_in_order(store: AnyStore) -> None:
    s = await stored(store, inbound("m1"))
    other = await stored(store, inbound("m2", user="u2", key="c2"))
    await store.log_event("suggestion_shown", user_id=s.user_id, item_id="a1",
                          conversation_id=s.conversation_id)
    await store.log_event("escalated", user_id=s.user_id, item_id="a1")
    await store.log_event("feedback", user_id=s.user_id, value="up")
    await store.log_event("suggestion_clicked", user_id=other.user_id, item_id="a2")
    await store.log_events([
        {"type": "article_viewed", "user_id": s.user_id, "item_id": "a2"},
        {"type": "feedback", "user_id": s.user_id, "item_id": "a2", "value": "down"},
        {"type": "suggestion_clicked", "user_id": s.user_id, "item_id": "a1",
         "conversation_id": s.conversation_id},
    ])
    assert await store.user_events(s.user_id) == [
        {"type": "suggestion_shown", "item_id": "a1", "conversation_id": s.conversation_id,
         "value": None},
        {"type": "article_viewed", "item_id": "a2", "conversation_id": None, "value": None},
        {"type": "feedback", "item_id": "a2", "conversation_id": None, "value": "down"},
        {"type": "suggestion_clicked", "item_id": "a1", "conversation_id": s.conversation_id,
         "value": None},
    ]
    assert await store.user_events(10_000) == []


# -- tickets -------------------------------------------------------------------------------


async def test_tickets_open_once_and_closing_restarts_the_window(store: AnyStore) -> None:
    first = await stored(store, inbound("m1", "bad"))
    cid = first.conversation_id
    await store.set_sentiment(first.message_id, scores(0.9))
    ticket_id = await store.open_ticket(cid, "negative", {"p": 0.9})
    assert ticket_id is not None
    assert await store.open_ticket(cid, "again", {}) is None
    assert (await store.conversation(cid))["state"] == "escalated"
    ticket = await store.ticket(ticket_id)
    assert ticket is not None
    assert (ticket["state"], ticket["reason"], json.loads(ticket["scores"])) == (
        "open", "negative", {"p": 0.9},
    )
    assert ticket["created_at"] == ticket["announced_at"] and ticket["note"] == ""
    assert await store.active_ticket(cid) == ticket
    assert [t["id"] for t in await store.tickets(["open"])] == [ticket_id]
    assert await store.tickets(["resolved"]) == []
    assert await store.ticket(10_000) is None

    reply = await store.begin_outbound(cid, "web", "operator", first.message_id, "sorry")
    await store.update_ticket(ticket_id, first_response_at=now_iso(), note="on it")
    assert (await store.ticket(ticket_id))["note"] == "on it"  # type: ignore[index]
    await store.update_ticket(ticket_id, "bot", state="resolved", closed_at=now_iso())
    closed = await store.ticket(ticket_id)
    assert closed is not None
    assert (closed["state"], closed["last_message_id"]) == ("resolved", reply)
    assert (await store.conversation(cid))["state"] == "bot"
    assert await store.active_ticket(cid) is None
    assert await store.recent_negative(cid, 10) == [], "the window starts after the ticket"
    later = await stored(store, inbound("m2", "still bad"))
    await store.set_sentiment(later.message_id, scores(0.8))
    assert await store.recent_customer_messages(cid, 10) == [
        {"text": "still bad", "p_negative": 0.8},
    ]
    second = await store.open_ticket(cid, "negative", {})
    assert second is not None and second != ticket_id
    assert [t["id"] for t in await store.tickets(("open", "resolved"))] == [ticket_id, second]


async def test_a_claim_takes_an_open_ticket_once(store: AnyStore) -> None:
    cid = (await stored(store, inbound("m1"))).conversation_id
    ticket_id = await store.open_ticket(cid, "asked", {})
    assert ticket_id is not None
    ts = now_iso()
    assert await store.claim_ticket(ticket_id, "alice", ts) is True
    assert await store.claim_ticket(ticket_id, "bob", now_iso()) is False
    assert await store.claim_ticket(10_000, "bob", ts) is False
    ticket = await store.ticket(ticket_id)
    assert ticket is not None
    assert (ticket["state"], ticket["claimed_by"], ticket["claimed_at"]) == (
        "claimed", "alice", ts,
    )
    assert (await store.conversation(cid))["state"] == "operator"
    assert await store.open_ticket(cid, "again", {}) is None, "a claimed ticket is active"


# -- customers -----------------------------------------------------------------------------


async def test_linking_accounts_into_one_customer(store: AnyStore) -> None:
    a = await stored(store, inbound("a1", "first", key="ka", user="ua"))
    b = await stored(store, inbound("b1", "hi", key="kb", user="ub", platform="telegram"))
    await stored(store, inbound("b2", "latest words", key="kb", user="ub", platform="telegram"))
    c = await stored(store, inbound("c1", "yo", key="kc", user="uc", name="Cy"))
    await store.set_sentiment(b.message_id, scores(0.2))
    for reason in ("negative", "asked"):
        ticket_id = await store.open_ticket(b.conversation_id, reason, {})
        assert ticket_id is not None
        await store.update_ticket(ticket_id, "bot", state="resolved", closed_at=now_iso())

    assert [u["id"] for u in await store.linked_users(a.user_id)] == [a.user_id]
    assert await store.unlink_user(a.user_id) == []
    assert await store.link_users(b.user_id, a.user_id) == [a.user_id, b.user_id]
    assert await store.link_users(c.user_id, b.user_id) == [a.user_id, b.user_id, c.user_id]
    linked = await store.linked_users(c.user_id)
    assert [(u["id"], u["platform"], u["platform_user_id"]) for u in linked] == [
        (a.user_id, "web", "ua"), (b.user_id, "telegram", "ub"), (c.user_id, "web", "uc"),
    ]
    assert set(linked[0]) == {"id", "platform", "platform_user_id", "display_name",
                              "created_at"}

    convos = {r["id"]: r for r in await store.customer_conversations(a.user_id)}
    assert set(convos) == {a.conversation_id, b.conversation_id, c.conversation_id}
    kb = convos[b.conversation_id]
    assert (kb["platform"], kb["conversation_key"], kb["platform_user_id"], kb["messages"],
            kb["tickets"], kb["reasons"], kb["last_text"], kb["mean_negative"]) == (
        "telegram", "kb", "ub", 2, 2, "negative, asked", "latest words", 0.2,
    )
    kc = convos[c.conversation_id]
    assert (kc["display_name"], kc["tickets"], kc["reasons"], kc["mean_negative"]) == (
        "Cy", 0, None, None,
    )
    assert len(await store.customer_conversations(a.user_id, limit=2)) == 2

    assert await store.unlink_user(a.user_id) == [b.user_id, c.user_id]
    customer = {u["id"]: u["customer_id"] for u in await rows(store, "users")}
    assert customer == {a.user_id: None, b.user_id: b.user_id, c.user_id: b.user_id}
    assert await store.unlink_user(c.user_id) == []
    assert {u["customer_id"] for u in await rows(store, "users")} == {None}
    with pytest.raises(StoreError):
        await store.linked_users(10_000)


async def test_the_behavior_log(store: AnyStore) -> None:
    s = await stored(store, inbound("m1"))
    await store.log_event("feedback", user_id=s.user_id, conversation_id=s.conversation_id,
                          message_id=s.message_id, item_id="art-1", value="up",
                          data={"emoji": "👍"})
    await store.log_events([
        {"type": "suggestion_shown", "user_id": s.user_id, "item_id": "art-2", "position": 0,
         "data": json.dumps({"arm": "bm25"})},
        {"type": "article_viewed", "user_id": s.user_id, "item_id": "art-2"},
    ])
    await store.log_events([])
    events = await rows(store, "events")
    assert [(e["type"], e["item_id"], e["position"], e["value"], json.loads(e["data"]))
            for e in events] == [
        ("feedback", "art-1", None, "up", {"emoji": "👍"}),
        ("suggestion_shown", "art-2", 0, None, {"arm": "bm25"}),
        ("article_viewed", "art-2", None, None, {}),
    ]
    assert events[1]["ts"] == events[2]["ts"], "one batch, one time"
    assert events[0]["message_id"] == s.message_id and events[2]["conversation_id"] is None


# -- schema --------------------------------------------------------------------------------


async def test_migrations_run_once(backend: Backend) -> None:
    first = await backend.open()
    assert first.schema_version == len(MIGRATIONS)
    s = await stored(first, inbound("m1"))
    again = await backend.open()
    assert again.schema_version == len(MIGRATIONS)
    assert [m["id"] for m in await rows(again, "messages")] == [s.message_id]
    assert await again.record_inbound(inbound("m1")) is None


async def test_a_database_newer_than_the_code_is_refused(backend: Backend) -> None:
    await backend.open()
    backend.set_version(len(MIGRATIONS) + 1)
    newer = backend.new()
    with pytest.raises(StoreError, match=rf"schema version {len(MIGRATIONS) + 1} is newer "
                                         rf"than this code \({len(MIGRATIONS)}\)"):
        await newer.open()
    await newer.close()


def test_both_backends_have_the_same_number_of_migrations() -> None:
    assert len(PG_MIGRATIONS) == len(MIGRATIONS)


def test_postgres_store_has_sqlite_stores_public_api() -> None:
    """Same methods, same signatures, same coroutine-ness (``db`` and ``path`` are the
    SQLite file's own)."""
    for name, member in inspect.getmembers(SQLiteStore):
        if name.startswith("_") or name in ("db", "path"):
            continue
        other = getattr(PostgresStore, name, None)
        assert other is not None, f"PostgresStore lacks {name}"
        if isinstance(member, property):
            assert isinstance(other, property), name
            continue
        assert inspect.signature(other) == inspect.signature(member), name
        assert inspect.iscoroutinefunction(other) == inspect.iscoroutinefunction(member), name


async def test_postgres_schema_matches_sqlite(pg_cluster: Cluster, tmp_path: Path) -> None:
    lite, pg = SQLiteStore(tmp_path / "s.db"), PostgresStore(pg_cluster.create_database())
    await lite.open()
    await pg.open()
    try:
        lite_tables = [r["name"] for r in await lite.query(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        pg_tables = {r["table_name"] for r in await pg.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
        assert pg_tables - set(lite_tables) == {"schema_version", "relay_messages"}
        for table in lite_tables:
            lite_cols = [(r["name"], bool(r["notnull"]) or bool(r["pk"])) for r in
                         await lite.query(f"PRAGMA table_info({table})")]
            pg_cols = [(r["column_name"], r["is_nullable"] == "NO") for r in await pg.query(
                "SELECT column_name, is_nullable FROM information_schema.columns "
                "WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
                [table])]
            assert pg_cols == lite_cols, table
        lite_indexes = {r["name"] for r in await lite.query(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
        pg_indexes = {r["indexname"] for r in await pg.query(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' "
            "AND indexname NOT LIKE '%%_pkey' AND indexname NOT LIKE '%%_key'")}
        assert pg_indexes == lite_indexes
    finally:
        await lite.close()
        await pg.close()


# -- two replicas on one database ------------------------------------------------------------


async def test_two_replicas_store_a_delivery_once(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    for i in range(20):
        event = inbound(f"race-{i}", key=f"k{i % 3}", user=f"u{i % 2}")
        results = await asyncio.gather(a.record_inbound(event), b.record_inbound(event))
        assert sorted(r is None for r in results) == [False, True], (i, results)
    messages = await rows(a, "messages")
    assert sorted(m["platform_message_id"] for m in messages) == sorted(
        f"race-{i}" for i in range(20))
    assert len(await rows(b, "users")) == 2 and len(await rows(b, "conversations")) == 3


async def test_two_replicas_racing_for_new_users_and_conversations(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    for i in range(20):
        results = await asyncio.gather(
            a.record_inbound(inbound(f"a{i}", key=f"k{i}", user=f"u{i}")),
            b.record_inbound(inbound(f"b{i}", key=f"k{i}", user=f"u{i}")),
        )
        assert None not in results
        first, second = results
        assert first is not None and second is not None
        assert (first.user_id, first.conversation_id) == (second.user_id, second.conversation_id)
    assert len(await rows(a, "users")) == 20 and len(await rows(a, "conversations")) == 20
    assert len(await rows(a, "messages")) == 40


async def test_two_replicas_claim_a_ticket_once(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    tickets = []
    for i in range(20):
        cid = (await stored(a, inbound(f"m{i}", key=f"k{i}"))).conversation_id
        ticket_id = await a.open_ticket(cid, "asked", {})
        assert ticket_id is not None
        tickets.append(ticket_id)
    for ticket_id in tickets:
        ts = now_iso()
        won = await asyncio.gather(
            a.claim_ticket(ticket_id, "alice", ts), b.claim_ticket(ticket_id, "bob", ts)
        )
        assert sorted(won) == [False, True], (ticket_id, won)
        ticket = await b.ticket(ticket_id)
        assert ticket is not None
        assert ticket["claimed_by"] == ("alice" if won[0] else "bob")
        assert ticket["state"] == "claimed"
    assert {c["state"] for c in await rows(a, "conversations")} == {"operator"}


async def test_shared_state_is_set_only_over_what_the_writer_expected(
    backend: Backend,
) -> None:
    a, b = await backend.open(), await backend.open()
    assert await a.shared("topic", "t1") is None
    assert await a.share_if("topic", "t1", "pending:a", None) == "pending:a"
    assert await b.share_if("topic", "t1", "pending:b", None) == "pending:a"  # a was first
    assert await b.share_if("topic", "t1", "77", "pending:b") == "pending:a"  # not b's
    assert await a.share_if("topic", "t1", "77", "pending:a") == "77"
    assert await b.shared("topic", "t1") == "77"
    assert await b.shared("other", "t1") is None  # scopes are apart
    assert await a.forget_shared("topic", 3600) == 0  # fresh values stay
    assert await a.forget_shared("topic", -1) == 1
    assert await b.shared("topic", "t1") is None


async def test_two_replicas_racing_for_one_shared_key_agree_on_one_winner(
    backend: Backend,
) -> None:
    a, b = await backend.open(), await backend.open()
    for i in range(20):
        got = await asyncio.gather(a.share_if("seen", f"m{i}", "a", None),
                                   b.share_if("seen", f"m{i}", "b", None))
        assert got[0] == got[1] in ("a", "b"), (i, got)
        swapped = await asyncio.gather(a.share_if("seen", f"m{i}", "a2", got[0]),
                                       b.share_if("seen", f"m{i}", "b2", got[0]))
        assert swapped[0] == swapped[1] in ("a2", "b2"), (i, swapped)


async def test_two_replicas_open_one_ticket_per_conversation(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    for i in range(10):
        cid = (await stored(a, inbound(f"m{i}", key=f"k{i}"))).conversation_id
        opened = await asyncio.gather(a.open_ticket(cid, "a", {}), b.open_ticket(cid, "b", {}))
        assert sorted(t is None for t in opened) == [False, True], opened
    assert len(await rows(a, "tickets")) == 10


# -- PostgreSQL only -----------------------------------------------------------------------


async def test_replicas_starting_together_on_a_new_database_migrate_once(
    backend: Backend,
) -> None:
    """Three processes opening one new database at the same moment: one migrates it, the
    others wait for the lock and find it done (SQLite read the version outside the write
    lock and failed with "table users already exists" in 15 of 20 tries)."""
    stores = [backend.new() for _ in range(3)]
    backend.opened.extend(stores)
    await asyncio.gather(*(s.open() for s in stores))
    assert {s.schema_version for s in stores} == {len(MIGRATIONS)}
    assert len(await rows(stores[0], "users")) == 0


async def test_sqlite_processes_opening_a_new_file_together(tmp_path: Path) -> None:
    for attempt in range(10):
        stores = [SQLiteStore(tmp_path / f"new-{attempt}.db") for _ in range(3)]
        try:
            await asyncio.gather(*(s.open() for s in stores))
            assert {s.schema_version for s in stores} == {len(MIGRATIONS)}
        finally:
            for s in stores:
                await s.close()


async def test_postgres_version_table_holds_one_row(pg_cluster: Cluster) -> None:
    url = pg_cluster.create_database()
    stores = [PostgresStore(url) for _ in range(3)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        assert await stores[0].query("SELECT * FROM schema_version") == [
            {"one": True, "version": len(MIGRATIONS)},
        ]
    finally:
        for s in stores:
            await s.close()


def _errors(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "supportbot_store_errors_total", {"kind": kind}) or 0.0


async def test_postgres_unreachable_is_a_store_error_without_the_password(
    pg_cluster: Cluster,
) -> None:
    url = f"postgresql://supportbot:s3cret-pw@127.0.0.1:{pg_cluster.port}/no_such_db"
    before = _errors("other") + _errors("connection")
    store = PostgresStore(url)
    assert "s3cret" not in repr(store) and "s3cret" not in describe_url(url)
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert "no_such_db" in str(caught.value) and "s3cret" not in str(caught.value)
    assert _errors("other") + _errors("connection") == before + 1
    with pytest.raises(StoreError, match="not opened"):
        await store.query("SELECT 1")
    with pytest.raises(StoreError, match="invalid PostgreSQL URL"):
        PostgresStore("host=a password=secret = =")


async def test_postgres_store_survives_a_server_restart(pg_cluster: Cluster) -> None:
    store = PostgresStore(pg_cluster.create_database(), max_size=2)
    await store.open()
    try:
        await stored(store, inbound("m1"))
        retries = metrics.REGISTRY.get_sample_value("supportbot_store_retries_total") or 0.0
        await asyncio.to_thread(pg_cluster.restart)  # every pooled connection is now dead
        again = await stored(store, inbound("m2"))
        assert again.message_id > 0
        assert (metrics.REGISTRY.get_sample_value("supportbot_store_retries_total") or 0) > retries
        assert [m["platform_message_id"] for m in await rows(store, "messages")] == ["m1", "m2"]
    finally:
        await store.close()


async def test_postgres_text_cannot_hold_nul_so_it_is_replaced(pg_cluster: Cluster) -> None:
    store = PostgresStore(pg_cluster.create_database())
    await store.open()
    try:
        first = await stored(store, inbound("m\x001", "\x00How do I return an item?"))
        assert await store.record_inbound(inbound("m\x001")) is None
        line = (await store.transcript(first.conversation_id))[0]
        assert line.text == "\ufffdHow do I return an item?"
    finally:
        await store.close()


# -- the relay between replicas ------------------------------------------------------------


async def _until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_relay_channel_names_are_checked_on_both_backends(store: AnyStore) -> None:
    for bad in ("", "x" * 49, "two words", "ünïcode", "nul\x00"):
        with pytest.raises(ValueError, match="relay channel"):
            await store.publish(bad, "x")
        with pytest.raises(ValueError, match="relay channel"):
            await store.subscribe(bad, lambda _: None)


async def test_sqlite_relays_nothing(tmp_path: Path) -> None:
    """One process per SQLite file: every socket is local, there is no one to relay to."""
    a, b = SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")
    await a.open()
    await b.open()
    try:
        got: list[str] = []
        unsubscribe = await b.subscribe("replies", got.append)
        await a.publish("replies", "hello")
        await b.publish("replies", "hello")
        await asyncio.sleep(0.05)
        assert got == []
        await unsubscribe()
    finally:
        await a.close()
        await b.close()


@pytest.fixture
async def pg_pair(pg_cluster: Cluster) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two replicas (two stores) on one database."""
    url = pg_cluster.create_database()
    a, b = PostgresStore(url), PostgresStore(url)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_postgres_relay_delivers_to_other_replicas_in_order(
    pg_pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pg_pair
    big = "é" * 10_000  # 20 KB of UTF-8: past NOTIFY's limit
    assert len(big.encode()) > NOTIFY_LIMIT_BYTES
    at_b: list[str] = []
    at_b_async: list[str] = []
    at_a: list[str] = []

    async def slow(payload: str) -> None:
        await asyncio.sleep(0.01)
        at_b_async.append(payload)

    def broken(payload: str) -> None:
        raise RuntimeError("a subscriber's bug")

    await b.subscribe("replies", broken)
    await b.subscribe("replies", at_b.append)
    await b.subscribe("replies", slow)
    await a.subscribe("replies", at_a.append)
    reply = json.dumps({"to": "c1", "text": "¿qué tal?"}, ensure_ascii=False)
    sent = ["one", big, reply, "four", big + "!"]
    for payload in sent:
        await a.publish("replies", payload)
    await a.publish("elsewhere", "not subscribed")
    await _until(lambda: len(at_b_async) == len(sent), "B's deliveries")
    assert at_b == at_b_async == sent
    await b.publish("replies", "from b")
    await _until(lambda: bool(at_a), "A's delivery")
    assert at_a == ["from b"], "a replica never gets its own publications"
    assert at_b == sent, "nor does B"
    assert len(await a.query("SELECT id FROM relay_messages")) == 2


async def test_postgres_relay_unsubscribe_and_old_payloads_deleted(
    pg_pair: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = pg_pair
    monkeypatch.setattr(store_postgres, "RELAY_POLL_S", 60.0)
    kept: list[str] = []
    dropped: list[str] = []
    unsubscribe = await b.subscribe("replies", dropped.append)
    await b.subscribe("replies", kept.append)
    await a.publish("replies", "both")
    await _until(lambda: dropped == ["both"], "the first delivery")
    started = time.monotonic()
    late: list[str] = []
    await b.subscribe("later", late.append)
    assert time.monotonic() - started < 2, "a running listener is woken for a new channel"
    await a.publish("later", "on time")
    await _until(lambda: late == ["on time"], "the new channel's delivery")
    await unsubscribe()
    await unsubscribe()
    await a.publish("replies", "one")
    await _until(lambda: kept == ["both", "one"], "the second delivery")
    assert dropped == ["both"]

    await a.query(  # a payload nobody read, left six minutes ago
        "INSERT INTO relay_messages (channel, payload, created_at) VALUES "
        "('replies', 'stale', extract(epoch from clock_timestamp()) - 360) RETURNING id")
    await a.publish("replies", "x" * 9000)
    await _until(lambda: len(kept) == 3, "the long payload")
    assert [r["payload"] for r in await a.query("SELECT payload FROM relay_messages")] == [
        "x" * 9000,
    ]


async def test_postgres_relay_listens_again_after_a_server_restart(
    pg_cluster: Cluster, pg_pair: tuple[PostgresStore, PostgresStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = pg_pair
    got: list[str] = []
    await b.subscribe("replies", got.append)
    await a.publish("replies", "before")
    await _until(lambda: got == ["before"], "the first delivery")
    with caplog.at_level(logging.WARNING, logger="core.store_postgres"):
        await asyncio.to_thread(pg_cluster.restart)
        # Published while B's listener is away is lost (at most once): ask until it is back.
        for i in range(300):
            await a.publish("replies", f"after {i}")
            await asyncio.sleep(0.05)
            if any(g.startswith("after") for g in got):
                break
    assert any(g.startswith("after") for g in got), got
    assert "relay: connection to" in caplog.text and "listening again" in caplog.text


async def test_postgres_subscribe_needs_an_open_store(pg_cluster: Cluster) -> None:
    store = PostgresStore(pg_cluster.create_database())
    with pytest.raises(StoreError, match="not opened"):
        await store.subscribe("replies", lambda _: None)
    await store.close()


def test_a_cluster_without_binaries_fails_loudly(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("SUPPORTBOT_PG_BIN", str(tmp_path))
    with pytest.raises(ClusterError, match="install the Debian package postgresql"):
        start_cluster()



def test_a_cluster_whose_port_was_taken_meanwhile_starts_on_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The port is picked free, then bound later by the server: another process may take
    it in between (parallel test runs on one box); the start is tried on a new port."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    picks = iter([taken])
    real = postgres_cluster._free_port
    monkeypatch.setattr(postgres_cluster, "_free_port", lambda: next(picks, None) or real())
    try:
        cluster = start_cluster()
    finally:
        squatter.close()
    try:
        assert cluster.port != taken
        with psycopg.connect(cluster.url(), connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        cluster.cleanup()


async def test_a_broken_constraint_is_a_store_error_that_says_the_write_was_rejected(
    store: AnyStore,
) -> None:
    """The database works; the write is wrong: retrying it cannot help, and the error
    says so (the pipeline's healer sets such a write aside instead of waiting on it)."""
    question = await stored(store, inbound("m1"))
    out = await store.begin_outbound(question.conversation_id, "web", "bot", question.message_id)
    with pytest.raises(StoreError) as caught:
        await store.finish_outbound(out, status="sent", reply_to=10**9)
    assert caught.value.rejected is True
    await store.finish_outbound(out, status="sent")  # the store goes on working
