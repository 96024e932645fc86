"""Sentiment of customer messages: negative / neutral / positive with probabilities.

The embedded default is the all-MiniLM-L6-v2 sentence encoder plus a small linear head
committed in ``core/assets`` (reproduced by ``finetune/sentiment_head.py``). A fine-tuned
sequence-classification folder (``finetune/sentiment.py``) replaces both when configured.
Either way, concurrent requests are micro-batched into one forward pass off the loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from core.batching import MicroBatcher
from core.generation.model_files import LOAD_LOCK, encoder_dir
from core.social_text import normalize
from core.store import Scores

log = logging.getLogger(__name__)

LABELS = ("negative", "neutral", "positive")
DEFAULT_HEAD = Path(__file__).parent / "assets" / "sentiment_head.safetensors"


@runtime_checkable
class Classifier(Protocol):
    async def classify(self, text: str) -> Scores: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def _scores(probs: Sequence[float]) -> Scores:
    best = max(range(3), key=lambda i: probs[i])
    return Scores(LABELS[best], float(probs[0]), float(probs[1]), float(probs[2]))


class _Batched:
    """Shared plumbing: a model loaded off-loop and a micro-batcher in front of it."""

    __slots__ = ("_batcher", "_max_batch", "_max_wait_s")

    def __init__(self, max_batch: int, max_wait_ms: float) -> None:
        self._max_batch = max_batch
        self._max_wait_s = max_wait_ms / 1000
        self._batcher: MicroBatcher[str, Scores] | None = None

    def _predict(self, texts: Sequence[str]) -> list[Scores]:
        raise NotImplementedError

    def _load(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        import asyncio

        await asyncio.to_thread(self._load)
        self._batcher = MicroBatcher(
            self._predict, max_batch=self._max_batch, max_wait_s=self._max_wait_s,
            name="sentiment",
        )

    async def classify(self, text: str) -> Scores:
        if self._batcher is None:
            raise RuntimeError("classifier not started")
        return await self._batcher.submit(normalize(text))

    def classify_many(self, texts: Sequence[str]) -> list[Scores]:
        """Blocking batch call for offline evaluation."""
        return self._predict([normalize(t) for t in texts])

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()


class EncoderHeadClassifier(_Batched):
    """Sentence embedding (mean-pooled, normalised) followed by a linear softmax head."""

    __slots__ = ("_bias", "_encoder", "_encoder_spec", "_head_path", "_weight")

    def __init__(
        self, encoder: str = "minilm", head: str | Path = "", *, max_batch: int = 32,
        max_wait_ms: float = 5.0,
    ) -> None:
        super().__init__(max_batch, max_wait_ms)
        self._encoder_spec = encoder
        self._head_path = Path(head) if head else DEFAULT_HEAD
        self._encoder: Any = None
        self._weight: Any = None
        self._bias: Any = None

    def _load(self) -> None:
        from safetensors.torch import load_file
        from sentence_transformers import SentenceTransformer

        if not self._head_path.is_file():
            raise FileNotFoundError(f"sentiment head {self._head_path} not found")
        tensors = load_file(str(self._head_path))
        self._weight, self._bias = tensors["weight"], tensors["bias"]
        with LOAD_LOCK:
            self._encoder = SentenceTransformer(str(encoder_dir(self._encoder_spec)), device="cpu")

    def _predict(self, texts: Sequence[str]) -> list[Scores]:
        import torch

        with torch.inference_mode():
            emb = self._encoder.encode(
                list(texts), batch_size=len(texts), convert_to_tensor=True,
                normalize_embeddings=True,
            )
            probs = torch.softmax(emb @ self._weight.T + self._bias, dim=-1).tolist()
        return [_scores(p) for p in probs]


class FineTunedClassifier(_Batched):
    """A sequence-classification folder written by ``supportbot finetune sentiment``."""

    __slots__ = ("_max_length", "_model", "_order", "_path", "_tokenizer")

    def __init__(self, path: str | Path, *, max_batch: int = 32, max_wait_ms: float = 5.0) -> None:
        super().__init__(max_batch, max_wait_ms)
        self._path = Path(path)
        self._model: Any = None
        self._tokenizer: Any = None
        self._order: list[int] = []
        self._max_length = 128

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (self._path / "config.json").is_file():
            raise FileNotFoundError(f"sentiment model folder {self._path} has no config.json")
        with LOAD_LOCK:
            self._tokenizer = AutoTokenizer.from_pretrained(self._path)
            self._model = AutoModelForSequenceClassification.from_pretrained(self._path).eval()
        self._max_length = int(getattr(self._model.config, "max_seq_length", 128))
        id2label = {int(k): v.lower() for k, v in self._model.config.id2label.items()}
        by_name = {name: idx for idx, name in id2label.items()}
        try:
            self._order = [by_name[label] for label in LABELS]
        except KeyError:
            raise ValueError(
                f"{self._path}/config.json id2label must name {LABELS}, has "
                f"{json.dumps(id2label)}"
            ) from None

    def _predict(self, texts: Sequence[str]) -> list[Scores]:
        import torch

        batch = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self._max_length,
            return_tensors="pt",
        )
        with torch.inference_mode():
            probs = torch.softmax(self._model(**batch).logits, dim=-1)[:, self._order].tolist()
        return [_scores(p) for p in probs]


def build_classifier(
    encoder: str, head: str, model: str, max_batch: int, max_wait_ms: float
) -> _Batched:
    """The configured classifier: a fine-tuned folder if set, else encoder + head."""
    if model:
        return FineTunedClassifier(model, max_batch=max_batch, max_wait_ms=max_wait_ms)
    return EncoderHeadClassifier(encoder, head, max_batch=max_batch, max_wait_ms=max_wait_ms)
