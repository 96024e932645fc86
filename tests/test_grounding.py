"""Grounding with the real retriever and MiniLM encoder, and placeholders never shown raw."""

from __future__ import annotations

import argparse
import logging
import random
import re
import shutil
import tomllib
from itertools import pairwise
from pathlib import Path

import pytest

from core.grounding import (
    GROUNDING_INSTRUCTION,
    NO_ANSWER_TEXT,
    ORDER_NUMBER,
    SHIPPED_SMALL_TALK,
    SMALL_TALK_INSTRUCTION,
    Grounder,
    SmallTalkDetector,
    StreamingPlaceholderFilter,
    extract_context,
    fill_placeholders,
    is_small_talk,
    load_small_talk,
    retrieval_query,
    select_hits,
)
from core.knowledge import KnowledgeError
from core.messages import Citation
from core.retrieval import Hit, MiniLMEncoder, Retriever
from finetune import eval_grounding

FIXTURES = Path(__file__).parent / "fixtures" / "kb"
BASE = "You are the support assistant of a test shop."


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def retriever(minilm: MiniLMEncoder, tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    return Retriever(FIXTURES, tmp_path_factory.mktemp("cache"), encoder=minilm)


@pytest.fixture
def grounder(retriever: Retriever) -> Grounder:
    return Grounder(retriever, BASE, k=3, reload_interval_s=0)


# -- grounding ------------------------------------------------------------------------------


async def test_prompt_holds_the_passages_under_their_article_ids(grounder: Grounder) -> None:
    grounding = await grounder.ground("how many days does delivery take?")
    assert not grounding.no_answer
    prompt = grounding.system_prompt
    assert prompt.startswith(BASE)
    assert GROUNDING_INSTRUCTION in prompt
    assert "[delivery-times] How long delivery takes" in prompt
    assert "Standard delivery takes three to five working days." in prompt
    # Every passage in the prompt is announced by its article id.
    for hit in grounding.hits:
        assert f"[{hit.article_id}] " in prompt
        assert hit.text.strip() in prompt
    assert grounding.citations[0] == Citation(
        "delivery-times", "How long delivery takes", "https://help.example.com/delivery-times"
    )


@pytest.mark.parametrize(
    ("question", "article"),
    [
        ("I forgot my password, how do I get a new one?", "reset-password"),
        ("my lamp arrived broken and I want my money back", "refunds"),
        ("how do I stop getting your newsletter emails", "newsletter"),
        ("when is your support team available?", "contact-us"),
    ],
)
async def test_citations_are_the_answering_articles(
    grounder: Grounder, question: str, article: str
) -> None:
    grounding = await grounder.ground(question)
    assert grounding.citations, question
    assert grounding.citations[0].id == article
    used = {hit.article_id for hit in grounding.hits}
    assert {c.id for c in grounding.citations} <= used
    assert len({c.id for c in grounding.citations}) == len(grounding.citations)


@pytest.mark.parametrize(
    "question",
    [
        "what will the weather be like in Paris tomorrow?",
        "how much ibuprofen can I take for a headache",
        "who won the football world cup in 1998",
    ],
)
async def test_off_topic_question_is_no_answer(grounder: Grounder, question: str) -> None:
    grounding = await grounder.ground(question)
    assert grounding.no_answer
    assert grounding.system_prompt == ""
    assert grounding.citations == ()


@pytest.mark.parametrize(
    "greeting",
    [
        "hi", "Thank you so much!", "ok, got it", "can you help me?",
        # issue #8: these were handed to a person
        "thanks", "thank you so much!", "ok bye", "great, that worked", "hello", "hi there",
        "\N{THUMBS UP SIGN}", "Thanks, that helps a lot!", "Thanks for sorting this out so fast.",
        "Perfect, I appreciate the quick answer.", "you've been super helpful",
    ],
)
async def test_small_talk_is_answered_briefly_not_handed_off(
    grounder: Grounder, greeting: str
) -> None:
    grounding = await grounder.ground(greeting)
    assert grounding.small_talk and not grounding.no_answer
    assert grounding.citations == ()
    assert grounding.system_prompt == f"{BASE}\n\n{SMALL_TALK_INSTRUCTION}"


@pytest.mark.parametrize(
    "text", ["hi, where is my order?", "thanks, and how do I cancel?", "you're useless", "weather"]
)
def test_a_question_or_complaint_is_not_small_talk(text: str) -> None:
    assert not is_small_talk(text)


@pytest.mark.parametrize(
    "closing", ["Thanks, that helps a lot!", "Perfect, I appreciate the quick answer."]
)
async def test_a_closing_after_a_topic_is_still_small_talk(
    grounder: Grounder, closing: str
) -> None:
    # The earlier turns pull the closing towards the delivery article; the message itself
    # matches none, so it gets the brief answer, not passages and citations.
    grounding = await grounder.ground(closing, ["how many days does delivery take?"])
    assert grounding.small_talk and grounding.citations == ()


@pytest.mark.parametrize(
    "question",
    [
        "translate 'good morning' into Japanese",
        "how do I say thank you in Spanish",
        "tell me a joke about cats",
        "what is the meaning of life",
        "great, and what will the weather be like in Paris tomorrow?",
    ],
)
async def test_out_of_scope_questions_that_sound_friendly_are_still_handed_off(
    grounder: Grounder, question: str
) -> None:
    grounding = await grounder.ground(question)
    assert grounding.no_answer and not grounding.small_talk


@pytest.mark.parametrize(
    ("question", "article"),
    [("hi, how many days does delivery take?", "delivery-times"),
     ("thanks! and how do I stop the newsletter?", "newsletter")],
)
async def test_a_greeting_around_a_real_question_gets_a_grounded_answer(
    grounder: Grounder, question: str, article: str
) -> None:
    grounding = await grounder.ground(question)
    assert not grounding.small_talk and not grounding.no_answer
    assert grounding.citations[0].id == article


def test_small_talk_exemplars_come_from_the_knowledge_folder_or_the_shipped_file(
    tmp_path: Path,
) -> None:
    shipped = SmallTalkDetector.for_knowledge(FIXTURES)  # the fixture base has none
    assert shipped.exemplars == load_small_talk(SHIPPED_SMALL_TALK)
    assert len(shipped.exemplars) >= 40
    own = tmp_path / "kb"
    own.mkdir()
    (own / "small_talk.toml").write_text('exemplars = ["moin", "servus"]\n')
    assert SmallTalkDetector.for_knowledge(own).exemplars == ("moin", "servus")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("exemplars = [\n", "not valid TOML"),
        ("words = ['hi']\n", "missing the list 'exemplars'"),
        ('exemplars = ["hi", 3]\n', "exemplars item 2 must be a non-empty string"),
    ],
)
def test_a_bad_small_talk_file_names_itself(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "small_talk.toml"
    path.write_text(text)
    with pytest.raises(KnowledgeError, match=re.escape(f"{path}: {message}")):
        load_small_talk(path)


def test_the_evaluation_small_talk_list_is_not_the_exemplars() -> None:
    questions = SHIPPED_SMALL_TALK.parent / "eval_questions.toml"
    written = tomllib.loads(questions.read_text(encoding="utf-8"))["small_talk"]
    assert len(written) >= 40

    def normal(texts: list[str] | tuple[str, ...]) -> set[str]:
        return {" ".join(t.lower().split()) for t in texts}

    assert not normal(written) & normal(load_small_talk(SHIPPED_SMALL_TALK))


def test_no_answer_text_says_it_does_not_know_and_offers_a_person() -> None:
    assert "don't know" in NO_ANSWER_TEXT
    assert "person" in NO_ANSWER_TEXT
    assert "{" not in NO_ANSWER_TEXT


async def test_empty_knowledge_base_hands_off(minilm: MiniLMEncoder, tmp_path: Path) -> None:
    empty = tmp_path / "kb"
    empty.mkdir()
    grounder = Grounder(Retriever(empty, tmp_path / "cache", encoder=minilm), BASE)
    grounding = await grounder.ground("how do I get a refund?")
    assert grounding.no_answer and grounding.citations == ()


async def test_recent_turns_ground_a_follow_up_and_give_the_order_number(
    grounder: Grounder,
) -> None:
    turns = ["My blender arrived broken, I want a refund to my card", "order number is 4471-XZ"]
    grounding = await grounder.ground("and how long does that take?", turns)
    assert grounding.citations[0].id == "refunds"
    assert grounding.context[ORDER_NUMBER] == "4471-XZ"


async def test_configured_facts_are_in_the_context_and_the_customer_wins(
    retriever: Retriever,
) -> None:
    grounder = Grounder(retriever, BASE, known={"website_url": "https://shop.example.com",
                                                ORDER_NUMBER: "stale"}, reload_interval_s=0)
    grounding = await grounder.ground("refund for order 55512 please")
    assert grounding.context["website_url"] == "https://shop.example.com"
    assert grounding.context[ORDER_NUMBER] == "55512"
    assert (await grounder.ground("what is the weather")).context["website_url"]


async def test_passages_are_cut_to_the_context_budget(retriever: Retriever) -> None:
    grounder = Grounder(retriever, BASE, k=3, max_context_chars=10, reload_interval_s=0)
    grounding = await grounder.ground("how do I get my money back for a damaged item?")
    assert len(grounding.hits) == 1  # the best passage always fits, nothing more
    assert grounding.hits[0].text in grounding.system_prompt


def test_select_hits_keeps_the_best_and_skips_what_does_not_fit() -> None:
    hits = [Hit(f"a{i}", "T", "/u", "", "x" * size, 0.9 - i / 10)
            for i, size in enumerate((100, 500, 50))]
    assert [h.article_id for h in select_hits(hits, 200)] == ["a0", "a2"]
    assert [h.article_id for h in select_hits(hits, 10)] == ["a0"]


async def test_changed_articles_are_picked_up_and_a_broken_one_keeps_the_index(
    minilm: MiniLMEncoder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kb = tmp_path / "kb"
    shutil.copytree(FIXTURES, kb)
    grounder = Grounder(Retriever(kb, tmp_path / "cache", encoder=minilm), BASE,
                        reload_interval_s=1e-6)
    question = "can I buy a gift card for my sister?"
    assert (await grounder.ground(question)).no_answer
    (kb / "gift-cards.md").write_text(
        '+++\nid = "gift-cards"\ntitle = "Gift cards"\ntags = ["gift card", "present"]\n'
        'url = "https://help.example.com/gift-cards"\n+++\n\n'
        "Gift cards can be bought on our website for any amount from 10 to 500 euros. They "
        "are sent by email and never expire.\n"
    )
    grounding = await grounder.ground(question)
    assert grounding.citations[0].id == "gift-cards"

    (kb / "broken.md").write_text("no front matter here\n")
    with caplog.at_level(logging.ERROR, logger="core.grounding"):
        grounding = await grounder.ground(question)
    assert grounding.citations[0].id == "gift-cards"
    assert "broken.md" in caplog.text


def test_ids_are_left_out_of_the_retrieval_query() -> None:
    assert retrieval_query("cancel order 113542617735902 now") == "cancel order now"
    assert retrieval_query("order #A1234-77 never arrived") == "order never arrived"
    assert retrieval_query("iPhone 15, 144 euros") == "iPhone 15, 144 euros"
    assert retrieval_query("12345") == "12345"


async def test_an_order_number_in_the_question_does_not_stop_grounding(
    grounder: Grounder,
) -> None:
    grounding = await grounder.ground("refund for order 113542617735902, the lamp is broken")
    assert grounding.citations[0].id == "refunds"
    assert grounding.context[ORDER_NUMBER] == "113542617735902"


# -- what the customer told us -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("turn", "expected"),
    [
        ("my order number is 113542617735902", {"order_number": "113542617735902"}),
        ("Order #A1234-77 never arrived", {"order_number": "A1234-77"}),
        ("purchase id: 00004587345", {"order_number": "00004587345"}),
        ("where is my order from last week?", {}),
        ("I ordered 2 shirts", {}),
        ("invoice no. INV-20231 is wrong", {"invoice_number": "INV-20231"}),
        ("tracking number 1Z999AA10123456784", {"tracking_number": "1Z999AA10123456784"}),
        ("hi, my name is Anna", {"customer_name": "Anna"}),
    ],
)
def test_extract_context_finds_what_the_customer_wrote(turn: str, expected: dict) -> None:
    assert extract_context([turn]) == expected


def test_extract_context_latest_mention_wins() -> None:
    turns = ["order 12345 is late", "sorry, I meant order number 67890"]
    assert extract_context(turns)[ORDER_NUMBER] == "67890"


# -- placeholders --------------------------------------------------------------------------------

KNOWN = {
    "order_number": "4471-XZ",
    "support_phone": "+1 555 0100",
    "website_url": "https://shop.example.com",
    "company_name": "ShopCo",
    "customer_name": "Anna",
}


@pytest.mark.parametrize(
    ("text", "context", "expected"),
    [
        ("Your order {{Order Number}} is on its way.", KNOWN,
         "Your order 4471-XZ is on its way."),
        ("Please share your {{Order Number}}.", KNOWN,
         "Please share your order number 4471-XZ."),
        ("Call us at {{Customer Support Phone Number}}.", KNOWN, "Call us at +1 555 0100."),
        ("Visit our website at {{Website URL}}.", KNOWN,
         "Visit our website at https://shop.example.com."),
        ("At {{Company Name}}, we care.", KNOWN, "At ShopCo, we care."),
        ("No worries, {{Name Field Anonymized}}, I'm here.", KNOWN, "No worries, Anna, I'm here."),
        ("It's order number {{Purchase ID Anonymized}}. Okay", {}, "It's your order. Okay"),
        ("Please share your {{Order Number}}.", {}, "Please share your order number."),
        ("Look for the order with the number {{Order Number Anonymized}}.", {},
         "Look for the order with your order number."),
        ("You can call our {{Customer Support Phone Number}} or use the {{Live Chat}}.", {},
         "You can call our customer support line or use the live chat."),
        ("Visit our website at {{Website URL}}.", {}, "Visit our website."),
        ("1. Go to our {{Website Name}}. 2. Open {{Order History}}.", {},
         "1. Go to our website. 2. Open Order History."),
        ("{{Website Name}} is open all night.", {}, "Our website is open all night."),
        ("At {{Company Name}}, we care.", {}, "At our store, we care."),
        ("They are available {{Customer Support Hours}}.", {},
         "They are available during our opening hours."),
        ("Our team works during {{Customer Support Hours}}.", {},
         "Our team works during our opening hours."),
        ("No worries, {{Name Field Anonymized}}, I'm here. Hi {{Customer Name}}!", {},
         "No worries, I'm here. Hi!"),
        ("Date of purchase: {{Purchase Date Anonymized}}", {},
         "Date of purchase: your purchase date"),
        ("Cancel order {{113542617735902}} now.", {}, "Cancel order 113542617735902 now."),
        ("Refunds take {{number of days}} days.", {}, "Refunds take several days."),
        ("Odd {Order Number} and {{Order Number} and {{}} here.", {},
         "Odd your order number and your order number and here."),
        ("Stray } braces { here", {}, "Stray  braces here"),
        ("Cut off at the end: {{Order Num", {}, "Cut off at the end: Order Num"),
    ],
)
def test_fill_placeholders(text: str, context: dict, expected: str) -> None:
    assert fill_placeholders(text, context) == expected


def test_placeholder_name_in_context_is_used_as_is() -> None:
    text = "Use the {{Refund Form}} on {{Website Name}}."
    context = {"Refund Form": "refund form", "website_name": "ShopCo"}
    assert fill_placeholders(text, context) == "Use the refund form on ShopCo."


def test_values_cannot_smuggle_braces_in() -> None:
    assert fill_placeholders("Order {{Order Number}}", {"order_number": "{{x}}"}) == "Order x"


# -- streaming ------------------------------------------------------------------------------------

BITEXT_STYLE = [
    "I understand how unnerving it can be to cancel order number {{Purchase ID Anonymized}}. "
    "Here's a quick guide:\n\n1. Log in to our {{Website Name}} account.\n2. Go to the "
    "{{Order History}} section.\n3. Find the order with the number {{Order Number Anonymized}}."
    "\n\nIf you need help, call {{Customer Support Phone Number}} or use the {{Live Chat}} on "
    "our website at {{Website URL}}. We're available {{Customer Support Hours}}.",
    "No worries, {{Name Field Anonymized}}, I'm here to help! At {{Company Name}}, refunds take "
    "{{number of days}} days. - Order number: {{Order Number Anonymized}} - Date of purchase: "
    "{{Purchase Date Anonymized}}\nPlease provide your {{Order Number}} or {{tracking number}}.",
    "Odd model output: {Order Number}, {{Order Number}, {{}}, a } stray and { another, "
    "order #{{Order Number}} and {{113542617735902}} then cut {{Website",
    "Plain text without any placeholder at all, just words and numbers 42.",
]


def _stream(text: str, cuts: list[int], context: dict) -> list[str]:
    flt = StreamingPlaceholderFilter(context)
    bounds = [0, *cuts, len(text)]
    out = [flt.feed(text[a:b]) for a, b in pairwise(bounds)]
    out.append(flt.flush())
    return out


@pytest.mark.parametrize("context", [{}, KNOWN])
def test_stream_never_shows_braces_and_matches_the_whole_text(context: dict) -> None:
    rng = random.Random(8)
    for text in BITEXT_STYLE:
        whole = fill_placeholders(text, context)
        assert "{" not in whole and "}" not in whole
        for _ in range(300):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(40, len(text) - 1))))
            pieces = _stream(text, cuts, context)
            shown = ""
            for piece in pieces:
                shown += piece
                assert "{" not in shown and "}" not in shown
            assert shown == whole, (text, cuts)


def test_stream_token_by_token_matches_the_whole_text() -> None:
    for text in BITEXT_STYLE:
        tokens = [text[i : i + 3] for i in range(0, len(text), 3)]
        assert "".join(_stream(text, [3 * i for i in range(1, len(tokens))], {})) == (
            fill_placeholders(text, {})
        )


def test_stream_shows_plain_text_promptly_and_holds_only_a_placeholder() -> None:
    flt = StreamingPlaceholderFilter({})
    shown = flt.feed("Thanks for waiting. Your parcel left ")
    assert shown.startswith("Thanks for waiting. Your parcel")
    shown += flt.feed("today. Call {{Customer Support")
    assert shown.endswith("today. ")  # the unfinished placeholder is held back
    shown += flt.feed(" Phone Number}} for more. Bye now")
    assert "Call our customer support line for more." in shown
    shown += flt.flush()
    assert shown.endswith("Bye now")


def test_stream_absorbs_a_lead_in_that_arrived_before_its_placeholder() -> None:
    flt = StreamingPlaceholderFilter({})
    shown = flt.feed("Let me check order number ")
    shown += flt.feed("{{Order Number}} for you.")
    shown += flt.flush()
    assert shown == "Let me check your order for you."


# -- eval grounding ----------------------------------------------------------------------------

QUESTIONS = """out_of_scope = [
    "what will the weather be like in Paris tomorrow?",
    "who won the football world cup in 1998",
    "how much ibuprofen can I take for a headache",
    "what is the capital of Australia",
]
small_talk = ["hello there", "thanks a lot!"]

[[in_scope]]
q = "how do I get a refund for a broken lamp"
articles = ["refunds"]

[[in_scope]]
q = "I forgot my password"
articles = ["reset-password"]

[[in_scope]]
q = "how long does delivery take"
articles = ["delivery-times"]
"""


def _eval_args(tmp_path: Path, **overrides: str) -> argparse.Namespace:
    questions = tmp_path / "questions.toml"
    if not questions.exists():
        questions.write_text(QUESTIONS)
    parser = argparse.ArgumentParser()
    eval_grounding.configure(parser)
    argv = [
        "--knowledge", str(FIXTURES), "--questions", str(questions),
        "--data", str(FIXTURES / "requests.csv"), "--per-intent", "2",
        "--cache-dir", str(tmp_path / "cache"), "--threshold", "0.35", "-k", "3",
    ]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return parser.parse_args(argv)


def _row(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(label))
    return line[len(label):].split()


def test_eval_grounding_prints_grounded_and_handed_off_shares(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert eval_grounding.run(_eval_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "Grounding at threshold 0.35, k = 3" in out
    written = _row(out, "in scope (written)")
    assert written[0] == "3" and float(written[2]) == 1.0  # every written question cites right
    bitext = _row(out, "in scope (Bitext sample)")
    assert bitext[0] == "10"
    assert 0.0 <= float(bitext[3]) <= float(bitext[2]) <= float(bitext[1]) <= 1.0
    # count, answered from passages, -, -, small talk, handed off
    assert _row(out, "small talk (written)") == ["2", "0.000", "-", "-", "1.000", "0.000"]
    off = _row(out, "out of scope (written)")
    assert off[0] == "4" and float(off[-1]) == 1.0
    assert "out-of-scope handed off: 1.000 (goal >= 0.9: met)" in out
    assert "small talk answered without hand-off: 1.000 (goal >= 0.9: met)" in out


def test_eval_grounding_bad_questions_name_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('out_of_scope = ["weather?"]\n\n[[in_scope]]\nq = "refund"\n'
                   'articles = ["refunds"]\n\n[[in_scope]]\nq = "x"\narticles = ["nope"]\n')
    assert eval_grounding.run(_eval_args(tmp_path, questions=str(bad))) == 2
    assert f"{bad}, line 7: unknown article(s): nope" in capsys.readouterr().err

    missing = tmp_path / "missing.toml"
    assert eval_grounding.run(_eval_args(tmp_path, questions=str(missing))) == 2
    assert f"{missing}: question file not found" in capsys.readouterr().err

    bad.write_text('[[in_scope]]\nq = "refund"\narticles = ["refunds"]\n')
    assert eval_grounding.run(_eval_args(tmp_path, questions=str(bad))) == 2
    assert "missing the list 'out_of_scope'" in capsys.readouterr().err


def test_eval_grounding_missing_data_names_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.csv"
    assert eval_grounding.run(_eval_args(tmp_path, data=str(missing))) == 2
    assert f"{missing}: data file not found" in capsys.readouterr().err
