"""The service on PostgreSQL: config, start-up, a web customer answered, a restart that
keeps the transcript, and frames relayed between replicas' web sockets.

PostgreSQL is a real throwaway cluster (``tests/postgres_cluster.py``), started once for
the module; each test gets its own database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from adapters.web import RELAY_CHANNEL, WebAdapter
from bots.service import Service, build_store
from core.pipeline import Pipeline
from core.store import SQLiteStore
from core.store_postgres import PostgresStore
from tests.conftest import (
    DATA_DIR,
    OPERATOR_TOKEN,
    REPO,
    ScriptedDraftGenerator,
    make_settings,
    wait_for,
)
from tests.postgres_cluster import Cluster
from tests.test_end_to_end import Customer, operator_headers
from tests.test_service import free_port

PASSWORD = "pg-s3cret-value"


def conversation_rows(url: str, session: str) -> list[dict[str, Any]]:
    """The session's messages as PostgreSQL holds them, read behind the service's back."""
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(
            "SELECT m.direction, m.sender, m.status, m.text FROM messages m "
            "JOIN conversations c ON c.id = m.conversation_id "
            "WHERE c.platform = 'web' AND c.conversation_key = %s ORDER BY m.id",
            [session],
        ).fetchall()


def test_the_password_comes_from_the_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    url = "postgresql://supportbot@db.internal:5433/support"
    settings = make_settings(tmp_path, store={"url": url, "password_env": "TEST_PG_PASSWORD"})
    monkeypatch.delenv("TEST_PG_PASSWORD", raising=False)
    store = build_store(settings)
    assert isinstance(store, PostgresStore)
    assert "password" not in conninfo_to_dict(store.url)

    monkeypatch.setenv("TEST_PG_PASSWORD", PASSWORD)
    caplog.set_level(logging.INFO, logger="bots.service")
    store = build_store(make_settings(
        tmp_path, store={"url": url, "password_env": "TEST_PG_PASSWORD",
                         "pool_min": 2, "pool_max": 6}))
    assert isinstance(store, PostgresStore)
    params = conninfo_to_dict(store.url)
    assert params["password"] == PASSWORD
    assert (params["host"], params["port"], params["dbname"], params["user"]) == (
        "db.internal", "5433", "support", "supportbot")
    assert (store.min_size, store.max_size) == (2, 6)
    assert "postgresql://supportbot@db.internal:5433/support" in caplog.text
    assert PASSWORD not in caplog.text

    sqlite = build_store(make_settings(tmp_path))
    assert isinstance(sqlite, SQLiteStore) and sqlite.path == tmp_path / "supportbot.db"


async def test_a_customer_is_answered_and_the_transcript_survives_a_restart(
    pg_cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    url = pg_cluster.create_database()
    settings = make_settings(tmp_path, store={"url": url},
                             report={"out_dir": str(tmp_path / "reports")})
    caplog.set_level(logging.INFO, logger="bots.service")
    caplog.set_level(logging.INFO, logger="core.analytics")
    session = "pg-session-1"

    service = Service(settings)
    await service.start()
    try:
        assert isinstance(service.store, PostgresStore)
        assert "created analytics indexes" in caplog.text
        base = f"http://127.0.0.1:{service.adapters[0].port}"
        async with aiohttp.ClientSession() as http:
            customer = await Customer.connect(http, base, session)
            await customer.say("How can I track my order?")
            reply = await customer.until("reply")
            assert reply["sender"] == "bot" and reply["text"].strip()

            async with http.get(f"{base}/api/operator/analytics?since=24h",
                                headers=operator_headers()) as resp:
                assert resp.status == 200
                page = await resp.json()
            assert page["sentiment"]["total"] == 1 and page["generator"]["total"] == 1
            await customer.ws.close()
        built = await service.post_report()
        assert built.data.messages == 1
        assert list((tmp_path / "reports").glob("*.png")), "the report is written too"
    finally:
        await service.stop()

    rows = await asyncio.to_thread(conversation_rows, url, session)
    assert [(r["direction"], r["sender"], r["status"]) for r in rows] == [
        ("in", "customer", "answered"), ("out", "bot", "sent"),
    ]
    assert rows[0]["text"] == "How can I track my order?"
    assert rows[1]["text"].strip() == reply["text"].strip()
    assert not (tmp_path / "supportbot.db").exists(), "nothing may go to the SQLite file"

    service = Service(settings)
    await service.start()
    try:
        base = f"http://127.0.0.1:{service.adapters[0].port}"
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{base}/ws?session={session}")
            hello = await ws.receive_json(timeout=10)
            await ws.close()
    finally:
        await service.stop()
    assert hello["type"] == "hello"
    assert [(line["direction"], line["text"].strip()) for line in hello["transcript"]] == [
        ("in", "How can I track my order?"), ("out", reply["text"].strip()),
    ]
    assert hello["transcript"][1]["reply"] == reply["reply"]


async def test_supportbot_run_on_postgresql(pg_cluster: Cluster, tmp_path: Path) -> None:
    """The command an operator runs: the URL from the file, the password from the
    environment and never in the log, ready to serve, stopped by SIGTERM."""
    url = pg_cluster.create_database()
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[service]\ndata_dir = "{DATA_DIR}"\nreplica_id = "run-test"\n'
        f'[store]\npath = "{tmp_path / "unused.db"}"\nurl = "{url}"\n'
        f'[web]\nport = {port}\n[generator]\nmax_new_tokens = 16\n',
        encoding="utf-8",
    )
    env = {**os.environ, "SUPPORTBOT_OPERATOR_TOKEN": "t0ken",
           "SUPPORTBOT_DB_PASSWORD": PASSWORD}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bots.cli", "run", "--config", str(config),
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, timeout=90, step=0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = out.decode()
    assert proc.returncode == 0, log
    # (redact_logs reads the URL's user@host as an email address and masks it)
    assert "store: PostgreSQL at postgresql://" in log and f":{pg_cluster.port}/t_" in log
    assert "created analytics indexes" in log and "replica 'run-test'" in log
    assert PASSWORD not in log
    assert not (tmp_path / "unused.db").exists()


class _Replica:
    """One replica's web adapter on its own store (no models: nothing is answered)."""

    def __init__(self, settings: Any, url: str, relay: bool = True) -> None:
        self.store = PostgresStore(url)
        self.web = WebAdapter(settings.web, OPERATOR_TOKEN, relay=relay)
        no_classifier: Any = None  # never asked: no message is submitted
        self.pipeline = Pipeline(settings, self.store, no_classifier, ScriptedDraftGenerator())

    async def start(self) -> _Replica:
        await self.store.open()
        await self.web.start(self.pipeline)
        return self

    async def stop(self) -> None:
        await self.web.stop()
        await self.store.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web.port}"


@contextlib.asynccontextmanager
async def _two_replicas(pg_cluster: Cluster, tmp_path: Path, *, relay_a: bool = True
                        ) -> AsyncIterator[tuple[_Replica, _Replica]]:
    """Two replicas' web adapters on one new database."""
    url = pg_cluster.create_database()
    settings = make_settings(tmp_path, store={"url": url})
    a = await _Replica(settings, url, relay=relay_a).start()
    try:
        b = await _Replica(settings, url).start()
        try:
            yield a, b
        finally:
            await b.stop()
    finally:
        await a.stop()


async def test_frames_reach_a_customer_whose_socket_is_on_another_replica(
    pg_cluster: Cluster, tmp_path: Path,
) -> None:
    async with _two_replicas(pg_cluster, tmp_path) as (a, b), aiohttp.ClientSession() as http:
        on_b = await Customer.connect(http, b.base, "relayed-session")
        on_a = await Customer.connect(http, a.base, "relayed-session")
        await a.web.broadcast("relayed-session", {"type": "typing", "reply": "r1"})
        await a.web.broadcast("relayed-session", {"type": "delta", "reply": "r1",
                                                  "text": "Ça arrive — demain"})
        await a.web.broadcast("other-session", {"type": "typing", "reply": "r2"})
        assert (await on_b.next_frame(10))["type"] == "typing"
        assert (await on_b.next_frame(10))["text"] == "Ça arrive — demain"
        assert [(await on_a.next_frame(10))["type"] for _ in range(2)] == ["typing", "delta"]

        # Back the other way; the sender's own tab gets each frame once.
        await b.web.broadcast("relayed-session", {"type": "abort", "reply": "r1"})
        assert (await on_a.next_frame(10))["type"] == "abort"
        assert (await on_b.next_frame(10))["type"] == "abort"
        with pytest.raises(asyncio.TimeoutError):
            await on_b.next_frame(1.0)
        with pytest.raises(asyncio.TimeoutError):
            await on_a.next_frame(0.2)

        # A frame too long for one NOTIFY arrives whole; malformed relays are dropped.
        await a.store.publish(RELAY_CHANNEL, "not json")
        await a.store.publish(RELAY_CHANNEL, json.dumps({"key": "relayed-session"}))
        long_text = "Suivez votre colis ici. " * 600
        await a.web.broadcast("relayed-session", {"type": "delta", "text": long_text})
        assert (await on_a.next_frame(10))["text"] == long_text
        assert (await on_b.next_frame(10))["text"] == long_text
        with pytest.raises(asyncio.TimeoutError):
            await on_b.next_frame(1.0)


async def test_a_tab_opened_while_another_replica_sends_a_reply_still_gets_it(
    pg_cluster: Cluster, tmp_path: Path,
) -> None:
    """The reply's frame went out before the tab was there, and the reply is not stored
    as sent yet (so not in the hello's transcript): the tab gets it right after its hello."""
    async with _two_replicas(pg_cluster, tmp_path) as (a, b), aiohttp.ClientSession() as http:
        await a.web.broadcast("late-session", {"type": "delta", "reply": "r7", "text": "Y"})
        await a.web.broadcast("late-session", {"type": "reply", "reply": "r7",
                                               "sender": "bot", "text": "Yes, we do."})
        await a.web.broadcast("other-session", {"type": "reply", "reply": "r8",
                                                "sender": "bot", "text": "Not yours."})
        await asyncio.sleep(1.0)  # relayed to b, where no tab of the session is open
        late = await Customer.connect(http, b.base, "late-session")
        frame = await late.next_frame(10)
        assert (frame["type"], frame["reply"], frame["text"]) == ("reply", "r7", "Yes, we do.")
        with pytest.raises(asyncio.TimeoutError):
            await late.next_frame(1.0)

        # The same on the replica that sends it (the conversation was taken over there
        # while the customer's tab was moving to it).
        await b.web.broadcast("moving-session", {"type": "reply", "reply": "r9",
                                                 "sender": "bot", "text": "It ships today."})
        moved = await Customer.connect(http, b.base, "moving-session")
        frame = await moved.next_frame(10)
        assert (frame["reply"], frame["text"]) == ("r9", "It ships today.")


async def test_without_relay_nothing_is_published(pg_cluster: Cluster, tmp_path: Path) -> None:
    """The SQLite setting (one process): broadcast stays local, as it always was."""
    async with _two_replicas(pg_cluster, tmp_path, relay_a=False) as (a, b), \
            aiohttp.ClientSession() as http:
        on_b = await Customer.connect(http, b.base, "local-session")
        await a.web.broadcast("local-session", {"type": "typing", "reply": "r1"})
        with pytest.raises(asyncio.TimeoutError):
            await on_b.next_frame(1.0)


async def _console(http: aiohttp.ClientSession, base: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"{base}/api/operator/ws")
    await ws.send_json({"token": OPERATOR_TOKEN})
    assert (await ws.receive_json(timeout=10))["type"] == "ready"
    return ws


async def _next_news(ws: aiohttp.ClientWebSocketResponse, kind: str, ticket_id: int | None,
                     timeout: float = 15.0) -> dict[str, Any]:
    """The next push of ``kind`` (about ``ticket_id``), skipping others."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        frame = await ws.receive_json(timeout=max(left, 0.01))
        if frame["type"] == kind and (ticket_id is None or frame["ticket"]["id"] == ticket_id):
            return frame


async def test_two_replicas_one_operator_queue_and_one_claim_winner(
    pg_cluster: Cluster, tmp_path: Path,
) -> None:
    """Two whole services on one database, an operator console on each: a ticket opened
    on one replica is pushed to the console on the other at once, both list it, and two
    operators claiming it at the same moment through different replicas: one wins, the
    other is told it is taken, and the customer hears of one person joining."""
    url = pg_cluster.create_database()
    services = []
    try:
        for name in ("web-a", "web-b"):
            service = Service(make_settings(
                tmp_path / name, service={"replica_id": name, "sweep_interval_s": 0.2},
                store={"url": url}, answers={"mode": "extract"}, recommender={"enabled": False},
                web={"enabled": True, "port": free_port()}))
            services.append(service)
            await service.start()
        a, b = (f"http://127.0.0.1:{s.adapters[0].port}" for s in services)
        async with aiohttp.ClientSession() as http:
            console_b = await _console(http, b)
            customer = await Customer.connect(http, a, "queue-session")
            await customer.say("I want to talk to a person please")
            opened = await _next_news(console_b, "ticket_opened", None)
            ticket_id = opened["ticket"]["id"]
            assert opened["ticket"]["state"] == "open"
            for base in (a, b):
                async with http.get(f"{base}/api/operator/tickets",
                                    headers=operator_headers()) as resp:
                    assert [t["id"] for t in (await resp.json())["tickets"]] == [ticket_id]

            # Both replicas watch for unclaimed tickets; one re-announces it.
            rounds = await asyncio.gather(*(s.pipeline.operators.reannounce_overdue(0.0)
                                            for s in services if s.pipeline is not None))
            assert sorted(rounds) == [0, 1], rounds
            await customer.until("message", sender="system", timeout=15)

            async def claim(base: str, who: str) -> int:
                async with http.post(f"{base}/api/operator/tickets/{ticket_id}/claim",
                                     headers=operator_headers(who), json={}) as resp:
                    return resp.status

            statuses = await asyncio.gather(claim(a, "Dana"), claim(b, "Sam"))
            assert sorted(statuses) == [200, 409], statuses
            winner = ("Dana", "Sam")[statuses.index(200)]
            claimed = await _next_news(console_b, "ticket_updated", ticket_id)
            assert claimed["ticket"]["state"] == "claimed"
            assert winner.lower() in claimed["ticket"]["claimed_by"].lower()
            with contextlib.suppress(TimeoutError):  # a second "joined", were one coming
                while True:
                    await customer.next_frame(1.5)
            joined = [f for f in customer.frames
                      if f["type"] == "message" and "has joined the chat" in f.get("text", "")]
            assert [f["text"] for f in joined] == [
                f"{winner} from our support team has joined the chat."], customer.frames
            waiting = [f for f in customer.frames if "Thanks for waiting" in f.get("text", "")]
            assert len(waiting) == 1, customer.frames
            await console_b.close()
    finally:
        for service in reversed(services):
            await service.stop()
