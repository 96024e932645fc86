"""Grounded answers: knowledge-base passages in the system prompt, or "I don't know".

A support bot that invents a refund policy does harm, so before generating, the pipeline asks
:meth:`Grounder.ground` for the passages that answer the question. They go into the system
prompt with their article ids and the order to answer only from them; the reply cites their
articles. When nothing clears the retriever's similarity threshold the answer is
``no_answer``: the pipeline says so (:data:`NO_ANSWER_TEXT`) and hands the chat to a person
instead of letting the model guess.

Greetings, thanks and closings ("thanks!", "ok bye", "👍") match no article either, but handing
them to a person wastes an operator's time: :class:`SmallTalkDetector` recognises them (a
vocabulary of small-talk words, emoji, or a short message whose MiniLM embedding is close to
one of the exemplars in ``knowledge/small_talk.toml`` and asks nothing), and the grounding is
then ``small_talk``: a brief, friendly answer without facts or citations, and no hand-off.

A model fine-tuned on the Bitext data writes placeholders such as ``{{Order Number}}`` where
the data set anonymised a value. :func:`fill_placeholders` fills them from what the customer
already told us (:func:`extract_context`) or from configured facts, and otherwise rewrites
them into plain words ("your order number", "our website"); no ``{{...}}`` and no stray brace
ever reaches a customer. :class:`StreamingPlaceholderFilter` does the same on a token stream
and gives exactly the whole-text result, holding back only what a later piece could change.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.knowledge import KnowledgeError
from core.messages import Citation
from core.retrieval import Hit, RetrievalError, Retriever, citations, retrieval_query

if TYPE_CHECKING:
    from numpy.typing import NDArray


log = logging.getLogger(__name__)

NO_ANSWER_TEXT = (
    "I'm sorry, I don't know the answer to that, and I'd rather not guess. I've asked a person "
    "from our support team to help you; they will reply here shortly."
)
"""What the customer reads when the knowledge base has nothing relevant (reason ``no_answer``)."""
NO_ANSWER_UNHAPPY_TEXT = (
    "I'm sorry about this. I can't find an answer to it in our help centre, and I'd rather not "
    "guess, so I've asked a person from our support team to help you; they will reply here "
    "shortly."
)
"""The same for an unhappy customer (P(negative) >= 0.5): many of their "questions" are
venting ("why do bags always take 25 minutes?"), and "I don't know the answer to that"
reads as a shrug; an apology first fits a question and a complaint alike."""

GROUNDING_INSTRUCTION = (
    "Answer only from the help-center passages below; each starts with its article id in "
    "square brackets. If they do not answer the question, say that you don't know and offer "
    "to connect the customer with a person. Never invent policies, prices, dates, fees or "
    "order details."
)

SMALL_TALK_INSTRUCTION = (
    "The customer is only greeting, thanking or acknowledging. Reply with one short, friendly "
    "sentence and ask what you can help with. Give no facts about orders, policies or prices."
)

DEFAULT_K = 3
DEFAULT_MAX_CONTEXT_CHARS = 2400
"""About 600 tokens of passages: enough for three passages without crowding out the history."""
DEFAULT_CITE_MARGIN = 0.05
"""A passage's article is cited when its score is within this of the best hit's score."""
SMALL_TALK_FILE = "small_talk.toml"
SHIPPED_SMALL_TALK = Path(__file__).resolve().parents[1] / "knowledge" / SMALL_TALK_FILE
"""The exemplars used when the knowledge folder has no ``small_talk.toml`` of its own."""
DEFAULT_SMALL_TALK_THRESHOLD = 0.45
"""Cosine similarity to the nearest exemplar. Chosen without the evaluation's small-talk list:
90% of the exemplars are at least this close to another exemplar, and of the 394 Bitext
requests no article answers, one short one is this close ("I have got to speak with
somebody")."""
DEFAULT_SMALL_TALK_WORDS = 10
"""Longer messages are never small talk by similarity (the longest exemplar has 7 words)."""

# Context keys understood by fill_placeholders (extract_context fills the customer's ones).
ORDER_NUMBER = "order_number"
INVOICE_NUMBER = "invoice_number"
TRACKING_NUMBER = "tracking_number"
CUSTOMER_NAME = "customer_name"
SUPPORT_PHONE = "support_phone"
SUPPORT_EMAIL = "support_email"
SUPPORT_HOURS = "support_hours"
WEBSITE_URL = "website_url"
WEBSITE_NAME = "website_name"
COMPANY_NAME = "company_name"


# -- grounding ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grounding:
    """What to generate from: a grounded system prompt and its citations, or ``no_answer``.

    ``context`` holds the facts for :func:`fill_placeholders` (configured ones, overridden by
    what the customer wrote); ``hits`` are the passages used, for logging their scores.
    ``small_talk``: a greeting or thanks the knowledge base has nothing for; it is answered
    (briefly, without facts) rather than handed to a person.
    """

    system_prompt: str = ""
    citations: tuple[Citation, ...] = ()
    no_answer: bool = False
    small_talk: bool = False
    hits: tuple[Hit, ...] = ()
    context: Mapping[str, str] = field(default_factory=dict)


def select_hits(hits: Sequence[Hit], max_chars: int) -> list[Hit]:
    """The hits that fit in ``max_chars`` of passage text, best first; the best always does."""
    chosen: list[Hit] = []
    used = 0
    for hit in hits:
        size = len(hit.text) + len(hit.title) + len(hit.article_id) + 8
        if chosen and used + size > max_chars:
            continue
        chosen.append(hit)
        used += size
    return chosen


def cited(hits: Sequence[Hit], margin: float) -> tuple[Citation, ...]:
    """The articles worth citing: those of hits scoring within ``margin`` of the best."""
    if not hits:
        return ()
    best = max(h.score for h in hits)
    return citations([h for h in hits if h.score >= best - margin])


def grounded_prompt(base: str, hits: Sequence[Hit]) -> str:
    """The base system prompt, the instruction, then each passage under its article id."""
    blocks = []
    for hit in hits:
        text = hit.text.strip()
        if not text.lstrip("#").strip().startswith(hit.title):
            text = f"{hit.title}\n{text}"
        blocks.append(f"[{hit.article_id}] {text}")
    return "\n\n".join([base.strip(), GROUNDING_INSTRUCTION, *blocks])


class Grounder:
    """Turns a question (and the customer's recent turns) into a :class:`Grounding`.

    The retriever's index is rebuilt when an article file changes, checked at most every
    ``reload_interval_s`` (0: never); a broken article keeps the old index and is logged.

    The retriever owns the reload schedule (``reload_interval_s``, given here, sets it): it
    looks at the article files at most once per interval, whoever asks.
    """

    __slots__ = (
        "_known", "base_system", "cite_margin", "k", "max_context_chars", "retriever",
        "small_talk",
    )

    def __init__(
        self,
        retriever: Retriever,
        base_system: str,
        *,
        k: int = DEFAULT_K,
        max_context_chars: int = DEFAULT_MAX_CONTEXT_CHARS,
        cite_margin: float = DEFAULT_CITE_MARGIN,
        known: Mapping[str, str] | None = None,
        reload_interval_s: float | None = None,
        small_talk: SmallTalkDetector | None = None,
    ) -> None:
        """``small_talk``: default, the exemplars of the knowledge folder (or the shipped ones)."""
        if k <= 0:
            raise ValueError("k must be at least 1")
        self.retriever = retriever
        self.base_system = base_system
        self.k = k
        self.max_context_chars = max_context_chars
        self.cite_margin = cite_margin
        self._known = {key: value for key, value in (known or {}).items() if value.strip()}
        if reload_interval_s is not None:
            retriever.reload_interval_s = reload_interval_s
        self.small_talk = small_talk or SmallTalkDetector.for_knowledge(retriever.folder)

    @property
    def reload_interval_s(self) -> float:
        return self.retriever.reload_interval_s

    async def ground(self, question: str, recent_turns: Sequence[str] = ()) -> Grounding:
        """``recent_turns``: the customer's earlier messages in this chat, oldest first."""
        await self._reload_if_due()
        if not self.small_talk.ready:
            await asyncio.to_thread(self.small_talk.prepare, self.retriever.embed)
        context = {**self._known, **extract_context([*recent_turns, question])}
        turns = [t for t in recent_turns if not is_small_talk(t)]
        query = retrieval_query(question)
        # Embedded once (and cached): for the passages, the small-talk check and, a moment
        # later, the recommender's content step.
        vector = await self.retriever.aembed(query)
        recent = [retrieval_query(t) for t in turns]
        hits = await self.retriever.asearch(query, recent, self.k)
        if self.small_talk.detect(question, vector, answered=False):
            # Whether an article answers the message itself: the earlier turns lift a
            # closing ("thanks, that helps a lot!") towards the topic they were about.
            alone = await self.retriever.asearch(query, (), 1) if recent else hits
            if self.small_talk.detect(question, vector, answered=bool(alone)):
                return self.small_talk_grounding(context)
        return self.from_hits(hits, context)

    def small_talk_grounding(self, context: Mapping[str, str] | None = None) -> Grounding:
        """A brief answer to a greeting or thanks: no passages, no citations, no hand-off."""
        return Grounding(
            system_prompt=f"{self.base_system.strip()}\n\n{SMALL_TALK_INSTRUCTION}",
            small_talk=True,
            context=dict(context or {}),
        )

    def from_hits(self, hits: Sequence[Hit], context: Mapping[str, str] | None = None) -> Grounding:
        """The grounding for some retrieved passages (best first, all above the threshold)."""
        context = dict(context or {})
        if not hits:
            return Grounding(no_answer=True, context=context)
        used = select_hits(hits[: self.k], self.max_context_chars)
        return Grounding(
            system_prompt=grounded_prompt(self.base_system, used),
            citations=cited(used, self.cite_margin),
            hits=tuple(used),
            context=context,
        )

    async def _reload_if_due(self) -> None:
        try:
            if await self.retriever.areload_if_due():
                log.info("knowledge base changed: retrieval index rebuilt")
        except (KnowledgeError, RetrievalError, OSError) as exc:
            log.error("knowledge base not reloaded, keeping the old index: %s", exc)


# -- small talk -----------------------------------------------------------------------------

_SMALL_TALK_RE = re.compile(
    r"(?:(?:hi|hello|hey|hiya|howdy|good (?:morning|afternoon|evening|day|night)|morning"
    r"|evening|greetings|how are you(?: doing)?(?: today)?|thanks?|thank (?:you|u)|thx|ty"
    r"|cheers|much appreciated|no worries|will do"
    r"|ok|okay|k|alright|all right|great|perfect|cool"
    r"|awesome|nice|fine|wonderful|excellent|got it|understood|i see|bye|goodbye|good bye"
    r"|see you|see ya|have a (?:good|nice) (?:day|one)|yes|yeah|yep|yup|no|nope|sure|please"
    r"|that helped|that's all|that is all|all good|are you there|anyone there|you there"
    r"|can you help(?: me)?|i need (?:some )?help|i have a question|help"
    r"|there|again|so much|very much|a lot|for (?:your|the) help|bot|assistant|everyone"
    r"|with something|sorry|what|pardon|and|then|oh|ah|well)(?: |\Z))+"
)


_NO_WORD_RE = re.compile(r"[^\W_]")
_MAX_SYMBOLS = 24
_ASKS_RE = re.compile(
    r"(?i)\b(?:what|how|why|when|where|who|whom|which|whose)\b|^\W*(?:please\s+)?(?:translate"
    r"|write|tell|explain|solve|calculate|compute|book|recommend|find|show|give|define|list"
    r"|summari[sz]e|convert)\b"
)
"""A request for information or a task: never small talk by similarity alone."""


def _words(text: str) -> str:
    words = re.sub(r"[^a-z' ]+", " ", text.lower().replace("\u2019", "'"))
    return " ".join(words.split())


def is_small_talk(text: str) -> bool:
    """A greeting, thanks, yes/no or "can you help?" with no question in it, or only emoji
    and punctuation ("👍", ":)"). Words only, no model: cheap enough for every turn."""
    stripped = text.strip()
    if stripped and len(stripped) <= _MAX_SYMBOLS and not _NO_WORD_RE.search(stripped):
        return True
    words = _words(text)
    return bool(words) and len(words) <= 60 and bool(_SMALL_TALK_RE.fullmatch(words))


def load_small_talk(path: Path) -> tuple[str, ...]:
    """The ``exemplars = [...]`` of a small-talk file; errors name the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KnowledgeError(f"{path}: small-talk exemplar file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise KnowledgeError(f"{path}: not valid TOML ({exc})") from None
    values = data.get("exemplars")
    if not isinstance(values, list) or not values:
        raise KnowledgeError(f"{path}: missing the list 'exemplars'")
    for n, value in enumerate(values, 1):
        if not isinstance(value, str) or not value.strip():
            raise KnowledgeError(f"{path}: exemplars item {n} must be a non-empty string")
    return tuple(dict.fromkeys(v.strip() for v in values))


class SmallTalkDetector:
    """Greetings, thanks and closings: the word patterns of :func:`is_small_talk`, or a short
    message that asks nothing, that no article answers and whose embedding is within
    ``threshold`` cosine similarity of an exemplar.

    The exemplars are embedded once, by :meth:`prepare` (blocking; the grounder runs it in a
    worker thread), with the retriever's encoder.
    """

    __slots__ = ("_lock", "_vectors", "exemplars", "max_words", "threshold")

    def __init__(
        self,
        exemplars: Sequence[str],
        *,
        threshold: float = DEFAULT_SMALL_TALK_THRESHOLD,
        max_words: int = DEFAULT_SMALL_TALK_WORDS,
    ) -> None:
        if not exemplars:
            raise ValueError("small talk needs at least one exemplar")
        self.exemplars = tuple(exemplars)
        self.threshold = threshold
        self.max_words = max_words
        self._vectors: NDArray[np.float32] | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_knowledge(cls, folder: Path, **kwargs: float) -> SmallTalkDetector:
        """The knowledge folder's ``small_talk.toml``, else the shipped exemplars."""
        own = Path(folder) / SMALL_TALK_FILE
        return cls(load_small_talk(own if own.is_file() else SHIPPED_SMALL_TALK), **kwargs)

    @property
    def ready(self) -> bool:
        return self._vectors is not None

    def prepare(self, embed: Callable[[Sequence[str]], NDArray[np.float32]]) -> None:
        """Embed the exemplars (once; later calls return at once). Blocking."""
        with self._lock:
            if self._vectors is None:
                self._vectors = np.ascontiguousarray(embed(self.exemplars), dtype=np.float32)

    def similarity(self, vector: NDArray[np.float32]) -> float:
        """Cosine similarity of a (normalised) message vector to the nearest exemplar."""
        if self._vectors is None:
            raise RuntimeError("SmallTalkDetector.prepare() first")
        return float((self._vectors @ vector).max())

    def detect(self, text: str, vector: NDArray[np.float32], *, answered: bool) -> bool:
        """``answered``: some passage cleared the retriever's threshold for this message."""
        if is_small_talk(text):
            return True
        if answered or _ASKS_RE.search(text):
            return False
        if not 0 < len(_words(text).split()) <= self.max_words:
            return False
        return self.similarity(vector) >= self.threshold


# -- what the customer told us -----------------------------------------------------------------

_ID = r"#?\s*([A-Za-z0-9][A-Za-z0-9-]{3,29})\b"
_SEP = r"(?:\s*(?:is|was|:|=)\s*|\s+)?"
_EXTRACTORS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (ORDER_NUMBER, re.compile(
        rf"(?i)\b(?:order|purchase)(?:\s*(?:number|no\.?|num|id|ref(?:erence)?|#))?{_SEP}{_ID}"
    )),
    (INVOICE_NUMBER, re.compile(
        rf"(?i)\b(?:invoice|bill|receipt)(?:\s*(?:number|no\.?|num|id|#))?{_SEP}{_ID}"
    )),
    (TRACKING_NUMBER, re.compile(
        rf"(?i)\btracking(?:\s*(?:number|no\.?|code|id|#))?{_SEP}{_ID}"
    )),
)
_NAME_RE = re.compile(r"(?i:\bmy name is|\bmy name's|\bcall me)\s+([A-Z][a-z'-]{1,30})\b")


def extract_context(turns: Sequence[str]) -> dict[str, str]:
    """Order, invoice and tracking numbers and a first name the customer wrote, latest wins.

    Only values with a digit count as numbers, so "my order from last week" gives nothing.
    """
    found: dict[str, str] = {}
    for turn in turns:
        for key, pattern in _EXTRACTORS:
            for match in pattern.finditer(turn):
                value = match.group(1).strip("-")
                if any(c.isdigit() for c in value) and len(value) >= 4:
                    found[key] = value
        for match in _NAME_RE.finditer(turn):
            found[CUSTOMER_NAME] = match.group(1)
    return found


# -- placeholders --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Kind:
    """How one family of placeholders is filled (``key`` known) or rewritten (unknown).

    ``lead_ins`` are words right before the placeholder that its rewrite makes redundant
    ("order number {{Order Number}}" -> "your order"), with what replaces the whole.
    ``with_determiner`` formats a known value after "your"/"the" ("your order number 123").
    """

    key: str
    fallback: str
    with_determiner: str = "{value}"
    lead_ins: tuple[tuple[re.Pattern[str], str], ...] = ()


_WORD_START = r"(?<![\w'])"


def _lead(pattern: str, *, word: bool = True) -> re.Pattern[str]:
    """A lead-in: ``pattern`` ending where the placeholder starts (at a word start if ``word``)."""
    return re.compile("(?i)" + (_WORD_START if word else "") + pattern + r"\Z")


_DETERMINER = r"(?:(?:your|the|my|this|that)\s+)?"
_ORDER = _Kind(
    ORDER_NUMBER, "your order number", "order number {value}",
    (
        (_lead(r"with\s+(?:the|your)\s+(?:order\s+)?(?:number|id)\s*#?\s*"),
         "with your order number"),
        (_lead(rf"{_DETERMINER}(?:order|purchase)(?:\s*(?:number|no\.?|id|ref(?:erence)?))?"
               r"\s*#?\s*"), "your order"),
    ),
)
_INVOICE = _Kind(
    INVOICE_NUMBER, "your invoice number", "invoice number {value}",
    ((_lead(rf"{_DETERMINER}(?:invoice|bill|receipt)(?:\s*(?:number|no\.?|id))?\s*#?\s*"),
      "your invoice"),),
)
_TRACKING = _Kind(
    TRACKING_NUMBER, "your tracking number", "tracking number {value}",
    ((_lead(rf"{_DETERMINER}tracking(?:\s+(?:number|code|id))?\s*#?\s*"),
      "your tracking number"),),
)
_PHONE = _Kind(SUPPORT_PHONE, "our customer support line", "support line {value}")
_EMAIL = _Kind(SUPPORT_EMAIL, "our support email address", "support email address {value}")
_CONTACT = _Kind("", "our support team")
_HOURS = _Kind(
    SUPPORT_HOURS, "during our opening hours", "{value}",
    ((_lead(r"(?:during|from|within|in|at)\s+"), "during our opening hours"),),
)
_URL = _Kind(
    WEBSITE_URL, "our website", "website {value}",
    ((_lead(r"(?:(?:our|the)\s+)?(?:website|site)\s+at\s+"), "our website"),),
)
_SITE = _Kind(WEBSITE_NAME, "our website", "{value} website")
_COMPANY = _Kind(COMPANY_NAME, "our store")
_NAME = _Kind(CUSTOMER_NAME, "", "{value}", ((_lead(r"(?:,[ \t]*|[ \t]+)", word=False), ""),))
_EMPTY = _Kind("", "", "", ((_lead(r"[ \t]+", word=False), ""),))
_LIVE_CHAT = _Kind("", "live chat")
_DAYS = _Kind("", "several")

_CLASSIFY: tuple[tuple[re.Pattern[str], _Kind], ...] = tuple(
    (re.compile(pattern), kind)
    for pattern, kind in (
        (r"(?:order|purchase)\s*(?:number|no\.?|id|#|ref(?:erence)?)", _ORDER),
        (r"(?:invoice|bill|receipt)\s*(?:number|no\.?|id|#)", _INVOICE),
        (r"tracking\s*(?:number|code|id|#)", _TRACKING),
        (r".*(?:phone.*email|email.*phone|contact (?:information|details)).*", _CONTACT),
        (r".*(?:support|service|customer|complaint|assistance|contact|help).*phone.*", _PHONE),
        (r".*(?:support|service|customer|complaint|assistance|contact|help|feedback).*email.*",
         _EMAIL),
        (r".*(?:hours|availability|operating|opening times).*", _HOURS),
        (r"(?:website|site|company|shop)\s*(?:url|link|address)|url", _URL),
        (r"(?:company |service |store )?(?:website|site)(?: name| or app|/app name)?", _SITE),
        (r"(?:company|business|store|brand)(?: name)?", _COMPANY),
        (r"(?:customer |client |first |full )?name(?: field)?", _NAME),
        (r"live chat|chat", _LIVE_CHAT),
        (r"number of days", _DAYS),
    )
)
_LITERAL_RE = re.compile(r"[0-9A-Fa-f][0-9A-Fa-f-]{3,}")


_ANONYMISED = re.compile(r"(?i)\banonymi[sz]ed\b")
"""Bitext's mark of a customer-specific value: "{{Purchase Date Anonymized}}"."""


def _normalise(name: str) -> str:
    name = _ANONYMISED.sub("", name.lower())
    return " ".join(name.split())


def _classify(name: str) -> _Kind | None:
    normal = _normalise(name)
    for pattern, kind in _CLASSIFY:
        if pattern.fullmatch(normal):
            return kind
    return None


_ANY = re.compile(r"\{\{?([^{}\n]{0,80})(?:\}\}?|\Z)")
"""A placeholder, closed or (at the very end of a reply) cut off; one-brace slips included."""
_CLOSED = re.compile(r"\{\{?([^{}\n]{0,80})\}\}?")
_UNFINISHED = re.compile(r"\{\{?[^{}\n]{0,80}")
_DETERMINER_BEFORE = re.compile(r"(?i)(?<![\w'])(?:our|your|the|my|their|this|that|a|an)\s+\Z")
_LEADING_DETERMINER = re.compile(r"(?i)^(?:our|your|the)\s+")
_SENTENCE_START = re.compile(r"(?:(?:\A|\n)\s*(?:\d{1,2}[.)]|[-*•])?|[.!?])[\s\"'(“]*\Z")
_LOOKBACK = 40
_LEAD_IN_WORDS = (
    r"your|the|my|this|that|our|order|purchase|number|no|id|ref|reference|with|website|site"
    r"|at|during|from|within|in|invoice|bill|receipt|tracking|code"
)
_HOLD = re.compile(
    rf"(?i)(?<![\w'])(?:(?:(?:{_LEAD_IN_WORDS})[^\w\s]*|[^\w\s]+)\s*){{0,8}}\S*\s*\Z"
)
"""What a later placeholder could still absorb: the last word and the lead-in words before."""


def _clean_value(value: str) -> str:
    return " ".join(value.replace("{", "").replace("}", "").split())


def _lookup(context: Mapping[str, str], key: str, name: str) -> str:
    value = context.get(key, "") if key else ""
    if not value:
        value = context.get(_normalise(name), "")
    return _clean_value(value)


class _Filler:
    """Replaces placeholders in one region of a text, looking back at what came before."""

    __slots__ = ("_context",)

    def __init__(self, context: Mapping[str, str]) -> None:
        self._context = {_normalise(k): v for k, v in context.items()}

    def render(self, raw: str, start: int, end: int, *, final: bool) -> str:
        """``raw[start:end]`` with placeholders replaced and stray braces dropped.

        ``final`` lets a placeholder cut off by the end of the text count as one; the
        region must not split a placeholder or a lead-in (the stream filter sees to that).
        """
        pattern = _ANY if final else _CLOSED
        out: list[str] = []
        done = start
        for match in pattern.finditer(raw, start, end):
            replacement, lead_start = self.replace(raw, done, match)
            out.append(_strip_braces(raw[done:lead_start]))
            out.append(replacement)
            done = match.end()
        out.append(_strip_braces(raw[done:end]))
        return "".join(out)

    def replace(self, raw: str, floor: int, match: re.Match[str]) -> tuple[str, int]:
        """The text for one placeholder, and where the raw text it replaces begins.

        ``floor`` is where a lead-in may start at the earliest (the previous placeholder's end).
        """
        name = match.group(1).strip()
        at = match.start()
        if _LITERAL_RE.fullmatch(name) and any(c.isdigit() for c in name):
            return name, at
        kind = _classify(name) if name else _EMPTY
        if kind is None:
            if not _ANONYMISED.search(name):
                return _lookup(self._context, "", name) or name, at
            kind = _Kind("", f"your {_normalise(name)}")
        value = _lookup(self._context, kind.key, name)
        if value:
            if _DETERMINER_BEFORE.search(raw[max(0, at - _LOOKBACK) : at]):
                value = kind.with_determiner.format(value=value)
            return value, at
        text, begin = kind.fallback, at
        for lead_in, rewrite in kind.lead_ins:
            found = lead_in.search(raw, floor, at)
            if found:
                text, begin = rewrite, found.start()
                break
        before = raw[max(0, begin - _LOOKBACK) : begin]
        if begin == at and _DETERMINER_BEFORE.search(before):
            text = _LEADING_DETERMINER.sub("", text)
        elif text and (_SENTENCE_START.search(before) or raw[begin : begin + 1].isupper()):
            text = text[0].upper() + text[1:]
        return text, begin


def _strip_braces(text: str) -> str:
    return text.replace("{", "").replace("}", "")


def fill_placeholders(text: str, context: Mapping[str, str]) -> str:
    """``text`` with every ``{{...}}`` filled from ``context`` or rewritten into plain words.

    ``context`` uses the keys of this module (``order_number``, ``website_url``...) or a
    placeholder's own name in lower case. Unknown interface labels such as
    ``{{Order History}}`` keep their words; no brace is left in the result.
    """
    return _Filler(context).render(text, 0, len(text), final=True)


class StreamingPlaceholderFilter:
    """:func:`fill_placeholders` for a reply that arrives in pieces.

    ``feed`` returns the text that can be shown now; it holds back an unfinished ``{{...``
    and the last few words (a later placeholder may absorb "order number" before it), so the
    concatenation of every ``feed`` and the final ``flush`` equals the whole-text result.
    """

    __slots__ = ("_done", "_filler", "_raw")

    _KEEP = 64
    """Characters kept before the emitted point, for looking back (determiners, sentences)."""

    def __init__(self, context: Mapping[str, str]) -> None:
        self._filler = _Filler(context)
        self._raw = ""
        self._done = 0

    def feed(self, piece: str) -> str:
        self._raw += piece
        cut = self._safe_cut()
        out = self._filler.render(self._raw, self._done, cut, final=False)
        self._done = cut
        if self._done > 2 * self._KEEP:
            drop = self._done - self._KEEP
            self._raw = self._raw[drop:]
            self._done -= drop
        return out

    def flush(self) -> str:
        """The held-back rest, with a cut-off placeholder rewritten; the filter is then empty."""
        out = self._filler.render(self._raw, self._done, len(self._raw), final=True)
        self._raw, self._done = "", 0
        return out

    def _safe_cut(self) -> int:
        raw, done = self._raw, self._done
        unfinished = len(raw)
        for i in range(done, len(raw)):
            if raw[i] == "{" and _UNFINISHED.fullmatch(raw, i):
                unfinished = i
                break
        held = _HOLD.search(raw, done, unfinished)
        cut = held.start() if held else unfinished
        # The first placeholder at or after the cut stays whole, with the words it may absorb.
        floor = done
        for match in _CLOSED.finditer(raw, done, unfinished):
            if match.end() > cut:
                return min(cut, match.start(), self._filler.replace(raw, floor, match)[1])
            floor = match.end()
        return cut
