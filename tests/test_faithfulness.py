"""The faithfulness check against the real MiniLM encoder and the shipped help articles."""

from __future__ import annotations

import itertools
import random
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.faithfulness import (
    Claim,
    FaithfulnessChecker,
    SentenceBuffer,
    Verdict,
    split_claims,
)
from core.retrieval import MiniLMEncoder

KNOWLEDGE = Path(__file__).resolve().parent.parent / "knowledge"


def article(name: str) -> str:
    return (KNOWLEDGE / f"{name}.md").read_text(encoding="utf-8")


RESET = article("reset-password")
REFUND = article("refund-policy")
DELIVERY = article("delivery-times")
CONTACT = article("contact-us")


@pytest.fixture(scope="module")
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def checker(encoder: MiniLMEncoder) -> FaithfulnessChecker:
    return FaithfulnessChecker(encoder.encode)


# ---------------------------------------------------------------------------- split_claims


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "1. Open your web browser. 2. Click Settings. 3. Choose Reset password.",
            ["Open your web browser.", "Click Settings.", "Choose Reset password."],
        ),
        (
            "To reset it: 1. Open your browser 2. Click Settings 3. Choose Reset",
            ["To reset it:", "Open your browser", "Click Settings", "Choose Reset"],
        ),
        (
            "Here is how:\n- Sign in.\n* Open \"Your orders\".\n• Select the order",
            ["Here is how:", "Sign in.", "Open \"Your orders\".", "Select the order"],
        ),
        ("First line\nSecond line", ["First line", "Second line"]),
        (
            "It costs $4.99 and takes 3.5 days. The premium plan is $99.00 a year.",
            ["It costs $4.99 and takes 3.5 days.", "The premium plan is $99.00 a year."],
        ),
        (
            "Use a card, e.g. Visa, i.e. a credit card. Mr. Smith will reply.",
            ["Use a card, e.g. Visa, i.e. a credit card.", "Mr. Smith will reply."],
        ),
        (
            "We open at 9 a.m. and close at 5 p.m. Call us then.",
            ["We open at 9 a.m. and close at 5 p.m.", "Call us then."],
        ),
        (
            "Bring shirts, jeans, etc. and the receipt. Thanks etc. Bye.",
            ["Bring shirts, jeans, etc. and the receipt.", "Thanks etc.", "Bye."],
        ),
        (
            "See https://help.example.com/reset-password. Or email help@example.com today.",
            ["See https://help.example.com/reset-password.", "Or email help@example.com today."],
        ),
        (
            "Hmm... Let me check. Really?! Yes! It's done… Anything else?",
            ["Hmm...", "Let me check.", "Really?!", "Yes!", "It's done…", "Anything else?"],
        ),
        ("Open at 8. Then go.", ["Open at 8.", "Then go."]),
        ("", []),
        ("  \n - \n", []),
    ],
)
def test_split_claims(text: str, expected: list[str]) -> None:
    assert split_claims(text) == expected


STREAM_TEXTS = [
    "1. Open your web browser 2. Click Settings. 3. Choose Reset password.\n- Done.",
    "It costs $4.99, e.g. for 3.5 days. Mr. Smith opens at 9 a.m. Then call help@example.com!",
    "Hmm... Wait. See https://help.example.com/a.b. Really?! Yes\n\nNew paragraph etc. Fine",
    "Steps: 1. Sign in. 2. Open \"Your orders\". Our team is in the U.S. We reply at 8 p.m. ok.",
]


def _chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(12, len(text) - 1))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _stream(pieces: list[str]) -> tuple[list[str], list[list[str]]]:
    buffer = SentenceBuffer()
    per_feed = [buffer.feed(p) for p in pieces]
    return [s for batch in per_feed for s in batch] + buffer.flush(), per_feed


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_sentence_buffer_matches_split_claims_in_any_chunking(text: str) -> None:
    rng = random.Random(text)
    expected = split_claims(text)
    assert len(expected) >= 3
    for _ in range(200):
        streamed, _ = _stream(_chunks(text, rng))
        assert streamed == expected
    streamed, _ = _stream(list(text))
    assert streamed == expected


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("ab A.!?$4 9\n-:1.2.e.g.a.m.…)\"@")) | st.characters(),
        max_size=80,
    ),
    st.lists(st.integers(min_value=1, max_value=79), max_size=10),
)
def test_sentence_buffer_matches_split_claims_hypothesis(text: str, cuts: list[int]) -> None:
    bounds = [0, *sorted({c for c in cuts if c < len(text)}), len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert _stream(pieces)[0] == split_claims(text)


def test_sentence_buffer_waits_for_proof_that_a_sentence_ended() -> None:
    buffer = SentenceBuffer()
    assert buffer.feed("It costs $4.") == []
    assert buffer.feed("99 a month. ") == []
    assert buffer.feed("Then") == ["It costs $4.99 a month."]
    assert buffer.feed(" sign in\n") == ["Then sign in"]
    assert buffer.feed("Done") == []
    assert buffer.flush() == ["Done"]
    assert buffer.flush() == []


# ---------------------------------------------------------------------------- verdicts


def test_faithful_paraphrase_passes_whole(checker: FaithfulnessChecker) -> None:
    answer = (
        "Nobody at our store can see or send you your current password, but we can set a new "
        "one for you. We need your full name or account ID, your username and your PIN number "
        "or the answer to your security question. Once we have checked these details, we "
        "generate a new password and share it with you in the chat. Sign in with it and choose "
        "a password of your own."
    )
    verdict = checker.check(answer, [RESET])
    assert verdict.n_claims == 4
    assert verdict.n_dropped == 0, verdict.dropped
    assert verdict.dropped_share == 0.0
    assert verdict.supported_text == " ".join(split_claims(answer))
    assert all(c.kind == "claim" and c.reason == "" for c in verdict.claims)


def test_restated_hours_and_delivery_times_pass(checker: FaithfulnessChecker) -> None:
    answer = (
        "Our support team is available Monday to Friday from 8:00 am to 8 pm, and on Saturday "
        "from 9 am to 5 pm. The chat itself is open 24 hours a day, seven days a week."
    )
    assert checker.check(answer, [CONTACT]).n_dropped == 0
    answer = "Standard shipping takes 3 to 5 business days within the United States."
    assert checker.check(answer, [DELIVERY]).n_dropped == 0


@pytest.mark.parametrize(
    ("claim", "passage", "named"),
    [
        ("Refunds cost a $49 processing fee.", REFUND, "$49"),
        ("A return is possible within 45 days.", REFUND, "45 days"),
        ("Our support team is available Monday to Friday from 8 am to 9 pm.", CONTACT, "9 pm"),
        ("On Sunday our team works from 9 am to 5 pm.", CONTACT, "Sunday"),
        ("Standard shipping takes 3 to 5 business days within Canada.", DELIVERY, "Canada"),
        ("You can also visit our office in London.", CONTACT, "London"),
        ("Standard shipping takes 2 days.", DELIVERY, "2 days"),
    ],
)
def test_invented_fact_is_dropped_and_named(
    checker: FaithfulnessChecker, claim: str, passage: str, named: str
) -> None:
    result = checker.check_claim(claim, [passage])
    assert not result.supported
    assert result.kind == "claim"
    assert result.reason.startswith("not in the passages:")
    assert named in result.reason


@pytest.mark.parametrize(
    ("claim", "passage", "word"),
    [
        ("I'll provide a complimentary upgrade for your trouble.", RESET, "upgrade"),
        ("As an apology, your next delivery is complimentary.", DELIVERY, "complimentary"),
        ("A manager will call you back to sort this out.", CONTACT, "call you"),
        ("We can also offer you a discount on your next order.", REFUND, "discount"),
    ],
)
def test_promise_not_in_passages_is_dropped(
    checker: FaithfulnessChecker, claim: str, passage: str, word: str
) -> None:
    result = checker.check_claim(claim, [passage])
    assert not result.supported
    assert result.reason == f"promise not in the passages: {word}"


def test_promise_that_the_passage_makes_is_kept(checker: FaithfulnessChecker) -> None:
    result = checker.check_claim(
        "Give us a phone number and a manager will call you back.",
        [article("subscription-extension")],
    )
    assert result.supported, result


def test_invented_browser_steps_are_dropped(checker: FaithfulnessChecker) -> None:
    answer = (
        "1. Open your web browser. 2. Click on Settings. "
        "3. Go to the login page and click the reset link."
    )
    verdict = checker.check(answer, [RESET])
    assert verdict.n_claims == 3
    assert verdict.n_supported == 0, verdict.claims
    assert verdict.supported_text == ""
    assert verdict.dropped_share == 1.0
    reasons = [c.reason for c in verdict.dropped]
    assert reasons[0] == "no passage says this"
    assert "Settings" in reasons[1]


def test_restating_the_customer_is_kept(checker: FaithfulnessChecker) -> None:
    conversation = ["Hi, my order 11562 was sent to Rotterdam by mistake and I'm upset"]
    claim = "I understand your order 11562 was sent to Rotterdam by mistake."
    assert checker.check_claim(claim, [DELIVERY], conversation).supported
    without = checker.check_claim(claim, [DELIVERY])
    assert not without.supported
    assert "11562" in without.reason and "Rotterdam" in without.reason


def test_customer_cannot_license_a_promise(checker: FaithfulnessChecker) -> None:
    conversation = ["I want a free upgrade to overnight shipping"]
    result = checker.check_claim("We'll give you a free upgrade.", [DELIVERY], conversation)
    assert not result.supported
    assert result.reason.startswith("promise not in the passages:")


def test_mixed_answer_keeps_order_and_drops_the_bad(checker: FaithfulnessChecker) -> None:
    answer = (
        "I'm sorry to hear that. "
        "1. Open your web browser. "
        "2. Click Settings. "
        "Once we have checked your details, we generate a new password and share it in the chat. "
        "We will also send you a $20 voucher. "
        "Then sign in with it and choose a password of your own."
    )
    verdict = checker.check(answer, [RESET, CONTACT])
    assert [c.supported for c in verdict.claims] == [True, False, False, True, False, True]
    assert verdict.claims[0].kind == "framing"
    assert verdict.supported_text == (
        "I'm sorry to hear that. "
        "Once we have checked your details, we generate a new password and share it in the chat. "
        "Then sign in with it and choose a password of your own."
    )
    assert [c.text for c in verdict.dropped] == [
        "Open your web browser.", "Click Settings.", "We will also send you a $20 voucher."
    ]
    assert verdict.n_dropped == 3 and verdict.n_supported == 3
    assert verdict.dropped_share == pytest.approx(0.5)


@pytest.mark.parametrize(
    "sentence",
    [
        "I'm happy to help with that.",
        "I'm sorry to hear that.",
        "Is there anything else I can help you with?",
        "Let me know if you have any other questions.",
        "Here is what our help centre says:",
        "Thank you for your patience!",
    ],
)
def test_framing_is_kept(checker: FaithfulnessChecker, sentence: str) -> None:
    result = checker.check_claim(sentence, [DELIVERY])
    assert result == Claim(sentence, True, result.similarity, "", "framing")


@pytest.mark.parametrize(
    "sentence",
    [
        "I'll give you a full refund today.",
        "Click on Settings in your browser.",
        "I'm happy to help you reset your password in the app.",
    ],
)
def test_content_is_not_framing(checker: FaithfulnessChecker, sentence: str) -> None:
    result = checker.check_claim(sentence, [DELIVERY])
    assert result.kind == "claim"
    assert not result.supported


def test_verdict_of_empty_answer() -> None:
    verdict = Verdict(())
    assert (verdict.n_claims, verdict.n_dropped, verdict.dropped_share) == (0, 0, 0.0)
    assert verdict.supported_text == ""


def test_passage_sentences_are_cached_and_thread_safe(encoder: MiniLMEncoder) -> None:
    calls: list[int] = []

    def counting(texts):  # type: ignore[no-untyped-def]
        calls.append(len(texts))
        return encoder.encode(texts)

    checker = FaithfulnessChecker(counting, cache_size=10_000)
    claim = "We generate a new password and share it with you in the chat."
    first = checker.check_claim(claim, [RESET])
    cached = checker.cached
    assert cached > 5
    calls.clear()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            assert checker.check_claim(claim, [RESET]) == first
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert calls == [1, 1, 1, 1]
    assert checker.cached == cached
    small = FaithfulnessChecker(encoder.encode, cache_size=3)
    small.check_claim(claim, [RESET])
    assert small.cached == 3


# ---------------------------------------------------------------------------- extract


def test_extract_returns_relevant_plain_sentences_in_passage_order(
    checker: FaithfulnessChecker,
) -> None:
    sentences = checker.extract("When is your support team available?", [CONTACT, RESET])
    assert 1 <= len(sentences) <= 3
    assert (
        "Our support team is available Monday to Friday from 8 am to 8 pm, and Saturday from "
        "9 am to 5 pm."
    ) in sentences
    plain = " ".join(c for c in CONTACT.split("+++")[-1].split())
    positions = [plain.find(s.replace('"', "").split(":")[0][:30]) for s in sentences]
    assert positions == sorted(positions)
    for sentence in sentences:
        assert not any(mark in sentence for mark in ("##", "**", "](", "+++"))
        assert sentence[0].isupper() and sentence.endswith((".", "!"))


def test_extract_joins_fragment_lists_and_strips_markdown(checker: FaithfulnessChecker) -> None:
    sentences = checker.extract("What details do you need to reset my password?", [RESET], 1)
    assert sentences == [
        "What we need from you: your full name or account ID, your username (if you don't "
        'remember it, we can recover it first: see "Forgot your username"), your PIN number or '
        "the answer to your security question."
    ]
    markdown = "## Hours\n\nWe are open **Monday to Friday**. See [our page](https://x.example.com)."
    assert checker.extract("when are you open", [markdown], 1) == [
        "We are open Monday to Friday."
    ]
    assert checker.extract("anything", ["# Just a heading"]) == ["Just a heading"]
    assert checker.extract("anything", []) == []


def test_extract_picks_by_meaning(checker: FaithfulnessChecker) -> None:
    sentences = checker.extract("How long until my refund arrives?", [REFUND], 1)
    assert sentences == ["Credit for a returned item normally appears within 7 days."]
    vectors = checker.extract("how do I sign in after the reset", [RESET], 3)
    assert any("Sign in with it" in s for s in vectors)
    assert np.isfinite(checker.check_claim("x", [RESET]).similarity)
