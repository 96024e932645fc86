"""Pipeline bench: per-stage latency and throughput of the real core, in process.

1,000 customer messages from 100 conversations (10 each) go through the real
:class:`core.pipeline.Pipeline`: the real SQLite store in a temporary folder, the real
MiniLM sentiment classifier and, for the generation figures, the real embedded SmolLM2.
The customer side is a minimal in-process channel that records when each reply starts,
shows its first text and finishes. Every simulated customer waits for the answer to one
message before sending the next; conversations run concurrently.

Three passes, each on a fresh database:

1. **baseline** - all 1,000 messages, every conversation at once, with a stand-in
   generator that yields one fixed reply instantly. It measures everything except
   generation (store, sentiment, escalation, knowledge-base grounding and suggestions as
   configured, history and prompt with the real tokenizer, reply bookkeeping) and gives
   messages/s. ``--config`` with ``[grounding]``/``[recommender]`` disabled isolates them.
2. **sentiment** - the first ``--ratio-texts`` of those texts (default 200) through the
   classifier, micro-batched (submitted at once) and one at a time (one forward pass per
   text), alternating in four chunks so both see the same background load.
3. **generation** - the first ``--generate`` messages (default 50) with the real model,
   ``--max-new-tokens`` (default 32), ``--gen-concurrency`` conversations at a time
   (default 1, so the figures are the model's own latency, not queueing). A real reply
   takes seconds on two CPU cores, so 1,000 of them would take over an hour; the output
   gives the estimate from the measured rate.

    nice -n 10 .venv/bin/python bench/pipeline.py
    nice -n 10 .venv/bin/python bench/pipeline.py \
        --data ../shared/data/twacs-dialogs/airlines_dev.csv.bz2
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bots.service import (  # noqa: E402
    build_generator,
    build_grounder,
    build_recommender,
    open_retriever,
)
from core.channels import CustomerChannel, ReplyStream  # noqa: E402
from core.config import Settings, parse_settings  # noqa: E402
from core.generation import ChatMessage, GenerationParams, Generator  # noqa: E402
from core.messages import Inbound, Reply, User  # noqa: E402
from core.pipeline import Pipeline  # noqa: E402
from core.retrieval import Retriever  # noqa: E402
from core.sentiment import build_classifier  # noqa: E402
from core.store import SQLiteStore, StoredInbound  # noqa: E402

PLATFORM = "bench"
BASELINE_REPLY = "Thanks for your message, I'm looking into it now."
_NOT_DONE = frozenset({"received", "processing"})

# -- customer texts --------------------------------------------------------------------

PRODUCTS = ("running shoes", "winter jacket", "coffee grinder", "phone case", "desk lamp",
            "backpack", "wireless headphones", "yoga mat", "blender", "watch strap")
CITIES = ("Leeds", "Lyon", "Porto", "Graz", "Utrecht", "Cork", "Malmo", "Brno")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the weekend")
COLORS = ("black", "navy", "red", "grey", "green")
OPENERS = (
    "Hi, where is my order {order}? It was supposed to arrive on {day}.",
    "Hello, I ordered a {product} last week and the tracking hasn't updated since {day}.",
    "Can I change the delivery address for order {order}?",
    "How do I return a {product} that doesn't fit?",
    "Do you ship to {city}?",
    "I was charged twice for order {order}, can you check?",
    "My promo code SAVE{n} isn't working at checkout.",
    "How long does a refund usually take?",
    "Is the {color} {product} back in stock anytime soon?",
    "I forgot my password and the reset email never arrives.",
)
FOLLOW_UPS = (
    "The order number is {order}.",
    "It's the {color} one, size {size}.",
    "I paid with a credit card.",
    "The email on the account is the one I'm writing from.",
    "Which courier is delivering it?",
    "What are your opening hours for phone support?",
    "Is there a fee for exchanging it for a different size?",
    "OK, and how long will that take?",
    "Can I pick it up from a store in {city} instead?",
    "Will I get an email confirmation?",
    "Does the warranty cover this?",
    "I'd like to cancel the {product} but keep the rest of the order.",
    "Can you send it to my office instead? It's in {city}.",
    "Do I need to print a return label?",
    "Is it possible to pay in instalments?",
    "I also ordered a {product}, is that in the same parcel?",
)
NEGATIVE = (
    "This is the third time I'm asking and still nothing. Really disappointing.",
    "Your tracking page is useless, it says delivered but nothing is here!",
    "I've been waiting two weeks, this is unacceptable.",
    "The {product} arrived broken and the box was soaked.",
    "Honestly the worst customer service I've had in years.",
    "I want my money back, not another voucher.",
    "Nobody has replied to my emails for days. Terrible.",
)
CLOSINGS = (
    "Thanks, that helps a lot!",
    "Great, thank you!",
    "Perfect, I appreciate the quick answer.",
    "Thanks for sorting this out so fast.",
    "OK thank you, have a nice day.",
)


def template_conversations(count: int, length: int, seed: int) -> list[list[str]]:
    """Conversations of an online store's customers: a question, follow-ups with the odd
    complaint (some in a row, which escalates), and a closing word."""
    rng = random.Random(seed)

    def fill(template: str) -> str:
        return template.format(
            order=rng.randint(100_000, 999_999), day=rng.choice(DAYS), city=rng.choice(CITIES),
            product=rng.choice(PRODUCTS), color=rng.choice(COLORS), n=rng.randint(5, 40),
            size=rng.choice(("S", "M", "L", "42", "44")),
        )

    conversations = []
    for _ in range(count):
        middle = rng.sample(FOLLOW_UPS, length - 2)
        negatives = iter(rng.sample(NEGATIVE, len(NEGATIVE)))
        for i in range(len(middle)):
            if rng.random() < 0.12:
                middle[i] = next(negatives, middle[i])
        texts = [rng.choice(OPENERS), *middle, rng.choice(CLOSINGS)]
        conversations.append([fill(t) for t in texts])
    return conversations


def data_conversations(path: Path, count: int, length: int, seed: int) -> list[list[str]]:
    """Real customer turns from TwACS threads, several short threads making up one bench
    conversation of ``length`` turns."""
    if not path.is_file():
        raise SystemExit(f"--data: {path} does not exist (expected the TwACS airlines CSV, "
                         "e.g. ../shared/data/twacs-dialogs/airlines_dev.csv.bz2)")
    from finetune.conversations import DataError, read_file

    try:
        examples, _ = read_file(path, skip_bad=True)
    except DataError as exc:
        raise SystemExit(f"--data: {exc}") from None
    threads = [[t.content for t in ex.turns if t.role == "user"] for ex in examples]
    random.Random(seed).shuffle(threads)
    turns = iter(text for thread in threads for text in thread)
    conversations = []
    for _ in range(count):
        conversation = [text for _, text in zip(range(length), turns, strict=False)]
        if len(conversation) < length:
            raise SystemExit(f"--data: {path} has too few customer turns for {count} x {length}")
        conversations.append(conversation)
    return conversations


# -- instrumented parts ----------------------------------------------------------------


@dataclass(slots=True)
class Timing:
    """One customer message, in ``perf_counter`` seconds."""

    sent: float
    committed: float = 0.0
    begin: float = 0.0
    first_text: float = 0.0
    finished: float = 0.0
    delivered: float = 0.0
    done: float = 0.0
    status: str = ""
    reply: str = ""


class BenchStore(SQLiteStore):
    """The real store, telling the bench when the pipeline is done with a message."""

    __slots__ = ("_done", "_ids", "_status")

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._ids: dict[str, int] = {}
        self._done: dict[int, asyncio.Event] = {}
        self._status: dict[int, str] = {}

    async def record_inbound(self, inbound: Inbound) -> StoredInbound | None:
        stored = await super().record_inbound(inbound)
        if stored is not None:
            self._ids[inbound.platform_message_id] = stored.message_id
            self._done[stored.message_id] = asyncio.Event()
        return stored

    async def set_inbound_status(self, message_id: int, status: str) -> None:
        await super().set_inbound_status(message_id, status)
        if status not in _NOT_DONE and message_id in self._done:
            self._status[message_id] = status
            self._done[message_id].set()

    async def finished(self, platform_message_id: str) -> str:
        message_id = self._ids[platform_message_id]
        await self._done[message_id].wait()
        return self._status[message_id]


class Timed:
    """A real component, with the time and result of every call of one async method."""

    __slots__ = ("_inner", "_method", "results", "seconds")

    def __init__(self, inner: Any, method: str) -> None:
        self._inner = inner
        self._method = method
        self.seconds: list[float] = []
        self.results: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = await attr(*args, **kwargs)
                self.results.append(result)
                return result
            finally:
                self.seconds.append(time.perf_counter() - started)

        return timed


class InstantGenerator:
    """Baseline stand-in: one fixed piece, no model time; prompt tokens are counted by
    the real model's tokenizer so history budgeting costs what it costs in service."""

    __slots__ = ("_count",)

    def __init__(self, count_tokens: Callable[[str], int]) -> None:
        self._count = count_tokens

    async def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[str]:
        yield BASELINE_REPLY

    def count_tokens(self, text: str) -> int:
        return self._count(text)

    @property
    def saturated(self) -> bool:
        return False

    async def start(self) -> None:
        """Nothing to load."""

    async def close(self) -> None:
        """Nothing to free."""


class _Stream(ReplyStream):
    __slots__ = ("_timing",)

    def __init__(self, timing: Timing) -> None:
        self._timing = timing

    async def begin(self) -> None:
        self._timing.begin = time.perf_counter()

    async def update(self, text_so_far: str) -> None:
        if not self._timing.first_text and text_so_far.strip():
            self._timing.first_text = time.perf_counter()

    async def finish(self, reply: Reply) -> str:
        self._timing.finished = time.perf_counter()
        self._timing.reply = reply.text
        return f"bench-{id(self._timing)}"

    async def abort(self) -> None:
        """Nothing shown, nothing to withdraw."""


class BenchChannel(CustomerChannel):
    """The customer side: each conversation has one message in flight at a time."""

    platform = PLATFORM
    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: dict[str, Timing] = {}

    def open_reply(self, conversation_key: str) -> ReplyStream:
        return _Stream(self.current[conversation_key])

    async def deliver(self, conversation_key: str, reply: Reply) -> str:
        timing = self.current[conversation_key]
        timing.delivered = timing.delivered or time.perf_counter()
        return f"bench-notice-{time.perf_counter_ns()}"


# -- passes ----------------------------------------------------------------------------


@dataclass(slots=True)
class PassResult:
    name: str
    wall_s: float
    timings: list[Timing]
    sentiment_s: list[float]
    grounding_s: list[float]
    suggestions_s: list[float]
    model_first_token_ms: list[float]
    escalations: Counter[str]
    groundings: Counter[str]


async def run_pass(
    name: str,
    settings: Settings,
    conversations: Sequence[Sequence[str]],
    classifier: Any,
    generator: Generator,
    retriever: Retriever | None,
    concurrency: int,
    workdir: Path,
) -> PassResult:
    """As the service assembles it: grounding and suggestions as configured."""
    store = BenchStore(workdir / f"{name}.db")
    await store.open()
    sentiment = Timed(classifier, "classify")
    recommender = Timed(await build_recommender(settings, store, retriever), "suggest")
    grounder = build_grounder(settings, retriever)
    grounding = Timed(grounder, "ground") if grounder is not None else None
    pipeline = Pipeline(
        settings, store, sentiment, generator, recommender, grounding  # type: ignore[arg-type]
    )
    channel = BenchChannel()
    pipeline.attach(channel)
    timings: list[Timing] = []
    gate = asyncio.Semaphore(concurrency)

    async def customer(index: int, texts: Sequence[str]) -> None:
        key = f"{name}-c{index:03d}"
        user = User(PLATFORM, f"u{index:03d}", f"Customer {index}")
        async with gate:
            for n, text in enumerate(texts):
                timing = Timing(time.perf_counter())
                channel.current[key] = timing
                inbound = Inbound(PLATFORM, key, user, f"{key}-m{n}", text)
                if not await pipeline.submit(inbound):
                    raise RuntimeError(f"{inbound.platform_message_id} seen as a duplicate")
                timing.committed = time.perf_counter()
                timing.status = await store.finished(inbound.platform_message_id)
                timing.done = time.perf_counter()
                timings.append(timing)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(customer(i, t) for i, t in enumerate(conversations)))
        wall = time.perf_counter() - started
        rows = await store.query(
            "SELECT first_token_ms FROM messages WHERE direction = 'out' AND sender = 'bot' "
            "AND status = 'sent' AND first_token_ms IS NOT NULL")
        reasons = Counter(r["value"] for r in await store.query(
            "SELECT value FROM events WHERE type = 'escalated'"))
    finally:
        await pipeline.close(5.0)
        close = getattr(recommender, "close", None)
        if close is not None:
            await close()
        await store.close()
    kinds = Counter(
        "small talk" if g.small_talk else "no answer" if g.no_answer else "grounded"
        for g in (grounding.results if grounding else [])
    )
    return PassResult(
        name, wall, timings, sentiment.seconds, grounding.seconds if grounding else [],
        recommender.seconds, [r["first_token_ms"] for r in rows], reasons, kinds,
    )


async def sentiment_ratio(
    classifier: Any, texts: Sequence[str], rounds: int = 4
) -> tuple[float, float]:
    """Texts/s micro-batched (a chunk submitted at once) and one at a time (batch of one),
    alternating chunk by chunk so both modes see the same background load."""
    batched_s = single_s = 0.0
    size = -(-len(texts) // rounds)
    for start in range(0, len(texts), size):
        chunk = texts[start:start + size]
        started = time.perf_counter()
        await asyncio.gather(*(classifier.classify(t) for t in chunk))
        batched_s += time.perf_counter() - started
        started = time.perf_counter()
        for text in chunk:
            await asyncio.to_thread(classifier.classify_many, [text])
        single_s += time.perf_counter() - started
    return len(texts) / batched_s, len(texts) / single_s


# -- report ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def row(label: str, seconds: Sequence[float]) -> str:
    if not seconds:
        return f"| {label} | 0 | - | - |"
    ms = [s * 1000 for s in seconds]
    return f"| {label} | {len(ms)} | {percentile(ms, 50):,.1f} | {percentile(ms, 99):,.1f} |"


def stage_rows(result: PassResult, *, generation: bool) -> list[str]:
    t = result.timings
    replied = [x for x in t if x.finished]
    lines = [
        row("store: inbound committed (submit returns)", [x.committed - x.sent for x in t]),
        row("sentiment (await classify, micro-batched)", result.sentiment_s),
    ]
    if result.grounding_s:
        lines.append(row("grounding: knowledge-base retrieval", result.grounding_s))
    if result.suggestions_s:
        lines.append(row("suggestions (beside generation)", result.suggestions_s))
    if generation:
        lines += [
            row("generation first token (from submit)",
                [x.first_text - x.sent for x in replied if x.first_text]),
            row("generation first token (from model start)",
                [ms / 1000 for ms in result.model_first_token_ms]),
        ]
    lines.append(row("total reply (submit to final text)", [x.finished - x.sent for x in replied]))
    return lines


def outcomes(result: PassResult) -> str:
    counts = Counter(x.status for x in result.timings)
    text = ", ".join(f"{n} {status}" for status, n in counts.most_common())
    if result.escalations:
        reasons = ", ".join(f"{r} {n}" for r, n in result.escalations.most_common())
        text += f"; escalations by reason: {reasons}"
    if result.groundings:
        kinds = ", ".join(f"{n} {kind}" for kind, n in result.groundings.most_common())
        text += f"; groundings: {kinds}"
    return text


# -- main ------------------------------------------------------------------------------


def bench_settings(
    config: Path, workdir: Path, max_new_tokens: int, threads: int | None
) -> Settings:
    data: dict[str, Any] = tomllib.loads(config.read_text(encoding="utf-8"))
    for section, key, default in (("service", "data_dir", "data"),
                                  ("recommender", "knowledge_dir", "knowledge")):
        values = data.setdefault(section, {})
        path = Path(values.get(key, default))
        values[key] = str(path if path.is_absolute() else REPO / path)
    data.setdefault("store", {})["path"] = str(workdir / "unused.db")
    generator = data.setdefault("generator", {})
    generator["max_new_tokens"] = max_new_tokens
    if threads is not None:
        generator["threads"] = threads
    return parse_settings(data, str(config))


async def main(args: argparse.Namespace) -> None:
    import torch

    if args.data:
        conversations = await asyncio.to_thread(
            data_conversations, args.data, args.conversations, args.length, args.seed)
    else:
        conversations = template_conversations(args.conversations, args.length, args.seed)
    texts = [t for c in conversations for t in c]
    with tempfile.TemporaryDirectory(prefix="supportbot-bench-") as tmp:
        workdir = Path(tmp)
        settings = bench_settings(args.config, workdir, args.max_new_tokens, args.threads)
        load_before = os.getloadavg()[0]
        s = settings.sentiment
        classifier = build_classifier(s.encoder, s.head, s.model, s.max_batch, s.max_wait_ms,
                                  quantize=s.quantize, runtime=s.runtime, threads=s.threads)
        load_started = time.perf_counter()
        # One load at a time, as the service does: transformers' loading is not thread-safe.
        generator = await build_generator(settings)
        await generator.start()
        await classifier.start()
        retriever = await open_retriever(settings)
        load_s = time.perf_counter() - load_started
        await classifier.classify("warm up")
        try:
            baseline = await run_pass(
                "baseline", settings, conversations, classifier,
                InstantGenerator(generator.count_tokens), retriever, len(conversations),
                workdir,
            )
            ratio_texts = texts[:args.ratio_texts]
            batched, single = await sentiment_ratio(classifier, ratio_texts)
            gen_convs: list[list[str]] = []
            remaining = args.generate
            for c in conversations:
                if remaining <= 0:
                    break
                gen_convs.append(list(c[:remaining]))
                remaining -= len(gen_convs[-1])
            real = None
            if args.generate:
                real = await run_pass("generation", settings, gen_convs, classifier, generator,
                                      retriever, args.gen_concurrency, workdir)
        finally:
            await generator.close()
            await classifier.close()
    load_after = os.getloadavg()[0]

    source = f"--data {args.data}" if args.data else f"templates, seed {args.seed}"
    g = settings.generator
    print(f"\nsupportbot pipeline bench: {len(texts):,} messages from {len(conversations)} "
          f"conversations x {args.length} ({source})")
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
          f"load average {load_before:.1f} before / {load_after:.1f} after; models loaded in "
          f"{load_s:.1f} s")
    on = {True: "on", False: "off"}
    print(f"SQLite WAL in a temp dir; sentiment MiniLM + head, micro-batch <= {s.max_batch} / "
          f"{s.max_wait_ms:g} ms; grounding {on[settings.grounding.enabled]}, suggestions "
          f"{on[settings.recommender.enabled]} (as configured in {args.config.name})")
    print("each customer waits for the answer before sending the next message\n")
    print("| stage | n | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    print(f"| **baseline: all {len(texts):,} messages, {len(conversations)} conversations at "
          "once, stand-in generator (one fixed piece, no model time)** | | | |")
    for line in stage_rows(baseline, generation=False):
        print(line)
    if real is not None:
        print(f"| **real SmolLM2 ({g.model}): first {len(real.timings)} messages, "
              f"max_new_tokens {g.max_new_tokens}, temperature {g.temperature:g}, "
              f"{args.gen_concurrency} conversation(s) at a time** | | | |")
        for line in stage_rows(real, generation=True):
            print(line)
    print()
    print(f"throughput without generation: {len(baseline.timings):,} messages in "
          f"{baseline.wall_s:.1f} s = **{len(baseline.timings) / baseline.wall_s:,.0f} "
          f"messages/s** (outcomes: {outcomes(baseline)})")
    print(f"sentiment on the same {len(ratio_texts):,} texts: micro-batched {batched:,.1f} "
          f"texts/s, one at a time {single:,.1f} texts/s: **{batched / single:.1f}x**")
    if real is not None:
        replied = [x for x in real.timings if x.finished and x.first_text]
        tokens = sum(generator.count_tokens(x.reply) for x in replied)
        decode_s = sum(x.finished - x.first_text for x in replied)
        rate = f"{tokens / decode_s:.1f} tokens/s after the first" if decode_s else "n/a"
        per_reply = sum(x.finished - x.sent for x in replied) / max(len(replied), 1)
        print(f"real generation: {len(replied)} replies, {tokens} tokens, {rate} "
              f"(outcomes: {outcomes(real)}); not run for all {len(texts):,} messages: "
              f"at {per_reply:.1f} s a reply that would take ~{len(texts) * per_reply / 60:.0f} "
              "min")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--length", type=int, default=10, help="messages per conversation")
    parser.add_argument("--generate", type=int, default=50,
                        help="messages answered by the real model (0: skip that pass)")
    parser.add_argument("--gen-concurrency", type=int, default=1,
                        help="conversations at a time in the real-model pass")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--ratio-texts", type=int, default=200,
                        help="texts classified both micro-batched and one at a time")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (generator.threads; default: as configured)")
    parser.add_argument("--data", type=Path, default=None,
                        help="TwACS CSV(.bz2) for real customer turns instead of templates")
    parser.add_argument("--config", type=Path, default=REPO / "config.toml")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.length < 3:
        parser.error("--length must be at least 3")
    if min(args.conversations, args.gen_concurrency, args.ratio_texts) < 1 or args.generate < 0:
        parser.error("--conversations, --gen-concurrency and --ratio-texts must be >= 1, "
                     "--generate >= 0")
    if not args.config.is_file():
        parser.error(f"--config: {args.config} does not exist")
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main(parse_args()))
