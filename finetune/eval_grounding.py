"""`supportbot eval grounding`: how often answers are grounded, and off-topic ones handed off.

Each question goes through the :class:`~core.grounding.Grounder` the service uses, at the
configured threshold and k. For questions the knowledge base answers (the hand-written ones
in ``knowledge/eval_questions.toml`` and a hash-picked sample of Bitext requests, labeled by
``knowledge/intent_map.toml``) it prints the share answered from passages, the share whose
citations include a labeled article, and the share whose first citation is one. Every set
also shows the share taken for small talk (a brief answer, no citations) and the share handed
off. Goals: at least 0.9 of the out-of-scope questions handed off ("I don't know" plus a
person), and at least 0.9 of the small-talk messages (greetings, thanks, closings) answered
without a hand-off. ``--sweep`` shows the same at other thresholds, to choose one.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import tomllib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.config import ConfigError, load_settings
from core.grounding import DEFAULT_K, Grounder, Grounding, retrieval_query
from core.knowledge import KnowledgeBase, KnowledgeError, load_knowledge
from core.retrieval import DEFAULT_THRESHOLD, Encoder, Hit, MiniLMEncoder, RetrievalError, Retriever
from finetune.eval_retrieval import (
    DEFAULT_CACHE,
    DEFAULT_DATA,
    DEFAULT_KNOWLEDGE,
    EvalDataError,
    load_intent_map,
    load_requests,
)

if TYPE_CHECKING:
    from numpy.typing import NDArray

DEFAULT_QUESTIONS = "knowledge/eval_questions.toml"
DEFAULT_CONFIG = "config.toml"
GOAL_HANDED_OFF = 0.9
GOAL_SMALL_TALK = 0.9
SWEEP = (0.25, 0.30, 0.35, 0.40, 0.45, 0.50)


@dataclass(frozen=True, slots=True)
class Labeled:
    """A question the knowledge base answers, with the articles that count as right."""

    text: str
    articles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QuestionSet:
    in_scope: tuple[Labeled, ...]
    out_of_scope: tuple[str, ...]
    small_talk: tuple[str, ...] = ()


def _strings(data: dict, key: str, path: Path, *, required: bool) -> tuple[str, ...]:
    values = data.get(key)
    if values is None and not required:
        return ()
    if not isinstance(values, list) or not values:
        raise EvalDataError(f"{path}: missing the list '{key}' (before any [[in_scope]])")
    for n, value in enumerate(values, 1):
        if not isinstance(value, str) or not value.strip():
            raise EvalDataError(f"{path}: {key} item {n} must be a non-empty string")
    return tuple(v.strip() for v in values)


def _entry_lines(text: str, table: str) -> list[int]:
    """The line of each ``[[table]]`` header, so errors can point at an entry."""
    return [n for n, line in enumerate(text.splitlines(), 1) if line.strip() == f"[[{table}]]"]


def load_questions(path: Path, kb: KnowledgeBase) -> QuestionSet:
    """Read ``out_of_scope = [...]``, optional ``small_talk = [...]`` and
    ``[[in_scope]] q = ..., articles = [...]``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalDataError(f"{path}: question file not found") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EvalDataError(f"{path}: not valid TOML ({exc})") from None
    out = _strings(data, "out_of_scope", path, required=True)
    chat = _strings(data, "small_talk", path, required=False)
    entries = data.get("in_scope")
    if not isinstance(entries, list) or not entries:
        raise EvalDataError(f"{path}: no [[in_scope]] questions")
    lines = _entry_lines(text, "in_scope")
    known = set(kb.ids())
    labeled: list[Labeled] = []
    for n, entry in enumerate(entries):
        where = f"{path}, line {lines[n]}" if n < len(lines) else f"{path}, in_scope {n + 1}"
        question, articles = entry.get("q"), entry.get("articles")
        if not isinstance(question, str) or not question.strip():
            raise EvalDataError(f"{where}: 'q' must be a non-empty string")
        if not isinstance(articles, list) or not articles or not all(
            isinstance(a, str) for a in articles
        ):
            raise EvalDataError(f"{where}: 'articles' must list one or more article ids")
        missing = [a for a in articles if a not in known]
        if missing:
            raise EvalDataError(f"{where}: unknown article(s): {', '.join(missing)}")
        labeled.append(Labeled(question.strip(), tuple(articles)))
    return QuestionSet(tuple(labeled), out, chat)


def sample_requests(
    data: Path, intent_map: dict[str, tuple[str, ...]], per_intent: int, seed: int = 13
) -> list[Labeled]:
    """``per_intent`` Bitext requests of each intent, picked by content hash (stable)."""
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for request in load_requests(data, intent_map):
        rank = hashlib.sha256(f"{seed}:{request.text}".encode()).hexdigest()
        groups[request.intent].append((rank, request.text))
    picked: list[Labeled] = []
    for intent in sorted(groups):
        for _, text in sorted(groups[intent])[:per_intent]:
            picked.append(Labeled(text, intent_map[intent]))
    return picked


class PrimedEncoder:
    """The real encoder, with every question embedded ahead in batches.

    The evaluation searches one question at a time, as the service does; embedding them all
    at once first makes that many times faster on a busy CPU.
    """

    __slots__ = ("_inner", "_memo")

    def __init__(self, inner: Encoder) -> None:
        self._inner = inner
        self._memo: dict[str, NDArray[np.float32]] = {}

    def prime(self, texts: Sequence[str], batch_size: int = 256) -> None:
        missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            for text, vector in zip(batch, self._inner.encode(batch), strict=True):
                self._memo[text] = vector

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        if not texts:
            return self._inner.encode(texts)
        self.prime(texts)
        return np.stack([self._memo[t] for t in texts])


@dataclass(frozen=True, slots=True)
class Scores:
    """Shares over one question set at one threshold; ``answered`` means from passages."""

    count: int
    answered: float
    cites_right: float
    first_right: float
    small_talk: float = 0.0
    handed_off: float = 0.0


def _above(hits: Sequence[Hit], threshold: float) -> list[Hit]:
    """What :meth:`Retriever.search` returns at ``threshold``, from its unfiltered ranking."""
    return [h for h in hits if h.score >= threshold]


@dataclass(frozen=True, slots=True)
class Ranked:
    """One question set as the grounder sees it: texts, every passage best first, vectors."""

    texts: tuple[str, ...]
    hits: list[list[Hit]]
    vectors: NDArray[np.float32]


def groundings(grounder: Grounder, ranked: Ranked, threshold: float) -> list[Grounding]:
    """What :meth:`Grounder.ground` decides for each question at ``threshold``."""
    out = []
    for text, hits, vector in zip(ranked.texts, ranked.hits, ranked.vectors, strict=True):
        above = _above(hits, threshold)
        if grounder.small_talk.detect(text, vector, answered=bool(above)):
            out.append(grounder.small_talk_grounding())
        else:
            out.append(grounder.from_hits(above))
    return out


def score(grounder: Grounder, ranked: Ranked, gold: Sequence[tuple[str, ...]] | None,
          threshold: float) -> Scores:
    answered = cites = first = chat = off = 0
    gold = gold if gold is not None else [()] * len(ranked.texts)
    for grounding, articles in zip(groundings(grounder, ranked, threshold), gold, strict=True):
        chat += grounding.small_talk
        off += grounding.no_answer
        if grounding.no_answer or grounding.small_talk:
            continue
        answered += 1
        ids = [c.id for c in grounding.citations]
        cites += bool(set(ids) & set(articles))
        first += ids[0] in articles
    n = max(len(gold), 1)
    return Scores(len(gold), answered / n, cites / n, first / n, chat / n, off / n)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"config file for [grounding] threshold and k ({DEFAULT_CONFIG})")
    parser.add_argument("--threshold", type=float, default=None, help="override the threshold")
    parser.add_argument("-k", type=int, default=None, help="override k (passages per answer)")
    parser.add_argument("--questions", default=DEFAULT_QUESTIONS, help="the question set")
    parser.add_argument("--knowledge", default=DEFAULT_KNOWLEDGE, help="knowledge-base folder")
    parser.add_argument("--intent-map", default=None,
                        help="intent -> article ids (KNOWLEDGE/intent_map.toml)")
    parser.add_argument("--data", default=None,
                        help="Bitext CSV for the held-out sample (default: the shared copy, "
                             "skipped when absent)")
    parser.add_argument("--per-intent", type=int, default=10,
                        help="Bitext requests per intent (default 10; 0 skips Bitext)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="passage embedding cache")
    parser.add_argument("--sweep", action="store_true", help="also print other thresholds")
    parser.add_argument("--show-misses", action="store_true",
                        help="list wrongly handled written questions")


def _configured(args: argparse.Namespace) -> tuple[float, int]:
    """Threshold and k: command line, else the config's [grounding], else the defaults."""
    threshold, k = DEFAULT_THRESHOLD, DEFAULT_K
    path = Path(args.config or DEFAULT_CONFIG)
    if args.config is not None or path.is_file():
        section = getattr(load_settings(path), "grounding", None)
        threshold = float(getattr(section, "threshold", threshold))
        k = int(getattr(section, "k", k))
    if args.threshold is not None:
        threshold = args.threshold
    if args.k is not None:
        k = args.k
    if k <= 0:
        raise EvalDataError(f"k must be at least 1 (got {k})")
    return threshold, k


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    knowledge = Path(args.knowledge)
    try:
        threshold, k = _configured(args)
        kb = load_knowledge(knowledge)
        questions = load_questions(Path(args.questions), kb)
        bitext: list[Labeled] = []
        data = Path(args.data or DEFAULT_DATA)
        if args.per_intent > 0 and (args.data is not None or data.is_file()):
            map_path = Path(args.intent_map) if args.intent_map else knowledge / "intent_map.toml"
            bitext = sample_requests(data, load_intent_map(map_path, kb), args.per_intent)
        encoder = PrimedEncoder(MiniLMEncoder())
        retriever = Retriever(knowledge, args.cache_dir, encoder, threshold=-2.0)
    except (ConfigError, EvalDataError, KnowledgeError, RetrievalError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    grounder = Grounder(retriever, "", k=k, reload_interval_s=0)
    grounder.small_talk.prepare(retriever.embed)
    everything = len(retriever.passages)

    def rank(texts: Sequence[str]) -> Ranked:
        """Every passage, best first, for each question as the grounder asks for it."""
        queries = [retrieval_query(t) for t in texts]
        encoder.prime(queries)
        hits = [retriever.search(q, k=everything) for q in queries]
        vectors = retriever.embed(queries)
        return Ranked(tuple(texts), hits, vectors)

    written = rank([q.text for q in questions.in_scope])
    sampled = rank([q.text for q in bitext])
    off_topic = rank(questions.out_of_scope)
    chat = rank(questions.small_talk)

    print(f"Grounding at threshold {threshold:.2f}, k = {k}; {len(kb)} articles, "
          f"{everything} passages; questions from {args.questions}"
          + (f" and {len(bitext)} Bitext requests from {data}" if bitext else "")
          + f"; {len(grounder.small_talk.exemplars)} small-talk exemplars")
    print(f"{'question set':<26}{'count':>7}{'answered':>10}{'cites right':>13}"
          f"{'1st cite right':>16}{'small talk':>12}{'handed off':>12}")
    rows: list[tuple[str, Ranked, list[tuple[str, ...]] | None]] = [
        ("in scope (written)", written, [q.articles for q in questions.in_scope])
    ]
    if bitext:
        rows.append(("in scope (Bitext sample)", sampled, [q.articles for q in bitext]))
    if questions.small_talk:
        rows.append(("small talk (written)", chat, None))
    rows.append(("out of scope (written)", off_topic, None))
    results = {}
    for label, ranked, gold in rows:
        s = results[label] = score(grounder, ranked, gold, threshold)
        right = (f"{s.cites_right:>13.3f}{s.first_right:>16.3f}" if gold is not None
                 else f"{'-':>13}{'-':>16}")
        print(f"{label:<26}{s.count:>7}{s.answered:>10.3f}{right}{s.small_talk:>12.3f}"
              f"{s.handed_off:>12.3f}")
    off = results["out of scope (written)"].handed_off
    verdict = "met" if off >= GOAL_HANDED_OFF else "NOT met"
    print(f"out-of-scope handed off: {off:.3f} (goal >= {GOAL_HANDED_OFF}: {verdict}); "
          f"{time.perf_counter() - started:.0f} s")
    if questions.small_talk:
        kept = 1 - results["small talk (written)"].handed_off
        verdict = "met" if kept >= GOAL_SMALL_TALK else "NOT met"
        print(f"small talk answered without hand-off: {kept:.3f} "
              f"(goal >= {GOAL_SMALL_TALK}: {verdict})")

    if args.sweep:
        _print_sweep(grounder, rows)
    if args.show_misses:
        _print_misses(grounder, questions, written, chat, off_topic, threshold)
    return 0


def _print_sweep(
    grounder: Grounder, rows: list[tuple[str, Ranked, list[tuple[str, ...]] | None]]
) -> None:
    print("\nthreshold" + "".join(
        f"{label + (' answered' if gold is not None else ' handed off'):>34}"
        for label, _, gold in rows
    ))
    for t in SWEEP:
        cells = []
        for _, ranked, gold in rows:
            s = score(grounder, ranked, gold, t)
            cells.append(s.answered if gold is not None else s.handed_off)
        print(f"{t:>9.2f}" + "".join(f"{c:>34.3f}" for c in cells))


def _print_misses(
    grounder: Grounder,
    questions: QuestionSet,
    written: Ranked,
    chat: Ranked,
    off_topic: Ranked,
    threshold: float,
) -> None:
    print("\nmisses:")
    for question, grounding in zip(
        questions.in_scope, groundings(grounder, written, threshold), strict=True
    ):
        ids = [c.id for c in grounding.citations]
        if not set(ids) & set(question.articles):
            print(f"  in scope, cited {ids or 'nothing'} (want {list(question.articles)}"
                  f"{', taken for small talk' if grounding.small_talk else ''}): "
                  f"{question.text}")
    for question, grounding in zip(
        questions.small_talk, groundings(grounder, chat, threshold), strict=True
    ):
        if grounding.no_answer:
            print(f"  small talk, handed off: {question}")
    for question, hits, grounding in zip(
        questions.out_of_scope, off_topic.hits, groundings(grounder, off_topic, threshold),
        strict=True,
    ):
        if grounding.small_talk:
            print(f"  out of scope, taken for small talk: {question}")
        elif not grounding.no_answer:
            print(f"  out of scope, answered from {hits[0].article_id} "
                  f"({hits[0].score:.2f}): {question}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="supportbot eval grounding",
        description=(__doc__ or "").splitlines()[0] or None,
    )
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
