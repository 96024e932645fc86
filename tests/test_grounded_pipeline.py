"""Grounding inside the pipeline: citations on the reply, placeholders never shown raw,
and "I don't know" plus a person when the knowledge base has nothing.

The generator here is scripted (it must emit exact placeholders); everything else is
real: the store, the MiniLM sentiment classifier, the retriever and the grounder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from bots.service import build_grounder, build_recommender, open_retriever
from core.channels import CustomerChannel, ReplyStream
from core.generation import ChatMessage, GenerationParams
from core.grounding import NO_ANSWER_TEXT, NO_ANSWER_UNHAPPY_TEXT, SMALL_TALK_INSTRUCTION
from core.messages import Inbound, Reply, User
from core.pipeline import UNHAPPY_NEGATIVE, Pipeline
from core.sentiment import build_classifier
from core.store import SQLiteStore
from tests.conftest import REPO, make_settings, wait_for


class ScriptedGenerator:
    """Streams a fixed answer three characters at a time and records the prompts."""

    saturated = False

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.prompts: list[Sequence[ChatMessage]] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1

    async def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[str]:
        self.prompts.append(messages)
        for i in range(0, len(self.answer), 3):
            yield self.answer[i : i + 3]


class Recorder(CustomerChannel):
    platform = "test"

    def __init__(self) -> None:
        self.updates: list[str] = []
        self.replies: list[Reply] = []

    def open_reply(self, conversation_key: str) -> ReplyStream:
        recorder = self

        class Stream(ReplyStream):
            async def begin(self) -> None: ...

            async def update(self, text_so_far: str) -> None:
                recorder.updates.append(text_so_far)

            async def finish(self, reply: Reply) -> str:
                recorder.replies.append(reply)
                return f"r{len(recorder.replies)}"

            async def abort(self) -> None: ...

        return Stream()

    async def deliver(self, conversation_key: str, reply: Reply) -> str:
        self.replies.append(reply)
        return f"d{len(self.replies)}"


@pytest.fixture
async def grounded(tmp_path: Path):
    async def build(answer: str, knowledge: Path = REPO / "knowledge", recommend: bool = False):
        settings = make_settings(tmp_path, recommender={"knowledge_dir": str(knowledge),
                                                        "enabled": recommend})
        store = SQLiteStore(settings.store.path)
        await store.open()
        classifier = build_classifier("minilm", "", "", 16, 1)
        await classifier.start()
        generator = ScriptedGenerator(answer)
        retriever = await open_retriever(settings)
        recommender = await build_recommender(settings, store, retriever) if recommend else None
        pipeline = Pipeline(settings, store, classifier, generator, recommender,
                            build_grounder(settings, retriever))
        recorder = Recorder()
        pipeline.attach(recorder)
        opened.append((store, classifier, recommender))
        return pipeline, recorder, generator

    opened: list = []
    yield build
    for store, classifier, recommender in opened:
        close = getattr(recommender, "close", None)
        if close is not None:
            await close()
        await classifier.close()
        await store.close()


def inbound(text: str, n: int) -> Inbound:
    return Inbound("test", "c1", User("test", "u1"), f"m{n}", text)


async def test_reply_cites_articles_and_never_shows_placeholders(grounded) -> None:
    pipeline, recorder, generator = await grounded(
        "Your order {{Order Number}} can be tracked on {{Website URL}}. Call {{Customer "
        "Support Phone Number}} if it is late."
    )
    await pipeline.submit(inbound("My order number is 55123, how do I track my order?", 1))
    await wait_for(lambda: recorder.replies)
    reply = recorder.replies[0]
    assert reply.citations, "a grounded reply names its sources"
    system = generator.prompts[0][0].content
    assert any(f"[{c.id}]" in system for c in reply.citations)
    for text in [*recorder.updates, reply.text]:
        assert "{" not in text and "}" not in text, text
    assert "55123" in reply.text


async def test_off_topic_question_gets_i_dont_know_and_a_person(grounded) -> None:
    pipeline, recorder, generator = await grounded("The weather will be sunny.")
    await pipeline.submit(inbound("What's the weather forecast for Paris tomorrow?", 1))
    await wait_for(lambda: recorder.replies)
    assert recorder.replies[0].text == NO_ANSWER_TEXT
    assert generator.prompts == [], "nothing is generated without knowledge to ground it"
    tickets = await pipeline.store.query("SELECT reason FROM tickets")
    assert tickets == [{"reason": "no_answer"}]


async def test_empty_knowledge_base_hands_off(grounded, tmp_path: Path) -> None:
    empty = tmp_path / "empty-kb"
    empty.mkdir()
    pipeline, recorder, generator = await grounded("Refunds take 3 days.", empty)
    await pipeline.submit(inbound("How long does a refund take?", 1))
    await wait_for(lambda: recorder.replies)
    assert generator.prompts == []
    # The airline-trained head reads refund questions as unhappy: then the hand-off opens
    # with an apology.
    rows = await pipeline.store.query("SELECT p_negative FROM messages WHERE direction = 'in'")
    unhappy = rows[0]["p_negative"] >= UNHAPPY_NEGATIVE
    assert recorder.replies[0].text == (NO_ANSWER_UNHAPPY_TEXT if unhappy else NO_ANSWER_TEXT)


async def test_thanks_and_goodbye_get_a_short_reply_and_no_hand_off(grounded) -> None:
    pipeline, recorder, generator = await grounded("You're welcome! Anything else?")
    closings = ["Thanks, that helps a lot!", "ok bye", "\N{THUMBS UP SIGN}"]
    for n, text in enumerate(closings, 1):
        await pipeline.submit(inbound(text, n))
        await wait_for(lambda n=n: len(recorder.replies) >= n)
    assert [r.text for r in recorder.replies] == ["You're welcome! Anything else?"] * 3
    assert all(r.citations == () for r in recorder.replies)
    assert all(SMALL_TALK_INSTRUCTION in prompt[0].content for prompt in generator.prompts)
    assert await pipeline.store.query("SELECT reason FROM tickets") == []


async def test_a_thank_you_gets_no_help_articles_but_a_question_does(grounded) -> None:
    pipeline, recorder, _ = await grounded("Happy to help.", recommend=True)
    await pipeline.submit(inbound("How long does a refund take?", 1))
    await wait_for(lambda: len(recorder.replies) >= 1)
    await pipeline.submit(inbound("Thanks, that helps a lot!", 2))
    await wait_for(lambda: len(recorder.replies) >= 2)
    question, thanks = recorder.replies
    assert question.suggestions, "a real question should come with help articles"
    assert thanks.suggestions == ()
