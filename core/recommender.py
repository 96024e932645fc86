"""Help-article suggestions shown beside bot replies.

:class:`HybridRecommender` blends three signals, because each alone fails somewhere:
collaborative filtering (what customers with similar clicks opened) knows nothing about a
new customer or a new article; matching the conversation to the articles' text covers that
cold start; popularity is what is left when neither says anything. A small exploration
rate gives rarely shown articles a slot, or they could never collect the clicks that
collaborative filtering needs.

The collaborative model is trained from the events table in a worker thread on its own
read-only connection, SQLite or PostgreSQL alike (the store's single writer thread, or its
pool, is never held up by a big read), and swapped in with one reference assignment:
:meth:`HybridRecommender.suggest` reads the reference once, so each call sees one whole
model, old or new, never a mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import psycopg
from psycopg import IsolationLevel
from psycopg.conninfo import conninfo_to_dict
from scipy import sparse

from core.knowledge import Article, KnowledgeBase
from core.messages import Suggestion
from core.retrieval import matvec
from core.store import SQLiteStore, Store
from core.store_postgres import CONNECT_TIMEOUT_S, PostgresStore, describe_url

if TYPE_CHECKING:
    from numpy.typing import NDArray

log = logging.getLogger(__name__)

Arm = Literal["cf", "content", "popular", "explore"]
ARMS: tuple[Arm, ...] = ("cf", "content", "popular", "explore")
ModelKind = Literal["als", "bpr", "item-item", "ease"]
MODEL_KINDS: tuple[ModelKind, ...] = ("als", "bpr", "item-item", "ease")

POSITIVE_TYPES = ("suggestion_clicked", "article_viewed", "feedback")
"""Event types that can say a customer found an article useful."""
POSITIVE_FEEDBACK = frozenset(
    {"👍", "👍🏻", "👍🏼", "👍🏽", "👍🏾", "👍🏿", "❤️", "❤", "👌", "🙏", "🎉", "+1", "up",
     "thumbs_up", "helpful", "positive", "yes", "useful"}
)


@dataclass(frozen=True, slots=True)
class SuggestionRequest:
    user_id: int
    conversation_id: int
    text: str
    recent_texts: Sequence[str] = ()


@runtime_checkable
class Recommender(Protocol):
    async def suggest(self, request: SuggestionRequest, k: int) -> list[Suggestion]: ...

    def describe(self, item_id: str) -> Suggestion | None:
        """The article behind a suggestion id (to answer a click), if known."""
        ...


class NoSuggestions:
    """Used when suggestions are switched off."""

    __slots__ = ()

    async def suggest(self, request: SuggestionRequest, k: int) -> list[Suggestion]:
        return []

    def describe(self, item_id: str) -> Suggestion | None:
        return None


@dataclass(frozen=True, slots=True)
class RankedSuggestion(Suggestion):
    """A suggestion that remembers which arm of the blend chose it, for click-through
    rates per arm (the pipeline logs it with ``suggestion_shown``)."""

    arm: str = "content"


def arm_of(suggestion: Suggestion) -> str:
    """The arm behind a suggestion; empty for suggestions from other recommenders."""
    return suggestion.arm if isinstance(suggestion, RankedSuggestion) else ""


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CFParams:
    """The collaborative model: which one and its hyper-parameters.

    The ALS defaults were chosen on a validation hold-out of the msweb visits (seed 1; the
    reported figures use seed 0): few interactions per user need strong confidence
    (``alpha``) and strong regularisation. ``implicit`` does not scale its penalty with the
    data, so ``regularization`` is given per (user, item) pair and multiplied by their
    number: the same setting then suits a test log of 40 clicks and a million events.
    """

    kind: ModelKind = "als"
    factors: int = 64
    iterations: int = 15
    regularization: float = 0.013
    """ALS penalty per (user, item) pair of the training matrix (1,000 on msweb's 76k)."""
    alpha: float = 300.0
    """ALS confidence: a weight-1 click counts ``1 + alpha`` against an unobserved pair."""
    bpr_factors: int = 32
    bpr_learning_rate: float = 0.05
    bpr_regularization: float = 0.1
    bpr_iterations: int = 100
    neighbours: int = 50
    """Item-item only: similar items kept per item."""
    ease_l2: float = 0.5
    """EASE ridge penalty as a multiple of the mean item count (the Gram matrix's mean
    diagonal), so one setting suits a small click log and msweb alike; 0.5 was chosen on the
    msweb validation hold-out carved from the training visits."""
    threads: int = 1
    """Training threads; 1 leaves the other core to the chat models."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind '{self.kind}' (expected one of {MODEL_KINDS})")
        sizes = (self.factors, self.iterations, self.bpr_factors, self.bpr_iterations,
                 self.neighbours)
        if min(sizes) <= 0:
            raise ValueError("factors, iterations and neighbours must be positive")
        if min(self.regularization, self.alpha, self.bpr_regularization) < 0:
            raise ValueError("regularization and alpha must be >= 0")
        if self.ease_l2 <= 0:
            raise ValueError("ease_l2 must be positive")


@dataclass(frozen=True, slots=True)
class SignalWeights:
    """How much each kind of positive event counts in the training matrix."""

    click: float = 1.0
    view: float = 1.0
    feedback: float = 2.0

    def of(self, event_type: str, value: str | None) -> float:
        if event_type == "suggestion_clicked":
            return self.click
        if event_type == "article_viewed":
            return self.view
        if event_type == "feedback" and (value or "").strip().lower() in POSITIVE_FEEDBACK:
            return self.feedback
        return 0.0


@dataclass(frozen=True, slots=True)
class HybridConfig:
    """The blend, exploration and retraining schedule of :class:`HybridRecommender`."""

    cf: CFParams = field(default_factory=CFParams)
    signals: SignalWeights = field(default_factory=SignalWeights)
    cf_weight: float = 0.3
    content_weight: float = 0.6
    popularity_weight: float = 0.1
    exploration: float = 0.05
    """Chance that one slot of a suggestion list goes to a rarely shown article."""
    retrain_every_s: float = 600.0
    """Retrain this often when there is anything new..."""
    retrain_after_events: int = 200
    """... or as soon as this many new positive events arrived."""
    poll_s: float = 5.0
    content_passages: int = 12
    seed: int | None = None

    def __post_init__(self) -> None:
        weights = (self.cf_weight, self.content_weight, self.popularity_weight)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("blend weights must be >= 0 and not all 0")
        if not 0 <= self.exploration <= 1:
            raise ValueError("exploration must be between 0 and 1")
        if self.retrain_every_s <= 0 or self.retrain_after_events <= 0 or self.poll_s <= 0:
            raise ValueError("retrain_every_s, retrain_after_events and poll_s must be positive")


# -- training data ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interactions:
    """A users x items matrix of summed positive weights, rows and columns keyed by id."""

    users: tuple[Hashable, ...]
    items: tuple[str, ...]
    matrix: sparse.csr_matrix

    @classmethod
    def build(
        cls,
        triples: Iterable[tuple[Hashable, str, float]],
        items: Sequence[str] = (),
    ) -> Interactions:
        """From (user, item, weight) triples; ``items`` come first in the column order, so
        catalog items nobody touched yet still get a column."""
        item_index: dict[str, int] = {item: i for i, item in enumerate(dict.fromkeys(items))}
        user_index: dict[Hashable, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        data: list[float] = []
        for user, item, weight in triples:
            if weight <= 0:
                continue
            rows.append(user_index.setdefault(user, len(user_index)))
            cols.append(item_index.setdefault(item, len(item_index)))
            data.append(weight)
        matrix = sparse.csr_matrix(
            (np.asarray(data, dtype=np.float32), (rows, cols)),
            shape=(len(user_index), len(item_index)),
            dtype=np.float32,
        )
        matrix.sum_duplicates()
        return cls(tuple(user_index), tuple(item_index), matrix)


@dataclass(frozen=True, slots=True)
class EventLog:
    """What one read of the events table gives the trainer."""

    interactions: Interactions
    impressions: Mapping[str, int]
    last_event_id: int


@dataclass(frozen=True, slots=True, repr=False)
class PostgresEvents:
    """The events table of a PostgreSQL store, by the store's connection URL (password
    included, so it stays out of ``repr``)."""

    url: str

    def __repr__(self) -> str:
        return f"PostgresEvents({describe_url(self.url)!r})"


EventSource = str | Path | PostgresEvents
"""Where the trainer reads events: a SQLite file, or a PostgreSQL database."""
Rows = Callable[[str, Sequence[Any]], Iterable[tuple[Any, ...]]]
"""Runs one query (``?`` placeholders) inside a read's snapshot and gives its rows."""
PG_FETCH_ROWS = 10_000
"""Rows per round trip of a PostgreSQL read (a server-side cursor)."""


def _connect_read_only(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


@contextlib.contextmanager
def _sqlite_snapshot(path: Path) -> Iterator[Rows]:
    conn = _connect_read_only(path)
    try:
        conn.execute("BEGIN")
        yield conn.execute
        conn.execute("COMMIT")
    finally:
        conn.close()


@contextlib.contextmanager
def _postgres_snapshot(url: str) -> Iterator[Rows]:
    """A REPEATABLE READ, READ ONLY transaction on a connection of the trainer's own (opened
    on its thread, never the store's async pool). Each query streams through a server-side
    cursor, so libpq never holds a big log whole beside the matrix being built."""
    timeout = {} if "connect_timeout" in conninfo_to_dict(url) else {
        "connect_timeout": CONNECT_TIMEOUT_S}
    with psycopg.connect(url, **timeout) as conn, contextlib.ExitStack() as cursors:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        names = itertools.count()

        def rows(query: str, params: Sequence[Any]) -> Iterable[tuple[Any, ...]]:
            cursor = cursors.enter_context(conn.cursor(f"supportbot_events_{next(names)}"))
            cursor.itersize = PG_FETCH_ROWS
            # The queries below hold no literal "?" or "%": only placeholders change.
            return cursor.execute(query.replace("?", "%s"), params)

        yield rows


def _snapshot(source: EventSource) -> contextlib.AbstractContextManager[Rows]:
    """One consistent, read-only view of the events table, whichever the store."""
    if isinstance(source, PostgresEvents):
        return _postgres_snapshot(source.url)
    return _sqlite_snapshot(Path(source))


def _scalar(rows: Rows, query: str, params: Sequence[Any] = ()) -> int:
    for (value,) in rows(query, params):
        return int(value)
    raise AssertionError(f"no row from {query!r}")


def read_event_log(
    source: EventSource, signals: SignalWeights, items: Sequence[str] = ()
) -> EventLog:
    """Read every positive event and the impression counts in one consistent snapshot.

    Blocking; runs on its own connection so the store is never held up. Users and new
    items get their rows and columns in the order the positives come, so that order is
    fixed: the ``events_type_ts`` index's own (no sort on SQLite), the same on PostgreSQL
    (``ts`` sorts bytewise on both), hence the same model from the same events.
    """
    marks = ",".join("?" for _ in POSITIVE_TYPES)
    with _snapshot(source) as rows:
        last = _scalar(rows, "SELECT COALESCE(MAX(id), 0) FROM events")
        positives = rows(
            f"SELECT user_id, item_id, type, value FROM events WHERE type IN ({marks}) "
            "AND item_id IS NOT NULL AND user_id IS NOT NULL AND id <= ? ORDER BY type, ts, id",
            [*POSITIVE_TYPES, last],
        )
        triples = ((u, str(i), signals.of(t, v)) for u, i, t, v in positives)
        interactions = Interactions.build(triples, items)
        impressions = {
            str(item): int(count) for item, count in rows(
                "SELECT item_id, COUNT(*) FROM events WHERE type = 'suggestion_shown' "
                "AND item_id IS NOT NULL AND id <= ? GROUP BY item_id",
                [last],
            )
        }
    return EventLog(interactions, impressions, last)


def count_new_positives(source: EventSource, after_id: int) -> int:
    """Positive events logged after ``after_id``: what decides an early retrain. Blocking."""
    marks = ",".join("?" for _ in POSITIVE_TYPES)
    with _snapshot(source) as rows:
        return _scalar(
            rows,
            f"SELECT COUNT(*) FROM events WHERE id > ? AND type IN ({marks}) "
            "AND item_id IS NOT NULL",
            [after_id, *POSITIVE_TYPES],
        )


# -- the collaborative model -----------------------------------------------------------------


class EASE:
    """EASE (Steck, WWW 2019): a closed-form item-item regression with a zero diagonal.

    Unlike cosine neighbours it learns how much each co-visit says given the others, which
    is what helps on msweb. It needs an items x items dense inverse: cheap for the help
    catalog (hundreds of articles), not meant for catalogs of tens of thousands.
    """

    __slots__ = ("similarity",)

    def __init__(self, matrix: sparse.csr_matrix, l2: float) -> None:
        gram = np.asarray((matrix.T @ matrix).toarray(), dtype=np.float64)
        diagonal = np.diag_indices_from(gram)
        gram[diagonal] += l2 * max(float(gram[diagonal].mean()), 1e-12)
        inverse = np.linalg.inv(gram)
        weights = -inverse / np.diag(inverse)
        weights[diagonal] = 0.0
        self.similarity: NDArray[np.float32] = weights.astype(np.float32)


def _fit(matrix: sparse.csr_matrix, params: CFParams) -> Any:
    """Fit an ``implicit`` model, or EASE, on CPU; BLAS is held to one thread (implicit's
    advice; EASE's one dense inverse is small for a help catalog)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.cpu.bpr import BayesianPersonalizedRanking
    from implicit.nearest_neighbours import ItemItemRecommender
    from threadpoolctl import threadpool_limits

    model: Any
    with threadpool_limits(1, "blas"):
        if params.kind == "ease":
            return EASE(matrix, params.ease_l2)
        if params.kind == "als":
            model = AlternatingLeastSquares(
                factors=params.factors, regularization=params.regularization * matrix.nnz,
                alpha=params.alpha, iterations=params.iterations, num_threads=params.threads,
                random_state=params.seed,
            )
        elif params.kind == "bpr":
            model = BayesianPersonalizedRanking(
                factors=params.bpr_factors, learning_rate=params.bpr_learning_rate,
                regularization=params.bpr_regularization, iterations=params.bpr_iterations,
                num_threads=params.threads, random_state=params.seed,
            )
        else:
            # Cosine similarity: item-item dot products of L2-normalised item columns.
            norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=0))).reshape(-1)
            matrix = sparse.csr_matrix(
                matrix.multiply(1.0 / np.maximum(norms, 1e-12)), dtype=np.float64
            )
            model = ItemItemRecommender(K=params.neighbours, num_threads=params.threads)
        model.fit(matrix, show_progress=False)
        if params.kind == "als":
            _ = model.YtY  # computed once here, not lazily on the event loop
    return model


class CFModel:
    """One trained collaborative model with the popularity it was trained with.

    Immutable once built, so concurrent :meth:`HybridRecommender.suggest` calls share it.
    """

    __slots__ = (
        "_model", "_user_index", "impressions", "item_index", "items", "kind", "last_event_id",
        "matrix", "popularity", "train_seconds", "users",
    )

    def __init__(
        self,
        data: Interactions,
        params: CFParams,
        *,
        impressions: Mapping[str, int] | None = None,
        last_event_id: int = 0,
    ) -> None:
        """Train; blocking (seconds on big logs), so call it from a worker thread."""
        started = time.perf_counter()
        self.kind: ModelKind = params.kind
        self.items = data.items
        self.users = data.users
        self.item_index = {item: i for i, item in enumerate(data.items)}
        self._user_index = {user: i for i, user in enumerate(data.users)}
        self.matrix = data.matrix
        self.popularity = np.asarray(
            (data.matrix > 0).sum(axis=0), dtype=np.float32
        ).reshape(-1)
        self.impressions = dict(impressions or {})
        self.last_event_id = last_event_id
        trainable = data.matrix.nnz > 0 and len(data.items) > 1
        self._model = _fit(data.matrix, params) if trainable else None
        self.train_seconds = time.perf_counter() - started

    @property
    def trained(self) -> bool:
        return self._model is not None

    def knows_user(self, user: Hashable) -> bool:
        return user in self._user_index

    def user_scores(
        self, user: Hashable, positives: Mapping[str, float]
    ) -> NDArray[np.float32] | None:
        """Scores over :attr:`items` for one user from their current positives; ``None``
        when the model cannot say anything about them."""
        if self._model is None:
            return None
        cols = [self.item_index[i] for i in positives if i in self.item_index]
        if self.kind == "bpr":
            row = self._user_index.get(user)
            if row is None:
                return None
            return np.asarray(
                matvec(self._model.item_factors, self._model.user_factors[row]),
                dtype=np.float32,
            )
        if not cols:
            return None
        weights = [float(positives[self.items[c]]) for c in cols]
        user_row = sparse.csr_matrix(
            (np.asarray(weights, dtype=np.float32), ([0] * len(cols), cols)),
            shape=(1, len(self.items)),
        )
        if self.kind == "als":
            vector = np.asarray(self._model.recalculate_user(0, user_row)).reshape(-1)
            return np.asarray(matvec(self._model.item_factors, vector), dtype=np.float32)
        if self.kind == "ease":
            return np.asarray(user_row @ self._model.similarity, dtype=np.float32).reshape(-1)
        return np.asarray((user_row @ self._model.similarity).toarray()[0], dtype=np.float32)

    def batch_scores(self, rows: NDArray[np.int64]) -> NDArray[np.float32]:
        """Scores for many training users (by row of the training matrix), for evaluation."""
        if self._model is None:
            return np.zeros((len(rows), len(self.items)), dtype=np.float32)
        if self.kind == "item-item":
            return np.asarray(
                (self.matrix[rows] @ self._model.similarity).toarray(), dtype=np.float32
            )
        if self.kind == "ease":
            return np.asarray(self.matrix[rows] @ self._model.similarity, dtype=np.float32)
        return np.asarray(
            self._model.user_factors[rows] @ self._model.item_factors.T, dtype=np.float32
        )


# -- blending --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ranked:
    item_id: str
    score: float
    arm: Arm


def _scaled(values: NDArray[np.float32], mask: NDArray[np.bool_]) -> NDArray[np.float32]:
    """Min-max to 0..1 over the candidates (``mask``); all-equal scores give zeros."""
    out = np.zeros_like(values, dtype=np.float32)
    if not mask.any():
        return out
    low, high = float(values[mask].min()), float(values[mask].max())
    if high - low <= 1e-12:
        return out
    out[mask] = (values[mask] - low) / (high - low)
    return out


def blend(
    items: Sequence[str],
    index: Mapping[str, int],
    *,
    content: Mapping[str, float],
    cf: NDArray[np.float32] | None,
    popularity: NDArray[np.float32],
    exclude: Iterable[str],
    config: HybridConfig,
    limit: int,
) -> list[Ranked]:
    """The best ``limit`` allowed items with a positive blended score, best first.

    ``index`` maps an item to its position in ``items``; ``cf`` and ``popularity`` are
    aligned with ``items``. Content scores are divided by the best match (this
    conversation's topic counts fully), CF scores min-max scaled over the candidates,
    popularity divided by the most popular. An item's arm is the part that contributed most.
    """
    n = len(items)
    allowed = np.ones(n, dtype=bool)
    for item in exclude:
        position = index.get(item)
        if position is not None:
            allowed[position] = False
    parts = np.zeros((3, n), dtype=np.float32)
    for item, score in content.items():
        position = index.get(item)
        if position is not None and allowed[position] and score > 0:
            parts[1, position] = score
    best = float(parts[1].max()) if n else 0.0
    if best > 0:
        parts[1] *= config.content_weight / best
    if cf is not None:
        parts[0] = config.cf_weight * _scaled(cf, allowed)
    top = float(popularity.max()) if n else 0.0
    if top > 0:
        parts[2] = config.popularity_weight * popularity / top
    total = parts.sum(axis=0)
    total[~allowed] = 0.0
    if limit < n // 4:
        head = np.argpartition(-total, limit)[:limit]
        order = head[np.argsort(-total[head], kind="stable")]
    else:
        order = np.argsort(-total, kind="stable")[:limit]
    arms: tuple[Arm, Arm, Arm] = ("cf", "content", "popular")
    return [
        Ranked(items[i], float(total[i]), arms[int(np.argmax(parts[:, i]))])
        for i in order
        if total[i] > 1e-9
    ]


# -- the recommender -------------------------------------------------------------------------


class ContentMatcher(Protocol):
    """Matches conversation text to articles (see :class:`core.suggestions.RetrieverContent`)."""

    @property
    def knowledge(self) -> KnowledgeBase: ...

    async def match(self, text: str, recent: Sequence[str], passages: int) -> dict[str, float]:
        """Article id -> similarity (0..1) for the articles relevant to the text."""
        ...

    async def refresh(self) -> bool:
        """Reload the articles when their files changed; True when they did."""
        ...


@dataclass(frozen=True, slots=True)
class UserHistory:
    """What a customer already did with articles, read at suggestion time."""

    positives: Mapping[str, float]
    seen: frozenset[str]
    """Clicked, viewed or rated ever, or shown in this conversation: never suggested again."""


@dataclass(frozen=True, slots=True)
class _View:
    """The catalog lined up with one model, built once per (knowledge base, model) pair so
    a suggestion costs no per-article Python work."""

    knowledge: KnowledgeBase
    model: CFModel | None
    items: tuple[str, ...]
    index: dict[str, int]
    articles: dict[str, Article]
    columns: NDArray[np.int64]
    """The model's column of each catalog item (0 where the model lacks it; see ``known``)."""
    known: NDArray[np.bool_]
    popularity: NDArray[np.float32]
    shown: NDArray[np.float64]
    """Times each item was shown: in the model's log, plus since it was trained (this array
    is counted up on the event loop as suggestions go out); exploration favours low counts."""

    @classmethod
    def of(
        cls, kb: KnowledgeBase, model: CFModel | None, recent: Mapping[str, int] | None = None
    ) -> _View:
        items = kb.ids()
        index = {item: i for i, item in enumerate(items)}
        columns = np.full(len(items), -1, dtype=np.int64)
        popularity = np.zeros(len(items), dtype=np.float32)
        shown = np.zeros(len(items), dtype=np.float64)
        if model is not None:
            columns = np.asarray([model.item_index.get(i, -1) for i in items], dtype=np.int64)
            popularity = np.where(columns >= 0, model.popularity[np.maximum(columns, 0)], 0.0)
        for counts in (model.impressions if model is not None else {}, recent or {}):
            for item, count in counts.items():
                position = index.get(item)
                if position is not None:
                    shown[position] += count
        return cls(
            knowledge=kb, model=model, items=items, index=index,
            articles={a.id: a for a in kb}, columns=np.maximum(columns, 0), known=columns >= 0,
            popularity=popularity.astype(np.float32), shown=shown,
        )


class HybridRecommender:
    """Collaborative filtering + content + popularity, retrained in the background."""

    __slots__ = (
        "_aligned", "_config", "_content", "_executor", "_last_train", "_model",
        "_recent_shows", "_retrain_lock", "_rng", "_store", "_task",
    )

    def __init__(self, content: ContentMatcher, config: HybridConfig | None = None) -> None:
        self._config = config or HybridConfig()
        self._content = content
        self._model: CFModel | None = None
        self._aligned: _View | None = None
        self._store: Store | None = None
        self._rng = random.Random(self._config.seed)
        self._recent_shows: Counter[str] = Counter()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="recommender-train")
        self._retrain_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_train = 0.0

    @property
    def config(self) -> HybridConfig:
        return self._config

    @property
    def model(self) -> CFModel | None:
        """The model in use now (``None`` before the first training)."""
        return self._model

    def attach_store(self, store: Store) -> None:
        """The opened store: its events train the model and say what a customer saw."""
        self._store = store

    def _event_source(self) -> EventSource | None:
        """Where the collaborative model trains from: training reads it on a connection of
        its own. Another kind of store has none, so suggestions come from the knowledge
        base and popularity alone, as with an empty event log."""
        store = self._store
        if isinstance(store, SQLiteStore):
            return store.path
        if isinstance(store, PostgresStore):
            return PostgresEvents(store.url)
        return None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background retrainer; its first round trains right away, so the service
        starts without waiting (content and popularity serve until then)."""
        if self._store is None:
            raise RuntimeError("attach_store() before start()")
        if self._task is None:
            self._task = asyncio.create_task(self._retrain_loop(), name="recommender-retrain")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        async with self._retrain_lock:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def retrain(self) -> CFModel:
        """Train a new model from the events table in the worker thread, then swap it in."""
        if self._store is None:
            raise RuntimeError("attach_store() before retrain()")
        source = self._event_source()
        if source is None:
            raise RuntimeError(f"collaborative retraining cannot read {type(self._store).__name__}")
        items = self._content.knowledge.ids()
        config = self._config
        async with self._retrain_lock:
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(self._executor, _train, source, items, config)
            self._model = model
            self._recent_shows = Counter()
            self._last_train = loop.time()
        log.info(
            "recommender: %s trained on %d users x %d items (%d positives) in %.2f s",
            model.kind, len(model.users), len(model.items), model.matrix.nnz, model.train_seconds,
        )
        return model

    async def _retrain_loop(self) -> None:
        config = self._config
        source = self._event_source()
        if source is None:
            log.info("recommender: collaborative retraining cannot read %s; suggestions "
                     "come from the knowledge base and popularity",
                     type(self._store).__name__)
        else:
            await self._retrain_guarded()
        while True:
            await asyncio.sleep(config.poll_s)
            try:
                await self._content.refresh()
                if source is None:
                    continue
                model = self._model
                after = model.last_event_id if model is not None else 0
                new = await asyncio.get_running_loop().run_in_executor(
                    self._executor, count_new_positives, source, after
                )
            except Exception:
                log.exception("recommender: checking for new events failed")
                continue
            elapsed = asyncio.get_running_loop().time() - self._last_train
            if new >= config.retrain_after_events or (new and elapsed >= config.retrain_every_s):
                await self._retrain_guarded()

    async def _retrain_guarded(self) -> None:
        try:
            await self.retrain()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recommender: retraining failed; keeping the previous model")

    # -- suggesting --------------------------------------------------------------------------

    async def _history(self, request: SuggestionRequest) -> UserHistory:
        if self._store is None:
            return UserHistory({}, frozenset())
        rows = await self._store.user_events(request.user_id)
        signals = self._config.signals
        positives: dict[str, float] = {}
        seen: set[str] = set()
        for row in rows:
            item, kind = str(row["item_id"]), row["type"]
            if kind == "suggestion_shown":
                if row["conversation_id"] == request.conversation_id:
                    seen.add(item)
                continue
            seen.add(item)
            weight = signals.of(kind, row["value"])
            if weight > 0:
                positives[item] = positives.get(item, 0.0) + weight
        return UserHistory(positives, frozenset(seen))

    async def _content_scores(self, request: SuggestionRequest) -> dict[str, float]:
        if not request.text.strip():
            return {}
        return await self._content.match(
            request.text, tuple(request.recent_texts), self._config.content_passages
        )

    def _view(self, kb: KnowledgeBase, model: CFModel | None) -> _View:
        view = self._aligned
        if view is None or view.knowledge is not kb or view.model is not model:
            view = self._aligned = _View.of(kb, model, self._recent_shows)
        return view

    async def suggest(self, request: SuggestionRequest, k: int) -> list[Suggestion]:
        if k <= 0:
            return []
        model = self._model  # read once: this call uses one snapshot throughout
        view = self._view(self._content.knowledge, model)
        history, content = await asyncio.gather(
            self._history(request), self._content_scores(request)
        )
        cf: NDArray[np.float32] | None = None
        if model is not None:
            scores = model.user_scores(request.user_id, history.positives)
            if scores is not None:
                cf = np.where(view.known, scores[view.columns], float(scores.min()))
        ranked = blend(
            view.items, view.index, content=content, cf=cf, popularity=view.popularity,
            exclude=history.seen, config=self._config, limit=k,
        )
        if self._config.exploration > 0 and self._rng.random() < self._config.exploration:
            ranked = self._explore(ranked, view, history, k)
        suggestions: list[Suggestion] = []
        for r in ranked:
            article = view.articles.get(r.item_id)
            if article is not None:
                suggestions.append(RankedSuggestion(article.id, article.title, article.url, r.arm))
                self._recent_shows[article.id] += 1
                if self._aligned is view:
                    view.shown[view.index[article.id]] += 1
        return suggestions

    def _explore(
        self, ranked: list[Ranked], view: _View, history: UserHistory, k: int
    ) -> list[Ranked]:
        """Give the last slot (or a free one) to a rarely shown article: drawn with weight
        1 / (1 + times shown), over arrays (no per-article Python work on a big catalog)."""
        weights = 1.0 / (1.0 + view.shown)
        for item in (*(r.item_id for r in ranked), *history.seen):
            position = view.index.get(item)
            if position is not None:
                weights[position] = 0.0
        cumulative = np.cumsum(weights)
        total = float(cumulative[-1]) if len(cumulative) else 0.0
        if total <= 0:
            return ranked
        at = int(np.searchsorted(cumulative, self._rng.random() * total, side="right"))
        pick = view.items[min(at, len(view.items) - 1)]
        keep = ranked if len(ranked) < k else ranked[: k - 1]
        return [*keep, Ranked(pick, 0.0, "explore")]

    def describe(self, item_id: str) -> Suggestion | None:
        article = self._content.knowledge.get(item_id)
        if article is None:
            return None
        return Suggestion(article.id, article.title, article.url)


def _train(source: EventSource, items: Sequence[str], config: HybridConfig) -> CFModel:
    log_ = read_event_log(source, config.signals, items)
    return CFModel(
        log_.interactions, config.cf, impressions=log_.impressions,
        last_event_id=log_.last_event_id,
    )
