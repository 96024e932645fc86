"""`supportbot export events` on a real store written the way the pipeline writes it."""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bots import cli
from core.messages import Inbound, User
from core.store import SQLiteStore
from finetune import export_events


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """A store with one customer's conversation: a message, three suggestions shown (two
    by content, one by exploration), a click, a thumbs-up and an escalation."""
    store = SQLiteStore(tmp_path / "supportbot.db")
    await store.open()
    who = await store.record_inbound(
        Inbound("web", "chat-1", User("web", "customer-secret-id", "Ann"), "m1", "refund?")
    )
    assert who is not None
    ids = {"user_id": who.user_id, "conversation_id": who.conversation_id}
    await store.log_event("message", **ids, message_id=who.message_id, value="neutral")
    await store.log_events([
        {"type": "suggestion_shown", **ids, "item_id": item, "position": i,
         "data": json.dumps({"arm": arm})}
        for i, (item, arm) in enumerate(
            [("refunds", "content"), ("cancel-order", "content"), ("gift-cards", "explore")]
        )
    ])
    await store.log_event("suggestion_clicked", **ids, item_id="refunds")
    await store.log_event("feedback", **ids, value="👍", data={"source": "reaction"})
    await store.log_event("escalated", **ids, value="requested", data={"ticket_id": 1})
    yield store
    await store.close()


async def test_csv_export_writes_every_event(
    store: SQLiteStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "events.csv"
    assert cli.main(["export", "events", "--db", str(store.path), "--out", str(out)]) == 0
    assert f"wrote 7 events to {out} (csv)" in capsys.readouterr().out
    with out.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == export_events.COLUMNS
    assert [r["type"] for r in rows] == [
        "message", "suggestion_shown", "suggestion_shown", "suggestion_shown",
        "suggestion_clicked", "feedback", "escalated",
    ]
    by_type: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_type.setdefault(row["type"], []).append(row)
    shown = by_type["suggestion_shown"]
    assert [(r["item_id"], r["position"]) for r in shown] == [
        ("refunds", "0"), ("cancel-order", "1"), ("gift-cards", "2")
    ]
    assert json.loads(shown[2]["data"]) == {"arm": "explore"}
    assert by_type["feedback"][0]["value"] == "👍"
    assert by_type["suggestion_clicked"][0]["platform"] == "web"
    assert by_type["suggestion_clicked"][0]["position"] == ""
    assert "customer-secret-id" not in out.read_text(encoding="utf-8")


async def test_parquet_export_keeps_types_and_filters(store: SQLiteStore, tmp_path: Path) -> None:
    out = tmp_path / "events.parquet"
    assert export_events.main(["--db", str(store.path), "--out", str(out)]) == 0
    table = pq.read_table(out)
    assert table.num_rows == len(await store.query("SELECT id FROM events"))
    assert table.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert table.schema.field("position").type == pa.int64()
    assert table.column("item_id").to_pylist().count("refunds") == 2

    clicks = tmp_path / "clicks.parquet"
    argv = ["--db", str(store.path), "--out", str(clicks), "--type", "suggestion_clicked"]
    assert export_events.main(argv) == 0
    assert pq.read_table(clicks).column("item_id").to_pylist() == ["refunds"]

    later = tmp_path / "later.csv"
    argv = ["--db", str(store.path), "--out", str(later), "--since", "2999-01-01"]
    assert export_events.main(argv) == 0
    assert later.read_text(encoding="utf-8").strip() == ",".join(export_events.COLUMNS)
    argv = ["--db", str(store.path), "--out", str(later), "--since", "2000-01-01T00:00:00+02:00"]
    assert export_events.main(argv) == 0
    assert len(later.read_text(encoding="utf-8").strip().splitlines()) == 1 + table.num_rows


async def test_click_through_per_arm_and_article(
    store: SQLiteStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "events.csv"
    assert export_events.main(["--db", str(store.path), "--out", str(out), "--ctr"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split()[1:] for line in lines[1:] if line.strip()}
    assert table["content"] == ["2", "1", "50.0%"]
    assert table["explore"] == ["1", "0", "0.0%"]
    assert table["refunds"] == ["1", "1", "100.0%"]
    assert table["gift-cards"] == ["1", "0", "0.0%"]


async def test_clear_errors_for_a_missing_database_or_a_bad_date(
    store: SQLiteStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.db"
    out = tmp_path / "events.csv"
    assert export_events.main(["--db", str(missing), "--out", str(out)]) == 2
    assert f"{missing}: database not found" in capsys.readouterr().err
    argv = ["--db", str(store.path), "--out", str(out), "--since", "last tuesday"]
    assert export_events.main(argv) == 2
    assert "--since 'last tuesday' is not an ISO date" in capsys.readouterr().err
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("hello")
    assert export_events.main(["--db", str(not_a_db), "--out", str(out)]) == 2
    assert f"{not_a_db}: not a supportbot database" in capsys.readouterr().err
    assert not out.exists()


async def test_database_from_the_config_file_or_the_default(
    store: SQLiteStore, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --db: the config's [store]; without --config, ./config.toml when there is
    one, else the default store (data/supportbot.db, as before there was --config)."""
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\npath = "{store.path}"\n', encoding="utf-8")
    out = tmp_path / "events.csv"
    assert export_events.main(["--config", str(config), "--out", str(out)]) == 0
    assert "wrote 7 events" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert export_events.main(["--out", str(out)]) == 0
    assert "wrote 7 events" in capsys.readouterr().out
    config.unlink()
    assert export_events.locate_database(None, None) == ("data/supportbot.db", None)
    assert export_events.main(["--config", str(config), "--out", str(out)]) == 2
    assert f"{config}: file not found" in capsys.readouterr().err
