"""A customer's tab that lost its connection catches up when it reconnects, in Chromium.

The page's WebSocket is closed and, while the network is "down", every reconnect fails
(the page's own ``WebSocket`` is pointed at a path the server refuses, so the page goes
through its real reconnect loop). An operator answers in that time; the answer is stored
but reaches no tab. When the network is back the page shows it, and everything else it
showed before, exactly once; a message typed while offline is sent once and shown once.
A reply sent while the server reads the transcript for a reconnecting tab shows once too.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from core.store import SQLiteStore
from tests.conftest import Desk, wait_for
from tests.test_browser import Tab
from tests.test_end_to_end import operator_headers

pytestmark = pytest.mark.browser

# Keeps every socket the page opens; while ``__offline`` is set new ones go to a path the
# server answers with 404, as a dead network or a restarting service would fail them; while
# ``__loseAcks`` is set, acks are lost on the way (the message was stored, the tab never knew).
# ``__frames`` and ``__sent`` keep what the page received and sent.
FLAKY_NETWORK = """
window.__sockets = [];
window.__offline = false;
window.__loseAcks = false;
window.__frames = [];
window.__sent = [];
const RealWebSocket = window.WebSocket;
window.WebSocket = class extends RealWebSocket {
  constructor(url, protocols) {
    super(window.__offline ? String(url).replace("/ws?", "/offline?") : url, protocols);
    window.__sockets.push(this);
  }
  send(data) {
    window.__sent.push(JSON.parse(data));
    super.send(data);
  }
  set onmessage(handler) {
    super.onmessage = ev => {
      const frame = JSON.parse(ev.data);
      window.__frames.push(frame);
      if (window.__loseAcks && frame.type === "ack") return;
      handler(ev);
    };
  }
};
"""
QUESTION = "Where is my order?"
ANSWER = "Your parcel is with the courier and arrives tomorrow."
TYPED_OFFLINE = "Are you still there?"
THANKS = "Thanks"


async def _texts(page: Page, selector: str) -> list[str]:
    return [t.strip() for t in await page.locator(selector).all_text_contents()]


async def _chat_tab(desk: Desk, browser: Browser, first: str) -> tuple[BrowserContext, Tab, str]:
    """A new tab on the flaky network whose customer said ``first`` and has the bot's
    answer; its context, the tab and the chat session id."""
    context = await browser.new_context()
    await context.add_init_script(FLAKY_NETWORK)
    tab = Tab(await context.new_page())
    page = tab.page
    await page.goto(f"{desk.base}/")
    await expect(page.locator("body")).to_have_attribute("data-connected", "1")
    session = await page.evaluate("localStorage.getItem('supportbot.session')")
    await page.fill("#input", first)
    await page.press("#input", "Enter")
    await expect(page.locator("#log .msg.bot .text")).to_have_text(
        [desk.generator.answer], timeout=60_000)
    return context, tab, session


async def _ask_for_a_person(page: Page) -> None:
    await page.click("#human")
    await expect(page.locator("#log .msg.system")).to_have_count(1, timeout=30_000)


async def _reconnect_and_redraw(page: Page) -> None:
    """Drop the socket and wait until the page's reconnect has redrawn the log (a marker
    element is gone)."""
    await page.evaluate("""() => {
      const stale = document.createElement("div");
      stale.id = "stale";
      document.getElementById("log").appendChild(stale);
      window.__sockets.at(-1).close();
    }""")
    await expect(page.locator("#stale")).to_have_count(0, timeout=20_000)


async def test_a_reply_sent_while_the_tab_was_away_shows_once_after_reconnect(
    desk: Desk, browser: Browser
) -> None:
    context, tab, session = await _chat_tab(desk, browser, QUESTION)
    page = tab.page
    connected = page.locator("body")
    await _ask_for_a_person(page)
    system_text = (await _texts(page, "#log .msg.system .text"))[0]

    # The network goes down: the socket closes and reconnects fail.
    await page.evaluate("window.__offline = true; window.__sockets.at(-1).close()")
    await expect(connected).to_have_attribute("data-connected", "")
    await wait_for(lambda: not desk.web._sockets.get(session), 10)
    await page.fill("#input", TYPED_OFFLINE)
    await page.press("#input", "Enter")

    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"{desk.base}/api/operator/tickets", headers=operator_headers())
        ticket = (await resp.json())["tickets"][-1]["id"]
        resp = await http.post(f"{desk.base}/api/operator/tickets/{ticket}/reply",
                               json={"text": ANSWER}, headers=operator_headers())
        assert resp.status == 200
    sent = await desk.store.query(
        "SELECT text FROM messages WHERE sender = 'operator' AND status = 'sent'")
    assert [r["text"] for r in sent] == [ANSWER]
    assert await _texts(page, "#log .msg.operator .text") == []  # nowhere to show it yet
    refused = await page.evaluate("window.__sockets.length")

    async def refused_again() -> bool:  # the page really tried, and failed, to reconnect
        return await page.evaluate("window.__sockets.length") > refused

    await wait_for(refused_again, 10)

    # The network is back: the page reconnects and catches up.
    await page.evaluate("window.__offline = false")
    await expect(connected).to_have_attribute("data-connected", "1", timeout=20_000)
    await expect(page.locator("#log .msg.operator .text")).to_have_text([ANSWER])
    await expect(page.locator("#log .msg.customer .text")).to_have_text(
        [QUESTION, TYPED_OFFLINE])
    await wait_for(lambda: _stored_in(desk, TYPED_OFFLINE), 20)
    assert await _texts(page, "#log .msg.bot .text") == [desk.generator.answer]
    said = await desk.store.query(
        "SELECT text FROM messages WHERE sender = 'system' AND status = 'sent' ORDER BY id")
    assert len(said) == 2 and said[0]["text"] == system_text  # then "... has joined the chat"
    assert await _texts(page, "#log .msg.system .text") == [r["text"] for r in said]
    assert await _texts(page, "#log .msg.operator .text") == [ANSWER]
    assert await _texts(page, "#log .msg.customer .text") == [QUESTION, TYPED_OFFLINE]
    rows = await desk.store.query("SELECT text FROM messages WHERE direction = 'in' "
                                  "AND text != '' ORDER BY id")
    assert [r["text"] for r in rows] == [QUESTION, TYPED_OFFLINE]

    # A second drop and reconnect with nothing new redraws the same chat, not a copy of it.
    before = await _texts(page, "#log .msg .text")
    await _reconnect_and_redraw(page)
    await expect(page.locator("#log .msg .text")).to_have_text(before)
    tab.assert_clean()
    await context.close()


async def _stored_in(desk: Desk, text: str) -> bool:
    rows = await desk.store.query(
        "SELECT status FROM messages WHERE direction = 'in' AND text = ?", [text])
    return len(rows) == 1 and rows[0]["status"] not in ("received", "processing")


async def test_a_message_stored_before_its_ack_was_lost_is_shown_once_after_reconnect(
    desk: Desk, browser: Browser
) -> None:
    context, tab, _ = await _chat_tab(desk, browser, QUESTION)
    page = tab.page

    await page.evaluate("window.__loseAcks = true")
    await page.fill("#input", TYPED_OFFLINE)
    await page.press("#input", "Enter")
    await wait_for(lambda: _stored_in(desk, TYPED_OFFLINE), 30)
    await expect(page.locator("#log .msg.bot .text")).to_have_text(
        [desk.generator.answer] * 2, timeout=60_000)
    await page.evaluate("window.__loseAcks = false")
    await _reconnect_and_redraw(page)
    # The transcript names the unacknowledged message by its id: it is not sent again ...
    sent = await page.evaluate(
        f"window.__sent.filter(f => f.text === {TYPED_OFFLINE!r}).length")
    assert sent == 1
    # ... and is in the transcript once, not drawn again from the tab's memory.
    assert await _texts(page, "#log .msg.customer .text") == [QUESTION, TYPED_OFFLINE]
    assert await _texts(page, "#log .msg.bot .text") == [desk.generator.answer] * 2
    rows = await desk.store.query("SELECT text FROM messages WHERE direction = 'in' ORDER BY id")
    assert [r["text"] for r in rows] == [QUESTION, TYPED_OFFLINE]
    tab.assert_clean()
    await context.close()


async def _offline_then_back(page: Page, desk: Desk, session: str, typed: str) -> None:
    """The network drops, the customer types ``typed`` meanwhile, the network comes back."""
    connected = page.locator("body")
    await page.evaluate("window.__offline = true; window.__sockets.at(-1).close()")
    await expect(connected).to_have_attribute("data-connected", "")
    await wait_for(lambda: not desk.web._sockets.get(session), 10)
    await page.fill("#input", typed)
    await page.press("#input", "Enter")
    refused = await page.evaluate("window.__sockets.length")

    async def refused_again() -> bool:
        return await page.evaluate("window.__sockets.length") > refused

    await wait_for(refused_again, 10)
    await page.evaluate("window.__offline = false")
    await expect(connected).to_have_attribute("data-connected", "1", timeout=20_000)


async def test_the_same_text_typed_again_offline_is_shown_and_sent(
    desk: Desk, browser: Browser
) -> None:
    """Only the first "Thanks" was stored when the tab reconnects: the second is the tab's
    own (another client id), so it is drawn again and sent, not taken for the first."""
    context, tab, session = await _chat_tab(desk, browser, THANKS)
    page = tab.page

    await _offline_then_back(page, desk, session, THANKS)
    await expect(page.locator("#log .msg.customer .text")).to_have_text([THANKS, THANKS])

    async def both_stored() -> bool:
        rows = await desk.store.query(
            "SELECT status FROM messages WHERE direction = 'in' AND text = ?", [THANKS])
        return len(rows) == 2 and all(r["status"] not in ("received", "processing")
                                      for r in rows)

    await wait_for(both_stored, 30)
    await expect(page.locator("#log .msg.bot .text")).to_have_text(
        [desk.generator.answer] * 2, timeout=60_000)
    assert await _texts(page, "#log .msg.customer .text") == [THANKS, THANKS]
    tab.assert_clean()
    await context.close()


async def test_a_reply_sent_while_the_transcript_is_read_shows_once(
    desk: Desk, browser: Browser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator answers while the server reads the transcript for a reconnecting tab:
    first just after it was read (the answer is not in it), then just before (it is in it
    and also broadcast to the new socket). Each time the tab shows the answer once."""
    context, tab, _ = await _chat_tab(desk, browser, QUESTION)
    page = tab.page
    await _ask_for_a_person(page)

    http = aiohttp.ClientSession()
    resp = await http.get(f"{desk.base}/api/operator/tickets", headers=operator_headers())
    ticket = (await resp.json())["tickets"][-1]["id"]

    async def operator_says(text: str) -> None:
        resp = await http.post(f"{desk.base}/api/operator/tickets/{ticket}/reply",
                               json={"text": text}, headers=operator_headers())
        assert resp.status == 200, await resp.text()

    armed: dict[str, str] = {}
    real = SQLiteStore.transcript

    async def racing(store: SQLiteStore, conversation_id: int, limit: int = 200) -> Any:
        when, text = armed.popitem() if armed else ("", "")
        if when == "before":
            await operator_says(text)
        lines = await real(store, conversation_id, limit)
        if when == "after":
            await operator_says(text)
        return lines

    monkeypatch.setattr(SQLiteStore, "transcript", racing)
    try:
        for when, text, shown in (("after", ANSWER, [ANSWER]),
                                  ("before", TYPED_OFFLINE, [ANSWER, TYPED_OFFLINE])):
            armed[when] = text
            frames = await page.evaluate("window.__frames.length")
            await page.evaluate("window.__sockets.at(-1).close()")

            async def got_it_live(text: str = text, frames: int = frames) -> bool:
                return await page.evaluate(
                    f"window.__frames.slice({frames}).some(f => f.text === {text!r})")

            await wait_for(got_it_live, 20)  # the answer's own frame reached the new socket
            assert not armed
            await expect(page.locator("#log .msg.operator .text")).to_have_text(shown)
            types = await page.evaluate(f"window.__frames.slice({frames}).map(f => f.type)")
            assert types[0] == "hello"  # nothing overtakes the hello
    finally:
        await http.close()
    said = await desk.store.query(
        "SELECT text FROM messages WHERE sender = 'system' AND status = 'sent' ORDER BY id")
    assert await _texts(page, "#log .msg.system .text") == [r["text"] for r in said]
    assert await _texts(page, "#log .msg.operator .text") == [ANSWER, TYPED_OFFLINE]
    tab.assert_clean()
    await context.close()
