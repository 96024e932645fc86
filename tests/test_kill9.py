"""``kill -9`` in the middle of a conversation load, then a restart on the same database.

The service runs as the operator runs it (``supportbot run``, a subprocess, the real
SmolLM2 and MiniLM). Customers chat over the web WebSocket as the browser page does: a
message not acknowledged before the connection died is sent again, with the same id,
after reconnecting. What must hold: every accepted message is answered exactly once,
in order, as the customer sees it and as the database records it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import DATA_DIR, REPO, wait_for

QUESTIONS = [
    "Do you ship to Canada?",
    "How long does delivery take?",
    "Can I pay with a gift card?",
    "Where can I see my order status?",
]
FINAL = {"reply", "message"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tab:
    """A customer's browser tab: reconnects with the same session, resends what was not
    acknowledged, and remembers every frame it was shown."""

    def __init__(self, base: str, session: str) -> None:
        self.base, self.session = base, session
        self.sent: dict[str, str] = {}  # client id -> text, in order
        self.acked: set[str] = set()
        self.finals: list[dict[str, Any]] = []  # answers shown live, on this connection
        self.finals_before: list[dict[str, Any]] = []  # ... on the previous ones
        self.partial: set[str] = set()  # reply ids seen streaming, never finished
        self.transcripts: list[list[dict[str, Any]]] = []
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self, http: aiohttp.ClientSession) -> None:
        self._ws = await http.ws_connect(f"{self.base}/ws?session={self.session}")
        hello = await self._ws.receive_json(timeout=30)
        assert hello["type"] == "hello"
        self.transcripts.append(hello["transcript"])
        self.finals_before += self.finals
        self.finals = []
        self._reader = asyncio.create_task(self._read(self._ws))
        for client_id, text in self.sent.items():
            if client_id not in self.acked:
                await self._ws.send_json({"type": "message", "id": client_id, "text": text})

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if frame["type"] == "ack":
                self.acked.add(frame["id"])
            elif frame["type"] in ("typing", "delta"):
                self.partial.add(frame["reply"])
            elif frame["type"] in FINAL:
                self.partial.discard(frame["reply"])
                self.finals.append(frame)

    def answers_seen(self) -> int:
        """Answers in the transcript shown at the last (re)connect, plus those since."""
        return sum(ln["direction"] == "out" for ln in self.transcripts[-1]) + len(self.finals)

    async def say(self, client_id: str, text: str) -> None:
        self.sent[client_id] = text
        assert self._ws is not None
        await self._ws.send_json({"type": "message", "id": client_id, "text": text})

    async def dropped(self) -> None:
        """The server died: the socket closes, everything it had sent has been read."""
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout=30)
        if self._ws is not None:
            await self._ws.close()


async def _start(config: Path, log: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "SUPPORTBOT_OPERATOR_TOKEN": "kill9-token"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bots.cli", "run", "--config", str(config),
        cwd=REPO, env=env, stdout=log.open("ab"), stderr=asyncio.subprocess.STDOUT,
    )


async def stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, as an operator stops the service; SIGKILL if it has not gone in 30 s."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _healthy(http: aiohttp.ClientSession, base: str) -> bool:
    try:
        async with http.get(f"{base}/healthz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def test_kill_9_mid_load_then_restart_answers_every_message_exactly_once(
    tmp_path: Path,
) -> None:
    port = free_port()
    db = tmp_path / "kill9.db"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[service]\ndata_dir = "{DATA_DIR}"\nlog_format = "json"\n'
        f'[store]\npath = "{db}"\n'
        f"[web]\nport = {port}\n"
        "[generator]\nmax_new_tokens = 12\ntemperature = 0.0\n"
        "[grounding]\nenabled = false\n[recommender]\nenabled = false\n",
        encoding="utf-8",
    )
    log = tmp_path / "service.log"
    base = f"http://127.0.0.1:{port}"
    tabs = [Tab(base, f"kill9-customer-{i}") for i in range(3)]
    proc = await _start(config, log)
    try:
        async with aiohttp.ClientSession() as http:
            await wait_for(lambda: _healthy(http, base), timeout=180, step=0.3)
            for tab in tabs:
                await tab.connect(http)
            for n, text in enumerate(QUESTIONS[:3]):
                for tab in tabs:
                    await tab.say(f"m{n}", text)
            await wait_for(lambda: all(len(t.acked) == 3 for t in tabs), timeout=30)
            # Kill while a reply is streaming, after at least one was delivered whole.
            await wait_for(
                lambda: sum(len(t.finals) for t in tabs) >= 1 and any(t.partial for t in tabs),
                timeout=300, step=0.01,
            )
            await tabs[0].say("m3", QUESTIONS[3])  # in flight: maybe committed, not acked
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            assert proc.returncode == -signal.SIGKILL
            for tab in tabs:
                await tab.dropped()
            before = {t.session: len(t.finals_before) + len(t.finals) for t in tabs}
            cut = sum(len(t.partial) for t in tabs)
            assert cut >= 1, "the kill did not land while a reply was streaming"
            assert sum(before.values()) < 10, "everything was answered before the kill"

            proc = await _start(config, log)
            await wait_for(lambda: _healthy(http, base), timeout=180, step=0.3)
            for tab in tabs:
                await tab.connect(http)
            await wait_for(lambda: all(len(t.acked) == len(t.sent) for t in tabs), timeout=30)

            await wait_for(lambda: all(t.answers_seen() >= len(t.sent) for t in tabs),
                           timeout=400, step=0.2)
            await wait_for(lambda: _idle(http, base, db), timeout=60, step=0.2)
            for tab in tabs:
                assert tab.answers_seen() == len(tab.sent), (
                    f"{tab.session}: {len(tab.sent)} messages, {tab.answers_seen()} answers: "
                    f"{tab.transcripts[-1]} + {[f['text'] for f in tab.finals]}"
                )
                assert all(f["text"].strip() for f in tab.finals)
                # Each answer shown before the kill is in the reconnect transcript, once.
                shown = [ln["text"] for ln in tab.transcripts[1] if ln["direction"] == "out"]
                live = [f["text"] for f in tab.finals_before]
                assert shown[: len(live)] == live
            # A fresh tab sees each question once and as many answers as questions.
            for tab in tabs:
                ws = await http.ws_connect(f"{base}/ws?session={tab.session}")
                hello = await ws.receive_json(timeout=30)
                await ws.close()
                questions = [ln["text"] for ln in hello["transcript"] if ln["direction"] == "in"]
                assert questions == list(tab.sent.values())
                answers = [ln for ln in hello["transcript"] if ln["direction"] == "out"]
                assert len(answers) == len(tab.sent)

        rows = await asyncio.to_thread(_db_rows, db)
        inbound = [r for r in rows if r["direction"] == "in"]
        assert len(inbound) == sum(len(t.sent) for t in tabs)
        assert {r["status"] for r in inbound} == {"answered"}
        sent = [r for r in rows if r["direction"] == "out" and r["status"] == "sent"]
        per_message = {r["id"]: [o for o in sent if o["reply_to"] == r["id"]] for r in inbound}
        assert all(len(v) == 1 for v in per_message.values()), per_message
        interrupted = [r for r in rows if r["status"] == "failed" and r["error"] == "interrupted"]
        assert len(interrupted) >= 1  # the reply the kill cut off, answered again whole
        for convo in {r["conversation_id"] for r in inbound}:
            order = [o["reply_to"] for o in sent if o["conversation_id"] == convo]
            assert order == sorted(order), "answers out of order"
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        assert any("recovered" in ln["message"] for ln in lines)
    finally:
        await stop(proc)


async def _idle(http: aiohttp.ClientSession, base: str, db: Path) -> bool:
    """Every message answered and nothing queued, running or owed to the database: a
    duplicate would have been sent by now (only a new recovery could queue one)."""
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    gauges = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("supportbot_queue_depth", "supportbot_conversations_busy",
                    "supportbot_store_backlog"):
            gauges[name] = float(value)
    if len(gauges) < 3 or any(gauges.values()):
        return False
    rows = await asyncio.to_thread(_db_rows, db)
    return all(r["status"] == "answered" for r in rows if r["direction"] == "in")


def _db_rows(db: Path) -> list[dict[str, Any]]:
    import sqlite3

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM messages ORDER BY id")]
    finally:
        conn.close()
