"""The sentiment report: `supportbot report` on a seeded store, and the service posting it
on its schedule into the operator channels."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image

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
    # Bars of every label were drawn (four negative, three neutral, three positive hours).
    for label in ("negative", "neutral", "positive"):
        assert plotted_pixels(png, LABEL_COLORS[label]) > 500, f"no {label} bars in the chart"


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
    """Real service (web adapter, real models): the report reaches the web console's API
    and its live socket although another operator channel fails."""
    from bots.service import Service

    settings = make_settings(
        tmp_path, report={"enabled": True, "every_s": 1.0, "period_s": 86400.0,
                          "out_dir": str(tmp_path / "reports")},
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
        assert list((tmp_path / "reports").glob("sentiment-*.png"))
    finally:
        await service.stop()
    assert OPERATOR_TOKEN not in caplog.text
