"""The sentiment report: `supportbot report` on a seeded store, and the service posting it
on its schedule into the operator channels."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image

from bots.service import next_report_delay
from core import analytics, report
from core.analytics import TimeRange
from core.channels import OperatorChannel
from core.report import LABEL_COLORS
from tests.conftest import OPERATOR_TOKEN, REPO, make_settings, seed_history, wait_for

SUPPORTBOT = [sys.executable, "-m", "bots.cli"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*SUPPORTBOT, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def plotted_pixels(png: bytes, color: str) -> int:
    """Pixels of roughly one colour: the bars of that sentiment label."""
    target = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
    return int((np.abs(pixels - target) < 12).all(axis=-1).sum())


@pytest.fixture
async def seeded_config(tmp_path: Path) -> Path:
    db = tmp_path / "store.db"
    await seed_history(db, datetime.now(UTC))
    config = tmp_path / "config.toml"
    config.write_text(
        f'[store]\npath = "{db}"\n\n[report]\nout_dir = "{tmp_path / "reports"}"\n',
        encoding="utf-8",
    )
    return config


async def test_report_command_writes_the_chart_and_the_numbers(
    seeded_config: Path, tmp_path: Path,
) -> None:
    done = run_cli("report", "--since", "24h", "--config", str(seeded_config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [png_path] = (tmp_path / "reports").glob("sentiment-*.png")
    [txt_path] = (tmp_path / "reports").glob("sentiment-*.txt")
    summary = txt_path.read_text(encoding="utf-8")
    assert summary.strip() in done.stdout and str(png_path) in done.stdout

    lines = summary.splitlines()
    assert lines[0].startswith("Sentiment report,") and "(24 h)" in lines[0]
    assert lines[1] == "Messages: 10 (+100% against the previous 24 h: 5)"
    assert lines[2] == ("Negative: 40.0% (4 messages; previous 20.0%, +20.0 points)")
    assert lines[3] == ("Escalations: 2 (previous 1): negative sentiment 1, customer requested 1"
                        ) or lines[3] == ("Escalations: 2 (previous 1): customer requested 1, "
                                          "negative sentiment 1")
    assert lines[4] == "Top negative topics:"
    # The most negative message about refunds is the example, with its e-mail redacted.
    assert lines[5] == ('- "refund": 3 negative messages, e.g. "My refund still has not '
                        'arrived, write to {{Email}}"')
    assert "jo@example.com" not in summary

    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).size == (1200, 700)
    # A report command only reads: the analytics indexes are the service's to create.
    conn = sqlite3.connect(seeded_db(seeded_config))
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    conn.close()
    assert not names & set(analytics.INDEXES)


def seeded_db(config: Path) -> Path:
    return config.parent / "store.db"


NOW = datetime(2024, 5, 1, 12, 15, tzinfo=UTC)


async def test_every_label_draws_its_bars(tmp_path: Path) -> None:
    """Bars of every label are drawn: measured against the same chart without that label's
    bars, so the red "% negative" line of the lower panel does not count as bars."""
    db = tmp_path / "bars.db"
    await seed_history(db, NOW)
    conn = analytics.connect_readonly(db)
    try:
        built = report.build(conn, TimeRange(NOW - timedelta(hours=24), NOW))
    finally:
        conn.close()
    data = built.data
    assert sum(data.series["negative"]) == 4 and sum(data.series["positive"]) == 3
    for label in ("negative", "neutral", "positive"):
        without = dataclasses.replace(
            data, series={**data.series, label: (0,) * len(data.labels)})
        color = LABEL_COLORS[label]
        bars = plotted_pixels(built.chart_png, color) - plotted_pixels(
            report.render_chart(without), color)
        assert bars > 5000, f"{label}: {bars} pixels of bars"


async def test_a_range_off_the_hour_in_another_zone(tmp_path: Path) -> None:
    """90 minutes ending at :15 (three hourly buckets, the period before only two), given
    in UTC+2: the report is drawn, and its title, summary and file name say UTC."""
    db = tmp_path / "zoned.db"
    await seed_history(db, NOW)
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\npath = "{db}"\n', encoding="utf-8")
    done = run_cli("report", "--since", "90m", "--until", "2024-05-01T14:15+02:00",
                   "--config", str(config), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [png] = (tmp_path / "out").glob("*.png")
    assert png.name == "sentiment-20240501T121500.png"
    lines = (tmp_path / "out" / "sentiment-20240501T121500.txt").read_text().splitlines()
    assert lines[0] == "Sentiment report, 2024-05-01 10:45 to 2024-05-01 12:15 UTC (1.5 h)"
    # The message exactly 1.5 h before the end is at the start: counted, like the one at
    # 09:45 in the period before.
    assert lines[1] == "Messages: 1 (+0% against the previous 1.5 h: 1)"
    assert Image.open(png).size == (1200, 700)


async def test_examples_are_redacted_before_they_are_cut(tmp_path: Path) -> None:
    db = tmp_path / "long.db"
    await seed_history(db, NOW)
    email = "jo.smith@example.com"
    prefix = "My refund never came and " + "I keep waiting " * 10 + "still "
    text = prefix + f"so write to {email} today"
    assert text.index(email) < 200 < text.index(email) + len(email)  # the cut splits it
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(
        "INSERT INTO messages (conversation_id, direction, sender, platform, kind, text, "
        "status, created_at, sentiment, p_negative) VALUES (903, 'in', 'customer', "
        "'telegram', 'text', ?, 'answered', ?, 'negative', 0.99)",
        (text, analytics.iso(NOW - timedelta(hours=1))),
    )
    conn.close()
    conn = analytics.connect_readonly(db)
    try:
        data = report.collect(conn, TimeRange(NOW - timedelta(hours=24), NOW))
    finally:
        conn.close()
    [refund] = [t for t in data.topics if t.term == "refund"]
    assert refund.example == (prefix + "so write to {{Email}} today")[:200]
    assert "jo.smi" not in refund.example and len(refund.example) <= 200


async def test_the_report_command_turns_a_database_error_into_a_message(
    tmp_path: Path,
) -> None:
    odd = tmp_path / "odd.db"
    conn = sqlite3.connect(odd)
    for table in ("events", "messages", "tickets", "conversations"):
        conn.execute(f"CREATE TABLE {table} (x)")
    conn.commit()
    conn.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\npath = "{odd}"\n', encoding="utf-8")
    done = run_cli("report", "--config", str(config), "--out", str(tmp_path / "out"),
                   cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {odd}: no such column"), done.stderr
    assert "Traceback" not in done.stderr


def test_the_schedule_continues_from_the_newest_report_file(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    assert next_report_delay(out, 3600) == 0.0  # never posted: at once
    out.mkdir()
    (out / "notes.txt").write_text("not a report")
    assert next_report_delay(out, 3600) == 0.0
    now = time.time()
    for age in (7200, 600):
        f = out / f"sentiment-{age}.txt"
        f.write_text("report")
        os.utime(f, (now - age, now - age))
    assert next_report_delay(out, 3600, now=now) == pytest.approx(3000)
    assert next_report_delay(out, 300, now=now) == 0.0  # overdue: at once


async def test_report_command_names_what_is_wrong(seeded_config: Path, tmp_path: Path) -> None:
    done = run_cli("report", "--since", "yesterday", "--config", str(seeded_config),
                   cwd=tmp_path)
    assert done.returncode == 2
    assert "since 'yesterday' is not a duration like 90m, 24h, 7d or 2w" in done.stderr
    done = run_cli("report", "--db", str(tmp_path / "nope.db"), "--config", str(seeded_config),
                   cwd=tmp_path)
    assert done.returncode == 2 and "nope.db: database not found" in done.stderr


class BrokenChannel(OperatorChannel):
    """An operator channel whose platform is down."""

    async def ticket_opened(self, ticket: object) -> None: ...

    async def ticket_updated(self, ticket: object) -> None: ...

    async def post_report(self, summary: str, chart_png: bytes) -> None:
        raise ConnectionError("platform unreachable")


async def test_the_service_posts_the_report_on_its_schedule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Real service (web adapter, real models), daily reports and none posted before: the
    first is posted at start, and reaches the web console's API and its live socket
    although another operator channel fails and the report folder cannot be written."""
    from bots.service import Service

    (tmp_path / "blocked").write_text("a file where the report folder's parent should be")
    settings = make_settings(
        tmp_path, report={"enabled": True, "every_s": 86400.0, "period_s": 86400.0,
                          "out_dir": str(tmp_path / "blocked" / "reports")},
        grounding={"enabled": False}, recommender={"enabled": False},
    )
    await seed_history(Path(settings.store.path), datetime.now(UTC))
    service = Service(settings)
    web = service.adapters[0]
    caplog.set_level(logging.INFO)
    await service.start()
    service.pipeline.operators.attach(BrokenChannel())
    base = f"http://127.0.0.1:{web.port}"
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    try:
        async with aiohttp.ClientSession() as http:
            assert (await http.get(f"{base}/readyz")).status == 200
            ws = await http.ws_connect(f"{base}/api/operator/ws")
            await ws.send_json({"token": OPERATOR_TOKEN})
            assert (await ws.receive_json(timeout=10))["type"] == "ready"
            pushed = await ws.receive_json(timeout=30)
            assert pushed["type"] == "report"
            assert "Messages: 10 " in pushed["report"]["summary"]
            latest = await (await http.get(f"{base}/api/operator/report/latest",
                                           headers=headers)).json()
            assert latest["report"]["summary"].splitlines()[1].startswith("Messages: 10 ")
            resp = await http.get(f"{base}/api/operator/report/latest.png", headers=headers)
            assert resp.status == 200 and resp.content_type == "image/png"
            assert Image.open(io.BytesIO(await resp.read())).size == (1200, 700)
            assert (await http.get(f"{base}/api/operator/report/latest.png")).status == 401
            await ws.close()
        await wait_for(lambda: "could not post the report" in caplog.text, timeout=10)
        assert "BrokenChannel" in caplog.text
        await wait_for(lambda: "could not write the sentiment report" in caplog.text,
                       timeout=10)
    finally:
        await service.stop()
