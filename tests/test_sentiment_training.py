"""Sentiment training and evaluation on a hand-written fixture in the Tweets.csv format.

Real MiniLM, real training, real files; only the data is small, so the suite needs no
copy of the airline data set.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from finetune import eval_sentiment, sentiment_head
from finetune.sentiment_data import (
    LABELS,
    DataError,
    Example,
    bootstrap_macro_f1,
    decide,
    fit_logit_bias,
    fit_logit_scale,
    load,
    normalize,
    score,
    split_of,
    tune_negative_threshold,
)

FIXTURE = Path(__file__).parent / "fixtures" / "tweets_small.csv"
CONFLICTING_ID = 570000000001100742


def _args(module: ModuleType, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.configure(parser)
    return parser.parse_args(list(argv))


def test_split_is_a_fixed_function_of_the_id() -> None:
    # Ids from the real data set; the assignment must never change between runs or versions.
    assert split_of(570306133677760513) == "train"
    assert split_of(570301130888122368) == "dev"
    assert split_of(570301083672813571) == "test"
    shares = [split_of(i) for i in range(10_000)]
    assert 0.77 < shares.count("train") / 10_000 < 0.83
    assert 0.08 < shares.count("test") / 10_000 < 0.12


def test_split_does_not_depend_on_row_order(tmp_path: Path) -> None:
    header, body = FIXTURE.read_text(encoding="utf-8").split("\n", 1)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(reversed(list(csv.reader(io.StringIO(body)))))
    reversed_file = tmp_path / "reversed.csv"
    reversed_file.write_text(header + "\n" + out.getvalue(), encoding="utf-8")
    forward, backward = load(FIXTURE), load(reversed_file)
    for split in ("train", "dev", "test"):
        assert {e.tweet_id for e in forward.split(split)} == {
            e.tweet_id for e in backward.split(split)
        }
    assert {len(forward.split(s)) for s in ("dev", "test")} == {6}


def test_duplicates_and_conflicting_labels_are_dropped() -> None:
    data = load(FIXTURE)
    ids = [e.tweet_id for e in data.examples]
    assert data.rows_read == 42
    assert len(ids) == len(set(ids)) == 39
    assert CONFLICTING_ID not in ids
    assert data.conflicting_ids_dropped == 1
    assert data.duplicates_dropped == 2


def test_personal_columns_are_not_kept() -> None:
    data = load(FIXTURE)
    assert set(Example.__slots__) == {
        "tweet_id", "text", "label", "confidence", "negative_reason", "airline"
    }
    values = " ".join(str(getattr(e, f)) for e in data.examples for f in Example.__slots__)
    assert "fan0" not in values and "Springfield" not in values and "-74.2" not in values
    assert "@SkyJetAir" not in values and "t.co" not in values


def test_normalisation_keeps_the_signal_of_social_text() -> None:
    text = "@SkyJetAir WHY is my bag LOST?!!! 😡😡 see https://t.co/xYz &amp; http://t.co/a @bob"
    assert normalize(text) == (
        "@user WHY is my bag LOST?!!! 😡 :pouting face: 😡 :pouting face: see http & http @user"
    )
    assert normalize("thanks ❤️👍🏽\n\nsee you") == (
        "thanks ❤ :heavy black heart: 👍 :thumbs up sign: see you"
    )
    assert normalize("mail me at a@b.com") == "mail me at a@b.com"
    assert normalize("it’s “fine”…") == "it's \"fine\"..."


def test_loaded_text_is_normalised() -> None:
    texts = {e.text for e in load(FIXTURE).examples}
    assert "@user delayed AGAIN. third time this month. done." in texts
    assert "@user my suitcase arrived broken & soaked. awful http" in texts


def test_missing_data_file_names_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "Tweets.csv"
    with pytest.raises(DataError, match=str(missing)):
        load(missing)
    assert sentiment_head.run(_args(sentiment_head, "--data", str(missing))) == 2
    assert str(missing) in capsys.readouterr().err
    assert eval_sentiment.run(_args(eval_sentiment, "--data", str(missing))) == 2
    assert str(missing) in capsys.readouterr().err


def _corrupt(tmp_path: Path, line_number: int, old: str, new: str) -> Path:
    lines = FIXTURE.read_text(encoding="utf-8").split("\n")
    assert old in lines[line_number - 1]
    lines[line_number - 1] = lines[line_number - 1].replace(old, new, 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines), encoding="utf-8")
    return bad


def test_bad_label_names_file_and_physical_line(tmp_path: Path) -> None:
    # Lines 7-8 hold one tweet with a newline inside, so line 9 is the 7th record.
    bad = _corrupt(tmp_path, 9, ",negative,", ",furious,")
    with pytest.raises(DataError) as err:
        load(bad)
    assert str(err.value).startswith(f"{bad}:9: airline_sentiment 'furious' is not one of")


def test_bad_row_shape_and_id_are_reported_with_line(tmp_path: Path) -> None:
    bad = _corrupt(tmp_path, 12, ",0,@", ",0,extra,@")
    with pytest.raises(DataError, match=rf"^{bad}:12: expected 15 fields, found 16$"):
        load(bad)
    bad = _corrupt(tmp_path, 3, "570000000000126705", "5.70E+17")
    with pytest.raises(DataError, match=rf"^{bad}:3: tweet_id '5.70E\+17' is not a number$"):
        load(bad)


def test_header_without_required_columns(tmp_path: Path) -> None:
    bad = tmp_path / "other.csv"
    bad.write_text("id,label,body\n1,negative,hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{bad}:1: header lacks column\(s\) tweet_id, "):
        load(bad)


def test_scores_and_threshold_rule() -> None:
    s = score([0, 0, 0, 1, 2, 2], [0, 0, 1, 1, 2, 0])
    assert s.confusion == ((2, 1, 0), (0, 1, 0), (1, 0, 1))
    assert s.accuracy == pytest.approx(4 / 6)
    assert s.negative_precision == pytest.approx(2 / 3)
    assert s.negative_recall == pytest.approx(2 / 3)
    assert s.macro_f1 == pytest.approx((2 / 3 + 2 / 3 + 2 / 3) / 3)
    probs = [[0.4, 0.5, 0.1], [0.2, 0.1, 0.7], [0.9, 0.05, 0.05]]
    assert decide(probs, None) == [1, 2, 0]
    assert decide(probs, 0.3) == [0, 2, 0]
    assert tune_negative_threshold([0, 2, 0], probs) == pytest.approx(0.4)


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("head")
    out = root / "head.safetensors"
    args = _args(sentiment_head, "--data", str(FIXTURE), "--out", str(out),
                 "--cache-dir", str(root / "cache"), "--seed", "3")
    assert sentiment_head.run(args) == 0
    return out


def test_head_file_is_small_and_complete(trained_head: Path) -> None:
    from safetensors import safe_open

    assert trained_head.stat().st_size < 8_000
    with safe_open(str(trained_head), framework="numpy") as f:
        assert set(f.keys()) == {"weight", "bias"}
        assert f.get_tensor("weight").shape == (3, 384)
        assert f.get_tensor("weight").dtype == np.float32
        assert f.get_tensor("bias").shape == (3,)
        meta = f.metadata()
    assert meta["labels"] == "negative,neutral,positive"
    assert meta["text_normalization"] == "social-v1"
    assert 0.0 < float(meta["negative_threshold"]) < 1.0


def test_head_predicts_the_obvious_cases(trained_head: Path, tmp_path: Path) -> None:
    head = sentiment_head.load_head(trained_head)
    encoder = sentiment_head.Encoder(tmp_path / "cache")
    texts = [
        normalize("@AirCo my bag is LOST and your staff was rude. worst airline ever!!! 😡"),
        normalize("@AirCo thank you so much, wonderful crew and a great flight ❤️"),
    ]
    probs = head.probabilities(encoder.encode(texts))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [LABELS[i] for i in head.predict(encoder.encode(texts))] == ["negative", "positive"]
    assert probs[0][0] > 0.5 > probs[1][0]


def test_head_training_is_reproducible(trained_head: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.safetensors"
    args = _args(sentiment_head, "--data", str(FIXTURE), "--out", str(again),
                 "--cache-dir", str(tmp_path / "cache"), "--seed", "3")
    assert sentiment_head.run(args) == 0
    assert again.read_bytes() == trained_head.read_bytes()


def test_eval_prints_one_table_for_all_models(
    trained_head: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing_model = tmp_path / "no-model"
    args = _args(eval_sentiment, "--data", str(FIXTURE), "--head", str(trained_head),
                 "--model", str(missing_model), "--cache-dir", str(tmp_path / "cache"),
                 "--data-root", str(tmp_path / "no-data"))
    assert eval_sentiment.run(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"test split of {FIXTURE}: 6 tweets (negative 2, neutral 2, positive 2)"
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert "| majority class | 0.333 | 0.167 | 0.333 | 1.000 | 2 0 0 / 2 0 0 / 2 0 0 |" in (
        rows["majority class"]
    )
    assert any(name.startswith("VADER") for name in rows)
    low, high = (float(x) for x in rows["majority class"].split("|")[-2].strip().split("–"))
    assert low <= 0.167 <= high and low < high
    assert "embedded head (argmax)" in rows
    head_cells = rows["embedded head (argmax)"].split("|")
    assert 0.5 <= float(head_cells[2]) <= 1.0
    assert f"fine-tuned model skipped: {missing_model} does not exist" in out
    assert f"out-of-domain table skipped: {tmp_path / 'no-data'} not found" in out


def test_finetune_writes_a_loadable_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from finetune import sentiment

    out = tmp_path / "model"
    args = _args(sentiment, "--data", str(FIXTURE), "--out", str(out), "--epochs", "2",
                 "--batch-size", "16", "--evals-per-epoch", "1", "--lr", "1e-4",
                 "--threads", "0")
    assert sentiment.run(args) == 0
    printed = capsys.readouterr().out
    assert f"saved {out} after 4 steps (2.00 epochs" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert 0.0 < config["negative_threshold"] < 1.0
    assert len(config["logit_bias"]) == 3 and config["logit_bias"][0] == 0.0
    assert config["text_normalization"] == "social-v1"
    assert (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "| test (threshold) |" in card and "stopped by" in card
    model = sentiment.FineTuned(out)
    probs = model.probabilities(["@user thanks!", "@user my bag is lost"])
    assert probs.shape == (2, 3)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    args = _args(eval_sentiment, "--data", str(FIXTURE), "--model", str(out),
                 "--head", str(tmp_path / "no-head.safetensors"),
                 "--data-root", str(tmp_path / "no-data"))
    assert eval_sentiment.run(args) == 0
    table = capsys.readouterr().out
    assert "| fine-tuned MiniLM (argmax) |" in table
    assert "| fine-tuned MiniLM (P(neg) >= " in table
    assert "| fine-tuned MiniLM (dev-fitted logit bias +0.00, " in table
    assert "embedded head skipped: " in table and "no-head.safetensors" in table


def test_epochs_zero_refits_an_existing_folder_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from finetune import sentiment

    assert sentiment.run(_args(sentiment, "--data", str(FIXTURE), "--out", str(tmp_path / "x"),
                               "--epochs", "0")) == 2
    assert "--epochs 0 only refits the dev corrections" in capsys.readouterr().err
    first = tmp_path / "first"
    assert sentiment.run(_args(sentiment, "--data", str(FIXTURE), "--out", str(first),
                               "--epochs", "1", "--batch-size", "16", "--lr", "1e-4")) == 0
    again = tmp_path / "again"
    assert sentiment.run(_args(sentiment, "--data", str(FIXTURE), "--out", str(again),
                               "--epochs", "0", "--init", str(first))) == 0
    printed = capsys.readouterr().out
    assert f"saved {again} after 0 steps" in printed
    assert f"step 0/0 (from {first}) dev macro-F1" in printed
    assert f"Training from {first}:" in (again / "README.md").read_text()
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()


def test_soup_averages_two_fine_tunes_and_refits_on_dev(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    from finetune import sentiment

    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"seed{seed}"
        assert sentiment.run(_args(sentiment, "--data", str(FIXTURE), "--out", str(folder),
                                   "--epochs", "1", "--batch-size", "16", "--lr", "1e-4",
                                   "--seed", str(seed))) == 0
        folders.append(folder)
    soup = tmp_path / "soup"
    assert sentiment.run(_args(sentiment, "--data", str(FIXTURE), "--out", str(soup),
                               "--soup", *map(str, folders))) == 0
    printed = capsys.readouterr().out
    assert f"saved {soup} after 0 steps" in printed and "test (logit bias)" in printed
    a, b, c = (load_file(str(f / "model.safetensors")) for f in (*folders, soup))
    name = "classifier.weight"
    assert not np.allclose(a[name].numpy(), b[name].numpy())  # the seeds differ
    assert np.allclose(c[name].numpy(), (a[name].numpy() + b[name].numpy()) / 2, atol=1e-6)
    assert "Training from the weight average of" in (soup / "README.md").read_text()
    probs = sentiment.FineTuned(soup).probabilities(["@user thanks!", "@user my bag is lost"])
    assert probs.shape == (2, 3)

    assert sentiment.run(_args(sentiment, "--data", str(FIXTURE), "--out", str(tmp_path / "x"),
                               "--soup", str(folders[0]), str(tmp_path))) == 2
    assert f"--soup {tmp_path}: not a fine-tuned model folder" in capsys.readouterr().err
    weights = (folders[1] / "model.safetensors").read_bytes()
    assert sentiment.run(_args(sentiment, "--data", str(FIXTURE), "--out", str(folders[1]),
                               "--soup", *map(str, folders))) == 2
    assert "is one of the --soup folders" in capsys.readouterr().err
    assert (folders[1] / "model.safetensors").read_bytes() == weights


def test_bootstrap_interval_of_macro_f1_and_of_a_paired_difference() -> None:
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 3, size=600).tolist()
    noisy = [g if rng.random() < 0.8 else int(rng.integers(0, 3)) for g in gold]
    assert bootstrap_macro_f1(gold, gold) == (1.0, 1.0)
    assert bootstrap_macro_f1(gold, noisy, baseline=noisy) == (0.0, 0.0)
    low, high = bootstrap_macro_f1(gold, noisy)
    point = score(gold, noisy).macro_f1
    assert low < point < high and 0.02 < high - low < 0.15
    worse = [g if rng.random() < 0.5 else int(rng.integers(0, 3)) for g in gold]
    d_low, d_high = bootstrap_macro_f1(gold, noisy, baseline=worse)
    assert 0 < d_low < point - score(gold, worse).macro_f1 < d_high
    long_low, long_high = bootstrap_macro_f1(gold * 10, noisy * 10)
    assert long_high - long_low < (high - low) / 2  # ten times the tweets, a narrower interval
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_macro_f1(gold, noisy[:-1])
    with pytest.raises(ValueError, match="no labelled texts"):
        bootstrap_macro_f1([], [])


def test_logit_scale_recovers_the_temperature_of_flattened_probabilities() -> None:
    """Labels drawn from softmax(2 * z), probabilities given as softmax(z): the fitted
    scale is about 2, and already honest probabilities keep about 1."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 3)) * 1.5

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    true = softmax(2.0 * z)
    gold = [int(rng.choice(3, p=row)) for row in true]
    assert abs(fit_logit_scale(gold, softmax(z).tolist()) - 2.0) <= 0.2
    assert abs(fit_logit_scale(gold, true.tolist()) - 1.0) <= 0.1


def test_logit_bias_that_cannot_keep_the_limits_is_reported_not_faked() -> None:
    # Every dev tweet is negative but the model calls half of them positive: no bias on the
    # grid keeps negative recall >= 0.90 at precision >= 0.85 without the gold labels.
    gold = [0, 0, 0, 0]
    probabilities = [[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    assert fit_logit_bias(gold, probabilities) is None
    assert fit_logit_bias(gold, probabilities, min_recall=0.5) == (0.0, 0.0, 0.0)
