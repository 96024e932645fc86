"""Distilling the sentiment model on unlabeled customer tweets: the TwACS reader, the loss,
and ``finetune sentiment --unlabeled --teacher`` end to end on small fixtures with the real
MiniLM."""

from __future__ import annotations

import argparse
import bz2
import math
from pathlib import Path

import pytest
import torch

from finetune import sentiment
from finetune.sentiment_data import DataError
from finetune.sentiment_unlabeled import load_unlabeled

FIXTURES = Path(__file__).parent / "fixtures"
TWEETS = FIXTURES / "tweets_small.csv"
TWACS = FIXTURES / "finetune" / "twacs_small.csv"
CUSTOMER_TURNS = 10


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sentiment.configure(parser)
    return parser.parse_args(list(argv))


def test_unlabeled_texts_are_the_customer_turns_normalised() -> None:
    got = load_unlabeled(TWACS, held_out=[])
    assert got.turns_read == CUSTOMER_TURNS and len(got.texts) == CUSTOMER_TURNS
    assert got.without_words == got.duplicates == got.held_out_dropped == 0
    assert "@user love the new seats & the free wifi!" in got.texts  # entity decoded
    assert "@user why is DL455 delayed again?? @user" in got.texts  # @44120 is a handle
    assert "@user my bag never arrived in Denver http" in got.texts  # link as in training
    assert "@user thanks, that works" in got.texts  # a later customer turn counts too
    joined = " ".join(got.texts)
    for agent_or_markup in ("rebooked", "Happy to help", "DM", "__company__", "__cust__",
                            "<cust", "*TMT"):
        assert agent_or_markup not in joined


def test_held_out_tweets_and_duplicates_are_dropped(tmp_path: Path) -> None:
    text = TWACS.read_text(encoding="utf-8")
    doubled = tmp_path / "doubled.csv.bz2"
    rows = text.splitlines()
    wordless = "2001,UNK,<cust__  __company__  !!! ?? __cust>,"
    doubled.write_bytes(bz2.compress(("\n".join([*rows, rows[4], wordless]) + "\n").encode()))
    got = load_unlabeled(doubled, held_out=["@USER   Anyone there?", "not in the file"])
    assert got.duplicates == 1
    assert got.held_out_dropped == 1
    assert got.without_words == 1
    assert got.turns_read == CUSTOMER_TURNS + 2
    assert "@user anyone there?" not in got.texts
    assert len(got.texts) == CUSTOMER_TURNS - 1


def test_the_sample_is_fixed_by_the_seed() -> None:
    everything = set(load_unlabeled(TWACS, [], limit=0).texts)
    a = load_unlabeled(TWACS, [], limit=4, seed=1).texts
    assert len(a) == 4 and set(a) <= everything
    assert load_unlabeled(TWACS, [], limit=4, seed=1).texts == a
    assert {load_unlabeled(TWACS, [], limit=4, seed=s).texts for s in range(6)} != {a}


def test_bad_unlabeled_files_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no-such\.csv not found: check --unlabeled"):
        load_unlabeled(tmp_path / "no-such.csv", [])
    broken = tmp_path / "broken.csv"
    broken.write_text("first_tweet_id,tag,first_utterance,context\n"
                      "1,UNK,<cust__ fine __cust>,\n"
                      "2,UNK,<cust__ my bag __rep>,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.csv:3: first_utterance: turn opened as "
                                        r"<cust__ but closed as __rep>"):
        load_unlabeled(broken, [])
    header_only = tmp_path / "wrong.csv"
    header_only.write_text("id,text\n1,hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"wrong\.csv:1: missing column\(s\) first_utterance"):
        load_unlabeled(header_only, [])
    with pytest.raises(DataError, match="--unlabeled-limit must be >= 0"):
        load_unlabeled(TWACS, [], limit=-1)
    truncated = tmp_path / "cut.csv.bz2"
    packed = bz2.compress(TWACS.read_bytes())
    truncated.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=r"cut\.csv\.bz2:1: not a readable CSV file \(Compr"):
        load_unlabeled(truncated, [])
    garbage = tmp_path / "garbage.csv.bz2"
    garbage.write_bytes(b"this is not bzip2 at all")
    with pytest.raises(DataError, match=r"garbage\.csv\.bz2:1: not a readable CSV file"):
        load_unlabeled(garbage, [])


def test_soft_cross_entropy_is_weighted_cross_entropy_for_gold_labels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 3)
    labels = torch.tensor([0, 1, 2, 0, 0, 2, 1])
    class_weight = torch.tensor([0.5, 2.0, 1.5])
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    expected = torch.nn.CrossEntropyLoss(weight=class_weight)(logits, labels)
    got = sentiment._soft_cross_entropy(logits, one_hot, one_hot @ class_weight)
    assert torch.allclose(got, expected)
    soft = torch.tensor([[0.7, 0.2, 0.1]] * 7)
    weight = soft @ class_weight
    by_hand = sum(
        -float(w) * sum(float(t) * math.log(float(p)) for t, p in zip(row, probs, strict=True))
        for row, probs, w in zip(soft, torch.softmax(logits, -1), weight, strict=True)
    ) / float(weight.sum())
    assert sentiment._soft_cross_entropy(logits, soft, weight).item() == pytest.approx(by_hand)


def test_training_targets_put_the_teachers_probabilities_beside_the_gold_labels() -> None:
    gold = [sentiment.Example(i, f"t{i}", label, 1.0, "", "x")
            for i, label in enumerate([0, 0, 0, 1, 2, 2])]
    soft = sentiment.SoftLabels(("u1", "u2"), ((0.6, 0.3, 0.1), (0.0, 0.0, 1.0)), "fixture")
    texts, targets, weight = sentiment.training_targets(gold, soft, class_weights=True)
    assert texts == ["t0", "t1", "t2", "t3", "t4", "t5", "u1", "u2"]
    assert targets[:6].argmax(-1).tolist() == [0, 0, 0, 1, 2, 2]
    assert torch.allclose(targets[6:], torch.tensor([[0.6, 0.3, 0.1], [0.0, 0.0, 1.0]]))
    class_weight = [6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2)]  # from the gold labels only
    assert weight[:6].tolist() == pytest.approx([class_weight[g.label] for g in gold])
    assert weight[6].item() == pytest.approx(
        0.6 * class_weight[0] + 0.3 * class_weight[1] + 0.1 * class_weight[2])
    assert weight[7].item() == pytest.approx(class_weight[2])
    _, _, flat = sentiment.training_targets(gold, soft, class_weights=False)
    assert flat.tolist() == pytest.approx([1.0] * 8)
    texts, targets, _ = sentiment.training_targets(gold, None, class_weights=True)
    assert len(texts) == len(targets) == 6


def test_finetune_distils_a_teacher_on_unlabeled_tweets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = tmp_path / "teacher"
    assert sentiment.run(_args("--data", str(TWEETS), "--out", str(teacher), "--epochs", "1",
                               "--batch-size", "16", "--lr", "1e-4")) == 0
    capsys.readouterr()
    student = tmp_path / "student"
    assert sentiment.run(_args("--data", str(TWEETS), "--out", str(student), "--epochs", "1",
                               "--batch-size", "16", "--lr", "1e-4", "--seed", "4",
                               "--unlabeled", str(TWACS), "--teacher", str(teacher))) == 0
    printed = capsys.readouterr().out
    assert f"{CUSTOMER_TURNS} unlabeled texts from {TWACS}" in printed
    n_train = len(sentiment.load(TWEETS).split("train"))
    steps = math.ceil((n_train + CUSTOMER_TURNS) / 16)  # the unlabeled texts are trained on
    assert f"saved {student} after {steps} steps (1.00 epochs" in printed
    card = (student / "README.md").read_text()
    assert f"{n_train} tweets and {CUSTOMER_TURNS} unlabeled texts with soft targets" in card
    assert f"labelled by {teacher}" in card
    probs = sentiment.FineTuned(student).probabilities(["@user thanks!"])
    assert probs.shape == (1, 3)

    labels = sentiment.teacher_labels(teacher, ["@user thanks!", "@user lost my bag"], "x")
    assert labels.texts == ("@user thanks!", "@user lost my bag")
    assert all(sum(p) == pytest.approx(1.0, abs=1e-5) for p in labels.probabilities)


@pytest.mark.parametrize(("extra", "message"), [
    (["--unlabeled", str(TWACS)], "--unlabeled and --teacher go together"),
    (["--teacher", "somewhere"], "--unlabeled and --teacher go together"),
    (["--unlabeled", "missing.csv", "--teacher", "somewhere"], "missing.csv not found"),
    (["--unlabeled", str(TWACS), "--teacher", "no-such-folder"],
     "no-such-folder: not a fine-tuned model folder"),
    (["--unlabeled", str(TWACS), "--teacher", "t", "--epochs", "0", "--init", "i"],
     "--epochs 0 trains nothing"),
    (["--unlabeled", str(TWACS), "--teacher", "t", "--soup", "a", "b"],
     "--soup trains nothing"),
    (["--soup", "a"], "--soup needs at least two fine-tuned folders"),
    (["--soup", "a", "b", "a", "--greedy"], "--soup names a folder twice"),
    (["--soup", "a", "no-such-b", "--greedy"], "--soup a: not a fine-tuned model folder"),
])
def test_distillation_options_are_checked(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    assert sentiment.run(_args("--data", str(TWEETS), "--out", str(out), *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_greedy_soup_keeps_what_the_dev_split_supports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    import numpy as np
    from safetensors.torch import load_file

    folders = []
    for seed, lr in ((1, "1e-4"), (2, "1e-4"), (3, "1e-7")):
        folder = tmp_path / f"seed{seed}"
        assert sentiment.run(_args("--data", str(TWEETS), "--out", str(folder), "--epochs", "1",
                                   "--batch-size", "16", "--lr", lr, "--seed", str(seed))) == 0
        folders.append(folder)
    capsys.readouterr()
    out = tmp_path / "greedy"
    assert sentiment.run(_args("--data", str(TWEETS), "--out", str(out), "--greedy",
                               "--soup", *map(str, folders))) == 0
    printed = capsys.readouterr().out
    alone = dict(re.findall(r"greedy soup: (\S+) alone, dev macro-F1 (\d\.\d+)", printed))
    assert set(alone) == {str(f) for f in folders}
    order = [line.split()[2] for line in printed.splitlines()
             if line.startswith("greedy soup: ") and " alone," in line]
    assert [float(alone[f]) for f in order] == sorted(map(float, alone.values()), reverse=True)
    added = re.findall(r"greedy soup: \+ (\S+): dev macro-F1 (\d\.\d+) \((kept|left out)",
                       printed)
    assert [f for f, _, _ in added] == order[1:]
    chosen = [order[0]] + [f for f, _, verdict in added if verdict == "kept"]
    best = float(alone[order[0]])
    for _, f1, verdict in added:  # kept exactly when the soup's dev score did not fall
        assert (float(f1) >= best) == (verdict == "kept")
        best = max(best, float(f1)) if verdict == "kept" else best
    name = "classifier.weight"
    expected = np.mean([load_file(f"{f}/model.safetensors")[name].numpy() for f in chosen], 0)
    assert np.allclose(load_file(str(out / "model.safetensors"))[name].numpy(), expected,
                       atol=1e-6)
    card = (out / "README.md").read_text()
    assert (f"Training from {chosen[0]} (the greedy soup kept it alone)" in card
            if len(chosen) == 1 else "Training from the weight average of " in card)

    assert sentiment.run(_args("--data", str(TWEETS), "--out", str(out), "--greedy")) == 2
    assert "--greedy picks among --soup folders" in capsys.readouterr().err
    assert sentiment.run(_args("--data", str(TWEETS), "--out", str(folders[0]), "--greedy",
                               "--soup", *map(str, folders))) == 2
    assert "is one of the --soup folders" in capsys.readouterr().err
