"""Telegram, proven over real HTTP: the real python-telegram-bot against a fake Bot API.

The first tests pin down the fake itself (driven by PTB's own ``Bot``), then the
adapter's pure parts, then the whole path: the fake plays customers and operators, the
adapter runs PTB's ``Application`` against it, and the real pipeline (SQLite, the MiniLM
sentiment head, the embedded SmolLM2) answers. Only one test generates with the model;
the others use commands and operator actions, which the core answers without it.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, Message
from telegram.error import BadRequest, InvalidToken, NetworkError, RetryAfter

from adapters.telegram import (
    ChatPacer,
    FloodGate,
    Target,
    TelegramAdapter,
    escape,
    keyboard,
    render,
    split_html_lines,
    split_text,
    utf16_len,
)
from core.config import TelegramSettings
from core.knowledge import load_knowledge
from core.messages import Citation, Reply, Sender, Suggestion
from core.operators import Operator
from core.recommender import SuggestionRequest
from core.sentiment import build_classifier
from tests.conftest import REPO, make_settings
from tests.fakes.chat_driver import NeutralClassifier, ScriptedGenerator
from tests.fakes.telegram_api import FakeTelegram, parse_html
from tests.fakes.telegram_driver import OPERATOR_GROUP, Start, telegram_harnesses, texts

# PTB 22's own RetryAfter.__init__ reads its deprecated int ``retry_after``.
pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")

DANA = 501  # an operator
OLIVER = 502  # a member of the operator group who is not an operator
ANN = 1001


# --- the fake Bot API, driven by PTB's own Bot ------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@pytest.fixture
async def bot(fake: FakeTelegram) -> AsyncIterator[Bot]:
    async with Bot(fake.token, base_url=fake.base_url, base_file_url=fake.base_file_url) as b:
        yield b


async def test_fake_answers_like_the_bot_api(fake: FakeTelegram, bot: Bot) -> None:
    fake.user(ANN, "Ann")
    assert bot.username == "support_test_bot"

    sent = await bot.send_message(ANN, "<b>Order</b> 42 &amp; co", parse_mode="HTML")
    assert sent.text == "Order 42 & co"
    assert [(e.type, e.offset, e.length) for e in sent.entities] == [("bold", 0, 5)]

    with pytest.raises(BadRequest, match=r"(?i)can't parse entities: unsupported start tag"):
        await bot.send_message(ANN, "a <b> is fine but 2 < 3 is not", parse_mode="HTML")
    with pytest.raises(BadRequest, match=r"(?i)can't find end tag"):
        await bot.send_message(ANN, "<b>open", parse_mode="HTML")
    with pytest.raises(BadRequest, match=r"(?i)message is too long"):
        await bot.send_message(ANN, "x" * 4097)
    await bot.send_message(ANN, "😀" * 2048)  # 4096 UTF-16 units: the limit exactly
    with pytest.raises(BadRequest, match=r"(?i)message is too long"):
        await bot.send_message(ANN, "😀" * 2049)
    with pytest.raises(BadRequest, match=r"(?i)chat not found"):
        await bot.send_message(999, "hello?")
    with pytest.raises(BadRequest, match=r"(?i)message is not modified"):
        await bot.edit_message_text("<b>Order</b> 42 &amp; co", chat_id=ANN,
                                    message_id=sent.message_id, parse_mode="HTML")
    with pytest.raises(BadRequest, match=r"(?i)message to edit not found"):
        await bot.edit_message_text("x", chat_id=ANN, message_id=9999)
    with pytest.raises(BadRequest, match=r"(?i)the chat is not a forum"):
        await bot.create_forum_topic(ANN, "topic")
    photo = await bot.send_photo(ANN, "AgACAgIAAxkBAAIB", caption="<i>your</i> box",
                                 parse_mode="HTML")
    assert photo.caption == "your box" and photo.photo
    assert fake.bot_messages(ANN)[-1].kind == "photo"

    fake.inject("sendMessage", 429, retry_after=7)
    with pytest.raises(RetryAfter, match="Retry in 7 seconds"):
        await bot.send_message(ANN, "too fast")
    fake.inject("sendMessage", 502)
    with pytest.raises(NetworkError, match="Bad Gateway"):
        await bot.send_message(ANN, "server trouble")
    assert [c.status for c in fake.calls_to("sendMessage")][-2:] == [429, 502]
    assert fake.calls_to("sendMessage")[-2].response == {
        "ok": False, "error_code": 429, "description": "Too Many Requests: retry after 7",
        "parameters": {"retry_after": 7},
    }

    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{fake.base_url}{fake.token}/sendTelepathy", json={})
        assert resp.status == 404
        assert await resp.json() == {"ok": False, "error_code": 404, "description": "Not Found"}
        resp = await http.post(f"{fake.base_url}0:wrong/getMe")
        assert resp.status == 401
    with pytest.raises(InvalidToken):
        async with Bot("0:wrong", base_url=fake.base_url):
            pass


async def test_fake_long_polling_offsets_and_allowed_updates(fake: FakeTelegram, bot: Bot
                                                             ) -> None:
    ann = fake.user(ANN, "Ann")
    first = fake.send_text(ANN, ann, "/start")
    fake.send_text(ANN, ann, "hello")
    updates = await bot.get_updates(timeout=0)
    assert [u.message.text for u in updates] == ["/start", "hello"]
    assert updates[0].update_id == first["update_id"]
    assert updates[0].message.entities[0].type == "bot_command"
    again = await bot.get_updates(timeout=0)
    assert len(again) == 2, "unconfirmed updates are served again"
    assert await bot.get_updates(offset=updates[-1].update_id + 1, timeout=0) == ()

    # A long poll waits for the next update instead of returning empty.
    loop = asyncio.get_running_loop()
    started = loop.time()
    loop.call_later(0.3, fake.send_text, ANN, ann, "late")
    late = await bot.get_updates(offset=updates[-1].update_id + 1, timeout=5)
    assert [u.message.text for u in late] == ["late"]
    assert 0.25 <= loop.time() - started < 3

    # Reactions are not delivered unless asked for, exactly like Telegram.
    mine = await bot.send_message(ANN, "Here you go")
    fake.react(ANN, ann, mine.message_id, "👍")
    assert len(fake.dropped) == 1
    await bot.get_updates(offset=late[-1].update_id + 1, timeout=0,
                          allowed_updates=["message", "message_reaction"])
    fake.react(ANN, ann, mine.message_id, "🔥", old=["👍"])
    got = await bot.get_updates(offset=late[-1].update_id + 1, timeout=0)
    assert got[-1].message_reaction.new_reaction[0].emoji == "🔥"


async def test_fake_webhook_conflicts_and_info(fake: FakeTelegram, bot: Bot) -> None:
    with pytest.raises(BadRequest, match=r"(?i)https url must be provided"):
        await bot.set_webhook("http://example.com/hook")
    assert await bot.set_webhook("http://127.0.0.1:9/hook", secret_token="s3cret")
    with pytest.raises(Exception, match=r"(?i)can't use getUpdates method while webhook"):
        await bot.get_updates(timeout=0)
    info = await bot.get_webhook_info()
    assert info.url == "http://127.0.0.1:9/hook"
    assert await bot.delete_webhook()
    assert (await bot.get_webhook_info()).url == ""


async def test_fake_validates_buttons_and_callback_answers(fake: FakeTelegram, bot: Bot) -> None:
    ann = fake.user(ANN, "Ann")
    with pytest.raises(BadRequest, match=r"(?i)button_data_invalid"):
        await bot.send_message(ANN, "pick", reply_markup=InlineKeyboardMarkup(
            [[InlineKeyboardButton("A", callback_data="x" * 65)]]))
    sent = await bot.send_message(ANN, "pick", reply_markup=InlineKeyboardMarkup(
        [[InlineKeyboardButton("A", callback_data="s:a")]]))
    press = fake.press_button(ANN, ann, sent.message_id, "s:a")
    query_id = press["callback_query"]["id"]
    assert await bot.answer_callback_query(query_id, text="Opening A")
    with pytest.raises(BadRequest, match=r"(?i)query is too old"):
        await bot.answer_callback_query(query_id)
    # Editing without reply_markup removes the keyboard, as on Telegram.
    await bot.edit_message_text("picked", chat_id=ANN, message_id=sent.message_id)
    assert fake.message(ANN, sent.message_id).buttons == ()


# --- the adapter's pure parts -------------------------------------------------------------------


NASTY = [
    "2 < 3 && 5 > 4",
    "<b>not bold</b> <script>alert(1)</script>",
    "&amp; stays &amp; and &lt;tag&gt; stays too",
    'Quotes " and \' and a <a href="javascript:x">link</a>',
    "emoji 😀👍🏽 and ümlauts",
]


@pytest.mark.parametrize("text", NASTY)
def test_model_output_is_shown_verbatim_never_as_markup(text: str) -> None:
    (html_text,) = render(Reply(text))
    plain, entities = parse_html(html_text)
    assert plain == text
    assert entities == []


def test_split_respects_the_limit_and_word_boundaries() -> None:
    words = [f"word{i}" for i in range(2000)]
    text = " ".join(words)
    pieces = split_text(text, 4096)
    assert len(pieces) == 5  # 16,889 characters
    assert all(utf16_len(p) <= 4096 for p in pieces)
    assert " ".join(pieces).split() == words, "nothing lost, no word cut"

    paragraphs = "\n\n".join("A" * 60 + " " + "b" * 30 for _ in range(100))
    pieces = split_text(paragraphs, 1000)
    assert all(p.endswith("b" * 30) for p in pieces), "cut between paragraphs"

    astral = "😀" * 3000  # 6000 UTF-16 units, no spaces
    pieces = split_text(astral, 4096)
    assert [utf16_len(p) for p in pieces] == [4096, 1904]
    assert "".join(pieces) == astral

    escaped = render(Reply("<" * 5000))
    assert len(escaped) == 2
    assert all(utf16_len(parse_html(p)[0]) <= 4096 for p in escaped)


def test_render_operator_header_citations_and_keyboard() -> None:
    pieces = render(Reply("Refund sent.", Sender.OPERATOR, citations=(
        Citation("refunds", "Refunds & returns", "https://help.example.com/refunds"),)))
    plain, entities = parse_html(pieces[0])
    assert plain == "Support team\nRefund sent.\n\nSources: Refunds & returns"
    assert {"type": "text_link", "offset": plain.index("Refunds"), "length": 17,
            "url": "https://help.example.com/refunds"} in entities

    markup = keyboard([Suggestion("track-order", "Tracking your order"),
                       Suggestion("x" * 80, "Long id", "https://help.example.com/long")])
    assert markup is not None
    buttons = [b for row in markup.inline_keyboard for b in row]
    assert buttons[0].callback_data == "s:track-order"
    assert buttons[1].callback_data is None and buttons[1].url.endswith("/long")

    summary = "\n".join(f"<b>Line {i}:</b> {escape('x' * 100)}" for i in range(100))
    parts = split_html_lines(summary)
    assert len(parts) == 3
    assert all(utf16_len(parse_html(p)[0]) <= 4096 for p in parts)


def test_flood_gate_warns_once_per_window() -> None:
    gate = FloodGate(limit=3, window_s=10)
    assert [gate.hit(7, now=t) for t in (0, 1, 2)] == [False, False, False]
    assert gate.hit(7, now=3) is True
    assert gate.hit(7, now=4) is False, "one warning per window"
    assert gate.hit(8, now=4) is False, "users are counted apart"
    assert gate.hit(7, now=30) is False, "the window slides"


async def test_chat_pacer_spaces_sends_per_chat() -> None:
    pacer = ChatPacer(0.2)
    loop = asyncio.get_running_loop()
    times: list[tuple[int, float]] = []

    async def send(chat: int) -> None:
        await pacer.wait(chat)
        times.append((chat, loop.time()))

    await asyncio.gather(send(1), send(1), send(2), send(1))
    ones = [t for c, t in times if c == 1]
    assert all(b - a >= 0.19 for a, b in itertools.pairwise(ones))
    assert times[1][0] == 2, "another chat is not held up"


def test_operator_topic_is_recognised_after_a_restart() -> None:
    room = TelegramAdapter(TelegramSettings(operator_chat_id=OPERATOR_GROUP), "1:x").operator_room
    assert room is not None
    group = {"id": OPERATOR_GROUP, "type": "supergroup", "title": "Ops", "is_forum": True}
    created = {"message_id": 55, "date": 0, "chat": group, "message_thread_id": 55,
               "forum_topic_created": {"name": "#12 Ann · telegram", "icon_color": 7322096}}
    message = Message.de_json({
        "message_id": 60, "date": 0, "chat": group, "message_thread_id": 55,
        "is_topic_message": True, "reply_to_message": created, "text": "on it",
        "from": {"id": DANA, "is_bot": False, "first_name": "Dana"}}, None)
    assert room.ticket_for(message) == 12
    assert room.topic_of(12) == 55
    general = Message.de_json({"message_id": 61, "date": 0, "chat": group, "text": "hi"}, None)
    assert room.ticket_for(general) is None


def test_conversation_keys_round_trip() -> None:
    assert Target.parse("1001") == Target(1001)
    assert Target.parse("-100555/17") == Target(-100555, 17)
    assert Target(-100555, 17).conversation_key == "-100555/17"
    with pytest.raises(ValueError, match="not a Telegram conversation key"):
        Target.parse("web:abc")


# --- end to end: fake Telegram, the real adapter, the real pipeline -----------------------------


class TagRecommender:
    """Help articles whose tags occur in the message, from the repo's knowledge folder."""

    def __init__(self) -> None:
        self._kb = load_knowledge(REPO / "knowledge")

    async def suggest(self, request: SuggestionRequest, k: int) -> list[Suggestion]:
        text = request.text.lower()
        scored = [(sum(len(t) for t in a.tags if t in text), a) for a in self._kb]
        found = [a for score, a in sorted(scored, key=lambda p: -p[0]) if score]
        return [Suggestion(a.id, a.title, a.url) for a in found[:k]]

    def describe(self, item_id: str) -> Suggestion | None:
        article = self._kb.get(item_id)
        return Suggestion(article.id, article.title, article.url) if article else None


@pytest.fixture(scope="module")
async def models(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Any, Any]]:
    from bots.service import build_generator

    settings = make_settings(tmp_path_factory.mktemp("telegram-models"))
    s = settings.sentiment
    classifier = build_classifier(s.encoder, s.head, s.model, s.max_batch, s.max_wait_ms)
    generator = await build_generator(settings)
    # One model load at a time: transformers' meta-device loading is not thread-safe.
    await generator.start()
    await classifier.start()
    yield generator, classifier
    await generator.close()
    await classifier.close()


@pytest.fixture
async def telegram(models: tuple[Any, Any], tmp_path: Path) -> AsyncIterator[Start]:
    generator, classifier = models
    async with telegram_harnesses(tmp_path, generator, classifier,
                                  operator_ids=(DANA,)) as start:
        yield start


async def test_customer_conversation_streamed_with_suggestions_and_reaction(
        telegram: Start) -> None:
    h = await telegram(recommender=TagRecommender(), operator_chat_id=0)
    fake = h.fake
    ann = fake.user(ANN, "Ann", "ann")
    assert fake.commands, "the bot registers its commands"

    fake.send_text(ANN, ann, "Can you tell me the order status and tracking number please?")
    final = await fake.wait_for(lambda: [m for m in fake.bot_messages(ANN) if m.buttons], 25)
    (message,) = final
    stored = (await h.rows(
        "SELECT text, platform_message_id FROM messages WHERE direction = 'out'"))[0]
    assert message.text == stored["text"] and message.text.strip()
    assert stored["platform_message_id"] == message.key
    assert ("Tracking your order", "s:track-order") in message.buttons

    # Streamed: one message sent, then edited as tokens came, never faster than allowed.
    writes = [c for c in fake.calls if c.method in ("sendMessage", "editMessageText")]
    assert writes[0].method == "sendMessage" and len(writes) >= 2
    assert all(c.method == "editMessageText" for c in writes[1:])
    assert all(b.at - a.at >= 0.18 for a, b in itertools.pairwise(writes))
    typing = [c for c in fake.calls_to("sendChatAction") if c.params["action"] == "typing"]
    assert typing and typing[0].at < writes[0].at, "typing shows before the first text"
    assert all(b.at - a.at >= 0.25 for a, b in itertools.pairwise(typing))

    # A suggestion press is answered and logged; the article link follows.
    press = fake.press_button(ANN, ann, message.message_id, "s:track-order")
    query_id = press["callback_query"]["id"]
    await fake.wait_for(lambda: fake.callback_answer(query_id))
    assert fake.callback_answer(query_id)["text"] == "Tracking your order"
    await fake.wait_for(lambda: any("Tracking your order" in t for t in texts(fake, ANN)[1:]))
    link = fake.bot_messages(ANN)[-1]
    assert link.entities[0]["url"] == "https://help.example.com/track-order"

    # A reaction on the reply is logged as feedback on that message.
    fake.react(ANN, ann, message.message_id, "👍")

    async def logged() -> list[dict[str, Any]]:
        return await h.rows("SELECT type, item_id, value, data FROM events "
                            "WHERE type IN ('suggestion_clicked', 'feedback') ORDER BY id")
    events = await _until(logged, lambda rows: len(rows) == 2)
    assert events[0]["type"] == "suggestion_clicked" and events[0]["item_id"] == "track-order"
    assert events[1]["value"] == "👍" and message.key in events[1]["data"]
    shown = await h.rows("SELECT item_id FROM events WHERE type = 'suggestion_shown'")
    assert {"item_id": "track-order"} in shown


async def _until(fetch: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool],
                 within: float = 10.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await fetch()
        if ok(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {within}s: {value!r}")
        await asyncio.sleep(0.05)


async def test_angry_customer_escalated_to_a_topic_and_served_by_an_operator(
        telegram: Start) -> None:
    # The run-of-negative-messages rule (one is enough here), not the first-message signals.
    h = await telegram(escalation={"negative_hits": 1, "strong_signals": False})
    fake = h.fake
    ann = fake.user(ANN, "Ann", "ann")
    dana = fake.user(DANA, "Dana")
    oliver = fake.user(OLIVER, "Oliver")
    angry = "Worst service ever. I am furious, I want my money back NOW."

    fake.send_text(ANN, ann, angry)
    await fake.wait_for(lambda: fake.topics(OPERATOR_GROUP), 20)
    ((thread, name),) = fake.topics(OPERATOR_GROUP).items()
    assert name.startswith("#1 Ann")
    await fake.wait_for(lambda: texts(fake, OPERATOR_GROUP, thread))
    summary = texts(fake, OPERATOR_GROUP, thread)[0]
    assert "Reason: negative_sentiment" in summary
    assert f"Customer: {angry}" in summary
    assert "Negative sentiment: █" in summary
    assert texts(fake, ANN) == [h.settings.escalation.handoff_text]
    assert not fake.calls_to("editMessageText"), "the bot did not answer an escalated message"

    # An outsider in the operator group can neither answer nor close the ticket.
    fake.send_text(OPERATOR_GROUP, oliver, "/resolve not my job", thread_id=thread)
    fake.send_text(OPERATOR_GROUP, oliver, "hi from Oliver", thread_id=thread)
    await fake.wait_for(lambda: texts(fake, OPERATOR_GROUP, thread).count(
        "Sorry, only operators can act on tickets.") == 2)

    # The operator's words in the topic reach the customer.
    fake.send_text(OPERATOR_GROUP, dana, "Hi Ann, I'm Dana. I've refunded your order.",
                   thread_id=thread)
    await fake.wait_for(lambda: len(texts(fake, ANN)) == 3)
    joined, answer = texts(fake, ANN)[1:]
    assert joined == "Dana from our support team has joined the chat."
    assert answer == "Support team\nHi Ann, I'm Dana. I've refunded your order."
    await fake.wait_for(lambda: "🙋 Claimed by Dana." in texts(fake, OPERATOR_GROUP, thread))

    # The customer's next message goes to the topic, not to the model.
    fake.send_text(ANN, ann, "Thank you so much!")
    await fake.wait_for(
        lambda: "Ann: Thank you so much!" in texts(fake, OPERATOR_GROUP, thread), 10)

    fake.send_text(OPERATOR_GROUP, dana, "/resolve refunded in full", thread_id=thread)
    await fake.wait_for(lambda: any(t.startswith("✅ Resolved by Dana. Note: refunded in full")
                                    for t in texts(fake, OPERATOR_GROUP, thread)))
    await fake.wait_for(lambda: "marked as resolved" in texts(fake, ANN)[-1])
    (ticket,) = await h.rows("SELECT state, claimed_by, note FROM tickets")
    assert ticket == {"state": "resolved", "claimed_by": f"telegram:{DANA}",
                      "note": "refunded in full"}
    assert "Sorry, only operators" not in " ".join(texts(fake, ANN))


async def test_human_command_web_operator_claim_and_hand_back(telegram: Start) -> None:
    h = await telegram()
    fake = h.fake
    ann = fake.user(ANN, "Ann")
    dana = fake.user(DANA, "Dana")
    fake.send_text(OPERATOR_GROUP, dana, "/claim")
    await fake.wait_for(lambda: "Use this command inside a ticket's topic."
                        in texts(fake, OPERATOR_GROUP))

    fake.send_text(ANN, ann, "/human")
    await fake.wait_for(lambda: fake.topics(OPERATOR_GROUP))
    (thread,) = fake.topics(OPERATOR_GROUP)

    # An operator on another platform (the web page) answers at length: split, in order.
    long_answer = " ".join(f"step{i}" for i in range(900))
    await h.pipeline.operators.reply(1, Operator("web", "sam", "Sam"), long_answer)
    await fake.wait_for(lambda: len(texts(fake, ANN)) == 4)
    handoff, joined, first, second = texts(fake, ANN)
    assert handoff == h.settings.escalation.handoff_text
    assert joined == "Sam from our support team has joined the chat."
    assert first.startswith("Support team\nstep0 ") and utf16_len(first) <= 4096
    assert (first.removeprefix("Support team\n") + " " + second).split() == long_answer.split()
    await fake.wait_for(lambda: "🙋 Claimed by web:sam." in texts(fake, OPERATOR_GROUP, thread))

    fake.send_text(OPERATOR_GROUP, dana, "/claim", thread_id=thread)
    await fake.wait_for(lambda: "⚠️ ticket 1 is already claimed by web:sam" in
                        texts(fake, OPERATOR_GROUP, thread))
    fake.send_text(OPERATOR_GROUP, dana, "/bot", thread_id=thread)
    await fake.wait_for(lambda: "back with the assistant" in texts(fake, ANN)[-1])
    await fake.wait_for(lambda: "🤖 Handed back to the bot." in
                        texts(fake, OPERATOR_GROUP, thread))
    fake.send_text(OPERATOR_GROUP, dana, "/resolve", thread_id=thread)
    await fake.wait_for(lambda: "⚠️ ticket 1 is handed_back" in
                        texts(fake, OPERATOR_GROUP, thread))
    assert (await h.rows("SELECT state FROM tickets")) == [{"state": "handed_back"}]


async def test_429_storm_and_5xx_are_survived_in_order(telegram: Start) -> None:
    h = await telegram(operator_chat_id=0, edit_interval_s=0.05)
    fake = h.fake
    ann = fake.user(ANN, "Ann")
    fake.inject("sendMessage", 429, retry_after=1, times=3)
    fake.inject("sendMessage", 502, times=1)
    for i in range(4):
        fake.send_text(ANN, ann, f"/feedback note {i}")
    await fake.wait_for(lambda: len(texts(fake, ANN)) == 4, 20)
    assert texts(fake, ANN) == ["Thank you, your feedback was recorded."] * 4
    sends = fake.calls_to("sendMessage")
    assert [c.status for c in sends][:5] == [429, 429, 429, 502, 200]
    for limited, retry in itertools.pairwise(sends[:4]):
        assert retry.at - limited.at >= 1.0, "retry_after is honoured"
    (count,) = await h.rows("SELECT count(*) AS n FROM messages WHERE direction = 'out' "
                            "AND status = 'sent'")
    assert count["n"] == 4
    feedback = await h.rows("SELECT value FROM events WHERE type = 'feedback' ORDER BY id")
    assert [f["value"] for f in feedback] == [f"note {i}" for i in range(4)]


async def test_redelivered_update_after_restart_is_answered_once(telegram: Start) -> None:
    h = await telegram(operator_chat_id=0)
    fake = h.fake
    ann = fake.user(ANN, "Ann")
    update = fake.send_text(ANN, ann, "/start")
    await fake.wait_for(lambda: texts(fake, ANN))
    await h.restart_adapter()
    fake.redeliver(update["update_id"])
    fake.send_text(ANN, ann, "/help")
    await fake.wait_for(lambda: len(texts(fake, ANN)) >= 2)
    served = [c for c in fake.calls_to("getUpdates") if c.ok and any(
        u["update_id"] == update["update_id"] for u in c.result)]
    assert len(served) == 2, "Telegram really did deliver it twice"
    await asyncio.sleep(0.3)
    assert texts(fake, ANN) == [h.settings.prompt.greeting, h.settings.prompt.help_text]


async def test_flood_attachments_and_groups(telegram: Start) -> None:
    h = await telegram(operator_chat_id=0, flood_messages=3, edit_interval_s=0.02)
    fake = h.fake
    ann = fake.user(ANN, "Ann")
    for _ in range(5):
        fake.send_text(ANN, ann, "/help")
    await fake.wait_for(lambda: len(texts(fake, ANN)) == 6)
    answers = texts(fake, ANN)
    assert answers.count(h.settings.prompt.help_text) == 5, "nothing is lost"
    assert sum("faster than I can answer" in t for t in answers) == 1

    bob = fake.user(1002, "Bob")
    fake.send_sticker(1002, bob)
    fake.send_photo(1002, bob, caption="my broken parcel")
    fake.send_voice(1002, bob)
    fake.send_document(1002, bob)
    await fake.wait_for(lambda: len(texts(fake, 1002)) == 5)
    assert texts(fake, 1002).count(h.settings.prompt.attachment_text) == 4
    assert sum("faster than I can answer" in t for t in texts(fake, 1002)) == 1
    kinds = await h.rows("SELECT value FROM events WHERE type = 'attachment' ORDER BY id")
    assert [k["value"] for k in kinds] == ["sticker", "photo", "voice", "file"]

    group = fake.group(-100999, "Shoppers")
    fake.send_text(group.id, ann, "anyone know when the sale starts?")
    fake.send_text(group.id, ann, "/help@some_other_bot")
    fake.send_text(group.id, ann, "/help@support_test_bot")
    await fake.wait_for(lambda: texts(fake, group.id))
    await asyncio.sleep(0.3)
    assert texts(fake, group.id) == [h.settings.prompt.help_text]
    (help_message,) = fake.bot_messages(group.id)
    fake.send_text(group.id, ann, "@support_test_bot where is my parcel?")
    fake.send_text(group.id, ann, "and what about returns?", reply_to=help_message.message_id)

    async def group_inbound() -> list[dict[str, Any]]:
        return await h.rows("SELECT text, kind FROM messages WHERE direction = 'in' AND "
                            "platform_message_id LIKE '-100999:%' ORDER BY id")
    assert await _until(group_inbound, lambda rows: len(rows) == 3) == [
        {"text": "", "kind": "command"},
        {"text": "where is my parcel?", "kind": "text"},
        {"text": "and what about returns?", "kind": "text"},
    ]


async def test_webhook_mode_checks_the_secret(telegram: Start) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/telegram/hook"
    h = await telegram(mode="webhook", webhook_port=port, webhook_url=url,
                       webhook_secret="s3cret-Token_1", operator_chat_id=0)
    fake = h.fake
    ann = fake.user(ANN, "Ann")
    assert fake.webhook_url == url

    update = fake.send_text(ANN, ann, "/start")
    await fake.wait_for(lambda: texts(fake, ANN))
    assert fake.webhook_deliveries == [(update["update_id"], 200)]

    forged = {"update_id": 1, "message": {
        "message_id": 77, "date": 0, "chat": {"id": ANN, "type": "private"},
        "from": {"id": ANN, "is_bot": False, "first_name": "Ann"}, "text": "/human",
        "entities": [{"type": "bot_command", "offset": 0, "length": 6}]}}
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"X-Telegram-Bot-Api-Secret-Token": "guess"}):
            resp = await http.post(url, json=forged, headers=headers)
            assert resp.status == 403
    assert (await h.rows("SELECT count(*) AS n FROM messages WHERE direction = 'in'")
            ) == [{"n": 1}]

    # Telegram retries a webhook it thinks failed; the retry is not answered again.
    fake.redeliver(update["update_id"])
    await fake.wait_for(lambda: len(fake.webhook_deliveries) == 2)
    fake.send_text(ANN, ann, "/help")
    await fake.wait_for(lambda: len(texts(fake, ANN)) == 2)
    assert texts(fake, ANN) == [h.settings.prompt.greeting, h.settings.prompt.help_text]


async def test_load_bench_small_run_loses_nothing(models: tuple[Any, Any]) -> None:
    from bench.telegram_load import echo_generator, run_load

    _, classifier = models
    result = await run_load(25, 4, models=(echo_generator(0.002), classifier),
                            edit_interval_s=0.05, stall_s=20)
    assert result.replies == 100
    assert (result.lost, result.duplicated, result.out_of_order) == (0, 0, 0)


# --- grounded answers: citations as links, placeholders never shown ------------------------------

FIXTURE_KB = REPO / "tests" / "fixtures" / "kb"
PLACEHOLDER_ANSWER = (
    "Your order {{Order Number}} arrives in three to five working days. Follow it on "
    "{{Website URL}} or call {{Customer Support Phone Number}} if it is late."
)


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[Start]:
    """The adapter on a pipeline whose generator says exactly what the test chooses."""
    generator = ScriptedGenerator(lambda _: PLACEHOLDER_ANSWER, delay_s=0.02)
    async with telegram_harnesses(tmp_path, generator, NeutralClassifier(),
                                  operator_ids=(DANA,)) as start:
        yield start


async def test_grounded_reply_cites_articles_as_links_and_hides_placeholders(
        scripted: Start) -> None:
    h = await scripted(operator_chat_id=0, edit_interval_s=0.05, grounded=True, sections={
        "recommender": {"knowledge_dir": str(FIXTURE_KB), "enabled": False}})
    fake = h.fake
    ann = fake.user(ANN, "Ann")
    fake.send_text(ANN, ann, "How long does delivery take? My order number is 55123.")
    (reply,) = await fake.wait_for(
        lambda: [m for m in fake.bot_messages(ANN) if "Sources:" in m.text], 20)

    assert "55123" in reply.text, "the customer's own order number fills its placeholder"
    assert reply.text.endswith("Sources: How long delivery takes")
    start = reply.text.index("How long delivery takes")
    assert {"type": "text_link", "offset": start, "length": len("How long delivery takes"),
            "url": "https://help.example.com/delivery-times"} in reply.entities
    final = [c for c in fake.calls if c.ok and c.method in ("sendMessage", "editMessageText")
             and c.result["message_id"] == reply.message_id][-1]
    assert ('<a href="https://help.example.com/delivery-times">How long delivery takes</a>'
            in final.params["text"])
    shown = [c.params["text"] for c in fake.calls
             if c.method in ("sendMessage", "editMessageText")]
    assert len(shown) >= 2, "the reply was streamed (a preview, then the final text)"
    for text in shown:
        assert "{" not in text and "}" not in text, text
    (stored,) = await h.rows("SELECT text FROM messages WHERE direction = 'out'")
    assert "{" not in stored["text"] and "55123" in stored["text"]
