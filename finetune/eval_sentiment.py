"""``supportbot eval sentiment``: every sentiment model side by side on the same test split.

Baselines sit next to the trained models so a figure can be judged: the majority class is
what "always negative" gets on this skewed data, and VADER is a social-media lexicon.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune.sentiment_data import (
    DEFAULT_DATA,
    LABELS,
    DataError,
    Example,
    Scores,
    apply_logit_bias,
    bootstrap_macro_f1,
    decide,
    label_counts,
    load,
    score,
)
from finetune.sentiment_head import DEFAULT_CACHE
from finetune.sentiment_head import DEFAULT_OUT as DEFAULT_HEAD
from finetune.sentiment_ood import DEFAULT_LABELS as OOD_LABELS
from finetune.sentiment_ood import load_ood, ood_table
from finetune.tool import run_module

DEFAULT_MODEL = Path("data/models/sentiment-minilm")
DEFAULT_DATA_ROOT = Path("../shared/data")
VADER_MARGIN = 0.05
Predictor = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    scores: Scores
    interval: tuple[float, float]
    """95% bootstrap interval of the macro-F1 over the test tweets."""


def majority(train: Sequence[Example]) -> Predictor:
    label = label_counts(train).most_common(1)[0][0]
    return lambda texts: [label] * len(texts)


def vader() -> Predictor:
    """VADER's usual rule: compound >= 0.05 positive, <= -0.05 negative, else neutral."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def predict(texts: Sequence[str]) -> list[int]:
        out: list[int] = []
        for t in texts:
            c = analyzer.polarity_scores(t)["compound"]
            out.append(2 if c >= VADER_MARGIN else 0 if c <= -VADER_MARGIN else 1)
        return out

    return predict


def evaluate(
    test: Sequence[Example], models: Sequence[tuple[str, Predictor]]
) -> list[Row]:
    texts = [e.text for e in test]
    gold = [e.label for e in test]
    rows = []
    for name, predict in models:
        predicted = predict(texts)
        rows.append(Row(name, score(gold, predicted), bootstrap_macro_f1(gold, predicted)))
    return rows


def table(rows: Sequence[Row]) -> str:
    """One Markdown table: readable in a terminal and pasted into the README as is."""
    short = "/".join(label[:3] for label in LABELS)
    lines = [
        f"| model | accuracy | macro-F1 | neg. precision | neg. recall "
        f"| confusion (rows true, cols predicted: {short}) | macro-F1 95% CI |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        s = r.scores
        confusion = " / ".join(" ".join(str(v) for v in row) for row in s.confusion)
        lines.append(
            f"| {r.name} | {s.accuracy:.3f} | {s.macro_f1:.3f} | {s.negative_precision:.3f} "
            f"| {s.negative_recall:.3f} | {confusion} "
            f"| {r.interval[0]:.3f}–{r.interval[1]:.3f} |"
        )
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="airline Tweets.csv")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="fine-tuned model folder (skipped if it does not exist)")
    parser.add_argument("--head", type=Path, default=DEFAULT_HEAD,
                        help="embedded linear head (.safetensors)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="embedding cache ('' to disable)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--ood-labels", type=Path, default=OOD_LABELS,
                        help="out-of-domain labels folder ('' to skip that table)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="shared data folder the out-of-domain labels point into")


def run(args: argparse.Namespace) -> int:
    try:
        data = load(args.data)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    test = data.split("test")
    if not test:
        print(f"error: {data.path}: no tweets fall in the test split", file=sys.stderr)
        return 2
    models: list[tuple[str, Predictor]] = [
        ("majority class", majority(data.split("train") or test)),
        (f"VADER (compound ±{VADER_MARGIN})", vader()),
    ]
    notes: list[str] = []
    try:
        models.extend(_head_models(args))
    except DataError as exc:
        notes.append(f"embedded head skipped: {exc}")
    shipped = _shipped_model()
    if shipped is not None:
        models.append(shipped)
    else:
        notes.append("shipped model skipped: core/assets/sentiment-minilm is missing")
    if args.model.exists():
        try:
            models.extend(_finetuned_models(args.model))
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        notes.append(f"fine-tuned model skipped: {args.model} does not exist "
                     "(make it with `supportbot finetune sentiment`)")
    counts = label_counts(test)
    print(f"test split of {data.path}: {len(test)} tweets ("
          + ", ".join(f"{LABELS[c]} {counts[c]}" for c in range(len(LABELS))) + ")")
    print(table(evaluate(test, models)))
    for note in notes:
        print(note)
    if str(args.ood_labels) not in ("", ".") and not args.data_root.is_dir():
        print(f"out-of-domain table skipped: {args.data_root} not found (pass --data-root)")
    elif str(args.ood_labels) not in ("", "."):
        try:
            ood = load_ood(args.data_root, args.ood_labels)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"\nout of domain ({args.ood_labels}: {len(ood)} labelled messages, never "
              "trained on):")
        print(ood_table(ood, [m for m in models if not m[0].startswith("majority")]))
    return 0


def _head_models(args: argparse.Namespace) -> list[tuple[str, Predictor]]:
    from finetune.sentiment_head import Encoder, load_head

    head = load_head(args.head)
    cache = args.cache_dir if str(args.cache_dir) not in ("", ".") else None
    encoder = Encoder(cache)
    out: list[tuple[str, Predictor]] = [
        ("embedded head (argmax)",
         lambda texts: head.predict(encoder.encode(texts), use_threshold=False)),
    ]
    if head.negative_threshold is not None:
        out.append((f"embedded head (P(neg) >= {head.negative_threshold:.2f})",
                    lambda texts: head.predict(encoder.encode(texts))))
    return out


def _shipped_model() -> tuple[str, Predictor] | None:
    """What ``make run`` serves: the shipped folder, ONNX int8, as the service runs it."""
    from core.sentiment import SHIPPED_MODEL, SHIPPED_ONNX, FineTunedClassifier

    if not (SHIPPED_MODEL / SHIPPED_ONNX).is_file():
        return None
    classifier = FineTunedClassifier(SHIPPED_MODEL, runtime="onnx", quantize="int8",
                                     threads=0)
    classifier._load()  # offline use: no micro-batcher, no event loop

    def predict(texts: Sequence[str]) -> list[int]:
        return [LABELS.index(s.label) for s in classifier.classify_many(texts)]

    return "shipped MiniLM, ONNX int8 (core/assets/sentiment-minilm; make run)", predict


def _finetuned_models(path: Path) -> list[tuple[str, Predictor]]:
    from finetune.sentiment import FineTuned

    model = FineTuned(path)
    memo: dict[tuple[str, ...], list[list[float]]] = {}

    def probs(texts: Sequence[str]) -> list[list[float]]:
        key = tuple(texts)
        if key not in memo:
            memo[key] = model.probabilities(texts).tolist()
        return memo[key]

    out: list[tuple[str, Predictor]] = [
        ("fine-tuned MiniLM (argmax)", lambda texts: decide(probs(texts), None)),
    ]
    t = model.negative_threshold
    if t is not None:
        out.append((f"fine-tuned MiniLM (P(neg) >= {t:.2f})",
                    lambda texts: decide(probs(texts), t)))
    bias = model.logit_bias
    if bias is not None:
        shown = ", ".join(f"{b:+.2f}" for b in bias)
        out.append((f"fine-tuned MiniLM (dev-fitted logit bias {shown}; service)",
                    lambda texts: decide(apply_logit_bias(probs(texts), bias), None)))
    return out


run_module(__name__)
