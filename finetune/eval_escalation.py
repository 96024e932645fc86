"""Replay conversations built from real airline tweets through the escalation policy.

Should escalate: runs of three test-split tweets labelled negative with confidence
>= 0.8 and reason "Customer Service Issue", and conversations where the customer asks
for a person in plain words. Should not: runs of three positive tweets. Prints
escalation precision and recall, and the median number of turns before escalation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.config import EscalationSettings
from core.escalation import EscalationPolicy
from finetune.sentiment_data import DEFAULT_DATA, DataError, load

TURNS = 3

# Written for this project: how customers ask for a person, none of them using /human.
PERSON_REQUESTS = (
    "Can I talk to a human please?",
    "I want to speak to a real person.",
    "agent please",
    "Get me a live agent, this bot is useless",
    "Is there a representative I can talk to?",
    "Let me speak to a manager.",
    "I need to talk to someone about this",
    "Please connect me with an operator",
    "can i speak to someone from customer service",
    "human!!!",
    "Transfer me to a customer service rep",
    "Is there somebody real I can chat with?",
)


@dataclass(frozen=True, slots=True)
class Conversation:
    kind: str
    turns: tuple[str, ...]
    should_escalate: bool


def build_conversations(path: Path) -> list[Conversation]:
    data = load(path)
    test = sorted(data.split("test"), key=lambda e: (e.airline, e.tweet_id))
    angry = [e.text for e in test if e.label == 0 and e.confidence >= 0.8
             and e.negative_reason == "Customer Service Issue"]
    happy = [e.text for e in test if e.label == 2]
    neutral = [e.text for e in test if e.label == 1]
    conversations = [
        Conversation("angry", tuple(angry[i : i + TURNS]), True)
        for i in range(0, len(angry) - TURNS + 1, TURNS)
    ]
    conversations += [
        Conversation("positive", tuple(happy[i : i + TURNS]), False)
        for i in range(0, len(happy) - TURNS + 1, TURNS)
    ]
    conversations += [
        Conversation("asks for a person", (neutral[i], request), True)
        for i, request in enumerate(PERSON_REQUESTS)
    ]
    return conversations


def replay(
    conversations: Sequence[Conversation], classify: object, policy: EscalationPolicy
) -> list[int | None]:
    """The turn (1-based) at which each conversation escalated, or None."""
    texts = sorted({t for c in conversations for t in c.turns})
    p_negative = dict(zip(texts, (s.negative for s in classify(texts)), strict=True))  # type: ignore[operator]
    outcome: list[int | None] = []
    for conversation in conversations:
        history: list[float] = []
        when = None
        for turn, text in enumerate(conversation.turns, start=1):
            history.append(p_negative[text])
            if policy.decide(text, history, conversation.turns[: turn - 1]) is not None:
                when = turn
                break
        outcome.append(when)
    return outcome


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Tweets.csv")
    parser.add_argument("--model", default="", help="fine-tuned sentiment folder (default: head)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="override escalation.negative_threshold")


def run(args: argparse.Namespace) -> int:
    from core.sentiment import build_classifier

    try:
        conversations = build_conversations(args.data)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = EscalationSettings() if args.threshold is None else EscalationSettings(
        negative_threshold=args.threshold)
    classifier = build_classifier("minilm", "", args.model, 64, 0)
    classifier._load()
    outcome = replay(conversations, classifier.classify_many, EscalationPolicy(settings))
    tp = sum(1 for c, w in zip(conversations, outcome, strict=True) if c.should_escalate and w)
    fp = sum(1 for c, w in zip(conversations, outcome, strict=True) if not c.should_escalate and w)
    positives = sum(c.should_escalate for c in conversations)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else 0.0
    print(f"model: {args.model or 'embedded head'}; threshold "
          f"{settings.negative_threshold}; {len(conversations)} conversations")
    print(f"{'kind':<20}{'n':>6}{'escalated':>11}{'median turn':>13}")
    for kind in dict.fromkeys(c.kind for c in conversations):
        turns = [w for c, w in zip(conversations, outcome, strict=True) if c.kind == kind]
        hit = [w for w in turns if w]
        median = f"{statistics.median(hit):.1f}" if hit else "-"
        print(f"{kind:<20}{len(turns):>6}{len(hit):>11}{median:>13}")
    print(f"escalation precision {precision:.3f}  recall {recall:.3f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    configure(parser)
    sys.exit(run(parser.parse_args()))
