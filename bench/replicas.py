"""Replicas bench: the same web-chat load on 1 and on N replicas of ``supportbot run``
sharing one PostgreSQL database, with one replica ``kill -9``ed mid-run and restarted.

Each replica is a real subprocess with the real models (sentiment, acts, retrieval); the
answers are the help centre's own sentences (``[answers] mode = "extract"``), because the
embedded generator cannot write 10,000 answers on a CPU in useful time. Customers are web
tabs on 127.0.0.1, spread over the replicas as a load balancer would; each sends its
messages one after another, each after the previous answer, ``--concurrency`` customers at
a time. When a replica dies its customers reconnect to the first replica and send again
what was not acknowledged. Lost, duplicated and out-of-order answers are counted from the
database and must all be 0.

    .venv/bin/python -m bench.replicas                      # 1000 x 10, 1 and 3 replicas
    .venv/bin/python -m bench.replicas --conversations 100 --messages 4

Needs the PostgreSQL server binaries (Debian package ``postgresql``): the bench starts a
throwaway cluster of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from psycopg.rows import dict_row

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.postgres_cluster import Cluster, ClusterError, start_cluster  # noqa: E402
from tests.test_kill9 import stop  # noqa: E402

RESYNC_S = 15.0
QUESTIONS = (
    "Do you ship to Canada?",
    "How long does delivery take?",
    "Can I pay with a gift card?",
    "Where can I see my order status?",
    "How do I return an item?",
    "What payment methods do you accept?",
    "How do I leave a review?",
    "How do I unsubscribe from the newsletter?",
    "How do I change my shipping address?",
    "How do I reset my password?",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Progress:
    """Answers seen so far; ``reached`` is set once ``target`` of them came."""

    target: float
    count: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def answered(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()


@dataclass
class Customer:
    """One web tab: sends its messages in turn, each after the previous answer; after its
    replica dies, reconnects elsewhere and sends again what was not acknowledged."""

    session: str
    base: str
    total: int
    sent: list[str] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)
    answers: int = 0
    latencies: list[float] = field(default_factory=list)
    resyncs: int = 0
    """Reconnects after waiting ``RESYNC_S`` for an answer the transcript then held."""
    waits: list[str] = field(default_factory=list)
    """What each re-sync waited for: message, replica, wall-clock time."""

    async def run(self, http: aiohttp.ClientSession, fallback: str, deadline: float,
                  progress: Progress) -> None:
        asked_at = 0.0
        while self.answers < self.total and time.monotonic() < deadline:
            try:
                async with http.ws_connect(f"{self.base}/ws?session={self.session}") as ws:
                    hello = await ws.receive_json(timeout=60)
                    self.answers = sum(ln["direction"] == "out" for ln in hello["transcript"])
                    seen = [f"hello@{time.strftime('%H:%M:%S')}:{self.answers}"]
                    for client_id in self.sent:
                        if client_id not in self.acked:
                            await ws.send_json({"type": "message", "id": client_id,
                                                "text": _text(client_id)})
                    while self.answers < self.total:
                        if len(self.sent) <= self.answers:
                            client_id = f"m{len(self.sent)}"
                            self.sent.append(client_id)
                            asked_at = time.monotonic()
                            await ws.send_json({"type": "message", "id": client_id,
                                                "text": _text(client_id)})
                        try:
                            frame = await ws.receive_json(timeout=max(
                                0.1, min(RESYNC_S, deadline - time.monotonic())))
                        except TimeoutError:
                            # Reconnect and read the transcript again (the page does so
                            # only when its socket drops): counted, as a miss.
                            self.resyncs += 1
                            self.waits.append(f"{self.sent[-1]} on {self.base} at "
                                              f"{time.strftime('%H:%M:%S')}, saw {seen}")
                            break
                        seen.append(f"{frame['type']}@{time.strftime('%H:%M:%S')}")
                        if frame["type"] == "ack":
                            self.acked.add(frame["id"])
                        elif frame["type"] in ("reply", "message"):
                            self.answers += 1
                            self.latencies.append(time.monotonic() - asked_at)
                            progress.answered()
                    else:
                        return
            except (aiohttp.ClientError, TypeError, TimeoutError, ConnectionError) as exc:
                print(f"{self.session}: {exc!r}", file=sys.stderr)
                self.base = fallback  # the replica died: the load balancer moves the tab
                await asyncio.sleep(0.5)


def _text(client_id: str) -> str:
    return QUESTIONS[int(client_id[1:]) % len(QUESTIONS)]


def _config(folder: Path, name: str, url: str, port: int) -> Path:
    data_dir = Path(os.environ.get("SUPPORTBOT_TEST_DATA_DIR", REPO / "data"))
    config = folder / f"{name}.toml"
    config.write_text(
        f'[service]\ndata_dir = "{data_dir}"\nlog_level = "INFO"\nreplica_id = "{name}"\n'
        "lease_ttl_s = 5.0\nsweep_interval_s = 0.5\n"
        f'[store]\nurl = "{url}"\n[web]\nport = {port}\n'
        '[answers]\nmode = "extract"\n[recommender]\nenabled = false\n',
        encoding="utf-8",
    )
    return config


async def _start(config: Path, log: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "SUPPORTBOT_OPERATOR_TOKEN": "bench-token"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bots.cli", "run", "--config", str(config),
        cwd=REPO, env=env, stdout=log.open("ab"), stderr=asyncio.subprocess.STDOUT,
    )


async def _healthy(http: aiohttp.ClientSession, base: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with http.get(f"{base}/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.3)
    raise SystemExit(f"replica at {base} did not start")


def _audit(url: str) -> dict[str, int]:
    """Lost: an accepted message with no sent answer; duplicated: one with more than one;
    out of order: a conversation whose answers do not follow its messages."""
    with psycopg.connect(url, row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT id, conversation_id, direction, status, reply_to FROM messages ORDER BY id"
        ).fetchall()
    inbound = [r for r in rows if r["direction"] == "in"]
    sent = [r for r in rows if r["direction"] == "out" and r["status"] == "sent"]
    replies: dict[int, int] = {}
    for r in sent:
        replies[r["reply_to"]] = replies.get(r["reply_to"], 0) + 1
    order: dict[int, list[int]] = {}
    for r in sent:
        order.setdefault(r["conversation_id"], []).append(r["reply_to"])
    return {
        "accepted": len(inbound),
        "lost": sum(1 for r in inbound if replies.get(r["id"], 0) == 0),
        "duplicated": sum(1 for r in inbound if replies.get(r["id"], 0) > 1),
        "out_of_order": sum(1 for v in order.values() if v != sorted(v)),
    }


def _session_rows(url: str, session: str) -> list[tuple[Any, ...]]:
    """One web session's messages, for a re-synced tab's report."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT m.id, m.direction, m.sender, m.status, m.created_at, m.reply_to, "
            "m.platform_message_id FROM messages m JOIN conversations c "
            "ON c.id = m.conversation_id WHERE c.conversation_key = %s ORDER BY m.id",
            [session]).fetchall()


async def run_once(cluster: Cluster, replicas: int, args: argparse.Namespace,
                   folder: Path) -> dict[str, Any]:
    url = cluster.create_database()
    ports = [_free_port() for _ in range(replicas)]
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    configs = [_config(folder, f"{replicas}r{i}", url, ports[i]) for i in range(replicas)]
    log = folder / f"replicas-{replicas}.log"
    procs = [await _start(c, log) for c in configs]
    killed = False
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
            for base in bases:
                await _healthy(http, base)
            customers = [Customer(f"bench-customer-{i:05d}", bases[i % replicas], args.messages)
                         for i in range(args.conversations)]
            gate = asyncio.Semaphore(args.concurrency)
            deadline = time.monotonic() + args.timeout_s
            total = args.conversations * args.messages
            progress = Progress(total * args.kill_at)

            async def chat(customer: Customer) -> None:
                async with gate:
                    await customer.run(http, bases[0], deadline, progress)

            started = time.monotonic()
            tasks = [asyncio.create_task(chat(c)) for c in customers]
            if replicas > 1 and args.kill:
                await progress.reached.wait()
                procs[-1].send_signal(signal.SIGKILL)
                await procs[-1].wait()
                killed = True
                await asyncio.sleep(args.restart_after_s)
                procs[-1] = await _start(configs[-1], log)
            await asyncio.gather(*tasks)
            wall = time.monotonic() - started
        # The customer can have an answer a moment before the replica records it as sent.
        for _ in range(40):
            audit = await asyncio.to_thread(_audit, url)
            if not (audit["lost"] or audit["duplicated"]):
                break
            await asyncio.sleep(0.25)
        for customer in customers:
            if customer.waits:
                print(f"{customer.session} re-synced: {'; '.join(customer.waits)}",
                      file=sys.stderr)
                for row in await asyncio.to_thread(_session_rows, url, customer.session):
                    print(f"  {row}", file=sys.stderr)
        latencies = sorted(x for c in customers for x in c.latencies)
        answered = sum(c.answers for c in customers)
        return {
            "replicas": replicas, "killed": killed, "messages": answered, "wall_s": wall,
            "per_s": answered / wall, "p50": statistics.median(latencies) if latencies else 0,
            "p99": latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0,
            "unanswered_in_tabs": total - answered,
            "resyncs": sum(c.resyncs for c in customers), **audit,
        }
    finally:
        for proc in procs:
            await stop(proc)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=10,
                        help=f"at most {len(QUESTIONS)}: one more would repeat a question, "
                        "which the service rightly hands to a person")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--concurrency", type=int, default=100,
                        help="customers chatting at the same time")
    parser.add_argument("--kill", action=argparse.BooleanOptionalAction, default=True,
                        help="kill -9 the last replica mid-run (runs with 2+ replicas)")
    parser.add_argument("--kill-at", type=float, default=0.3, help="share answered first")
    parser.add_argument("--restart-after-s", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=3600.0,
                        help="customers give up waiting for answers after this")
    parser.add_argument("--logs", default="", help="keep the replicas' logs in this folder")
    args = parser.parse_args(argv)
    try:
        cluster = start_cluster()
    except ClusterError as exc:
        print(f"bench.replicas: {exc}", file=sys.stderr)
        return 2
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
            folder = Path(args.logs or tmp)
            await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
            for n in args.replicas:
                result = await run_once(cluster, n, args, folder)
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        cluster.cleanup()
    base = results[0]["per_s"]
    print("\n| replicas | killed -9 | answers | wall s | answers/s | vs first | p50 s | p99 s "
          "| lost | duplicated | out of order | re-synced tabs |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['replicas']} | {'yes' if r['killed'] else 'no'} | {r['messages']} | "
              f"{r['wall_s']:.1f} | {r['per_s']:.1f} | {r['per_s'] / base:.2f}x | "
              f"{r['p50']:.2f} | {r['p99']:.2f} | {r['lost']} | {r['duplicated']} | "
              f"{r['out_of_order']} | {r['resyncs']} |")
    bad = any(r["lost"] or r["duplicated"] or r["out_of_order"] or r["unanswered_in_tabs"]
              for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
