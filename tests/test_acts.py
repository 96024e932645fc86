"""Conversation acts: the committed head on clear cases, and the fit tool end to end on a
tiny fake data root (no shared data needed)."""

from __future__ import annotations

import argparse
import bz2
import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from core.acts import (
    DEFAULT_HEAD,
    Act,
    ActClassifier,
    ActHeadError,
    ActResult,
    clean,
    sincere_praise,
)
from finetune import acts as tool

FIXTURES = Path(__file__).parent / "fixtures" / "acts"
Embed = Callable[[Sequence[str]], np.ndarray]


@pytest.fixture(scope="module")
def embed() -> Embed:
    from core.retrieval import MiniLMEncoder

    return MiniLMEncoder().encode


@pytest.fixture(scope="module")
def classifier(embed: Embed) -> ActClassifier:
    return ActClassifier(embed)


CLEAR = [
    ("Thank you for helping me make my flight. I was late and you were great!", Act.PRAISE),
    ("Flew from CLT to JFK this a.m. Great service and quick flight! Thank you!", Act.PRAISE),
    ("How do I reset my password?", Act.QUESTION),
    ("my package never arrived", Act.QUESTION),
    ("my flight was delayed 3 times and nobody told us anything, worst airline ever",
     Act.COMPLAINT),
    ("can I talk to a real person", Act.REQUEST_PERSON),
    ("hi there", Act.GREETING),
    ("ok bye", Act.GREETING),
    ("@AmericanAir thanks so much for the upgrade! https://t.co/abc", Act.PRAISE),
]


@pytest.mark.parametrize(("text", "act"), CLEAR)
def test_clear_cases(classifier: ActClassifier, text: str, act: Act) -> None:
    result = classifier.classify(text)
    assert isinstance(result, ActResult)
    assert result.act is act, result.scores
    assert 0.0 < result.confidence <= 1.0
    assert set(result.scores) == {str(a) for a in Act}


def test_vector_given_means_no_encode(classifier: ActClassifier, embed: Embed) -> None:
    text = "Great service and quick flight! Thank you!"
    vector = embed([clean(text)])[0]

    def refuse(texts: Sequence[str]) -> np.ndarray:
        raise AssertionError("encoded although the vector was given")

    quiet = ActClassifier(refuse)
    assert quiet.classify(text, vector).act is classifier.classify(text).act is Act.PRAISE


def test_classify_many_matches_classify(classifier: ActClassifier) -> None:
    texts = [t for t, _ in CLEAR]
    assert [r.act for r in classifier.classify_many(texts)] == [a for _, a in CLEAR]


def test_sentiment_is_optional_and_sarcastic_thanks_is_a_complaint(
    classifier: ActClassifier,
) -> None:
    from core.acts import HEAD_FEATURES, rules_only

    sarcastic = "thanks for the 4 hour delay 🙄 #fail"
    sincere = "thanks so much, the crew was lovely"
    assert classifier.classify(sarcastic, sentiment=(0.9, 0.08, 0.02)).act is Act.COMPLAINT
    assert classifier.classify(sincere, sentiment=(0.02, 0.08, 0.9)).act is Act.PRAISE
    assert classifier.classify(sincere).act is Act.PRAISE  # backward compatible: no sentiment
    many = classifier.classify_many([sarcastic, sincere], [(0.9, 0.08, 0.02), None])
    assert [r.act for r in many] == [Act.COMPLAINT, Act.PRAISE]
    assert rules_only(clean(sarcastic)) is Act.COMPLAINT
    assert rules_only(clean(sincere)) is Act.PRAISE
    with pytest.raises(ValueError, match="sentiment"):
        classifier.classify("hi", sentiment=(0.5, 0.5))  # type: ignore[arg-type]
    meta = classifier.head.metadata
    assert meta["features"].split(",") == list(HEAD_FEATURES)
    assert float(meta["praise_bias"]) >= 0.0


def test_clean_strips_markup_mentions_links() -> None:
    raw = "<cust__  __company__  @delta Tom &amp; me, see https://x.co/y __cust>"
    assert clean(raw) == "Tom & me, see"


def test_missing_head_names_file(tmp_path: Path, embed: Embed) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ActHeadError, match=r"nope\.safetensors"):
        ActClassifier(embed, missing)


def test_corrupt_head_names_file(tmp_path: Path, embed: Embed) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a head at all")
    with pytest.raises(ActHeadError, match=r"bad\.safetensors"):
        ActClassifier(embed, bad)


def _fake_root(tmp_path: Path) -> tuple[Path, Path]:
    """A data root with a fake TwACS .csv.bz2 and Bitext csv, and labels keyed to them."""
    data, labels = tmp_path / "data", tmp_path / "labels"
    (data / tool.TWACS_FILE).parent.mkdir(parents=True)
    (data / tool.BITEXT_FILE).parent.mkdir(parents=True)
    labels.mkdir()
    with open(FIXTURES / "openers.tsv", encoding="utf-8") as f:
        openers = list(csv.DictReader(f, delimiter="\t"))
    with bz2.open(data / tool.TWACS_FILE, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["first_tweet_id", "tag", "first_utterance", "context"])
        for i, row in enumerate(openers):
            w.writerow([i, "UNK", row["text"], "<rep__ __cust__ ok __rep>"])
    with open(FIXTURES / "requests.tsv", encoding="utf-8") as f:
        requests = list(csv.DictReader(f, delimiter="\t"))
    with open(data / tool.BITEXT_FILE, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "intent", "response"])
        for row in requests:
            w.writerow([row["instruction"], row["intent"], "sure"])
    header = "row\tsha1_12\tact\tnote\n"
    for name, split in ((tool.TWACS_TRAIN, "train"), (tool.TWACS_DEV, "dev")):
        lines = [f"{i}\t{tool.text_sha1(r['text'])}\t{r['act']}\t\n"
                 for i, r in enumerate(openers) if r["split"] == split]
        (labels / name).write_text(header + "".join(lines), encoding="utf-8")
    lines = [f"{i}\t{tool.text_sha1(r['instruction'])}\t"
             f"{'request_person' if r['intent'] == 'contact_human_agent' else 'question'}\t\n"
             for i, r in enumerate(requests)]
    (labels / tool.BITEXT_LABELS).write_text(header + "".join(lines), encoding="utf-8")
    (labels / tool.WRITTEN).write_bytes((FIXTURES / "written.tsv").read_bytes())
    return data, labels


def test_fit_end_to_end_writes_a_head_that_loads(tmp_path: Path, embed: Embed) -> None:
    data, labels = _fake_root(tmp_path)
    dataset = tool.load(data, labels)
    assert len(dataset.held_out) == 3
    assert all("__cust" not in e.text for e in dataset.train)
    result = tool.train(dataset.train, embed)
    out = tmp_path / "head.safetensors"
    tool.save_head(result.head, out)
    first = out.read_bytes()
    assert len(first) < 20_000
    loaded = ActClassifier(embed, out)
    assert loaded.head.metadata["train_examples"] == str(len(dataset.train))
    assert loaded.classify("hello").act is Act.GREETING
    tool.save_head(tool.train(dataset.train, embed).head, out)
    assert out.read_bytes() == first, "refitting the same data must give the same bytes"
    lines = tool.evaluate(dataset, loaded)
    assert any("rules only" in line for line in lines)
    assert any("praise acknowledged" in line for line in lines)
    assert any("complaints acknowledged as praise" in line for line in lines)


def test_sha1_mismatch_names_file_and_line(tmp_path: Path) -> None:
    data, labels = _fake_root(tmp_path)
    path = labels / tool.TWACS_TRAIN
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    row, _, act, note = lines[3].split("\t")
    lines[3] = "\t".join((row, "000000000000", act, note))
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(tool.DataError, match=r"twacs_train_openers\.tsv:4: row \d+ .*sha1"):
        tool.load(data, labels)


def test_bad_act_and_missing_row_name_file_and_line(tmp_path: Path) -> None:
    data, labels = _fake_root(tmp_path)
    written = labels / tool.WRITTEN
    written.write_text(written.read_text(encoding="utf-8") + "hello\tgreet\n",
                       encoding="utf-8")
    with pytest.raises(tool.DataError, match=r"written\.tsv:10: unknown act 'greet'"):
        tool.load(data, labels)
    written.write_bytes((FIXTURES / "written.tsv").read_bytes())
    dev = labels / tool.TWACS_DEV
    dev.write_text(dev.read_text(encoding="utf-8") + "999\tabcdefabcdef\tpraise\t\n",
                   encoding="utf-8")
    with pytest.raises(tool.DataError, match=r"twacs_dev_openers\.tsv:5: row 999 is not in"):
        tool.load(data, labels)


def test_missing_data_folder_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(data=tmp_path / "absent", labels=tool.DEFAULT_LABELS,
                              out=tmp_path / "h.safetensors", seed=0, eval=False)
    assert tool.run(args) == 2
    assert "absent not found" in capsys.readouterr().err


def test_committed_head_is_small_and_records_its_fit() -> None:
    assert DEFAULT_HEAD.stat().st_size < 20_000
    from core.acts import load_head

    meta = load_head().metadata
    assert meta["class_weights"] == "balanced"
    assert int(meta["train_examples"]) > 500


def test_reconcile_weighs_sentiment_and_direct_questions() -> None:
    """The head's praise that the sentiment model finds very negative is a complaint; a
    hardly negative, clearly positive "complaint" is praise; a complaint that asks the
    company something is a question; only the rules decide a request for a person."""
    from core.acts import ActResult, reconcile

    def said(act: Act) -> ActResult:
        return ActResult(act, 0.6, {str(a): 0.0 for a in Act})

    sweat = "Row 30 on this plane is a sauna, it must be 90 degrees in here."
    assert reconcile(said(Act.PRAISE), sweat, (0.98, 0.01, 0.01)).act is Act.COMPLAINT
    assert reconcile(said(Act.PRAISE), sweat, (0.3, 0.3, 0.4)).act is Act.PRAISE
    privilege = "what an honour to fly with a captain on his very last trip after 35 years"
    assert reconcile(said(Act.COMPLAINT), privilege, (0.05, 0.1, 0.85)).act is Act.PRAISE
    assert reconcile(said(Act.COMPLAINT), privilege, (0.5, 0.1, 0.4)).act is Act.COMPLAINT
    asks = reconcile(said(Act.COMPLAINT), "DL 445 is delayed again. Any idea what's up?",
                     (0.8, 0.1, 0.1))
    assert asks.act is Act.QUESTION and asks.complaint_too
    staff = "a gate agent is harassing a woman on crutches at B3"
    assert reconcile(said(Act.REQUEST_PERSON), staff, None).act is Act.QUESTION
    assert reconcile(said(Act.REQUEST_PERSON), "can I talk to a real person please",
                     None).act is Act.REQUEST_PERSON


@pytest.mark.parametrize(("text", "warm"), [
    ("@AirCo excellent chat support as always, thanks so much", True),
    ("Never liked flying with you before, today changed my mind #crewwasamazing", True),
    ("After two gate changes the gate agent was outstanding and got us rebooked", True),
    ("Excellent crew today, thank you!", True),
    ("Late again, but s/o to the pilots for keeping us posted the whole time", True),
    ("I paid for the privilege of sitting in a broken seat", False),
    ("Excellent, another cancelled flight", False),
    ("Awesome. 3 hours on the tarmac.", False),
    ("I would appreciate a refund for this mess", False),
    ("no grace period for a 5 minute late payment, disgusting", False),
    ("thanks for the 4 hour delay", False),
    ("Thanks for nothing", False),
    ("what a disgrace #disgrace", False),
    ("my flight was delayed 3 hours and nobody told us", False),
    ("the crew was great but the gate agent was rude", False),
])
def test_sincere_praise_finds_warm_words_but_not_sarcasm(text: str, warm: bool) -> None:
    assert sincere_praise(text) is warm
