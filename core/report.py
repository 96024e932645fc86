"""The periodic sentiment report: a PNG chart and a short text summary for operators.

Numbers come from :mod:`core.analytics` (the same queries as the analytics page, on
SQLite or PostgreSQL), for one period and the one before it. The chart is drawn with
matplotlib's Agg canvas on a ``Figure`` object (no pyplot global state, so it is safe in a
worker thread). Example messages are redacted of personal data before they leave the
database.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from core import analytics
from core.analytics import Conn, TimeRange
from core.pii import redact_pii

LABEL_COLORS = {"negative": "#d64545", "neutral": "#9aa5b8", "positive": "#2e9d4a"}


@dataclass(frozen=True, slots=True)
class Topic:
    term: str
    messages: int
    example: str


@dataclass(frozen=True, slots=True)
class ReportData:
    """Everything the summary and the chart show."""

    start: datetime
    end: datetime
    bucket: str
    labels: tuple[str, ...]
    series: dict[str, tuple[int, ...]]
    previous_share_series: tuple[float | None, ...]
    messages: int
    negative: int
    previous_messages: int
    previous_negative: int
    escalations: int
    escalation_reasons: dict[str, int]
    previous_escalations: int
    topics: tuple[Topic, ...]

    @property
    def share_negative(self) -> float:
        return self.negative / self.messages if self.messages else 0.0

    @property
    def previous_share_negative(self) -> float:
        return self.previous_negative / self.previous_messages if self.previous_messages else 0.0


@dataclass(frozen=True, slots=True)
class Report:
    data: ReportData
    summary: str
    chart_png: bytes


def collect(conn: Conn, r: TimeRange, topics: int = 3) -> ReportData:
    """The numbers, from the store's SQLite file or its PostgreSQL database alike."""
    now, before = analytics.sentiment(conn, r), analytics.sentiment(conn, r.previous())
    esc, esc_before = analytics.escalations(conn, r), analytics.escalations(conn, r.previous())
    negative = analytics.topics(conn, r, topics, negative_only=True, redact=redact_pii)["topics"]
    prev_share: list[float | None] = [
        (neg / total if total else None)
        for neg, total in zip(before["series"]["negative"], before["volume"], strict=True)
    ]
    # The previous period can have one bucket fewer or more (a range not on the hour):
    # line it up with this period's buckets, a missing one drawn as a gap.
    size = len(now["labels"])
    prev_share = (prev_share + [None] * size)[:size]
    return ReportData(
        start=r.start, end=r.end, bucket=r.bucket, labels=tuple(now["labels"]),
        series={k: tuple(v) for k, v in now["series"].items()},
        previous_share_series=tuple(prev_share),
        messages=now["total"], negative=now["totals"]["negative"],
        previous_messages=before["total"], previous_negative=before["totals"]["negative"],
        escalations=esc["total"], escalation_reasons=esc["reasons"],
        previous_escalations=esc_before["total"],
        topics=tuple(Topic(t["term"], t["messages"], t["example"]) for t in negative),
    )


def _change(now: float, before: float) -> str:
    if before == 0:
        return "new" if now else "no change"
    return f"{(now - before) / before:+.0%}"


def _span(data: ReportData) -> str:
    hours = (data.end - data.start).total_seconds() / 3600
    return f"{hours:g} h" if hours < 48 else f"{hours / 24:g} days"


def summarize(data: ReportData) -> str:
    """A few lines an operator reads in a chat message."""
    fmt = "%Y-%m-%d %H:%M"
    lines = [
        f"Sentiment report, {data.start:{fmt}} to {data.end:{fmt}} UTC ({_span(data)})",
        f"Messages: {data.messages:,} ({_change(data.messages, data.previous_messages)} "
        f"against the previous {_span(data)}: {data.previous_messages:,})",
        f"Negative: {data.share_negative:.1%} ({data.negative:,} messages; previous "
        f"{data.previous_share_negative:.1%}, "
        f"{(data.share_negative - data.previous_share_negative) * 100:+.1f} points)",
    ]
    reasons = ", ".join(
        f"{reason.replace('_', ' ')} {n}" for reason, n in data.escalation_reasons.items()
    )
    lines.append(
        f"Escalations: {data.escalations:,} (previous {data.previous_escalations:,})"
        + (f": {reasons}" if reasons else "")
    )
    if data.topics:
        lines.append("Top negative topics:")
        for topic in data.topics:
            lines.append(f'- "{topic.term}": {topic.messages} negative messages, '
                         f'e.g. "{topic.example}"')
    else:
        lines.append("No negative messages in this period.")
    return "\n".join(lines)


def render_chart(data: ReportData) -> bytes:
    """Stacked messages by sentiment per bucket, and the negative share against the
    previous period; 1200 x 700 px."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    x = range(len(data.labels))
    base = [0] * len(data.labels)
    for label in ("negative", "neutral", "positive"):
        values = data.series.get(label, (0,) * len(data.labels))
        top.bar(x, values, bottom=base, color=LABEL_COLORS[label], label=label, width=0.85)
        base = [b + v for b, v in zip(base, values, strict=True)]
    top.set_ylabel("customer messages")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title(
        f"Customer sentiment, {data.start:%Y-%m-%d %H:%M} to {data.end:%Y-%m-%d %H:%M} UTC: "
        f"{data.messages:,} messages, {data.share_negative:.0%} negative, "
        f"{data.escalations} escalations"
    )
    top.legend(loc="upper left")
    top.grid(axis="y", alpha=0.3)
    share = [
        (neg / (neg + neu + pos) if neg + neu + pos else None)
        for neg, neu, pos in zip(data.series.get("negative", ()), data.series.get("neutral", ()),
                                 data.series.get("positive", ()), strict=True)
    ]
    bottom.plot(x, [float("nan") if v is None else v * 100 for v in share],
                color=LABEL_COLORS["negative"], marker="o", label="this period")
    bottom.plot(x, [float("nan") if v is None else v * 100 for v in data.previous_share_series],
                color="#5b6476", linestyle="--", marker="x", label="previous period")
    bottom.set_ylabel("% negative")
    bottom.set_ylim(0, 100)
    bottom.legend(loc="upper left")
    bottom.grid(alpha=0.3)
    step = max(1, len(data.labels) // 12)
    ticks = list(x)[::step]
    bottom.set_xticks(ticks, [_tick(data.labels[i], data.bucket) for i in ticks])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _tick(label: str, bucket: str) -> str:
    return f"{label[5:10]} {label[11:13]}h" if bucket == "hour" else label[5:10]


def build(conn: Conn, r: TimeRange) -> Report:
    data = collect(conn, r)
    return Report(data, summarize(data), render_chart(data))


def write(report: Report, out_dir: str | Path) -> tuple[Path, Path]:
    """``sentiment-<end>.png`` and ``.txt`` in ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sentiment-{report.data.end:%Y%m%dT%H%M%S}"
    png, txt = out / f"{stem}.png", out / f"{stem}.txt"
    png.write_bytes(report.chart_png)
    txt.write_text(report.summary + "\n", encoding="utf-8")
    return png, txt


def as_json(report: Report) -> dict[str, Any]:
    d = report.data
    return {
        "start": analytics.iso(d.start), "end": analytics.iso(d.end), "summary": report.summary,
        "messages": d.messages, "share_negative": round(d.share_negative, 4),
        "escalations": d.escalations,
    }
