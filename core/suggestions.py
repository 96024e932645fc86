"""The default recommender of the service, assembled from config.

The knowledge base and its MiniLM/BM25 index come from :mod:`core.retrieval` (one encoder
for grounding and suggestions); the collaborative part learns from the store's events.
The content step asks the retriever the same question the grounder asked (ids left out,
small-talk turns skipped), so the query embedding the grounder just computed is reused
from the retriever's cache instead of being encoded again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import ConfigError, RecommenderSettings, Settings
from core.grounding import is_small_talk
from core.knowledge import KnowledgeBase
from core.recommender import CFParams, HybridConfig, HybridRecommender
from core.retrieval import Retriever, retrieval_query

if TYPE_CHECKING:
    from core.store import Store


class RetrieverContent:
    """Content matching through the retriever: an article scores its best passage's
    similarity to the conversation (articles below the retriever's threshold are left out)."""

    __slots__ = ("_retriever",)

    def __init__(self, retriever: Retriever) -> None:
        self._retriever = retriever

    @property
    def knowledge(self) -> KnowledgeBase:
        return self._retriever.knowledge

    async def match(self, text: str, recent: Sequence[str], passages: int) -> dict[str, float]:
        scores: dict[str, float] = {}
        turns = [retrieval_query(t) for t in recent if not is_small_talk(t)]
        for hit in await self._retriever.asearch(retrieval_query(text), turns, k=passages):
            scores[hit.article_id] = max(scores.get(hit.article_id, 0.0), hit.score)
        return scores

    async def refresh(self) -> bool:
        """The retriever's own schedule decides; it looks once per interval whoever asks."""
        return await self._retriever.areload_if_due()


def hybrid_config(settings: RecommenderSettings) -> HybridConfig:
    """The ``[recommender]`` section as the recommender's own config."""
    try:
        return _hybrid_config(settings)
    except ValueError as exc:
        raise ConfigError(f"[recommender]: {exc}") from None


def _hybrid_config(settings: RecommenderSettings) -> HybridConfig:
    return HybridConfig(
        cf=CFParams(
            kind=settings.model, factors=settings.factors, iterations=settings.iterations,
            regularization=settings.regularization, alpha=settings.alpha,
            threads=settings.train_threads,
        ),
        cf_weight=settings.cf_weight,
        content_weight=settings.content_weight,
        popularity_weight=settings.popularity_weight,
        exploration=settings.exploration,
        retrain_every_s=settings.retrain_every_s,
        retrain_after_events=settings.retrain_after_events,
    )


async def build_default_recommender(
    settings: Settings, store: Store | None = None, retriever: Retriever | None = None
) -> HybridRecommender:
    """Load the knowledge base (a broken article stops the start, naming the file), open
    the index (cached under ``data_dir/cache``) and, given the opened store, start the
    background retrainer. Without a store, call ``attach_store`` and ``start`` later."""
    section = settings.recommender
    if retriever is None:
        cache = Path(settings.service.data_dir) / "cache"
        retriever = await Retriever.open(section.knowledge_dir, cache)
    recommender = HybridRecommender(RetrieverContent(retriever), hybrid_config(section))
    if store is not None:
        recommender.attach_store(store)
        await recommender.start()
    return recommender
