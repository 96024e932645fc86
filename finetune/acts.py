"""Fit (``supportbot finetune acts``) and score (``supportbot eval acts``) the act head.

The labels are committed in ``finetune/data/acts`` (see ``LABELLING.md`` there); the TwACS
and Bitext texts are not (TwACS is CC BY-NC-SA), so the labels name rows of those files
by index plus a short sha1 of the opener, and are joined with the shared data here. The
200 held-out TwACS openers are only scored, never fitted on or used to choose anything.
``python -m finetune.acts`` fits; ``python -m finetune.acts --eval`` scores.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.acts import (
    ACTS,
    DEFAULT_HEAD,
    HEAD_FEATURES,
    NORMALIZATION,
    SENTIMENT_SCALE,
    Act,
    ActClassifier,
    ActHead,
    ActHeadError,
    clean,
    head_inputs,
    rules_only,
)
from core.acts import Sentiment as SentimentScores
from finetune.sentiment_head import save_head
from finetune.tool import run_module

DEFAULT_DATA = Path("../shared/data")
DEFAULT_LABELS = Path(__file__).parent / "data" / "acts"
DEFAULT_OUT = Path("core/assets/acts_head.safetensors")
TWACS_FILE = Path("twacs-dialogs/airlines_dev.csv.bz2")
BITEXT_FILE = Path("bitext-support/Bitext_Sample_Customer_Support_Training_Dataset.csv")
TWACS_DEV = "twacs_dev_openers.tsv"
TWACS_TRAIN = "twacs_train_openers.tsv"
BITEXT_LABELS = "bitext_requests.tsv"
WRITTEN = "written.tsv"
SEED = 20250611
L2_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
WRITTEN_HELD_OUT = 5
"""One written example in this many (by text hash) is held out for ``eval acts``."""
VALIDATION = 5
"""One training example in this many (by text hash) validates the L2 choice."""
PRAISE_HINT = re.compile(
    r"\b(thank|thanks|thx|kudos|shout ?out|appreciate|great|awesome|amazing|love|excellent|"
    r"best|fantastic|wonderful)\w*", re.IGNORECASE)
"""The keyword pre-filter for the stratified part of the training sample (LABELLING.md)."""
SAMPLE_SIZES = (200, 250, 150)
"""Held-out plain random, training plain random, training praise-keyword openers."""
SECOND_SAMPLE = (200, 200)
"""A second training batch (LABELLING.md): plain random, then praise-keyword openers."""
BLIND_SAMPLE = (1000, 400)
"""A second held-out set, for replays only (LABELLING.md): of the seeded order less every row
sampled above, skip this many (room for more training batches), then take this many."""
PRAISE_TARGET = 0.90
"""Praise recall the praise prior is raised to (the product bar), judged by
cross-validation on the plain-random TwACS training openers (real traffic)."""
PRAISE_BIAS_GRID = tuple(i * 0.25 for i in range(9))
"""Praise logit offsets tried, 0 to 2; the smallest that reaches :data:`PRAISE_TARGET`."""
CV_FOLDS = 5
CV_REPEATS = 3
"""Out-of-fold probabilities for the praise prior: this many by-hash 5-fold splits."""


class DataError(ValueError):
    """Bad or missing data or labels; the message names the file (and line)."""


def text_sha1(text: str) -> str:
    """12 hex digits of sha1 over the whitespace-collapsed text: a changed row is detected."""
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()[:12]


def _bucket(text: str, salt: str, parts: int) -> int:
    return int(hashlib.sha1(f"{salt}:{text}".encode()).hexdigest()[:8], 16) % parts


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    """Cleaned (:func:`core.acts.clean`) text, what the classifier sees."""
    act: Act
    source: str
    """``file:line`` of the label, so a wrong one can be found and fixed."""
    sample: str = ""
    """How a TwACS row was sampled (``random`` or ``keyword``, the note's first word)."""


@dataclass(frozen=True, slots=True)
class Dataset:
    train: tuple[Example, ...]
    held_out: tuple[Example, ...]
    """The 200 TwACS openers: scored only."""
    written_held_out: tuple[Example, ...]


def _open_csv(path: Path) -> Iterator[dict[str, str]]:
    csv.field_size_limit(1 << 26)
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def read_column(path: Path, column: str) -> list[str]:
    """One column of a data CSV, by 0-based data row."""
    if not path.is_file():
        raise DataError(f"{path} not found: check --data (the folder with "
                        f"{TWACS_FILE.parts[0]}/ and {BITEXT_FILE.parts[0]}/)")
    values: list[str] = []
    for row in _open_csv(path):
        if column not in row:
            raise DataError(f"{path}: missing column {column}")
        values.append(row[column] or "")
    return values


def _act(value: str, where: str) -> Act:
    try:
        return Act(value.strip())
    except ValueError:
        raise DataError(f"{where}: unknown act {value.strip()!r} "
                        f"(one of {', '.join(ACTS)})") from None


def _tsv(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """Data lines as (line number, fields); the header must start with ``columns``."""
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t")[: len(columns)] != list(columns):
        raise DataError(f"{path}:1: header must be {chr(9).join(columns)}")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < len(columns):
            raise DataError(f"{path}:{number}: expected {len(columns)} tab-separated "
                            f"fields, got {len(fields)}")
        yield number, fields


def join_rows(
    labels: Path, texts: Sequence[str], data_file: Path
) -> list[Example]:
    """Labels keyed by (row, sha1_12) joined with the texts; a missing or changed row names
    the labels file and line."""
    examples: list[Example] = []
    for number, fields in _tsv(labels, ("row", "sha1_12", "act")):
        where = f"{labels}:{number}"
        try:
            row = int(fields[0])
        except ValueError:
            raise DataError(f"{where}: row {fields[0]!r} is not a number") from None
        act = _act(fields[2], where)
        if not 0 <= row < len(texts):
            raise DataError(f"{where}: row {row} is not in {data_file} "
                            f"({len(texts)} rows)")
        digest = text_sha1(texts[row])
        if digest != fields[1].strip():
            raise DataError(f"{where}: row {row} of {data_file} has sha1 {digest}, the label "
                            f"says {fields[1].strip()} (the data file changed?)")
        note = fields[3].strip() if len(fields) > 3 else ""
        sample = re.split(r"[;,\s]", note, maxsplit=1)[0]
        examples.append(Example(clean(texts[row]), act, where, sample))
    return examples


def read_written(path: Path) -> list[Example]:
    examples = []
    for number, fields in _tsv(path, ("text", "act")):
        where = f"{path}:{number}"
        if not fields[0].strip():
            raise DataError(f"{where}: empty text")
        examples.append(Example(clean(fields[0]), _act(fields[1], where), where))
    return examples


def load(data: Path, labels: Path = DEFAULT_LABELS) -> Dataset:
    """Every labelled example, split into training, the held-out openers and the held-out
    written examples."""
    if not data.is_dir():
        raise DataError(f"data folder {data} not found: pass --data (the shared data root, "
                        f"default {DEFAULT_DATA})")
    twacs = read_column(data / TWACS_FILE, "first_utterance")
    bitext = read_column(data / BITEXT_FILE, "instruction")
    held_out = join_rows(labels / TWACS_DEV, twacs, data / TWACS_FILE)
    train = join_rows(labels / TWACS_TRAIN, twacs, data / TWACS_FILE)
    train += join_rows(labels / BITEXT_LABELS, bitext, data / BITEXT_FILE)
    written = read_written(labels / WRITTEN)
    written_held = [e for e in written if _bucket(e.text, "written", WRITTEN_HELD_OUT) == 0]
    train += [e for e in written if _bucket(e.text, "written", WRITTEN_HELD_OUT) != 0]
    banned = {e.text.lower() for e in held_out + written_held}
    train = [e for e in train if e.text.lower() not in banned]
    return Dataset(tuple(train), tuple(held_out), tuple(written_held))


def sample_rows(openers: Sequence[str], seed: int = SEED) -> dict[str, list[int]]:
    """The rows the labeller read (LABELLING.md): deduplicated non-empty openers in a
    seeded shuffle; the first 200 held out, the next 250 for training, then the first 150
    of the rest that :data:`PRAISE_HINT` matches (praise is what the product gets wrong);
    then :data:`SECOND_SAMPLE` and the replay-only :data:`BLIND_SAMPLE`."""
    seen: set[str] = set()
    candidates: list[int] = []
    for i, raw in enumerate(openers):
        key = " ".join(clean(raw).lower().split())
        if any(ch.isalpha() for ch in key) and key not in seen:
            seen.add(key)
            candidates.append(i)
    order = random.Random(seed).sample(candidates, len(candidates))
    held, rnd, kw = SAMPLE_SIZES
    keyword = [i for i in order[held + rnd:] if PRAISE_HINT.search(clean(openers[i]))]
    taken = set(keyword[:kw])
    rest = [i for i in order[held + rnd:] if i not in taken]
    rnd2, kw2 = SECOND_SAMPLE
    keyword2 = [i for i in rest[rnd2:] if PRAISE_HINT.search(clean(openers[i]))]
    samples = {"held_out": order[:held], "train_random": order[held:held + rnd],
               "train_keyword": keyword[:kw], "train_random2": rest[:rnd2],
               "train_keyword2": keyword2[:kw2]}
    used = set().union(*samples.values())
    skip, blind = BLIND_SAMPLE
    samples["blind"] = [i for i in order if i not in used][skip:skip + blind]
    return samples


def fit(
    x: np.ndarray, y: np.ndarray, l2: float, seed: int = SEED, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch L-BFGS (deterministic), each act
    weighted by the inverse of its frequency: greetings and requests for a person are
    rare in the data but must not be lost."""
    torch.manual_seed(seed)
    xt = torch.from_numpy(x).double()
    yt = torch.from_numpy(y).long()
    k = len(ACTS)
    counts = torch.bincount(yt, minlength=k).double().clamp(min=1)
    class_weight = len(yt) / (k * counts)
    weight = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ weight.T + bias, yt, weight=class_weight)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach().float().numpy().copy(), bias.detach().float().numpy().copy()


@dataclass(frozen=True, slots=True)
class Report:
    """Per-act precision / recall / F1, accuracy, confusion and the product bar."""

    n: int
    accuracy: float
    macro_f1: float
    per_act: dict[str, tuple[float, float, float, int]]
    confusion: tuple[tuple[int, ...], ...]
    """Rows: the label, columns: the prediction, both in :data:`core.acts.ACTS` order."""
    praise_acknowledged: float
    """Share of praise/thanks predicted as praise (the bar is 0.90)."""
    praise_precision: float
    """Share of messages acknowledged as praise that are praise."""
    complaints_as_praise: float
    """Share of complaints acknowledged as praise (an angry customer thanked: bad)."""


def score(gold: Sequence[Act], pred: Sequence[Act]) -> Report:
    index = {a: i for i, a in enumerate(ACTS)}
    confusion = [[0] * len(ACTS) for _ in ACTS]
    for g, p in zip(gold, pred, strict=True):
        confusion[index[g]][index[p]] += 1
    per_act: dict[str, tuple[float, float, float, int]] = {}
    f1s = []
    for a, i in index.items():
        tp = confusion[i][i]
        support = sum(confusion[i])
        predicted = sum(row[i] for row in confusion)
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_act[str(a)] = (p, r, f, support)
        if support:
            f1s.append(f)
    n = len(gold)
    correct = sum(confusion[i][i] for i in range(len(ACTS)))
    praise = per_act[Act.PRAISE]
    complaints = sum(confusion[index[Act.COMPLAINT]])
    as_praise = confusion[index[Act.COMPLAINT]][index[Act.PRAISE]]
    return Report(n, correct / n if n else 0.0, sum(f1s) / len(f1s) if f1s else 0.0,
                  per_act, tuple(tuple(r) for r in confusion), praise[1], praise[0],
                  as_praise / complaints if complaints else 0.0)


def format_report(name: str, report: Report) -> str:
    lines = [f"{name}: n={report.n}  accuracy {report.accuracy:.3f}  "
             f"macro-F1 {report.macro_f1:.3f}  praise acknowledged "
             f"{report.praise_acknowledged:.1%} (bar 90%)",
             f"  praise precision {report.praise_precision:.1%}  complaints acknowledged "
             f"as praise {report.complaints_as_praise:.1%}",
             f"  {'act':<15}{'P':>7}{'R':>7}{'F1':>7}{'n':>6}"]
    for act, (p, r, f, support) in report.per_act.items():
        lines.append(f"  {act:<15}{p:>7.3f}{r:>7.3f}{f:>7.3f}{support:>6}")
    short = [a[:8] for a in ACTS]
    lines.append("  confusion (rows: label, columns: predicted)")
    lines.append("  " + " " * 15 + "".join(f"{s:>9}" for s in short))
    for act, row in zip(ACTS, report.confusion, strict=True):
        lines.append(f"  {act:<15}" + "".join(f"{v:>9}" for v in row))
    return "\n".join(lines)


Embed = Callable[[Sequence[str]], np.ndarray]
Sentiments = Callable[[Sequence[str]], list[SentimentScores]]
"""Sentiment of many cleaned texts: (P(negative), P(neutral), P(positive)) each."""


def _labels(examples: Sequence[Example]) -> np.ndarray:
    index = {a: i for i, a in enumerate(ACTS)}
    return np.array([index[e.act] for e in examples], dtype=np.int64)


def _head(weight: np.ndarray, bias: np.ndarray, metadata: dict[str, str]) -> ActHead:
    return ActHead(weight, bias, ACTS, metadata)


def _fit_both(x_with: np.ndarray, x_without: np.ndarray, y: np.ndarray, l2: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit on every example twice: with its sentiment and with the sentiment not known,
    so one head serves callers with and without sentiment scores."""
    return fit(np.vstack([x_with, x_without]), np.concatenate([y, y]), l2, seed)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def choose_praise_bias(
    examples: Sequence[Example], x_with: np.ndarray, x_without: np.ndarray, l2: float,
    seed: int = SEED,
) -> tuple[float, Report]:
    """The praise prior: out-of-fold log-probabilities (``CV_REPEATS`` by-hash 5-fold
    splits of the training examples, sentiment known), scored on the plain-random TwACS
    training openers (every example when there are none); the smallest offset of
    :data:`PRAISE_BIAS_GRID` whose praise recall reaches :data:`PRAISE_TARGET`, else the
    one with the best praise recall minus complaints acknowledged as praise."""
    y = _labels(examples)
    judged = [i for i, e in enumerate(examples) if e.sample in ("random", "random2")] or list(
        range(len(examples)))
    praise = ACTS.index(Act.PRAISE)
    from core.acts import rule_act

    decided = [rule_act(e.text) for e in examples]
    logps = []
    for repeat in range(CV_REPEATS):
        folds = np.array([_bucket(e.text, f"cv{repeat}", CV_FOLDS) for e in examples])
        logp = np.zeros((len(examples), len(ACTS)))
        for fold in range(CV_FOLDS):
            test, rest = folds == fold, folds != fold
            if not test.any() or len(set(y[rest].tolist())) < 2:
                continue
            w, b = _fit_both(x_with[rest], x_without[rest], y[rest], l2, seed)
            logp[test] = _log_softmax(x_with[test] @ w.T + b)
        logps.append(logp)
    best: tuple[float, float, Report] | None = None
    for bias in PRAISE_BIAS_GRID:
        reports = []
        for logp in logps:
            shifted = logp.copy()
            shifted[:, praise] += bias
            pred = [decided[i] if decided[i] is not None else ACTS[int(np.argmax(shifted[i]))]
                    for i in judged]
            reports.append(score([examples[i].act for i in judged], pred))
        recall = float(np.mean([r.praise_acknowledged for r in reports]))
        wrong = float(np.mean([r.complaints_as_praise for r in reports]))
        if recall >= PRAISE_TARGET:
            return bias, reports[0]
        if best is None or recall - wrong > best[0]:
            best = (recall - wrong, bias, reports[0])
    assert best is not None, "empty praise bias grid"
    return best[1], best[2]


def _predict(head: ActHead, examples: Sequence[Example], x: np.ndarray) -> list[Act]:
    """What :class:`core.acts.ActClassifier` would say: rules first, then the head."""
    from core.acts import rule_act

    probs = head.probabilities(x) if len(examples) else np.zeros((0, len(ACTS)))
    out = []
    for e, p in zip(examples, probs, strict=True):
        decided = rule_act(e.text)
        out.append(decided if decided is not None else head.labels[int(np.argmax(p))])
    return out


@dataclass(frozen=True, slots=True)
class FitResult:
    head: ActHead
    validation: Report
    l2: float
    seconds: float
    praise_bias: float = 0.0


def train(
    examples: Sequence[Example], embed: Embed, seed: int = SEED,
    sentiments: Sentiments | None = None,
) -> FitResult:
    """Choose L2 by macro-F1 on a by-hash validation fifth, then the praise prior by
    cross-validation (:func:`choose_praise_bias`), then refit on every training example
    (the set is small; the fifth would be missed). Every example is fitted with its
    sentiment (``sentiments``, default the service's MiniLM classifier) and without."""
    start = time.perf_counter()
    val = [e for e in examples if _bucket(e.text, "validation", VALIDATION) == 0]
    fit_set = [e for e in examples if _bucket(e.text, "validation", VALIDATION) != 0]
    if not val or not fit_set:
        raise DataError("fitting needs labelled examples in both the fit and the "
                        "validation part")
    texts = [e.text for e in examples]
    vectors = embed(texts)
    scores = (sentiments or minilm_sentiments())(texts)
    x_all = head_inputs(texts, vectors, scores)
    x_none = head_inputs(texts, vectors)
    position = {id(e): i for i, e in enumerate(examples)}
    fit_rows = [position[id(e)] for e in fit_set]
    x_val = x_all[[position[id(e)] for e in val]]
    best: tuple[float, float, Report] | None = None
    for l2 in L2_GRID:
        w, b = _fit_both(x_all[fit_rows], x_none[fit_rows], _labels(fit_set), l2, seed)
        report = score([e.act for e in val], _predict(_head(w, b, {}), val, x_val))
        if best is None or report.macro_f1 > best[0]:
            best = (report.macro_f1, l2, report)
    assert best is not None, "empty L2 grid"
    _, l2, validation = best
    praise_bias, _ = choose_praise_bias(examples, x_all, x_none, l2, seed)
    w, b = _fit_both(x_all, x_none, _labels(examples), l2, seed)
    b = b.copy()
    b[ACTS.index(Act.PRAISE)] += praise_bias
    counts = Counter(str(e.act) for e in examples)
    metadata = {
        "labels": ",".join(ACTS),
        "features": ",".join(HEAD_FEATURES),
        "sentiment": "minilm head (core.sentiment default)" if sentiments is None
        else "given",
        "sentiment_scale": repr(SENTIMENT_SCALE),
        "praise_bias": repr(praise_bias),
        "praise_target": repr(PRAISE_TARGET),
        "encoder": "all-MiniLM-L6-v2",
        "embedding_normalization": "l2",
        "text_normalization": NORMALIZATION,
        "l2": repr(l2),
        "class_weights": "balanced",
        "seed": str(seed),
        "train_examples": str(len(examples)),
        "train_counts": json.dumps(dict(sorted(counts.items())), separators=(",", ":")),
        "validation_macro_f1": f"{validation.macro_f1:.4f}",
        "validation_accuracy": f"{validation.accuracy:.4f}",
    }
    return FitResult(_head(w, b, metadata), validation, l2, time.perf_counter() - start,
                     praise_bias)


def minilm_embed() -> Embed:
    """The service's encoder (``Retriever.embed`` wraps the same model)."""
    from core.retrieval import MiniLMEncoder

    return MiniLMEncoder().encode


def minilm_sentiments() -> Sentiments:
    """The service's default sentiment classifier: the shipped fine-tuned MiniLM (ONNX
    int8), or the embedded MiniLM + head where the shipped folder is missing."""
    from core.sentiment import SHIPPED_MODEL, build_classifier

    classifier = build_classifier("minilm", "", str(SHIPPED_MODEL), 32, 2.0, "int8", 1, "onnx")
    loaded = False

    def sentiments(texts: Sequence[str]) -> list[SentimentScores]:
        nonlocal loaded
        if not loaded:
            classifier._load()  # offline use: no micro-batcher, no event loop
            loaded = True
        return [(s.negative, s.neutral, s.positive) for s in classifier.classify_many(texts)]

    return sentiments


def evaluate(
    dataset: Dataset, classifier: ActClassifier, sentiments: Sentiments | None = None,
) -> list[str]:
    """The head with the messages' sentiment (``sentiments``, when given), the head
    without it (``classify(text)``) and the rules-only baseline on each held-out set."""
    out = []
    for name, examples in (("held-out TwACS openers", dataset.held_out),
                           ("held-out written examples", dataset.written_held_out)):
        if not examples:
            continue
        gold = [e.act for e in examples]
        texts = [e.text for e in examples]
        if sentiments is not None:
            results = classifier.classify_many(texts, sentiments(texts))
            out.append(format_report(f"{name}, rules + head + sentiment",
                                     score(gold, [r.act for r in results])))
        results = classifier.classify_many(texts)
        out.append(format_report(f"{name}, rules + head, no sentiment",
                                 score(gold, [r.act for r in results])))
        out.append(format_report(f"{name}, rules only",
                                 score(gold, [rules_only(e.text) for e in examples])))
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="shared data root (with twacs-dialogs/ and bitext-support/)")
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS,
                        help="folder of the committed label files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="head .safetensors to write (finetune) or score (eval)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--eval", action="store_true",
                        help="score the head instead of fitting (what `eval acts` does)")


def run(args: argparse.Namespace) -> int:
    evaluating = args.eval or getattr(args, "command", None) == "eval"
    try:
        dataset = load(args.data, args.labels)
        embed = minilm_embed()
        if evaluating:
            head_path = args.out if args.out != DEFAULT_OUT else DEFAULT_HEAD
            classifier = ActClassifier(embed, head_path)
            print(f"head: {head_path}")
            print("\n\n".join(evaluate(dataset, classifier, minilm_sentiments())))
            return 0
        result = train(dataset.train, embed, args.seed)
    except (DataError, ActHeadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_head(result.head, args.out)
    counts = Counter(str(e.act) for e in dataset.train)
    print(f"training examples: {len(dataset.train)} {dict(sorted(counts.items()))}")
    print(f"head: {args.out} ({args.out.stat().st_size} bytes), L2 {result.l2}, "
          f"praise bias {result.praise_bias}, fitted in {result.seconds:.1f} s")
    print(format_report("validation (one fifth by hash, fitted on the rest)",
                        result.validation))
    return 0


run_module(__name__)
