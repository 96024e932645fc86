"""The whole pipeline through the web adapter, as a customer and an operator see it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp

from tests.conftest import OPERATOR_TOKEN, wait_for

ANGRY = [
    "This is ridiculous, my order is three weeks late and nobody answers!!!",
    "Worst service ever. I am furious, I want my money back NOW.",
]


class Customer:
    """A customer's browser tab, reduced to its WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, base: str, session: str) -> Customer:
        ws = await http.ws_connect(f"{base}/ws?session={session}")
        customer = cls(ws)
        hello = await ws.receive_json(timeout=10)
        assert hello["type"] == "hello"
        return customer

    async def say(self, text: str, kind: str = "message", **extra: Any) -> str:
        client_id = uuid.uuid4().hex[:10]
        await self.ws.send_json({"type": kind, "id": client_id, "text": text, **extra})
        return client_id

    async def next_frame(self, timeout: float = 60) -> dict[str, Any]:
        frame = await self.ws.receive_json(timeout=timeout)
        self.frames.append(frame)
        return frame

    async def until(self, frame_type: str, sender: str | None = None, timeout: float = 90):
        """The next frame of this type; ``timeout`` bounds the whole wait, so a frame that
        never comes fails the test instead of holding the suite."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next_frame(timeout)
                if frame["type"] == frame_type and (
                        sender is None or frame.get("sender") == sender):
                    return frame


def operator_headers(name: str = "Dana") -> dict[str, str]:
    return {"Authorization": f"Bearer {OPERATOR_TOKEN}", "X-Operator-Name": name}


async def test_customer_operator_round_trip(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    store = web_service.store
    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, base, "e2e-session-1")

        # A question gets a streamed answer from the real model.
        await customer.say("How can I track my order?")
        frames = []
        while True:
            frame = await customer.next_frame()
            frames.append(frame)
            if frame["type"] == "reply":
                break
        deltas = [f for f in frames if f["type"] == "delta"]
        # Checked sentences stream as they pass; nothing shown is taken back.
        assert deltas, "the answer should show before it is complete"
        assert all(frames[-1]["text"].startswith(d["text"].strip()) for d in deltas)
        assert deltas[-1]["text"].strip() and frames[-1]["text"].strip()
        assert frames[-1]["sender"] == "bot"
        assert frames[-1]["citations"], "a grounded answer names its help articles"
        assert all(c["url"].startswith("https://") for c in frames[-1]["citations"])

        async def answered() -> list[dict]:
            rows = await store.query(
                "SELECT direction, sender, text, status, sentiment FROM messages ORDER BY id")
            return rows if rows[0]["status"] == "answered" else []

        rows = await wait_for(answered, timeout=10)
        assert rows[0]["text"] == "How can I track my order?"
        assert rows[0]["status"] == "answered" and rows[0]["sentiment"] is not None
        assert rows[1]["direction"] == "out" and rows[1]["status"] == "sent"
        assert rows[1]["text"] == frames[-1]["text"]

        # Angry messages escalate; the customer is told a person is coming. The first is a
        # complaint (an apology); the second is negative enough on its own (P >= 0.99).
        await customer.say(ANGRY[0])
        await customer.until("reply")
        await customer.say(ANGRY[1])
        handoff = await customer.until("message", sender="system")
        assert "person" in handoff["text"]
        handoff_at = len(customer.frames)

        # Operators without the token see nothing.
        resp = await http.get(f"{base}/api/operator/tickets")
        assert resp.status == 401
        resp = await http.get(f"{base}/api/operator/tickets", headers=operator_headers())
        tickets = (await resp.json())["tickets"]
        assert len(tickets) == 1
        ticket = tickets[0]
        assert ticket["reason"] == "very_negative"
        assert ticket["last_customer_text"] == ANGRY[-1]

        # While escalated the bot stays silent; the operator sees the message.
        await customer.say("Hello? Is anyone there?")
        detail = await wait_for(lambda: _transcript_has(http, base, ticket["id"], "anyone there"))
        assert detail["transcript"][0]["sentiment"] is not None

        # The operator answers; the customer sees it live.
        resp = await http.post(f"{base}/api/operator/tickets/{ticket['id']}/reply",
                               json={"text": "Hi, I'm Dana. I've refunded your order."},
                               headers=operator_headers())
        assert resp.status == 200, await resp.text()
        joined = await customer.until("message")
        assert "joined" in joined["text"]
        answer = await customer.until("message", sender="operator")
        assert answer["text"] == "Hi, I'm Dana. I've refunded your order."
        bot_frames = [f for f in customer.frames[handoff_at:] if f["type"] in ("typing", "delta")]
        assert bot_frames == [], "the bot must stay silent while a person has the conversation"

        # Resolve: the bot answers again.
        resp = await http.post(f"{base}/api/operator/tickets/{ticket['id']}/resolve",
                               json={"note": "refunded"}, headers=operator_headers())
        assert (await resp.json())["ticket"]["state"] == "resolved"
        await customer.until("message", sender="system")
        await customer.say("Thanks! How long does the refund take?")
        reply = await customer.until("reply")
        assert reply["sender"] == "bot" and reply["text"].strip()

        events = {r["type"] for r in await store.query("SELECT type FROM events")}
        assert {"message", "escalated", "resolved"} <= events
        await customer.ws.close()


async def _transcript_has(http, base, ticket_id, needle):
    resp = await http.get(f"{base}/api/operator/tickets/{ticket_id}", headers=operator_headers())
    data = await resp.json()
    texts = [line["text"] for line in data["transcript"]]
    return data if any(needle in t for t in texts) else None


async def test_redelivered_message_is_answered_once(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, base, "e2e-session-dup")
        frame = {"type": "message", "id": "same-id-1", "text": "Where is my parcel?"}
        await customer.ws.send_json(frame)
        await customer.ws.send_json(frame)
        acks = []
        while len(acks) < 2:
            f = await customer.next_frame()
            if f["type"] == "ack":
                acks.append(f)
        assert [a["duplicate"] for a in acks] == [False, True]
        await customer.until("reply")
        rows = await web_service.store.query(
            "SELECT count(*) AS n FROM messages WHERE direction = 'out' AND sender = 'bot'")
        assert rows[0]["n"] == 1
        await customer.ws.close()


async def test_metrics_count_what_happened(web_service) -> None:
    base = f"http://127.0.0.1:{web_service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, base, "e2e-metrics")
        await customer.say("I need a person please, can I talk to a human?")
        await customer.until("message", sender="system")
        text = await (await http.get(f"{base}/metrics")).text()
    assert 'supportbot_escalations_total{reason="customer_requested"}' in text
    assert 'supportbot_messages_total{kind="text",platform="web"}' in text
