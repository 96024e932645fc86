"""What a customer is shown, inside the real pipeline: only checked sentences of a generated
answer, the help centre's own words when too little survives, a courtesy reply to praise and
complaints, "I don't know" only for real questions the knowledge base cannot answer, and an
escalation at once on a strong signal.

The generator is scripted (the test chooses what the model "writes"); everything else is
real: SQLite, MiniLM sentiment, the retriever and grounder, the act classifier and the
faithfulness check.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bots.service import build_answer_checks, build_grounder, open_retriever
from core import courtesy, metrics
from core.answers import EXTRACTIVE_INTRO, Extract
from core.grounding import NO_ANSWER_TEXT, NO_ANSWER_UNHAPPY_TEXT
from core.messages import Inbound, User
from core.pipeline import Pipeline
from core.retrieval import Hit
from core.sentiment import build_classifier
from core.store import SQLiteStore
from tests.conftest import make_settings, wait_for
from tests.fakes.chat_driver import ScriptedGenerator
from tests.test_grounded_pipeline import Recorder

RESET = "How do I reset my password?"
FAITHFUL = ("Nobody at our store can see or send you your current password, but we can set "
            "a new one for you. Once we have checked your details we generate a new password "
            "and share it with you in the chat.")
INVENTED = ("1. Open your web browser. 2. Click on the Settings option in your browser's "
            "menu bar. 3. We will give you a complimentary upgrade for the trouble.")


def _claims(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "supportbot_claims_total", {"outcome": outcome}) or 0.0


@pytest.fixture
async def bot(tmp_path: Path):
    """``build(answer, **answers)``: a pipeline whose model always writes ``answer``."""
    opened: list = []

    async def build(answer: str, *, delay_s: float = 0.0, **answers: object):
        settings = make_settings(tmp_path, recommender={"enabled": False}, answers=answers)
        store = SQLiteStore(settings.store.path)
        await store.open()
        classifier = build_classifier("minilm", "", "", 16, 1)
        await classifier.start()
        generator = ScriptedGenerator(lambda _q: answer, delay_s=delay_s)
        retriever = await open_retriever(settings)
        acts, checker = build_answer_checks(settings, retriever)
        pipeline = Pipeline(settings, store, classifier, generator, None,
                            build_grounder(settings, retriever), acts=acts, checker=checker)
        recorder = Recorder()
        pipeline.attach(recorder)
        opened.append((store, classifier))
        return pipeline, recorder, generator

    yield build
    for store, classifier in opened:
        await classifier.close()
        await store.close()


def said(text: str, n: int = 1, conversation: str = "c1") -> Inbound:
    return Inbound("test", conversation, User("test", f"u-{conversation}"), f"m{n}", text)


async def _reply_row(pipeline: Pipeline) -> dict:
    rows = await pipeline.store.query(
        "SELECT text, payload FROM messages WHERE direction = 'out' AND sender = 'bot' "
        "AND status = 'sent' ORDER BY id DESC LIMIT 1")
    return rows[0]


async def test_only_supported_sentences_reach_the_customer(bot) -> None:
    pipeline, recorder, _ = await bot(f"{FAITHFUL} {INVENTED}", max_sentences=6)
    dropped_before = _claims("dropped")
    await pipeline.submit(said(RESET))
    await wait_for(lambda: recorder.replies, timeout=60)
    reply = recorder.replies[0]
    for seen in [*recorder.updates, reply.text]:
        assert "browser" not in seen and "Settings" not in seen and "upgrade" not in seen
    assert "generate a new password" in reply.text
    assert not reply.text.startswith(EXTRACTIVE_INTRO.split("{")[0])
    assert [c.id for c in reply.citations] == ["reset-password"]
    record = json.loads((await _reply_row(pipeline))["payload"])["answer"]
    assert record["extractive"] is False and record["dropped"] >= 2
    assert _claims("dropped") - dropped_before == record["dropped"]
    # Operators see what was withheld, marked as such; the customer's transcript does not.
    convo = (await pipeline.store.query("SELECT id FROM conversations"))[0]["id"]
    lines = await pipeline.store.transcript(convo)
    bot_line = [ln for ln in lines if ln.direction == "out"][-1]
    assert bot_line.text == reply.text
    assert any("browser" in w for w in bot_line.withheld)
    assert any("upgrade" in w for w in bot_line.withheld)


async def test_too_little_supported_answers_from_the_help_centre_with_its_citation(bot) -> None:
    pipeline, recorder, _ = await bot(INVENTED)
    await pipeline.submit(said(RESET))
    await wait_for(lambda: recorder.replies, timeout=60)
    reply = recorder.replies[0]
    assert reply.text.startswith(
        "Here is what our help centre says about resetting a forgotten password:")
    assert "browser" not in reply.text and "upgrade" not in reply.text
    assert "password" in reply.text.split(":", 1)[1]
    assert [c.id for c in reply.citations] == ["reset-password"]
    record = json.loads((await _reply_row(pipeline))["payload"])["answer"]
    assert record["extractive"] is True and record["extractive_reason"] == "too_little_supported"
    assert record["supported"] == 0 and record["dropped"] >= 3


async def test_a_slow_model_is_not_waited_for(bot) -> None:
    """``auto``: no checked sentence within ``first_text_s`` and the help centre answers."""
    pipeline, recorder, _ = await bot(FAITHFUL, delay_s=0.5, first_text_s=0.6, mode="auto")
    await pipeline.submit(said(RESET))
    await wait_for(lambda: recorder.replies, timeout=60)
    assert recorder.replies[0].text.startswith("Here is what our help centre says about")
    record = json.loads((await _reply_row(pipeline))["payload"])["answer"]
    assert record["extractive_reason"] == "no_text_in_time"


async def test_a_busy_one_slot_model_is_not_queued_behind(bot) -> None:
    """``auto``: while the model writes for another conversation, the help centre answers."""
    pipeline, recorder, generator = await bot(FAITHFUL, mode="auto", quote_at=2.0)
    generator.saturated = True
    await pipeline.submit(said(RESET))
    await wait_for(lambda: recorder.replies, timeout=60)
    assert recorder.replies[0].text.startswith("Here is what our help centre says about")
    assert generator.calls == 0
    record = json.loads((await _reply_row(pipeline))["payload"])["answer"]
    assert record["extractive_reason"] == "model_busy"


async def test_the_budget_does_not_wait_for_the_model_to_stop(bot) -> None:
    """A model step that cannot be interrupted (a long prefill) keeps running after the
    budget: the customer's quote is sent at the budget, not when the step ends."""
    pipeline, recorder, generator = await bot(FAITHFUL, mode="auto", quote_at=2.0,
                                              first_text_s=0.5)

    async def stuck(_text: str):
        await asyncio.shield(asyncio.sleep(4.0))  # like the embedded model's prefill
        yield "too late."

    generator._stream = stuck  # type: ignore[method-assign]
    started = asyncio.get_running_loop().time()
    await pipeline.submit(said(RESET))
    await wait_for(lambda: recorder.replies, timeout=60)
    assert asyncio.get_running_loop().time() - started < 3.0
    assert recorder.replies[0].text.startswith("Here is what our help centre says about")


async def test_extract_mode_never_calls_the_model(bot) -> None:
    pipeline, recorder, generator = await bot(INVENTED, mode="extract")
    await pipeline.submit(said(RESET))
    await wait_for(lambda: recorder.replies, timeout=60)
    assert generator.calls == 0
    assert recorder.replies[0].text.startswith("Here is what our help centre says about")


@pytest.mark.parametrize("text", [
    "Thank you for helping me make my flight. I was late and you were great!",
    "Flew from CLT to JFK this a.m. Great service and quick flight! Thank you!",
])
async def test_praise_is_acknowledged_not_handed_off(bot, text: str) -> None:
    pipeline, recorder, generator = await bot(INVENTED)
    await pipeline.submit(said(text))
    await wait_for(lambda: recorder.replies, timeout=60)
    reply = recorder.replies[0].text
    assert reply != NO_ANSWER_TEXT and "don't know" not in reply
    assert "thank" in reply.lower()
    assert generator.calls == 0
    assert await pipeline.store.query("SELECT id FROM tickets") == []
    status = await pipeline.store.query("SELECT status FROM messages WHERE direction = 'in'")
    assert status[0]["status"] == "acknowledged"


async def test_a_complaint_gets_an_apology_in_its_own_words(bot) -> None:
    pipeline, recorder, generator = await bot(INVENTED)
    await pipeline.submit(said("my flight got delayed twice today"))
    await wait_for(lambda: recorder.replies, timeout=60)
    reply = recorder.replies[0].text
    assert "sorry" in reply.lower() and "delayed" in reply
    assert generator.calls == 0
    assert "upgrade" not in reply and "refund" not in reply.lower()


async def test_a_complaint_that_also_praises_is_thanked_not_apologised_to(bot) -> None:
    pipeline, recorder, generator = await bot(INVENTED)
    text = ("After the delay and two gate changes, the gate agent was outstanding and got us "
            "rebooked")
    await pipeline.submit(said(text))
    await wait_for(lambda: recorder.replies, timeout=60)
    reply = recorder.replies[0].text
    assert reply == courtesy.acknowledge(text), reply
    assert generator.calls == 0
    assert await pipeline.store.query("SELECT id FROM tickets") == []


async def test_an_unanswerable_question_is_handed_off(bot) -> None:
    pipeline, recorder, generator = await bot(INVENTED)
    await pipeline.submit(said("what would it cost in miles to waitlist for Delta One to CDG?"))
    await wait_for(lambda: recorder.replies, timeout=60)
    assert recorder.replies[0].text == NO_ANSWER_TEXT
    tickets = await pipeline.store.query("SELECT reason FROM tickets")
    assert [t["reason"] for t in tickets] == ["no_answer"]
    assert generator.calls == 0


async def test_an_unhappy_customer_s_unanswerable_question_gets_an_apology_first(bot) -> None:
    pipeline, recorder, generator = await bot(INVENTED)
    await pipeline.submit(said("Why is my flight to Denver still stuck at the gate?"))
    await wait_for(lambda: recorder.replies, timeout=60)
    assert recorder.replies[0].text == NO_ANSWER_UNHAPPY_TEXT
    assert "don't know the answer" not in recorder.replies[0].text
    tickets = await pipeline.store.query("SELECT reason FROM tickets")
    assert [t["reason"] for t in tickets] == ["no_answer"]
    assert generator.calls == 0


async def test_a_question_about_names_the_passage_never_mentions_is_handed_off(bot) -> None:
    """A capitalised common word ("Check in") is not a name the passage knows: a passage
    about delivery slots that mentions "check" but not Denver or Heathrow is no answer to a
    check-in question, however similar its words."""
    pipeline, _, _ = await bot(INVENTED, mode="extract")
    question = ("@AirCo Check in keeps saying unavailable for my 7:15 trip from Denver to "
                "Heathrow on Friday morning")
    passage = "We check whether the delivery time on your order was set wrongly on our side."
    hit = Hit("delivery-slot", "Changing the time of day your order is delivered",
              "https://help.example.com/delivery-slot", "", passage, 0.40)
    close = Extract(passage, (), 0.47)  # above the weak-passage floor, below names_relevance
    assert not pipeline._answerable(question, hit, close)
    assert pipeline._answerable(question, hit, Extract(passage, (), 0.55))


async def test_a_profane_churn_threat_escalates_on_the_first_message(bot) -> None:
    pipeline, recorder, generator = await bot(INVENTED)
    await pipeline.submit(said(
        "What the actual fuck is wrong with you?? I'm about to switch airlines after this "
        "trip!!!! My flight has been delayed 3 times"))
    await wait_for(lambda: recorder.replies, timeout=60)
    tickets = await pipeline.store.query("SELECT reason FROM tickets")
    assert [t["reason"] for t in tickets] in (["profanity"], ["churn_threat"])
    assert generator.calls == 0
    await pipeline.submit(said("fucking awesome crew on my flight today, thanks!", 2, "c2"))
    await wait_for(lambda: len(recorder.replies) == 2, timeout=60)
    assert len(await pipeline.store.query("SELECT id FROM tickets")) == 1
    assert "thank" in recorder.replies[1].text.lower()


async def test_a_sentence_cut_off_by_the_token_limit_is_not_shown(bot) -> None:
    pipeline, recorder, _ = await bot(f"{FAITHFUL} Sign in with it, and choose a password")
    await pipeline.submit(said(RESET))
    await wait_for(lambda: recorder.replies, timeout=60)
    reply = recorder.replies[0].text
    assert "generate a new password" in reply and "choose a password" not in reply
    record = json.loads((await _reply_row(pipeline))["payload"])["answer"]
    assert {"text": "Sign in with it, and choose a password",
            "reason": "cut off mid-sentence"} in record["withheld"]
