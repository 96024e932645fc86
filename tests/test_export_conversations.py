"""`supportbot export conversations` on a real store written the way the pipeline writes
it, and the export read back by `supportbot finetune generator`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bots import cli
from core.messages import Inbound, Kind, User
from core.store import SQLiteStore, now_iso
from finetune import export_conversations
from finetune.conversations import read_file
from tests.conftest import DATA_DIR

EMAIL, PHONE = "ann.lee@example.com", "+1 415 555 0199"


async def _say(store: SQLiteStore, key: str, mid: str, text: str,
               kind: Kind = Kind.TEXT) -> tuple[int, int]:
    stored = await store.record_inbound(
        Inbound("web", key, User("web", f"id-{key}", "Ann"), mid, text, kind))
    assert stored is not None
    await store.set_inbound_status(stored.message_id, "answered")
    return stored.conversation_id, stored.message_id


async def _send(store: SQLiteStore, conversation_id: int, sender: str, text: str,
                reply_to: int | None = None, *, status: str = "sent",
                author: str | None = None) -> None:
    """As the pipeline does: a pending row first, then sent (or failed) with its text."""
    out_id = await store.begin_outbound(conversation_id, "web", sender, reply_to)
    await store.finish_outbound(out_id, text=text, status=status, author=author)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStore, str]]:
    """Three conversations: one an operator took over, one the bot answered alone, one
    with no reply. Returns the store and a time between the first and the second."""
    store = SQLiteStore(tmp_path / "supportbot.db")
    await store.open()
    conv, first = await _say(store, "chat-1", "m1",
                             f"My parcel never came. Mail me at {EMAIL} or call {PHONE}")
    await _send(store, conv, "bot", "Sorry to hear that! What is your order number?", first)
    _, second = await _say(store, "chat-1", "m2", "It's order #48213, placed a week ago")
    await _send(store, conv, "bot", "", second, status="failed")  # generation failed
    await _send(store, conv, "system", "Sorry, something went wrong. A person will help.")
    await _say(store, "chat-1", "m3", "", Kind.COMMAND)  # /human
    await _send(store, conv, "system", "Sam from our support team has joined the chat.")
    await _send(store, conv, "operator", "I found it: it ships tomorrow, sorry for the wait.",
                author="Sam (sam@shop.example)")
    await _send(store, conv, "operator", "The tracking link will come by email.",
                author="Sam (sam@shop.example)")
    await _say(store, "chat-1", "m4", "thanks!")  # nobody answered: not a target
    await asyncio.sleep(0.01)
    between = now_iso()
    await asyncio.sleep(0.01)
    conv2, q = await _say(store, "chat-2", "m5", "how do I reset my password?")
    await _send(store, conv2, "bot", "Open Settings, then Security, and choose Reset.", q)
    await _say(store, "chat-3", "m6", "hello?")
    yield store, between
    await store.close()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_export_marks_operator_answers_and_redacts(
    store: tuple[SQLiteStore, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, _ = store
    out = tmp_path / "exported.jsonl"
    assert cli.main(["export", "conversations", "--db", str(db.path), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote 2 conversations to {out} (1 answered by an operator, 2 target replies; " \
           "personal data redacted)" in said
    assert "left out 1: no reply to learn from" in said
    taken_over, bot_only = _lines(out)
    assert taken_over == {
        "id": "web-1", "group": "operator",
        "messages": [
            {"role": "user", "content": "My parcel never came. Mail me at {{Email}} or call "
                                        "{{Phone Number}}"},
            {"role": "assistant", "content": "Sorry to hear that! What is your order number?",
             "train": False, "author": "bot"},
            {"role": "user", "content": "It's order {{Order Number}}, placed a week ago"},
            {"role": "assistant", "content": "I found it: it ships tomorrow, sorry for the "
                                             "wait.\nThe tracking link will come by email.",
             "author": "operator"},
        ],
    }
    assert bot_only == {
        "id": "web-2", "group": "bot",
        "messages": [
            {"role": "user", "content": "how do I reset my password?"},
            {"role": "assistant", "content": "Open Settings, then Security, and choose Reset.",
             "author": "bot"},
        ],
    }
    text = out.read_text(encoding="utf-8")
    for leaked in (EMAIL, "415", "48213", "Sam", "something went wrong", "joined"):
        assert leaked not in text

    # The loader of `finetune generator` accepts the file as it is.
    examples, stats = read_file(out)
    assert (stats.format, stats.examples) == ("jsonl", 2)
    assert [(t.role, t.train, t.author) for t in examples[0].turns] == [
        ("user", True, ""), ("assistant", False, "bot"),
        ("user", True, ""), ("assistant", True, "operator")]


async def test_operator_only_since_and_no_redaction(
    store: tuple[SQLiteStore, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, between = store
    out = tmp_path / "operator.jsonl"
    base = ["--db", str(db.path), "--out", str(out)]
    assert export_conversations.main([*base, "--operator-only", "--no-redact-pii"]) == 0
    said = capsys.readouterr().out
    assert "left out 1: no operator answer (--operator-only)" in said
    assert "personal data NOT redacted" in said
    (only,) = _lines(out)
    assert only["group"] == "operator" and EMAIL in only["messages"][0]["content"]

    assert export_conversations.main([*base, "--since", between]) == 0
    assert [c["id"] for c in _lines(out)] == ["web-2"]
    assert f"started since {between}" in capsys.readouterr().out


async def test_database_from_the_config_file(
    store: tuple[SQLiteStore, str], tmp_path: Path
) -> None:
    db, _ = store
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\npath = "{db.path}"\n', encoding="utf-8")
    out = tmp_path / "from-config.jsonl"
    assert export_conversations.main(["--config", str(config), "--out", str(out)]) == 0
    assert len(_lines(out)) == 2


def test_errors_name_the_file_or_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.db"
    out = tmp_path / "x.jsonl"
    assert export_conversations.main(["--db", str(missing), "--out", str(out)]) == 2
    assert f"{missing}: database not found" in capsys.readouterr().err
    assert export_conversations.main(["--db", str(missing), "--out", str(out),
                                      "--since", "last week"]) == 2
    assert "--since 'last week' is not an ISO date" in capsys.readouterr().err
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[store]\npaht = 'x'\n", encoding="utf-8")
    assert export_conversations.main(["--config", str(bad_config), "--out", str(out)]) == 2
    assert f"{bad_config}: unknown key 'store.paht'" in capsys.readouterr().err
    assert not out.exists()


async def test_finetune_generator_trains_on_the_export(
    store: tuple[SQLiteStore, str], tmp_path: Path
) -> None:
    """`supportbot finetune generator --data exported.jsonl`: one real LoRA step on it."""
    import torch

    db, _ = store
    exported = tmp_path / "exported.jsonl"
    assert export_conversations.main(["--db", str(db.path), "--out", str(exported)]) == 0
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        code = await asyncio.to_thread(cli.main, [
            "finetune", "generator", "--data", str(exported), "--out", str(run),
            "--data-dir", str(DATA_DIR), "--max-steps", "1", "--batch-size", "2",
            "--max-seq-len", "128", "--eval-split", "0", "--device", "cpu",
            "--threads", "1", "--no-progress", "--merged-dtype", "float32"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 1
    card = (run / "README.md").read_text()
    assert f"| `{exported}` |" in card
    assert (run / "merged" / "model.safetensors").is_file()
