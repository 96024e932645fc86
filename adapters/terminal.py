"""A terminal chat for trying the bot without any platform: ``supportbot chat``."""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from core.adapter import Adapter
from core.channels import CustomerChannel, OperatorChannel, ReplyStream
from core.messages import Inbound, Kind, Reply, User
from core.pipeline import Pipeline
from core.tickets import TicketView

PLATFORM = "terminal"


class _Stream(ReplyStream):
    __slots__ = ("_shown",)

    def __init__(self) -> None:
        self._shown = 0

    async def begin(self) -> None:
        sys.stdout.write("bot> ")
        sys.stdout.flush()

    async def update(self, text_so_far: str) -> None:
        sys.stdout.write(text_so_far[self._shown :])
        sys.stdout.flush()
        self._shown = len(text_so_far)

    async def finish(self, reply: Reply) -> str:
        rest = reply.text[self._shown :] if reply.text.startswith(reply.text[: self._shown]) else ""
        sys.stdout.write(rest + "\n")
        if reply.citations:
            sources = ", ".join(f"{c.title} {c.url}".strip() for c in reply.citations)
            sys.stdout.write(f"     sources: {sources}\n")
        for s in reply.suggestions:
            sys.stdout.write(f"     see: {s.title} {s.url}\n")
        sys.stdout.flush()
        return uuid.uuid4().hex

    async def abort(self) -> None:
        sys.stdout.write(" [stopped]\n")


class TerminalNotices(OperatorChannel):
    """The person at the terminal is also the operator: escalations and reports are printed.

    A terminal cannot show a picture, so a report's chart is written to ``report_dir``
    and its path printed under the summary.
    """

    __slots__ = ("_report_dir",)

    def __init__(self, report_dir: Path | None = None) -> None:
        self._report_dir = report_dir or Path(tempfile.gettempdir())

    async def ticket_opened(self, ticket: TicketView) -> None:
        print(f"[escalated to an operator: {ticket.reason}]")

    async def ticket_updated(self, ticket: TicketView) -> None:
        pass

    async def post_report(self, summary: str, chart_png: bytes) -> None:
        path = await asyncio.to_thread(self._save, chart_png)
        print(f"[report]\n{summary.strip()}\n[chart: {path}]")

    def _save(self, chart_png: bytes) -> Path:
        self._report_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        fd, name = tempfile.mkstemp(prefix=f"report-{stamp}-", suffix=".png",
                                    dir=self._report_dir)
        with os.fdopen(fd, "wb") as out:
            out.write(chart_png)
        return Path(name)


class TerminalAdapter(Adapter, CustomerChannel):
    platform = PLATFORM

    def __init__(self, report_dir: Path | None = None) -> None:
        self.report_dir = report_dir
        self.session = uuid.uuid4().hex
        self.done = asyncio.Event()
        self._pipeline: Pipeline | None = None
        self._reader: asyncio.Task[None] | None = None

    def open_reply(self, conversation_key: str) -> ReplyStream:
        return _Stream()

    async def deliver(self, conversation_key: str, reply: Reply) -> str:
        print(f"{reply.sender.value}> {reply.text}")
        return uuid.uuid4().hex

    async def start(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        pipeline.attach(self)
        pipeline.operators.attach(TerminalNotices(self.report_dir))
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._pipeline is not None
        user = User(PLATFORM, getpass.getuser())
        print("Type a message (/human for a person, /quit to leave).")
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line or line.strip() == "/quit":
                break
            text = line.strip()
            kind, payload = Kind.TEXT, ""
            if text.startswith("/") and text[1:].split(" ")[0] in {"human", "help", "feedback"}:
                payload, _, text = text[1:].partition(" ")
                kind = Kind.COMMAND
            await self._pipeline.submit(Inbound(
                PLATFORM, self.session, user, uuid.uuid4().hex, text, kind, payload
            ))
        self.done.set()

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
