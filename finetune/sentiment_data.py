"""The airline-tweets sentiment data set: loading, cleaning, the fixed split, and its scores.

Everything that trains or evaluates a sentiment model reads the data through here, so every
model sees the same deduplicated rows, the same normalised text and the same test split.
Text is cleaned by :func:`core.social_text.normalize`, which the runtime classifier applies too.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.social_text import NORMALIZATION, normalize

__all__ = ["LABELS", "NORMALIZATION", "DataError", "Dataset", "Example", "load", "normalize"]

LABELS: tuple[str, str, str] = ("negative", "neutral", "positive")
NEGATIVE = 0
DEFAULT_DATA = Path("../shared/data/airline-sentiment/Tweets.csv")

Split = Literal["train", "dev", "test"]
REQUIRED_COLUMNS = ("tweet_id", "airline_sentiment", "text")
PERSONAL_COLUMNS = ("name", "tweet_coord", "tweet_location")
"""Twitter handle and location of the author: read past, never kept."""



class DataError(Exception):
    """Training data that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True, slots=True)
class Example:
    """One deduplicated tweet; ``text`` is already normalised (no handles, no URLs)."""

    tweet_id: int
    text: str
    label: int
    confidence: float
    negative_reason: str
    airline: str

    @property
    def split(self) -> Split:
        return split_of(self.tweet_id)


def split_of(tweet_id: int) -> Split:
    """80/10/10 by a stable hash of the id, so the split never depends on row order."""
    bucket = int(hashlib.sha1(str(tweet_id).encode("ascii")).hexdigest(), 16) % 100
    if bucket < 80:
        return "train"
    return "dev" if bucket < 90 else "test"


@dataclass(frozen=True, slots=True)
class Dataset:
    """The loaded data and what loading dropped, so reports can say it."""

    path: Path
    examples: tuple[Example, ...]
    rows_read: int
    duplicates_dropped: int
    conflicting_ids_dropped: int

    def split(self, name: Split) -> list[Example]:
        return [e for e in self.examples if e.split == name]


def load(path: str | Path) -> Dataset:
    """Read Tweets.csv, validate every row, drop personal columns and duplicate ids.

    A repeated ``tweet_id`` with the same label keeps its first row; an id whose rows
    disagree on the label is dropped entirely, since neither label can be trusted.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: sentiment data not found (expected the airline Tweets.csv; pass --data PATH)"
        )
    rows: dict[int, Example] = {}
    labels_seen: dict[int, set[int]] = {}
    order: list[int] = []
    read = 0
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}:1: empty file, expected a Tweets.csv header")
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise DataError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
            index = {name: i for i, name in enumerate(header)}
            line = reader.line_num + 1
            for fields in reader:
                if fields:
                    example = _parse(fields, index, len(header), f"{path}:{line}")
                    read += 1
                    if example.tweet_id not in rows:
                        rows[example.tweet_id] = example
                        labels_seen[example.tweet_id] = set()
                        order.append(example.tweet_id)
                    labels_seen[example.tweet_id].add(example.label)
                line = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}:{line}: malformed CSV ({exc})") from exc
    conflicting = {i for i, seen in labels_seen.items() if len(seen) > 1}
    kept = tuple(rows[i] for i in order if i not in conflicting)
    return Dataset(
        path=path,
        examples=kept,
        rows_read=read,
        duplicates_dropped=read - len(order),
        conflicting_ids_dropped=len(conflicting),
    )


def _parse(fields: list[str], index: dict[str, int], width: int, where: str) -> Example:
    if len(fields) != width:
        raise DataError(f"{where}: expected {width} fields, found {len(fields)}")

    def get(name: str) -> str:
        i = index.get(name)
        return fields[i].strip() if i is not None else ""

    raw_id = get("tweet_id")
    if not raw_id.isdigit():
        raise DataError(f"{where}: tweet_id {raw_id!r} is not a number")
    sentiment = get("airline_sentiment")
    if sentiment not in LABELS:
        raise DataError(
            f"{where}: airline_sentiment {sentiment!r} is not one of {', '.join(LABELS)}"
        )
    raw_conf = get("airline_sentiment_confidence") or "1"
    try:
        confidence = float(raw_conf)
    except ValueError:
        raise DataError(
            f"{where}: airline_sentiment_confidence {raw_conf!r} is not a number"
        ) from None
    text = normalize(fields[index["text"]])
    if not text:
        raise DataError(f"{where}: empty text")
    return Example(
        tweet_id=int(raw_id),
        text=text,
        label=LABELS.index(sentiment),
        confidence=confidence,
        negative_reason=get("negativereason"),
        airline=get("airline"),
    )


@dataclass(frozen=True, slots=True)
class Scores:
    """What the issue asks to report for a classifier on the test split."""

    n: int
    accuracy: float
    macro_f1: float
    negative_precision: float
    negative_recall: float
    confusion: tuple[tuple[int, ...], ...]
    """Rows are the true label, columns the prediction, both in :data:`LABELS` order."""


def score(gold: Sequence[int], predicted: Sequence[int]) -> Scores:
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    k = len(LABELS)
    matrix = [[0] * k for _ in range(k)]
    for g, p in zip(gold, predicted, strict=True):
        matrix[g][p] += 1
    f1s: list[float] = []
    precision: list[float] = []
    recall: list[float] = []
    for c in range(k):
        tp = matrix[c][c]
        predicted_c = sum(matrix[r][c] for r in range(k))
        actual_c = sum(matrix[c])
        p = tp / predicted_c if predicted_c else 0.0
        r = tp / actual_c if actual_c else 0.0
        precision.append(p)
        recall.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    n = len(gold)
    return Scores(
        n=n,
        accuracy=sum(matrix[c][c] for c in range(k)) / n if n else 0.0,
        macro_f1=sum(f1s) / k,
        negative_precision=precision[NEGATIVE],
        negative_recall=recall[NEGATIVE],
        confusion=tuple(tuple(row) for row in matrix),
    )


def _macro_f1_rows(gold: Any, predicted: Any) -> Any:
    """Macro-F1 of every row of two (resamples, n) label arrays at once."""
    import numpy as np

    f1 = np.zeros(gold.shape[0])
    for c in range(len(LABELS)):
        tp = ((gold == c) & (predicted == c)).sum(axis=1)
        denominator = (gold == c).sum(axis=1) + (predicted == c).sum(axis=1)
        f1 += np.divide(2 * tp, denominator, out=np.zeros(len(tp)), where=denominator > 0)
    return f1 / len(LABELS)


def bootstrap_macro_f1(
    gold: Sequence[int], predicted: Sequence[int], baseline: Sequence[int] | None = None,
    resamples: int = 2000, seed: int = 0,
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of macro-F1 over the tweets, or of its difference
    from ``baseline``'s on the same resampled tweets (paired): how much of a gap between two
    figures on 1,400 tweets is noise."""
    import numpy as np

    if len(gold) != len(predicted) or (baseline is not None and len(baseline) != len(gold)):
        raise ValueError("gold labels and predictions differ in length")
    if not gold:
        raise ValueError("no labelled texts to resample")
    idx = np.random.default_rng(seed).integers(0, len(gold), size=(resamples, len(gold)))
    g = np.asarray(gold)[idx]
    values = _macro_f1_rows(g, np.asarray(predicted)[idx])
    if baseline is not None:
        values = values - _macro_f1_rows(g, np.asarray(baseline)[idx])
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def decide(probabilities: Iterable[Sequence[float]], negative_threshold: float | None) -> list[int]:
    """Labels from class probabilities; with a threshold, P(negative) >= it means negative.

    Below the threshold the choice is between neutral and positive, so the threshold moves
    only the negative boundary (what escalation cares about) and leaves the rest to argmax.
    """
    out: list[int] = []
    for p in probabilities:
        if negative_threshold is None:
            out.append(max(range(len(p)), key=lambda c: p[c]))
        elif p[NEGATIVE] >= negative_threshold:
            out.append(NEGATIVE)
        else:
            out.append(max(range(1, len(p)), key=lambda c: p[c]))
    return out


def tune_negative_threshold(
    gold: Sequence[int],
    probabilities: Sequence[Sequence[float]],
    min_recall: float = 0.90,
) -> float:
    """The P(negative) threshold with the best macro-F1 among those keeping recall >= min.

    Tuned on the dev split only. If no threshold reaches the recall, the one with the
    highest recall is returned (the lowest candidate), so the caller still gets a number.
    """
    candidates = sorted({round(p[NEGATIVE], 3) for p in probabilities} | {0.5})
    best: tuple[float, float] | None = None
    for t in candidates:
        s = score(gold, decide(probabilities, t))
        if s.negative_recall >= min_recall and (best is None or s.macro_f1 > best[0]):
            best = (s.macro_f1, t)
    return best[1] if best is not None else candidates[0]


BIAS_GRID = tuple(round(-2.0 + 0.05 * i, 2) for i in range(81))
"""Candidate log-prior shifts for neutral and positive (negative stays at 0)."""


def apply_logit_bias(
    probabilities: Sequence[Sequence[float]], bias: Sequence[float], already_log: bool = False
) -> list[list[float]]:
    """Prior correction: softmax(log p + bias), the same as adding ``bias`` to the logits."""
    import numpy as np

    logp = np.asarray(probabilities, dtype=np.float64) if already_log else _log(probabilities)
    z = logp + np.asarray(bias, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).tolist()


SCALE_GRID = tuple(round(0.25 + 0.05 * i, 2) for i in range(116))
"""Candidate logit scales (inverse temperatures) from 0.25 to 6.0."""


def apply_logit_scale(
    probabilities: Sequence[Sequence[float]], scale: float
) -> list[list[float]]:
    """softmax(scale * log p), i.e. p ** scale renormalised: the same as multiplying the
    logits by ``scale``."""
    return apply_logit_bias(_log(probabilities) * scale, [0.0] * len(LABELS), already_log=True)


def _log(probabilities: Sequence[Sequence[float]]) -> Any:
    import numpy as np

    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0))


def fit_logit_scale(gold: Sequence[int], probabilities: Sequence[Sequence[float]]) -> float:
    """The logit scale with the lowest negative log-likelihood on ``gold`` (temperature
    scaling, Guo et al. 2017; fitted on dev). Labels by argmax do not change; the
    probabilities become honest, which matters where a threshold reads them (escalation).
    A weight-averaged model's logits shrink, so its raw probabilities are too flat."""
    import numpy as np

    g = np.asarray(gold, dtype=np.int64)
    logp = _log(probabilities)
    best_scale, best_nll = 1.0, float("inf")
    for scale in SCALE_GRID:
        z = logp * scale
        z -= z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        nll = float(np.mean(log_norm - z[np.arange(len(g)), g]))
        if nll < best_nll - 1e-12:
            best_scale, best_nll = scale, nll
    return best_scale


def fit_logit_bias(
    gold: Sequence[int],
    probabilities: Sequence[Sequence[float]],
    min_recall: float = 0.90,
    min_precision: float = 0.85,
) -> tuple[float, float, float] | None:
    """Per-class logit bias with the best macro-F1, keeping negative recall and precision.

    Fitted on the dev split only. A grid over the neutral and positive shifts; among equal
    scores the smallest shift wins, so a model that needs no correction gets (0, 0, 0).
    ``None`` when no point of the grid keeps both limits: the caller must say so.
    """
    import numpy as np

    k = len(LABELS)
    g = np.asarray(gold, dtype=np.int64)
    logp = _log(probabilities)
    best: tuple[float, float, tuple[float, float, float]] | None = None
    for b1 in BIAS_GRID:
        for b2 in BIAS_GRID:
            pred = (logp + np.array([0.0, b1, b2])).argmax(axis=1)
            m = np.bincount(g * k + pred, minlength=k * k).reshape(k, k)
            tp = np.diag(m).astype(np.float64)
            p = np.divide(tp, m.sum(axis=0), out=np.zeros(k), where=m.sum(axis=0) > 0)
            r = np.divide(tp, m.sum(axis=1), out=np.zeros(k), where=m.sum(axis=1) > 0)
            if r[NEGATIVE] < min_recall or p[NEGATIVE] < min_precision:
                continue
            f1 = float(np.mean(np.divide(2 * p * r, p + r, out=np.zeros(k), where=p + r > 0)))
            size = abs(b1) + abs(b2)
            if best is None or f1 > best[0] + 1e-12 or (abs(f1 - best[0]) <= 1e-12
                                                         and size < best[1]):
                best = (f1, size, (0.0, b1, b2))
    return best[2] if best is not None else None


def label_counts(examples: Iterable[Example]) -> Counter[int]:
    return Counter(e.label for e in examples)
