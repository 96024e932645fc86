"""`supportbot export events`: the behavior log as CSV or Parquet, for analysis.

The events table is read on a read-only connection, so the service can keep running: the
SQLite file, or the PostgreSQL database of ``[store] url`` (one snapshot, streamed), with the
same output for the same rows. Customers appear only by the store's internal user id
(never their platform id). With ``--ctr`` the click-through rate of suggestions is printed
per recommender arm and per article: a click counts for the suggestion lists that showed
that article in the same conversation.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import psycopg
from psycopg import IsolationLevel
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from core.config import POSTGRES_SCHEMES, ConfigError, StoreSettings, load_settings
from core.store_postgres import CONNECT_TIMEOUT_S, describe_url
from finetune import tool
from finetune.tool import run_module

DEFAULT_CONFIG = "config.toml"
FORMATS = ("csv", "parquet")
COLUMNS = (
    "id", "ts", "type", "platform", "user_id", "conversation_id", "message_id", "item_id",
    "position", "value", "data",
)
BATCH = 5000


class ExportError(Exception):
    """The export cannot run; the message names the file or the option."""


def parse_since(text: str) -> str:
    """An ISO date or date-time (UTC unless it has a zone) in the store's timestamp form."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ExportError(
            f"--since '{text}' is not an ISO date or date-time (e.g. 2024-05-01 or "
            "2024-05-01T12:00:00+02:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


Dialect = Literal["sqlite", "postgresql"]


class Cursor(Protocol):
    """What the exports read rows through: sqlite3's cursor or psycopg's server-side one."""

    def __iter__(self) -> Iterator[tuple[Any, ...]]: ...

    def fetchmany(self, size: int) -> list[tuple[Any, ...]]: ...


class Database:
    """The service's store, opened read-only for an export. Queries are written once, with
    ``?`` placeholders (they hold no other ``?`` or ``%``); on PostgreSQL they run in one
    REPEATABLE READ READ ONLY transaction (one snapshot while the service writes on),
    each through a server-side cursor, so a big table streams in batches as from SQLite.
    ``name`` is the file, or the URL without its password: for messages."""

    __slots__ = ("_conn", "_cursors", "dialect", "name")

    def __init__(self, conn: sqlite3.Connection | psycopg.Connection[Any], name: str) -> None:
        self._conn = conn
        self._cursors = itertools.count()
        self.name = name
        self.dialect: Dialect = "sqlite" if isinstance(conn, sqlite3.Connection) else "postgresql"

    def execute(self, query: str, params: Sequence[Any] = ()) -> Cursor:
        if isinstance(self._conn, sqlite3.Connection):
            return self._conn.execute(query, params)
        cursor = self._conn.cursor(f"supportbot_export_{next(self._cursors)}")
        cursor.itersize = BATCH
        return cursor.execute(query.replace("?", "%s"), params)

    def close(self) -> None:
        self._conn.close()


def is_postgres_url(target: str) -> bool:
    return urlsplit(target).scheme in POSTGRES_SCHEMES


def locate_database(db: str | None, config: str | None) -> tuple[str, str | None]:
    """The database to read (a SQLite path or a PostgreSQL URL) and its password: ``--db``
    when given (a URL's password from the variable ``[store] password_env`` names by
    default), else the config's ``[store]``; with no ``--config``, ``config.toml`` when
    there is one, else the default store."""
    if db:
        if not is_postgres_url(db):
            return db, None
        try:
            params = conninfo_to_dict(db)
        except psycopg.Error:
            raise ExportError("--db: not a valid PostgreSQL URL") from None
        env = StoreSettings().password_env
        if params.get("password"):
            raise ExportError(f"--db: the URL holds a password; put it in ${env} instead")
        return db, os.environ.get(env) or None
    if config is None and not Path(DEFAULT_CONFIG).is_file():
        return StoreSettings().path, None
    settings = load_settings(config or DEFAULT_CONFIG)
    store = settings.store
    if store.url:
        return store.url, settings.secret(store.password_env)
    return store.path, None


def open_database(target: str, password: str | None = None) -> Database:
    """A read-only connection to a SQLite file or a PostgreSQL URL (``password`` from the
    environment) whose database has the store's events table."""
    if is_postgres_url(target):
        return _open_postgres(target, password)
    path = Path(target)
    if not path.is_file():
        raise ExportError(f"{path}: database not found (pass --db PATH/supportbot.db)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        conn.execute("PRAGMA busy_timeout = 5000")
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
        ).fetchone()
    except sqlite3.DatabaseError as exc:
        raise ExportError(f"{path}: not a supportbot database ({exc})") from None
    if not found:
        conn.close()
        raise ExportError(f"{path}: has no events table (not a supportbot database)")
    return Database(conn, str(path))


def _open_postgres(url: str, password: str | None) -> Database:
    name = describe_url(url)
    extra: dict[str, Any] = {} if "connect_timeout" in conninfo_to_dict(url) else {
        "connect_timeout": CONNECT_TIMEOUT_S}
    try:
        conn = psycopg.connect(make_conninfo(url, password=password) if password else url,
                               **extra)
    except psycopg.Error as exc:
        raise ExportError(f"{name}: cannot connect ({exc})") from None
    try:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        row = conn.execute("SELECT to_regclass('events') IS NOT NULL").fetchone()
    except psycopg.Error as exc:
        conn.close()
        raise ExportError(f"{name}: {exc}") from None
    if not (row and row[0]):
        conn.close()
        raise ExportError(f"{name}: has no events table (not a supportbot database)")
    return Database(conn, name)


def _where(since: str | None, types: Sequence[str]) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if since:
        clauses.append("e.ts >= ?")
        params.append(since)
    if types:
        clauses.append(f"e.type IN ({','.join('?' for _ in types)})")
        params.extend(types)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def read_events(
    db: Database, since: str | None = None, types: Sequence[str] = ()
) -> Iterator[list[tuple[Any, ...]]]:
    """Batches of event rows in :data:`COLUMNS` order, oldest first."""
    where, params = _where(since, types)
    cursor = db.execute(
        "SELECT e.id, e.ts, e.type, u.platform, e.user_id, e.conversation_id, e.message_id, "
        "e.item_id, e.position, e.value, e.data FROM events e "
        f"LEFT JOIN users u ON u.id = e.user_id{where} ORDER BY e.id",
        params,
    )
    while rows := cursor.fetchmany(BATCH):
        yield rows


def write_csv(batches: Iterator[list[tuple[Any, ...]]], out: Path) -> int:
    count = 0
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for rows in batches:
            writer.writerows(["" if v is None else v for v in row] for row in rows)
            count += len(rows)
    return count


def write_parquet(batches: Iterator[list[tuple[Any, ...]]], out: Path) -> int:
    """Parquet with ``ts`` as a UTC timestamp and ``data`` as its JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("id", pa.int64()), ("ts", pa.timestamp("ms", tz="UTC")), ("type", pa.string()),
        ("platform", pa.string()), ("user_id", pa.int64()), ("conversation_id", pa.int64()),
        ("message_id", pa.int64()), ("item_id", pa.string()), ("position", pa.int64()),
        ("value", pa.string()), ("data", pa.string()),
    ])
    count = 0
    with pq.ParquetWriter(out, schema) as writer:
        for rows in batches:
            columns = list(zip(*rows, strict=True))
            arrays = [
                pa.array(
                    [datetime.fromisoformat(t) for t in values] if name == "ts" else values,
                    type=schema.field(name).type,
                )
                for name, values in zip(COLUMNS, columns, strict=True)
            ]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            count += len(rows)
    return count


@dataclass(frozen=True, slots=True)
class ClickThrough:
    arm: str
    item_id: str
    shows: int
    clicks: int

    @property
    def rate(self) -> float:
        return self.clicks / self.shows if self.shows else 0.0


ARM_SQL: dict[Dialect, str] = {
    "sqlite": "json_extract(data, '$.arm')", "postgresql": "(data::jsonb ->> 'arm')",
}
"""The ``arm`` field of an event's JSON ``data``: the one part of the SQL not shared."""


def click_through(db: Database, since: str | None = None) -> list[ClickThrough]:
    """Shows and clicks per (arm, article); the arm comes from ``suggestion_shown`` data.
    A missing conversation is 0 (ids start at 1), so the join is a plain equality that
    PostgreSQL can hash; rows are sorted here, by code point on both stores."""
    stamp = "AND ts >= ?" if since else ""
    params = [since, since] if since else []
    rows = db.execute(
        "WITH shown AS (SELECT COALESCE(conversation_id, 0) AS conversation, item_id, "
        f"COALESCE({ARM_SQL[db.dialect]}, '') AS arm, COUNT(*) AS shows FROM events "
        f"WHERE type = 'suggestion_shown' AND item_id IS NOT NULL {stamp} GROUP BY 1, 2, 3), "
        "clicked AS (SELECT DISTINCT COALESCE(conversation_id, 0) AS conversation, item_id "
        f"FROM events WHERE type = 'suggestion_clicked' {stamp}) "
        "SELECT s.arm, s.item_id, SUM(s.shows), COUNT(c.item_id) FROM shown s "
        "LEFT JOIN clicked c ON c.conversation = s.conversation "
        "AND c.item_id = s.item_id GROUP BY s.arm, s.item_id",
        params,
    )
    ordered = sorted(rows, key=lambda r: (str(r[0]), str(r[1])))
    return [ClickThrough(arm or "(unknown)", item, int(n), int(k))
            for arm, item, n, k in ordered]


def format_click_through(rows: Sequence[ClickThrough]) -> str:
    def table(title: str, groups: dict[str, tuple[int, int]]) -> list[str]:
        lines = [f"{title:<28}{'shown':>8}{'clicked':>9}{'CTR':>8}"]
        for key, (shows, clicks) in sorted(groups.items()):
            lines.append(f"{key:<28}{shows:>8}{clicks:>9}{clicks / shows:>8.1%}")
        return lines

    by_arm: dict[str, tuple[int, int]] = {}
    by_item: dict[str, tuple[int, int]] = {}
    for r in rows:
        for groups, key in ((by_arm, r.arm), (by_item, r.item_id)):
            shows, clicks = groups.get(key, (0, 0))
            groups[key] = (shows + r.shows, clicks + r.clicks)
    if not rows:
        return "no suggestions were shown in this period"
    return "\n".join([*table("arm", by_arm), "", *table("article", by_item)])


def add_database_arguments(parser: argparse.ArgumentParser) -> None:
    """``--db`` and ``--config``, as every reader of the service's database takes them."""
    parser.add_argument(
        "--db", default=None,
        help="the service's database: a SQLite file or a postgresql:// URL, its password "
             f"from ${StoreSettings().password_env} (default: [store] of --config)",
    )
    parser.add_argument(
        "--config", default=None,
        help="config file naming the database when --db is not given (default: "
             "config.toml when there is one, else data/supportbot.db)",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    add_database_arguments(parser)
    parser.add_argument("--out", required=True, help="file to write (.csv or .parquet)")
    parser.add_argument(
        "--format", choices=FORMATS, default=None,
        help="csv or parquet (default: from the --out suffix, else csv)",
    )
    parser.add_argument("--since", default=None, help="only events at or after this ISO time")
    parser.add_argument(
        "--type", action="append", default=[], dest="types",
        help="only this event type (repeatable), e.g. suggestion_clicked",
    )
    parser.add_argument(
        "--ctr", action="store_true",
        help="also print click-through rates per recommender arm and per article",
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    fmt = args.format or ("parquet" if out.suffix.lower() == ".parquet" else "csv")
    try:
        since = parse_since(args.since) if args.since else None
        if not out.parent.is_dir():
            raise ExportError(f"{out.parent}: output folder not found")
        db = open_database(*locate_database(args.db, args.config))
    except (ExportError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    partial = out.with_name(f".{out.name}.partial")
    try:
        batches = read_events(db, since, args.types)
        count = (write_parquet if fmt == "parquet" else write_csv)(batches, partial)
        os.replace(partial, out)
        summary = click_through(db, since) if args.ctr else None
    finally:
        partial.unlink(missing_ok=True)
        db.close()
    scope = f" since {since}" if since else ""
    kinds = f" of type {', '.join(args.types)}" if args.types else ""
    print(f"wrote {count} events{kinds}{scope} to {out} ({fmt})")
    if summary is not None:
        print(format_click_through(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return tool.main(sys.modules[__name__], argv)


run_module(__name__)
