"""Load bench: many Telegram users at once, through the real adapter and a fake Bot API.

Every user sends a burst of messages; the bench waits until each has its final reply and
prints throughput, reply latency (from the update being queued at the fake Telegram to
the reply's final text being there) and the counts that must be 0: replies lost,
duplicated, or out of order within a chat.

Everything between the fake and the store is the real thing: PTB's long polling through
``AIORateLimiter``, the adapter's streaming (a message sent, then edited), the pipeline
with SQLite and, unless ``--sentiment neutral``, the MiniLM sentiment model. The
generator is the one deliberate stand-in: ``--generator echo`` (default) streams a fixed,
deterministic reply word by word, because the embedded model takes seconds per reply on
a CPU; ``--generator model`` uses the real one (only sensible for small runs). The fake
server and the customers run in a child process, with their own event loop and clock.

    .venv/bin/python bench/telegram_load.py                  # 1000 users x 10 messages
    .venv/bin/python bench/telegram_load.py --users 50 --messages 4 --generator model
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import multiprocessing
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from adapters.telegram import TelegramAdapter  # noqa: E402
from core.config import Settings, parse_settings  # noqa: E402
from core.pipeline import Pipeline  # noqa: E402
from core.store import SQLiteStore  # noqa: E402
from tests.fakes.chat_driver import NeutralClassifier, ScriptedGenerator  # noqa: E402
from tests.fakes.telegram_api import FakeTelegram  # noqa: E402

FIRST_USER = 10_000_000


TOPICS = (
    "Where can I see the delivery status of my parcel",
    "How long does a refund take to reach my card",
    "Can I change the shipping address after ordering",
    "Which payment methods do you accept at checkout",
    "How do I reset the password for my account",
    "Do you ship to Canada and how much does it cost",
    "Can I return shoes that I already wore outside once",
    "Is there a discount for students or teachers",
    "How do I cancel the subscription before it renews",
    "What size should I pick if I am between two sizes",
)


def question(user: int, index: int) -> str:
    """A distinct, neutral question (the core escalates customers who repeat themselves)."""
    return f"{TOPICS[index % len(TOPICS)]}? (ref {user}-{index})"


def answer(text: str) -> str:
    return f"Thanks for asking. Here is the reply to: {text}"


def echo_generator(token_delay_s: float) -> ScriptedGenerator:
    """Deterministic generator for load runs: answers the newest question word by word."""
    return ScriptedGenerator(answer, delay_s=token_delay_s)


@dataclass(frozen=True, slots=True)
class LoadResult:
    users: int
    messages: int
    replies: int
    lost: int
    duplicated: int
    out_of_order: int
    flood_notices: int
    seconds: float
    throughput: float
    p50_ms: float
    p99_ms: float
    requests: int

    def report(self) -> str:
        return "\n".join([
            f"users x messages     {self.users} x {self.messages} = {self.users * self.messages}",
            f"final replies        {self.replies}",
            f"wall time            {self.seconds:.1f} s",
            f"throughput           {self.throughput:.1f} replies/s",
            f"reply latency p50    {self.p50_ms:.0f} ms",
            f"reply latency p99    {self.p99_ms:.0f} ms",
            f"Bot API requests     {self.requests}",
            f"flood notices        {self.flood_notices} (not replies; one per bursting user)",
            f"lost                 {self.lost}",
            f"duplicated           {self.duplicated}",
            f"out of order         {self.out_of_order}",
        ])

    @property
    def clean(self) -> bool:
        return self.lost == self.duplicated == self.out_of_order == 0


def bench_settings(base_url: str, base_file_url: str, folder: Path, *,
                   edit_interval_s: float, overall_max_rate: float) -> Settings:
    return parse_settings({
        "service": {"data_dir": str(REPO / "data")},
        "store": {"path": str(folder / "load.db")},
        "recommender": {"enabled": False},
        # Ten topics cycle, so long runs repeat themselves; that must not escalate here.
        "escalation": {"repeat_limit": 1_000_000},
        "telegram": {
            "enabled": True, "base_url": base_url, "base_file_url": base_file_url,
            "edit_interval_s": edit_interval_s, "overall_max_rate": overall_max_rate,
            "group_max_rate": 0,
        },
    }, "load bench settings")


async def build_models(settings: Settings, generator: str, sentiment: str,
                       token_delay_s: float) -> tuple[Any, Any]:
    if generator == "model":
        from bots.service import build_generator

        gen: Any = await build_generator(settings)
    else:
        gen = echo_generator(token_delay_s)
    if sentiment == "model":
        from core.sentiment import build_classifier

        s = settings.sentiment
        classifier: Any = build_classifier(
            s.encoder, s.head, s.model, s.max_batch, s.max_wait_ms, quantize=s.quantize,
            runtime=s.runtime, threads=s.threads,
        )
    else:
        classifier = NeutralClassifier()
    await gen.start()
    await classifier.start()
    return gen, classifier


async def run_load(users: int = 1000, messages: int = 10, *, generator: str = "echo",
                   sentiment: str = "model", edit_interval_s: float = 0.2,
                   overall_max_rate: float = 0.0, gap_ms: float = 20.0,
                   token_delay_ms: float = 5.0, seed: int = 7, stall_s: float = 60.0,
                   models: tuple[Any, Any] | None = None) -> LoadResult:
    """Run one load; ``models`` (generator, classifier) may be passed in already started.

    The fake Telegram and the customers run in a child process, as Telegram and its users
    are elsewhere: the bot's event loop and CPU time are its own, and the latencies are
    measured on one clock, the fake's.
    """
    ctx = multiprocessing.get_context("spawn")
    to_bot, to_fake = ctx.Queue(), ctx.Queue()
    child = ctx.Process(
        target=_fake_process,
        args=(users, messages, seed, gap_ms / 1000, stall_s, to_bot, to_fake),
        name="fake-telegram", daemon=True,
    )
    child.start()
    try:
        base_url, base_file_url, token = await asyncio.to_thread(to_bot.get, True, 120)
        with tempfile.TemporaryDirectory(prefix="telegram-load-") as tmp:
            settings = bench_settings(
                base_url, base_file_url, Path(tmp), edit_interval_s=edit_interval_s,
                overall_max_rate=overall_max_rate)
            own = models is None
            gen, classifier = models or await build_models(
                settings, generator, sentiment, token_delay_ms / 1000)
            store = SQLiteStore(settings.store.path)
            await store.open()
            pipeline = Pipeline(settings, store, classifier, gen)
            adapter = TelegramAdapter(settings.telegram, token)
            await adapter.start(pipeline)
            try:
                to_fake.put("go")
                result: LoadResult = await asyncio.to_thread(to_bot.get)
            finally:
                await adapter.stop()
                await pipeline.close(1.0)
                await store.close()
                if own:
                    await gen.close()
                    await classifier.close()
        to_fake.put("stop")
        await asyncio.to_thread(child.join, 30)
        return result
    finally:
        if child.is_alive():
            child.kill()


def _fake_process(users: int, messages: int, seed: int, gap_s: float, stall_s: float,
                  to_bot: Any, to_fake: Any) -> None:
    """Child process: the fake Bot API and the customers; reports a :class:`LoadResult`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s fake %(name)s: %(message)s")

    async def serve() -> None:
        async with FakeTelegram() as fake:
            to_bot.put((fake.base_url, fake.base_file_url, fake.token))
            await asyncio.to_thread(to_fake.get)
            result = await _drive(fake, users, messages, random.Random(seed), gap_s, stall_s)
            to_bot.put(result)
            await asyncio.to_thread(to_fake.get)

    asyncio.run(serve())


async def _drive(fake: FakeTelegram, users: int, messages: int, rng: random.Random,
                 gap_s: float, stall_s: float) -> LoadResult:
    loop = asyncio.get_running_loop()
    people = [fake.user(FIRST_USER + n, f"Customer {n}") for n in range(users)]
    pushed: dict[tuple[int, int], float] = {}
    expected = {
        answer(question(p.id, i)): (p.id, i) for p in people for i in range(messages)
    }

    async def customer(person: Any) -> None:
        await asyncio.sleep(rng.random() * 0.5)
        for index in range(messages):
            fake.send_text(person.id, person, question(person.id, index))
            pushed[(person.id, index)] = loop.time()
            await asyncio.sleep(gap_s * (0.5 + rng.random()))

    started = loop.time()
    senders = [asyncio.create_task(customer(p)) for p in people]
    done_at: dict[tuple[int, int], float] = {}
    scanned = 0
    last_progress = loop.time()
    total = users * messages
    next_report = loop.time() + 10
    while len(done_at) < total and loop.time() - last_progress < stall_s:
        await asyncio.sleep(0.25)
        if loop.time() >= next_report:
            print(f"  {len(done_at)}/{total} replies after {loop.time() - started:.0f} s",
                  file=sys.stderr, flush=True)
            next_report += 10
        calls = fake.calls
        for call in calls[scanned:]:
            if call.ok and call.method in ("sendMessage", "editMessageText"):
                key = expected.get(call.result.get("text", ""))
                if key is not None and key not in done_at:
                    done_at[key] = call.at
                    last_progress = loop.time()
        scanned = len(calls)
    await asyncio.gather(*senders)
    await asyncio.sleep(0.5)  # let anything late (a duplicate) land before counting
    elapsed = max(done_at.values(), default=loop.time()) - started

    lost = duplicated = out_of_order = notices = 0
    for person in people:
        order = []
        for message in fake.bot_messages(person.id):
            key = expected.get(message.text)
            if key is None:
                notices += "faster than I can answer" in message.text
                continue
            order.append(key[1])
        duplicated += len(order) - len(set(order))
        lost += messages - len(set(order))
        out_of_order += sum(1 for a, b in itertools.pairwise(order) if b <= a)
    latencies = sorted((done_at[k] - pushed[k]) * 1000 for k in done_at)
    p99_index = min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))
    return LoadResult(
        users=users, messages=messages, replies=len(done_at), lost=lost,
        duplicated=duplicated, out_of_order=out_of_order, flood_notices=notices,
        seconds=elapsed, throughput=len(done_at) / elapsed if elapsed > 0 else 0.0,
        p50_ms=statistics.median(latencies) if latencies else 0.0,
        p99_ms=latencies[p99_index] if latencies else 0.0, requests=len(fake.calls),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--generator", choices=("echo", "model"), default="echo",
                        help="echo: deterministic stand-in (default); model: the real SmolLM2")
    parser.add_argument("--sentiment", choices=("model", "neutral"), default="model")
    parser.add_argument("--edit-interval", type=float, default=0.2,
                        help="telegram.edit_interval_s: per-chat spacing of sends and edits")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="telegram.overall_max_rate (requests/s; 0 = no limiter)")
    parser.add_argument("--gap-ms", type=float, default=20.0,
                        help="mean pause between one user's messages")
    parser.add_argument("--token-delay-ms", type=float, default=5.0,
                        help="echo generator: pause before each word")
    args = parser.parse_args(argv)
    if args.users <= 0 or args.messages <= 0:
        parser.error("--users and --messages must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"telegram load: {args.users} users x {args.messages} messages, generator="
          f"{args.generator}, sentiment={args.sentiment}, edit interval {args.edit_interval}s, "
          f"rate limit {args.rate or 'off'}", flush=True)
    result = asyncio.run(run_load(
        args.users, args.messages, generator=args.generator, sentiment=args.sentiment,
        edit_interval_s=args.edit_interval, overall_max_rate=args.rate, gap_ms=args.gap_ms,
        token_delay_ms=args.token_delay_ms,
    ))
    print(result.report())
    return 0 if result.clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
