"""The web adapter's guards: readiness, operator request bodies, cross-site requests, the
operator token kept out of logs, and what a customer's browser is sent."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import async_playwright

from adapters.web import MAX_JSON_DEPTH, MAX_OPERATOR_BODY, WebAdapter
from core.config import WebSettings
from core.messages import Reply, Sender
from core.recommender import RankedSuggestion
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, SEEDED, Desk, seed_history, wait_for
from tests.test_end_to_end import Customer, operator_headers


async def _ticket(http: aiohttp.ClientSession, desk: Desk, session: str) -> tuple[Customer, int]:
    customer = await Customer.connect(http, desk.base, session)
    await customer.ws.send_json({"type": "command", "id": "h1", "name": "human"})
    await customer.until("message", sender="system")
    resp = await http.get(f"{desk.base}/api/operator/tickets", headers=operator_headers())
    return customer, (await resp.json())["tickets"][-1]["id"]


async def test_readyz_waits_for_the_service_and_healthz_does_not(desk: Desk) -> None:
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{desk.base}/readyz")).status == 200
        desk.web.ready = False  # what the service does first when it stops
        resp = await http.get(f"{desk.base}/readyz")
        assert resp.status == 503 and (await resp.json()) == {"ready": False}
        assert (await http.get(f"{desk.base}/healthz")).status == 200


async def test_operator_bodies_must_be_small_flat_json_objects(desk: Desk) -> None:
    async with aiohttp.ClientSession() as http:
        _, tid = await _ticket(http, desk, "guards-body-1")
        url = f"{desk.base}/api/operator/tickets/{tid}/reply"
        headers = {**operator_headers(), "Content-Type": "application/json"}

        nested = '{"text": "hi", "x": ' + "[" * 5000 + "]" * 5000 + "}"
        resp = await http.post(url, data=nested, headers=headers)
        assert resp.status == 400
        assert (await resp.json())["error"] == (
            f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")

        huge = '{"text": "' + "a" * (MAX_OPERATOR_BODY + 10) + '"}'
        resp = await http.post(url, data=huge, headers=headers)
        assert resp.status == 413
        assert (await resp.json())["error"] == (
            f"the request body is larger than {MAX_OPERATOR_BODY} bytes")

        resp = await http.post(url, json={"text": ["not", "text"]}, headers=operator_headers())
        assert resp.status == 400 and "text must be a string" in (await resp.json())["error"]
        resp = await http.post(url, data="[1, 2]", headers=headers)
        assert resp.status == 400 and (await resp.json())["error"] == "body must be a JSON object"

        # Brackets inside strings are text, not nesting.
        resp = await http.post(url, json={"text": "[[[[[[[[[[ {{{{{{{{{{ ok"},
                               headers=operator_headers())
        assert resp.status == 200
        rows = await desk.store.query(
            "SELECT text FROM messages WHERE sender = 'operator' ORDER BY id")
        assert [r["text"] for r in rows] == ["[[[[[[[[[[ {{{{{{{{{{ ok"]


async def test_a_cross_site_form_cannot_act_for_an_operator(desk: Desk, tmp_path: Path) -> None:
    """The console authenticates with a bearer header, never a cookie: a page on another
    origin that posts a form to the operator API (as a CSRF attack would) is refused, and
    the ticket is untouched."""
    async with aiohttp.ClientSession() as http:
        _, tid = await _ticket(http, desk, "guards-csrf-1")

    target = f"{desk.base}/api/operator/tickets/{tid}/resolve"
    attack = (f'<form id="f" method="post" action="{target}" enctype="text/plain">'
              '<input name=\'{"note": "x", "y": "\' value=\'"}\'></form>'
              '<script>document.getElementById("f").submit()</script>')
    async def attacker_page(request: web.Request) -> web.Response:
        return web.Response(text=attack, content_type="text/html")

    evil = web.Application()
    evil.router.add_get("/", attacker_page)
    runner = web.AppRunner(evil)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page()
            async with page.expect_response(target) as caught:
                await page.goto(f"http://localhost:{port}/")
            response = await caught.value
            assert response.status == 401
            assert (await response.json())["error"] == "operator token required"
            await browser.close()
    finally:
        await runner.cleanup()
    ticket = await desk.store.ticket(tid)
    assert ticket["state"] == "open" and ticket["closed_at"] is None

    # With the token but a form's content type, still refused: only JSON acts.
    async with aiohttp.ClientSession() as http:
        resp = await http.post(target, data={"note": "x"}, headers=operator_headers())
        assert resp.status == 415
        assert (await resp.json())["error"] == "operator requests must be application/json"
    assert (await desk.store.ticket(tid))["state"] == "open"


def test_a_generated_operator_token_is_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "data" / "operator-token"
    adapter = WebAdapter(WebSettings(port=0), None, token_file=token_file)
    assert len(adapter.token) >= 20
    assert adapter.token not in caplog.text
    assert f"written to {token_file} (mode 600)" in caplog.text
    assert token_file.read_text().strip() == adapter.token
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600


async def test_customers_are_not_sent_the_recommender_arm(desk: Desk) -> None:
    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, desk.base, "guards-arm-1")
        suggestion = RankedSuggestion("returns", "How returns work", "/kb/returns", arm="als")
        await desk.web.deliver("guards-arm-1", Reply("See this", Sender.BOT, (suggestion,)))
        frame = await customer.until("reply")
    assert frame["suggestions"] == [
        {"id": "returns", "title": "How returns work", "url": "/kb/returns"}]


async def test_analytics_api_needs_the_token_and_a_valid_range(desk: Desk) -> None:
    await seed_history(Path(desk.settings.store.path), datetime.now(UTC))
    url = f"{desk.base}/api/operator/analytics"
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{url}?since=24h")).status == 401
        resp = await http.get(f"{url}?since=soon", headers=operator_headers())
        assert resp.status == 400
        assert "since 'soon' is not a duration" in (await resp.json())["error"]
        resp = await http.get(f"{url}?since=24h", headers=operator_headers())
        data = await resp.json()
        assert data["sentiment"]["total"] == SEEDED["messages"]
        assert data["escalations"]["total"] == SEEDED["escalations"]
        resp = await http.get(f"{desk.base}/api/operator/tickets/424242/history",
                              headers=operator_headers())
        assert resp.status == 404 and "no ticket 424242" in (await resp.json())["error"]
        _, tid = await _ticket(http, desk, "guards-history-1")
        history = await wait_for(lambda: _history(http, desk, tid))
        assert history[0]["current"] and history[0]["platform"] == "web"


async def _history(http: aiohttp.ClientSession, desk: Desk, tid: int) -> list:
    resp = await http.get(f"{desk.base}/api/operator/tickets/{tid}/history",
                          headers=operator_headers())
    return (await resp.json())["conversations"]


async def test_a_reply_that_cannot_be_delivered_is_a_json_502_naming_why(
    desk: Desk, caplog: pytest.LogCaptureFixture,
) -> None:
    """A ticket of a Telegram customer while only the web adapter runs: delivery fails for
    real; the console gets a 502 whose JSON says why (not a bare 500), and it is logged."""
    path = Path(desk.settings.store.path)
    now = datetime.now(UTC)
    await seed_history(path, now)
    conn = sqlite3.connect(path, isolation_level=None)
    tid = conn.execute(
        "INSERT INTO tickets (conversation_id, state, reason, created_at, announced_at) "
        "VALUES (902, 'claimed', 'customer_requested', ?, ?) RETURNING id",
        (now.isoformat(timespec="milliseconds"),) * 2,
    ).fetchone()[0]
    conn.execute("UPDATE tickets SET claimed_by = 'web:Dana' WHERE id = ?", (tid,))
    conn.close()
    url = f"{desk.base}/api/operator/tickets/{tid}"
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{url}/reply", json={"text": "On its way."},
                               headers=operator_headers())
        assert resp.status == 502 and resp.content_type == "application/json"
        error = (await resp.json())["error"]
        assert error == "reply failed: RuntimeError: no adapter for platform 'telegram' is running"
        resp = await http.post(f"{url}/frobnicate", json={}, headers=operator_headers())
        assert resp.status == 404 and (await resp.json()) == {"error": "no action 'frobnicate'"}
        resp = await http.get(url)
        assert resp.status == 401 and (await resp.json()) == {"error": "operator token required"}
    assert f"operator reply on ticket {tid} failed" in caplog.text


async def test_hostile_customer_frames_get_error_frames_and_the_socket_stays_open(
    desk: Desk,
) -> None:
    """JSON nested 100,000 levels deep (json.loads gives up with RecursionError) and a
    command whose name is a list are answered with an error frame; the same socket then
    carries a normal message to a real answer, and only that message is stored."""
    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, desk.base, "guards-frames-1")
        deep = '{"type": "message", "id": "deep1", "text": ' + "[" * 100_000 \
            + "]" * 100_000 + "}"
        assert len(deep) < desk.settings.web.max_ws_message_bytes
        await customer.ws.send_str(deep)
        assert await customer.next_frame(10) == {
            "type": "error", "error": "frames must be JSON objects"}
        await customer.ws.send_json({"type": "command", "id": "cmd1", "name": ["x"]})
        assert await customer.next_frame(10) == {
            "type": "error", "error": "unknown frame type 'command'"}
        await customer.ws.send_json({"type": "command", "id": "cmd2", "name": {"a": 1}})
        assert (await customer.next_frame(10))["error"] == "unknown frame type 'command'"

        client_id = await customer.say("Where is my order?")
        ack = await customer.next_frame(10)
        assert ack == {"type": "ack", "id": client_id, "duplicate": False}
        reply = await customer.until("reply", timeout=60)
        assert reply["text"] == desk.generator.answer
        assert not customer.ws.closed
    rows = await desk.store.query("SELECT text FROM messages WHERE direction = 'in'")
    assert [r["text"] for r in rows] == ["Where is my order?"]


async def test_the_hello_transcript_names_messages_and_replies_by_their_ids(desk: Desk) -> None:
    """A reconnecting tab matches its unacknowledged messages and the replies it already
    has by id, not by text: the hello's lines carry the client id and the reply id."""
    session = "guards-ids-1"
    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, desk.base, session)
        asked = await customer.say("Where is my order?")
        reply = await customer.until("reply")

        async def answered() -> bool:
            rows = await desk.store.query(
                "SELECT 1 FROM messages WHERE direction = 'out' AND status = 'sent'")
            return len(rows) == 1

        await wait_for(answered, 30)
        await customer.ws.close()
        again = await http.ws_connect(f"{desk.base}/ws?session={session}")
        hello = await again.receive_json(timeout=10)
        await again.close()
    assert hello["type"] == "hello"
    assert hello["transcript"] == [
        {"direction": "in", "sender": "customer", "text": "Where is my order?", "id": asked},
        {"direction": "out", "sender": "bot", "text": reply["text"], "reply": reply["reply"]},
    ]
