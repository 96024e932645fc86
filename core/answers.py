"""Answers a customer can trust: generated text is shown only once it has been checked
against the passages it was generated from, and the help centre's own sentences stand in
when too little survives or the model is too slow.

A small model ignores its passages often and a large one sometimes, so every backend's
output goes through the same gate (:class:`ClaimGate`): the stream is cut into sentences
as they complete, each is checked (:class:`~core.faithfulness.FaithfulnessChecker`) and
only the supported ones reach the customer. The dropped ones are kept for operators
(:class:`CheckedAnswer`), never shown to the customer.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.faithfulness import Claim, FaithfulnessChecker, SentenceBuffer
from core.messages import Citation
from core.retrieval import Hit

EXTRACTIVE_INTRO = "Here is what our help centre says about {topic}:"
"""The one line of framing around a quoted passage; the rest is the article's own words."""
EXTRACTIVE_OFFER = "If that doesn't answer your question, ask to talk to a person."
"""Said after a quote, so a customer it does not help knows the way on (the escalation
policy knows "talk to a person")."""
_ENDED_RE = re.compile(r"[.!?…][\"'”’)\]]*\s*$")
SOURCE_MARGIN = 0.05
"""A passage is a claim's source when its similarity is within this of the best one's."""


@dataclass(frozen=True, slots=True)
class CheckedAnswer:
    """What the customer was shown and what was held back, recorded with the reply."""

    text: str
    citations: tuple[Citation, ...]
    claims: tuple[Claim, ...] = ()
    extractive: bool = False
    checked: bool = True
    reason: str = ""
    """Why the extractive answer was used: ``too_little_supported``, ``no_text_in_time``,
    ``empty``, ``mode`` (configured), ``enough`` (the quote was relevant enough to answer
    without the model), ``model_busy`` (a one-slot model was writing for another
    conversation) or ``language`` (the customer writes another language); empty when
    the generated answer stood."""

    @property
    def withheld(self) -> tuple[str, ...]:
        return tuple(c.text for c in self.claims if not c.supported)

    @property
    def n_supported(self) -> int:
        return sum(c.supported for c in self.claims)

    def record(self) -> dict[str, Any]:
        """The JSON kept with the reply (operators and ``eval replay`` read it)."""
        return {
            "checked": self.checked,
            "claims": len(self.claims),
            "supported": self.n_supported,
            "dropped": len(self.withheld),
            "withheld": [
                {"text": c.text, "reason": c.reason} for c in self.claims if not c.supported
            ],
            "extractive": self.extractive,
            "extractive_reason": self.reason,
        }


def topic_of(title: str) -> str:
    """An article title as words inside a sentence: "Resetting a forgotten password" ->
    "resetting a forgotten password" (acronyms and names keep their capitals)."""
    title = title.strip().rstrip(".")
    first, _, rest = title.partition(" ")
    if first[:1].isupper() and (first[1:].islower() or len(first) == 1):
        first = first.lower()
    return f"{first} {rest}".strip()


@dataclass(frozen=True, slots=True)
class Extract:
    """The help centre's answer to a question: the best passage's most relevant sentences,
    lightly framed, its citation, and how relevant they are to the question."""

    text: str
    citations: tuple[Citation, ...]
    relevance: float


def extractive_answer(
    checker: FaithfulnessChecker, question: str, hits: Sequence[Hit], max_sentences: int = 3,
) -> Extract:
    """Blocking (embeds)."""
    best = hits[0]
    sentences = checker.extract(question, [best.text], max_sentences=max_sentences)
    intro = EXTRACTIVE_INTRO.format(topic=topic_of(best.title or best.heading or "this"))
    return Extract(
        f"{intro} {' '.join(sentences)} {EXTRACTIVE_OFFER}",
        (Citation(best.article_id, best.title, best.url),),
        checker.relevance(question, sentences),
    )


def substantive(claims: Sequence[Claim]) -> bool:
    """Whether a supported claim says something beyond courtesy ("happy to help")."""
    return any(c.supported and c.kind != "framing" for c in claims)


@dataclass(slots=True)
class ClaimGate:
    """Checks a generated stream sentence by sentence; :attr:`shown` is what passed.

    ``passages`` are the retrieved passages the answer must stand on and ``conversation``
    the customer's own words (restating them is allowed). Checks run in a worker thread,
    since each embeds its sentence.
    """

    checker: FaithfulnessChecker
    passages: Sequence[str]
    conversation: Sequence[str]
    max_claims: int
    claims: list[Claim] = field(default_factory=list)
    shown: str = ""
    sources: set[int] = field(default_factory=set)
    """Indexes of the passages that support a shown claim: what the answer may cite."""
    _buffer: SentenceBuffer = field(default_factory=SentenceBuffer)

    @property
    def full(self) -> bool:
        """Enough sentences were generated: the rest of the stream is not wanted."""
        return len(self.claims) >= self.max_claims

    async def feed(self, piece: str) -> bool:
        """Take a piece of the stream; True when :attr:`shown` grew."""
        return await self._check(self._buffer.feed(piece))

    async def flush(self) -> bool:
        """The stream ended: check what is left of the last sentence. One that does not end
        like a sentence was cut off by the token limit and is withheld, not shown."""
        rest = self._buffer.flush()
        if rest and not _ENDED_RE.search(rest[-1]) and not self.full:
            cut = rest.pop()
            self.claims.append(Claim(cut, False, 0.0, "cut off mid-sentence", "claim"))
        return await self._check(rest)

    async def _check(self, sentences: list[str]) -> bool:
        grew = False
        for sentence in sentences:
            if self.full or not sentence.strip():
                continue
            claim = await asyncio.to_thread(
                self.checker.check_claim, sentence, self.passages, self.conversation
            )
            self.claims.append(claim)
            if claim.supported:
                self.shown = f"{self.shown} {claim.text}".strip()
                grew = True
                if claim.kind != "framing":
                    self.sources |= await asyncio.to_thread(self._supporting, claim.text)
        return grew

    def _supporting(self, claim: str) -> set[int]:
        """The passages that support a claim on their own about as well as the best one
        does (embeddings are cached): a near miss elsewhere is not a source."""
        alone = [self.checker.check_claim(claim, [p]) for p in self.passages]
        best = max((c.similarity for c in alone if c.supported), default=None)
        if best is None:
            return set()
        floor = best - SOURCE_MARGIN
        return {i for i, c in enumerate(alone) if c.supported and c.similarity >= floor}

    def citations(self, hits: Sequence[Hit]) -> tuple[Citation, ...]:
        """The articles of the supporting passages, best passage first, each once."""
        cited: dict[str, Citation] = {}
        for i in sorted(self.sources):
            hit = hits[i]
            cited.setdefault(hit.article_id, Citation(hit.article_id, hit.title, hit.url))
        return tuple(cited.values())
