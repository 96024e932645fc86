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
    load, soaked = report.load, report.soaked
    assert load.name == "load" and load.conversations == 30 and load.messages == 90
    assert soaked is not None and soaked.name == "soak" and soaked.messages >= 3
    for phase in (load, soaked):
        assert (phase.lost, phase.late, phase.duplicated, phase.out_of_order) == (0, 0, 0, 0)
        assert phase.answered == phase.messages
        assert phase.throughput == phase.answered / phase.seconds
    assert report.audit == {"inbound": load.messages + soaked.messages + 3,
                            "db_unanswered": 0, "db_no_reply": 0, "db_replied_twice": 0}
    assert report.problems() == 0
    assert report.baseline is not None and report.baseline.answered == 3
    assert 0 < load.p50_ms <= load.p99_ms
    assert load.throughput > 0
    assert report.rss_start_mb > 100 and report.rss_end_mb > 100
    assert len(report.soak) >= 4 and all(rss > 100 for _, rss in report.soak)
    assert lines[0].startswith("service up: RSS")
    assert "canned replies over HTTP (no model)" in lines[0]


async def test_a_reply_after_the_timeout_is_late_not_lost_and_not_a_duplicate() -> None:
    from bench.load import Customer, Tally

    customer = Customer("late", checks_content=False)
    tally = Tally(sent=1, lost=1)  # what run() counts when the customer gives up
    customer.timed_out = True
    customer._finals.put_nowait({"type": "reply", "text": "late"})
    await customer.close(tally)
    assert (tally.lost, tally.late, tally.duplicated) == (0, 1, 0)

    twice = Customer("late-twice", checks_content=False)
    tally = Tally(sent=1, lost=1)
    twice.timed_out = True
    twice._finals.put_nowait({"type": "reply", "text": "late"})
    twice._finals.put_nowait({"type": "reply", "text": "late again"})
    await twice.close(tally)
    assert (tally.lost, tally.late, tally.duplicated) == (0, 1, 1)

    answered = Customer("answered", checks_content=False)  # did not give up: extra = dup
    tally = Tally(sent=1, answered=1)
    answered._finals.put_nowait({"type": "reply", "text": "again"})
    await answered.close(tally)
    assert (tally.lost, tally.late, tally.duplicated) == (0, 0, 1)
