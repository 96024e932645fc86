"""Discord security, end to end: the real discord.py over real sockets against the fake.

Who may act on tickets (the operator role, in the operator channel's threads only), that
no customer text can make the bot ping anyone (asserted on the JSON the fake REST
receives and on whom Discord would have notified), and server errors that are retried
and then reported instead of dropped. The model is scripted and echoes the question.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.discord import OPERATOR_REFUSAL
from tests.fakes.chat_driver import NeutralClassifier
from tests.fakes.discord_api import FakeDiscord, Json
from tests.fakes.discord_driver import Bot, World, discord_world, running_bot, texts_in


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with discord_world() as w:
        yield w


@pytest.fixture
async def bot(world: World, tmp_path: Path) -> AsyncIterator[Bot]:
    async with running_bot(world, NeutralClassifier(), tmp_path) as b:
        b.generator.delay_s = 0.0
        yield b


async def _ticket(bot: Bot, customer: Json) -> tuple[Json, Json]:
    """The customer asks for a person in a DM; returns the DM and the ticket thread."""
    fake = bot.fake
    dm = fake.dm_channel(customer)
    await fake.user_message(dm, customer, "/human")
    await bot.settle(inbound=1)
    await fake.wait_until(lambda: fake.threads_of(bot.world.ops["id"]))
    [thread] = fake.threads_of(bot.world.ops["id"])
    await fake.wait_until(lambda: texts_in(fake, thread))
    return dm, thread


async def test_only_the_operator_role_in_ticket_threads_may_act(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm, thread = await _ticket(bot, w.alice)
    seen_by_alice = texts_in(fake, dm)

    for text in ("/claim", "!resolve done", "/bot", "Here is your refund link"):
        await fake.user_message(thread, w.mallory, text)
    for name, options in (("claim", None), ("resolve", {"note": "x"}), ("bot", None)):
        command = await fake.slash_command(thread, w.mallory, name, options)
        await fake.wait_until(lambda c=command: fake.interaction_responses(c))
        [answer] = fake.interaction_responses(command)
        assert answer["data"]["content"] == OPERATOR_REFUSAL and answer["data"]["flags"] & 64
    await fake.wait_until(lambda: public(fake, thread).count(OPERATOR_REFUSAL) == 4)

    # The customer's DM and a look-alike thread elsewhere are not the operator room.
    await fake.user_message(dm, w.alice, "/resolve")
    await bot.settle(inbound=2)
    general_thread = await _thread_in(bot, w.general, thread["name"])
    command = await fake.slash_command(general_thread, w.olga, "claim")
    await fake.wait_until(lambda: fake.interaction_responses(command))
    assert "inside a ticket thread" in fake.interaction_responses(command)[0]["data"]["content"]
    assert (await _row(bot))["state"] == "open"
    # A typed "/claim" in the look-alike thread gets no answer at all, so the test waits on
    # a message sent after it that does: the gateway delivers events in order and the bot
    # starts handling them in order, so once Mallory's refusal is posted the look-alike
    # message was decided (a claim from it would show in the row and in that thread).
    await fake.user_message(general_thread, w.olga, "/claim")
    await fake.user_message(thread, w.mallory, "/claim")
    await fake.wait_until(lambda: public(fake, thread).count(OPERATOR_REFUSAL) == 5)
    assert (await _row(bot))["state"] == "open"
    assert public(fake, general_thread) == [], "the look-alike thread got no answer"
    assert texts_in(fake, dm) == seen_by_alice, "nothing reached the customer"

    await fake.user_message(thread, w.olga, "!claim")
    await fake.wait_until(lambda: any(t.startswith("Claimed by") for t in texts_in(fake, thread)))
    assert (await _row(bot))["claimed_by"] == f"discord:{w.olga['id']}"
    assert public(fake, general_thread) == []


def public(fake: FakeDiscord, channel: Json) -> list[str]:
    """Bot messages everyone in the channel sees (ephemeral answers left out)."""
    return [m["content"] for m in fake.bot_messages(channel["id"]) if not m["flags"] & 64]


async def settled_as(bot: Bot, text: str, status: str) -> None:
    """Wait for the customer message ``text`` to reach ``status`` in the store."""
    sql = "SELECT status FROM messages WHERE direction = 'in' AND text = ? ORDER BY id DESC"

    async def reached() -> bool:
        rows = await bot.store.query(sql, [text])
        return bool(rows) and rows[0]["status"] == status

    async with asyncio.timeout(20):
        while not await reached():  # noqa: ASYNC110 (the store has no change event)
            await asyncio.sleep(0.05)


async def _row(bot: Bot) -> dict[str, Any]:
    [ticket] = await bot.tickets()
    return ticket


async def _thread_in(bot: Bot, channel: Json, name: str) -> Json:
    """A thread a member opens elsewhere, named like a ticket thread."""
    fake = bot.fake
    starter = await fake.user_message(channel, bot.world.olga, "thread starter")
    thread_id = fake.ids.next()
    thread = {
        "id": str(thread_id), "type": 11, "guild_id": channel["guild_id"],
        "parent_id": channel["id"], "name": name, "owner_id": bot.world.olga["id"],
        "message_count": 0, "member_count": 1, "rate_limit_per_user": 0, "flags": 0,
        "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                            "archive_timestamp": starter["timestamp"], "locked": False},
    }
    fake.channels[thread_id] = thread
    await fake.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
    return thread


PINGS = "Hey @everyone and @here, <@{olga}> <@!{olga}> <@&{role}> look"


async def test_customer_text_with_mentions_pings_nobody(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    pings = PINGS.format(olga=w.olga["id"], role=w.operator_role["id"])
    await fake.user_message(w.support, w.alice, pings)  # answered in the shared channel
    await bot.settle(inbound=1)
    dm = fake.dm_channel(w.bob)
    await fake.user_message(dm, w.bob, pings)
    await fake.user_message(dm, w.bob, "/human")
    await bot.settle(inbound=3)
    await fake.wait_until(lambda: fake.threads_of(w.ops["id"]))
    [thread] = fake.threads_of(w.ops["id"])
    await fake.user_message(dm, w.bob, pings + " again")  # relayed to the operators
    await fake.wait_until(lambda: any("again" in t for t in texts_in(fake, thread)))

    echoed = [m for m in fake.bot_messages(w.support["id"]) + fake.bot_messages(dm["id"])
              if "@everyone" in m["content"]]
    assert len(echoed) == 2, "the scripted model repeated the pings back to the customer"
    relayed = [m for m in fake.bot_messages(thread["id"]) if "@everyone" in m["content"]]
    assert len(relayed) == 2, "summary transcript and the live customer line"
    for message in echoed + relayed:
        assert message["mention_everyone"] is False, message["content"]
        assert message["mentions"] == [] and message["mention_roles"] == []
    writes = [c for c in fake.calls if c.method in ("POST", "PATCH") and "/messages" in c.path
              and isinstance(c.body, dict) and "content" in c.body]
    assert len(writes) >= 5
    for call in writes:
        assert call.body["allowed_mentions"]["parse"] == [], call.path
        assert not call.body["allowed_mentions"].get("users")
        assert not call.body["allowed_mentions"].get("roles")
        assert not call.body["allowed_mentions"].get("replied_user")


async def test_server_errors_are_retried_then_reported_not_dropped(
        bot: Bot, caplog: pytest.LogCaptureFixture) -> None:
    fake, w = bot.fake, bot.world
    dm = fake.dm_channel(w.bob)
    route = rf"/channels/{dm['id']}/messages"

    # 502: discord.py retries it itself (after 1 s); 503: it gives up, the adapter retries.
    fake.inject_server_error("POST", route, status=502)
    fake.inject_server_error("POST", route, status=503, count=2)
    await fake.user_message(dm, w.bob, "/help")
    await bot.settle(inbound=1)
    assert texts_in(fake, dm) == [bot.settings.prompt.help_text]
    assert [c.status for c in fake.calls_to("POST", route)] == [502, 503, 503, 200]

    # For good: the bot's streamed answer fails; the message is marked failed and logged.
    fake.inject_server_error("POST", route, status=503, count=4)
    with caplog.at_level(logging.ERROR):
        await fake.user_message(dm, w.bob, "Where is my parcel?")
        await settled_as(bot, "Where is my parcel?", "failed")
    assert [c.status for c in fake.calls_to("POST", route)][4:] == [503] * 4
    assert any(r.levelno >= logging.ERROR for r in caplog.records)
    assert len(texts_in(fake, dm)) == 1

    # An operator whose answer cannot be delivered is told so in the thread.
    await fake.user_message(dm, w.bob, "/human")
    await bot.settle(inbound=3)  # /help, the failed question, and this one
    await fake.wait_until(lambda: fake.threads_of(w.ops["id"]))
    [thread] = fake.threads_of(w.ops["id"])
    await fake.user_message(thread, w.olga, "/claim")
    await fake.wait_until(lambda: any(t.startswith("Claimed by") for t in texts_in(fake, thread)))
    fake.inject_server_error("POST", route, status=503, count=4)
    await fake.user_message(thread, w.olga, "Your refund is on its way.")
    await fake.wait_until(lambda: any("Could not deliver that to the customer" in t
                                      for t in texts_in(fake, thread)))
    [relay] = await bot.store.query("SELECT status, error FROM messages WHERE sender = 'operator'")
    assert relay["status"] == "failed" and "503" in relay["error"]
    assert "Your refund is on its way." not in " ".join(texts_in(fake, dm))
