"""Sentiment of customer messages: negative / neutral / positive with probabilities.

The embedded default is the all-MiniLM-L6-v2 sentence encoder plus a small linear head
committed in ``core/assets`` (reproduced by ``finetune/sentiment_head.py``). A fine-tuned
sequence-classification folder (``finetune/sentiment.py``) replaces both when configured.
Either way, concurrent requests are micro-batched into one forward pass off the loop.
A fine-tuned folder can also run on ONNX Runtime (``sentiment.runtime = "onnx"``): the
ONNX file is exported from the folder on first start and cached beside it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from core.batching import MicroBatcher
from core.generation.model_files import LOAD_LOCK, encoder_dir
from core.sentiment_onnx import build_onnx, onnx_cache_path, onnx_session
from core.social_text import normalize
from core.store import Scores
from core.torch_threads import pin_torch_threads

log = logging.getLogger(__name__)

LABELS = ("negative", "neutral", "positive")
DEFAULT_HEAD = Path(__file__).parent / "assets" / "sentiment_head.safetensors"
SHIPPED_MODEL = Path(__file__).parent / "assets" / "sentiment-minilm"
"""The fine-tuned model the service ships (see its MODEL_CARD.md): ONNX int8 only."""
SHIPPED_ONNX = "model_int8.onnx"
"""A folder holding this file runs it as is: no torch weights, nothing built on start."""


@runtime_checkable
class Classifier(Protocol):
    async def classify(self, text: str) -> Scores: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def _scores(probs: Sequence[float]) -> Scores:
    best = max(range(3), key=lambda i: probs[i])
    return Scores(LABELS[best], float(probs[0]), float(probs[1]), float(probs[2]))


QUANTIZE_MODES = ("none", "int8")
RUNTIMES = ("torch", "onnx")
SUB_BATCH = 32
"""Texts per forward pass: sorted by length and cut here, so padding stays short. On one
CPU thread MiniLM gains nothing from larger batches (see ``bench/sentiment.py``)."""


def int8_layers(module: Any) -> set[str]:
    """The linear layers worth int8: all but each block's feed-forward output projection
    (its GELU input has outliers that per-batch activation scaling handles badly) and the
    pooler / classifier (tiny). Chosen on the dev split with the fine-tuned model: 98.9%
    of labels as fp32 at 1.7x less CPU; every layer int8 was 2.3x but kept 95.9%."""
    import torch

    def keep_float(name: str) -> bool:
        ffn_out = name.endswith(".output.dense") and not name.endswith("attention.output.dense")
        return ffn_out or "pooler" in name or "classifier" in name

    return {
        name for name, child in module.named_modules()
        if isinstance(child, torch.nn.Linear) and not keep_float(name)
    }


def quantize_int8(module: Any) -> Any:
    """Dynamic int8 quantisation (per-channel weights, activations scaled per batch) of
    :func:`int8_layers`: on CPU the linear layers are most of MiniLM's time."""
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    layers = int8_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no linear layers to quantise")
    with warnings.catch_warnings():
        # torch.ao.quantization is marked deprecated in favour of torchao but still ships.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(
            module, dict.fromkeys(layers, per_channel_dynamic_qconfig), dtype=torch.qint8,
            inplace=True,
        )


class _Batched:
    """Shared plumbing: a model loaded off-loop and a micro-batcher in front of it."""

    __slots__ = ("_batcher", "_max_batch", "_max_wait_s", "_quantize", "_runtime", "_threads")

    def __init__(
        self, max_batch: int, max_wait_ms: float, quantize: str = "none", threads: int = 1,
        runtime: str = "torch",
    ) -> None:
        if quantize not in QUANTIZE_MODES:
            raise ValueError(
                f"sentiment.quantize must be one of {', '.join(QUANTIZE_MODES)}, not {quantize!r}"
            )
        if runtime not in RUNTIMES:
            raise ValueError(
                f"sentiment.runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}"
            )
        if threads < 0:
            raise ValueError(f"sentiment threads must be >= 0 (0: the library's default), "
                             f"not {threads}")
        self._max_batch = max_batch
        self._max_wait_s = max_wait_ms / 1000
        self._quantize = quantize
        self._runtime = runtime
        self._threads = threads
        self._batcher: MicroBatcher[str, Scores] | None = None

    @property
    def quantize(self) -> str:
        return self._quantize

    @property
    def runtime(self) -> str:
        return self._runtime

    @property
    def threads(self) -> int:
        return self._threads

    def _predict(self, texts: Sequence[str]) -> list[Scores]:
        raise NotImplementedError

    def _load(self) -> None:
        raise NotImplementedError

    def _pin_threads(self) -> None:
        """Runs in the batcher's worker thread: torch keeps the intra-op thread count per
        thread (OpenMP), so the classifier can run on its own count without changing others'.

        On a small busy CPU, two intra-op threads make every op wait at a barrier for a
        descheduled partner: 2-15x slower than one thread in a micro-benchmark on the loaded
        2-core dev box, and no faster in ``bench/sentiment.py`` when a core was free."""
        if self._threads:
            pin_torch_threads(self._threads)

    async def start(self) -> None:
        import asyncio

        await asyncio.to_thread(self._load)
        self._batcher = MicroBatcher(
            self._predict, max_batch=self._max_batch, max_wait_s=self._max_wait_s,
            name="sentiment", initializer=self._pin_threads,
        )
        await self._batcher.run_in_worker(lambda: None)

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
        max_wait_ms: float = 5.0, quantize: str = "none", threads: int = 1,
    ) -> None:
        super().__init__(max_batch, max_wait_ms, quantize, threads)
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
            encoder = SentenceTransformer(str(encoder_dir(self._encoder_spec)), device="cpu")
        self._encoder = quantize_int8(encoder) if self._quantize == "int8" else encoder

    def _predict(self, texts: Sequence[str]) -> list[Scores]:
        import torch

        with torch.inference_mode():
            # encode() sorts by length and pads per sub-batch.
            emb = self._encoder.encode(
                list(texts), batch_size=SUB_BATCH, convert_to_tensor=True,
                normalize_embeddings=True, show_progress_bar=False,
            )
            probs = torch.softmax(emb @ self._weight.T + self._bias, dim=-1).tolist()
        return [_scores(p) for p in probs]


def logit_scale(config: Any, config_file: Path) -> float:
    """A fine-tuned folder's dev-fitted logit scale (1 when it has none), checked."""
    scale = getattr(config, "logit_scale", 1.0)
    if (isinstance(scale, bool) or not isinstance(scale, int | float)
            or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"{config_file}: logit_scale must be a positive number, "
                         f"not {scale!r}")
    return float(scale)


class FineTunedClassifier(_Batched):
    """A sequence-classification folder written by ``supportbot finetune sentiment``.

    ``logit_scale`` and ``logit_bias`` in its config.json (fitted on the dev split)
    multiply and then shift the logits,
    so the probabilities and labels are the ones its model card reports. With
    ``runtime="onnx"`` the forward pass runs on ONNX Runtime from a file built from the
    folder on first start (:mod:`core.sentiment_onnx`).
    """

    __slots__ = ("_logit_bias", "_logit_scale", "_max_length", "_model", "_onnx_inputs",
                 "_onnx_path", "_order", "_path", "_session", "_tokenizer")

    def __init__(
        self, path: str | Path, *, max_batch: int = 32, max_wait_ms: float = 5.0,
        quantize: str = "none", threads: int = 1, runtime: str = "torch",
    ) -> None:
        super().__init__(max_batch, max_wait_ms, quantize, threads, runtime)
        self._path = Path(path)
        self._model: Any = None
        self._session: Any = None
        self._onnx_path: Path | None = None
        self._onnx_inputs: dict[str, Any] = {}
        self._tokenizer: Any = None
        self._order: list[int] = []
        self._logit_bias: Any = None
        self._logit_scale = 1.0
        self._max_length = 128

    @property
    def logit_scale(self) -> float:
        """The dev-fitted temperature correction: logits are multiplied by it first."""
        return self._logit_scale

    @property
    def logit_bias(self) -> tuple[float, ...]:
        """The bias in :data:`LABELS` order (zeros when the folder has none)."""
        if self._logit_bias is None:
            return (0.0,) * len(LABELS)
        return tuple(float(self._logit_bias[i]) for i in self._order)

    @property
    def onnx_path(self) -> Path | None:
        """The ONNX file in use (``runtime="onnx"``, once started), else None."""
        return self._onnx_path

    def _load(self) -> None:
        config_file = self._path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"sentiment model folder {self._path} has no config.json")
        if self._runtime == "onnx":
            self._load_onnx()
        elif (self._path / SHIPPED_ONNX).is_file() and not any(
                self._path.glob("*.safetensors")):
            raise ValueError(f"{self._path} ships only {SHIPPED_ONNX}: set sentiment.runtime "
                             "= \"onnx\" and quantize = \"int8\" (or point sentiment.model "
                             "at a folder from `supportbot finetune sentiment`)")
        else:
            self._load_torch()

    def _load_torch(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        with LOAD_LOCK:
            self._tokenizer = AutoTokenizer.from_pretrained(self._path)
            model = AutoModelForSequenceClassification.from_pretrained(self._path).eval()
        self._model = quantize_int8(model) if self._quantize == "int8" else model
        self._read_config(model.config)

    def _load_onnx(self) -> None:
        import numpy as np
        from transformers import AutoConfig, AutoTokenizer

        with LOAD_LOCK:
            self._tokenizer = AutoTokenizer.from_pretrained(self._path)
            config = AutoConfig.from_pretrained(self._path)
        self._read_config(config)
        shipped = self._path / SHIPPED_ONNX
        if shipped.is_file():
            if self._quantize != "int8":
                raise ValueError(f"{self._path} ships {SHIPPED_ONNX}: set sentiment.quantize "
                                 "= \"int8\"")
            path = shipped
        else:
            path = onnx_cache_path(self._path, self._quantize)
        if not path.is_file():
            log.info("building %s from %s (once per model)", path, self._path)
            build_onnx(self._path, path, self._quantize)
        self._session = onnx_session(path, self._threads)
        self._onnx_path = path
        dtypes = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
        self._onnx_inputs = {i.name: dtypes[i.type] for i in self._session.get_inputs()}

    def _read_config(self, config: Any) -> None:
        config_file = self._path / "config.json"
        self._max_length = int(getattr(config, "max_seq_length", 128))
        id2label = {int(k): v.lower() for k, v in config.id2label.items()}
        by_name = {name: idx for idx, name in id2label.items()}
        try:
            self._order = [by_name[label] for label in LABELS]
        except KeyError:
            raise ValueError(
                f"{config_file}: id2label must name {LABELS}, has {json.dumps(id2label)}"
            ) from None
        self._logit_scale = logit_scale(config, config_file)
        bias = getattr(config, "logit_bias", None)
        if bias is not None:
            if (not isinstance(bias, list) or len(bias) != len(id2label)
                    or not all(isinstance(b, int | float) for b in bias)):
                raise ValueError(
                    f"{config_file}: logit_bias must be a list of {len(id2label)} numbers "
                    f"(one per id2label entry), not {bias!r}"
                )
            import numpy as np

            self._logit_bias = np.asarray(bias, dtype=np.float64)

    def _predict(self, texts: Sequence[str]) -> list[Scores]:
        import numpy as np

        # Character length orders tweets well enough to keep each sub-batch's padding short.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        probs: list[list[float]] = [[]] * len(texts)
        for start in range(0, len(order), SUB_BATCH):
            idx = order[start : start + SUB_BATCH]
            logits = self._logits([texts[i] for i in idx]).astype(np.float64)
            logits = logits * self._logit_scale
            if self._logit_bias is not None:
                logits = logits + self._logit_bias
            exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
            rows = (exp / exp.sum(axis=-1, keepdims=True))[:, self._order].tolist()
            for i, row in zip(idx, rows, strict=True):
                probs[i] = row
        return [_scores(p) for p in probs]

    def _logits(self, texts: list[str]) -> Any:
        """One sub-batch's raw logits (id2label order) from whichever runtime is loaded."""
        import numpy as np

        if self._session is None:
            import torch

            batch = self._tokenizer(texts, padding=True, truncation=True,
                                    max_length=self._max_length, return_tensors="pt")
            with torch.inference_mode():
                return self._model(**batch).logits.numpy()
        batch = self._tokenizer(texts, padding=True, truncation=True,
                                max_length=self._max_length, return_tensors="np")
        feed = {}
        for name, dtype in self._onnx_inputs.items():
            value = batch.get(name)
            if value is None:  # a tokenizer without token types: all segment 0
                value = np.zeros_like(batch["input_ids"])
            feed[name] = value.astype(dtype, copy=False)
        return self._session.run(None, feed)[0]


def _beside_package(model: str) -> str:
    """A relative folder missing under the working directory, read from the checkout the
    package runs from instead: ``core/assets/sentiment-minilm`` works wherever the service
    is started."""
    path = Path(model)
    root = SHIPPED_MODEL.parent.parent.parent
    if model and not path.is_absolute() and not path.exists() and (
            (root / path).exists() or (root / path).resolve() == SHIPPED_MODEL.resolve()):
        return str(root / path)
    return model


def build_classifier(
    encoder: str, head: str, model: str, max_batch: int, max_wait_ms: float,
    quantize: str = "none", threads: int = 1, runtime: str = "torch",
) -> _Batched:
    """The configured classifier: a fine-tuned folder if set, else encoder + head.

    ``quantize`` is ``sentiment.quantize``; ``threads`` the torch (or ONNX Runtime)
    threads of the classifier's own worker thread (0: the library's default); ``runtime``
    is ``sentiment.runtime``, where ``onnx`` needs a fine-tuned folder.
    """
    model = _beside_package(model)
    if model and Path(model).resolve() == SHIPPED_MODEL.resolve() and not (
            SHIPPED_MODEL / SHIPPED_ONNX).is_file():
        log.warning("sentiment: the shipped model %s is missing; falling back to the embedded "
                    "MiniLM + head (core/assets/sentiment_head.safetensors)", SHIPPED_MODEL)
        model, runtime, quantize = "", "torch", "none"
    if model and (Path(model) / SHIPPED_ONNX).is_file() and not any(
            Path(model).glob("*.safetensors")) and (runtime, quantize) != ("onnx", "int8"):
        log.info("sentiment: %s holds only %s; running it on ONNX Runtime, int8", model,
                 SHIPPED_ONNX)
        runtime, quantize = "onnx", "int8"
    if model:
        log.info("sentiment: fine-tuned model %s (%s, %s)", model, runtime, quantize)
        return FineTunedClassifier(model, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                   quantize=quantize, threads=threads, runtime=runtime)
    if runtime not in RUNTIMES:
        raise ValueError(
            f"sentiment.runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}"
        )
    if runtime != "torch":
        raise ValueError(
            f"sentiment.runtime = {runtime!r} needs a fine-tuned folder in sentiment.model; "
            "the embedded encoder + head runs on torch"
        )
    log.info("sentiment: embedded %s encoder + head %s", encoder, head or DEFAULT_HEAD)
    return EncoderHeadClassifier(encoder, head, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                 quantize=quantize, threads=threads)
