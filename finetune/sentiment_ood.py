"""The out-of-domain sentiment set (``finetune/data/sentiment_ood``, see its LABELLING.md):
later TwACS customer turns, Bitext e-commerce requests and messages we wrote for other
trades, joined with the shared data by (row, sha1) and scored beside the airline tweets
by ``supportbot eval sentiment``. Never trained on."""

from __future__ import annotations

import bz2
import csv
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune.sentiment_data import LABELS, DataError, normalize

DEFAULT_LABELS = Path(__file__).parent / "data" / "sentiment_ood"
TWACS_FILE = Path("twacs-dialogs/airlines_dev.csv.bz2")
BITEXT_FILE = Path("bitext-support/Bitext_Sample_Customer_Support_Training_Dataset.csv")
SOURCES = ("twacs turns", "bitext requests", "written, other trades")
_TURN = re.compile(r"<cust__(.*?)__cust>", re.S)


@dataclass(frozen=True, slots=True)
class OODExample:
    source: str
    text: str
    """Normalised as the airline tweets are (``social-v1``)."""
    label: int
    where: str


def _sha1(text: str) -> str:
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()[:12]


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path} not found: pass --data-root (the shared data folder)")
    csv.field_size_limit(1 << 26)
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _tsv(path: Path, header: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t")[: len(header)] != list(header):
        raise DataError(f"{path}:1: header must start {chr(9).join(header)}")
    for number, line in enumerate(lines[1:], start=2):
        if line.strip():
            fields = line.split("\t")
            if len(fields) < len(header):
                raise DataError(f"{path}:{number}: expected {len(header)} tab-separated fields")
            yield f"{path}:{number}", fields


def _label(value: str, where: str) -> int:
    try:
        return LABELS.index(value.strip())
    except ValueError:
        raise DataError(f"{where}: unknown label {value.strip()!r} "
                        f"(one of {', '.join(LABELS)})") from None


def _row(value: str, count: int, where: str) -> int:
    if not value.strip().isdigit() or int(value) >= count:
        raise DataError(f"{where}: row {value!r} is not in the data file ({count} rows)")
    return int(value)


def load_ood(data_root: Path, labels: Path = DEFAULT_LABELS) -> list[OODExample]:
    """Every labelled out-of-domain example; a changed or missing row names the file and
    line of its label."""
    out: list[OODExample] = []
    twacs = _rows(data_root / TWACS_FILE)
    for where, f in _tsv(labels / "twacs_turns.tsv", ("row", "turn", "sha1_12", "label")):
        row = _row(f[0], len(twacs), where)
        turns = _TURN.findall(twacs[row].get("context") or "")
        k = int(f[1]) if f[1].strip().isdigit() else -1
        if not 0 <= k < len(turns) or _sha1(turns[k]) != f[2].strip():
            raise DataError(f"{where}: turn {f[1]} of row {row} is not the labelled text "
                            "(the data file changed?)")
        text = turns[k].replace("__company__", "@company").replace("__cust__", "@someone")
        out.append(OODExample(SOURCES[0], normalize(text), _label(f[3], where), where))
    bitext = _rows(data_root / BITEXT_FILE)
    for where, f in _tsv(labels / "bitext_requests.tsv", ("row", "sha1_12", "label")):
        row = _row(f[0], len(bitext), where)
        text = bitext[row]["instruction"]
        if _sha1(text) != f[1].strip():
            raise DataError(f"{where}: row {row} is not the labelled text (the data changed?)")
        out.append(OODExample(SOURCES[1], normalize(text), _label(f[2], where), where))
    for where, f in _tsv(labels / "written.tsv", ("text", "label")):
        out.append(OODExample(SOURCES[2], normalize(f[0]), _label(f[1], where), where))
    return out


Predictor = Callable[[Sequence[str]], list[int]]


def recalls(gold: Sequence[int], predicted: Sequence[int]) -> list[float | None]:
    """Recall per label (None where the label has no examples)."""
    out: list[float | None] = []
    for c in range(len(LABELS)):
        n = sum(1 for g in gold if g == c)
        hit = sum(1 for g, p in zip(gold, predicted, strict=True) if g == c and p == c)
        out.append(hit / n if n else None)
    return out


def ood_table(examples: Sequence[OODExample], models: Sequence[tuple[str, Predictor]]) -> str:
    """Per model, per source and overall: n, accuracy, macro-recall (over the labels the
    part has), and the recall of each label."""
    parts = [(s, [e for e in examples if e.source == s]) for s in SOURCES]
    parts.append(("all", list(examples)))
    lines = ["| model | part | n | accuracy | macro-recall | neg. recall | neu. recall "
             "| pos. recall |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, predict in models:
        predicted_all = predict([e.text for e in examples])
        by_text = dict(zip((id(e) for e in examples), predicted_all, strict=True))
        for part, rows in parts:
            if not rows:
                continue
            gold = [e.label for e in rows]
            pred = [by_text[id(e)] for e in rows]
            rec = recalls(gold, pred)
            known = [r for r in rec if r is not None]
            acc = sum(g == p for g, p in zip(gold, pred, strict=True)) / len(rows)
            cells = " | ".join("–" if r is None else f"{r:.3f}" for r in rec)
            lines.append(f"| {name} | {part} | {len(rows)} | {acc:.3f} "
                         f"| {sum(known) / len(known):.3f} | {cells} |")
    return "\n".join(lines)
