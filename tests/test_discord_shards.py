"""Discord sharding: one replica per shard, every message answered once, by its shard.

Several replicas of the service share one database; on Discord each runs one gateway shard
(``[discord] shard_id`` of ``shard_count``). Discord sends a guild's events only to shard
``(guild_id >> 22) % shard_count`` and DMs only to shard 0, and the fake routes the same
way, so a replica that identified as the wrong shard, or as none, would miss messages or
answer them twice. Each replica's scripted model signs its answers, so the replies the fake
records show which shard answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket

from adapters.discord import DiscordAdapter
from core.config import ConfigError, load_settings
from core.pipeline import Pipeline
from core.sentiment import build_classifier
from core.store import SQLiteStore
from tests.conftest import make_settings
from tests.fakes.chat_driver import ScriptedGenerator, settled
from tests.fakes.discord_api import Json
from tests.fakes.discord_driver import World, discord_world, texts_in
from tests.test_discord import ANGRY

SHARDS = 2


@dataclass(frozen=True, slots=True)
class Replica:
    """One service replica: its own pipeline and Discord connection, on the shared store."""

    shard: int
    adapter: DiscordAdapter
    generator: ScriptedGenerator


def signed(shard: int) -> ScriptedGenerator:
    return ScriptedGenerator(lambda question: f"[shard {shard}] {question}", delay_s=0.0)


@pytest.fixture(scope="module")
async def classifier() -> AsyncIterator[Any]:
    model = build_classifier("minilm", "", "", 32, 5.0)
    await model.start()
    yield model
    await model.close()


@contextlib.asynccontextmanager
async def replicas(world: World, support: list[Json], classifier: Any, tmp_path: Path,
                   **discord_extra: Any) -> AsyncIterator[tuple[SQLiteStore, list[Replica]]]:
    """Every shard's replica started as the service starts one (leases, then recovery).
    The sweep is slowed so that no replica takes up another's conversation in the test."""
    fake = world.fake
    configs = [make_settings(tmp_path, service={"sweep_interval_s": 60.0}, discord={
        "enabled": True, "api_base": fake.api_base, "gateway_url": fake.gateway_url,
        "support_channel_ids": [int(c["id"]) for c in support],
        "guild_ready_timeout_s": 0.05, "edit_interval_s": 0.2, "typing_interval_s": 0.5,
        "shard_id": shard, "shard_count": SHARDS, **discord_extra,
    }) for shard in range(SHARDS)]
    store = SQLiteStore(Path(configs[0].store.path))
    await store.open()
    running: list[Replica] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.close)
        for shard, settings in enumerate(configs):
            generator = signed(shard)
            pipeline = Pipeline(settings, store, classifier, generator, recover_first=True,
                                replica=f"replica-{shard}",
                                lease_ttl_s=settings.service.lease_ttl_s,
                                sweep_s=settings.service.sweep_interval_s)
            adapter = DiscordAdapter(settings.discord, fake.token)
            stack.push_async_callback(adapter.stop)
            stack.push_async_callback(pipeline.close, 2.0)
            await adapter.start(pipeline)
            await pipeline.recover()
            running.append(Replica(shard, adapter, generator))
        yield store, running


async def test_each_message_is_answered_once_by_the_shard_that_owns_it(
        classifier: Any, tmp_path: Path) -> None:
    async with discord_world() as world:
        fake = world.fake
        north, south = (fake.add_guild(name, shard=(shard, SHARDS))
                        for shard, name in enumerate(("North", "South")))
        support = [world.support]
        for guild in (north, south):
            support.append(fake.add_text_channel(guild, "support"))
            for user in (world.bob, world.mallory):
                fake.add_member(guild, user)
        async with replicas(world, support, classifier, tmp_path) as (store, running):
            for replica in running:
                mine = {int(g) for g in fake.guilds if fake.shard_of(g, SHARDS) == replica.shard}
                assert {g.id for g in replica.adapter.client.guilds} == mine
                session = fake.sessions[replica.adapter.client.ws.session_id]
                assert session.shard == (replica.shard, SHARDS)
            assert sorted(i["shard"] for i in fake.identifies) == [[0, 2], [1, 2]]

            dm = fake.dm_channel(world.mallory)  # a member of South (shard 1): DMs are shard 0's
            asked = [
                (world.support, await fake.user_message(world.support, world.alice,
                                                        "Do you ship to Norway?")),
                (support[1], await fake.user_message(support[1], world.bob,
                                                     "Where is my parcel?")),
                (support[2], await fake.user_message(support[2], world.mallory,
                                                     "Can I return shoes?")),
                (dm, await fake.user_message(dm, world.mallory, "Is my refund on its way?")),
            ]
            await settled(store, inbound=len(asked))

            owners = [fake.shard_of(c["guild_id"], SHARDS) if "guild_id" in c else 0
                      for c, _ in asked]
            assert set(owners) == {0, 1}
            for (channel, message), owner in zip(asked, owners, strict=True):
                [reply] = fake.bot_messages(channel["id"])
                assert reply["content"].startswith(f"[shard {owner}] ")
                assert message["content"] in reply["content"]
                delivered = [s.shard[0] for s in fake.sessions.values() for e in s.events
                             if e.name == "MESSAGE_CREATE" and e.data["id"] == message["id"]]
                assert delivered == [owner]
            for replica in running:
                assert replica.generator.calls == owners.count(replica.shard)
            [row] = await store.query("SELECT COUNT(*) AS n FROM messages "
                                      "WHERE direction = 'out'")
            assert row["n"] == len(asked)


async def test_an_escalation_on_one_shard_is_served_in_one_thread_from_both(
        classifier: Any, tmp_path: Path) -> None:
    """The customer's guild is one shard's, the operator channel's guild the other's: the
    customer's news is posted by one replica, the operator's actions by the other, all in
    the one thread, each change once."""
    async with discord_world() as world:
        fake = world.fake
        ops_shard = fake.shard_of(world.guild["id"], SHARDS)
        south = fake.add_guild("South", shard=(1 - ops_shard, SHARDS))
        shop = fake.add_text_channel(south, "support")
        fake.add_member(south, world.bob)
        async with replicas(world, [shop], classifier, tmp_path,
                            operator_channel_id=int(world.ops["id"]),
                            operator_role_id=int(world.operator_role["id"])) as (store, _):
            for text in ANGRY:
                await fake.user_message(shop, world.bob, text)
            await settled(store, inbound=len(ANGRY))
            await fake.wait_until(lambda: fake.threads_of(world.ops["id"]))
            [thread] = fake.threads_of(world.ops["id"])

            said = "Hi Bob, I'm Olga. Your refund is on its way."
            await fake.user_message(thread, world.olga, said)  # reaches the ops shard only
            await fake.wait_until(lambda: any(said in t for t in texts_in(fake, shop)))
            claimed = f"Claimed by <@{world.olga['id']}>."
            await fake.wait_until(lambda: claimed in texts_in(fake, thread))
            await fake.user_message(shop, world.bob, "Thank you so much!")  # the other shard
            await fake.wait_until(
                lambda: "**Customer:**\n> Thank you so much!" in texts_in(fake, thread))
            await asyncio.sleep(0.5)

            assert [t["id"] for t in fake.threads_of(world.ops["id"])] == [thread["id"]]
            posted = texts_in(fake, thread)
            assert posted.count(claimed) == 1, posted
            assert posted.count("**Customer:**\n> Thank you so much!") == 1, posted
            assert [t for t in texts_in(fake, shop) if said in t] != []


def write(tmp_path: Path, discord: str) -> Path:
    path = tmp_path / "shards.toml"
    path.write_text(f"[discord]\n{discord}\n", encoding="utf-8")
    return path


def test_shard_keys_default_to_unset_and_take_a_valid_pair(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "")).discord
    assert settings.shard_id is None and settings.shard_count is None
    settings = load_settings(write(tmp_path, "shard_id = 1\nshard_count = 3")).discord
    assert (settings.shard_id, settings.shard_count) == (1, 3)


@pytest.mark.parametrize(("keys", "problem"), [
    ("shard_id = 0", "'discord.shard_id' is set but 'discord.shard_count' is not"),
    ("shard_count = 2", "'discord.shard_count' is set but 'discord.shard_id' is not"),
    ("shard_id = 2\nshard_count = 2",
     "'discord.shard_id' (2) must be less than 'discord.shard_count' (2)"),
    ("shard_id = -1\nshard_count = 2", "key 'discord.shard_id': Input should be greater"),
    ("shard_id = 0\nshard_count = 0", "key 'discord.shard_count': Input should be greater"),
    ('shard_id = "0"\nshard_count = 2', "key 'discord.shard_id': Input should be a valid"),
])
def test_a_bad_shard_pair_is_a_config_error_naming_key_and_file(
        tmp_path: Path, keys: str, problem: str) -> None:
    path = write(tmp_path, keys)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value).startswith(f"{path}: ")
    assert problem in str(err.value)


async def test_a_shard_outside_the_count_is_refused_by_the_gateway_with_4010() -> None:
    """Discord closes an IDENTIFY for a shard outside 0..count-1 (the config stops one)."""
    async with discord_world() as world:
        fake = world.fake
        discord.http.Route.BASE = fake.api_base
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
        client = discord.Client(intents=discord.Intents.default(), shard_id=2, shard_count=2)
        with pytest.raises(discord.ConnectionClosed) as closed:
            await asyncio.wait_for(client.start(fake.token), 10)
        assert closed.value.code == 4010 and fake.identifies == []
