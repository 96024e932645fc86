"""Discord, end to end: the real discord.py over real sockets against the fake Discord.

Part one proves the fake speaks the protocol discord.py expects (a plain ``discord.Client``
handshakes, heartbeats, RESUMEs, honours 429s). Part two runs the adapter on the real
pipeline, store and sentiment model; only the text generator is scripted, because the
tests need exact model output (a long answer, an ``@everyone``) to check what users see.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket

from adapters.discord import (
    MAX_MESSAGE,
    OPERATOR_REFUSAL,
    DiscordAdapter,
    escape_model_markdown,
    split_message,
)
from core.config import DiscordSettings
from core.messages import Citation, Reply, Suggestion
from core.pipeline import Pipeline
from core.recommender import SuggestionRequest
from core.sentiment import build_classifier
from core.store import SQLiteStore
from tests.fakes.chat_driver import ScriptedGenerator
from tests.fakes.discord_api import FakeDiscord, Json
from tests.fakes.discord_driver import (
    Bot,
    World,
    discord_settings,
    discord_world,
    running_bot,
    texts_in,
)

ANGRY = (
    "Worst service ever. I am furious, I want my money back NOW.",
    "This is a disgrace, you people are useless and I am absolutely livid!!!",
)


# -- the world -------------------------------------------------------------------------------


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with discord_world() as w:
        yield w


def point_at(fake: FakeDiscord) -> None:
    discord.http.Route.BASE = fake.api_base
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)


@contextlib.asynccontextmanager
async def plain_client(fake: FakeDiscord, *, content: bool = True,
                       token: str | None = None) -> AsyncIterator[tuple[discord.Client, list]]:
    """A bare discord.Client (no adapter) connected to the fake; yields it and its messages."""
    point_at(fake)
    intents = discord.Intents.default()
    intents.message_content = content
    client = discord.Client(intents=intents, guild_ready_timeout=0.05)
    seen: list[discord.Message] = []
    ready = asyncio.Event()
    client.event(_named("on_ready", ready.set))
    client.event(_named("on_message", seen.append))
    task = asyncio.create_task(client.start(token or fake.token))
    waiting = asyncio.create_task(ready.wait())
    try:
        done, _ = await asyncio.wait({task, waiting}, timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task in done:
            task.result()
        assert ready.is_set(), "discord.Client never became ready"
        yield client, seen
    finally:
        await client.close()
        await asyncio.gather(task, return_exceptions=True)


def _named(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    async def handler(*args: Any) -> None:
        fn(*args)

    handler.__name__ = name
    return handler


# -- part one: the fake, driven by a plain discord.Client --------------------------------------


async def test_handshake_heartbeats_and_guild_cache(world: World) -> None:
    fake = world.fake
    fake.heartbeat_interval_ms = 150
    async with plain_client(fake) as (client, _):
        assert client.user is not None and client.user.id == int(fake.bot_user["id"])
        guild = client.get_guild(int(world.guild["id"]))
        assert guild is not None and guild.get_channel(int(world.support["id"])) is not None
        assert guild.get_role(int(world.operator_role["id"])).name == "operators"
        await fake.wait_until(lambda: fake.heartbeat_count >= 3, within=5)
        assert client.latency < 1.0  # ACKs came back
    assert fake.identify_count == 1
    assert fake.connections[0].startswith("/?v=10&encoding=json&compress=zlib-stream")
    me = fake.calls_to("GET", "/users/@me")[0]
    assert me.headers["Authorization"] == f"Bot {fake.token}"


async def test_resume_replays_what_was_missed_in_order(world: World) -> None:
    fake = world.fake
    async with plain_client(fake) as (_, seen):
        await fake.user_message(world.support, world.alice, "one")
        await fake.wait_until(lambda: len(seen) == 1)
        await fake.drop()
        for text in ("two", "three"):  # sent while the bot is disconnected
            await fake.user_message(world.support, world.alice, text)
        await fake.wait_until(lambda: len(seen) == 3)
        await fake.send_reconnect()  # op 7: close and RESUME again
        await fake.wait_until(lambda: fake.resume_count == 2)
        await fake.wait_connected()
        await fake.user_message(world.support, world.alice, "four")
        await fake.wait_until(lambda: len(seen) == 4)
    assert [m.content for m in seen] == ["one", "two", "three", "four"]
    assert fake.identify_count == 1
    assert fake.connections[1].startswith("/resume?")  # READY's resume_gateway_url was used


async def test_bad_token_and_unapproved_intent_are_refused(world: World) -> None:
    with pytest.raises(discord.LoginFailure):
        async with plain_client(world.fake, token="wrong"):
            pass
    world.fake.privileged_intents = 0
    with pytest.raises(discord.PrivilegedIntentsRequired):
        async with plain_client(world.fake):
            pass
    assert 4014 in world.fake.close_codes


async def test_guild_content_is_blank_without_the_message_content_intent(world: World) -> None:
    async with plain_client(world.fake, content=False) as (_, seen):
        await world.fake.user_message(world.support, world.alice, "secret words")
        await world.fake.user_message(world.fake.dm_channel(world.alice), world.alice, "in a dm")
        await world.fake.wait_until(lambda: len(seen) == 2)
    assert [m.content for m in seen] == ["", "in a dm"]


async def test_rest_errors_and_429_as_discord_sends_them(world: World) -> None:
    fake = world.fake
    async with plain_client(fake) as (client, _):
        channel = client.get_channel(int(world.support["id"]))
        with pytest.raises(discord.HTTPException) as too_long:
            await channel.send("x" * (MAX_MESSAGE + 1))
        assert too_long.value.code == 50035 and too_long.value.status == 400
        with pytest.raises(discord.NotFound) as unknown:
            await client.get_partial_messageable(12345).send("hi")
        assert unknown.value.code == 10003
        dm = await client.create_dm(discord.Object(int(world.alice["id"])))
        await dm.send("a direct message")
        assert texts_in(fake, fake.dm_channel(world.alice)) == ["a direct message"]
        fake.inject_429("POST", r"/channels/\d+/messages", retry_after=0.3)
        await channel.send("after a 429")
    posts = fake.calls_to("POST", rf"/channels/{world.support['id']}/messages")
    assert [c.status for c in posts[-2:]] == [429, 200]
    assert posts[-1].at - posts[-2].at >= 0.3
    assert [m["content"] for m in fake.bot_messages(world.support["id"])] == ["after a 429"]


# -- rendering (pure) --------------------------------------------------------------------------


def test_split_message_on_word_boundaries_keeps_every_word() -> None:
    words = [f"word{i}" for i in range(900)]
    chunks = split_message(" ".join(words))
    assert len(chunks) > 1 and all(len(c) <= MAX_MESSAGE for c in chunks)
    assert " ".join(chunks).split() == words


def test_split_message_reopens_a_code_block_cut_in_two() -> None:
    code = "\n".join(f"print({i})" for i in range(400))
    chunks = split_message(f"Try this:\n```py\n{code}\n```\nDone.")
    assert all(len(c) <= MAX_MESSAGE for c in chunks) and len(chunks) >= 3
    for chunk in chunks:
        assert chunk.count("```") % 2 == 0, chunk[:40]
    assert chunks[1].startswith("```py\n")


@pytest.mark.parametrize("text", [
    "```0000000000000000000000000000000000",  # the fence's first line longer than a chunk
    "000```" + "0" * 43,  # a fence that opens mid-line
    "ab ``" + "`" * 40,  # a cut that would fall inside a run of backticks
])
def test_split_message_at_a_small_limit_keeps_it_and_closes_every_block(text: str) -> None:
    """Found by hypothesis: these left a block open or ran past the limit."""
    chunks = split_message(escape_model_markdown(text), 40)
    assert chunks and all(len(c) <= 40 for c in chunks), chunks
    for chunk in chunks:
        assert chunk.count("```") % 2 == 0, chunks
    assert "".join(c.replace("```", "").replace("\n", "") for c in chunks).count("0") == \
        text.count("0")


def test_split_message_refuses_a_limit_it_cannot_keep() -> None:
    """Below the size of a reopened block it looped for ever; now it says so."""
    with pytest.raises(ValueError, match="needs a limit of at least"):
        split_message("```py\n" + "xx " * 10, 8)


def test_model_markdown_repaired_only_where_broken() -> None:
    assert escape_model_markdown("Use **bold** and `code`") == "Use **bold** and `code`"
    assert escape_model_markdown("5 ** 2 is 25") == "5 \\*\\* 2 is 25"
    assert escape_model_markdown("```py\nx = 1").endswith("\n```")
    assert escape_model_markdown("a ` b") == "a \\` b"
    assert escape_model_markdown("spoiler || here") == "spoiler \\|\\| here"


# -- part two: the adapter on the real pipeline ------------------------------------------------


class ArticleShelf:
    """Two fixed help articles, so the buttons under an answer are known."""

    ARTICLES = (Suggestion("returns-policy", "Returns policy", "https://shop.example/returns"),
                Suggestion("track-order", "Track your order", ""))

    async def suggest(self, request: SuggestionRequest, k: int) -> list[Suggestion]:
        return list(self.ARTICLES[:k])

    def describe(self, item_id: str) -> Suggestion | None:
        return next((a for a in self.ARTICLES if a.id == item_id), None)


@pytest.fixture(scope="session")
async def classifier() -> AsyncIterator[Any]:
    model = build_classifier("minilm", "", "", 32, 5.0)
    await model.start()
    yield model
    await model.close()


@pytest.fixture
async def bot(world: World, classifier: Any, tmp_path: Path) -> AsyncIterator[Bot]:
    async with running_bot(world, classifier, tmp_path, recommender=ArticleShelf()) as b:
        yield b


async def test_dm_conversation_streams_one_edited_message(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm = fake.dm_channel(w.alice)
    answer = ("Your parcel left our warehouse yesterday and should arrive within three "
              "working days. You can follow it with the tracking link in your email.")
    bot.generator.replies["Where is my order?"] = answer
    bot.generator.delay_s = 0.05  # ~1.2 s of streaming: several edit intervals
    await fake.user_message(dm, w.alice, "Where is my order?")
    await bot.settle(inbound=1)
    [message] = fake.bot_messages(dm["id"])  # one message, edited while it grew
    assert message["content"] == answer and len(message["edits"]) >= 2
    edits = fake.calls_to("PATCH", rf"/channels/{dm['id']}/messages/{message['id']}")
    gaps = [b.at - a.at for a, b in itertools.pairwise(edits)]
    assert all(gap >= 0.19 for gap in gaps), gaps  # at most one edit per edit_interval_s
    assert any(cid == int(dm["id"]) for cid, _ in fake.typing)  # typing while generating
    labels = [b["label"] for row in message["components"] for b in row["components"]]
    assert labels == ["Returns policy", "Track your order"]
    stored = await bot.store.query(
        "SELECT text, platform_message_id FROM messages WHERE direction = 'out'")
    assert stored == [{"text": answer, "platform_message_id": message["id"]}]


async def test_long_answer_split_at_2000_on_word_boundaries(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm = fake.dm_channel(w.bob)
    words = [f"step{i}" for i in range(520)]
    bot.generator.replies["Explain everything"] = " ".join(words)
    bot.generator.delay_s = 0.0
    await fake.user_message(dm, w.bob, "Explain everything")
    await bot.settle(inbound=1)
    texts = texts_in(fake, dm)
    assert len(texts) == 3 and all(len(t) <= MAX_MESSAGE for t in texts)
    assert " ".join(texts).split() == words
    assert fake.bot_messages(dm["id"])[-1]["components"]  # buttons under the last part


async def test_guild_mention_and_support_channel_answered_other_talk_ignored(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    await fake.user_message(w.general, w.bob, "just chatting, not for the bot")
    asked = await fake.user_message(w.general, w.bob, "what are your opening hours?",
                                    mention_bot=True)
    await fake.user_message(w.support, w.alice, "Do you ship abroad?")
    await bot.settle(inbound=2)
    [reply] = fake.bot_messages(w.general["id"])
    assert "what are your opening hours?" in reply["content"]
    assert fake.bot_user["id"] not in reply["content"]  # the mention was stripped
    assert reply["message_reference"]["message_id"] == asked["id"]
    assert reply["mentions"] == []  # the reply does not ping its author
    [answer] = texts_in(fake, w.support)
    assert "Do you ship abroad?" in answer
    assert bot.generator.calls == 2  # the unaddressed message was ignored
    keys = await bot.store.query("SELECT conversation_key FROM conversations ORDER BY id")
    assert [k["conversation_key"] for k in keys] == [
        f"{w.general['id']}:{w.bob['id']}", f"{w.support['id']}:{w.alice['id']}"]


async def test_model_output_with_everyone_pings_nobody(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    role = w.operator_role["id"]
    bot.generator.replies["ping test"] = (
        f"Hello @everyone and @here, also <@&{role}> and <@{w.olga['id']}>!")
    await fake.user_message(w.support, w.alice, "ping test")
    await bot.settle(inbound=1)
    [message] = fake.bot_messages(w.support["id"])
    assert "@everyone" in message["content"]
    assert message["mention_everyone"] is False
    assert message["mentions"] == [] and message["mention_roles"] == []
    bodies = [c.body for c in fake.calls if c.method in ("POST", "PATCH")
              and "/messages" in c.path and isinstance(c.body, dict) and "content" in c.body]
    assert len(bodies) >= 2
    for body in bodies:
        assert body["allowed_mentions"]["parse"] == []
        assert not body["allowed_mentions"].get("replied_user")


async def test_suggestion_press_logged_and_buttons_survive_restart(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm = fake.dm_channel(w.alice)
    await fake.user_message(dm, w.alice, "How do returns work?")
    await bot.settle(inbound=1)
    [answer] = fake.bot_messages(dm["id"])
    pressed = await fake.click_button(answer, "sb:sg:returns-policy", w.alice)
    await bot.settle(inbound=2)
    [response] = fake.interaction_responses(pressed)
    assert response["type"] == 4 and response["data"]["flags"] & 64  # ephemeral answer
    assert "Returns policy" in response["data"]["content"]
    assert "https://shop.example/returns" in response["data"]["content"]

    await bot.restart_adapter()
    again = await fake.click_button(answer, "sb:sg:track-order", w.alice)
    await bot.settle(inbound=3)
    assert "Track your order" in fake.interaction_responses(again)[0]["data"]["content"]
    clicks = await bot.events("suggestion_clicked")
    assert [c["item_id"] for c in clicks] == ["returns-policy", "track-order"]


async def test_reaction_on_a_bot_message_is_logged(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm = fake.dm_channel(w.bob)
    question = await fake.user_message(dm, w.bob, "Thanks for the help")
    await bot.settle(inbound=1)
    [answer] = fake.bot_messages(dm["id"])
    await fake.react(answer, w.bob, "👍")
    await fake.react(question, w.bob, "😀")  # on his own message: not feedback
    await bot.settle(inbound=2)
    await asyncio.sleep(0.2)
    [feedback] = await bot.events("feedback")
    assert feedback["value"] == "👍" and answer["id"] in feedback["data"]


async def _escalate(bot: Bot, customer: Json) -> tuple[Json, Json, int]:
    """An angry customer in DMs until the conversation goes to a person."""
    fake, w = bot.fake, bot.world
    dm = fake.dm_channel(customer)
    for text in ANGRY:
        await fake.user_message(dm, customer, text)
    await bot.settle(inbound=len(ANGRY))
    [thread] = fake.threads_of(w.ops["id"])
    [ticket] = await bot.tickets()
    return dm, thread, ticket["id"]


async def test_angry_customer_escalated_into_an_operator_thread(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm, thread, ticket_id = await _escalate(bot, w.alice)
    # The first angry message is negative enough on its own (P >= 0.99): escalated at once.
    assert thread["name"].startswith(f"#{ticket_id} · Alice · very_negative")
    summary, *updates = texts_in(fake, thread)
    assert "**Reason:** very\\_negative" in summary and "Sentiment (negative)" in summary
    # The transcript so far, then what the customer wrote after the ticket opened.
    assert "furious" in "\n".join([summary, *updates])
    assert "livid" in "\n".join([summary, *updates])
    assert texts_in(fake, dm)[-1] == bot.settings.escalation.handoff_text


async def test_operator_reply_relayed_then_resolve_by_slash_command(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm, thread, _ = await _escalate(bot, w.bob)
    said = "Hi Bob, I'm sorry. Your refund is on its way."
    note = await fake.user_message(thread, w.olga, said)
    await fake.wait_until(lambda: said in texts_in(fake, dm))
    await fake.wait_until(lambda: fake.messages[int(note["id"])].get("reactions"))
    assert (await bot.tickets())[0]["state"] == "claimed"
    await fake.wait_until(lambda: f"Claimed by <@{w.olga['id']}>." in texts_in(fake, thread))
    await fake.user_message(dm, w.bob, "Thank you so much!")  # shown to the operator
    await fake.wait_until(lambda: "**Customer:**\n> Thank you so much!" in texts_in(fake, thread))

    command = await fake.slash_command(thread, w.olga, "resolve", {"note": "refunded"})
    await fake.wait_until(lambda: fake.interactions[int(command["id"])]["followups"])
    assert fake.interaction_responses(command)[0]["type"] == 5  # deferred within 3 s
    assert (await bot.tickets())[0]["state"] == "resolved"
    await fake.wait_until(lambda: "resolved" in texts_in(fake, dm)[-1])
    await fake.wait_until(lambda: fake.channels[int(thread["id"])]["thread_metadata"]["archived"])
    assert any("Note: refunded" in t for t in texts_in(fake, thread))


async def test_member_without_operator_role_is_refused(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm, thread, _ = await _escalate(bot, w.alice)
    before = len(texts_in(fake, dm))
    await fake.user_message(thread, w.mallory, "Not staff, but here is a refund link")
    await fake.wait_until(lambda: OPERATOR_REFUSAL in texts_in(fake, thread))
    command = await fake.slash_command(thread, w.mallory, "claim")
    await fake.wait_until(lambda: fake.interaction_responses(command))
    assert fake.interaction_responses(command)[0]["data"]["content"] == OPERATOR_REFUSAL
    assert (await bot.tickets())[0]["state"] == "open"
    await fake.user_message(thread, w.olga, "/claim")
    await fake.wait_until(lambda: any(t.startswith("Claimed by") for t in texts_in(fake, thread)))
    await fake.wait_until(lambda: len(texts_in(fake, dm)) == before + 1)  # "...has joined"
    assert "refund link" not in " ".join(texts_in(fake, dm))
    [ticket] = await bot.tickets()
    assert ticket["claimed_by"] == f"discord:{w.olga['id']}"
    await fake.user_message(thread, w.olga, "/bot")  # hand the customer back to the bot
    await fake.wait_until(lambda: "Handed back to the bot." in texts_in(fake, thread))
    await fake.wait_until(lambda: "back with the assistant" in texts_in(fake, dm)[-1])
    assert (await bot.tickets())[0]["state"] == "handed_back"


async def test_start_with_a_wrong_token_fails_clearly(world: World, classifier: Any,
                                                       tmp_path: Path) -> None:
    settings = discord_settings(world, tmp_path)
    store = SQLiteStore(settings.store.path)
    await store.open()
    pipeline = Pipeline(settings, store, classifier, ScriptedGenerator())
    adapter = DiscordAdapter(settings.discord, "not-the-token")
    with pytest.raises(RuntimeError, match=r"login refused.*SUPPORTBOT_DISCORD_TOKEN"):
        await adapter.start(pipeline)
    await store.close()
    assert world.fake.identify_count == 0


async def test_after_a_restart_operators_keep_working_in_the_old_thread(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm, thread, _ = await _escalate(bot, w.alice)
    await bot.restart_adapter()  # a new process: the thread is found again by its name
    await fake.user_message(thread, w.olga, "Back after our restart, Alice.")
    await fake.wait_until(lambda: "Back after our restart, Alice." in texts_in(fake, dm))
    assert len(fake.threads_of(w.ops["id"])) == 1


async def test_gateway_drop_resume_and_redelivery_answer_each_message_once(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm = fake.dm_channel(w.alice)
    await fake.user_message(dm, w.alice, "first question")
    await bot.settle(inbound=1)
    await fake.drop()
    await fake.user_message(dm, w.alice, "second question")  # missed; replayed on RESUME
    await fake.wait_until(lambda: fake.resume_count == 1)
    await fake.wait_connected()
    assert fake.session is not None
    for event in list(fake.session.events):  # and Discord delivers both once more
        if event.name == "MESSAGE_CREATE" and event.data["author"]["id"] == w.alice["id"]:
            await fake.redeliver(event.seq)
    await bot.settle(inbound=2)
    await asyncio.sleep(0.5)
    texts = texts_in(fake, dm)
    assert len(texts) == 2 and "first question" in texts[0] and "second question" in texts[1]
    assert bot.generator.calls == 2 and fake.identify_count == 1


async def test_invalid_session_reidentify_repeats_no_startup_work(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    _, thread, _ = await _escalate(bot, w.bob)
    await fake.invalidate_session(resumable=False)  # discord.py waits 5 s, then IDENTIFYs
    await fake.wait_until(lambda: fake.identify_count == 2, within=15)
    await fake.wait_connected()
    await asyncio.sleep(0.3)  # on_ready fires again now
    assert bot.adapter.startup_runs == 1
    assert len(fake.calls_to("PUT", r"/applications/\d+/commands")) == 1
    assert len(fake.threads_of(w.ops["id"])) == 1
    await fake.user_message(thread, w.olga, "Still here after the reconnect")
    dm = fake.dm_channel(w.bob)
    await fake.wait_until(lambda: "Still here after the reconnect" in texts_in(fake, dm))


async def test_429_on_a_reply_is_waited_out_and_nothing_is_lost(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm = fake.dm_channel(w.bob)
    fake.inject_429("POST", rf"/channels/{dm['id']}/messages", retry_after=0.4, count=1)
    bot.generator.delay_s = 0.0
    await fake.user_message(dm, w.bob, "Is the 429 fine?")
    await bot.settle(inbound=1)
    posts = fake.calls_to("POST", rf"/channels/{dm['id']}/messages")
    assert [c.status for c in posts] == [429, 200]
    assert posts[1].at - posts[0].at >= 0.4
    [answer] = texts_in(fake, dm)
    assert "Is the 429 fine?" in answer


async def test_support_thread_per_conversation(world: World, classifier: Any,
                                               tmp_path: Path) -> None:
    fake = world.fake
    async with running_bot(world, classifier, tmp_path, recommender=ArticleShelf(),
                           use_threads=True) as b:
        first = await fake.user_message(world.support, world.alice, "Can I change my address?")
        await b.settle(inbound=1)
        [thread] = fake.threads_of(world.support["id"])
        assert thread["id"] == first["id"]  # a thread started from her message
        await fake.user_message(fake.channels[int(thread["id"])], world.alice, "It's urgent")
        await b.settle(inbound=2)
        texts = texts_in(fake, thread)
        assert len(texts) == 2 and "It's urgent" in texts[1]
        assert not fake.bot_messages(world.support["id"])
        [convo] = await b.store.query("SELECT conversation_key FROM conversations")
        assert convo["conversation_key"] == thread["id"]


async def test_customer_commands_and_sticker(bot: Bot) -> None:
    fake, w = bot.fake, bot.world
    dm = fake.dm_channel(w.alice)
    await fake.user_message(dm, w.alice, "/help")
    await fake.user_message(dm, w.alice, "", sticker=True)
    await bot.settle(inbound=2)
    prompt = bot.settings.prompt
    assert texts_in(fake, dm) == [prompt.help_text, prompt.attachment_text]
    assert bot.generator.calls == 0




# -- grounded answers: citations as links, placeholders never shown --------------------------------

FIXTURE_KB = Path(__file__).parent / "fixtures" / "kb"
PLACEHOLDER_ANSWER = (
    "Your order {{Order Number}} arrives in three to five working days. Follow it on "
    "{{Website URL}} or call {{Customer Support Phone Number}} if it is late."
)


async def test_grounded_reply_cites_articles_as_links_and_hides_placeholders(
        world: World, classifier: Any, tmp_path: Path) -> None:
    fake = world.fake
    generator = ScriptedGenerator(lambda _: PLACEHOLDER_ANSWER, delay_s=0.03)
    async with running_bot(world, classifier, tmp_path, generator=generator, grounded=True,
                           sections={"recommender": {"knowledge_dir": str(FIXTURE_KB),
                                                     "enabled": False}}) as bot:
        dm = fake.dm_channel(world.alice)
        await fake.user_message(dm, world.alice,
                                "How long does delivery take? My order number is 55123.")
        await bot.settle(inbound=1)
    [message] = fake.bot_messages(dm["id"])
    body, sources = message["content"].rsplit("\n", 1)
    assert "55123" in body, "the customer's own order number fills its placeholder"
    assert sources == ("-# Sources: [How long delivery takes]"
                       "(<https://help.example.com/delivery-times>)")
    written = [c.body["content"] for c in fake.calls if c.method in ("POST", "PATCH")
               and "/messages" in c.path and isinstance(c.body, dict) and "content" in c.body]
    assert len(written) >= 2, "the reply was streamed (a preview, then the final text)"
    for text in written:
        assert "{" not in text and "}" not in text, text


def test_citations_link_only_absolute_urls() -> None:
    adapter = DiscordAdapter(DiscordSettings(), "token")
    [text] = adapter.render(Reply("See below.", citations=(
        Citation("contact-us", "Contacting our support team", "/help/contact-us"),
        Citation("odd", "Refunds [EU] *new*", "https://help.example.com/refunds"),
    )))
    assert text == ("See below.\n-# Sources: Contacting our support team, "
                    "[Refunds \\[EU\\] \\*new\\*](<https://help.example.com/refunds>)")
