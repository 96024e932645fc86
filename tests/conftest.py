"""Shared fixtures: settings on a temporary database, and the real service on a free port.

Models are real: the embedded SmolLM2 (converted once into ``data/models``, shared by
runs) and the MiniLM sentiment encoder with the committed head.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings, parse_settings

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("SUPPORTBOT_TEST_DATA_DIR", REPO / "data"))
OPERATOR_TOKEN = "test-operator-token"


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """Test settings: a fresh SQLite file, the shared model cache, short replies."""
    base: dict[str, dict[str, Any]] = {
        "service": {"data_dir": str(DATA_DIR), "shutdown_grace_s": 5.0},
        "store": {"path": str(tmp_path / "supportbot.db")},
        "generator": {"max_new_tokens": 24, "temperature": 0.0, "timeout_s": 60.0},
        "web": {"port": 0, "operator_token_env": "SUPPORTBOT_TEST_OPERATOR_TOKEN"},
        "recommender": {"knowledge_dir": str(REPO / "knowledge")},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return parse_settings(base, "test settings")


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    return lambda **sections: make_settings(tmp_path, **sections)


@pytest.fixture(scope="session", autouse=True)
def _operator_token() -> None:
    os.environ["SUPPORTBOT_TEST_OPERATOR_TOKEN"] = OPERATOR_TOKEN


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, step: float = 0.05) -> Any:
    """Poll until ``predicate()`` (sync or async) is truthy; fail with a clear message."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)


@pytest.fixture
async def web_service(tmp_path: Path) -> AsyncIterator[Any]:
    """The real service (web adapter only) on a free port."""
    from bots.service import Service

    service = Service(make_settings(tmp_path))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
