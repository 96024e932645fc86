"""The escalation policy's rules, each on its own, and their precedence."""

from __future__ import annotations

from core.config import EscalationSettings
from core.escalation import (
    REASON_CHURN,
    REASON_LEGAL,
    REASON_NEGATIVE,
    REASON_PROFANITY,
    REASON_REPEATED,
    REASON_REQUESTED,
    REASON_SAFETY,
    REASON_TREND,
    REASON_VERY_NEGATIVE,
    Escalation,
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


def test_first_angry_message_escalates_on_churn_with_evidence() -> None:
    text = ("What the actual fuck is wrong w/ you... I'm about to switch airlines after this "
            "trip!!!! My flight delayed 3 times")
    decision = policy.decide(text, [0.93])
    assert decision is not None and decision.reason == REASON_CHURN
    assert decision.scores == {"signal": "churn_threat", "matched": "switch airlines",
                               "p_negative": 0.93}
    assert policy.strong_signal(text) == Escalation(
        REASON_CHURN, {"signal": "churn_threat", "matched": "switch airlines", "p_negative": None})


def test_each_strong_signal_on_a_first_message() -> None:
    cases = {
        REASON_PROFANITY: ("wtf is wrong with you", "you f***ing idiots", "screw you",
                           "this company sucks", "f*ck this, my bag is lost again",
                           "sh1t service, 3 hours on hold", "Fix your damn website"),
        REASON_CHURN: ("I'm done with you", "never flying with you again!",
                       "Taking my business elsewhere.", "last time I use your bank",
                       "I'm cancelling my membership, this is ridiculous",
                       "I will be switching providers next month", "#neveragain"),
        REASON_LEGAL: ("I'll be contacting my lawyer", "see you in small claims court",
                       "I'm filing a complaint with the DOT", "reporting you to the CFPB",
                       "I will do a chargeback", "Expect to hear from the ombudsman",
                       "I'm going to sue"),
        REASON_SAFETY: ("a passenger is threatening me", "my son had an allergic reaction",
                        "there is smoke coming from the engine", "I'm being harassed by a driver",
                        "the man next to me has chest pain", "the stairs are dangerous"),
    }
    for reason, texts in cases.items():
        for text in texts:
            decision = policy.decide(text, [0.4])
            assert decision is not None and decision.reason == reason, text
            assert decision.scores["signal"] == reason and decision.scores["matched"], text


def test_safety_escalates_whatever_the_sentiment_but_plain_gratitude() -> None:
    decision = policy.decide("The crew ignored a medical emergency in row 12", [0.4],
                             p_positive=0.3)
    assert decision is not None and decision.reason == REASON_SAFETY
    assert decision.scores["matched"] == "medical emergency"
    assert decision.scores["p_positive"] == 0.3
    assert policy.decide("there is smoke in the cabin, nobody is helping", [0.02],
                         p_positive=0.5) is not None
    # Thanks for help in an emergency that is over: acknowledged, not a ticket.
    assert policy.decide("Thank you! The crew handled the medical emergency so well", [0.01],
                         p_positive=0.99) is None
    assert policy.decide("nobody was hurt, just wondering about my bag", [0.2]) is None
    assert policy.decide("Can I get an emergency exit row seat?", [0.1]) is None


def test_praise_with_swearing_does_not_escalate() -> None:
    for text in ("fucking awesome crew", "damn that was a good flight",
                 "holy shit you guys are fast, thanks!", "Funny as hell safety video, well done",
                 "great service fixing my booking screw up, thumbs up"):
        assert policy.strong_signal(text) is None, text
        assert policy.decide(text, [0.3], p_positive=0.8) is None, text
    # high P(positive) wins even over a swear with a complaint word
    assert policy.decide("wtf this was delayed but the crew was a delight", [0.6],
                         p_positive=0.7) is None


def test_profanity_needs_anger_or_a_complaint() -> None:
    assert policy.strong_signal("how the fuck do I get into first class?") is None
    decision = policy.strong_signal("how the fuck do I get into first class?", 0.6, 0.1)
    assert decision is not None and decision.reason == REASON_PROFANITY
    assert decision.scores["basis"] == "sentiment"
    decision = policy.strong_signal("screw you")
    assert decision is not None and decision.scores["basis"] == "aimed"


def test_order_questions_are_not_churn() -> None:
    for text in ("how do I cancel my order?", "Can I cancel my order please",
                 "I want to cancel my order, it hasn't shipped yet",
                 "how do I cancel my account?", "please close my account, thanks",
                 "I'm switching to the morning flight",
                 "I will never fly business class, too pricey?",
                 "Sue at the gate was great"):
        assert policy.decide(text, [0.3]) is None, text


def test_very_negative_single_message() -> None:
    decision = policy.decide("this is the worst day of my life", [0.995])
    assert decision is not None and decision.reason == REASON_VERY_NEGATIVE
    assert decision.scores == {"signal": "very_negative", "threshold": 0.99, "p_negative": 0.995}
    assert policy.decide("this is the worst day of my life", [0.97]) is None


def test_company_names_and_extra_phrases() -> None:
    settings = EscalationSettings(company_names=["Acme Air"],
                                  extra_churn_phrases=["moving to rival"])
    custom = EscalationPolicy(settings)
    assert custom.strong_signal("acme air sucks") is not None
    assert custom.strong_signal("never fly Acme Air, trust me") is not None
    decision = custom.strong_signal("I'm moving to  Rival next week")
    assert decision is not None and decision.reason == REASON_CHURN


def test_strong_signals_off_restores_the_old_rules() -> None:
    old = EscalationPolicy(EscalationSettings(strong_signals=False))
    for text, history in (("screw you", [0.9]), ("I'll call my lawyer", [0.5]),
                          ("never flying with you again", [0.99]), ("there is a fire", [0.1])):
        assert old.decide(text, history) is None, text
    decision = old.decide("still late", [0.9, 0.2, 0.85])
    assert decision is not None and decision.reason == REASON_NEGATIVE
    assert old.decide("human please", [0.1]) is not None


def test_settings_are_validated() -> None:
    import pytest
    from pydantic import ValidationError

    for bad in ({"very_negative_threshold": 1.5}, {"profanity_min_negative": -0.1},
                {"strong_signals": "yes"}, {"company_names": "acme"}):
        with pytest.raises(ValidationError):
            EscalationSettings(**bad)


def test_swearing_and_churn_inside_hashtags_and_picking_us_again() -> None:
    angry = [0.94]
    for text, reason in (
        ("my suitcase went missing again, three trips in a row #wtfisthis", "profanity"),
        ("#fuckthisairline delayed again", "profanity"),
        ("honestly this is the last time I pick you for a booking.", "churn_threat"),
    ):
        decision = policy.decide(text, angry, [], p_positive=0.02)
        assert decision is not None and decision.reason == reason, text
    assert policy.decide("this crew is #fuckingawesome", [0.05], [], p_positive=0.9) is None
    assert policy.decide("the last time I picked you I got an upgrade, thanks!", [0.05], [],
                         p_positive=0.9) is None
