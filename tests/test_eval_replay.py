"""``supportbot eval replay``: openers in the TwACS file format go through the configured
service (real models, real SQLite, the faithfulness check) and come out as one table and a
JSONL of every exchange. The openers here are written for the test, not taken from TwACS."""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import json
from pathlib import Path

import pytest

from finetune import eval_replay
from finetune.acts import text_sha1
from tests.conftest import DATA_DIR, REPO

OPENERS = [
    ("praise", "Thank you so much, the crew on my flight today were wonderful and kind!"),
    ("complaint", "Worst trip ever, fuck you, I'm switching to another airline for good"),
    ("question", "Do you deliver to Canada?"),
    ("question", "What gate does the 7pm flight to Reno leave from tonight?"),
]


def _dialogs(folder: Path) -> Path:
    """A TwACS-format file: the opener in ``first_utterance`` with the dataset's markup."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["first_tweet_id", "tag", "first_utterance", "context"])
    for n, (_, text) in enumerate(OPENERS):
        writer.writerow([1000 + n, "UNK", f"<cust__  __company__  {text} __cust>",
                         "<rep__  __cust__  Thanks for reaching out. __rep>"])
    path = folder / "dialogs.csv.bz2"
    path.write_bytes(bz2.compress(out.getvalue().encode("utf-8")))
    return path


def _labels(folder: Path) -> Path:
    lines = ["row\tsha1_12\tact\tnote"]
    for n, (act, text) in enumerate(OPENERS):
        lines.append(f"{n}\t{text_sha1(f'<cust__  __company__  {text} __cust>')}\t{act}\t")
    path = folder / "labels.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(folder: Path) -> Path:
    """The shipped config.toml, with the tests' shared model folder."""
    text = (REPO / "config.toml").read_text(encoding="utf-8")
    path = folder / "config.toml"
    path.write_text(text.replace('data_dir = "data"', f'data_dir = "{DATA_DIR}"'),
                    encoding="utf-8")
    assert f'data_dir = "{DATA_DIR}"' in path.read_text(encoding="utf-8")
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_replay.configure(parser)
    return parser.parse_args(list(argv))


def test_replay_prints_the_table_and_writes_every_exchange(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "replay.jsonl"
    args = _args("--data", str(_dialogs(tmp_path)), "--labels", str(_labels(tmp_path)),
                 "--config", str(_config(tmp_path)), "--mode", "extract",
                 "--concurrency", "2", "--timeout", "120", "--out", str(out))
    assert eval_replay.run(args) == 0
    printed = capsys.readouterr().out
    table = {line.strip().rsplit("  ", 1)[0].strip(): line.strip().rsplit("  ", 1)[1].strip()
             for line in printed.splitlines() if line.startswith("  ") and "  " in line.strip()}
    assert table["messages"] == "4"
    assert table["unsupported claims shown (re-checked)"] == "0"
    assert table["escalated at once (first message, strong signal)"].startswith("1 ")
    assert "labelled openers: act as labelled" in table

    rows = {r["customer"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(rows) == 4
    praise, churn, canada, gate = (rows[f"@AirCo {text}"] for _, text in OPENERS)
    assert praise["outcome"] == "courtesy: thanked for praise", praise
    assert churn["escalated"] in ("profanity", "churn_threat"), churn
    assert canada["outcome"] == "answered (extractive)", canada
    assert "Canada" in canada["shown"][0]
    assert gate["outcome"] == "handed off: no_answer", gate
    assert all(r["reply_s"] is not None and r["reply_s"] < 120 for r in rows.values())


def test_missing_data_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "airlines_dev.csv.bz2"
    assert eval_replay.run(_args("--data", str(missing))) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err


def test_a_changed_data_row_names_the_labels_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = _labels(tmp_path)
    lines = labels.read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3].replace(lines[3].split("\t")[1], "000000000000")
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert eval_replay.run(_args("--data", str(_dialogs(tmp_path)),
                                 "--labels", str(labels))) == 2
    err = capsys.readouterr().err
    assert f"{labels}:4" in err and "sha1" in err
