"""The short version of ``bench/load.py``: the running service under concurrent web
conversations loses, duplicates and reorders nothing, and a short soak samples memory."""

from __future__ import annotations

from pathlib import Path

from bench.load import run_load


async def test_short_load_and_soak_lose_nothing(tmp_path: Path) -> None:
    lines: list[str] = []
    report = await run_load(
        conversations=30, messages=3, generator="canned", baseline_messages=3,
        soak_s=6.0, sample_s=1.0, reply_timeout_s=120.0, workdir=tmp_path, echo=lines.append,
    )
    load = report.load
    assert load.conversations >= 30 and load.messages >= 90
    assert (load.lost, load.duplicated, load.out_of_order) == (0, 0, 0)
    assert load.answered == load.messages
    assert report.audit == {"inbound": load.messages + 3, "db_unanswered": 0,
                            "db_no_reply": 0, "db_replied_twice": 0}
    assert report.baseline is not None and report.baseline.answered == 3
    assert 0 < load.p50_ms <= load.p99_ms
    assert load.throughput > 0
    assert report.rss_start_mb > 100 and report.rss_end_mb > 100
    assert len(report.soak) >= 4 and all(rss > 100 for _, rss in report.soak)
    assert lines[0].startswith("service up: RSS")
    assert "canned replies over HTTP (no model)" in lines[0]
