"""`supportbot export conversations`: past conversations as training data for the reply model.

Writes one JSONL line per conversation in the chat format ``supportbot finetune generator``
reads (see ``finetune.conversations``): the customer's text messages are ``user`` turns, the
bot's and operators' sent replies ``assistant`` turns with their ``author``. Operator
answers are the best targets: where an operator answered, the bot's replies stay as
context (``"train": false``); where none did, the bot's replies are the targets. Notices
the service sends by itself (hand-off, "X has joined", fallback), commands, attachments
and replies that were never sent are left out, and operators appear only as ``operator``.

Personal data (emails, phone and card numbers, order ids) is replaced by placeholders
unless ``--no-redact-pii``. The database (the SQLite file, or the PostgreSQL database of
``[store] url``) is read on a read-only connection, so the service can keep running; both
give the same file for the same rows.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.config import ConfigError
from core.pii import redact_pii
from finetune import tool
from finetune.conversations import Example, Turn, write_jsonl
from finetune.export_events import (
    Database,
    ExportError,
    add_database_arguments,
    locate_database,
    open_database,
    parse_since,
)
from finetune.tool import run_module

BOT, OPERATOR = "bot", "operator"


@dataclass(frozen=True, slots=True)
class Options:
    since: str | None = None
    operator_only: bool = False
    redact: bool = True


@dataclass(slots=True)
class Summary:
    """What an export wrote and what it left out (reason -> conversations)."""

    written: int = 0
    with_operator: int = 0
    targets: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def read_messages(
    db: Database, since: str | None
) -> Iterator[tuple[int, str, list[tuple[str, str, str]]]]:
    """(conversation id, platform, [(direction, sender, text)]) in the order they were
    stored, for conversations started at or after ``since``."""
    where, params = "", []
    if since:
        where, params = " AND c.created_at >= ?", [since]
    cursor = db.execute(
        "SELECT m.conversation_id, c.platform, m.direction, m.sender, m.text "
        "FROM messages m JOIN conversations c ON c.id = m.conversation_id "
        "WHERE m.kind = 'text' AND TRIM(m.text) != '' AND (m.direction = 'in' OR "
        f"(m.status = 'sent' AND m.sender IN ('{BOT}', '{OPERATOR}'))){where} "
        "ORDER BY m.conversation_id, m.id",
        params,
    )
    current: int | None = None
    platform = ""
    rows: list[tuple[str, str, str]] = []
    for conversation_id, conv_platform, direction, sender, text in cursor:
        if conversation_id != current:
            if current is not None:
                yield current, platform, rows
            current, platform, rows = conversation_id, conv_platform, []
        rows.append((direction, sender, text))
    if current is not None:
        yield current, platform, rows


def to_example(
    conversation_id: int, platform: str, rows: Sequence[tuple[str, str, str]], options: Options,
    source: str,
) -> Example | str:
    """The conversation as an :class:`Example`, or why it is left out."""
    merged: list[tuple[str, str, str]] = []  # (role, author, text)
    for direction, sender, text in rows:
        role, author = ("user", "") if direction == "in" else ("assistant", sender)
        text = text.strip()
        if options.redact:
            text = redact_pii(text)
        if merged and merged[-1][:2] == (role, author):
            merged[-1] = (role, author, f"{merged[-1][2]}\n{text}")
        else:
            merged.append((role, author, text))
    while merged and merged[0][0] != "user":
        merged.pop(0)
    while merged and merged[-1][0] != "assistant":
        merged.pop()
    if not merged:
        return "no reply to learn from"
    has_operator = any(author == OPERATOR for _, author, _ in merged)
    if options.operator_only and not has_operator:
        return "no operator answer (--operator-only)"
    target = OPERATOR if has_operator else BOT
    turns = tuple(
        Turn(role, text, role == "user" or author == target, author)
        for role, author, text in merged
    )
    group = OPERATOR if has_operator else BOT
    return Example(turns, source, group, f"{platform}-{conversation_id}")


def export(db: Database, out: Path, options: Options) -> Summary:
    """Write the conversations to ``out`` (atomically) and say what was written."""
    summary = Summary()

    def examples() -> Iterator[Example]:
        for conversation_id, platform, rows in read_messages(db, options.since):
            item = to_example(conversation_id, platform, rows, options,
                              f"{db.name}#conversation-{conversation_id}")
            if isinstance(item, str):
                summary.skipped[item] += 1
                continue
            summary.with_operator += item.group == OPERATOR
            summary.targets += sum(t.role == "assistant" and t.train for t in item.turns)
            yield item

    partial = out.with_name(f".{out.name}.partial")
    try:
        summary.written = write_jsonl(examples(), partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return summary


def configure(parser: argparse.ArgumentParser) -> None:
    add_database_arguments(parser)
    parser.add_argument("--out", default="conversations.jsonl",
                        help="JSONL file to write (default conversations.jsonl)")
    parser.add_argument("--since", default=None,
                        help="only conversations started at or after this ISO time")
    parser.add_argument("--operator-only", action="store_true",
                        help="only conversations an operator answered")
    parser.add_argument(
        "--redact-pii", action=argparse.BooleanOptionalAction, default=True,
        help="replace emails, phone/card numbers and order ids by placeholders (default on)",
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        options = Options(parse_since(args.since) if args.since else None,
                          args.operator_only, args.redact_pii)
        if not out.parent.is_dir():
            raise ExportError(f"{out.parent}: output folder not found")
        db = open_database(*locate_database(args.db, args.config))
    except (ExportError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = export(db, out, options)
    finally:
        db.close()
    scope = f" started since {options.since}" if options.since else ""
    print(f"wrote {summary.written} conversations{scope} to {out} "
          f"({summary.with_operator} answered by an operator, {summary.targets} target "
          f"replies; personal data {'redacted' if options.redact else 'NOT redacted'})")
    for reason, n in sorted(summary.skipped.items()):
        print(f"left out {n}: {reason}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return tool.main(sys.modules[__name__], argv)


run_module(__name__)
