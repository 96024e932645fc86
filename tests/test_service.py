"""The service as an operator runs it: start-up, recovery after a crash, clean shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp

from bots.service import Service
from core.messages import Inbound, User
from core.store import MIGRATIONS, SQLiteStore
from tests.conftest import DATA_DIR, REPO, make_settings, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_store_schema_wal_and_dedupe(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    assert store.schema_version == len(MIGRATIONS)  # a fresh database gets every migration
    mode = await store.query("PRAGMA journal_mode")
    assert mode[0]["journal_mode"] == "wal"
    inbound = Inbound("web", "k1", User("web", "u1", "Ann"), "m1", "hello")
    first = await store.record_inbound(inbound)
    again = await store.record_inbound(inbound)
    assert first is not None and again is None
    tables = {r["name"] for r in await store.query("SELECT name FROM sqlite_master")}
    assert {"users", "conversations", "messages", "events", "tickets"} <= tables
    await store.close()
    # Re-opening an up-to-date database runs no migration and keeps the data.
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    assert (await store.query("SELECT count(*) AS n FROM messages"))[0]["n"] == 1
    await store.close()


async def test_accepted_message_is_answered_after_a_crash(tmp_path: Path) -> None:
    """A message committed by a run that died before answering is answered on restart."""
    settings = make_settings(tmp_path)
    store = SQLiteStore(settings.store.path)
    await store.open()
    await store.record_inbound(
        Inbound("web", "crashed-session", User("web", "crashed-session"), "c:1",
                "Do you ship to Canada?")
    )
    await store.close()

    service = Service(settings)
    await service.start()
    try:
        rows = await wait_for(lambda: service.store.query(
            "SELECT text FROM messages WHERE direction = 'out' AND status = 'sent'"), timeout=60)
        assert rows[0]["text"].strip()
        status = await service.store.query("SELECT status FROM messages WHERE id = 1")
        assert status[0]["status"] == "answered"
    finally:
        await service.stop()


async def test_run_serves_chat_page_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[service]\ndata_dir = "{DATA_DIR}"\n[store]\npath = "{tmp_path / "run.db"}"\n'
        f'[web]\nport = {port}\n[generator]\nmax_new_tokens = 16\n',
        encoding="utf-8",
    )
    env = {**os.environ, "SUPPORTBOT_OPERATOR_TOKEN": "t0ken"}
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bots.cli", "run", "--config", str(config),
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as http:
            async def page() -> str | None:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/") as resp:
                        return await resp.text() if resp.status == 200 else None
                except aiohttp.ClientError:
                    return None

            html = await wait_for(page, timeout=60, step=0.2)
            assert "Support" in html and "chat.js" in html
            startup_s = time.monotonic() - started
            # The goal is 20 s on an idle machine; shared CI machines get slack.
            assert startup_s < 60, f"start-up took {startup_s:.1f} s"
            print(f"start-up: {startup_s:.1f} s")
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 0, out.decode()
        assert b"shutting down" in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_reply_sent_before_a_crash_is_not_sent_again(tmp_path: Path) -> None:
    """The crash came after the reply went out but before the message was marked done."""
    settings = make_settings(tmp_path)
    store = SQLiteStore(settings.store.path)
    await store.open()
    stored = await store.record_inbound(
        Inbound("web", "sent-session", User("web", "sent-session"), "s:1", "Hi there")
    )
    assert stored is not None
    await store.set_inbound_status(stored.message_id, "processing")
    out = await store.begin_outbound(stored.conversation_id, "web", "bot", stored.message_id)
    await store.finish_outbound(out, text="Hello! How can I help?", status="sent")
    await store.close()

    service = Service(settings)
    await service.start()
    try:
        await asyncio.sleep(1.0)
        rows = await service.store.query(
            "SELECT count(*) AS n FROM messages WHERE direction = 'out'")
        assert rows[0]["n"] == 1
        status = await service.store.query("SELECT status FROM messages WHERE id = ?",
                                           [stored.message_id])
        assert status[0]["status"] == "answered"
    finally:
        await service.stop()


async def test_reply_handed_to_the_platform_when_the_process_died_is_not_sent_again(
    tmp_path: Path,
) -> None:
    """The crash came after the complete reply was stored as ``sending`` and handed to the
    platform, before it was recorded as sent: the last hop is at most once, so it counts as
    sent (the reconnecting tab finds it in the transcript) and is not generated again."""
    settings = make_settings(tmp_path)
    store = SQLiteStore(settings.store.path)
    await store.open()
    stored = await store.record_inbound(
        Inbound("web", "sending-session", User("web", "sending-session"), "x:1", "Hi there")
    )
    assert stored is not None
    await store.set_inbound_status(stored.message_id, "processing")
    out = await store.begin_outbound(stored.conversation_id, "web", "bot", stored.message_id)
    await store.finish_outbound(out, text="Hello! How can I help?", status="sending")
    await store.close()

    service = Service(settings)
    await service.start()
    try:
        port = service.adapters[0].port  # type: ignore[attr-defined]
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws?session=sending-session")
            hello = await ws.receive_json(timeout=10)
            assert [(ln["direction"], ln["text"]) for ln in hello["transcript"]] == [
                ("in", "Hi there"), ("out", "Hello! How can I help?")]
            await asyncio.sleep(1.0)
            rows = await service.store.query(
                "SELECT status FROM messages WHERE direction = 'out'")
            assert rows == [{"status": "sent"}]
            status = await service.store.query("SELECT status FROM messages WHERE id = ?",
                                               [stored.message_id])
            assert status[0]["status"] == "answered"
            await ws.close()
    finally:
        await service.stop()
