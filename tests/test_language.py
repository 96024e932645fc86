"""The customer's language: detected by lingua, English kept English, and another language
answered honestly in it (the English help centre quoted under a line in that language, or a
person, told so in that language) in the real service and a real Chromium chat page."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import expect

from core.config import ConfigError, parse_settings
from core.language import ENGLISH, LINES, LanguageDetector, handoff_line, quote_intro
from tests.conftest import make_settings
from tests.test_browser import base_url, open_chat, say
from tests.test_end_to_end import Customer


@pytest.fixture(scope="module")
def detector() -> LanguageDetector:
    detector = LanguageDetector()
    detector.load()
    return detector


@pytest.mark.parametrize(("text", "language"), [
    ("¿Cómo restablezco mi contraseña?", "es"),
    ("Hola, mi pedido no ha llegado todavía", "es"),
    ("Gracias por todo, excelente servicio", "es"),
    ("如何重置我的密码？", "zh"),
    ("谢谢你们的帮助", "zh"),
    ("Bonjour, je n'arrive pas à me connecter", "fr"),
    ("Ich möchte mein Passwort zurücksetzen", "de"),
    ("Olá, preciso de ajuda com minha conta", "pt"),
    ("Где мой заказ?", "ru"),
    ("注文した商品がまだ届きません", "ja"),
    ("मेरा रिफंड कब आएगा", "hi"),
    ("Мой заказ", "ru"),
])
def test_other_languages_are_detected(detector: LanguageDetector, text: str,
                                      language: str) -> None:
    found = detector.detect(text)
    assert found.language == language and not found.english, found


@pytest.mark.parametrize("text", [
    "hi", "ok thanks", "I love", "yo", "no", "hola", "gracias",
    "NEVER ordering from here again #done", "What a lovely #crew on the #0815 #ams #jfk",
    "lhr -> ord on", "Thanks for the swap...#BOS--MIA....#workTrip",
    "How do I reset my password?", "oh my, what a mess", "Zero stars, meh.",
    "That was the final straw for me", "Nice to see you at the desk tonite! #GoTeam",
    "Where is my pedido?", "😀😀",
])
def test_english_and_too_short_to_tell_stay_english(detector: LanguageDetector,
                                                     text: str) -> None:
    """Short English messages of the kinds lingua alone (over all its languages) called
    Maori, Shona, Nynorsk or Polish on airline tweets; one word of Spanish is not enough to
    leave English for."""
    assert detector.detect(text).language == ENGLISH, text


def test_every_language_has_both_lines_and_unknown_ones_are_refused() -> None:
    for code, (intro, handoff) in LINES.items():
        assert intro.strip() and handoff.strip(), code
    with pytest.raises(ValueError, match="xx"):
        LanguageDetector(("en", "xx"))
    with pytest.raises(ConfigError, match=r"language\.languages.*xx"):
        parse_settings({"language": {"languages": ["en", "xx"]}}, "config.toml")


def test_detection_off_reads_everything_as_english() -> None:
    assert LanguageDetector(("en",)).detect("¿Cómo restablezco mi contraseña?").english


@pytest.fixture
async def language_service(tmp_path: Path) -> AsyncIterator[Any]:
    """The real service; ``extract`` mode, so the English customer's answer is the help
    centre's own words and costs no generation time."""
    from bots.service import Service

    service = Service(make_settings(tmp_path, answers={"mode": "extract"},
                                    recommender={"enabled": False}))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.mark.browser
async def test_each_customer_is_answered_in_their_language(language_service, browser) -> None:
    service = language_service
    base = base_url(service)
    seen: dict[str, str] = {}
    for key, text in (("es", "Hola, mi pedido no ha llegado todavía y necesito ayuda"),
                      ("zh", "你好，我的订单还没有到，请帮帮我"),
                      ("en", "How do I reset my password?")):
        context = await browser.new_context()  # a customer of their own (own session)
        try:
            chat = await open_chat(context, base)
            await say(chat, text)
            answer = chat.page.locator("#log .msg:not(.customer)[data-done='1'] .text")
            await expect(answer).to_have_count(1, timeout=60_000)
            seen[key] = (await answer.inner_text()).strip()
            chat.assert_clean()
        finally:
            await context.close()

    # Spanish and Chinese: the line in their language (here a person takes over: the
    # English help centre has no passage the question clearly matches).
    assert seen["es"] == handoff_line("es"), seen["es"]
    assert seen["zh"] == handoff_line("zh"), seen["zh"]
    # English: the help centre's own words, in English.
    assert seen["en"].startswith("Here is what our help centre says about"), seen["en"]
    assert "password" in seen["en"].lower()

    tickets = await service.store.query(
        "SELECT reason, scores FROM tickets ORDER BY id")
    assert [t["reason"] for t in tickets] == ["other_language", "other_language"]
    assert [json.loads(t["scores"])["language"] for t in tickets] == ["es", "zh"]
    sentiment = await service.store.query(
        "SELECT text, sentiment, p_negative FROM messages WHERE direction = 'in' ORDER BY id")
    # The English-only sentiment model is not asked: the label says "not known".
    assert [(r["sentiment"], round(r["p_negative"], 3)) for r in sentiment[:2]] == [
        ("neutral", 0.333), ("neutral", 0.333)]


async def test_a_question_the_help_centre_answers_is_quoted_under_a_line_in_their_language(
    tmp_path: Path,
) -> None:
    """When a passage clears the relevance gate, the English quote comes under the line in
    the customer's language, with its citation. The English-only MiniLM rarely matches a
    Spanish question well enough at the shipped gates, so they are lowered here."""
    from bots.service import Service

    service = Service(make_settings(
        tmp_path, recommender={"enabled": False}, grounding={"threshold": 0.05},
        answers={"mode": "extract", "min_relevance": 0.05, "weak_relevance": 0.05,
                 "names_relevance": 0.05}))
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            customer = await Customer.connect(http, base_url(service), "lang-es-quote")
            await customer.say("Hola, ¿cómo puedo restablecer mi password?")
            reply = await customer.next_frame(60)
            while reply["type"] not in ("reply", "message") or reply.get("sender") == "customer":
                reply = await customer.next_frame(60)
    finally:
        await service.stop()
    assert reply["text"].startswith(quote_intro("es") + " Here is what our help centre says"), (
        reply["text"])
    assert reply["sender"] == "bot" and reply["citations"], "the quote names its article"
