"""Three replicas of ``supportbot run`` on one PostgreSQL database, one ``kill -9``ed while
it streams a reply and restarted.

The replicas run as an operator runs them (subprocesses, the real models); customers chat
over the web WebSocket, each tab on one replica as a load balancer would spread them.
When a replica dies its tabs reconnect to another one and send again what was not
acknowledged. What must hold, as customers see it and as the database records it: every
accepted message answered exactly once, the messages of a conversation in order, the
killed replica's conversations taken over by the others once its leases expire, and
answers reaching a tab connected to a replica other than the one that wrote them.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from psycopg.rows import dict_row

from tests.conftest import DATA_DIR, wait_for
from tests.postgres_cluster import Cluster
from tests.test_kill9 import QUESTIONS, Tab, _healthy, _start, free_port, stop

LEASE_TTL_S = 3.0


def _config(tmp_path: Path, name: str, url: str, port: int, mode: str) -> Path:
    """A replica: its own port and id, the shared database. ``generate`` makes a replica
    slow enough (the real SmolLM2 writes every answer) to be killed mid-reply."""
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'[service]\ndata_dir = "{DATA_DIR}"\nlog_format = "json"\nreplica_id = "{name}"\n'
        f"lease_ttl_s = {LEASE_TTL_S}\nsweep_interval_s = 0.3\n"
        f'[store]\nurl = "{url}"\n'
        f"[web]\nport = {port}\n"
        f'[answers]\nmode = "{mode}"\n'
        "[generator]\nmax_new_tokens = 24\ntemperature = 0.0\n"
        "[recommender]\nenabled = false\n",
        encoding="utf-8",
    )
    return config


def _rows(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM messages ORDER BY id").fetchall()


async def test_three_replicas_one_killed_answer_every_message_once_in_order(
    pg_cluster: Cluster, tmp_path: Path
) -> None:
    url = pg_cluster.create_database()
    ports = [free_port() for _ in range(3)]
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    modes = ["extract", "extract", "generate"]
    configs = [_config(tmp_path, f"r{i}", url, ports[i], modes[i]) for i in range(3)]
    log = tmp_path / "replicas.log"
    procs = [await _start(c, log) for c in configs]
    try:
        async with aiohttp.ClientSession() as http:
            for base in bases:
                await wait_for(lambda b=base: _healthy(http, b), timeout=240, step=0.3)
            # One customer with a tab on r0 and another on r1: what r0 answers reaches the
            # tab on r1 too (through the database's notifications).
            here, there = Tab(bases[0], "replica-two-tabs"), Tab(bases[1], "replica-two-tabs")
            await here.connect(http)
            await there.connect(http)
            await here.say("t0", QUESTIONS[0])
            await wait_for(lambda: here.finals and there.finals, timeout=60, step=0.05)
            assert there.finals[0]["text"] == here.finals[0]["text"]
            assert there.finals[0]["reply"] == here.finals[0]["reply"]

            tabs = [Tab(bases[i % 3], f"replica-customer-{i}") for i in range(6)]
            doomed = [t for i, t in enumerate(tabs) if i % 3 == 2]
            for tab in tabs:
                await tab.connect(http)
            for n, text in enumerate(QUESTIONS):
                for tab in tabs:
                    await tab.say(f"m{n}", text)
            await wait_for(lambda: all(len(t.acked) == len(QUESTIONS) for t in tabs),
                           timeout=30)
            # Kill r2 while it streams an answer: its conversations are half answered.
            await wait_for(lambda: any(t.partial for t in doomed), timeout=300, step=0.01)
            procs[2].send_signal(signal.SIGKILL)
            await procs[2].wait()
            for tab in doomed:
                await tab.dropped()
            answered_by_r2 = sum(len(t.finals) for t in doomed)
            assert answered_by_r2 < len(doomed) * len(QUESTIONS), "the kill came too late"

            # The load balancer sends r2's customers to r0; r0 and r1 take over r2's
            # conversations once its leases expire, and whichever answers, r0 shows it.
            for tab in doomed:
                tab.base = bases[0]
                await tab.connect(http)
            await wait_for(lambda: all(t.answers_seen() >= len(t.sent) for t in tabs),
                           timeout=240, step=0.2)
            procs[2] = await _start(configs[2], log)
            await wait_for(lambda: _healthy(http, bases[2]), timeout=240, step=0.3)
            await asyncio.sleep(LEASE_TTL_S)  # a duplicate would be sent by now

            for tab in tabs:
                assert tab.answers_seen() == len(tab.sent), tab.session
                # Every replica shows the same transcript: each question once, one answer
                # for each, in order.
                for base in bases:
                    ws = await http.ws_connect(f"{base}/ws?session={tab.session}")
                    hello = await ws.receive_json(timeout=30)
                    await ws.close()
                    said = [ln["text"] for ln in hello["transcript"] if ln["direction"] == "in"]
                    assert said == list(tab.sent.values())
                    answers = [ln for ln in hello["transcript"] if ln["direction"] == "out"]
                    assert len(answers) == len(tab.sent)

        rows = await asyncio.to_thread(_rows, url)
        inbound = [r for r in rows if r["direction"] == "in"]
        assert len(inbound) == len(tabs) * len(QUESTIONS) + 1  # and the two-tab customer's
        assert {r["status"] for r in inbound} == {"answered"}
        sent = [r for r in rows if r["direction"] == "out" and r["status"] == "sent"]
        per_message = {r["id"]: [o for o in sent if o["reply_to"] == r["id"]] for r in inbound}
        assert all(len(v) == 1 for v in per_message.values()), per_message
        for convo in {r["conversation_id"] for r in inbound}:
            order = [o["reply_to"] for o in sent if o["conversation_id"] == convo]
            assert order == sorted(order), "answers out of order"
        text = log.read_text(encoding="utf-8")
        assert "recovered" in text  # the survivors swept r2's conversations up
    finally:
        for proc in procs:
            await stop(proc)
