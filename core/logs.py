"""Log set-up: plain or JSON lines, the conversation id on every line, no PII, no secrets.

The pipeline sets :data:`CONVERSATION_ID` while it handles a conversation's message; the
context variable follows the work into tasks and threads it starts, so every line
written on its behalf carries the id. Filters on the handler (not on loggers) see every
record, including those of libraries: personal data is redacted unless switched off,
and the values of secrets read from the environment are masked always.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from core.pii import redact_pii

CONVERSATION_ID: ContextVar[int | None] = ContextVar("conversation_id", default=None)
SECRET_MASK = "[secret]"
_MIN_SECRET_LEN = 6  # shorter values would mask ordinary words
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class ConversationFilter(logging.Filter):
    """Stamps ``record.conversation_id`` from the context (``None`` outside a message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "conversation_id", None) is None:
            record.conversation_id = CONVERSATION_ID.get()
        return True


class ScrubFilter(logging.Filter):
    """Renders the message once, then masks secret values and (optionally) PII in it and
    in the traceback text, so no handler can write them."""

    def __init__(self, secrets: Iterable[str], *, redact: bool) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LEN},
                               key=len, reverse=True)
        self._redact = redact

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, SECRET_MASK)
        return redact_pii(text) if self._redact else text

    def filter(self, record: logging.LogRecord) -> bool:
        """Never raises and never drops a record: a bad call (arguments that do not match
        the format) must not break the code that logged, nor lose the line."""
        try:
            message = record.getMessage()
        except Exception:
            message = f"{record.msg}{record.args!r}"
        record.msg = self._safe_scrub(message)
        record.args = None
        try:
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
        except Exception:
            record.exc_text = repr(record.exc_info[1]) if record.exc_info else None
        record.exc_info = None
        if record.exc_text:
            record.exc_text = self._safe_scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self._safe_scrub(record.stack_info)
        # Extra fields the JSON formatter writes as they are (strings) or as their repr.
        for key, value in list(vars(record).items()):
            if key in _STANDARD or key.startswith("_") or key == "conversation_id" \
                    or value is None or isinstance(value, (bool, int, float)):
                continue
            text = value if isinstance(value, str) else _safe_repr(value)
            setattr(record, key, self._safe_scrub(text))
        return True

    def _safe_scrub(self, text: str) -> str:
        try:
            return self.scrub(text)
        except Exception:  # a redaction bug must not lose the line, nor leak a secret
            for secret in self._secrets:
                text = text.replace(secret, SECRET_MASK)
            return text


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__} object>"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, conversation id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "conversation_id": getattr(record, "conversation_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line and not key.startswith("_"):
                line[key] = value if isinstance(value, (str, int, float, bool)) else repr(value)
        if record.exc_text:
            line["exception"] = record.exc_text
        elif record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with ``[conversation N]`` when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        convo = getattr(record, "conversation_id", None)
        return line if convo is None else line.replace(": ", f": [conversation {convo}] ", 1)


def secret_values(env_names: Iterable[str]) -> list[str]:
    """The current values of the named environment variables (those that are set)."""
    return [v for v in (os.environ.get(n) for n in env_names) if v]


def configure_logging(
    *,
    level: str = "INFO",
    fmt: str = "text",
    redact: bool = True,
    secrets: Iterable[str] = (),
    stream: Any = None,
) -> logging.Handler:
    """Replace the root handlers with one configured handler and return it."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(ConversationFilter())
    handler.addFilter(ScrubFilter(secrets, redact=redact))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
