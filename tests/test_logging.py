"""Logs as an operator reads them: JSON lines with the conversation id, no PII, no secrets."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from bots.cli import secret_env_names, setup_logging
from bots.service import Service
from core.logs import SECRET_MASK, configure_logging
from tests.conftest import make_settings

TELEGRAM_TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line]


def test_secrets_from_the_environment_never_reach_the_log(
    tmp_path: Path, restore_root_logging: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SUPPORTBOT_TELEGRAM_TOKEN", TELEGRAM_TOKEN)
    settings = make_settings(tmp_path)
    assert "SUPPORTBOT_TELEGRAM_TOKEN" in secret_env_names(settings)
    buf = io.StringIO()
    setup_logging(settings)
    logging.getLogger().handlers[0].setStream(buf)  # type: ignore[attr-defined]
    # What httpx (under python-telegram-bot) logs for every call: the token is in the URL.
    logging.getLogger("httpx").info(
        'HTTP Request: POST %s "HTTP/1.1 200 OK"',
        f"https://api.telegram.org/bot{TELEGRAM_TOKEN}/getUpdates",
    )
    try:
        raise ConnectionError(f"cannot reach https://api.telegram.org/bot{TELEGRAM_TOKEN}/x")
    except ConnectionError:
        logging.getLogger("telegram.ext").exception("polling failed")
    out = buf.getvalue()
    assert TELEGRAM_TOKEN not in out
    assert out.count(f"bot{SECRET_MASK}/") == 2  # the request line and the exception text
    assert "ConnectionError" in out  # the traceback itself is kept


def test_pii_is_redacted_by_default_and_kept_when_switched_off(
    restore_root_logging: None,
) -> None:
    text = "customer ann.lee@example.com, phone +1 415 555 0134, card 4111 1111 1111 1111"
    buf = io.StringIO()
    configure_logging(fmt="json", stream=buf)
    logging.getLogger("core.grounding").warning("no passage for %r", text)
    line = _lines(buf)[0]
    assert line["level"] == "WARNING" and line["logger"] == "core.grounding"
    for secret in ("ann.lee@example.com", "415 555 0134", "4111 1111 1111 1111"):
        assert secret not in line["message"]
    assert "{{Email}}" in line["message"] and "{{Card Number}}" in line["message"]
    assert "{{Phone Number}}" in line["message"]

    buf = io.StringIO()
    configure_logging(fmt="text", redact=False, stream=buf)
    logging.getLogger("core.grounding").warning("no passage for %r", text)
    assert "ann.lee@example.com" in buf.getvalue()
    assert " WARNING core.grounding: no passage for " in buf.getvalue()


async def test_every_line_about_a_message_carries_its_conversation_id(
    tmp_path: Path, restore_root_logging: None,
) -> None:
    """The real service answering over the web: each line written while a message is
    handled (the pipeline's, and those of the code it calls) names the conversation."""
    buf = io.StringIO()
    configure_logging(level="DEBUG", fmt="json", stream=buf)
    for noisy in ("aiohttp", "asyncio", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = make_settings(
        tmp_path, generator={"max_new_tokens": 8}, grounding={"enabled": False},
        recommender={"enabled": False},
    )
    service = Service(settings)
    await service.start()
    try:
        base = f"http://127.0.0.1:{service.adapters[0].port}"
        async with aiohttp.ClientSession() as http:
            for session in ("log-session-a", "log-session-b"):
                ws = await http.ws_connect(f"{base}/ws?session={session}")
                await ws.receive_json(timeout=10)
                await ws.send_json({"type": "message", "id": uuid.uuid4().hex[:8],
                                    "text": "Do you ship to Canada? Mail me at bo@example.org"})
                while (await ws.receive_json(timeout=120))["type"] != "reply":
                    pass
                await ws.close()
    finally:
        await service.stop()
    lines = _lines(buf)
    done = [ln for ln in lines if ln["logger"] == "core.pipeline" and "done" in ln["message"]]
    assert [ln["conversation_id"] for ln in done] == [1, 2]
    startup = [ln for ln in lines if "web chat on" in ln["message"]]
    assert startup and startup[0]["conversation_id"] is None
    assert "bo@example.org" not in buf.getvalue()
    assert all(set(ln) >= {"ts", "level", "logger", "message", "conversation_id"} for ln in lines)


def test_a_bad_logging_call_is_written_not_raised(restore_root_logging: None) -> None:
    """Arguments that do not match the format: the caller goes on, the line is written
    (format and arguments as they were given), and a secret in them is still masked."""
    buf = io.StringIO()
    configure_logging(fmt="json", secrets=[TELEGRAM_TOKEN], stream=buf)
    logging.getLogger("core.adapters").warning("sent %s to %s", TELEGRAM_TOKEN)
    (line,) = _lines(buf)
    assert line["message"] == f"sent %s to %s('{SECRET_MASK}',)"
    assert TELEGRAM_TOKEN not in buf.getvalue()


def test_extras_and_stack_are_scrubbed_too(restore_root_logging: None) -> None:
    buf = io.StringIO()
    configure_logging(fmt="json", secrets=[TELEGRAM_TOKEN], stream=buf)
    url = f"https://api.telegram.org/bot{TELEGRAM_TOKEN}/getMe"
    logging.getLogger("supportbot.client").warning(
        "request", extra={"url": url, "request": {"token": TELEGRAM_TOKEN}, "attempt": 2},
    )
    logging.getLogger("core.pipeline").warning("where", stack_info=True)  # ann.lee@example.com
    first, second = _lines(buf)
    assert first["url"] == f"https://api.telegram.org/bot{SECRET_MASK}/getMe"
    assert first["request"] == f"{{'token': '{SECRET_MASK}'}}"
    assert first["attempt"] == 2
    assert "test_extras_and_stack_are_scrubbed_too" in second["stack"]
    assert "{{Email}}" in second["stack"]
    out = buf.getvalue()
    assert TELEGRAM_TOKEN not in out and "ann.lee@example.com" not in out
