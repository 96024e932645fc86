"""What ``/metrics`` shows an operator, and what the behavior log keeps for the
recommender, after real traffic through the web adapter."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bots.service import Service
from core.messages import Inbound, Kind, User
from tests.conftest import make_settings, wait_for


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    tmp: Path = tmp_path_factory.mktemp("metrics")
    svc = Service(make_settings(tmp, generator={"max_new_tokens": 12}))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


def _sample(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text format; 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


async def _metrics(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def test_metrics_cover_messages_latency_sentiment_escalations_and_health(
    service: Service,
) -> None:
    base = f"http://127.0.0.1:{service.adapters[0].port}"
    async with aiohttp.ClientSession() as http:
        before = await _metrics(http, base)
        ws = await http.ws_connect(f"{base}/ws?session=metrics-customer")
        await ws.receive_json(timeout=10)
        await ws.send_json({"type": "message", "id": "q1", "text": "How do I return an item?"})
        while (await ws.receive_json(timeout=180))["type"] != "reply":
            pass
        await ws.send_json({"type": "command", "id": "h1", "name": "human"})
        while (await ws.receive_json(timeout=60))["type"] != "message":
            pass
        await ws.close()
        await wait_for(lambda: not service.pipeline._inflight, timeout=10)  # type: ignore[union-attr]
        after = await _metrics(http, base)

    def grew(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert grew("supportbot_messages_total", platform="web", kind="text") == 1
    assert grew("supportbot_messages_total", platform="web", kind="command") == 1
    assert grew("supportbot_reply_seconds_count") == 1
    assert grew("supportbot_first_token_seconds_count") == 1
    assert _sample(after, "supportbot_first_token_seconds_bucket", le="+Inf") >= 1
    assert sum(grew("supportbot_sentiment_total", label=lb)
               for lb in ("negative", "neutral", "positive")) == 1
    assert grew("supportbot_escalations_total", reason="customer_requested") == 1
    assert _sample(after, "supportbot_queue_depth") == 0
    assert _sample(after, "supportbot_conversations_busy") == 0
    assert _sample(after, "supportbot_generator_breaker_state") == -1  # embedded: no breaker
    for family in ("supportbot_generator_errors_total", "supportbot_store_errors_total",
                   "supportbot_store_retries_total", "supportbot_duplicates_total"):
        assert f"# TYPE {family} counter" in after


async def test_clicks_are_views_and_reactions_rate_the_cited_article(service: Service) -> None:
    """A click on a suggestion logs the view the adapter shows; a reaction to an answer is
    feedback on the article it cited, so the recommender can learn from both."""
    base = f"http://127.0.0.1:{service.adapters[0].port}"
    store = service.store
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{base}/ws?session=events-customer")
        await ws.receive_json(timeout=10)
        await ws.send_json({"type": "message", "id": "q", "text": "How do I return an item?"})
        while (reply := await ws.receive_json(timeout=180))["type"] != "reply":
            pass
        items = [c["id"] for c in reply["citations"]] + [s["id"] for s in reply["suggestions"]]
        assert items, "the knowledge base had nothing for a return question"
        clicked = (reply["suggestions"] or reply["citations"])[0]["id"]
        await ws.send_json({"type": "click", "id": "c", "suggestion": clicked})
        await ws.close()
    convo = await store.conversation_by_key("web", "events-customer")
    assert convo is not None
    sent = await store.query(
        "SELECT platform_message_id FROM messages WHERE conversation_id = ? AND direction = "
        "'out' AND sender = 'bot' AND status = 'sent'", [convo["id"]])
    # A platform with reactions (Telegram, Discord) submits them like this.
    reaction = Inbound("web", "events-customer", User("web", "events-customer"),
                       f"reaction:{uuid.uuid4().hex}", sent[0]["platform_message_id"],
                       Kind.REACTION, "👍")
    assert service.pipeline is not None and await service.pipeline.submit(reaction)

    async def events() -> list[dict]:
        rows = await store.query(
            "SELECT type, item_id, value FROM events WHERE conversation_id = ? AND type IN "
            "('suggestion_clicked', 'article_viewed', 'feedback') ORDER BY id", [convo["id"]])
        return rows if len(rows) == 3 else []

    rows = await wait_for(events, timeout=30)
    assert rows == [
        {"type": "suggestion_clicked", "item_id": clicked, "value": None},
        {"type": "article_viewed", "item_id": clicked, "value": None},
        {"type": "feedback", "item_id": items[0], "value": "👍"},
    ]


async def test_generator_down_shows_in_breaker_state_and_error_kinds(tmp_path: Path) -> None:
    """The model server is down at start (``start_degraded``): the breaker is open, the
    customer gets the honest fallback, and /metrics says why."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    svc = Service(make_settings(
        tmp_path,
        generator={"backend": "vllm", "base_url": f"http://127.0.0.1:{dead_port}",
                   "start_degraded": True, "connect_timeout_s": 0.5, "retries": 0},
        grounding={"enabled": False}, recommender={"enabled": False},
    ))
    await svc.start()
    try:
        base = f"http://127.0.0.1:{svc.adapters[0].port}"
        async with aiohttp.ClientSession() as http:
            before = await _metrics(http, base)
            ws = await http.ws_connect(f"{base}/ws?session=breaker-customer")
            await ws.receive_json(timeout=10)
            await ws.send_json({"type": "message", "id": "b1", "text": "Where is my parcel?"})
            while (frame := await ws.receive_json(timeout=60))["type"] != "message":
                pass
            assert frame["text"] == svc.settings.generator.fallback_text
            await ws.close()
            # The fallback is sent before the ticket is opened: wait for the escalation.
            escalated = _sample(before, "supportbot_escalations_total",
                                reason="generation_failed") + 1
            for _ in range(150):
                after = await _metrics(http, base)
                if _sample(after, "supportbot_escalations_total",
                           reason="generation_failed") >= escalated:
                    break
                await asyncio.sleep(0.1)
    finally:
        await svc.stop()
    assert _sample(after, "supportbot_generator_breaker_state") == 2
    assert (_sample(after, "supportbot_generator_errors_total", kind="circuit_open")
            - _sample(before, "supportbot_generator_errors_total", kind="circuit_open")) == 1
    assert (_sample(after, "supportbot_escalations_total", reason="generation_failed")
            - _sample(before, "supportbot_escalations_total", reason="generation_failed")) == 1


def test_generator_error_kinds_come_from_the_error_not_its_wording() -> None:
    """The label says what failed: a message that merely contains "within" or "empty" is
    no timeout, and a circuit that opened because of this failure does not relabel it."""
    from core.generation import GenerationError
    from core.generation.vllm import CircuitOpenError, GenerationTimeout
    from core.pipeline import EmptyReply, Pipeline

    kind = Pipeline._error_kind
    assert kind(GenerationTimeout("http://vllm sent no text within 5 s")) == "timeout"
    assert kind(TimeoutError()) == "timeout"
    assert kind(CircuitOpenError("circuit open since 12:00")) == "circuit_open"
    assert kind(EmptyReply("the model produced an empty reply")) == "empty"
    assert kind(GenerationError("cut", partial=True)) == "cut_mid_stream"
    assert kind(GenerationError("a reply within the limits, but an empty choice")) == "error"
    assert kind(GenerationTimeout("slow", partial=True)) == "timeout"
