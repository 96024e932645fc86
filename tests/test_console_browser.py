"""The operator console and the analytics page in headless Chromium, against the web
adapter on a real pipeline (real store, real sentiment model; no language model)."""

from __future__ import annotations

import asyncio
import io
import re
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import aiohttp
import numpy as np
import pytest
from PIL import Image
from playwright.async_api import Browser, Route, expect

from core import analytics, report
from tests.conftest import OPERATOR_TOKEN, SEEDED, Desk, seed_history
from tests.test_browser import Tab, open_console
from tests.test_customer_links import seed_conversation
from tests.test_end_to_end import Customer

pytestmark = pytest.mark.browser


async def test_console_queue_claim_reply_resolve_draft_history_and_report(
    desk: Desk, browser: Browser, tmp_path: Path,
) -> None:
    context = await browser.new_context()
    console = await open_console(context, desk.base)
    op = console.page
    await expect(op.locator("#empty")).to_be_visible()

    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, desk.base, "console-browser-1")
        await customer.say("My parcel is three weeks late and nobody answers, this is awful!")
        await customer.until("reply")  # the scripted bot answers the first message
        await customer.ws.send_json({"type": "command", "id": "h1", "name": "human"})
        await customer.until("message", sender="system")

        # The escalation appears without a reload, with its reason, wait and trend.
        ticket = op.locator("#tickets li.ticket")
        await expect(ticket).to_have_count(1, timeout=9_000)
        await expect(ticket).to_contain_text("customer requested")
        await expect(ticket.locator(".waiting")).to_have_text(re.compile(r"^waiting \d+ s$"))
        await expect(ticket.locator(".spark .bar.hot")).to_have_count(1)
        await ticket.click()
        line = op.locator("#transcript .line.customer").first
        await expect(line.locator(".sentiment")).to_have_class(re.compile(r"\bnegative\b"))
        await expect(op.locator("#history li.current")).to_contain_text("this conversation")

        # Agent assist: the bot's draft fills the reply box for the operator to edit.
        await op.click("#draft")
        await expect(op.locator("#reply")).to_have_value(desk.generator.answer)
        await op.fill("#reply", "Hi, I'm Dana. Your parcel ships today.")

        await op.click("#claim")
        await expect(ticket).to_contain_text("claimed by web:Dana")
        assert "Dana" in (await customer.until("message", sender="system"))["text"]
        await op.click("#send-reply")
        frame = await customer.until("message", sender="operator")
        assert frame["text"] == "Hi, I'm Dana. Your parcel ships today."
        await expect(op.locator("#transcript .line.operator")).to_contain_text("ships today")

        await op.click("#resolve")
        await expect(op.locator("#ticket-meta")).to_contain_text("state: resolved")
        await expect(op.locator("#tickets li.ticket")).to_have_count(0)
        assert "resolved" in (await customer.until("message", sender="system"))["text"]
    rows = await desk.store.query("SELECT state, claimed_by, first_response_at FROM tickets")
    assert rows[0]["state"] == "resolved" and rows[0]["claimed_by"] == "web:Dana"
    assert rows[0]["first_response_at"]

    # A report posted to the operator desk shows up in the open console, chart included.
    await seed_history(Path(desk.settings.store.path), datetime.now(UTC))
    conn = analytics.connect_readonly(Path(desk.settings.store.path))
    built = report.build(conn, analytics.TimeRange.last(86400))
    conn.close()
    assert await desk.pipeline.operators.post_report(built.summary, built.chart_png) == 1
    # The seeded day's ten customer messages and this test's one.
    await expect(op.locator("#report-summary")).to_contain_text("Messages: 11 (")
    await expect(op.locator("#report-chart")).to_have_js_property("naturalWidth", 1200)
    await op.screenshot(path=str(tmp_path / "console.png"), full_page=True)
    assert await op.locator("#action-error").text_content() == ""
    console.assert_clean()
    await context.close()


async def test_analytics_page_draws_every_chart_from_the_seeded_store(
    desk: Desk, browser: Browser, tmp_path: Path,
) -> None:
    await seed_history(Path(desk.settings.store.path), datetime.now(UTC))
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    tab = Tab(page)
    await page.goto(f"{desk.base}/operator/analytics")
    await page.fill("#name", "Dana")
    await page.fill("#token", OPERATOR_TOKEN)
    await page.click("#login button[type=submit]")
    await page.select_option("#since", "24h")
    await expect(page.locator("body")).to_have_attribute("data-loaded", "1")
    await expect(page.locator("#range-label")).to_contain_text("by hour")
    await expect(page.locator("#login")).to_be_hidden()

    canvases = page.locator("canvas")
    assert await canvases.count() == 9
    drawn = await page.evaluate(
        "Array.from(document.querySelectorAll('canvas')).map(c => [c.id, "
        "!!Chart.getChart(c), c.width, c.height])")
    for cid, has_chart, width, height in drawn:
        assert has_chart and width > 200 and height > 150, f"{cid} was not drawn"

    def sums(chart: str) -> str:
        return (f"Object.fromEntries(Chart.getChart('{chart}').data.datasets.map(d => "
                "[d.label, d.data.reduce((a, b) => a + (b || 0), 0)]))")

    sentiment = await page.evaluate(sums("chart-sentiment"))
    assert sentiment == {k: SEEDED[k] for k in ("negative", "neutral", "positive")}
    volume = await page.evaluate(sums("chart-volume"))
    assert volume == {"customer messages": SEEDED["messages"], "bot replies": SEEDED["replies"]}
    reasons = await page.evaluate(
        "Chart.getChart('chart-escalation-reasons').data.labels.slice().sort()")
    assert reasons == sorted(r.replace("_", " ") for r in SEEDED["reasons"])
    escalations = await page.evaluate(sums("chart-escalation-rate"))
    assert escalations["escalations"] == SEEDED["escalations"]
    ctr = await page.evaluate("Chart.getChart('chart-ctr').data")
    assert ctr["labels"][0] == "refund-policy (4 shown)" and ctr["datasets"][0]["data"][0] == 25
    feedback = await page.evaluate(sums("chart-feedback"))
    assert feedback == {"positive": 2, "negative": 1, "comment or other": 1}
    kpis = page.locator("#kpis .kpi")
    await expect(kpis.filter(has_text="Customer messages").locator(".value")).to_have_text("10")
    await expect(kpis.filter(has_text="Negative").first.locator(".value")).to_have_text("40.0%")
    await expect(page.locator("#topics-table tbody tr").first).to_contain_text("refund")

    shot = tmp_path / "analytics.png"
    await page.screenshot(path=str(shot), full_page=True)
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"), dtype=int)
    red = (np.abs(pixels - np.array([0xD6, 0x45, 0x45])) < 12).all(axis=-1).sum()
    green = (np.abs(pixels - np.array([0x2E, 0x9D, 0x4A])) < 12).all(axis=-1).sum()
    assert pixels.shape[1] == 1400 and red > 300 and green > 300, (red, green)

    # A month, by day; a bad custom range is named on the page.
    await page.select_option("#since", "30d")
    await expect(page.locator("#range-label")).to_contain_text("by day")
    await page.select_option("#since", "custom")
    await page.fill("#start", "2024-05-02T10:00")
    await page.fill("#end", "2024-05-01T10:00")
    await page.click("#range-form button[type=submit]")
    await expect(page.locator("#range-error")).to_contain_text("is not before end")

    # A slow answer for an older range never overwrites the newer range's charts.
    async def slow_day(route: Route) -> None:
        if "since=24h" in route.request.url:
            await asyncio.sleep(1.0)
        await route.continue_()

    await page.route("**/api/operator/analytics?*", slow_day)
    async with page.expect_response(lambda r: "since=24h" in r.url):
        await page.select_option("#since", "24h")
        await page.select_option("#since", "30d")
        await expect(page.locator("#range-label")).to_contain_text("by day")
    await page.wait_for_timeout(300)  # time for the late answer to be (wrongly) drawn
    await expect(page.locator("#range-label")).to_contain_text("by day")
    assert len(await page.evaluate("Chart.getChart('chart-volume').data.labels")) == 31
    await expect(page.locator("body")).to_have_attribute("data-loaded", "1")
    await expect(page.locator("#range-error")).to_have_text("")
    tab.assert_clean()
    await context.close()


MARKUP = "<img src=x onerror=alert(1)>"


async def test_customer_markup_shows_as_text_in_the_console_and_analytics(
    desk: Desk, browser: Browser,
) -> None:
    """A customer named and writing ``<img src=x onerror=...>``: the queue, the title, the
    transcript, the history and the analytics topics table show those characters; no image
    is made and nothing runs. A reply the server refuses keeps the operator's text."""
    context = await browser.new_context()
    console = await open_console(context, desk.base)
    op = console.page
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            f"{desk.base}/ws?session=markup-customer-1&name={quote(MARKUP, safe='')}")
        customer = Customer(ws)
        assert (await customer.next_frame(10))["type"] == "hello"
        await customer.say(MARKUP)
        await customer.until("reply")
        await ws.send_json({"type": "command", "id": "h1", "name": "human"})
        await customer.until("message", sender="system")

        ticket = op.locator("#tickets li.ticket")
        await expect(ticket).to_have_count(1, timeout=9_000)
        tid = await ticket.get_attribute("data-id")
        await expect(ticket.locator("strong")).to_have_text(f"#{tid} {MARKUP} (web)")
        await expect(ticket.locator(".last")).to_have_text(MARKUP)
        await ticket.click()
        await expect(op.locator("#ticket-title")).to_have_text(f"Ticket #{tid}: {MARKUP}")
        await expect(op.locator("#transcript .line.customer .text").first).to_have_text(MARKUP)
        await expect(op.locator("#history li.current .last")).to_have_text(MARKUP)
        assert await op.locator("#transcript img").count() == 0
        assert await op.locator("#tickets img, #history img, #ticket-title img").count() == 0

        # Refused (too long): the text stays in the box, with the server's reason.
        too_long = "I will look into it. " * 200
        await op.fill("#reply", too_long)
        await op.click("#send-reply")
        await expect(op.locator("#action-error")).to_contain_text("at most 4000 characters")
        await expect(op.locator("#reply")).to_have_value(too_long)
        await ws.close()
    console.assert_clean()

    page = await context.new_page()
    tab = Tab(page)
    await page.goto(f"{desk.base}/operator/analytics")
    await page.fill("#name", "Dana")
    await page.fill("#token", OPERATOR_TOKEN)
    await page.click("#login button[type=submit]")
    await expect(page.locator("body")).to_have_attribute("data-loaded", "1")
    rows = await page.evaluate(
        "Array.from(document.querySelectorAll('#topics-table tbody tr'), tr => "
        "Array.from(tr.cells, td => td.textContent))")
    [onerror] = [row for row in rows if row[0] == "onerror"]
    assert onerror[1] == "1" and onerror[3] == MARKUP, rows
    assert await page.locator("#topics-table img").count() == 0
    tab.assert_clean()
    await context.close()


async def test_operator_links_another_platform_account_and_sees_its_history(
    desk: Desk, browser: Browser,
) -> None:
    """The customer wrote on Telegram yesterday and on the web chat today: the operator
    links the Telegram account by its id from the page, and that conversation joins the
    history with its platform badge; a Discord account with the same name is offered and
    linked with one click; unlinking takes the Telegram one out again."""
    await seed_conversation(desk.store, "telegram", "55501", "R. Park", "tg-chat-55501",
                            "Ordered a blue kettle, order 5521", hours_ago=26)
    await seed_conversation(desk.store, "discord", "8800", "Robin Park", "dc-chan-8800",
                            "is anyone there?", hours_ago=50)
    context = await browser.new_context()
    console = await open_console(context, desk.base)
    op = console.page
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{desk.base}/ws?session=links-browser-1&name=Robin%20Park")
        customer = Customer(ws)
        assert (await customer.next_frame(10))["type"] == "hello"
        await customer.say("Where is my kettle?")
        await customer.until("reply")
        await ws.send_json({"type": "command", "id": "h1", "name": "human"})
        await customer.until("message", sender="system")
        await ws.close()

    ticket = op.locator("#tickets li.ticket")
    await expect(ticket).to_have_count(1, timeout=9_000)
    await ticket.click()
    history = op.locator("#history li")
    await expect(history).to_have_count(1)
    await expect(op.locator("#accounts li")).to_have_count(1)
    candidate = op.locator("#candidates li")
    await expect(candidate).to_have_count(1)
    await expect(candidate).to_contain_text("Robin Park (8800)")

    # An id nobody wrote from is named on the page.
    await op.select_option("#link-platform", "telegram")
    await op.fill("#link-user", "55599")
    await op.click("#link-account")
    await expect(op.locator("#link-error")).to_have_text("no telegram user 55599 has written to us")

    await op.fill("#link-user", "55501")
    await op.click("#link-account")
    await expect(history).to_have_count(2)
    await expect(op.locator("#link-error")).to_have_text("")
    await expect(op.locator("#link-user")).to_have_value("")
    telegram = op.locator("#history li[data-platform=telegram]")
    await expect(telegram.locator(".badge")).to_have_text("telegram")
    await expect(telegram.locator(".last")).to_have_text("Ordered a blue kettle, order 5521")
    await expect(history.first).to_have_class(re.compile(r"\bcurrent\b"))  # newest first
    await expect(op.locator("#accounts li")).to_have_count(2)

    # Picking the offered account links it too; its conversation is the oldest.
    await candidate.locator("button.link").click()
    await expect(history).to_have_count(3)
    await expect(history.last.locator(".badge")).to_have_text("discord")
    await expect(candidate).to_have_count(0)

    await op.locator("#accounts li", has_text="55501").locator("button.unlink").click()
    await expect(history).to_have_count(2)
    await expect(op.locator("#history li[data-platform=telegram]")).to_have_count(0)
    await expect(op.locator("#accounts li")).to_have_count(2)
    events = await desk.store.query(
        "SELECT type, value FROM events WHERE type LIKE 'customer_%' ORDER BY id")
    assert [(e["type"], e["value"]) for e in events] == [
        ("customer_linked", "web:Dana"), ("customer_linked", "web:Dana"),
        ("customer_unlinked", "web:Dana")]
    assert await op.locator("#action-error").text_content() == ""
    console.assert_clean()
    await context.close()
