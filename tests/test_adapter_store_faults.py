"""A full or locked database while a Discord or Telegram customer writes.

The message cannot be stored, so it is not accepted: the customer is asked to send it
again instead of being left without an answer. The real discord.py and python-telegram-bot
talk over real sockets to the fakes; the store is the real SQLite store whose database
calls fail with the real ``sqlite3.OperationalError`` while the test says the disk is
full (``FlakyStore``). Only the text generator is scripted, for an exact answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from adapters.telegram import RESEND_TEXT, RETRY_PRESS_TEXT
from core.operators import ACTION_FAILED_TEXT
from core.sentiment import build_classifier
from tests.fakes.chat_driver import ScriptedGenerator, settled
from tests.fakes.discord_driver import DmCustomer, discord_world, running_bot
from tests.fakes.telegram_driver import OPERATOR_GROUP, telegram_harnesses, texts
from tests.test_store_faults import FULL, FlakyStore

RESEND = "Sorry, I could not take that message just now. Please send it again."
QUESTION = "Where is my order?"
ANSWER = "Your parcel left the warehouse yesterday."
ANN = 1001


@pytest.fixture(scope="module")
async def classifier() -> AsyncIterator[Any]:
    model = build_classifier("minilm", "", "", 32, 5.0)
    await model.start()
    yield model
    await model.close()


def _generator() -> ScriptedGenerator:
    generator = ScriptedGenerator(delay_s=0.01)
    generator.replies[QUESTION] = ANSWER
    return generator


async def _inbound_rows(store: FlakyStore) -> list[dict[str, Any]]:
    return await store.query(
        "SELECT platform_message_id, text FROM messages WHERE direction = 'in' ORDER BY id")


async def test_discord_asks_again_then_accepts_the_same_message_once(
    classifier: Any, tmp_path: Path
) -> None:
    async with discord_world() as world, running_bot(
        world, classifier, tmp_path, generator=_generator(), store_factory=FlakyStore,
    ) as bot:
        store: FlakyStore = bot.store  # type: ignore[assignment]
        fake = bot.fake
        alice = DmCustomer.new(fake, "alice", world.alice)

        store.fault = FULL
        message = await alice.say(QUESTION)
        await fake.wait_until(lambda: alice.seen() == [RESEND])
        store.fault = None
        assert await _inbound_rows(store) == []

        # Discord delivers the same message again (a RESUME replay): it is accepted now,
        # because the adapter forgot it when it could not store it.
        [event] = [e for e in fake.session.events  # type: ignore[union-attr]
                   if e.name == "MESSAGE_CREATE" and e.data["id"] == message["id"]]
        await fake.redeliver(event.seq)
        await fake.wait_until(lambda: alice.seen() == [RESEND, ANSWER])
        await bot.settle(inbound=1)

        # Once stored, a further copy is not answered again.
        await fake.redeliver(event.seq)
        await alice.say("thanks")
        await fake.wait_until(lambda: len(alice.seen()) == 3, within=20)
        await bot.settle(inbound=2)
        await asyncio.sleep(0.3)
        seen = alice.seen()
        assert seen[:2] == [RESEND, ANSWER] and len(seen) == 3 and seen[2] != RESEND
        assert [r["text"] for r in await _inbound_rows(store)] == [QUESTION, "thanks"]
        assert bot.generator.calls == 2


async def test_discord_a_new_message_after_the_fault_is_answered(
    classifier: Any, tmp_path: Path
) -> None:
    async with discord_world() as world, running_bot(
        world, classifier, tmp_path, generator=_generator(), store_factory=FlakyStore,
    ) as bot:
        store: FlakyStore = bot.store  # type: ignore[assignment]
        alice = DmCustomer.new(bot.fake, "alice", world.alice)
        store.fault = FULL
        await alice.say(QUESTION)
        await bot.fake.wait_until(lambda: alice.seen() == [RESEND])
        store.fault = None
        await alice.say(QUESTION)  # the customer types it again: a new message id
        await bot.fake.wait_until(lambda: alice.seen() == [RESEND, ANSWER])
        await bot.settle(inbound=1)
        await asyncio.sleep(0.3)
        assert alice.seen() == [RESEND, ANSWER]
        assert [r["text"] for r in await _inbound_rows(store)] == [QUESTION]


async def test_telegram_polling_asks_again_and_answers_the_resent_message_once(
    classifier: Any, tmp_path: Path
) -> None:
    generator = _generator()
    async with telegram_harnesses(tmp_path, generator, classifier) as start:
        h = await start(operator_chat_id=0, store_factory=FlakyStore)
        store: FlakyStore = h.store  # type: ignore[assignment]
        fake = h.fake
        ann = fake.user(ANN, "Ann")
        assert RESEND_TEXT == RESEND

        store.fault = FULL
        failed = fake.send_text(ANN, ann, QUESTION)
        await fake.wait_for(lambda: texts(fake, ANN) == [RESEND], 15)
        store.fault = None
        assert await _inbound_rows(store) == []
        # Polling moved past the update: Telegram will never serve it again.
        served = [c for c in fake.calls_to("getUpdates") if c.ok and any(
            u["update_id"] == failed["update_id"] for u in c.result)]
        assert len(served) == 1

        fake.send_text(ANN, ann, QUESTION)  # the customer sends it again
        await fake.wait_for(lambda: texts(fake, ANN) == [RESEND, ANSWER], 20)
        await settled(store, 1)
        await asyncio.sleep(0.3)
        assert texts(fake, ANN) == [RESEND, ANSWER]
        assert [r["text"] for r in await _inbound_rows(store)] == [QUESTION]
        assert generator.calls == 1


async def test_telegram_polling_a_button_press_that_cannot_be_stored_is_answered(
    classifier: Any, tmp_path: Path
) -> None:
    """The press is answered with "try again", so the button does not spin until Telegram
    gives up, and nothing is stored; a later press of the same button is taken."""
    async with telegram_harnesses(tmp_path, _generator(), classifier) as start:
        h = await start(operator_chat_id=0, store_factory=FlakyStore)
        store: FlakyStore = h.store  # type: ignore[assignment]
        fake = h.fake
        ann = fake.user(ANN, "Ann")
        shown = await h.adapter.bot.send_message(ANN, "Helpful articles:", reply_markup=(
            InlineKeyboardMarkup([[InlineKeyboardButton("Returns", callback_data="s:returns")]])))

        store.fault = FULL
        press = fake.press_button(ANN, ann, shown.message_id, "s:returns")
        query_id = press["callback_query"]["id"]
        await fake.wait_for(lambda: fake.callback_answer(query_id) is not None, 15)
        assert fake.callback_answer(query_id)["text"] == RETRY_PRESS_TEXT  # type: ignore[index]
        store.fault = None
        assert await _inbound_rows(store) == []

        again = fake.press_button(ANN, ann, shown.message_id, "s:returns")["callback_query"]
        await fake.wait_for(lambda: fake.callback_answer(again["id"]) is not None, 15)
        assert fake.callback_answer(again["id"])["text"] != RETRY_PRESS_TEXT  # type: ignore[index]
        assert await _inbound_rows(store) == [
            {"platform_message_id": f"cb:{again['id']}", "text": ""}]


async def test_telegram_operator_action_that_fails_tells_the_operator_to_check(
    classifier: Any, tmp_path: Path
) -> None:
    """An operator's answer may already have reached the customer when a later write fails,
    so operators are told to check the ticket, never asked to simply send it again."""
    dana = 501
    async with telegram_harnesses(tmp_path, _generator(), classifier,
                                  operator_ids=(dana,)) as start:
        h = await start(store_factory=FlakyStore)
        store: FlakyStore = h.store  # type: ignore[assignment]
        fake = h.fake
        ann, operator = fake.user(ANN, "Ann"), fake.user(dana, "Dana")
        fake.send_text(ANN, ann, "/human")
        await fake.wait_for(lambda: fake.topics(OPERATOR_GROUP), 10)
        (thread,) = fake.topics(OPERATOR_GROUP)
        await fake.wait_for(lambda: texts(fake, OPERATOR_GROUP, thread))
        seen_by_ann = texts(fake, ANN)

        store.fault = FULL
        fake.send_text(OPERATOR_GROUP, operator, "/claim", thread_id=thread)
        await fake.wait_for(lambda: any(
            ACTION_FAILED_TEXT in t for t in texts(fake, OPERATOR_GROUP, thread)), 15)
        store.fault = None
        assert not any(RESEND_TEXT in t or "try again" in t
                       for t in texts(fake, OPERATOR_GROUP, thread))
        assert texts(fake, ANN) == seen_by_ann, "the customer saw nothing of it"
