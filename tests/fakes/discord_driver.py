"""The Discord adapter on the real pipeline against the fake Discord, ready to drive.

Shared by the Discord tests and the load bench: a small world (a guild with a support
channel, an operator channel and role, customers and an operator), the adapter started
on a real SQLite store, and customers who write to the bot in their DMs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
from discord.gateway import DiscordWebSocket

from adapters.discord import DiscordAdapter
from core.pipeline import Pipeline
from core.store import SQLiteStore
from tests.conftest import make_settings
from tests.fakes.chat_driver import ScriptedGenerator, open_grounder, settled
from tests.fakes.discord_api import FakeDiscord, Json

__all__ = ["Bot", "DmCustomer", "World", "build_world", "discord_settings", "discord_world",
           "running_bot", "texts_in"]


@dataclass
class World:
    fake: FakeDiscord
    guild: Json
    support: Json
    general: Json
    ops: Json
    operator_role: Json
    alice: Json
    bob: Json
    olga: Json
    """The one member with the operator role."""
    mallory: Json


async def build_world(**options: Any) -> World:
    fake = await FakeDiscord(**options).start()
    guild = fake.add_guild("Shop")
    role = fake.add_role(guild, "operators")
    support = fake.add_text_channel(guild, "support")
    general = fake.add_text_channel(guild, "general")
    ops = fake.add_text_channel(guild, "operators")
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    olga, mallory = fake.add_user("olga"), fake.add_user("mallory")
    for user in (alice, bob, mallory):
        fake.add_member(guild, user)
    fake.add_member(guild, olga, roles=(role,))
    return World(fake, guild, support, general, ops, role, alice, bob, olga, mallory)


@contextlib.asynccontextmanager
async def discord_world(**options: Any) -> AsyncIterator[World]:
    """A world on a fresh fake; discord.py's endpoints (which the adapter repoints) are
    restored afterwards."""
    saved = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    world = await build_world(**options)
    try:
        yield world
    finally:
        await world.fake.close()
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved


@dataclass(frozen=True, slots=True)
class DmCustomer:
    """A person writing to the bot in their direct messages."""

    fake: FakeDiscord
    user: Json
    dm: Json

    @classmethod
    def new(cls, fake: FakeDiscord, name: str, user: Json | None = None) -> DmCustomer:
        user = user or fake.add_user(name)
        return cls(fake, user, fake.dm_channel(user))

    async def say(self, text: str, **options: Any) -> Json:
        return await self.fake.user_message(self.dm, self.user, text, **options)

    def seen(self) -> list[str]:
        return texts_in(self.fake, self.dm)


@dataclass
class Bot:
    world: World
    adapter: DiscordAdapter
    pipeline: Pipeline
    store: SQLiteStore
    generator: Any
    settings: Any

    @property
    def fake(self) -> FakeDiscord:
        return self.world.fake

    async def events(self, kind: str) -> list[dict]:
        return await self.store.query("SELECT * FROM events WHERE type = ? ORDER BY id", [kind])

    async def tickets(self) -> list[dict]:
        return await self.store.query("SELECT * FROM tickets ORDER BY id")

    async def settle(self, inbound: int, within: float = 20.0) -> None:
        """Wait until ``inbound`` customer events are stored and everything is answered."""
        await settled(self.store, inbound, within)

    async def restart_adapter(self) -> None:
        """A new process's adapter on the same pipeline (the old client is gone)."""
        await self.adapter.stop()
        self.adapter = DiscordAdapter(self.adapter.settings, self.fake.token)
        await self.adapter.start(self.pipeline)


def discord_settings(world: World, tmp_path: Path, *,
                     sections: dict[str, dict[str, Any]] | None = None, **extra: Any) -> Any:
    return make_settings(tmp_path, discord={
        "enabled": True, "api_base": world.fake.api_base, "gateway_url": world.fake.gateway_url,
        "support_channel_ids": [int(world.support["id"])],
        "operator_channel_id": int(world.ops["id"]),
        "operator_role_id": int(world.operator_role["id"]),
        "edit_interval_s": 0.2, "guild_ready_timeout_s": 0.05, "typing_interval_s": 0.5,
        **extra,
    }, **(sections or {}))


@contextlib.asynccontextmanager
async def running_bot(world: World, classifier: Any, tmp_path: Path, *,
                      generator: Any = None, recommender: Any = None, grounded: bool = False,
                      sections: dict[str, dict[str, Any]] | None = None,
                      store_factory: Callable[[Path], SQLiteStore] = SQLiteStore,
                      **extra: Any) -> AsyncIterator[Bot]:
    """The adapter started on a real pipeline and store; ``grounded`` wires the knowledge
    base grounder (``recommender.knowledge_dir``) as the service does. ``store_factory``
    builds the store from its path (a subclass that fails on purpose, say)."""
    settings = discord_settings(world, tmp_path, sections=sections, **extra)
    grounder = await open_grounder(settings) if grounded else None
    store = store_factory(Path(settings.store.path))
    await store.open()
    generator = generator or ScriptedGenerator()
    pipeline = Pipeline(settings, store, classifier, generator, recommender, grounder)
    adapter = DiscordAdapter(settings.discord, world.fake.token)
    await adapter.start(pipeline)
    bot = Bot(world, adapter, pipeline, store, generator, settings)
    try:
        yield bot
    finally:
        await pipeline.close(2.0)
        await bot.adapter.stop()
        await store.close()


def texts_in(fake: FakeDiscord, channel: Json) -> list[str]:
    """What a person sees from the bot in a channel, oldest first."""
    return [m["content"] for m in fake.bot_messages(channel["id"])]
