"""The offline readers of the store on PostgreSQL: `supportbot export events`, `supportbot
export conversations` and the recommender's collaborative retraining. The same rows,
written into a SQLite and a PostgreSQL store through the store's own API, must give
byte-identical exports and the same trained model (hence the same suggestions).

Both stores run on a frozen clock that each step of the history moves on, so the same
rows carry the same timestamps on either.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import core.store
import core.store_postgres
from core.messages import Inbound, Kind, User
from core.recommender import (
    MODEL_KINDS,
    CFParams,
    HybridConfig,
    HybridRecommender,
    PostgresEvents,
    SuggestionRequest,
    arm_of,
    count_new_positives,
)
from core.retrieval import MiniLMEncoder, Retriever
from core.store import SQLiteStore, StoredInbound
from core.store_postgres import PostgresStore
from core.suggestions import RetrieverContent
from finetune import export_conversations, export_events
from tests.conftest import wait_for
from tests.postgres_cluster import Cluster

AnyStore = SQLiteStore | PostgresStore
FIXTURES = Path(__file__).parent / "fixtures" / "recommender"
START = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
PASSWORD_ENV = "SUPPORTBOT_DB_PASSWORD"
EMAIL = "ann.lee@example.com"


class Clock:
    """Both stores' ``now_iso``: frozen, moved on 10 ms by :meth:`tick` (the stores call
    ``now_iso`` a different number of times per operation)."""

    def __init__(self) -> None:
        self.at = START

    def tick(self) -> datetime:
        self.at += timedelta(milliseconds=10)
        return self.at

    def iso(self) -> str:
        return self.at.isoformat(timespec="milliseconds")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(core.store, "now_iso", clock.iso)
    monkeypatch.setattr(core.store_postgres, "now_iso", clock.iso)
    return clock


@pytest.fixture
async def stores(
    tmp_path: Path, pg_cluster: Cluster
) -> AsyncIterator[tuple[SQLiteStore, PostgresStore]]:
    lite, pg = SQLiteStore(tmp_path / "supportbot.db"), PostgresStore(pg_cluster.create_database())
    await lite.open()
    await pg.open()
    yield lite, pg
    await pg.close()
    await lite.close()


# -- one history, written the way the pipeline writes it -----------------------------------


async def write_history(store: AnyStore, clock: Clock) -> str:
    """Three web chats and a Telegram one: an operator takeover with personal data, a bot
    answer, no answer, and suggestions shown, clicked, viewed and rated (some events with
    no conversation). Returns a moment between the first chat and the others."""
    clock.at = START

    async def say(key: str, user: str, mid: str, text: str, kind: Kind = Kind.TEXT,
                  platform: str = "web") -> StoredInbound:
        stored = await store.record_inbound(Inbound(
            platform, key, User(platform, user, "Ann Lée"), mid, text, kind,
            sent_at=clock.tick()))
        assert stored is not None
        await store.set_inbound_status(stored.message_id, "answered")
        return stored

    async def send(conversation_id: int, sender: str, text: str, reply_to: int | None = None,
                   *, status: str = "sent", author: str | None = None,
                   platform: str = "web") -> None:
        clock.tick()
        out = await store.begin_outbound(conversation_id, platform, sender, reply_to)
        clock.tick()
        await store.finish_outbound(out, text=text, status=status, author=author)

    async def event(kind: str, **fields: Any) -> None:
        clock.tick()
        await store.log_event(kind, **fields)  # type: ignore[arg-type]

    async def events(rows: list[dict[str, Any]]) -> None:
        clock.tick()
        await store.log_events(rows)

    ann = await say("chat-1", "ann", "m1", f"  My parcel never came. Mail me at {EMAIL}  ")
    ids = {"user_id": ann.user_id, "conversation_id": ann.conversation_id}
    await event("message", **ids, message_id=ann.message_id, value="negative")
    await send(ann.conversation_id, "bot", "Sorry! What is your order number?", ann.message_id)
    await events([
        {"type": "suggestion_shown", **ids, "item_id": item, "position": i,
         "data": json.dumps({"arm": arm})}
        for i, (item, arm) in enumerate(
            [("delivery-times", "content"), ("refunds", "cf"), ("gift-cards", "explore")])
    ])
    await event("suggestion_clicked", **ids, item_id="delivery-times")
    second = await say("chat-1", "ann", "m2", "It's order #48213, très urgent 😠")
    await send(ann.conversation_id, "bot", "", second.message_id, status="failed")
    await send(ann.conversation_id, "system", "Sorry, something went wrong.")
    await say("chat-1", "ann", "m3", "", Kind.COMMAND)
    clock.tick()
    ticket = await store.open_ticket(ann.conversation_id, "requested", {"negative": 0.9})
    assert ticket is not None
    await event("escalated", **ids, value="requested", data={"ticket_id": ticket})
    await store.claim_ticket(ticket, "sam", clock.tick().isoformat(timespec="milliseconds"))
    await send(ann.conversation_id, "operator", "It ships tomorrow, sorry.", author="Sam")
    await send(ann.conversation_id, "operator", "Tracking comes by email.", author="Sam")
    await say("chat-1", "ann", "m4", "   ")
    await event("feedback", **ids, item_id="delivery-times", value="👍",
                data={"source": "reaction", "note": "très bien"})
    between = clock.tick().isoformat(timespec="milliseconds")

    bob = await say("chat-2", "bob", "m5", "how do I reset my password?")
    await send(bob.conversation_id, "bot", "Settings, then Security, then Reset.", bob.message_id)
    await events([
        {"type": "suggestion_shown", "user_id": bob.user_id,
         "conversation_id": bob.conversation_id, "item_id": "reset-password", "position": 0},
        {"type": "suggestion_shown", "user_id": bob.user_id, "item_id": "refunds",
         "position": 1, "data": json.dumps({"arm": "popular"})},
    ])
    await event("suggestion_clicked", user_id=bob.user_id, item_id="refunds")
    await event("article_viewed", user_id=bob.user_id,
                conversation_id=bob.conversation_id, item_id="reset-password")
    await say("chat-3", "cid", "m6", "hello?")
    tg = await say("tg-9", "42", "m7", "где мой заказ?", platform="telegram")
    await send(tg.conversation_id, "bot", "Ваш заказ в пути.", tg.message_id,
               platform="telegram")
    await event("feedback", user_id=tg.user_id, conversation_id=tg.conversation_id,
                value="👎", data={"source": "reaction"})
    return between


@pytest.fixture
async def written(
    stores: tuple[SQLiteStore, PostgresStore], clock: Clock, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[SQLiteStore, PostgresStore, str, Path]:
    """The history in both stores, and a config naming the PostgreSQL one (its password
    in the environment: the test cluster trusts local connections, so any will do)."""
    lite, pg = stores
    between = await write_history(lite, clock)
    assert await write_history(pg, clock) == between
    for table in ("users", "conversations", "messages", "events", "tickets"):
        sql = f"SELECT * FROM {table} ORDER BY id"
        assert await lite.query(sql) == await pg.query(sql), table
    config = tmp_path / "pg.toml"
    config.write_text(f'[store]\nurl = "{pg.url}"\n', encoding="utf-8")
    monkeypatch.setenv(PASSWORD_ENV, "not-needed-by-trust")
    return lite, pg, between, config


def _both(
    tool: Callable[[Sequence[str]], int], capsys: pytest.CaptureFixture[str], tmp_path: Path,
    lite: list[str], pg: list[str], out_name: str, *options: str,
) -> tuple[bytes, bytes]:
    """Run an export on each store (into folders of their own); the two files, after
    checking that both succeeded and printed the same."""
    said, files = [], []
    for name, source in (("sqlite", lite), ("postgresql", pg)):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        out = folder / out_name
        assert tool([*source, "--out", str(out), *options]) == 0, (name, options)
        captured = capsys.readouterr()
        assert captured.err == ""
        said.append(captured.out.replace(str(folder), "<out>"))
        files.append(out.read_bytes())
    assert said[0] == said[1], options
    return files[0], files[1]


# -- exports ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    ("out.csv",),
    ("out.parquet",),
    ("out.csv", "--type", "suggestion_shown", "--type", "feedback"),
    ("out.csv", "--since", "2024-05-01T09:00:00.200+00:00", "--ctr"),
    ("out.parquet", "--ctr"),
])
async def test_event_exports_are_byte_identical(
    written: tuple[SQLiteStore, PostgresStore, str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], options: tuple[str, ...],
) -> None:
    lite, _, _, config = written
    out_name, *rest = options
    from_lite, from_pg = _both(
        export_events.main, capsys, tmp_path, ["--db", str(lite.path)],
        ["--config", str(config)], out_name, *rest)
    assert from_lite == from_pg
    if out_name.endswith(".csv"):
        rows = list(csv.reader(from_lite.decode("utf-8").splitlines()))
        assert len(rows) > 1 and tuple(rows[0]) == export_events.COLUMNS


async def test_click_through_rates_are_the_same(
    written: tuple[SQLiteStore, PostgresStore, str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Per arm and article, a click without a conversation matching a list shown without
    one (the NULL-safe join), JSON arms read by each database's own function."""
    lite, _, _, config = written
    _both(export_events.main, capsys, tmp_path, ["--db", str(lite.path)],
          ["--config", str(config)], "out.csv", "--ctr")
    db = export_events.open_database(*export_events.locate_database(None, str(config)))
    try:
        assert db.dialect == "postgresql"
        rows = export_events.click_through(db)
    finally:
        db.close()
    assert [(r.arm, r.item_id, r.shows, r.clicks) for r in rows] == [
        ("(unknown)", "reset-password", 1, 0),
        ("cf", "refunds", 1, 0),
        ("content", "delivery-times", 1, 1),
        ("explore", "gift-cards", 1, 0),
        ("popular", "refunds", 1, 1),
    ]


@pytest.mark.parametrize("options", [(), ("--operator-only",), ("--no-redact-pii",)])
async def test_conversation_exports_are_byte_identical(
    written: tuple[SQLiteStore, PostgresStore, str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], options: tuple[str, ...],
) -> None:
    lite, pg, _, config = written
    sources = (["--config", str(config)], ["--db", pg.url])
    for source in sources:
        from_lite, from_pg = _both(
            export_conversations.main, capsys, tmp_path, ["--db", str(lite.path)], source,
            "out.jsonl", *options)
        assert from_lite == from_pg
    lines = [json.loads(line) for line in from_lite.decode("utf-8").splitlines()]
    expected = ["web-1"] if "--operator-only" in options else ["web-1", "web-2", "telegram-4"]
    assert [c["id"] for c in lines] == expected
    assert (EMAIL in from_lite.decode("utf-8")) == ("--no-redact-pii" in options)


async def test_conversations_since_a_moment_are_the_same(
    written: tuple[SQLiteStore, PostgresStore, str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lite, _, between, config = written
    from_lite, from_pg = _both(
        export_conversations.main, capsys, tmp_path, ["--db", str(lite.path)],
        ["--config", str(config)], "out.jsonl", "--since", between)
    assert from_lite == from_pg
    assert [json.loads(line)["id"] for line in from_lite.decode().splitlines()] == [
        "web-2", "telegram-4"]


async def test_the_password_comes_from_the_environment(
    written: tuple[SQLiteStore, PostgresStore, str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the variable the config's ``password_env`` names, or for ``--db`` the
    default one; a ``--db`` URL holding a password is refused like the config's."""
    _, pg, _, config = written
    config.write_text(f'[store]\nurl = "{pg.url}"\npassword_env = "MY_PG_SECRET"\n',
                      encoding="utf-8")
    monkeypatch.setenv("MY_PG_SECRET", "from-the-config's-variable")
    assert export_events.locate_database(None, str(config)) == (
        pg.url, "from-the-config's-variable")
    assert export_events.locate_database(pg.url, None) == (pg.url, "not-needed-by-trust")

    real_connect = psycopg.connect
    seen: list[dict[str, Any]] = []

    def connect(conninfo: str, **kwargs: Any) -> psycopg.Connection[Any]:
        seen.append(conninfo_to_dict(conninfo))
        return real_connect(conninfo, **kwargs)

    monkeypatch.setattr(psycopg, "connect", connect)
    out = tmp_path / "events.csv"
    assert export_events.main(["--config", str(config), "--out", str(out)]) == 0
    assert seen[-1]["password"] == "from-the-config's-variable"

    with_password = pg.url.replace("supportbot@", "supportbot:hunter2@")
    with pytest.raises(export_events.ExportError, match=r"--db: the URL holds a password; "
                       rf"put it in \${PASSWORD_ENV} instead"):
        export_events.locate_database(with_password, None)


async def test_postgres_errors_name_the_database_never_the_password(
    pg_cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-pw")
    out = tmp_path / "x.csv"
    nowhere = "postgresql://bot@127.0.0.1:1/support"
    for tool in (export_events, export_conversations):
        assert tool.main(["--db", nowhere, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"error: {nowhere}: cannot connect" in err and "s3cret-pw" not in err
    empty = pg_cluster.create_database()  # never opened by a store: no tables
    assert export_events.main(["--db", empty, "--out", str(out)]) == 2
    assert "has no events table (not a supportbot database)" in capsys.readouterr().err
    assert not out.exists()


def test_the_trainers_postgres_source_keeps_its_password_out_of_repr() -> None:
    source = PostgresEvents("postgresql://bot:hunter2@db.internal:5432/support")
    assert repr(source) == "PostgresEvents('postgresql://bot@db.internal:5432/support')"


# -- collaborative retraining ---------------------------------------------------------------


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    return Retriever(FIXTURES / "kb", tmp_path_factory.mktemp("readers-cache"),
                     encoder=MiniLMEncoder())


async def load_clicks(store: AnyStore, *files: str) -> dict[str, StoredInbound]:
    """The fixture click logs (clicks, views, ratings and suggestions shown), each
    customer created by a first message."""
    customers: dict[str, StoredInbound] = {}
    for name in files:
        with (FIXTURES / name).open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                who = customers.get(row["customer"])
                if who is None:
                    who = await store.record_inbound(Inbound(
                        "web", f"{row['customer']}-chat", User("web", row["customer"]),
                        f"message-{len(customers)}", "hello"))
                    assert who is not None
                    customers[row["customer"]] = who
                await store.log_event(
                    row["type"],  # type: ignore[arg-type]
                    user_id=who.user_id, conversation_id=who.conversation_id,
                    item_id=row["item"], value=row["value"] or None)
    return customers


@pytest.fixture
async def recommenders(
    retriever: Retriever, stores: tuple[SQLiteStore, PostgresStore]
) -> AsyncIterator[Callable[..., tuple[HybridRecommender, HybridRecommender]]]:
    made: list[HybridRecommender] = []

    def factory(**config: Any) -> tuple[HybridRecommender, HybridRecommender]:
        pair = []
        for store in stores:
            recommender = HybridRecommender(
                RetrieverContent(retriever), HybridConfig(**{"exploration": 0.0, **config}))
            recommender.attach_store(store)
            made.append(recommender)
            pair.append(recommender)
        return pair[0], pair[1]

    yield factory
    for recommender in made:
        await recommender.close()


@pytest.mark.parametrize("kind", MODEL_KINDS)
async def test_retraining_on_postgresql_gives_the_sqlite_model(
    stores: tuple[SQLiteStore, PostgresStore], recommenders: Callable[..., Any], kind: str,
) -> None:
    lite, pg = stores
    customers = await load_clicks(lite, "clicks.csv", "refund_clicks.csv")
    assert await load_clicks(pg, "clicks.csv", "refund_clicks.csv") == customers
    on_lite, on_pg = recommenders(cf=CFParams(kind=kind))  # type: ignore[arg-type]
    a, b = await on_lite.retrain(), await on_pg.retrain()
    assert a.trained and b.trained
    assert (a.users, a.items, a.last_event_id) == (b.users, b.items, b.last_event_id)
    assert (a.matrix != b.matrix).nnz == 0 and a.matrix.nnz > 0
    assert np.array_equal(a.popularity, b.popularity) and a.impressions == b.impressions
    assert a.impressions["refunds"] > 0
    for name, who in customers.items():
        history = {row["item_id"]: 1.0 for row in await lite.user_events(who.user_id)
                   if row["type"] != "suggestion_shown"}
        ours, theirs = a.user_scores(who.user_id, history), b.user_scores(who.user_id, history)
        assert (ours is None) == (theirs is None), name
        if ours is not None and theirs is not None:
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=name)
        for text in ("", "How long does shipping take?"):
            request = SuggestionRequest(who.user_id, who.conversation_id, text)
            shown = [await r.suggest(request, 3) for r in (on_lite, on_pg)]
            assert [(s.id, arm_of(s)) for s in shown[0]] == \
                   [(s.id, arm_of(s)) for s in shown[1]], (name, text)
    assert count_new_positives(PostgresEvents(pg.url), 0) == count_new_positives(lite.path, 0)


async def test_background_retraining_runs_on_postgresql(
    stores: tuple[SQLiteStore, PostgresStore], recommenders: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The retrainer's first round trains at start; then 3 new positives retrain it."""
    caplog.set_level(logging.INFO, logger="core.recommender")
    _, pg = stores
    customers = await load_clicks(pg, "clicks.csv")
    _, recommender = recommenders(retrain_after_events=3, retrain_every_s=3600, poll_s=0.05)
    await recommender.start()
    first = await wait_for(lambda: recommender.model, timeout=20)
    assert first.matrix.nnz > 0
    frank = customers["s01"]
    for item in ("refunds", "cancel-order", "gift-cards"):
        await pg.log_event("suggestion_clicked", user_id=frank.user_id,
                           conversation_id=frank.conversation_id, item_id=item)
    second = await wait_for(lambda: recommender.model is not first and recommender.model)
    assert second.last_event_id > first.last_event_id
    assert second.matrix.nnz == first.matrix.nnz + 3
    assert "cannot read" not in caplog.text and "retraining failed" not in caplog.text
