"""Training data for the reply generator: every source becomes the same chat examples.

Sources (the format is picked from the file name and, for CSV, from the header):

* **Bitext** customer-support CSV (``instruction`` -> ``response``, ``intent`` kept as the
  stratification group).
* **TwACS** airline Twitter threads (``first_utterance`` + ``context`` with
  ``<cust__ ... __cust>`` / ``<rep__ ... __rep>`` turns, ``.csv`` or ``.csv.bz2``): every
  customer turn followed by an agent turn; handles, links, agent signatures (``*TMT``,
  ``^JD``, ``-Sara``) and tweet-split markers (``1/2``) are removed.
* **Our own logs**, JSONL, one conversation per line::

      {"id": "tg-1234", "group": "refund",
       "messages": [
         {"role": "system", "content": "..."},
         {"role": "user", "content": "where is my parcel?"},
         {"role": "assistant", "content": "It left on Monday.", "author": "bot", "train": false},
         {"role": "user", "content": "it did not arrive"},
         {"role": "assistant", "content": "I've re-sent it.", "author": "operator"}]}

  ``role`` is ``system`` (first message only), ``user`` or ``assistant``; ``content`` is
  non-empty text. Assistant messages may say who wrote them (``author``: ``bot`` or
  ``operator``; operator answers are the best targets) and whether the loss covers them
  (``train``, default true): an export marks a bot answer that an operator had to correct
  ``"train": false`` so it stays as context only. ``id`` and ``group`` (used to stratify
  the held-out split) are optional. At least one trainable assistant turn is required;
  other keys are an error, so a typo is never silently ignored.

Bad input raises :class:`DataError` naming ``file:line`` and what is wrong; with
``skip_bad`` a bad row is skipped and counted instead. A wrong header, an empty file or a
missing file always stops.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import html
import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from core.pii import redact_pii

ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = frozenset({"role", "content", "author", "train"})
_TOP_KEYS = frozenset({"messages", "id", "group"})
_AUTHORS = frozenset({"bot", "operator"})

BITEXT_COLUMNS = ("instruction", "response")
TWACS_COLUMNS = ("first_utterance", "context")


class DataError(ValueError):
    """Training data that cannot be used; the message is ``file:line: what is wrong``
    (``file: what is wrong`` when the whole file is the problem, ``line`` 0)."""

    def __init__(self, path: str | Path, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Turn:
    """One chat message; ``train`` only matters for assistant turns (loss or context)."""

    role: str
    content: str
    train: bool = True
    author: str = ""


@dataclass(frozen=True, slots=True)
class Example:
    """One conversation to learn from; ``source`` is ``file:line`` for error messages."""

    turns: tuple[Turn, ...]
    source: str
    group: str = ""
    id: str = ""

    @property
    def key(self) -> str:
        """Content hash: equal conversations (case and spacing aside) share it."""
        h = hashlib.sha256()
        for turn in self.turns:
            if turn.role == "system":
                continue
            h.update(turn.role.encode())
            h.update(b"\0")
            h.update(" ".join(turn.content.lower().split()).encode())
            h.update(b"\0")
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        for turn in self.turns:
            message: dict[str, Any] = {"role": turn.role, "content": turn.content}
            if turn.role == "assistant" and not turn.train:
                message["train"] = False
            if turn.author:
                message["author"] = turn.author
            messages.append(message)
        out: dict[str, Any] = {"messages": messages}
        if self.id:
            out["id"] = self.id
        if self.group:
            out["group"] = self.group
        return out


@dataclass(frozen=True, slots=True)
class FileStats:
    """What one input file gave: shown in the model card."""

    path: str
    format: str
    sha256: str
    rows: int
    examples: int
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Dataset:
    examples: tuple[Example, ...]
    files: tuple[FileStats, ...]
    duplicates: int


# --- text cleaning -------------------------------------------------------------------------

_URL = re.compile(r"(?:https?://|www\.)\S+", re.I)
_HANDLE = re.compile(r"(?<![\w.])@\S+")
_ANON = re.compile(r"__(?:company|cust)__")
_SIGNATURE = re.compile(  # *TMT ^JD ^Helen. -Sara, also glued on: soon.^Jo 1/2^LW
    r"(?:\s+|^|(?<=[\d.!?]))(?:[*^][A-Za-z]{0,12}\.{0,3}|[-–—~]\s?[A-Z][A-Za-z]{1,11})\s*$"
)
_PART = re.compile(r"(?:\s+|^|(?<=[.^]))\(?[1-9]/[1-9]\)?\.?\s*$")  # 1/2, (2/3) at the end
_LEAD_PART = re.compile(r"^\(?[1-9]/[1-9]\)?\s+")  # 2/2 at the start
_SPACES = re.compile(r"[ \t\u00a0]+")


def clean_tweet(text: str, *, agent: bool) -> str:
    """Tweet text without handles, links and, for agents, signatures and split markers."""
    text = html.unescape(text)
    text = _ANON.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _HANDLE.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()
    if agent:
        text = _LEAD_PART.sub("", text)
        previous = None
        while previous != text:
            previous = text
            text = _SIGNATURE.sub("", text)
            text = _PART.sub("", text)
            text = text.strip()
    return re.sub(r"\s+([,.!?])", r"\1", text).strip()


# --- readers -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _csv_rows(path: Path, needed: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line where the record starts, row); the header must hold ``needed``."""
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(path, 1, "empty file: no header and no rows") from None
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
            raise DataError(path, 1, f"not a readable CSV file ({exc})") from None
        missing = [c for c in needed if c not in header]
        if missing:
            raise DataError(
                path, 1,
                f"missing column(s) {', '.join(missing)}; the header has {', '.join(header)}",
            )
        end = reader.line_num
        while True:
            start = end + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
                # A truncated or corrupt .bz2 fails here (EOFError / OSError).
                raise DataError(path, start, f"unreadable CSV record ({exc})") from None
            end = reader.line_num
            if not values:
                continue
            if len(values) != len(header):
                yield start, {"__error__": f"{len(values)} fields, the header has {len(header)}"}
                continue
            yield start, dict(zip(header, values, strict=True))


def _read_bitext(path: Path) -> Iterator[tuple[int, Example | str]]:
    for line, row in _csv_rows(path, BITEXT_COLUMNS):
        if "__error__" in row:
            yield line, row["__error__"]
            continue
        question, answer = row["instruction"].strip(), row["response"].strip()
        if not question:
            yield line, "empty instruction"
        elif not answer:
            yield line, "empty response (no assistant turn)"
        else:
            turns = (Turn("user", question), Turn("assistant", answer))
            yield line, Example(turns, f"{path}:{line}", row.get("intent", "").strip())


_TWEET_TURN = re.compile(r"<(cust|rep)__(.*?)__(cust|rep)>", re.S)


def _parse_thread(text: str) -> list[tuple[str, str]] | str:
    """[(role, raw text)] or a description of what is wrong with the markup."""
    turns: list[tuple[str, str]] = []
    pos = 0
    for m in _TWEET_TURN.finditer(text):
        if text[pos:m.start()].strip():
            return f"text outside a turn: {text[pos:m.start()].strip()[:40]!r}"
        if m.group(1) != m.group(3):
            return f"turn opened as <{m.group(1)}__ but closed as __{m.group(3)}>"
        turns.append(("user" if m.group(1) == "cust" else "assistant", m.group(2)))
        pos = m.end()
    if text[pos:].strip():
        return f"text outside a turn: {text[pos:].strip()[:40]!r}"
    return turns


def _read_twacs(path: Path) -> Iterator[tuple[int, Example | str]]:
    for line, row in _csv_rows(path, TWACS_COLUMNS):
        if "__error__" in row:
            yield line, row["__error__"]
            continue
        if not row["first_utterance"].strip() and not row["context"].strip():
            yield line, "skip:empty row"
            continue
        first = _parse_thread(row["first_utterance"])
        rest = _parse_thread(row["context"])
        if isinstance(first, str) or isinstance(rest, str):
            bad = first if isinstance(first, str) else rest
            column = "first_utterance" if isinstance(first, str) else "context"
            yield line, f"{column}: {bad}"
            continue
        if not first:
            yield line, "first_utterance has no <cust__ ... __cust> turn"
            continue
        merged: list[tuple[str, str]] = []
        for role, raw in first + rest:
            text = clean_tweet(raw, agent=role == "assistant")
            if not text:
                continue
            if merged and merged[-1][0] == role:
                merged[-1] = (role, f"{merged[-1][1]} {text}")
            else:
                merged.append((role, text))
        while merged and merged[0][0] != "user":
            merged.pop(0)
        while merged and merged[-1][0] != "assistant":
            merged.pop()
        if not merged:
            yield line, "skip:no agent reply"
            continue
        turns = tuple(Turn(role, text) for role, text in merged)
        ident = row.get("first_tweet_id", "").strip()
        yield line, Example(turns, f"{path}:{line}", row.get("tag", "").strip(), ident)


def twacs_customer_turns(path: str | Path) -> Iterator[tuple[int, str]]:
    """Every customer turn of a TwACS file as (line, text), for unlabeled in-domain text.

    The anonymised handles (``__company__``, ``__cust__``) are written back as ``@user``, the
    form the sentiment normalisation gives real handles; the rest is left as published
    (entities and links included) for the caller's normalisation. A row whose markup is
    broken raises :class:`DataError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, 0, "no such file")
    for line, row in _csv_rows(path, TWACS_COLUMNS):
        if "__error__" in row:
            raise DataError(path, line, row["__error__"])
        for column in TWACS_COLUMNS:
            turns = _parse_thread(row[column])
            if isinstance(turns, str):
                raise DataError(path, line, f"{column}: {turns}")
            for role, raw in turns:
                text = _ANON.sub("@user", raw).strip()
                if role == "user" and text:
                    yield line, text


def _message(value: Any, index: int) -> Turn | str:
    if not isinstance(value, dict):
        return f"messages[{index}] is not an object"
    unknown = sorted(set(value) - _MESSAGE_KEYS)
    if unknown:
        return f"messages[{index}] has unknown key(s) {', '.join(unknown)}"
    role, content = value.get("role"), value.get("content")
    if role not in ROLES:
        return f"messages[{index}].role is {role!r}, expected one of {', '.join(ROLES)}"
    if not isinstance(content, str) or not content.strip():
        return f"messages[{index}].content is missing or empty"
    train = value.get("train", True)
    if not isinstance(train, bool):
        return f"messages[{index}].train must be true or false"
    author = value.get("author", "")
    if author and author not in _AUTHORS:
        return f"messages[{index}].author is {author!r}, expected bot or operator"
    return Turn(role, content.strip(), train, author)


def parse_json_line(text: str, source: str) -> Example | str:
    """One JSONL line as an :class:`Example`, or what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"malformed JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return "not a JSON object"
    unknown = sorted(set(obj) - _TOP_KEYS)
    if unknown:
        return f"unknown key(s) {', '.join(unknown)}; expected messages, id, group"
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no \"messages\" list"
    turns: list[Turn] = []
    for i, value in enumerate(messages):
        turn = _message(value, i)
        if isinstance(turn, str):
            return turn
        if turn.role == "system" and i:
            return f"messages[{i}]: a system message may only come first"
        turns.append(turn)
    body = [t for t in turns if t.role != "system"]
    if not body or body[0].role != "user":
        return "the conversation must start with a user message"
    if not any(t.role == "assistant" and t.train for t in body):
        return "no assistant turn to learn from"
    while turns[-1].role != "assistant":
        turns.pop()
    group, ident = obj.get("group", ""), obj.get("id", "")
    if not isinstance(group, str) or not isinstance(ident, (str, int)):
        return "\"group\" must be a string and \"id\" a string or number"
    return Example(tuple(turns), source, group, str(ident))


def _read_jsonl(path: Path) -> Iterator[tuple[int, Example | str]]:
    with _open_text(path) as f:
        try:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    yield line, parse_json_line(text, f"{path}:{line}")
        except UnicodeDecodeError as exc:
            raise DataError(path, 0, f"not UTF-8 text ({exc})") from None


def detect_format(path: Path) -> str:
    """``bitext``, ``twacs`` or ``jsonl``, from the name and the CSV header."""
    name = path.name.lower().removesuffix(".bz2")
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if not name.endswith(".csv"):
        raise DataError(path, 0, "unknown data format: expected .jsonl, .csv or .csv.bz2")
    with _open_text(path) as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(path, 1, "empty file: no header and no rows")
    if all(c in header for c in TWACS_COLUMNS):
        return "twacs"
    if all(c in header for c in BITEXT_COLUMNS):
        return "bitext"
    raise DataError(
        path, 1,
        f"unknown CSV columns {', '.join(header)}: expected Bitext "
        f"({', '.join(BITEXT_COLUMNS)}) or TwACS ({', '.join(TWACS_COLUMNS)})",
    )


_READERS = {"bitext": _read_bitext, "twacs": _read_twacs, "jsonl": _read_jsonl}


def _redacted(example: Example) -> Example:
    turns = tuple(
        Turn(t.role, redact_pii(t.content), t.train, t.author) for t in example.turns
    )
    return Example(turns, example.source, example.group, example.id)


def read_file(
    path: str | Path, *, skip_bad: bool = False, redact: bool = False
) -> tuple[list[Example], FileStats]:
    """All examples of one file; a bad row raises unless ``skip_bad`` (then it is counted)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, 0, "no such file")
    fmt = detect_format(path)
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    rows = 0
    for line, item in _READERS[fmt](path):
        rows += 1
        if isinstance(item, Example):
            examples.append(_redacted(item) if redact else item)
        elif item.startswith("skip:"):
            skipped[item.removeprefix("skip:")] += 1
        elif skip_bad:
            skipped[f"bad: {item.split(' (')[0]}"] += 1
        else:
            raise DataError(path, line, item)
    if rows == 0:
        raise DataError(path, 1, "empty file: no rows")
    if not examples:
        raise DataError(path, 1, f"no usable examples in {rows} row(s) ({dict(skipped)})")
    stats = FileStats(str(path), fmt, sha256_file(path), rows, len(examples), dict(skipped))
    return examples, stats


def load(
    paths: Iterable[str | Path], *, skip_bad: bool = False, redact: bool = False
) -> Dataset:
    """Every file read, then exact duplicates (same turns, any file) dropped."""
    seen: set[str] = set()
    kept: list[Example] = []
    files: list[FileStats] = []
    duplicates = 0
    for path in paths:
        examples, stats = read_file(path, skip_bad=skip_bad, redact=redact)
        files.append(stats)
        for example in examples:
            key = example.key
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            kept.append(example)
    return Dataset(tuple(kept), tuple(files), duplicates)


def split(
    examples: Sequence[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Held-out split by content hash, stratified by group; stable across file order.

    Within each group the examples are ordered by ``sha256(seed:key)`` and the first
    ``round(fraction * n)`` go to evaluation, so every intent is represented.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError("the eval fraction must be in [0, 1)")
    groups: dict[str, list[tuple[str, Example]]] = defaultdict(list)
    for example in examples:
        rank = hashlib.sha256(f"{seed}:{example.key}".encode()).hexdigest()
        groups[example.group].append((rank, example))
    train: list[tuple[str, Example]] = []
    held: list[tuple[str, Example]] = []
    for members in groups.values():
        members.sort(key=lambda pair: pair[0])
        n_eval = round(eval_fraction * len(members))
        if eval_fraction > 0 and n_eval == 0 and len(members) >= 2:
            n_eval = 1
        held.extend(members[:n_eval])
        train.extend(members[n_eval:])
    train.sort(key=lambda pair: pair[0])
    held.sort(key=lambda pair: pair[0])
    return [e for _, e in train], [e for _, e in held]


def write_jsonl(examples: Iterable[Example], path: str | Path) -> int:
    """Examples in the JSONL chat format; returns how many were written."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n
