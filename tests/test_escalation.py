"""The escalation policy's rules, each on its own, and their precedence."""

from __future__ import annotations

from core.config import EscalationSettings
from core.escalation import (
    REASON_NEGATIVE,
    REASON_REPEATED,
    REASON_REQUESTED,
    REASON_TREND,
    EscalationPolicy,
)

policy = EscalationPolicy(EscalationSettings())


def test_plain_words_asking_for_a_person() -> None:
    for text in ("Can I talk to a human?", "agent please", "I want to speak to a manager",
                 "is there a real person here", "get me a live   agent"):
        decision = policy.decide(text, [0.1])
        assert decision is not None and decision.reason == REASON_REQUESTED, text
    for text in ("Where is my order?", "How do I change my password?",
                 "The agenda says my parcel ships today"):
        assert policy.decide(text, [0.1]) is None, text


def test_two_of_three_negative() -> None:
    assert policy.decide("late again", [0.9]) is None
    decision = policy.decide("still late", [0.9, 0.2, 0.85])
    assert decision is not None and decision.reason == REASON_NEGATIVE
    assert decision.scores["hits"] == 2 and decision.scores["p_negative"] == [0.9, 0.2, 0.85]
    assert policy.decide("ok", [0.9, 0.1, 0.1, 0.8]) is None  # only the last three count


def test_sustained_trend() -> None:
    settings = EscalationSettings(negative_threshold=0.95, ewma_threshold=0.7)
    decision = EscalationPolicy(settings).decide("meh", [0.72, 0.75, 0.74])
    assert decision is not None and decision.reason == REASON_TREND
    assert EscalationPolicy(settings).decide("meh", [0.72, 0.75]) is None  # too few yet


def test_repeated_question_means_the_bot_is_not_helping() -> None:
    earlier = ["where is my refund for order 123", "hi", "Where is my refund for order 123?"]
    decision = policy.decide("where is my refund for order 123??", [0.3] * 4, earlier)
    assert decision is not None and decision.reason == REASON_REPEATED
    assert policy.decide("where is my refund", [0.3, 0.3], ["how do I log in"]) is None


def test_explicit_request_wins_over_scores() -> None:
    decision = policy.decide("human please", [0.9, 0.9, 0.9])
    assert decision is not None and decision.reason == REASON_REQUESTED


def test_replay_with_the_real_classifier() -> None:
    from core.sentiment import build_classifier
    from finetune.eval_escalation import Conversation, replay

    classifier = build_classifier("minilm", "", "", 16, 0)
    classifier._load()
    conversations = [
        Conversation("angry", ("My flight was cancelled and nobody helps!!",
                               "This is the worst customer service I have ever seen",
                               "Still waiting on hold for 3 hours, unacceptable"), True),
        Conversation("positive", ("Thanks so much, the crew was wonderful!",
                                  "Great flight, loved it", "You guys rock"), False),
        Conversation("asks", ("What time is boarding?", "can I talk to a human"), True),
    ]
    outcome = replay(conversations, classifier.classify_many, policy)
    assert outcome[0] in (2, 3)
    assert outcome[1] is None
    assert outcome[2] == 2
