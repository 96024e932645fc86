"""What a customer message does (its conversation act), decided before the bot answers.

Praise and thanks get a warm acknowledgement, a complaint without a question gets an
apology, a request for a person goes to a person, and only a real question goes to the
knowledge base (and, when that has nothing, to "I don't know" plus a hand-off).

Two parts: clear rules (a request for a person, a greeting or closing with nothing else)
that decide alone, and a small logistic head on the message's all-MiniLM-L6-v2 embedding
plus a few rule features and, when the caller has them, the message's sentiment
probabilities (``core/sentiment.py``) for the rest. The head is a few KB, committed in
``core/assets`` and reproduced by ``supportbot finetune acts`` (``finetune/acts.py``).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

DEFAULT_HEAD = Path(__file__).parent / "assets" / "acts_head.safetensors"
NORMALIZATION = "acts-v1"
"""Names :func:`clean`; stored in the head so a head fitted on other text is refused."""


class Act(StrEnum):
    QUESTION = "question"
    COMPLAINT = "complaint"
    PRAISE = "praise"
    GREETING = "greeting"
    REQUEST_PERSON = "request_person"
    OTHER = "other"


ACTS: tuple[Act, ...] = tuple(Act)


class ActHeadError(ValueError):
    """The head file is missing, unreadable or does not fit this code (names the file)."""


@dataclass(frozen=True, slots=True)
class ActResult:
    act: Act
    confidence: float
    scores: dict[str, float] = field(hash=False)
    complaint_too: bool = False
    """A question asked inside a complaint: answer it, and say sorry too."""


_MARKUP = re.compile(r"</?(?:cust|rep)__|__(?:cust|rep)>|__(?:company|cust)__")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_MENTION = re.compile(r"(?<![\w@])@\w+")
_SPACE = re.compile(r"\s+")
_QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "…": "..."})


def clean(text: str) -> str:
    """The words that carry the act: no TwACS markup, @mentions or links (they say nothing
    about what the customer wants), HTML entities decoded as TwACS publishes them."""
    text = html.unescape(text).translate(_QUOTES)
    text = _MARKUP.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _MENTION.sub(" ", text)
    return _SPACE.sub(" ", text).strip(" \t\n-:;,")


_PERSON = re.compile(
    r"\b(?:talk|speak|chat|connect|transfer|escalate|put me through|get me)\w*\b"
    r"(?:\W+\w+){0,3}?\W+(?:(?:real|live|actual|human)\s+)?(?:human|person|agent|"
    r"representative|rep|operator|manager|supervisor|somebody|someone|advisor|"
    r"staff member)\b"
    r"|\b(?:real|live|actual)\s+(?:human|person|agent|representative)\b"
    r"|^(?:a\s+)?(?:human|agent|representative|operator|person)(?:\s+please)?\W*$",
    re.IGNORECASE,
)
_NOT_PERSON = re.compile(r"\b(?:how|where|when|why)\b.*\b(?:call|phone|number|email)\b",
                         re.IGNORECASE)
_GREETING_WORDS = (
    r"hi|hello|hey|heya|hiya|yo|howdy|greetings|good (?:morning|afternoon|evening|night|day)|"
    r"morning|evening|bye|goodbye|good bye|bye bye|see you|see ya|cya|later|take care|"
    r"have a (?:good|nice|great) (?:day|one|evening|night|weekend)|ok|okay|k|alright|"
    r"all right|cool|fine|got it|noted|sure|that'?s all|that is all|that'?s it|nothing else|"
    r"no more questions|i'?m done|done|all good|anyone there|is anyone there|you there|"
    r"there|team|guys|folks|everyone|all|again|so|well|please"
)
_GREETING_ONLY = re.compile(
    rf"^(?:(?:{_GREETING_WORDS})[\s,.!?~:)(]*)+$", re.IGNORECASE
)
_THANKS = re.compile(
    r"\b(?:thank|thanks|thx|thnx|ty|kudos|shout ?out|appreciate|grateful|props|cheers)\w*",
    re.IGNORECASE,
)
_PRAISE = re.compile(
    r"\b(?:great|awesome|amazing|excellent|fantastic|wonderful|love|loved|best|perfect|"
    r"outstanding|superb|brilliant|impressed|helpful|friendly|pleasant|smooth|nice job|"
    r"well done|good job|rock|rocks|stellar|exceptional|delightful)\b|❤|😍|👍|🙏",
    re.IGNORECASE,
)
_WARM = re.compile(
    r"\b(?:thank(?!less)\w*|thx|kudos|shout ?out|s/o|grateful|gratitude|"
    r"excellent|amazing|awesome|fantastic|wonderful|outstanding|superb|brilliant|stellar|"
    r"spectacular|exceptional|delightful|impressed|rock ?stars?|superstars?|heroe?s?|"
    r"lifesaver|savior|saviour|gracious|above and beyond|extra mile|"
    r"well done|great job|good job|nice job|love (?:flying|you|the)|loved)\b|❤|😍|🙏|🙌",
    re.IGNORECASE,
)
"""Warm words, for :func:`sincere_praise`."""
_BARE_INTERJECTION = re.compile(
    r"^\W*(?:excellent|awesome|amazing|fantastic|wonderful|brilliant|great|perfect|"
    r"super|lovely|nice)\s*[.,!]+\s*\S", re.IGNORECASE)
""""Excellent, another cancelled flight": a warm word standing alone before the news is
usually sarcasm."""
_WARM_TAG = re.compile(
    r"#\w*(?:thank|kudos|excellent|amazing|awesome|fantastic|wonderful|spectacular|"
    r"superb|stellar|rockstar|superstar|hero|greatjob|welldone|bestcrew)\w*",
    re.IGNORECASE,
)
"""Warm words inside a hashtag (#crewwasamazing), where no word boundary finds them."""
_QUESTION_START = re.compile(
    r"(?:^|[.!?]\s+)(?:how|what|when|where|why|who|which|whom|whose|is|are|am|was|were|"
    r"do|does|did|can|could|will|would|should|shall|may|might|have|has|any|anyone|"
    r"is there|are there)\b",
    re.IGNORECASE,
)
_REQUEST = re.compile(
    r"\b(?:please|pls|plz|help|assist|need|want|would like|i'?d like|looking for|trying to|"
    r"tried to|can'?t|cannot|couldn'?t|unable|won'?t let|not able|how to|let me know|"
    r"dm|refund|cancel|change|rebook|reset|update|check|track|fix|waiting for|"
    r"never (?:arrived|received|got)|hasn'?t|haven'?t|didn'?t (?:get|receive|arrive))\b",
    re.IGNORECASE,
)
_COMPLAINT = re.compile(
    r"\b(?:worst|terrible|horrible|awful|ridiculous|unacceptable|disappointed|"
    r"disappointing|disgusting|pathetic|rude|never again|shame|joke|useless|"
    r"incompetent|frustrat\w*|angry|furious|sucks?|hate|delayed|delay|cancel+ed|"
    r"lost|stuck|poor|bad|fail\w*|nobody|no one|again|still)\b|[😡😤🤬😠😒😑🙄]",
    re.IGNORECASE,
)
_NEGATION = re.compile(r"\b(?:not|no|never|n't|nothing|nobody)\b", re.IGNORECASE)
_SARCASM = re.compile(
    r"[🙄😒😑😤😡🤬😠]|#\w*fail\w*|#neveragain|#not\b|#sarcasm|for nothing|thanks? a lot|"
    r"thanks a bunch|"
    # thanks / love for a bad thing: "thanks for the 4 hour delay", "love waiting again"
    r"\b(?:thank|thanks|thx|appreciate|love|loving|great job|nice job|way to go)\w*\W+"
    r"(?:\w+\W+){0,6}?(?:delay|cancel|overbook|forc|lost|los(?:e|ing)|wait|stuck|screw|miss|"
    r"charg|ignor|strand|sit(?:ting)? (?:in|on)|on hold|bump|no (?:help|response|reply|one)|"
    r"never|nothing|again|not\b|ruin|rude|worst|terrible|horrible|late|broke|damag|hours)\w*"
    r"|\b(?:thank|thanks|thx)\w*\W+(?:\w+\W+){0,3}?but\b"
    r"|\"[^\"]{2,40}\"",  # scare quotes: your "service"
    re.IGNORECASE,
)
"""Cues that thanks or praise is sarcastic (LABELLING.md rule 5: then it is a complaint)."""

FEATURES: tuple[str, ...] = (
    "question_mark", "question_start", "request_words", "thanks_words", "praise_words",
    "complaint_words", "exclamation", "short", "negation", "sarcasm", "sincere_thanks",
)
"""Rule features appended to the embedding (0/1): the head weighs them with the text."""
SENTIMENT_FEATURES: tuple[str, ...] = ("p_negative", "p_neutral", "p_positive",
                                       "sentiment_absent")
"""The message's sentiment probabilities (``core.sentiment``, negative / neutral /
positive), after the rule features; when the caller has none they are 0 and
``sentiment_absent`` is set (the head is fitted on every example both ways)."""
HEAD_FEATURES: tuple[str, ...] = FEATURES + SENTIMENT_FEATURES
SENTIMENT_SCALE = 0.5
"""Probabilities are scaled by this (chosen by cross-validation on the training rows)."""
Sentiment = tuple[float, float, float]
"""(P(negative), P(neutral), P(positive)) as ``core.sentiment`` gives them."""
FEATURE_SCALE = 0.25
"""Features are scaled to about an embedding's largest components, so one L2 fits both."""


def rule_act(text: str) -> Act | None:
    """The act when a clear rule decides it alone (``text`` already cleaned), else None."""
    if not text or not any(ch.isalnum() for ch in text):
        return Act.OTHER if not text else None
    if _PERSON.search(text) and not _NOT_PERSON.search(text):
        return Act.REQUEST_PERSON
    if _GREETING_ONLY.match(text):
        return Act.GREETING
    return None


def rule_features(text: str) -> NDArray[np.float32]:
    """:data:`FEATURES` of cleaned ``text``, scaled by :data:`FEATURE_SCALE`."""
    values = (
        "?" in text,
        bool(_QUESTION_START.search(text)),
        bool(_REQUEST.search(text)),
        bool(_THANKS.search(text)),
        bool(_PRAISE.search(text)),
        bool(_COMPLAINT.search(text)),
        "!" in text,
        len(text.split()) <= 4,
        bool(_NEGATION.search(text)),
        sarcastic(text),
        bool(_THANKS.search(text)) and not sarcastic(text),
    )
    return np.array(values, dtype=np.float32) * FEATURE_SCALE


def sincere_praise(text: str) -> bool:
    """Whether raw ``text`` holds warm words (thanks, "excellent", "above and beyond") and
    no cue that they are sarcastic: a "complaint" that says them gets a thank-you that fits
    praise and criticism alike, not an apology for kind words."""
    cleaned = clean(text)
    warm = _WARM.search(cleaned) or _WARM_TAG.search(cleaned)
    return bool(warm) and not sarcastic(cleaned) and not _BARE_INTERJECTION.match(cleaned)


def sarcastic(text: str) -> bool:
    """Whether cleaned ``text`` has a cue that its thanks or praise is sarcastic."""
    return bool(_SARCASM.search(text))


def sentiment_features(sentiment: Sentiment | None) -> NDArray[np.float32]:
    """:data:`SENTIMENT_FEATURES` of one message's sentiment (None: not known)."""
    if sentiment is None:
        return np.array([0.0, 0.0, 0.0, FEATURE_SCALE], dtype=np.float32)
    values = np.asarray(tuple(sentiment), dtype=np.float64).ravel()
    if values.shape != (3,) or not np.all(np.isfinite(values)):
        raise ValueError(f"sentiment must be (p_negative, p_neutral, p_positive), "
                         f"not {sentiment!r}")
    return np.append(np.clip(values, 0.0, 1.0) * SENTIMENT_SCALE, 0.0).astype(np.float32)


def rules_only(text: str) -> Act:
    """The act by keywords alone: the baseline ``supportbot eval acts`` prints beside the
    head, so its gain can be judged (``text`` already cleaned)."""
    decided = rule_act(text)
    if decided is not None:
        return decided
    asks = "?" in text or bool(_QUESTION_START.search(text))
    if asks or _REQUEST.search(text):
        return Act.QUESTION
    if sarcastic(text) and (_THANKS.search(text) or _PRAISE.search(text)):
        return Act.COMPLAINT
    if _THANKS.search(text) or (_PRAISE.search(text) and not _COMPLAINT.search(text)):
        return Act.PRAISE
    if _COMPLAINT.search(text):
        return Act.COMPLAINT
    return Act.OTHER


@dataclass(frozen=True, slots=True)
class ActHead:
    """Multinomial logistic regression: softmax([embedding, features] @ weight.T + bias).

    ``bias`` includes the praise prior chosen by cross-validation (metadata
    ``praise_bias``): praise must be acknowledged, so ties lean to it."""

    weight: NDArray[np.float32]
    bias: NDArray[np.float32]
    labels: tuple[Act, ...]
    metadata: dict[str, str] = field(hash=False)

    def probabilities(self, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
        logits = inputs @ self.weight.T + self.bias
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def head_inputs(
    texts: Sequence[str], vectors: NDArray[np.float32],
    sentiments: Sequence[Sentiment | None] | None = None,
) -> NDArray[np.float32]:
    """What the head reads: each embedding with its text's rule features (texts cleaned)
    and its sentiment features (``sentiments`` None, or an item None: not known)."""
    if sentiments is not None and len(sentiments) != len(texts):
        raise ValueError(f"{len(sentiments)} sentiments for {len(texts)} texts")
    rows = [np.concatenate([rule_features(t), sentiment_features(
        None if sentiments is None else sentiments[i])]) for i, t in enumerate(texts)]
    feats = np.stack(rows) if rows else np.zeros((0, len(HEAD_FEATURES)), dtype=np.float32)
    return np.hstack([np.asarray(vectors, dtype=np.float32), feats])


def load_head(path: str | Path = DEFAULT_HEAD) -> ActHead:
    """Read and check a head file; :class:`ActHeadError` names the file on any fault."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ActHeadError(f"{path}: conversation-act head not found "
                           "(reproduce it with `supportbot finetune acts`)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            weight = f.get_tensor("weight").astype(np.float32)
            bias = f.get_tensor("bias").astype(np.float32)
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ActHeadError(f"{path}: not a readable conversation-act head ({exc})") from None
    try:
        labels = tuple(Act(name) for name in meta.get("labels", "").split(","))
    except ValueError as exc:
        raise ActHeadError(f"{path}: unknown act in its labels ({exc})") from None
    features = tuple(meta.get("features", "").split(","))
    if features != HEAD_FEATURES:
        raise ActHeadError(f"{path}: fitted with features {features}, "
                           f"this code has {HEAD_FEATURES}")
    if meta.get("text_normalization") != NORMALIZATION:
        raise ActHeadError(f"{path}: fitted on text normalised as "
                           f"{meta.get('text_normalization')!r}, not {NORMALIZATION!r}")
    if weight.ndim != 2 or weight.shape[0] != len(labels) or bias.shape != (len(labels),):
        raise ActHeadError(f"{path}: weight {weight.shape} / bias {bias.shape} "
                           f"do not fit {len(labels)} labels")
    return ActHead(weight, bias, labels, meta)


COMPLAINT_TOO = 0.25
"""P(complaint) above which a question is flagged as asked inside a complaint."""


class ActClassifier:
    """Rules first, then the head on the embedding. Blocking and cheap: one matrix product
    when the caller passes the embedding it already has (``Retriever.embed``)."""

    __slots__ = ("_embed", "_head")

    def __init__(
        self, embed: Callable[[Sequence[str]], NDArray[np.float32]],
        head: str | Path = DEFAULT_HEAD,
    ) -> None:
        self._embed = embed
        self._head = load_head(head)
        dim = self._head.weight.shape[1] - len(HEAD_FEATURES)
        if dim <= 0:
            raise ActHeadError(f"{head}: weight has no room for the embedding")

    @property
    def head(self) -> ActHead:
        return self._head

    def classify(
        self, text: str, vector: NDArray[np.float32] | None = None,
        sentiment: Sentiment | None = None,
    ) -> ActResult:
        """The act of one message; ``vector`` is its embedding when the caller has it,
        ``sentiment`` its (P(negative), P(neutral), P(positive)) from ``core.sentiment``
        when the caller has them (they help tell praise from sarcastic thanks; without
        them the head reads them as not known, as it was also fitted).

        The embedding must be of the raw message as the service embeds it (or of the cleaned
        text); either works, the head was fitted on cleaned text."""
        sentiment_features(sentiment)  # a malformed one fails even when a rule decides
        cleaned = clean(text)
        decided = rule_act(cleaned)
        if decided is not None:
            return _decided(decided)
        if vector is None:
            vectors = self._embed([cleaned])
        else:
            vectors = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        return self._from_probs(self._probabilities([cleaned], vectors, [sentiment])[0])

    def classify_many(
        self, texts: Sequence[str], sentiments: Sequence[Sentiment | None] | None = None,
    ) -> list[ActResult]:
        """Acts of many messages, the texts the rules leave embedded in one call;
        ``sentiments`` as in :meth:`classify`, one per text (or None: none known)."""
        if sentiments is not None and len(sentiments) != len(texts):
            raise ValueError(f"{len(sentiments)} sentiments for {len(texts)} texts")
        cleaned = [clean(t) for t in texts]
        decided = [rule_act(t) for t in cleaned]
        open_idx = [i for i, d in enumerate(decided) if d is None]
        results: list[ActResult | None] = [None if d is None else _decided(d) for d in decided]
        if open_idx:
            open_texts = [cleaned[i] for i in open_idx]
            open_sent = None if sentiments is None else [sentiments[i] for i in open_idx]
            probs = self._probabilities(open_texts, self._embed(open_texts), open_sent)
            for i, p in zip(open_idx, probs, strict=True):
                results[i] = self._from_probs(p)
        return [r for r in results if r is not None]

    def _probabilities(
        self, texts: Sequence[str], vectors: NDArray[np.float32],
        sentiments: Sequence[Sentiment | None] | None = None,
    ) -> NDArray[np.float32]:
        expected = self._head.weight.shape[1] - len(HEAD_FEATURES)
        if vectors.shape[1] != expected:
            raise ValueError(f"embedding has {vectors.shape[1]} dimensions, the head {expected}")
        return self._head.probabilities(head_inputs(texts, vectors, sentiments))

    def _from_probs(self, probs: NDArray[np.float32]) -> ActResult:
        scores = {str(a): float(p) for a, p in zip(self._head.labels, probs, strict=True)}
        best = int(np.argmax(probs))
        act = self._head.labels[best]
        complaint_too = act is Act.QUESTION and scores.get(Act.COMPLAINT, 0.0) >= COMPLAINT_TOO
        return ActResult(act, float(probs[best]), scores, complaint_too)


def _decided(act: Act) -> ActResult:
    return ActResult(act, 1.0, {str(a): 1.0 if a is act else 0.0 for a in ACTS})


_ASKS_COMPANY = re.compile(
    r"(?:^|[.!?]\s+|\b(?:hi|hey|hello)\b[^.?!]{0,20}?)(?:can|could|would|will) (?:you|u|someone)\b"
    r"|\bany (?:idea|ideas|update|updates|news|suggestions?|info|information|word)\b"
    r"|(?:^|[.!?]\s+)(?:why|when|where|what|is|are|do|does|did) [^.?!]{0,80}\?",
    re.IGNORECASE,
)
"""A question put to the company ("any idea what's up?", "can you ...?", "why is my train
still stuck?"), which a complaint that contains it still wants answered."""
PRAISE_MAX_NEGATIVE = 0.8
"""Praise is never strongly negative: at this P(negative) the head's praise is sarcasm or a
complaint in disguise ("row 30 is a sauna"). On the labelled TwACS training
openers 5% of praise and 70% of complaints are this negative (at 0.5: 12% and 85%): an
angry customer thanked for kind words is the worse mistake, but praise is what counts."""
COMPLAINT_MIN_NEGATIVE = 0.2
PRAISE_MIN_POSITIVE = 0.6
"""A "complaint" or "other" this positive and hardly negative is praise ("what an honour
to fly with you"): 74% of labelled praise, 3% of complaints, 26% of "other" (thanked,
which does no harm)."""


def reconcile(result: ActResult, text: str, sentiment: Sentiment | None) -> ActResult:
    """The act after what the head cannot weigh well alone: the sentiment classifier, which
    is good at negative and positive, and a direct question put to the company. Also, only
    the rules may decide that someone asks for a person (the head's guesses at it were
    often complaints about staff)."""
    act = result.act
    cleaned = clean(text)
    if act is Act.REQUEST_PERSON and rule_act(cleaned) is not Act.REQUEST_PERSON:
        act = Act.QUESTION
    if sentiment is not None:
        negative, _, positive = sentiment
        if act is Act.PRAISE and negative >= PRAISE_MAX_NEGATIVE:
            act = Act.COMPLAINT
        elif (act in (Act.COMPLAINT, Act.OTHER) and negative < COMPLAINT_MIN_NEGATIVE
              and positive >= PRAISE_MIN_POSITIVE):
            act = Act.PRAISE
    if act is Act.COMPLAINT and _ASKS_COMPANY.search(cleaned):
        return ActResult(Act.QUESTION, result.confidence, result.scores, True)
    if act is result.act:
        return result
    return ActResult(act, result.confidence, result.scores, result.complaint_too)
