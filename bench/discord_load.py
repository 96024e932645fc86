"""Load bench: many Discord users, each writing several DMs, through the fake gateway.

The real discord.py client, the real adapter, the real pipeline and SQLite store run
against the fake Discord (``tests/fakes/discord_api.py``) over 127.0.0.1, in one process
and one event loop (the fake's own work is included in the figures). Every reply is
matched to its question: lost, duplicated and out-of-order replies must all be 0.

The text generator is replaced by a deterministic one (``--generator echo``, the only
choice): it streams ``"Answer to <question>."`` in a few pieces, because the embedded model
cannot answer 10,000 messages on a CPU in useful time. The sentiment model is replaced by a
fixed neutral score by default (``--classifier constant``), so the figures are those of the
Discord path (gateway, adapter, pipeline, SQLite, REST); ``--classifier model`` adds the
real MiniLM scoring of every message. A reply not seen within ``--timeout-s`` after the
last message was sent counts as lost.

    .venv/bin/python -m bench.discord_load               # 1000 users x 10 messages
    .venv/bin/python -m bench.discord_load --users 50 --messages 4 --drops 1

``--drops N`` kills the gateway connection N times during the run; discord.py RESUMEs and
the fake replays what was missed, which must not lose or repeat a reply.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from adapters.discord import DiscordAdapter  # noqa: E402
from core.config import parse_settings  # noqa: E402
from core.pipeline import Pipeline  # noqa: E402
from core.sentiment import build_classifier  # noqa: E402
from core.store import SQLiteStore  # noqa: E402
from tests.fakes.chat_driver import NeutralClassifier, ScriptedGenerator  # noqa: E402
from tests.fakes.discord_api import FakeDiscord, Json  # noqa: E402
from tests.fakes.discord_driver import DmCustomer  # noqa: E402

QUESTIONS = (
    "Where is my parcel right now",
    "Can I change the delivery address",
    "How long does a refund take",
    "Do you ship to Norway",
    "Which payment cards do you accept",
    "My discount code is not working",
    "How do I reset my account password",
    "Is the blue jacket back in stock",
    "Can I return an opened item",
    "What are your opening hours on Sunday",
)


def question(u: int, i: int) -> str:
    """Distinct questions per user (the pipeline escalates a customer who repeats himself)."""
    return f"{QUESTIONS[i % len(QUESTIONS)]}? (ref {u}-{i})"


def answer(question: str) -> str:
    return f"Answer to {question}."


@dataclass
class Tally:
    """What the fake saw the bot write, keyed by (user index, message index)."""

    expected: dict[str, tuple[int, int]] = field(default_factory=dict)
    sent_at: dict[tuple[int, int], float] = field(default_factory=dict)
    final_at: dict[tuple[int, int], float] = field(default_factory=dict)
    final_ids: dict[tuple[int, int], set[str]] = field(default_factory=lambda: defaultdict(set))
    edits: int = 0
    creates: int = 0
    all_answered: asyncio.Event = field(default_factory=asyncio.Event)

    def observe(self, kind: str, message: Json) -> None:
        if kind == "create":
            self.creates += 1
        else:
            self.edits += 1
        key = self.expected.get(message["content"])
        if key is None:
            return
        self.final_ids[key].add(message["id"])
        self.final_at.setdefault(key, time.perf_counter())
        if len(self.final_at) == len(self.expected):
            self.all_answered.set()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    fake = await FakeDiscord(bucket_limit=args.bucket_limit).start()
    fake.record_calls = False
    tally = Tally()
    fake.listeners.append(tally.observe)
    customers = [DmCustomer.new(fake, f"user{u}") for u in range(args.users)]
    work = Path(tempfile.mkdtemp(prefix="discord-bench-"))
    settings = parse_settings({
        "service": {"data_dir": str(work)},
        "store": {"path": str(work / "bench.db")},
        "recommender": {"enabled": False},
        "discord": {"enabled": True, "api_base": fake.api_base, "gateway_url": fake.gateway_url,
                    "edit_interval_s": args.edit_interval, "guild_ready_timeout_s": 0.05},
    }, "bench settings")
    store = SQLiteStore(settings.store.path)
    await store.open()
    if args.classifier == "model":
        s = settings.sentiment
        classifier: Any = build_classifier(
            s.encoder, s.head, s.model, s.max_batch, s.max_wait_ms, quantize=s.quantize,
            runtime=s.runtime, threads=s.threads,
        )
    else:
        classifier = NeutralClassifier()
    await classifier.start()
    generator = ScriptedGenerator(answer, delay_s=args.token_delay_ms / 1000, pieces=args.pieces)
    pipeline = Pipeline(settings, store, classifier, generator)
    adapter = DiscordAdapter(settings.discord, fake.token)
    await adapter.start(pipeline)

    for u in range(args.users):
        for i in range(args.messages):
            tally.expected[answer(question(u, i))] = (u, i)
    total = args.users * args.messages

    async def customer(u: int) -> None:
        await asyncio.sleep(args.ramp_s * u / args.users)
        for i in range(args.messages):
            tally.sent_at[(u, i)] = time.perf_counter()
            await customers[u].say(question(u, i))
            await asyncio.sleep(args.gap_ms / 1000)

    async def dropper() -> None:
        for _ in range(args.drops):
            await asyncio.sleep(args.ramp_s / (args.drops + 1))
            await fake.drop()

    started = time.perf_counter()
    await asyncio.gather(*(customer(u) for u in range(args.users)), dropper())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tally.all_answered.wait(), args.timeout_s)
    finished = max(tally.final_at.values(), default=time.perf_counter())
    await asyncio.sleep(args.settle_s)  # late duplicates would show up here

    [tickets] = await store.query("SELECT COUNT(*) AS n FROM tickets")
    await pipeline.close(5.0)
    await adapter.stop()
    await classifier.close()
    await store.close()
    await fake.close()

    latencies = [(tally.final_at[k] - tally.sent_at[k]) * 1000 for k in tally.final_at]
    lost = total - len(tally.final_at)
    duplicated = sum(len(ids) - 1 for ids in tally.final_ids.values())
    per_user: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (u, i), ids in tally.final_ids.items():
        per_user[u].extend((int(mid), i) for mid in ids)
    out_of_order = 0
    for replies in per_user.values():
        order = [i for _, i in sorted(replies)]  # snowflakes sort by creation time
        out_of_order += sum(1 for a, b in itertools.pairwise(order) if b < a)
    elapsed = finished - started
    return {
        "users": args.users,
        "messages_per_user": args.messages,
        "messages": total,
        "replies": len(tally.final_at),
        "elapsed_s": round(elapsed, 2),
        "throughput_msg_per_s": round(len(tally.final_at) / elapsed, 1) if elapsed else 0.0,
        "latency_ms_p50": round(percentile(latencies, 0.50), 1),
        "latency_ms_p99": round(percentile(latencies, 0.99), 1),
        "latency_ms_mean": round(statistics.fmean(latencies), 1) if latencies else None,
        "lost": lost,
        "duplicated": duplicated,
        "out_of_order": out_of_order,
        "escalated_conversations": tickets["n"],  # answered by people, not the bot
        "bot_messages_created": tally.creates,
        "bot_message_edits": tally.edits,
        "gateway_resumes": fake.resume_count,
        "gateway_identifies": fake.identify_count,
        "rest_429s": sum(1 for c in fake.calls if c.status == 429),
        "generator": args.generator,
        "classifier": args.classifier,
        "edit_interval_s": args.edit_interval,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=10, help="messages per user")
    parser.add_argument("--generator", choices=["echo"], default="echo",
                        help="echo: deterministic streamed answer (the model is not benched)")
    parser.add_argument("--classifier", choices=["model", "constant"], default="constant",
                        help="constant: fixed neutral score; model: the real sentiment model")
    parser.add_argument("--pieces", type=int, default=4, help="pieces per streamed answer")
    parser.add_argument("--token-delay-ms", type=float, default=20.0)
    parser.add_argument("--edit-interval", type=float, default=1.0)
    parser.add_argument("--gap-ms", type=float, default=1000.0,
                        help="pause between one user's messages (not waiting for replies)")
    parser.add_argument("--ramp-s", type=float, default=60.0, help="users start over this time")
    parser.add_argument("--drops", type=int, default=2, help="gateway drops during the run")
    parser.add_argument("--bucket-limit", type=int, default=50,
                        help="fake REST rate limit per route and channel, per second")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.users < 1 or args.messages < 1:
        parser.error("--users and --messages must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("discord").setLevel(logging.ERROR)
    result = asyncio.run(run(args))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    ok = result["lost"] == result["duplicated"] == result["out_of_order"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
