"""The out-of-domain sentiment set: labels joined with the data by row and sha1, every
fault named by file and line, and the table's recalls computed as an annotator would."""

from __future__ import annotations

import bz2
import csv
import hashlib
from pathlib import Path

import pytest

from finetune.sentiment_data import DataError
from finetune.sentiment_ood import BITEXT_FILE, TWACS_FILE, load_ood, ood_table, recalls

TURN = "  __company__  Thanks so much, all sorted now!  "
BITEXT = "how do i cancel order 123"


def _sha(text: str) -> str:
    return hashlib.sha1(" ".join(text.split()).encode()).hexdigest()[:12]


def _data(root: Path) -> None:
    (root / TWACS_FILE).parent.mkdir(parents=True)
    with bz2.open(root / TWACS_FILE, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["first_tweet_id", "tag", "first_utterance", "context"])
        w.writerow(["1", "UNK", "<cust__ hi __cust>",
                    f"<rep__ sorry! __rep> <cust__{TURN}__cust>"])
    (root / BITEXT_FILE).parent.mkdir(parents=True)
    with open(root / BITEXT_FILE, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "intent"])
        w.writerow([BITEXT, "cancel_order"])


def _labels(folder: Path, turn_sha: str, label: str = "positive") -> Path:
    folder.mkdir()
    (folder / "twacs_turns.tsv").write_text(
        f"row\tturn\tsha1_12\tlabel\tnote\n0\t0\t{turn_sha}\t{label}\tthanks after fix\n")
    (folder / "bitext_requests.tsv").write_text(
        f"row\tsha1_12\tlabel\tnote\n0\t{_sha(BITEXT)}\tneutral\tplain request\n")
    (folder / "written.tsv").write_text(
        "text\tlabel\ttrade\nCharged twice AGAIN, nobody answers!!\tnegative\tbanking\n")
    return folder


def test_labels_join_the_data_and_score(tmp_path: Path) -> None:
    _data(tmp_path)
    examples = load_ood(tmp_path, _labels(tmp_path / "labels", _sha(TURN)))
    assert [(e.source, e.label) for e in examples] == [
        ("twacs turns", 2), ("bitext requests", 1), ("written, other trades", 0)]
    assert "sorted now" in examples[0].text and "__company__" not in examples[0].text
    table = ood_table(examples, [("always neutral", lambda texts: [1] * len(texts))])
    assert "| always neutral | all | 3 | 0.333 | 0.333 | 0.000 | 1.000 | 0.000 |" in table
    assert recalls([0, 0, 2], [0, 1, 2]) == [0.5, None, 1.0]


def test_a_changed_row_or_a_bad_label_names_file_and_line(tmp_path: Path) -> None:
    _data(tmp_path)
    with pytest.raises(DataError, match=r"twacs_turns\.tsv:2: turn 0 of row 0"):
        load_ood(tmp_path, _labels(tmp_path / "a", "000000000000"))
    with pytest.raises(DataError, match=r"twacs_turns\.tsv:2: unknown label 'happy'"):
        load_ood(tmp_path, _labels(tmp_path / "b", _sha(TURN), "happy"))
    with pytest.raises(DataError, match="not found"):
        load_ood(tmp_path / "nowhere", tmp_path / "a")
