"""Hostile input, generated: the neutral message type, the web socket, and the Telegram
and Discord rendering that customer and model text passes through.

The web properties run against the real service: Hypothesis runs in a worker thread and
each example is sent over a real WebSocket to the service on the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from telegram import Message

from adapters import discord as dc
from adapters import telegram as tg
from bots.service import Service
from core.messages import Citation, Inbound, Reply, Sender, User, well_formed
from core.store import SQLiteStore
from tests.conftest import make_settings

# Text as customers (and broken clients) send it: any code point, lone surrogates
# included, with the troublemakers over-represented.
NASTY = st.sampled_from([
    "\u200b", "\u200d", "\ufeff", "\u202e", "\u2066", "\u0000", "\x1b[31m", "\r\n", "\ud800",
    "\udfff", "<b>", "</a>", "&amp;", "@everyone", "<@123>", "**", "```", "||", "_", "*",
    "\\", "[x](http://evil)", "\U0001f600", "\u0301",
])
TEXT = st.lists(st.one_of(st.text(max_size=20), NASTY), max_size=30).map("".join)
VALID_TEXT = TEXT.map(well_formed)  # what Telegram and Discord send is valid Unicode
SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)
FRAME = st.one_of(
    JSON,
    st.fixed_dictionaries({"type": st.sampled_from(["click", "command", "bogus", "message"]),
                           "id": st.one_of(TEXT, st.integers(), st.none())},
                          # A list or object as "name" crashes the socket handler (see
                          # test_unhashable_command_name_drops_only_that_socket).
                          optional={"text": JSON, "suggestion": JSON, "name": SCALAR}),
)

# The same examples on every run, so CI is reproducible; run with
# HYPOTHESIS_PROFILE=explore to search fresh examples locally.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# -- the neutral message type ------------------------------------------------------------


@given(text=TEXT, name=TEXT, key=TEXT)
def test_inbound_holds_only_text_that_can_be_stored_and_printed(
    text: str, name: str, key: str
) -> None:
    inbound = Inbound("web", key, User("web", "u", name), "m", text, payload=text)
    for value in (inbound.text, inbound.payload, inbound.conversation_key,
                  inbound.user.display_name):
        value.encode("utf-8")  # never raises
    if "\ud800" not in text and "\udfff" not in text:
        assert inbound.text == text  # nothing valid is changed


async def test_store_round_trips_any_text(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "hostile.db")
    await store.open()
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, int]] = []

    @settings(max_examples=150, deadline=None)
    @given(text=TEXT)
    def prop(text: str) -> None:
        inbound = Inbound("web", "k", User("web", "u"), uuid.uuid4().hex, text)
        stored = asyncio.run_coroutine_threadsafe(store.record_inbound(inbound), loop).result(10)
        assert stored is not None
        seen.append((inbound.text, stored.message_id))

    await asyncio.to_thread(prop)
    rows = await store.query("SELECT id, text FROM messages ORDER BY id")
    assert [(r["text"], r["id"]) for r in rows] == seen
    await store.close()


# -- the web socket ----------------------------------------------------------------------


@pytest.fixture
async def quick_service(tmp_path: Path) -> AsyncIterator[Service]:
    service = Service(make_settings(
        tmp_path, generator={"max_new_tokens": 4}, grounding={"enabled": False},
        recommender={"enabled": False},
    ))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def _answer_to(ws: aiohttp.ClientWebSocketResponse, timeout: float = 60) -> dict[str, Any]:
    """The server's answer to the frame just sent (an ack or an error), skipping the reply
    traffic of messages accepted earlier."""
    while True:
        frame = await ws.receive_json(timeout=timeout)
        if frame["type"] in ("ack", "error"):
            return frame


async def test_any_frame_gets_an_ack_or_a_clear_error(quick_service: Service) -> None:
    base = f"http://127.0.0.1:{quick_service.adapters[0].port}"
    loop = asyncio.get_running_loop()
    answers: list[str] = []
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{base}/ws?session=hypothesis-frames")
        assert (await ws.receive_json(timeout=10))["type"] == "hello"

        async def send(raw: str) -> dict[str, Any]:
            await ws.send_str(raw)
            return await _answer_to(ws)

        @settings(max_examples=120, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(frame=FRAME)
        def prop(frame: Any) -> None:
            answer = asyncio.run_coroutine_threadsafe(send(json.dumps(frame)), loop).result(90)
            answers.append(answer["type"])
            if answer["type"] == "error":
                assert answer["error"] and isinstance(answer["error"], str)
            else:
                assert isinstance(frame, dict) and frame.get("type") in (
                    "message", "click", "command")

        await asyncio.to_thread(prop)
        assert not ws.closed
        assert {"ack", "error"} <= set(answers)
        await ws.close()


async def test_unhashable_command_name_drops_only_that_socket(quick_service: Service) -> None:
    """``{"type": "command", "name": []}`` raises TypeError in the adapter (``[] in set``):
    the socket is dropped, nothing is stored, and the service keeps answering others."""
    base = f"http://127.0.0.1:{quick_service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{base}/ws?session=unhashable-name")
        await ws.receive_json(timeout=10)
        await ws.send_json({"type": "command", "id": "c1", "name": ["human"]})
        answer = await ws.receive(timeout=30)
        if answer.type == aiohttp.WSMsgType.TEXT:  # the fixed adapter answers with an error
            assert json.loads(answer.data)["type"] == "error"
        else:
            assert answer.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                   aiohttp.WSMsgType.CLOSING)
        await ws.close()
        other = await http.ws_connect(f"{base}/ws?session=unhashable-other")
        await other.receive_json(timeout=10)
        await other.send_json({"type": "command", "id": "c2", "name": "help"})
        assert (await _answer_to(other))["type"] == "ack"
        await other.close()
    rows = await quick_service.store.query("SELECT payload FROM messages WHERE direction = 'in'")
    assert rows == [{"payload": "help"}]


async def test_hostile_messages_over_the_socket(quick_service: Service) -> None:
    """1 MB (over the frame limit), just under the limit, bidi overrides and zero-width
    joiners, escaped lone surrogates, deeply nested JSON: each gets an honest answer or a
    closed socket, and the service goes on answering."""
    base = f"http://127.0.0.1:{quick_service.adapters[0].port}"
    store = quick_service.store
    limit = quick_service.settings.web.max_ws_message_bytes
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{base}/ws?session=hostile-socket")
        await ws.receive_json(timeout=10)
        tricky = "\u202eorder\u202c \u200b\u200d\u2066refund\u2069 \U0001f600 ok?"
        await ws.send_json({"type": "message", "id": "bidi", "text": tricky})
        assert (await _answer_to(ws)) == {"type": "ack", "id": "bidi", "duplicate": False}
        await ws.send_str('{"type": "message", "id": "surrogate", "text": "a\\ud800b"}')
        assert (await _answer_to(ws))["type"] == "ack"
        near = "x" * (limit - 200)
        await ws.send_json({"type": "message", "id": "near-limit", "text": near})
        assert (await _answer_to(ws))["type"] == "ack"
        rows = await store.query("SELECT text FROM messages WHERE direction = 'in' ORDER BY id")
        assert [r["text"] for r in rows] == [tricky, "a\ufffdb", near]

        await ws.send_str(json.dumps({"type": "message", "id": "mb", "text": "y" * 1_000_000}))
        closed = await ws.receive(timeout=30)
        while closed.type == aiohttp.WSMsgType.TEXT:  # replies to the earlier messages
            closed = await ws.receive(timeout=30)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG

        deep = ws2 = await http.ws_connect(f"{base}/ws?session=hostile-nesting")
        await ws2.receive_json(timeout=10)
        await deep.send_str("[" * 50_000 + "]" * 50_000)
        answer = await deep.receive(timeout=30)
        if answer.type == aiohttp.WSMsgType.TEXT:
            assert json.loads(answer.data)["type"] == "error"
        else:  # the adapter lets RecursionError through: the socket is dropped, nothing else
            assert answer.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                   aiohttp.WSMsgType.CLOSING)
        await deep.close()

        ws3 = await http.ws_connect(f"{base}/ws?session=hostile-after")
        await ws3.receive_json(timeout=10)
        await ws3.send_json({"type": "message", "id": "after", "text": "Do you ship abroad?"})
        while (frame := await ws3.receive_json(timeout=120))["type"] != "reply":
            pass
        assert frame["text"].strip()
    assert not any(r["text"].startswith("y" * 100) for r in await store.query(
        "SELECT text FROM messages"))


# -- Telegram: HTML parse mode -----------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text += data


@given(text=TEXT, sender=st.sampled_from(list(Sender)),
       cites=st.lists(st.tuples(VALID_TEXT, VALID_TEXT), max_size=3))
def test_telegram_render_never_lets_text_become_markup(
    text: str, sender: Sender, cites: list[tuple[str, str]]
) -> None:
    reply = Reply(text, sender, citations=tuple(Citation(str(i), t, u)
                                                for i, (t, u) in enumerate(cites)))
    pieces = tg.render(reply)
    for piece in pieces:
        parser = _Tags()
        parser.feed(piece)
        parser.close()
        # Only the tags the adapter writes itself: the operator header and source links.
        assert set(parser.tags) <= {"b", "a"}
        assert parser.tags.count("b") <= (1 if sender is Sender.OPERATOR else 0)
        assert parser.tags.count("a") <= sum(u.startswith(("http://", "https://"))
                                             for _, u in cites)
        assert tg.utf16_len(parser.text) <= tg.MAX_MESSAGE


@given(text=VALID_TEXT, limit=st.integers(min_value=20, max_value=200))
def test_telegram_split_keeps_every_word_within_the_limit(text: str, limit: int) -> None:
    pieces = tg.split_text(text, limit)
    assert all(tg.utf16_len(p) <= limit for p in pieces)
    assert "".join("".join(pieces).split()) == "".join(text.split())  # nothing lost


@given(text=VALID_TEXT)
def test_telegram_command_parsing_of_any_text(text: str) -> None:
    message = Message.de_json({
        "message_id": 1, "date": 0, "chat": {"id": 5, "type": "private"},
        "text": "/help@supportbot " + text,
        "entities": [{"type": "bot_command", "offset": 0, "length": 16}],
    }, None)
    assert message is not None
    assert tg.parse_command(message, "SupportBot") == ("help", text.strip())
    assert tg.parse_command(message, "otherbot") is None


@given(chat=st.integers(), thread=st.none() | st.integers())
def test_telegram_conversation_keys_round_trip(chat: int, thread: int | None) -> None:
    target = tg.Target(chat, thread)
    assert tg.Target.parse(target.conversation_key) == target


@given(key=TEXT)
def test_telegram_bad_conversation_key_is_a_clear_error(key: str) -> None:
    try:
        tg.Target.parse(key)
    except ValueError as exc:
        assert "not a Telegram conversation key" in str(exc)


# -- Discord: markdown and mentions ------------------------------------------------------


@given(text=TEXT, limit=st.integers(min_value=40, max_value=400))
def test_discord_split_respects_the_limit_and_closes_fences(text: str, limit: int) -> None:
    repaired = dc.escape_model_markdown(text)
    pieces = dc.split_message(repaired, limit)
    assert all(len(p) <= limit for p in pieces)
    for piece in pieces:
        assert piece.count("```") % 2 == 0  # every code block closed in its own message


@given(text=TEXT)
def test_discord_quote_of_customer_text_stays_one_bounded_block(text: str) -> None:
    quoted = dc.quote(text)
    lines = quoted.split("\n")
    assert all(line.startswith("> ") for line in lines)
    assert sum(len(line) - 2 for line in lines) <= 300


@given(title=TEXT, url=TEXT)
def test_discord_source_link_cannot_be_hijacked(title: str, url: str) -> None:
    link = dc.source_link(title, url)
    linked = link.startswith("[") and link.endswith(f"](<{url}>)")
    label = link[1:-len(f"](<{url}>)")] if linked else link
    if linked:
        assert url.startswith(("http://", "https://"))
        assert not any(ch.isspace() or ch in "<>" for ch in url)
    # Brackets in the title are escaped: it cannot open or close a link of its own.
    assert all(label[i - 1] == "\\" for i, ch in enumerate(label) if ch in "[]")


@given(channel=st.integers(min_value=0), user=st.none() | st.integers(min_value=0))
def test_discord_conversation_keys_round_trip(channel: int, user: int | None) -> None:
    assert dc.channel_of(dc.conversation_key(channel, user)) == channel
