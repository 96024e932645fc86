"""Faithfulness check: drop the sentences of a generated answer that the passages don't support.

A small generator answering from help-centre passages invents steps, prices, promises, times
and places. Every answer is split into claims (:func:`split_claims`, or :class:`SentenceBuffer`
while streaming) and each claim is checked by :class:`FaithfulnessChecker`: it is kept only if
its meaning is close to a sentence of the passages or of the customer's own words, every fact
in it (numbers, money, times, durations, dates, emails, URLs, phones, names) appears in those
sources, and every promise in it (refund, upgrade, free, call back, ...) appears in the
passages. Courtesy sentences with no content ("I'm happy to help.") are kept as framing.
:meth:`FaithfulnessChecker.extract` is the fallback when too little survives: plain sentences
of the best passage, chosen by similarity to the question.

Everything here is blocking (the encoder runs on the CPU); the pipeline calls it in a thread.
"""

from __future__ import annotations

import functools
import itertools
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from core.retrieval import QueryCache

if TYPE_CHECKING:
    from numpy.typing import NDArray

Embed = Callable[[Sequence[str]], "NDArray[np.float32]"]
Kind = Literal["claim", "framing"]

DEFAULT_THRESHOLD = 0.6
"""Least cosine similarity (all-MiniLM-L6-v2) between a claim and its closest source unit
(a passage sentence, a joined list, two neighbouring sentences, or a customer sentence).

Chosen on about 70 written claims against the shipped articles (reset-password, refund-policy,
contact-us, delivery-times, cancel-order): faithful paraphrases scored 0.64-1.0 against their
best unit, invented steps on the same topic ("Open your web browser", "Go to the login page and
click the reset link", "Restart your computer", "Clear your browser cache") 0.30-0.58. 0.6 is
the middle of that gap. Cosine similarity cannot see negation or a changed detail without a
fact in it ("We will email you your current password" scores 0.71 against "nobody ... can send
you your current password"), which is why facts and promises are checked separately."""
DEFAULT_FRAMING_THRESHOLD = 0.45
"""Least similarity to a built-in courtesy exemplar for a content-free sentence to count as
framing. The vocabulary test does most of the work; courtesy variants scored 0.48-1.0 ("Sure!"
0.62, "I'm glad I could help." 0.67), vague content-free statements lower ("The article says
what you need." 0.43), so those are checked as claims instead."""
DEFAULT_CACHE_SIZE = 4096
"""Source sentences whose embeddings are kept (1.5 KB each): the whole shipped knowledge base
is about 1,500 sentences and sentence pairs, so it fits with room for conversations."""
DEFAULT_EXTRACT_MARGIN = 0.15
"""An extracted sentence must score within this of the best one, so weak sentences are left out."""

# ---------------------------------------------------------------------------- splitting

_ABBREV_NEVER_END = frozenset(
    {"e.g.", "i.e.", "mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "vs.", "no.", "approx.",
     "incl.", "cf.", "fig.", "jr.", "sr.", "mt.", "ca.", "esp.", "dept.", "ref.", "tel."}
)
"""Abbreviations after which a sentence practically never ends."""
_ABBREV_MAY_END = frozenset({"etc.", "a.m.", "p.m.", "u.s.", "u.k.", "inc.", "ltd.", "co."})
"""Abbreviations that end a sentence when the next word starts with a capital."""
_TERMINATOR_RE = re.compile(r"(?:\.{2,}|…|[.!?]+)[\"'”’)\]]*(?=\s)")
_LIST_MARKER_RE = re.compile(r"(?<!\S)(\d{1,2})[.)](?=\s+\S)")
_BULLET_RE = re.compile(r"^\s*(?:[-*+•‣▪–]|\d{1,2}[.)])\s+")
_INLINE_BULLET_RE = re.compile(r"\s[•‣▪]\s")
_WORD_BEFORE_RE = re.compile(r"(\S+)$")
_SPACE_RE = re.compile(r"\s+")


def _is_end(text: str, start: int, end: int) -> bool:
    """Whether the terminator text[start:end] (followed by whitespace) ends a sentence."""
    rest = text[end:].lstrip()
    mark = text[start:end].rstrip("\"'”’)]")
    if not rest:
        return True
    if mark.endswith(("!", "?", "…")) or mark.endswith(".."):
        return not (mark.endswith((".", "…")) and rest[0].islower())
    word = _WORD_BEFORE_RE.search(text[:end])
    token = word.group(1).lower().lstrip("(\"'“‘") if word else ""
    if token in _ABBREV_NEVER_END:
        return False
    if rest[0].islower():
        return False
    if token in _ABBREV_MAY_END:
        return rest[0].isupper()
    return not (re.fullmatch(r"[a-z]\.", token) and rest[0].isupper())


def _marker_cuts(line: str) -> list[tuple[int, int]]:
    """Spans of numbered-list markers in a line: "1." at the start or after ':'/a sentence end,
    then each next number in sequence ("1. Open ... 2. Click ...")."""
    cuts: list[tuple[int, int]] = []
    expected = 0
    for match in _LIST_MARKER_RE.finditer(line):
        number = int(match.group(1))
        before = line[: match.start()].rstrip()
        at_start = not before or before.endswith((":", ".", "!", "?"))
        if (number == 1 and at_start) or (expected and number == expected) or not before:
            cuts.append((match.start(), match.end()))
            expected = number + 1
    return cuts


def _split_line(line: str) -> list[str]:
    """Sentences of one line: cut at list markers, inline bullets and sentence ends."""
    pieces: list[str] = []
    last = 0
    for start, end in _marker_cuts(line):
        pieces.append(line[last:start])
        last = end
    pieces.append(line[last:])
    out: list[str] = []
    for piece in pieces:
        for part in _INLINE_BULLET_RE.split(" " + piece + " "):
            part = _BULLET_RE.sub("", part)
            begin = 0
            for match in _TERMINATOR_RE.finditer(part):
                if _is_end(part, match.start(), match.end()):
                    out.append(part[begin : match.end()])
                    begin = match.end()
            out.append(part[begin:])
    return [s for s in (_SPACE_RE.sub(" ", p).strip() for p in out) if _has_text(s)]


def _has_text(sentence: str) -> bool:
    return any(ch.isalnum() for ch in sentence)


def _scan(text: str) -> tuple[list[str], bool]:
    """All sentences of ``text``, and whether the last one is proven finished (by a newline or
    by a sentence end followed by more text, which can only happen before the last)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    sentences: list[str] = []
    lines = text.split("\n")
    for line in lines:
        sentences.extend(_split_line(line))
    closed = len(lines) > 1 and not lines[-1].strip()
    return sentences, closed


def split_claims(text: str) -> list[str]:
    """Split an answer into claims: sentences, and each item of a numbered or bulleted list.

    Newlines always end a claim. A '.', '!', '?' or ellipsis ends one only when whitespace
    follows, so prices, decimals, URLs and emails stay whole; after abbreviations (e.g., Mr.)
    or before a lowercase word a '.' does not end one.
    """
    return _scan(text)[0]


class SentenceBuffer:
    """Collects a streamed answer and hands out each sentence once it is proven complete.

    A sentence is complete when text after its end shows it ended (a space and the next
    character, or a newline). The buffer re-splits the whole text it has seen, so the sentences
    it returns, in any chunking, are exactly :func:`split_claims` of the whole text.
    """

    __slots__ = ("_emitted", "_parts")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._emitted = 0

    def feed(self, piece: str) -> list[str]:
        """The sentences completed by ``piece``."""
        if not piece:
            return []
        self._parts.append(piece)
        sentences, closed = _scan("".join(self._parts))
        ready = sentences if closed else sentences[:-1]
        new = ready[self._emitted :]
        self._emitted = max(self._emitted, len(ready))
        return new

    def flush(self) -> list[str]:
        """The sentences not handed out yet, at the end of the stream; the buffer is reset."""
        sentences, _ = _scan("".join(self._parts))
        rest = sentences[self._emitted :]
        self._parts.clear()
        self._emitted = 0
        return rest


# ---------------------------------------------------------------------------- Markdown

_FRONT_MATTER_RE = re.compile(r"\A\s*(\+\+\+|---)\n.*?\n\1[ \t]*(?:\n|\Z)", re.S)
_HEADING_RE = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_ITEM_RE = re.compile(r"^\s*(?:[-*+•]|\d{1,2}[.)])\s+(.*)$")
_IMAGE_RE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK_RE = re.compile(r"\[([^\]]+)\]\(([^)\s]+)[^)]*\)")
_EMPHASIS_RES = (
    re.compile(r"\*\*(.+?)\*\*"),
    re.compile(r"(?<!\w)__(.+?)__(?!\w)"),
    re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])"),
    re.compile(r"(?<!\w)_(?!\s)(.+?)(?<!\s)_(?!\w)"),
    re.compile(r"`([^`]+)`"),
)
_RULE_RE = re.compile(r"^\s*(?:[-*_]\s*){3,}$")


def _inline_plain(text: str) -> str:
    """Markdown inline markup removed: links keep their text, emphasis and code their content."""
    text = _IMAGE_RE.sub(r"\1", text)
    text = _LINK_RE.sub(r"\1", text)
    for pattern in _EMPHASIS_RES:
        text = pattern.sub(r"\1", text)
    return _SPACE_RE.sub(" ", text).strip()


@dataclass(frozen=True, slots=True)
class _Block:
    """A heading, a paragraph or a list (items) of a Markdown passage, in plain text."""

    kind: Literal["heading", "paragraph", "list"]
    lines: tuple[str, ...]


def _blocks(passage: str) -> list[_Block]:
    body = _FRONT_MATTER_RE.sub("", passage, count=1)
    blocks: list[_Block] = []
    current: list[str] = []
    current_kind: Literal["paragraph", "list"] = "paragraph"
    in_fence = False

    def close() -> None:
        if current:
            blocks.append(_Block(current_kind, tuple(current)))
            current.clear()

    for raw in body.replace("\r\n", "\n").split("\n"):
        if raw.strip().startswith(("```", "~~~")):
            in_fence = not in_fence
            close()
            continue
        if in_fence or _RULE_RE.match(raw) or not raw.strip():
            close()
            continue
        heading = _HEADING_RE.match(raw)
        item = _ITEM_RE.match(raw)
        line = raw.strip().lstrip(">").strip()
        if heading:
            close()
            blocks.append(_Block("heading", (_inline_plain(heading.group(1)),)))
        elif item:
            if current_kind != "list":
                close()
                current_kind = "list"
            current.append(_inline_plain(item.group(1)))
        elif current_kind == "list" and current and raw[:1].isspace():
            current[-1] = current[-1] + " " + _inline_plain(line)
        else:
            if current_kind != "paragraph":
                close()
                current_kind = "paragraph"
            current.append(_inline_plain(line))
    close()
    return blocks


def _is_fragment(item: str) -> bool:
    return item[:1].islower() or not item.rstrip().endswith((".", "!", "?"))


@functools.lru_cache(maxsize=1024)
def _readable(passage: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(readable sentences, every sentence) of a Markdown passage, in plain text.

    Readable sentences are what :meth:`FaithfulnessChecker.extract` may show: paragraph
    sentences, list items that are sentences, and lists of fragments ("your full name or
    account ID,") joined into one sentence after their lead-in or heading. Every sentence adds
    the headings and the single list items, for checking claims against.
    """
    readable: list[str] = []
    every: list[str] = []
    heading = ""
    for block in _blocks(passage):
        if block.kind == "heading":
            heading = block.lines[0]
            every.extend(split_claims(heading))
            continue
        if block.kind == "paragraph":
            sentences = split_claims(" ".join(block.lines))
            readable.extend(sentences)
            every.extend(sentences)
        else:
            items = [i for i in block.lines if _has_text(i)]
            every.extend(s for item in items for s in split_claims(item))
            if items and all(_is_fragment(i) for i in items):
                joined = ", ".join(i.rstrip(" ,;.") for i in items) + "."
                if readable and readable[-1].endswith(":"):
                    readable[-1] = readable[-1] + " " + joined
                elif heading:
                    readable.append(f"{heading}: {joined}")
                else:
                    readable.append(joined[:1].upper() + joined[1:])
            else:
                readable.extend(s for item in items for s in split_claims(item))
        heading = ""
    return tuple(readable), tuple(dict.fromkeys(every))


def _units(passage: str) -> tuple[str, ...]:
    """What a claim is compared with: every sentence, the readable ones, and adjacent pairs
    (an answer often merges two neighbouring sentences into one)."""
    readable, every = _readable(passage)
    pairs = tuple(f"{a} {b}" for a, b in itertools.pairwise(every))
    return tuple(dict.fromkeys((*every, *readable, *pairs)))


# ---------------------------------------------------------------------------- facts

_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
}
_NUM = r"(\d+(?:,\d{3})*(?:\.\d+)?|" + "|".join(_NUMBER_WORDS) + r")"
_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL_RE = re.compile(
    r"(?:https?://|www\.)[^\s<>\"')\]]+|\b[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|io|co|uk|de|fr|"
    r"eu|us|ca|info|shop|store)\b(?:/[^\s<>\"')\]]*)?",
    re.I,
)
_PHONE_RE = re.compile(r"(?<![\w$])\+?\(?\d[\d\s().-]{6,}\d(?![\w%])")
_DATE_NUM_RE = re.compile(r"\b\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}\b")
_MONEY_RE = re.compile(
    r"([$€£])\s?(\d+(?:,\d{3})*(?:\.\d+)?)|\b" + _NUM + r"\s?(dollars?|bucks|usd|euros?|eur"
    r"|pounds?|gbp)\b",
    re.I,
)
_PERCENT_RE = re.compile(r"\b(\d+(?:\.\d+)?)\s?(%|percent\b|per\s?cent\b)", re.I)
_TIME_RE = re.compile(
    r"\b(\d{1,2}|" + "|".join(_NUMBER_WORDS) + r")(?::([0-5]\d))?\s?([ap])\.?\s?m\b\.?"
    r"|\b([01]?\d|2[0-3]):([0-5]\d)\b|\b(noon|midday|midnight)\b",
    re.I,
)
_DURATION_RE = re.compile(
    r"\b(\d+(?:,\d{3})*(?:\.\d+)?|an?|" + "|".join(_NUMBER_WORDS) + r")(?:\s|-)?"
    r"(?:(?:business|working|calendar|full)[\s-])?"
    r"(minute|min|hour|hr|day|night|week|month|year|yr)s?\b",
    re.I,
)
_BARE_NUMBER_RE = re.compile(r"(?<![\w.,])(\d+(?:,\d{3})*(?:\.\d+)?)(?:st|nd|rd|th)?(?![\w])")
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december")
_WEEKDAY_RE = re.compile(r"\b(" + "|".join(_WEEKDAYS) + r")s?\b", re.I)
_MONTH_RE = re.compile(r"\b(" + "|".join(m.capitalize() for m in _MONTHS) + r")\b")
_RELATIVE_DAY_RE = re.compile(r"\b(today|tonight|tomorrow|yesterday)\b", re.I)
_CAPITALISED_RE = re.compile(r"(?<![\w'’-])([A-Z][\w'’&-]*[A-Za-z0-9]|[A-Z])(?![\w'’])")
_LOWER_NAME_RE = re.compile(r"(?<![\w'’-])([a-z]+[A-Z][\w-]*)")
_UNITS = {"min": "minute", "hr": "hour", "yr": "year", "night": "day"}

_COMMON_CAPITALISED = frozenset(
    """a an the and or but if so then than to of for in on at by with about from as into onto
    up out over under after before while when where what which who whom whose why how yes no
    not i i'm i'll i'd i've me my mine we we're we'll we'd we've us our ours you you're you'll
    you'd you've your yours he she it it's its they they're their them this that that's these
    those there there's here here's is are was were be been being am do does did done have has
    had can could would should will shall may might must please thanks thank sorry hi hello
    hey dear ok okay sure great yes note also just once each every all any some most many more
    no none nothing everything anything something both either neither other another such only
    first next finally again now let let's unfortunately however otherwise alternatively
    meanwhile additionally also simply afterwards unless because since although though even
    whether""".split()
)
"""Words that are capitalised because they start a sentence or a clause, never names."""


@dataclass(frozen=True, slots=True)
class _Fact:
    key: str
    shown: str


def _num(text: str) -> str:
    """A number's canonical form: digits for number words ("a day" is one), no thousands commas,
    no ".00"."""
    word = _NUMBER_WORDS.get(text.lower(), 1 if text.lower() in ("a", "an") else None)
    value = float(word if word is not None else text.replace(",", ""))
    return f"{value:g}"


def _mask(text: str, spans: Iterable[tuple[int, int]]) -> str:
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    return "".join(chars)


def _clean_url(url: str) -> str:
    url = re.sub(r"^(?:https?://)?(?:www\.)?", "", url.lower()).rstrip(".,;:!?/")
    return url


def _facts(text: str) -> tuple[list[_Fact], set[str]]:
    """The facts of a text, and every number value in it (also those inside facts and number
    words), which is what a bare number in a claim may match."""
    facts: list[_Fact] = []
    numbers: set[str] = set()
    for pattern, kind in ((_EMAIL_RE, "email"), (_URL_RE, "url")):
        spans = []
        for match in pattern.finditer(text):
            value = match.group(0).lower() if kind == "email" else _clean_url(match.group(0))
            facts.append(_Fact(f"{kind}:{value}", match.group(0).rstrip(".,;:!?")))
            spans.append(match.span())
        text = _mask(text, spans)
    spans = []
    for match in _PHONE_RE.finditer(text):
        digits = re.sub(r"\D", "", match.group(0))
        if len(digits) >= 7 and not _DATE_NUM_RE.fullmatch(match.group(0).strip()):
            facts.append(_Fact(f"phone:{digits[-10:]}", match.group(0).strip()))
            spans.append(match.span())
    text = _mask(text, spans)
    spans = []
    for match in _DATE_NUM_RE.finditer(text):
        parts = [str(int(p)) for p in re.split(r"[/.-]", match.group(0))]
        facts.append(_Fact("date:" + "/".join(parts), match.group(0)))
        spans.append(match.span())
    text = _mask(text, spans)
    spans = []
    for match in _MONEY_RE.finditer(text):
        amount = match.group(2) or match.group(3)
        value = _num(amount)
        facts.append(_Fact(f"money:{value}", match.group(0).strip()))
        numbers.add(value)
        spans.append(match.span())
    for match in _PERCENT_RE.finditer(text):
        value = _num(match.group(1))
        facts.append(_Fact(f"percent:{value}", match.group(0)))
        numbers.add(value)
        spans.append(match.span())
    text = _mask(text, spans)
    spans = []
    for match in _TIME_RE.finditer(text):
        if match.group(6):
            word = match.group(6).lower()
            key = "12:00pm" if word in ("noon", "midday") else "12:00am"
        elif match.group(1):
            hour = int(_num(match.group(1)))
            key = f"{hour}:{match.group(2) or '00'}{match.group(3).lower()}m"
            numbers.add(str(hour))
        else:
            hour = int(match.group(4))
            half = "pm" if hour >= 12 else "am"
            key = f"{(hour % 12) or 12}:{match.group(5)}{half}"
            numbers.add(str(hour))
        facts.append(_Fact(f"time:{key}", match.group(0).strip().rstrip(".")))
        spans.append(match.span())
    text = _mask(text, spans)
    spans = []
    for match in _DURATION_RE.finditer(text):
        value = _num(match.group(1))
        unit = match.group(2).lower()
        facts.append(_Fact(f"duration:{value} {_UNITS.get(unit, unit)}", match.group(0)))
        numbers.add(value)
        spans.append(match.span())
    for word in _NUMBER_WORDS:
        if re.search(rf"\b{word}\b", text, re.I):
            numbers.add(_num(word))
    text = _mask(text, spans)
    for match in _BARE_NUMBER_RE.finditer(text):
        value = _num(match.group(1))
        facts.append(_Fact(f"number:{value}", match.group(1)))
        numbers.add(value)
    for match in _WEEKDAY_RE.finditer(text):
        facts.append(_Fact(f"day:{match.group(1).lower()}", match.group(0)))
    for match in _MONTH_RE.finditer(text):
        if match.group(1) == "May" and not re.match(r"\s+\d", text[match.end() :]):
            continue
        facts.append(_Fact(f"day:{match.group(1).lower()}", match.group(0)))
    for match in _RELATIVE_DAY_RE.finditer(text):
        facts.append(_Fact(f"day:{match.group(1).lower()}", match.group(0)))
    return facts, numbers


def _name_facts(sentence: str) -> list[_Fact]:
    """Capitalised words that are names: not common words, and not the first word of the
    sentence (or of a quotation), which is capitalised anyway, unless it is written like a
    name (PayPal, UPS); in "New York is ..." the check still catches "York"."""
    text = _mask(sentence, (m.span() for m in _EMAIL_RE.finditer(sentence)))
    text = _mask(text, (m.span() for m in _URL_RE.finditer(text)))
    facts: list[_Fact] = []
    for match in _CAPITALISED_RE.finditer(text):
        word = re.sub(r"['’]s$", "", match.group(1))
        lower = word.lower()
        if lower in _COMMON_CAPITALISED or lower in _WEEKDAYS or lower in _MONTHS:
            continue
        before = text[: match.start()].rstrip()
        initial = not before or before.endswith((".", "!", "?", ":", "\"", "“", "'", "‘", "("))
        mixed = any(ch.isupper() for ch in word[1:])
        if initial and not mixed and not (len(word) > 1 and word.isupper()):
            continue
        facts.append(_Fact(f"name:{lower}", word))
    facts.extend(_Fact(f"name:{m.group(1).lower()}", m.group(1)) for m in _LOWER_NAME_RE.finditer(
        text))
    return facts


def named(text: str) -> list[str]:
    """The names ``text`` mentions (see :func:`unknown_names`), each once."""
    found: dict[str, str] = {}
    for sentence in split_claims(text) or [text]:
        for fact in _name_facts(sentence):
            found.setdefault(fact.key, fact.shown)
    return list(found.values())


def unknown_names(text: str, passages: Sequence[str]) -> list[str]:
    """The names in ``text`` (places, products, programmes, codes such as CDG) that no
    passage mentions: a question about them is one the passages do not answer."""
    source = _merge(_source(p) for p in passages)
    names: dict[str, str] = {}
    for sentence in split_claims(text) or [text]:
        for fact in _name_facts(sentence):
            if fact.key not in source.keys and fact.key.removeprefix("name:") not in source.words:
                names.setdefault(fact.key, fact.shown)
    return list(names.values())


@dataclass(frozen=True, slots=True)
class _Source:
    """What the sources (passages and conversation) offer for the fact and promise rules."""

    keys: frozenset[str]
    numbers: frozenset[str]
    words: frozenset[str]
    promises: frozenset[str]


_WORD_RE = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")


@functools.lru_cache(maxsize=2048)
def _source(text: str) -> _Source:
    plain = " ".join(_readable(text)[1]) + " " + " ".join(
        m.group(2) for m in _LINK_RE.finditer(text)
    )
    facts, numbers = _facts(plain)
    words = frozenset(w.replace("’", "'") for w in _WORD_RE.findall(plain.lower()))
    words |= frozenset(re.sub(r"'s$", "", w) for w in words)
    return _Source(
        frozenset(f.key for f in facts), frozenset(numbers), words, frozenset(_promises(plain))
    )


def _merge(sources: Iterable[_Source]) -> _Source:
    keys: set[str] = set()
    numbers: set[str] = set()
    words: set[str] = set()
    promises: set[str] = set()
    for source in sources:
        keys |= source.keys
        numbers |= source.numbers
        words |= source.words
        promises |= source.promises
    return _Source(frozenset(keys), frozenset(numbers), frozenset(words), frozenset(promises))


def _missing_facts(claim: str, source: _Source) -> list[str]:
    facts, _ = _facts(claim)
    missing: list[str] = []
    for fact in facts:
        kind, _, value = fact.key.partition(":")
        if kind == "number":
            found = value in source.numbers
        elif kind == "duration":
            found = fact.key in source.keys or (
                value.split()[1] == "day" and f"duration:{value.split()[0]} night" in source.keys
            )
        else:
            found = fact.key in source.keys
        if not found and fact.shown not in missing:
            missing.append(fact.shown)
    for fact in _name_facts(claim):
        if fact.key.partition(":")[2] not in source.words and fact.shown not in missing:
            missing.append(fact.shown)
    return missing


# ---------------------------------------------------------------------------- promises

_PROMISES: dict[str, tuple[str, ...]] = {
    "refund": (
        r"refund\w*", r"reimburs\w*", r"money back", r"pay(?:ing)? you back", r"repa(?:y|id)"
    ),
    "compensation": (r"compensat\w*", r"make (?:it|this) up to you", r"goodwill"),
    "credit": (r"credit(?:s|ed|ing)?(?! cards?)", r"store credit"),
    "voucher": (r"vouchers?", r"coupons?", r"gift cards?", r"promo(?:tional)? codes?",
                r"discount codes?"),
    "upgrade": (r"upgrad\w*",),
    "discount": (r"discount\w*", r"\d+ ?% off", r"percent off", r"price reduction",
                 r"reduc\w* (?:the|your) price", r"cheaper"),
    "free": (r"(?<!feel )free(?! to)(?! of (?:any )?(?:worry|hassle|errors?|stains?))",
             r"complimentary", r"at no (?:extra |additional )?(?:cost|charge)",
             r"no (?:extra |additional )?charge", r"on the house", r"without charge"),
    "waive": (r"waiv\w*",),
    "call back": (r"call (?:you|back)", r"(?:phone|ring) you", r"give you a (?:call|ring)",
                  r"calls? you back", r"callback"),
    "send someone": (r"send (?:someone|somebody|a technician|an? (?:agent|engineer|courier))",
                     r"visit you", r"come to your"),
    "expedite": (r"expedit\w*", r"rush(?:ed)? (?:order|shipping|delivery)", r"prioriti[sz]\w*",
                 r"priority", r"fast[- ]track\w*"),
    "guarantee": (r"guarant\w*", r"i promise", r"we promise", r"assure you"),
    "replacement": (r"replac\w*",),
}
_PROMISE_RES = {
    group: re.compile(r"\b(?:" + "|".join(patterns) + r")", re.I)
    for group, patterns in _PROMISES.items()
}
_COMMITMENT_RE = re.compile(
    r"\b(?:i|we|us|let me|you(?:'|’)ll|you will|you(?:'|’)re entitled|you are entitled|"
    r"you can (?:get|have|receive)|you(?:'|’)re eligible|you are eligible|you get|you receive)\b",
    re.I,
)


def _promises(text: str) -> dict[str, str]:
    """Promise groups in a text, each with the words that said it."""
    found: dict[str, str] = {}
    for group, pattern in _PROMISE_RES.items():
        match = pattern.search(text)
        if match:
            found[group] = match.group(0)
    return found


# ---------------------------------------------------------------------------- framing

_FRAMING_EXEMPLARS = (
    "I'm happy to help with that.",
    "I'd be glad to help you with this.",
    "I'm sorry to hear that.",
    "I understand how frustrating that must be.",
    "Thank you for reaching out.",
    "Thanks for your patience.",
    "Is there anything else I can help you with?",
    "Let me know if you have any other questions.",
    "Here is what our help centre says:",
    "Here's what I found.",
    "I hope this helps!",
    "Have a great day!",
    "Sure, let me help.",
    "You're welcome.",
    "Great question!",
)
_FRAMING_VOCABULARY = frozenset(
    """a an the and or but if so to of for in on at with about from by as is are was were be been
    being am do does did have has had i i'm i'll i'd i've me my we we're we'll we'd we've us our
    you you're you'll you'd you've your it it's its this that that's these those there there's
    here here's what what's which how just also very really too please thank thanks thankyou
    welcome happy glad pleased delighted help helping helped assist assisting assistance sorry
    apologise apologize apologies apologising apologizing hear hearing heard understand
    understandable frustrating frustration inconvenience trouble patience know let hope helps
    helpful great good day wonderful nice hi hello hey dear sure certainly absolutely course
    okay ok questions question reaching contacting contact out touch say says said information
    info following below look looking find found answer answers article help centre center
    can could would will should may might any anything else other more further again today
    need want like feel free ask asking worry worries problem no not don't all right fine
    glad note some get back that's way that'd totally definitely love enjoy rest week
    yours sincerely cheers bye goodbye best regards kind regards there's quite one wait
    moment check checking""".split()
)
"""Words a courtesy sentence may use; any other word means it says something."""


@dataclass(frozen=True, slots=True)
class Claim:
    """One sentence of an answer and the verdict on it; ``reason`` is "" when it is supported."""

    text: str
    supported: bool
    similarity: float
    reason: str
    kind: Kind


@dataclass(frozen=True, slots=True)
class Verdict:
    """The claims of one answer, in order."""

    claims: tuple[Claim, ...]

    @property
    def supported_text(self) -> str:
        return " ".join(c.text for c in self.claims if c.supported)

    @property
    def dropped(self) -> tuple[Claim, ...]:
        return tuple(c for c in self.claims if not c.supported)

    @property
    def n_claims(self) -> int:
        return len(self.claims)

    @property
    def n_supported(self) -> int:
        return sum(1 for c in self.claims if c.supported)

    @property
    def n_dropped(self) -> int:
        return self.n_claims - self.n_supported

    @property
    def dropped_share(self) -> float:
        return self.n_dropped / self.n_claims if self.claims else 0.0


class FaithfulnessChecker:
    """Checks answer sentences against the retrieved passages and the customer's words.

    ``embed`` returns L2-normalised rows, one per text (``Retriever.embed``). Source sentences
    (passages, conversation) are embedded once and kept in a bounded LRU, so checking many
    answers against the same articles only embeds the answers' own sentences. Thread-safe.
    """

    __slots__ = (
        "_cache",
        "_embed",
        "_exemplar_lock",
        "_exemplars",
        "extract_margin",
        "framing_threshold",
        "threshold",
    )

    def __init__(
        self,
        embed: Embed,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        framing_threshold: float = DEFAULT_FRAMING_THRESHOLD,
        cache_size: int = DEFAULT_CACHE_SIZE,
        extract_margin: float = DEFAULT_EXTRACT_MARGIN,
    ) -> None:
        self._embed = embed
        self.threshold = threshold
        self.framing_threshold = framing_threshold
        self.extract_margin = extract_margin
        self._cache = QueryCache(cache_size)
        self._exemplars: NDArray[np.float32] | None = None
        self._exemplar_lock = threading.Lock()

    @property
    def cached(self) -> int:
        """How many source sentence embeddings the cache holds."""
        return len(self._cache)

    def check_claim(
        self, claim: str, passages: Sequence[str], conversation: Sequence[str] = ()
    ) -> Claim:
        """The verdict on one sentence (used while streaming, sentence by sentence)."""
        return self._check([claim], passages, conversation)[0]

    def check(
        self, answer: str, passages: Sequence[str], conversation: Sequence[str] = ()
    ) -> Verdict:
        """The verdict on every claim of ``answer``."""
        return Verdict(tuple(self._check(split_claims(answer), passages, conversation)))

    def extract(self, question: str, passages: Sequence[str], max_sentences: int = 3) -> list[str]:
        """Up to ``max_sentences`` plain sentences of the first passage closest in meaning to
        ``question``, in the passage's order: the answer when the generated one is unusable."""
        if not passages or max_sentences < 1:
            return []
        readable, every = _readable(passages[0])
        statements = [
            s for s in readable if not s.endswith("?") and not s.lower().startswith("see ")
        ]
        candidates = statements or list(readable or every)
        if not candidates:
            text = _inline_plain(_FRONT_MATTER_RE.sub("", passages[0], count=1))
            return [text] if text else []
        if len(candidates) == 1:
            return candidates
        query = self._embed([question])[0]
        scores = self._source_vectors(candidates) @ query
        best = float(scores.max())
        ranked = [i for i in np.argsort(-scores, kind="stable")[:max_sentences]
                  if scores[i] >= best - self.extract_margin]
        return [candidates[i] for i in sorted(int(i) for i in ranked)]

    def relevance(self, question: str, sentences: Sequence[str]) -> float:
        """How close the nearest of ``sentences`` is to ``question`` in meaning (cosine): a
        true sentence about something else answers nothing."""
        if not sentences:
            return 0.0
        vectors = self._embed([question, *sentences])
        return float((vectors[1:] @ vectors[0]).max())

    # ------------------------------------------------------------------------ internals

    def _source_vectors(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Embeddings of source sentences, from the cache or embedded together now."""
        found: dict[str, NDArray[np.float32]] = {}
        for text in texts:
            vector = self._cache.get(text)
            if vector is not None:
                found[text] = vector
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            vectors = self._embed(missing)
            for text, vector in zip(missing, vectors, strict=True):
                found[text] = self._cache.put(text, vector)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[t] for t in texts])

    def _exemplar_vectors(self) -> NDArray[np.float32]:
        with self._exemplar_lock:
            if self._exemplars is None:
                self._exemplars = np.asarray(self._embed(_FRAMING_EXEMPLARS), dtype=np.float32)
            return self._exemplars

    def _check(
        self, claims: Sequence[str], passages: Sequence[str], conversation: Sequence[str]
    ) -> list[Claim]:
        if not claims:
            return []
        passage_units = [u for p in passages for u in _units(p)]
        said = [s for turn in conversation for s in split_claims(turn)]
        talk_units = list(dict.fromkeys([*said, *(" ".join(t.split()) for t in conversation)]))
        units = list(dict.fromkeys([*passage_units, *talk_units]))
        claim_vectors = np.asarray(self._embed(list(claims)), dtype=np.float32)
        if units:
            scores = claim_vectors @ self._source_vectors(units).T
        else:
            scores = np.zeros((len(claims), 0), dtype=np.float32)
        from_passages = _merge(_source(p) for p in passages)
        source = _merge([from_passages, *(_source(t) for t in conversation)])
        talk_index = [i for i, u in enumerate(units) if u in set(talk_units)]
        framing = self._exemplar_vectors() @ claim_vectors.T
        verdicts: list[Claim] = []
        for row, claim in enumerate(claims):
            best = float(scores[row].max()) if units else 0.0
            restating = bool(talk_index) and float(scores[row, talk_index].max()) >= self.threshold
            verdicts.append(
                self._judge(claim, best, float(framing[:, row].max()), from_passages, source,
                            restating)
            )
        return verdicts

    def _judge(
        self,
        claim: str,
        best: float,
        framing: float,
        from_passages: _Source,
        source: _Source,
        restating: bool,
    ) -> Claim:
        similarity = round(best, 4)
        promises = _promises(claim)
        if _is_framing(claim, promises) and framing >= self.framing_threshold:
            return Claim(claim, True, similarity, "", "framing")
        missing = _missing_facts(claim, source)
        if missing:
            return Claim(claim, False, similarity, "not in the passages: " + ", ".join(missing),
                         "claim")
        committed = not restating or _COMMITMENT_RE.search(claim) is not None
        for group, words in promises.items():
            if group not in from_passages.promises and committed:
                return Claim(claim, False, similarity, f"promise not in the passages: {words}",
                             "claim")
        if best < self.threshold:
            return Claim(claim, False, similarity, "no passage says this", "claim")
        return Claim(claim, True, similarity, "", "claim")


def _is_framing(claim: str, promises: dict[str, str]) -> bool:
    """No promise, no fact (beyond "today") and only courtesy words."""
    if promises:
        return False
    facts, _ = _facts(claim)
    if any(f.key != "day:today" for f in facts) or _name_facts(claim):
        return False
    words = [w.replace("’", "'") for w in _WORD_RE.findall(claim.lower())]
    return bool(words) and all(w in _FRAMING_VOCABULARY for w in words)
