"""The periodic sentiment report, as operators see it on each platform.

``OperatorChannel.post_report(summary, chart_png)`` is driven directly (the scheduler that
calls it is tested elsewhere): Telegram uploads the chart with ``sendPhoto`` (multipart)
into the operator group, Discord attaches it to a message in the operator channel
(``payload_json`` + ``files[0]``), the terminal saves it and prints the path. The fakes
keep the uploaded bytes, so the tests check the very PNG that left the adapter.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import discord
import pytest
from telegram.error import BadRequest

from adapters.discord import REPORT_FILENAME as DISCORD_FILENAME
from adapters.telegram import REPORT_FILENAME as TELEGRAM_FILENAME
from adapters.terminal import TerminalNotices
from tests.fakes.chat_driver import NeutralClassifier, ScriptedGenerator
from tests.fakes.discord_driver import World, discord_world, running_bot, texts_in
from tests.fakes.telegram_driver import OPERATOR_GROUP, Start, telegram_harnesses, texts

# PTB 22's own RetryAfter.__init__ reads its deprecated int ``retry_after``.
pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")


def png(width: int = 64, height: int = 32) -> bytes:
    """A real PNG (a grey gradient), built by hand so the test needs no plotting library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + bytes((x * 255 // width) for x in range(width))
                    for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


SHORT = ('Week 48: negative share 12% <up 3 points> & 4 escalations; @everyone look\n'
         '- "refund_delay": 3 *negative* messages')
LONG = "\n".join(
    f"Conversation {i}: customers asked about refunds & delivery, negative share {i % 17}%."
    for i in range(60)
)  # ~4,800 characters: over a caption and over a Discord message


# --- Telegram ---------------------------------------------------------------------------------


@pytest.fixture
async def telegram(tmp_path: Path) -> AsyncIterator[Start]:
    async with telegram_harnesses(tmp_path, ScriptedGenerator(), NeutralClassifier()) as start:
        yield start


async def test_telegram_report_is_a_photo_with_the_summary_as_caption(telegram: Start) -> None:
    h = await telegram()
    room = h.adapter.operator_room
    assert room is not None
    chart = png()
    h.fake.inject("sendPhoto", 502)  # a passing server error: retried with the same bytes
    await room.post_report(SHORT, chart)

    (photo,) = h.fake.bot_messages(OPERATOR_GROUP)
    assert photo.kind == "photo" and photo.thread_id is None  # the group's General topic
    assert photo.text == SHORT, "the caption shows the summary verbatim, markup escaped"
    assert h.fake.photo_bytes(OPERATOR_GROUP, photo.message_id) == chart
    uploads = h.fake.uploads("sendPhoto")
    assert [u.data for u in uploads] == [chart, chart]
    assert uploads[0].filename == TELEGRAM_FILENAME
    assert [c.status for c in h.fake.calls_to("sendPhoto")] == [502, 200]


async def test_telegram_long_report_caption_then_the_summary_as_text(telegram: Start) -> None:
    h = await telegram()
    room = h.adapter.operator_room
    assert room is not None
    chart = png(800, 400)
    await room.post_report(LONG, chart)

    photo, *rest = h.fake.bot_messages(OPERATOR_GROUP)
    assert photo.kind == "photo" and photo.text == LONG.split("\n")[0]
    assert h.fake.photo_bytes(OPERATOR_GROUP, photo.message_id) == chart
    assert len(rest) == 2 and all(m.kind == "text" for m in rest)
    assert "\n".join(m.text for m in rest).split("\n") == LONG.split("\n")


async def test_telegram_refuses_what_is_not_a_picture(telegram: Start) -> None:
    h = await telegram()
    room = h.adapter.operator_room
    assert room is not None
    with pytest.raises(BadRequest, match=r"(?i)image_process_failed"):
        await room.post_report(SHORT, b"%PDF-1.7 not a chart")
    with pytest.raises(BadRequest, match=r"(?i)photo_invalid_dimensions"):
        await room.post_report(SHORT, png(2100, 100))  # a ratio over 20
    assert texts(h.fake, OPERATOR_GROUP) == []


# --- Discord ----------------------------------------------------------------------------------


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with discord_world() as w:
        yield w


async def test_discord_report_is_a_message_with_the_chart_attached(world: World,
                                                                   tmp_path: Path) -> None:
    chart = png()
    fake = world.fake
    async with running_bot(world, NeutralClassifier(), tmp_path) as bot:
        route = rf"/channels/{world.ops['id']}/messages"
        fake.inject_server_error("POST", route, status=503)  # discord.py gives up at once
        await bot.adapter.operator_channel.post_report(SHORT, chart)

    (message,) = fake.bot_messages(world.ops["id"])
    assert message["content"] == discord.utils.escape_markdown(SHORT), "shown as written"
    (attachment,) = message["attachments"]
    assert attachment["filename"] == DISCORD_FILENAME
    assert attachment["content_type"] == "image/png" and attachment["width"] == 64
    assert fake.attachment_bytes(attachment) == chart
    failed, sent = fake.calls_to("POST", route)
    assert (failed.status, sent.status) == (503, 200), "the adapter retried the 503"
    (part,) = sent.files
    assert part.name == "files[0]" and part.data == chart
    assert sent.body["attachments"] == [{"id": 0, "filename": DISCORD_FILENAME}]
    assert sent.body["allowed_mentions"]["parse"] == []
    assert message["mention_everyone"] is False, "the summary pings nobody"


async def test_discord_long_report_continues_in_further_messages(world: World,
                                                                 tmp_path: Path) -> None:
    chart = png(640, 320)
    fake = world.fake
    async with running_bot(world, NeutralClassifier(), tmp_path) as bot:
        await bot.adapter.operator_channel.post_report(LONG, chart)

    first, *rest = fake.bot_messages(world.ops["id"])
    assert [fake.attachment_bytes(a) for a in first["attachments"]] == [chart]
    assert rest and all(not m["attachments"] for m in rest)
    shown = texts_in(fake, world.ops)
    assert all(len(t) <= 2000 for t in shown)
    assert "\n".join(shown).split() == LONG.split()


# --- the terminal -------------------------------------------------------------------------------


async def test_terminal_report_prints_the_summary_and_where_the_chart_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chart = png()
    await TerminalNotices(tmp_path / "reports").post_report(SHORT, chart)
    out = capsys.readouterr().out
    assert out.startswith(f"[report]\n{SHORT}\n[chart: ")
    path = Path(out.splitlines()[-1].removeprefix("[chart: ").removesuffix("]"))
    assert path.parent == tmp_path / "reports" and path.suffix == ".png"
    assert await asyncio.to_thread(path.read_bytes) == chart
