"""Telegram security, over real HTTP: the real python-telegram-bot against the fake Bot API.

Who may act on tickets, the webhook's secret token, customer text that looks like markup,
and server errors that must end in a report rather than a silent drop. The model is
scripted (it echoes the question, which is what an injection would need); the pipeline,
store and adapter are the real ones.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from adapters.telegram import SECRET_HEADER, TelegramAdapter
from core.config import TelegramSettings
from tests.fakes.chat_driver import NeutralClassifier, ScriptedGenerator, settled
from tests.fakes.telegram_api import FakeTelegram, parse_html
from tests.fakes.telegram_driver import OPERATOR_GROUP, Harness, Start, telegram_harnesses, texts

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")

DANA = 501  # an operator
OLIVER = 502  # in the operator group, not an operator
ANN = 1001
REFUSAL = "Sorry, only operators can act on tickets."
HOSTILE = '<b>bold</b> <a href="https://evil.example/x">click</a> 2 < 3 & <i>unclosed'


@pytest.fixture
async def telegram(tmp_path: Path) -> AsyncIterator[Start]:
    async with telegram_harnesses(tmp_path, ScriptedGenerator(delay_s=0.0),
                                  NeutralClassifier(), operator_ids=(DANA,)) as start:
        yield start


async def _ticket(h: Harness, customer: object) -> int:
    """The customer asks for a person; returns the ticket's forum topic."""
    h.fake.send_text(ANN, customer, "/human")  # type: ignore[arg-type]
    await h.fake.wait_for(lambda: h.fake.topics(OPERATOR_GROUP), 10)
    (thread,) = h.fake.topics(OPERATOR_GROUP)
    await h.fake.wait_for(lambda: texts(h.fake, OPERATOR_GROUP, thread))
    return thread


async def test_only_listed_operators_claim_reply_resolve_or_hand_back(telegram: Start) -> None:
    h = await telegram()
    fake = h.fake
    ann, oliver, dana = fake.user(ANN, "Ann"), fake.user(OLIVER, "Oliver"), fake.user(DANA, "Dana")
    thread = await _ticket(h, ann)
    seen_by_ann = texts(fake, ANN)

    for attempt in ("/claim", "/resolve closing this", "/bot", "Here is your refund link"):
        fake.send_text(OPERATOR_GROUP, oliver, attempt, thread_id=thread)
    await fake.wait_for(lambda: texts(fake, OPERATOR_GROUP, thread).count(REFUSAL) == 4)
    # The customer's own chat is no operator room: the same commands there change nothing.
    for attempt in ("/claim", "/resolve", "/bot"):
        fake.send_text(ANN, ann, attempt)
    await settled(h.store, inbound=4)
    assert await h.rows("SELECT state, claimed_by FROM tickets") == [
        {"state": "open", "claimed_by": None}]
    assert texts(fake, ANN) == seen_by_ann, "nothing reached the customer"

    fake.send_text(OPERATOR_GROUP, dana, "/claim", thread_id=thread)
    await fake.wait_for(lambda: "🙋 Claimed by Dana." in texts(fake, OPERATOR_GROUP, thread))
    assert await h.rows("SELECT state, claimed_by FROM tickets") == [
        {"state": "claimed", "claimed_by": f"telegram:{DANA}"}]


async def test_webhook_refuses_updates_without_the_secret(telegram: Start) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook"
    secret = "s3cret-Token_42"
    h = await telegram(mode="webhook", webhook_port=port, webhook_url=url,
                       webhook_secret=secret, operator_chat_id=0)
    forged = {"update_id": 9, "message": {
        "message_id": 77, "date": 0, "chat": {"id": ANN, "type": "private"},
        "from": {"id": ANN, "is_bot": False, "first_name": "Ann"}, "text": "/human",
        "entities": [{"type": "bot_command", "offset": 0, "length": 6}]}}
    wrong = ({}, {SECRET_HEADER: ""}, {SECRET_HEADER: "guess"}, {SECRET_HEADER: secret[:-1]},
             {SECRET_HEADER: secret + "x"}, {SECRET_HEADER: secret.upper()},
             {"X-Telegram-Bot-Api-Secret": secret})
    async with aiohttp.ClientSession() as http:
        for headers in wrong:
            resp = await http.post(url, json=forged, headers=headers)
            assert resp.status in (401, 403), headers
        resp = await http.post(f"{url}?secret_token={secret}", json=forged)
        assert resp.status in (401, 403), "the secret counts only in its header"
        assert await h.rows("SELECT count(*) AS n FROM messages") == [{"n": 0}]
        resp = await http.post(url, json=forged, headers={SECRET_HEADER: secret})
        assert resp.status == 200
    await settled(h.store, inbound=1)
    assert await h.rows("SELECT count(*) AS n FROM tickets") == [{"n": 1}]


async def test_webhook_mode_will_not_start_without_a_secret(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.delenv("SUPPORTBOT_TELEGRAM_WEBHOOK_SECRET", raising=False)
    async with FakeTelegram() as fake:
        settings = TelegramSettings(enabled=True, base_url=fake.base_url, mode="webhook",
                                    webhook_url="http://127.0.0.1:9/hook")
        adapter = TelegramAdapter(settings, fake.token)
        with pytest.raises(RuntimeError, match="SUPPORTBOT_TELEGRAM_WEBHOOK_SECRET"):
            await adapter.start(None)  # type: ignore[arg-type]


async def test_customer_markup_is_shown_as_text_to_operators_and_in_echoes(
        telegram: Start) -> None:
    h = await telegram()
    fake = h.fake
    eve = fake.user(ANN, "<b>Eve</b> & <i>co")
    fake.send_text(ANN, eve, HOSTILE)  # answered by the bot, which echoes it
    await fake.wait_for(lambda: any(HOSTILE in t for t in texts(fake, ANN)), 10)
    thread = await _ticket(h, eve)
    fake.send_text(ANN, eve, HOSTILE + " again")  # relayed into the topic as it comes
    await fake.wait_for(lambda: any(t.endswith(HOSTILE + " again")
                                    for t in texts(fake, OPERATOR_GROUP, thread)), 10)

    assert fake.topics(OPERATOR_GROUP)[thread].startswith("#1 <b>Eve</b> & <i>co")
    for message in fake.bot_messages(ANN) + fake.bot_messages(OPERATOR_GROUP, thread):
        links = [e for e in message.entities if e["type"] == "text_link"]
        assert not links, f"customer text became a link: {message.text!r}"
        assert all(message.text[e["offset"]:e["offset"] + e["length"]] not in (
            "bold", "unclosed") for e in message.entities), message.text
    summary = texts(fake, OPERATOR_GROUP, thread)[0]
    assert f"Customer: {HOSTILE}" in summary
    assert "<b>Eve</b> & <i>co" in summary
    for call in fake.calls_to("sendMessage") + fake.calls_to("editMessageText"):
        assert call.ok, call.response  # every one parsed: nothing broke the HTML
        assert "evil.example" not in str(parse_html(call.params["text"])[1])


async def test_server_errors_are_retried_then_reported_not_dropped(
        telegram: Start, caplog: pytest.LogCaptureFixture) -> None:
    h = await telegram(max_retries=2)
    fake = h.fake
    ann, dana = fake.user(ANN, "Ann"), fake.user(DANA, "Dana")

    # A passing 502 and 500 are retried: the customer gets the answer once.
    fake.inject("sendMessage", 502, chat_id=ANN)
    fake.inject("sendMessage", 500, chat_id=ANN)
    fake.send_text(ANN, ann, "/help")
    await fake.wait_for(lambda: texts(fake, ANN) == [h.settings.prompt.help_text], 10)

    # Failing for good: after 1 + max_retries tries the message is marked failed, with why.
    fake.inject("sendMessage", 500, chat_id=ANN, times=3)
    with caplog.at_level(logging.ERROR):
        fake.send_text(ANN, ann, "/help")
        await settled(h.store, inbound=2)
    to_ann = [c for c in fake.calls_to("sendMessage") if str(c.params["chat_id"]) == str(ANN)]
    assert [c.status for c in to_ann] == [502, 500, 200, 500, 500, 500]
    rows = await h.rows("SELECT direction, status, error FROM messages ORDER BY id")
    assert rows[-2:] == [
        {"direction": "in", "status": "failed", "error": None},
        {"direction": "out", "status": "failed", "error": "Internal Server Error"},
    ]
    assert any("failed" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)

    # An operator whose answer cannot be delivered is told so in the topic.
    thread = await _ticket(h, ann)
    fake.send_text(OPERATOR_GROUP, dana, "/claim", thread_id=thread)
    await fake.wait_for(lambda: "🙋 Claimed by Dana." in texts(fake, OPERATOR_GROUP, thread))
    fake.inject("sendMessage", 503, chat_id=ANN, times=3)
    fake.send_text(OPERATOR_GROUP, dana, "Your refund is on its way.", thread_id=thread)
    await fake.wait_for(lambda: any("Could not deliver that to the customer" in t
                                    for t in texts(fake, OPERATOR_GROUP, thread)), 10)
    (relay,) = await h.rows("SELECT status FROM messages WHERE sender = 'operator'")
    assert relay == {"status": "failed"}
    assert "Your refund is on its way." not in " ".join(texts(fake, ANN))
