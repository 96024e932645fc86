"""Load and soak test of the running service, driven through the web adapter.

Starts ``supportbot run`` as its own process (real SQLite, real MiniLM sentiment), opens
one WebSocket per conversation as the browser page does, and sends each conversation's
messages one after another (the next when the previous is answered). Prints throughput,
reply latency p50/p99, the service's memory (RSS) at start and end, and the replies lost,
duplicated or out of order, read both from what the customers saw and from the database.

Generators:

* ``--generator canned`` (default): the vLLM backend streaming over HTTP from a canned
  OpenAI-compatible server in this process. Its replies quote the customer's message, so
  a reply that reaches the wrong conversation or comes out of order is caught. **No model
  runs**: this measures the service, not generation.
* ``--generator embedded``: the real SmolLM2 in the service (about 16 tokens/s on two
  CPU cores, so keep runs small: ``--conversations 20 --messages 3``).

A baseline is measured in the same run first: one conversation alone, so the report can
say what concurrency costs each customer. ``--soak SECONDS`` then keeps the same load
running (new conversations replacing finished ones) and samples the service's RSS, to
show whether memory grows::

    python bench/load.py --conversations 1000 --messages 10
    python bench/load.py --conversations 100 --messages 5 --soak 600
    python bench/load.py --generator embedded --conversations 10 --messages 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
CANNED_MODEL = "canned"
QUESTIONS = (
    "Do you ship to Canada?",
    "How long does standard delivery take?",
    "Can I pay with a gift card?",
    "Where can I see the status of my order?",
    "How do I change my delivery address?",
    "What is your return policy for shoes?",
    "Can I get an invoice for my company?",
    "Do you have a store in Berlin?",
    "How do I reset my password?",
    "Is there a student discount?",
    "Can I cancel a subscription online?",
    "Which payment methods do you accept?",
)


# -- the canned model server -------------------------------------------------------------


class CannedModelServer:
    """OpenAI-compatible (the subset the vLLM backend uses): ``/health``, ``/v1/models``
    and streamed ``/v1/chat/completions`` whose reply quotes the last user message."""

    __slots__ = ("_runner", "delay_s", "port", "requests")

    def __init__(self, delay_s: float = 0.002) -> None:
        self.delay_s = delay_s
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": CANNED_MODEL, "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.json()
        last = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        words = f"Thanks for asking: {last[:80]} Let me check that for you.".split(" ")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        def event(content: str, finish: str | None = None) -> bytes:
            chunk = {"object": "chat.completion.chunk", "model": CANNED_MODEL, "choices": [
                {"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        for i, word in enumerate(words):
            await resp.write(event(word if i == 0 else " " + word))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        await resp.write(event("", "stop"))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


# -- the service under test --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass(slots=True)
class ServiceProcess:
    config: Path
    log: Path
    port: int
    proc: asyncio.subprocess.Process | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 300.0) -> None:
        env = {**os.environ, "SUPPORTBOT_OPERATOR_TOKEN": "load-test"}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bots.cli", "run", "--config", str(self.config), cwd=REPO,
            env=env, stdout=self.log.open("ab"), stderr=asyncio.subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"the service exited at start; see {self.log}")
                try:
                    async with http.get(f"{self.base}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.3)
        raise RuntimeError(f"the service did not start within {timeout_s:.0f} s; see {self.log}")

    def rss_mb(self) -> float:
        assert self.proc is not None
        return rss_mb(self.proc.pid)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def write_config(folder: Path, port: int, generator: str, base_url: str, *,
                 max_new_tokens: int, grounding: bool) -> Path:
    data_dir = os.environ.get("SUPPORTBOT_TEST_DATA_DIR", str(REPO / "data"))
    gen = (f'backend = "vllm"\nbase_url = "{base_url}"\nmodel = "{CANNED_MODEL}"\n'
           if generator == "canned" else "temperature = 0.0\n")
    config = folder / "config.toml"
    config.write_text(
        f'[service]\ndata_dir = "{data_dir}"\nlog_level = "WARNING"\n'
        f'[store]\npath = "{folder / "load.db"}"\n'
        f"[web]\nport = {port}\n"
        f"[generator]\n{gen}max_new_tokens = {max_new_tokens}\ntimeout_s = 600.0\n"
        "first_token_timeout_s = 600.0\n"
        f"[grounding]\nenabled = {str(grounding).lower()}\n"
        f"[recommender]\nenabled = {str(grounding).lower()}\n"
        f'knowledge_dir = "{REPO / "knowledge"}"\n',
        encoding="utf-8",
    )
    return config


# -- customers ---------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    sent: int = 0
    answered: int = 0
    lost: int = 0
    late: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    handed_over: int = 0
    latencies: list[float] = field(default_factory=list)


class Customer:
    """One conversation: a WebSocket, its messages one after another."""

    __slots__ = ("_finals", "_reader", "_ws", "checks_content", "session", "timed_out")

    def __init__(self, session: str, checks_content: bool) -> None:
        self.session = session
        self.checks_content = checks_content
        self.timed_out = False  # gave up waiting: the one reply owed may still come, late
        self._finals: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def run(self, http: aiohttp.ClientSession, base: str, messages: int, offset: int,
                  tally: Tally, reply_timeout_s: float) -> None:
        self._ws = await http.ws_connect(f"{base}/ws?session={self.session}", heartbeat=None)
        hello = await self._ws.receive_json(timeout=60)
        assert hello["type"] == "hello"
        self._reader = asyncio.create_task(self._read(self._ws))
        for i in range(messages):
            tag = f"[{self.session}:{i}]"
            text = f"{tag} {QUESTIONS[(offset + i) % len(QUESTIONS)]}"
            started = time.perf_counter()
            await self._ws.send_json({"type": "message", "id": f"m{i}", "text": text})
            tally.sent += 1
            try:
                frame = await asyncio.wait_for(self._finals.get(), reply_timeout_s)
            except TimeoutError:
                tally.lost += 1  # and the conversation gives up, as a customer would
                self.timed_out = True
                return
            tally.latencies.append(time.perf_counter() - started)
            tally.answered += 1
            if frame["type"] == "message":
                # Handed to a person (MiniLM read the message as angry twice): from here the
                # bot is silent, as it should be, so this customer stops.
                tally.handed_over += 1
                return
            if self.checks_content and tag not in frame["text"]:
                tally.out_of_order += 1

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                frame = json.loads(msg.data)
                if frame["type"] in ("reply", "message"):
                    self._finals.put_nowait(frame)

    async def close(self, tally: Tally) -> None:
        """Answers that came after the last one awaited: the reply given up on arrives
        late (not lost after all, and no duplicate); any other is a duplicate."""
        extra = self._finals.qsize()
        if self.timed_out and extra:
            tally.lost -= 1
            tally.late += 1
            extra -= 1
        tally.duplicated += extra
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()


@dataclass(frozen=True, slots=True)
class PhaseResult:
    name: str
    conversations: int
    messages: int
    answered: int
    lost: int
    late: int
    duplicated: int
    out_of_order: int
    handed_over: int
    seconds: float
    throughput: float
    p50_ms: float
    p99_ms: float


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


BUSY_GAUGES = ("supportbot_queue_depth", "supportbot_conversations_busy",
               "supportbot_store_backlog")


async def busy_gauges(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The service's own view of work in hand, from its /metrics."""
    async with http.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in BUSY_GAUGES:
            values[name] = float(value)
    return values


async def settle(http: aiohttp.ClientSession, base: str, timeout_s: float) -> None:
    """Wait until the service has nothing queued, running or owed to its database (its
    /metrics say so): any duplicate reply has been sent by then. Then a moment for the
    frames still on the wire."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        values = await busy_gauges(http, base)
        if len(values) == len(BUSY_GAUGES) and not any(values.values()):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)


async def run_phase(name: str, base: str, conversations: int, messages: int, *,
                    concurrency: int, checks_content: bool, reply_timeout_s: float,
                    grace_s: float, prefix: str) -> PhaseResult:
    """``grace_s``: the longest wait, after the last answer, for the service to settle."""
    tally = Tally()
    limit = asyncio.Semaphore(concurrency)
    customers = [Customer(f"{prefix}-{i:05d}", checks_content) for i in range(conversations)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def one(i: int, customer: Customer) -> None:
            async with limit:
                await customer.run(http, base, messages, i, tally, reply_timeout_s)

        started = time.perf_counter()
        await asyncio.gather(*(one(i, c) for i, c in enumerate(customers)))
        seconds = time.perf_counter() - started
        await settle(http, base, grace_s)  # a duplicate would have arrived by then
        for customer in customers:
            await customer.close(tally)
    return PhaseResult(
        name, conversations, tally.sent, tally.answered, tally.lost, tally.late,
        tally.duplicated,
        tally.out_of_order, tally.handed_over, seconds,
        tally.answered / seconds if seconds else 0.0,
        _percentile(tally.latencies, 0.5), _percentile(tally.latencies, 0.99),
    )


def audit_database(db: Path) -> dict[str, int]:
    """What the store says: inbound messages, and those not answered exactly once."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        inbound = conn.execute("SELECT count(*) FROM messages WHERE direction = 'in'").fetchone()
        # One pass grouped by reply_to: a correlated count per message was quadratic and
        # kept a 20-minute soak's report from printing.
        no_reply, twice = conn.execute(
            "WITH sent AS (SELECT reply_to, count(*) AS n FROM messages WHERE direction = "
            "'out' AND status = 'sent' AND reply_to IS NOT NULL GROUP BY reply_to) "
            "SELECT coalesce(sum(sent.n IS NULL), 0), coalesce(sum(sent.n > 1), 0) "
            "FROM messages m LEFT JOIN sent ON sent.reply_to = m.id WHERE m.direction = 'in'"
        ).fetchone()
        unanswered = conn.execute(
            "SELECT count(*) FROM messages WHERE direction = 'in' AND status NOT IN "
            "('answered', 'escalated')"
        ).fetchone()
    finally:
        conn.close()
    return {
        "inbound": int(inbound[0]),
        "db_unanswered": int(unanswered[0]),
        "db_no_reply": int(no_reply),
        "db_replied_twice": int(twice),
    }


@dataclass(slots=True)
class LoadReport:
    generator: str
    baseline: PhaseResult | None
    load: PhaseResult
    rss_start_mb: float
    rss_end_mb: float
    audit: dict[str, int]
    soak: list[tuple[float, float]] = field(default_factory=list)  # (seconds, RSS MB)
    soaked: PhaseResult | None = None  # the soak's own figures, apart from the load's

    def problems(self) -> int:
        phases = [p for p in (self.baseline, self.load, self.soaked) if p is not None]
        return (sum(p.lost + p.duplicated + p.out_of_order for p in phases)
                + self.audit["db_no_reply"] + self.audit["db_replied_twice"]
                + self.audit["db_unanswered"])


async def soak(base: str, service: ServiceProcess, seconds: float, concurrency: int,
               messages: int, sample_s: float, checks_content: bool,
               on_sample: Callable[[float, float, dict[str, float]], None],
               echo: Callable[[str], None] = print,
               ) -> tuple[list[tuple[float, float]], PhaseResult]:
    """Keep ``concurrency`` conversations busy for ``seconds``; sample RSS meanwhile."""
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    totals: list[PhaseResult] = []

    async def sampler() -> None:
        async with aiohttp.ClientSession() as http:
            while True:
                t = time.monotonic() - started
                rss = service.rss_mb()
                samples.append((t, rss))
                try:
                    gauges = await busy_gauges(http, base)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    gauges = {"metrics unreachable": 1.0}
                    echo(f"  soak t={t:6.0f} s  /metrics: {exc!r}")
                on_sample(t, rss, gauges)
                await asyncio.sleep(sample_s)

    task = asyncio.create_task(sampler())
    round_no = 0
    try:
        while time.monotonic() - started < seconds:
            totals.append(await run_phase(
                "soak", base, concurrency, messages, concurrency=concurrency,
                checks_content=checks_content, reply_timeout_s=120, grace_s=30.0,
                prefix=f"soak{round_no}",
            ))
            done = totals[-1]
            echo(f"  soak round {round_no}: {done.answered}/{done.messages} answered in "
                 f"{done.seconds:.1f} s, lost {done.lost}, dup {done.duplicated}, "
                 f"order {done.out_of_order}")
            round_no += 1
    finally:
        task.cancel()
    samples.append((time.monotonic() - started, service.rss_mb()))
    seconds_total = sum(p.seconds for p in totals)
    answered = sum(p.answered for p in totals)
    merged = PhaseResult(
        "soak", sum(p.conversations for p in totals), sum(p.messages for p in totals),
        answered, sum(p.lost for p in totals), sum(p.late for p in totals),
        sum(p.duplicated for p in totals),
        sum(p.out_of_order for p in totals), sum(p.handed_over for p in totals), seconds_total,
        answered / seconds_total if seconds_total else 0.0,
        statistics.median([p.p50_ms for p in totals]) if totals else float("nan"),
        max((p.p99_ms for p in totals), default=float("nan")),
    )
    return samples, merged


async def run_load(*, conversations: int, messages: int, generator: str = "canned",
                   concurrency: int | None = None, baseline_messages: int = 20,
                   max_new_tokens: int = 32, grounding: bool = False,
                   token_delay_ms: float = 2.0, reply_timeout_s: float = 300.0,
                   soak_s: float = 0.0, sample_s: float = 5.0,
                   workdir: Path | None = None, echo: Callable[[str], None] = print,
                   ) -> LoadReport:
    tmp = tempfile.TemporaryDirectory(prefix="supportbot-load-") if workdir is None else None
    folder = workdir or Path(tmp.name)  # type: ignore[union-attr]
    canned = CannedModelServer(token_delay_ms / 1000) if generator == "canned" else None
    base_url = await canned.start() if canned is not None else ""
    port = free_port()
    config = write_config(folder, port, generator, base_url,
                          max_new_tokens=max_new_tokens, grounding=grounding)
    service = ServiceProcess(config, folder / "service.log", port)
    checks = generator == "canned"
    try:
        await service.start()
        rss_start = service.rss_mb()
        echo(f"service up: RSS {rss_start:.0f} MB; generator: "
             + ("canned replies over HTTP (no model)" if checks else "SmolLM2 (embedded)"))
        baseline = None
        if baseline_messages:
            baseline = await run_phase(
                "baseline (1 conversation)", service.base, 1, baseline_messages,
                concurrency=1, checks_content=checks, reply_timeout_s=reply_timeout_s,
                grace_s=30.0, prefix="base",
            )
        load = await run_phase(
            "load", service.base, conversations, messages,
            concurrency=concurrency or conversations, checks_content=checks,
            reply_timeout_s=reply_timeout_s, grace_s=30.0, prefix="load",
        )
        samples: list[tuple[float, float]] = []
        soaked: PhaseResult | None = None
        if soak_s > 0:
            samples, soaked = await soak(
                service.base, service, soak_s, concurrency or min(conversations, 100),
                messages, sample_s, checks,
                lambda t, rss, gauges: echo(
                    f"  soak t={t:6.0f} s  RSS {rss:7.1f} MB  "
                    + " ".join(f"{k.removeprefix('supportbot_')}={v:g}"
                               for k, v in gauges.items())),
                echo,
            )
        rss_end = service.rss_mb()
    finally:
        await service.stop()
        if canned is not None:
            await canned.close()
    report = LoadReport(generator, baseline, load, rss_start, rss_end,
                        audit_database(folder / "load.db"), samples, soaked)
    if tmp is not None:
        tmp.cleanup()
    return report


def print_report(report: LoadReport) -> None:
    rows = [p for p in (report.baseline, report.load, report.soaked) if p is not None]
    print(f"\n{'phase':<28}{'convs':>7}{'msgs':>8}{'secs':>8}{'msg/s':>9}{'p50 ms':>10}"
          f"{'p99 ms':>10}{'lost':>6}{'late':>6}{'dup':>6}{'order':>7}")
    for p in rows:
        print(f"{p.name:<28}{p.conversations:>7}{p.messages:>8}{p.seconds:>8.1f}"
              f"{p.throughput:>9.2f}{p.p50_ms:>10.0f}{p.p99_ms:>10.0f}{p.lost:>6}{p.late:>6}"
              f"{p.duplicated:>6}{p.out_of_order:>7}")
    if report.baseline is not None and report.baseline.throughput:
        b, load = report.baseline, report.load
        print(f"vs one conversation alone: {load.throughput / b.throughput:.1f}x throughput, "
              f"p50 latency {load.p50_ms / b.p50_ms:.1f}x")
    handed = sum(p.handed_over for p in rows)
    if handed:
        print(f"conversations handed to a person (negative sentiment): {handed}; their "
              "customers stopped writing")
    print(f"service RSS: {report.rss_start_mb:.0f} MB at start, {report.rss_end_mb:.0f} MB "
          "at end")
    if report.soak:
        half = [rss for t, rss in report.soak if t >= report.soak[-1][0] / 2]
        print(f"soak: {len(report.soak)} samples over {report.soak[-1][0]:.0f} s; RSS first "
              f"{report.soak[0][1]:.0f} MB, max {max(r for _, r in report.soak):.0f} MB, last "
              f"{report.soak[-1][1]:.0f} MB; second half {min(half):.0f}-{max(half):.0f} MB")
    a = report.audit
    print(f"database: {a['inbound']} messages in, {a['db_no_reply']} without a sent reply, "
          f"{a['db_replied_twice']} answered twice, {a['db_unanswered']} not marked answered")
    print(f"problems (lost + duplicated + out of order + database): {report.problems()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=10, help="per conversation")
    parser.add_argument("--generator", choices=("canned", "embedded"), default="canned")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="conversations at once (default: all)")
    parser.add_argument("--baseline-messages", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--grounding", action="store_true",
                        help="answer from the knowledge base, with suggestions (slower)")
    parser.add_argument("--token-delay-ms", type=float, default=2.0,
                        help="canned server: pause between streamed words")
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = asyncio.run(run_load(
        conversations=args.conversations, messages=args.messages, generator=args.generator,
        concurrency=args.concurrency or None, baseline_messages=args.baseline_messages,
        max_new_tokens=args.max_new_tokens, grounding=args.grounding,
        token_delay_ms=args.token_delay_ms, soak_s=args.soak, sample_s=args.sample_s,
    ))
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
