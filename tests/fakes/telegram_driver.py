"""The Telegram adapter on the real pipeline against the fake Bot API, ready to drive.

Shared by the Telegram tests and the load bench: one place builds the settings, opens
the SQLite store, starts the adapter (PTB long polling or webhook) and tears it all down,
so every test exercises the same wiring the service uses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.telegram import TelegramAdapter
from core.pipeline import Pipeline
from core.store import SQLiteStore
from tests.conftest import make_settings
from tests.fakes.chat_driver import open_grounder
from tests.fakes.telegram_api import FakeTelegram

__all__ = ["OPERATOR_GROUP", "Harness", "Start", "telegram_harnesses", "texts"]

OPERATOR_GROUP = -1001234567890


@dataclass
class Harness:
    fake: FakeTelegram
    adapter: TelegramAdapter
    pipeline: Pipeline
    store: SQLiteStore
    settings: Any

    async def rows(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        return await self.store.query(sql, list(params))

    async def restart_adapter(self, **kwargs: Any) -> None:
        await self.adapter.stop()
        self.adapter = TelegramAdapter(self.settings.telegram, self.fake.token, **kwargs)
        await self.adapter.start(self.pipeline)


Start = Callable[..., Awaitable[Harness]]


@asynccontextmanager
async def telegram_harnesses(tmp_path: Path, generator: Any, classifier: Any, *,
                             operator_ids: tuple[int, ...] = ()) -> AsyncIterator[Start]:
    """Yields ``start(**telegram settings)``; everything started is stopped on exit.

    ``start`` takes ``webhook_secret``, ``recommender``, ``grounded`` (answers grounded in
    ``recommender.knowledge_dir``, as the service wires them), ``escalation``, ``sections``
    (other settings sections) and ``store_factory`` (builds the store from its path: a
    subclass that fails on purpose, say) besides the ``[telegram]`` keys.
    """
    harnesses: list[Harness] = []

    async def start(*, webhook_secret: str | None = None, recommender: Any = None,
                    grounded: bool = False, escalation: dict[str, Any] | None = None,
                    sections: dict[str, dict[str, Any]] | None = None,
                    store_factory: Callable[[Path], SQLiteStore] = SQLiteStore,
                    **telegram: Any) -> Harness:
        fake = await FakeTelegram().start()
        tg = {
            "enabled": True, "base_url": fake.base_url, "base_file_url": fake.base_file_url,
            "edit_interval_s": 0.2, "typing_interval_s": 0.3,
            "operator_chat_id": OPERATOR_GROUP, "operator_user_ids": list(operator_ids),
            **telegram,
        }
        settings = make_settings(
            tmp_path, telegram=tg, **{"generator": {"max_new_tokens": 10},
                                      "escalation": escalation or {}, **(sections or {})},
        )
        grounder = await open_grounder(settings) if grounded else None
        store = store_factory(Path(settings.store.path))
        await store.open()
        pipeline = Pipeline(settings, store, classifier, generator, recommender, grounder)
        adapter = TelegramAdapter(settings.telegram, fake.token, webhook_secret=webhook_secret)
        harness = Harness(fake, adapter, pipeline, store, settings)
        harnesses.append(harness)
        if settings.telegram.operator_chat_id:
            fake.group(settings.telegram.operator_chat_id, "Support operators", forum=True)
        await adapter.start(pipeline)
        return harness

    try:
        yield start
    finally:
        for h in harnesses:
            await h.adapter.stop()
            await h.pipeline.close(0.5)
            await h.store.close()
            await h.fake.close()


def texts(fake: FakeTelegram, chat_id: int, thread_id: int | None = None) -> list[str]:
    """What a person sees from the bot in a chat (or one forum topic), oldest first."""
    return [m.text for m in fake.bot_messages(chat_id, thread_id)]
