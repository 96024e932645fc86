"""A terminal chat for trying the bot without any platform: ``supportbot chat``."""

from __future__ import annotations

import asyncio
import getpass
import sys
import uuid

from core.channels import Adapter, CustomerChannel, OperatorChannel, ReplyStream
from core.messages import Inbound, Kind, Reply, User
from core.operators import TicketView
from core.pipeline import Pipeline

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
        for s in reply.suggestions:
            sys.stdout.write(f"     see: {s.title} {s.url}\n")
        sys.stdout.flush()
        return uuid.uuid4().hex

    async def abort(self) -> None:
        sys.stdout.write(" [stopped]\n")


class _Notices(OperatorChannel):
    async def ticket_opened(self, ticket: TicketView) -> None:
        print(f"[escalated to an operator: {ticket.reason}]")

    async def ticket_updated(self, ticket: TicketView) -> None:
        pass


class TerminalAdapter(Adapter, CustomerChannel):
    platform = PLATFORM

    def __init__(self) -> None:
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
        pipeline.operators.attach(_Notices())
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
