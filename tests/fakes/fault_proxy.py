"""A fault-injecting reverse proxy on 127.0.0.1, put in front of a real model server.

Requests pass through unchanged (bodies streamed both ways, so a client that hangs up
also hangs up on the upstream) unless a fault is queued for the path: the next request
to that path gets the fault instead. Faults model what production sees: a 429 with
``Retry-After``, a 503, a connection reset before any answer, a stream cut after a few
events, a stall after the response headers and before the first token.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections import deque
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

_HOP_HEADERS = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
    "host", "upgrade",
})


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str  # "status" | "reset" | "cut" | "stall"
    status: int = 0
    retry_after: str | None = None
    body: str = ""
    after_events: int = 0
    seconds: float = 0.0

    @staticmethod
    def status_code(status: int, retry_after: str | None = None, message: str = "") -> Fault:
        """An error answer in vLLM's error JSON shape."""
        text = message or ("Too Many Requests" if status == 429 else "Service Unavailable")
        err_type = "RateLimitError" if status == 429 else "ServiceUnavailableError"
        body = json.dumps(
            {"error": {"message": text, "type": err_type, "param": None, "code": status}}
        )
        return Fault("status", status=status, retry_after=retry_after, body=body)

    @staticmethod
    def reset() -> Fault:
        """Read the request, then reset the TCP connection without a byte of answer."""
        return Fault("reset")

    @staticmethod
    def cut(after_events: int) -> Fault:
        """Pass the answer through for ``after_events`` SSE events, then reset."""
        return Fault("cut", after_events=after_events)

    @staticmethod
    def stall(seconds: float) -> Fault:
        """Send the upstream headers, then hold the body back for ``seconds``."""
        return Fault("stall", seconds=seconds)


@dataclass(slots=True)
class Seen:
    path: str
    fault: str
    status: int


@dataclass(slots=True)
class FaultProxy:
    upstream: str
    host: str = "127.0.0.1"
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    _faults: dict[str, deque[Fault]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def inject(self, path: str, *faults: Fault) -> None:
        """Queue faults for the next requests to ``path`` (one fault per request)."""
        self._faults.setdefault(path, deque()).extend(faults)

    def pending(self, path: str) -> int:
        return len(self._faults.get(path, ()))

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def start(self) -> FaultProxy:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    @staticmethod
    def _reset(request: web.Request) -> None:
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: close() sends an RST instead of a FIN, as a crashed peer would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        queue = self._faults.get(request.path)
        fault = queue.popleft() if queue else None
        body = await request.read()
        if fault is not None and fault.kind == "status":
            self.seen.append(Seen(request.path, "status", fault.status))
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.Response(status=fault.status, text=fault.body, headers=headers,
                                content_type="application/json")
        if fault is not None and fault.kind == "reset":
            self.seen.append(Seen(request.path, "reset", 0))
            self._reset(request)
            return web.Response(status=500)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._session.request(
            request.method, f"{self.upstream}{request.rel_url}", data=body, headers=headers
        ) as upstream:
            self.seen.append(Seen(request.path, fault.kind if fault else "", upstream.status))
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS
            })
            try:
                await response.prepare(request)
                if fault is not None and fault.kind == "stall":
                    await asyncio.sleep(fault.seconds)
                if fault is not None and fault.kind == "cut":
                    await self._cut(request, response, upstream, fault.after_events)
                    return response
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except BaseException:
                upstream.close()  # the client left: leave the upstream too, so it aborts
                raise
            return response

    async def _cut(self, request: web.Request, response: web.StreamResponse,
                   upstream: aiohttp.ClientResponse, after_events: int) -> None:
        buffer, passed = b"", 0
        async for chunk in upstream.content.iter_any():
            buffer += chunk
            while passed < after_events and b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                await response.write(event + b"\n\n")
                passed += 1
            if passed >= after_events:
                break
        upstream.close()
        self._reset(request)
