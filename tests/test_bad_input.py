"""Hostile or broken input gets a clear answer and never takes the service down."""

from __future__ import annotations

import aiohttp

from tests.test_end_to_end import Customer


async def _still_answers(customer: Customer) -> None:
    await customer.say("Can I change my delivery address?")
    reply = await customer.until("reply")
    assert reply["text"].strip()


async def test_empty_and_whitespace_messages(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, base, "bad-input-empty")
        await customer.say("   \n\t ")
        notice = await customer.until("message", sender="system")
        assert "empty" in notice["text"]
        await _still_answers(customer)


async def test_huge_message_is_truncated_with_notice_and_logged_whole(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    huge = ("my order is late " * 6250)[:100_000]
    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, base, "bad-input-huge")
        await customer.say(huge)
        notice = await customer.until("message", sender="system")
        assert "first 4,000 characters" in notice["text"]
        # Then the message itself is dealt with (answered, or handed to a person: a wall of
        # "late" is very negative), from its first part.
        while True:
            frame = await customer.next_frame()
            if frame["type"] in ("reply", "message") and frame is not notice:
                break
    rows = await web_service.store.query(
        "SELECT length(text) AS n FROM messages WHERE direction = 'in'")
    assert rows[0]["n"] == 100_000


async def test_control_characters_are_dropped(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, base, "bad-input-control")
        await customer.say("\x00How do I\x07 return\u202e an item?\x7f\x1b")
        frame = await customer.until("reply")
        assert frame["text"].strip()
        rows = await web_service.store.query(
            "SELECT text FROM messages WHERE direction = 'in' ORDER BY id LIMIT 1")
        assert rows[0]["text"].startswith("\x00How do I"), "the original is logged whole"
        await customer.say("\x00\x01\x02\u200b")
        notice = await customer.until("message", sender="system")
        assert "empty" in notice["text"]
        await _still_answers(customer)


async def test_malformed_frames_get_errors(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, base, "bad-input-frames")
        await customer.ws.send_str("this is not json")
        assert (await customer.until("error"))["error"] == "frames must be JSON objects"
        await customer.ws.send_json({"type": "message", "text": 42})
        assert "string" in (await customer.until("error"))["error"]
        await customer.ws.send_json({"type": "launch-missiles"})
        assert "unknown frame type" in (await customer.until("error"))["error"]
        await customer.ws.send_bytes(b"\xff\xfe{not utf-8")
        assert (await customer.until("error"))["error"] == "messages must be UTF-8"
        await _still_answers(customer)


async def test_invalid_utf8_text_frame_closes_only_that_socket(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        raw = await http.ws_connect(f"{base}/ws?session=bad-input-raw-utf8")
        await raw.receive_json(timeout=10)
        # A TEXT frame whose payload is not UTF-8 violates RFC 6455: the server closes it
        # with 1007 and carries on serving everyone else.
        await raw._writer.send_frame(b"\xc3\x28", aiohttp.WSMsgType.TEXT)
        msg = await raw.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        customer = await Customer.connect(http, base, "bad-input-after-utf8")
        await _still_answers(customer)


async def test_bad_session_id_rejected(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"{base}/ws?session=../../etc/passwd")
        assert resp.status == 400
        assert "session" in await resp.text()
