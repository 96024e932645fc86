"""Write the sentiment report (a PNG chart and a text summary) for a recent period.

``supportbot report --since 24h`` reads the store named in the config (its SQLite file,
``--db``, or its PostgreSQL database when ``[store] url`` is set) on a read-only
connection, so it can run beside the service, and writes ``sentiment-<end>.png`` and
``.txt`` into ``[report] out_dir`` (or ``--out``). It never writes to the database: the
analytics indexes are the service's to create (a CREATE INDEX here could hold the write
lock for seconds beside a running service); without them the queries are slower, not
wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bots.service import build_store
from core import analytics, report
from core.config import Settings, load_settings
from core.store_postgres import PostgresStore, describe_url


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config.toml", help="path of config.toml")
    parser.add_argument("--since", default="24h",
                        help="the period, back from --until: 90m, 24h, 7d (default 24h)")
    parser.add_argument("--until", default=None,
                        help="end of the period, ISO date-time; UTC unless it names a zone "
                        "(default: now)")
    parser.add_argument("--db", type=Path, default=None,
                        help="a SQLite file to read instead of the configured store "
                        "(default: [store] path, or [store] url when set)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the PNG and the summary (default: [report] out_dir)")


def connect(settings: Settings, db: Path | None) -> tuple[analytics.Conn, str]:
    """A read-only connection to ``db`` or the configured store, and how to name it in an
    error. On PostgreSQL the URL and password come together as for the service (the
    store object is only built for that: it connects nothing)."""
    if db is None and settings.store.url:
        store = build_store(settings)
        assert isinstance(store, PostgresStore)
        return analytics.connect_postgres(store.url), describe_url(store.url)
    path = db or Path(settings.store.path)
    return analytics.connect_readonly(path), str(path)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    out = args.out or Path(settings.report.out_dir)
    try:
        r = analytics.parse_range(args.since, end=args.until)
        conn, where = connect(settings, args.db)
    except analytics.AnalyticsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        built = report.build(conn, r)
    except analytics.DB_ERRORS as exc:
        print(f"error: {where}: {exc}", file=sys.stderr)
        return 2
    finally:
        conn.close()
    try:
        png, txt = report.write(built, out)
    except OSError as exc:
        print(f"error: cannot write the report into {out}: {exc}", file=sys.stderr)
        return 2
    print(built.summary)
    print(f"\nchart: {png}\nsummary: {txt}")
    return 0
