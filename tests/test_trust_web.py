"""The real service, the real SmolLM2, a customer on the web chat: whatever the model writes,
the customer's socket only ever carries sentences the faithfulness check let through."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from bots.service import Service
from core.answers import EXTRACTIVE_OFFER
from core.faithfulness import FaithfulnessChecker
from tests.conftest import make_settings
from tests.test_end_to_end import Customer


@pytest.fixture
async def checked_service(tmp_path: Path):
    # "generate": wait for the model however loaded the machine is, so the model's own
    # text (not the extractive fallback) is what reaches the check.
    service = Service(make_settings(
        tmp_path, answers={"mode": "generate"}, generator={"max_new_tokens": 80},
        recommender={"enabled": False},
    ))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def test_the_customer_sees_only_supported_text(checked_service: Service) -> None:
    service = checked_service
    base = f"http://127.0.0.1:{service.adapters[0].port}"
    question = "How do I reset my password?"
    async with aiohttp.ClientSession() as http:
        customer = await Customer.connect(http, base, "trust-web-1")
        await customer.say(question)
        reply = await customer.until("reply", "bot", timeout=180)
    shown = [f["text"] for f in customer.frames if f["type"] in ("delta", "reply")]
    assert reply["text"].strip()
    assert reply["citations"], "a grounded answer names its sources"

    row = (await service.store.query(
        "SELECT payload FROM messages WHERE direction = 'out' AND sender = 'bot' "
        "AND status = 'sent'"))[0]
    record = json.loads(row["payload"])["answer"]
    assert record["claims"] >= 1, "the model wrote something for the check to judge"
    # Nothing withheld ever reached the socket, not even for a moment while streaming.
    for withheld in record["withheld"]:
        assert all(withheld["text"] not in text for text in shown), withheld
    # The stream only grows: no sentence is shown and then taken back.
    for earlier in shown[:-1]:
        assert reply["text"].startswith(earlier.strip())

    pipeline = service.pipeline
    assert pipeline is not None and pipeline.grounder is not None
    grounding = await pipeline.grounder.ground(question)
    passages = [h.text for h in grounding.hits]
    assert {c["id"] for c in reply["citations"]} <= {h.article_id for h in grounding.hits}
    checker = FaithfulnessChecker(pipeline.grounder.retriever.embed)
    text = reply["text"]
    if record["extractive"]:  # the quote, without its one line of framing each side
        text = text.split(":", 1)[1].replace(EXTRACTIVE_OFFER, "")
    verdict = checker.check(text, passages, [question])
    assert verdict.n_dropped == 0, verdict.dropped
