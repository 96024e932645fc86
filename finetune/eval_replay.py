"""`supportbot eval replay`: real customer messages through the real pipeline, one table.

By default the 200 TwACS openers (airline customers on Twitter) whose acts this project
labelled by hand (``finetune/data/acts/twacs_dev_openers.tsv``; the text is read from
``--data``, never committed), so the table also says what each kind of message got: how
many praise openers were acknowledged, how many complaints apologised to. ``--sample N``
replays N other threads picked by hash instead, and with ``--turns N`` their next customer
turns. Everything goes through the service the config describes (its sentiment model,
escalation policy, conversation acts, knowledge base, generator — embedded or vLLM — and
faithfulness check), on a throwaway database, ``--concurrency`` conversations at a time.
The table counts what customers got: a generated answer, an extractive one, an
acknowledgement, a hand-off (by reason), an escalation at once; how many generated
sentences the check dropped; how many unsupported claims were shown anyway (re-checked
afterwards against the passages retrieved for the same question: the bar is 0); and reply
times. ``--no-check`` replays with the check off, to see what it changes. Every exchange
is written to a JSONL file for reading.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import html
import json
import math
import re
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.adapter import Adapter
from core.channels import CustomerChannel, ReplyStream
from core.config import ConfigError, Settings, parse_settings
from core.messages import Inbound, Reply, User
from core.pipeline import Pipeline
from finetune.conversations import DataError, read_file
from finetune.tool import run_module

DEFAULT_DATA = "../shared/data/twacs-dialogs/airlines_dev.csv.bz2"
DEFAULT_LABELS = "finetune/data/acts/twacs_dev_openers.tsv"
DEFAULT_OUT = "data/replay/replay.jsonl"
PLATFORM = "replay"
STRONG_REASONS = frozenset({
    "profanity", "churn_threat", "legal_threat", "safety", "very_negative",
    "negative_sentiment",
})
"""Escalation reasons that count as "escalated at once" on a conversation's first message."""
COURTESY = {
    "acknowledge_praise": "thanked for praise", "acknowledge": "thanked (neutral)",
    "apologise": "apologised", "greet": "greeted", "clarify": "asked what they need",
}
"""``core.courtesy`` functions by what the customer read."""
FINAL = frozenset({"pending", "processing", "received", "queued"})
"""Inbound statuses that mean the pipeline has not finished with the message yet."""


@dataclass(frozen=True, slots=True)
class Dialog:
    ident: str
    turns: tuple[str, ...]
    expected: str = ""
    """The labelled act of the opener, when it is one of the labelled ones."""


def load_labelled(data: str | Path, labels: str | Path) -> list[Dialog]:
    """The labelled openers, joined with their text by row (and checked by hash)."""
    from finetune.acts import DataError as LabelError
    from finetune.acts import join_rows, read_column

    data, labels = Path(data), Path(labels)
    if not data.is_file():
        raise DataError(data, 0, "no such file (the TwACS dialogs; see ../shared/data/README.md, "
                                 "or pass --data)")
    try:
        texts = read_column(data, "first_utterance")
        examples = join_rows(labels, texts, data)
    except LabelError as exc:
        raise DataError(labels, 0, str(exc)) from None
    rows = [int(line.split("\t", 1)[0]) for line in
            labels.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return [Dialog(str(row), (as_sent(texts[row]),), e.act.value)
            for row, e in zip(rows, examples, strict=True) if e.text.strip()]


def as_sent(raw: str) -> str:
    """A TwACS opener as the customer wrote it: the markup gone, the anonymised company
    handle back as a handle (customers name the company: "done with @AirCo")."""
    text = re.sub(r"</?cust__|__cust>", " ", raw).replace("__company__", "@AirCo")
    text = html.unescape(text).replace("__cust__", " ")
    return re.sub(r"\s+", " ", text).strip()


def load_dialogs(path: str | Path, limit: int, turns: int) -> list[Dialog]:
    """``limit`` threads picked by a hash of their id (a fixed, spread-out sample), each
    with its first ``turns`` customer turns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, 0, "no such file (the TwACS dialogs; see ../shared/data/README.md, "
                                 "or pass --data)")
    examples, _ = read_file(path, skip_bad=True)
    dialogs = []
    for ex in examples:
        said = tuple(t.content for t in ex.turns if t.role == "user")[:turns]
        if said and said[0].strip():
            dialogs.append(Dialog(ex.id or ex.source, said))
    dialogs.sort(key=lambda d: hashlib.sha1(d.ident.encode()).hexdigest())
    return dialogs[:limit]


@dataclass(slots=True)
class _Seen:
    """What one conversation's customer saw, with the time of each thing."""

    first_text: list[float] = field(default_factory=list)
    replies: list[tuple[float, str]] = field(default_factory=list)


class _Stream(ReplyStream):
    __slots__ = ("_seen",)

    def __init__(self, seen: _Seen) -> None:
        self._seen = seen

    async def begin(self) -> None:
        return None

    async def update(self, text_so_far: str) -> None:
        if text_so_far.strip():
            self._seen.first_text.append(time.perf_counter())

    async def finish(self, reply: Reply) -> str:
        self._seen.first_text.append(time.perf_counter())
        self._seen.replies.append((time.perf_counter(), reply.text))
        return f"r{len(self._seen.replies)}"

    async def abort(self) -> None:
        return None


class ReplayChannel(CustomerChannel, Adapter):
    """The customer's side for the replay: records what each conversation was shown."""

    __slots__ = ("seen",)
    platform = PLATFORM

    def __init__(self) -> None:
        self.seen: dict[str, _Seen] = {}

    def _for(self, key: str) -> _Seen:
        return self.seen.setdefault(key, _Seen())

    def open_reply(self, conversation_key: str) -> ReplyStream:
        return _Stream(self._for(conversation_key))

    async def deliver(self, conversation_key: str, reply: Reply) -> str:
        seen = self._for(conversation_key)
        now = time.perf_counter()
        seen.first_text.append(now)
        seen.replies.append((now, reply.text))
        return f"d{len(seen.replies)}"

    async def start(self, pipeline: Pipeline) -> None:
        pipeline.attach(self)

    async def stop(self) -> None:
        return None


def replay_settings(config: str, store: Path, *, check: bool | None, mode: str | None) -> Settings:
    """The configured service on a throwaway database, with no platform of its own."""
    path = Path(config)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data.setdefault("store", {})["path"] = str(store)
    for section in ("web", "telegram", "discord", "report"):
        data.setdefault(section, {})["enabled"] = False
    answers = data.setdefault("answers", {})
    if check is not None:
        answers["check"] = check
    if mode is not None:
        answers["mode"] = mode
    return parse_settings(data, str(path))


async def _wait_done(pipeline: Pipeline, platform_id: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await pipeline.store.query(
            "SELECT id, status FROM messages WHERE platform = ? AND platform_message_id = ? "
            "AND direction = 'in'", [PLATFORM, platform_id])
        if rows and rows[0]["status"] not in FINAL:
            return int(rows[0]["id"])
        if time.monotonic() > deadline:
            raise TimeoutError(f"message {platform_id} not finished in {timeout_s:.0f} s")
        await asyncio.sleep(0.02)


async def _converse(
    pipeline: Pipeline, channel: ReplayChannel, dialog: Dialog, gate: asyncio.Semaphore,
    timeout_s: float,
) -> list[dict[str, Any]]:
    key = f"twacs-{dialog.ident}"
    out = []
    async with gate:
        for n, text in enumerate(dialog.turns):
            seen = channel._for(key)
            before_replies, before_text = len(seen.replies), len(seen.first_text)
            platform_id = f"{dialog.ident}-{n}"
            started = time.perf_counter()
            await pipeline.submit(Inbound(PLATFORM, key, User(PLATFORM, dialog.ident),
                                          platform_id, text))
            message_id = await _wait_done(pipeline, platform_id, timeout_s)
            replies = seen.replies[before_replies:]
            texts = seen.first_text[before_text:]
            out.append({
                "conversation": dialog.ident, "turn": n, "message_id": message_id,
                "expected": dialog.expected if n == 0 else "",
                "customer": text, "shown": [r for _, r in replies],
                "reply_s": round(replies[0][0] - started, 3) if replies else None,
                "first_text_s": round(texts[0] - started, 3) if texts else None,
            })
    return out


async def _annotate(pipeline: Pipeline, rows: list[dict[str, Any]]) -> None:
    """Status, act, escalation reason and the check's record of each message, from the
    database the pipeline wrote."""
    store = pipeline.store
    for row in rows:
        mid = row["message_id"]
        status = await store.query("SELECT status FROM messages WHERE id = ?", [mid])
        row["status"] = status[0]["status"]
        events = await store.query(
            "SELECT type, value, data FROM events WHERE message_id = ? AND type IN "
            "('message', 'escalated')", [mid])
        for e in events:
            data = json.loads(e["data"] or "{}")
            if e["type"] == "message":
                row["act"] = data.get("act")
                row["sentiment"] = e["value"]
                row["p_negative"] = data.get("p_negative")
            else:
                row["escalated"] = e["value"]
        out = await store.query(
            "SELECT text, payload FROM messages WHERE reply_to = ? AND direction = 'out' "
            "AND sender = 'bot' AND status = 'sent' ORDER BY id", [mid])
        answer = None
        for o in out:
            payload = json.loads(o["payload"] or "{}")
            if "answer" in payload or "citations" in payload:
                answer = payload.get("answer")
                row["citations"] = payload.get("citations", [])
            if "courtesy" in payload:
                row["courtesy"] = payload["courtesy"]
        row["answer"] = answer


async def _recheck(pipeline: Pipeline, rows: list[dict[str, Any]]) -> None:
    """Re-check every generated answer that was shown against the passages the grounder
    retrieves for the same question: the independent count of unsupported claims shown."""
    from core.faithfulness import FaithfulnessChecker

    grounder = pipeline.grounder
    if grounder is None:
        return
    checker = FaithfulnessChecker(grounder.retriever.embed)
    earlier: dict[str, list[str]] = {}
    for row in rows:
        turns = earlier.setdefault(row["conversation"], [])
        if row["status"] == "answered" and row["shown"] and not (row["answer"] or {}).get(
                "extractive"):
            grounding = await grounder.ground(row["customer"], turns)
            passages = [h.text for h in grounding.hits]
            verdict = await asyncio.to_thread(
                checker.check, row["shown"][-1], passages, [row["customer"], *turns])
            bad = [c for c in verdict.claims if not c.supported]
            row["unsupported_shown"] = [{"text": c.text, "reason": c.reason} for c in bad]
        turns.append(row["customer"])


def outcome(row: dict[str, Any]) -> str:
    status = row["status"]
    if status == "escalated":
        return f"handed off: {row.get('escalated') or 'unknown'}"
    if status == "answered":
        if not row["shown"]:
            return "answered: nothing shown"
        answer = row.get("answer") or {}
        return "answered (extractive)" if answer.get("extractive") else "answered (generated)"
    if status == "acknowledged":
        return f"courtesy: {COURTESY.get(row.get('courtesy', ''), row.get('courtesy', 'reply'))}"
    return status


def what_they_got(row: dict[str, Any]) -> str:
    """The customer's view, coarse: acknowledged, apologised, answered, handed off."""
    got = outcome(row)
    if got.startswith("handed off: no_answer"):
        return "handed off (no answer)"
    if got.startswith("handed off"):
        return "escalated"
    if got.startswith("courtesy: "):
        return got.removeprefix("courtesy: ")
    return "answered" if got.startswith("answered") else got


def by_expected(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """For labelled openers: what each labelled act got, and the act accuracy."""
    labelled = [r for r in rows if r.get("expected")]
    if not labelled:
        return []
    lines = []
    agree = sum(1 for r in labelled if r.get("act") == r["expected"])
    lines.append(("labelled openers: act as labelled", f"{agree}/{len(labelled)} "
                                                       f"({agree / len(labelled):.1%})"))
    for act in sorted({r["expected"] for r in labelled}):
        mine = [r for r in labelled if r["expected"] == act]
        got = Counter(what_they_got(r) for r in mine)
        lines.append((f"  {act} ({len(mine)}) got",
                      ", ".join(f"{k} {v}" for k, v in got.most_common())))
    return lines


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarise(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The table as (what, figure) lines."""
    n = len(rows)
    share = lambda k: f"{k} ({k / n:.1%})" if n else "0"  # noqa: E731
    lines: list[tuple[str, str]] = [("messages", str(n)),
                                    ("conversations", str(len({r["conversation"] for r in rows})))]
    counts = Counter(outcome(r) for r in rows)
    for name in sorted(counts):
        lines.append((name, share(counts[name])))
    at_once = sum(1 for r in rows if r["turn"] == 0 and r.get("escalated") in STRONG_REASONS)
    lines.append(("escalated at once (first message, strong signal)", share(at_once)))
    claims = sum((r.get("answer") or {}).get("claims", 0) for r in rows)
    dropped = sum((r.get("answer") or {}).get("dropped", 0) for r in rows)
    lines.append(("generated sentences checked", str(claims)))
    lines.append(("  dropped by the check", f"{dropped} ({dropped / claims:.1%})" if claims
                  else "0"))
    shown_bad = sum(len(r.get("unsupported_shown", ())) for r in rows)
    lines.append(("unsupported claims shown (re-checked)", str(shown_bad)))
    reply = [r["reply_s"] for r in rows if r["reply_s"] is not None]
    first = [r["first_text_s"] for r in rows if r["first_text_s"] is not None]
    lines.append(("reply time p50 / p99 s",
                  f"{percentile(reply, 50):.2f} / {percentile(reply, 99):.2f}"))
    lines.append(("first text p50 / p99 s",
                  f"{percentile(first, 50):.2f} / {percentile(first, 99):.2f}"))
    return lines + by_expected(rows)


async def replay(settings: Settings, dialogs: Sequence[Dialog], concurrency: int,
                 timeout_s: float) -> list[dict[str, Any]]:
    from bots.service import Service

    channel = ReplayChannel()
    service = Service(settings, adapters=[channel])
    pipeline = await service.start()
    try:
        gate = asyncio.Semaphore(concurrency)
        results = await asyncio.gather(
            *(_converse(pipeline, channel, d, gate, timeout_s) for d in dialogs))
        rows = [row for conversation in results for row in conversation]
        await _annotate(pipeline, rows)
        await _recheck(pipeline, rows)
        return rows
    finally:
        await service.stop()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=DEFAULT_DATA, help="TwACS dialogs (.csv.bz2)")
    parser.add_argument("--config", default="config.toml")
    parser.add_argument("--labels", default=DEFAULT_LABELS,
                        help="the labelled openers to replay (row, sha1_12, act)")
    parser.add_argument("--sample", type=int, default=0,
                        help="instead, replay this many threads picked by hash")
    parser.add_argument("--turns", type=int, default=1,
                        help="with --sample: customer turns per conversation (1: openers)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-check", action="store_true",
                        help="replay with the faithfulness check off")
    parser.add_argument("--mode", choices=("auto", "generate", "extract"), default=None,
                        help="override [answers] mode")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one message may take before the replay stops")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSONL of every exchange")


def run(args: argparse.Namespace) -> int:
    if args.sample < 0 or args.turns <= 0 or args.concurrency <= 0:
        print("error: --turns and --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        dialogs = (load_dialogs(args.data, args.sample, args.turns) if args.sample
                   else load_labelled(args.data, args.labels))
        with tempfile.TemporaryDirectory(prefix="replay-") as tmp:
            settings = replay_settings(args.config, Path(tmp) / "replay.db",
                                       check=False if args.no_check else None, mode=args.mode)
            started = time.perf_counter()
            rows = asyncio.run(replay(settings, dialogs, args.concurrency, args.timeout))
            took = time.perf_counter() - started
    except (DataError, ConfigError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**row, "outcome": outcome(row)}, ensure_ascii=False) + "\n")
    a = settings.answers
    what = f"{args.sample} threads x up to {args.turns} turns" if args.sample else \
        f"{len(dialogs)} labelled openers ({args.labels})"
    print(f"replay of {args.data}: {what}, "
          f"concurrency {args.concurrency}, generator {settings.generator.backend}:"
          f"{settings.generator.model}, check {'on' if a.check else 'off'}, mode {a.mode}, "
          f"{took:.0f} s")
    width = max(len(k) for k, _ in summarise(rows))
    for name, figure in summarise(rows):
        print(f"  {name:<{width}}  {figure}")
    print(f"every exchange: {out}")
    return 0


run_module(__name__)
