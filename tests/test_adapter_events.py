"""The behaviour log is the same whichever platform a customer uses.

One short conversation (a question, the answer with two suggested articles, a press on
one, a thumbs-up on the answer) is played on Telegram and on Discord through the real
libraries and fakes; the ``events`` table of each run's SQLite store must then hold the
same rows: what the recommender learns from cannot depend on the platform.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from core.messages import Suggestion
from core.recommender import SuggestionRequest
from core.store import SQLiteStore
from tests.fakes.chat_driver import NeutralClassifier, ScriptedGenerator, settled
from tests.fakes.discord_driver import discord_world, running_bot
from tests.fakes.telegram_driver import telegram_harnesses

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")

QUESTION = "How do I send back the boots I ordered?"
EXPECTED_TYPES = {"message", "suggestion_shown", "suggestion_clicked", "feedback"}


class TwoArticles:
    """A recommender that always suggests the same two help articles."""

    ARTICLES = (Suggestion("returns-policy", "Returns policy", "https://shop.example/returns"),
                Suggestion("track-order", "Track your order", "https://shop.example/track"))

    async def suggest(self, request: SuggestionRequest, k: int) -> list[Suggestion]:
        return list(self.ARTICLES[:k])

    def describe(self, item_id: str) -> Suggestion | None:
        return next((a for a in self.ARTICLES if a.id == item_id), None)


async def events(store: SQLiteStore) -> list[dict[str, Any]]:
    return await store.query(
        "SELECT e.type, e.item_id, e.position, e.value, e.user_id, e.conversation_id, "
        "u.platform_user_id FROM events e LEFT JOIN users u ON u.id = e.user_id ORDER BY e.id")


async def until(fetch: Callable[[], Awaitable[list[dict[str, Any]]]],
                ok: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    async with asyncio.timeout(15):
        while not ok(rows := await fetch()):  # noqa: ASYNC110 (the store has no change event)
            await asyncio.sleep(0.05)
    return rows


def logged(kind: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda rows: any(r["type"] == kind for r in rows)


async def telegram_events(tmp_path: Path) -> list[dict[str, Any]]:
    async with telegram_harnesses(tmp_path, ScriptedGenerator(delay_s=0.0),
                                  NeutralClassifier()) as start:
        h = await start(operator_chat_id=0, recommender=TwoArticles(), edit_interval_s=0.05)
        fake = h.fake
        ann = fake.user(1001, "Ann")
        fake.send_text(1001, ann, QUESTION)
        (answer,) = await fake.wait_for(
            lambda: [m for m in fake.bot_messages(1001) if m.buttons], 15)
        await settled(h.store, inbound=1)
        fake.press_button(1001, ann, answer.message_id, "s:returns-policy")
        await until(lambda: events(h.store), logged("suggestion_clicked"))
        fake.react(1001, ann, answer.message_id, "👍")
        return await until(lambda: events(h.store), logged("feedback"))


async def discord_events(tmp_path: Path) -> list[dict[str, Any]]:
    async with discord_world() as world, running_bot(
            world, NeutralClassifier(), tmp_path, recommender=TwoArticles()) as bot:
        fake = world.fake
        bot.generator.delay_s = 0.0
        dm = fake.dm_channel(world.alice)
        await fake.user_message(dm, world.alice, QUESTION)
        await bot.settle(inbound=1)
        [answer] = fake.bot_messages(dm["id"])
        await fake.click_button(answer, "sb:sg:returns-policy", world.alice)
        await until(lambda: events(bot.store), logged("suggestion_clicked"))
        await fake.react(answer, world.alice, "👍")
        return await until(lambda: events(bot.store), logged("feedback"))


@pytest.fixture
async def logs(tmp_path: Path) -> AsyncIterator[dict[str, list[dict[str, Any]]]]:
    yield {
        "telegram": await telegram_events(tmp_path / "telegram"),
        "discord": await discord_events(tmp_path / "discord"),
    }


def comparable(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["type"], r["item_id"], r["position"], r["value"]) for r in rows]


async def test_telegram_and_discord_log_the_same_events(
        logs: dict[str, list[dict[str, Any]]]) -> None:
    telegram, discord = logs["telegram"], logs["discord"]
    assert EXPECTED_TYPES <= {r["type"] for r in telegram}
    assert comparable(telegram) == comparable(discord)

    rows = comparable(telegram)
    assert ("message", None, None, "neutral") in rows
    shown = [(item, position) for kind, item, position, _ in rows if kind == "suggestion_shown"]
    assert shown == [("returns-policy", 0), ("track-order", 1)]
    assert ("suggestion_clicked", "returns-policy", None, None) in rows
    # A thumbs-up on the answer is feedback on the first article it offered.
    assert ("feedback", "returns-policy", None, "👍") in rows

    for platform, log in logs.items():
        customers = {r["platform_user_id"] for r in log}
        assert len(customers) == 1 and None not in customers, platform
        assert len({r["conversation_id"] for r in log}) == 1, platform
