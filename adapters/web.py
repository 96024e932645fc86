"""The local web chat: a customer page over a WebSocket and an operator console.

Customer protocol (JSON text frames). Client to server:
``{"type": "message", "id": "<client id>", "text": "..."}``,
``{"type": "click", "suggestion": "<id>"}``, ``{"type": "command", "name": "human"}``.
Server to client: ``hello`` (with the transcript), ``typing``, ``delta`` (the whole reply
so far), ``reply`` (final, with suggestions), ``abort``, ``message`` (operator or system),
``ack`` and ``error``. The session id in the URL is the conversation; a client resending a
message with the same id after a reconnect is recognised and not answered twice. Transcript
lines carry the client id of a customer's message (``id``) and the id of a sent reply
(``reply``, as in its frames); ``hello`` is always a socket's first frame (anything
broadcast while the transcript is read is held and follows it).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from core import analytics
from core.adapter import Adapter
from core.analytics import Analytics, AnalyticsError, open_analytics
from core.channels import CustomerChannel, OperatorChannel, ReplyStream
from core.config import WebSettings
from core.messages import Inbound, Kind, Reply, User
from core.operators import (
    ACTION_FAILED_TEXT,
    CustomerHistory,
    Operator,
    OperatorError,
    OperatorInputError,
    OperatorNotFound,
)
from core.pipeline import Pipeline
from core.store import SQLiteStore, StoreError
from core.store_postgres import PostgresStore
from core.tickets import TicketView

log = logging.getLogger(__name__)

PLATFORM = "web"
STATIC = Path(__file__).parent / "static"
_SESSION = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_COMMANDS = {"start", "help", "human", "feedback"}
MAX_OPERATOR_BODY = 64 * 1024
MAX_JSON_DEPTH = 8
RELAY_CHANNEL = "supportbot_web"
RECENT_REPLIES_S = 10.0
"""How long a reply for a session with no tab here is kept: a tab that connects while a
reply goes out, on this replica or another (after its frame went out, before it is stored
as sent, so in neither the live frames nor the transcript), is given it after its hello."""
"""Where customer frames go for the sockets on other replicas (PostgreSQL NOTIFY)."""
_CSP = ("default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' blob: data:; "
        "style-src 'self'; script-src 'self'; form-action 'self'; frame-ancestors 'none'")


def _json_error(exc: type[web.HTTPException], message: str) -> web.HTTPException:
    return exc(text=json.dumps({"error": message}), content_type="application/json")


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest, counted without parsing (so a hostile body
    cannot exhaust the parser's recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def public_suggestion(suggestion: Any) -> dict[str, str]:
    """What a customer's browser needs of a suggestion; internal fields (the recommender
    arm) stay on the server."""
    return {"id": suggestion.id, "title": suggestion.title, "url": suggestion.url}


def ticket_json(ticket: TicketView) -> dict[str, Any]:
    return {
        "id": ticket.id,
        "conversation_id": ticket.conversation_id,
        "platform": ticket.platform,
        "customer": ticket.customer.display_name or ticket.customer.platform_user_id,
        "state": ticket.state,
        "reason": ticket.reason,
        "scores": ticket.scores,
        "created_at": ticket.created_at.isoformat(),
        "waiting_s": round(ticket.waiting_s, 1),
        "claimed_by": ticket.claimed_by,
        "last_customer_text": ticket.last_customer_text,
        "sentiment_trend": list(ticket.sentiment_trend),
        "note": ticket.note,
    }


def history_json(history: CustomerHistory) -> dict[str, Any]:
    return {
        "user_id": history.user_id,
        "accounts": list(history.accounts),
        "conversations": list(history.conversations),
        "candidates": list(history.candidates),
    }


REPLY_PREFIX = "web-"
"""A bot reply's stored platform id is this plus the id its frames carry, so a reconnecting
tab's transcript can name the reply it already drew."""


def platform_reply_id(reply_id: str) -> str:
    return f"{REPLY_PREFIX}{reply_id}"


class _WebReply(ReplyStream):
    __slots__ = ("_adapter", "_id", "_key")

    def __init__(self, adapter: WebAdapter, key: str) -> None:
        self._adapter = adapter
        self._key = key
        self._id = uuid.uuid4().hex[:12]

    async def begin(self) -> None:
        await self._adapter.broadcast(self._key, {"type": "typing", "reply": self._id})

    async def update(self, text_so_far: str) -> None:
        await self._adapter.broadcast(
            self._key, {"type": "delta", "reply": self._id, "text": text_so_far}
        )

    async def finish(self, reply: Reply) -> str:
        await self._adapter.broadcast(self._key, self._adapter.reply_json(reply, self._id))
        return platform_reply_id(self._id)

    async def abort(self) -> None:
        await self._adapter.broadcast(self._key, {"type": "abort", "reply": self._id})

    @property
    def known_id(self) -> str:
        return platform_reply_id(self._id)


@dataclass(frozen=True, slots=True)
class PostedReport:
    summary: str
    chart_png: bytes
    posted_at: str

    def as_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "posted_at": self.posted_at,
                "chart": "/api/operator/report/latest.png", "bytes": len(self.chart_png)}


class _WebOperators(OperatorChannel):
    __slots__ = ("_sockets", "latest_report")
    per_replica = True  # the consoles connected to this replica

    def __init__(self) -> None:
        self._sockets: set[web.WebSocketResponse] = set()
        self.latest_report: PostedReport | None = None

    async def _push(self, payload: dict[str, Any]) -> None:
        for ws in list(self._sockets):
            try:
                await ws.send_json(payload)
            except (ConnectionError, RuntimeError):
                self._sockets.discard(ws)

    async def _send(self, event: str, ticket: TicketView) -> None:
        await self._push({"type": event, "ticket": ticket_json(ticket)})

    async def post_report(self, summary: str, chart_png: bytes) -> None:
        """Kept as the latest report (a console that opens later shows it) and pushed to
        every open console."""
        self.latest_report = PostedReport(
            summary, chart_png, datetime.now(UTC).isoformat(timespec="seconds")
        )
        await self._push({"type": "report", "report": self.latest_report.as_json()})

    async def ticket_opened(self, ticket: TicketView) -> None:
        await self._send("ticket_opened", ticket)

    async def ticket_updated(self, ticket: TicketView) -> None:
        await self._send("ticket_updated", ticket)


class WebAdapter(Adapter, CustomerChannel):
    """aiohttp server with the chat page, the operator console and their APIs."""

    platform = PLATFORM

    __slots__ = (
        "_analytics", "_held", "_inbox", "_operators", "_pipeline", "_recent", "_relay",
        "_relaying", "_runner", "_settings", "_sockets", "_unsubscribe", "port", "ready",
        "token",
    )

    def __init__(
        self, settings: WebSettings, operator_token: str | None, token_file: Path | None = None,
        *, relay: bool = False,
    ) -> None:
        """``relay``: the store is shared with other replicas, and a customer's socket may be
        on any of them: frames go through the store to every replica's sockets."""
        self._settings = settings
        self._relay = relay
        self._inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        """Frames from other replicas, delivered by one task in the order they came."""
        self._relaying: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], Awaitable[None]] | None = None
        self.token = operator_token or secrets.token_urlsafe(18)
        if operator_token is None:
            # The token never goes into a log line: it is written to a file only its owner
            # can read, and the log says where.
            where = "not saved; set the variable"
            if token_file is not None:
                token_file.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    os.fchmod(fh.fileno(), 0o600)  # also when an older file was looser
                    fh.write(self.token + "\n")
                where = f"written to {token_file} (mode 600)"
            log.warning("%s is not set; a token for this run was generated and %s",
                        settings.operator_token_env, where)
        self._sockets: dict[str, set[web.WebSocketResponse]] = {}
        self._held: dict[web.WebSocketResponse, list[dict[str, Any]]] = {}
        """Frames for sockets whose ``hello`` is not sent yet, in order."""
        self._recent: OrderedDict[str, deque[tuple[float, dict[str, Any]]]] = OrderedDict()
        """Replies relayed for sessions with no tab here (see :data:`RECENT_REPLIES_S`)."""
        self._operators = _WebOperators()
        self._pipeline: Pipeline | None = None
        self._runner: web.AppRunner | None = None
        self._analytics: Analytics | None = None
        self.port = settings.port
        self.ready = False
        """Set by the service once the pipeline runs with its models; ``/readyz`` says so."""

    # -- lifecycle -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._settings.max_ws_message_bytes)
        app.router.add_get("/", self._page("chat.html"))
        app.router.add_get("/operator", self._page("operator.html"))
        app.router.add_get("/operator/analytics", self._page("analytics.html"))
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/readyz", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/ws", self._customer_ws)
        app.router.add_get("/api/operator/ws", self._operator_ws)
        app.router.add_get("/api/operator/tickets", self._tickets)
        app.router.add_get("/api/operator/tickets/{id:\\d+}", self._ticket)
        app.router.add_get("/api/operator/tickets/{id:\\d+}/draft", self._draft)
        app.router.add_get("/api/operator/tickets/{id:\\d+}/history", self._history)
        app.router.add_get("/api/operator/analytics", self._analytics_data)
        app.router.add_get("/api/operator/report/latest", self._latest_report)
        app.router.add_get("/api/operator/report/latest.png", self._latest_report_png)
        app.router.add_post("/api/operator/tickets/{id:\\d+}/link", self._link)
        app.router.add_post("/api/operator/tickets/{id:\\d+}/unlink", self._unlink)
        app.router.add_post("/api/operator/tickets/{id:\\d+}/{action}", self._ticket_action)
        app.router.add_static("/static", STATIC)
        return app

    async def start(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        store = pipeline.store
        if isinstance(store, SQLiteStore | PostgresStore):
            self._analytics = await open_analytics(store)
        if self._relay:
            self._relaying = asyncio.create_task(self._deliver_relayed(), name="web-relay")
            self._unsubscribe = await store.subscribe(RELAY_CHANNEL, self._on_relayed)
        pipeline.attach(self)
        pipeline.operators.attach(self._operators)
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._settings.host, self._settings.port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("web chat on http://%s:%s/ (operators: /operator)", self._settings.host, self.port)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            try:
                await self._unsubscribe()
            except Exception:
                log.exception("could not stop listening on %s", RELAY_CHANNEL)
            self._unsubscribe = None
        if self._relaying is not None:
            self._relaying.cancel()
            await asyncio.gather(self._relaying, return_exceptions=True)
            self._relaying = None
        for group in list(self._sockets.values()):
            for ws in list(group):
                await ws.close()
        for ws in list(self._operators._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._analytics is not None:
            await self._analytics.close()

    @property
    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError("web adapter not started")
        return self._pipeline

    # -- customer channel ------------------------------------------------------------

    def open_reply(self, conversation_key: str) -> ReplyStream:
        return _WebReply(self, conversation_key)

    async def deliver(self, conversation_key: str, reply: Reply) -> str:
        reply_id = uuid.uuid4().hex[:12]
        await self.broadcast(conversation_key, self.reply_json(reply, reply_id))
        return platform_reply_id(reply_id)

    @staticmethod
    def reply_json(reply: Reply, reply_id: str) -> dict[str, Any]:
        return {
            "type": "reply" if reply.sender.value == "bot" else "message",
            "reply": reply_id,
            "sender": reply.sender.value,
            "text": reply.text,
            "suggestions": [public_suggestion(s) for s in reply.suggestions],
            "citations": [asdict(c) for c in reply.citations],
        }

    async def broadcast(self, key: str, payload: dict[str, Any]) -> None:
        """To every open tab of the session, here and (when relaying) on other replicas."""
        await self._send_local(key, payload)
        if self._relay:
            await self._publish(key, payload)

    async def _publish(self, key: str, payload: dict[str, Any]) -> None:
        """To the session's tabs on other replicas. A failure is logged and is not the
        reply's: those tabs get the reply from the transcript when they reconnect."""
        message = json.dumps({"key": key, "frame": payload}, ensure_ascii=False)
        try:
            await self.pipeline.store.publish(RELAY_CHANNEL, message)
        except Exception as exc:
            log.warning("could not relay a %s frame to other replicas: %s",
                        payload.get("type"), exc)

    def _on_relayed(self, message: str) -> None:
        """A frame another replica broadcast (the store calls this; a store never hears its
        own publications, so nothing is delivered twice)."""
        try:
            relayed = json.loads(message)
            key, frame = relayed["key"], relayed["frame"]
        except (ValueError, TypeError, KeyError):
            log.warning("ignored a malformed frame on %s", RELAY_CHANNEL)
            return
        if not (isinstance(key, str) and isinstance(frame, dict)):
            return
        if key in self._sockets:
            self._inbox.put_nowait((key, frame))
        elif frame.get("type") in ("reply", "message"):
            self._keep_recent(key, frame)

    def _keep_recent(self, key: str, frame: dict[str, Any]) -> None:
        now = time.monotonic()
        self._recent.setdefault(key, deque(maxlen=20)).append((now, frame))
        self._recent.move_to_end(key)
        while self._recent:
            oldest = next(iter(self._recent.values()))
            if now - oldest[-1][0] <= RECENT_REPLIES_S:
                break
            self._recent.popitem(last=False)

    def _recent_for(self, key: str) -> list[dict[str, Any]]:
        kept = self._recent.get(key, ())
        now = time.monotonic()
        return [frame for at, frame in kept if now - at <= RECENT_REPLIES_S]

    async def _deliver_relayed(self) -> None:
        """One task, so relayed frames reach a tab in the order they were published, and a
        slow socket does not hold up the store's listener."""
        while True:
            key, frame = await self._inbox.get()
            try:
                await self._send_local(key, frame)
            except Exception:
                log.exception("could not deliver a relayed %s frame", frame.get("type"))

    async def _send_local(self, key: str, payload: dict[str, Any]) -> None:
        """To this replica's open tabs of the session; a closed socket is dropped quietly
        (the transcript is re-sent when the customer reconnects). A tab still waiting for
        its ``hello`` gets the frame after it, so the redraw cannot wipe it out. A reply for
        a session with no tab here is kept a moment for a tab about to connect (see
        :data:`RECENT_REPLIES_S`)."""
        if key not in self._sockets and payload.get("type") in ("reply", "message"):
            self._keep_recent(key, payload)
        for ws in list(self._sockets.get(key, ())):
            held = self._held.get(ws)
            if held is not None:
                held.append(payload)
                continue
            try:
                await ws.send_json(payload)
            except (ConnectionError, RuntimeError):
                self._sockets.get(key, set()).discard(ws)

    # -- HTTP handlers ---------------------------------------------------------------

    @staticmethod
    def _page(name: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(STATIC / name, headers={
                "Content-Security-Policy": _CSP,
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
            })

        return handler

    async def _health(self, request: web.Request) -> web.Response:
        """Liveness: the process answers."""
        return web.json_response({"ok": True})

    async def _ready(self, request: web.Request) -> web.Response:
        """Readiness: 200 only while the pipeline runs with its models loaded."""
        if self.ready and self._pipeline is not None:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False}, status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from core.metrics import REGISTRY

        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _customer_ws(self, request: web.Request) -> web.StreamResponse:
        session = request.query.get("session", "")
        if not _SESSION.match(session):
            raise web.HTTPBadRequest(text="session must be 8-64 letters, digits, - or _")
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=self._settings.max_ws_message_bytes)
        await ws.prepare(request)
        # Registered before the transcript is read, so nothing sent meanwhile is lost; held
        # until the hello is out (the client dedupes by reply id what is in both).
        self._held[ws] = self._recent_for(session)
        self._sockets.setdefault(session, set()).add(ws)
        user = User(PLATFORM, session, request.query.get("name", "")[:80])
        try:
            await ws.send_json({"type": "hello", "session": session,
                                "transcript": await self._transcript(session)})
            await self._release(ws)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_customer_frame(ws, session, user, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    try:
                        text = msg.data.decode("utf-8")
                    except UnicodeDecodeError:
                        await ws.send_json({"type": "error", "error": "messages must be UTF-8"})
                        continue
                    await self._on_customer_frame(ws, session, user, text)
                elif msg.type == WSMsgType.ERROR:
                    log.info("customer socket error: %s", ws.exception())
        finally:
            self._held.pop(ws, None)
            self._sockets.get(session, set()).discard(ws)
            if not self._sockets.get(session):
                self._sockets.pop(session, None)
        return ws

    async def _release(self, ws: web.WebSocketResponse) -> None:
        """Send what was held for a socket while its hello was being prepared."""
        held = self._held.get(ws, [])
        try:
            while held:
                await ws.send_json(held.pop(0))
        except (ConnectionError, RuntimeError):
            pass  # closed meanwhile: the next hello has it all
        finally:
            self._held.pop(ws, None)

    async def _transcript(self, session: str) -> list[dict[str, Any]]:
        store = self.pipeline.store
        convo = await store.conversation_by_key(PLATFORM, session)
        if convo is None:
            return []
        lines = []
        for line in await store.transcript(convo["id"], limit=50):
            item: dict[str, Any] = {"direction": line.direction, "sender": line.sender,
                                    "text": line.text}
            pid = line.platform_message_id or ""
            if line.direction == "in" and pid.startswith(f"{session}:"):
                item["id"] = pid[len(session) + 1:]
            elif line.direction == "out" and pid.startswith(REPLY_PREFIX):
                item["reply"] = pid[len(REPLY_PREFIX):]
            lines.append(item)
        return lines

    async def _on_customer_frame(
        self, ws: web.WebSocketResponse, session: str, user: User, raw: str
    ) -> None:
        try:
            frame = json.loads(raw)
            if not isinstance(frame, dict):
                raise ValueError
        except (ValueError, RecursionError):
            await ws.send_json({"type": "error", "error": "frames must be JSON objects"})
            return
        kind = frame.get("type")
        client_id = str(frame.get("id") or uuid.uuid4().hex)
        if not _CLIENT_ID.match(client_id):
            await ws.send_json({"type": "error", "error": "bad message id"})
            return
        text = frame.get("text", "")
        if not isinstance(text, str):
            await ws.send_json({"type": "error", "error": "text must be a string"})
            return
        if kind == "message":
            inbound = self._inbound(session, user, client_id, text, Kind.TEXT)
        elif kind == "click" and isinstance(frame.get("suggestion"), str):
            inbound = self._inbound(session, user, client_id, "", Kind.SUGGESTION_CLICK,
                                    frame["suggestion"][:100])
        elif kind == "command" and isinstance(frame.get("name"), str) \
                and frame["name"] in _COMMANDS:
            inbound = self._inbound(session, user, client_id, text, Kind.COMMAND, frame["name"])
        else:
            await ws.send_json({"type": "error", "error": f"unknown frame type {kind!r}"})
            return
        try:
            accepted = await self.pipeline.submit(inbound)
        except Exception:
            log.exception("could not accept a web message")
            await ws.send_json({"type": "error", "id": client_id,
                                "error": "we could not accept your message, please retry"})
            return
        await ws.send_json({"type": "ack", "id": client_id, "duplicate": not accepted})

    @staticmethod
    def _inbound(
        session: str, user: User, client_id: str, text: str, kind: Kind, payload: str = ""
    ) -> Inbound:
        return Inbound(
            platform=PLATFORM, conversation_key=session, user=user,
            platform_message_id=f"{session}:{client_id}", text=text, kind=kind, payload=payload,
        )

    # -- operator API ----------------------------------------------------------------

    def _operator(self, request: web.Request) -> Operator:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip()
        if not token or not hmac.compare_digest(token.encode(), self.token.encode()):
            raise _json_error(web.HTTPUnauthorized, "operator token required")
        name = request.headers.get("X-Operator-Name", "").strip()[:60] or "operator"
        return Operator(PLATFORM, name, name)

    async def _operator_body(self, request: web.Request) -> dict[str, Any]:
        """A state-changing request's JSON object, refused unless it is one, small and flat.

        The console authenticates with a bearer header, never a cookie, so a cross-site
        form cannot act for an operator: it can send neither the header nor a JSON
        content type (both are checked).
        """
        if request.content_type != "application/json":
            raise _json_error(web.HTTPUnsupportedMediaType,
                              "operator requests must be application/json")
        size = request.content_length or 0
        raw = b"" if size > MAX_OPERATOR_BODY else await request.content.read(
            MAX_OPERATOR_BODY + 1)
        if size > MAX_OPERATOR_BODY or len(raw) > MAX_OPERATOR_BODY:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_OPERATOR_BODY, actual_size=max(size, len(raw)),
                text=json.dumps(
                    {"error": f"the request body is larger than {MAX_OPERATOR_BODY} bytes"}),
                content_type="application/json",
            )
        if not raw.strip():
            return {}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _json_error(web.HTTPBadRequest, "the body must be UTF-8 JSON") from None
        if json_depth(text) > MAX_JSON_DEPTH:
            raise _json_error(web.HTTPBadRequest,
                              f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _json_error(web.HTTPBadRequest, "body must be a JSON object")
        return body

    async def _tickets(self, request: web.Request) -> web.Response:
        self._operator(request)
        tickets = await self.pipeline.operators.open_tickets()
        return web.json_response({"tickets": [ticket_json(t) for t in tickets]})

    async def _ticket(self, request: web.Request) -> web.Response:
        self._operator(request)
        try:
            ticket = await self.pipeline.operators.get(int(request.match_info["id"]))
        except OperatorError as exc:
            raise _json_error(web.HTTPNotFound, str(exc)) from None
        lines = await self.pipeline.store.transcript(ticket.conversation_id)
        return web.json_response({
            "ticket": ticket_json(ticket),
            "transcript": [
                {"id": ln.message_id, "direction": ln.direction, "sender": ln.sender,
                 "text": ln.text, "at": ln.created_at, "sentiment": ln.sentiment,
                 "p_negative": ln.p_negative, "withheld": list(ln.withheld)}
                for ln in lines
            ],
        })

    async def _draft(self, request: web.Request) -> web.Response:
        self._operator(request)
        try:
            text = await self.pipeline.operators.draft(int(request.match_info["id"]))
        except OperatorError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        except Exception as exc:
            log.warning("draft failed: %s", exc)
            return web.json_response({"error": "the bot could not draft a reply"}, status=503)
        return web.json_response({"draft": text})

    async def _ticket_action(self, request: web.Request) -> web.Response:
        operator = self._operator(request)
        ticket_id = int(request.match_info["id"])
        action = request.match_info["action"]
        body = await self._operator_body(request)
        desk = self.pipeline.operators
        try:
            if action == "claim":
                ticket = await desk.claim(ticket_id, operator)
            elif action == "reply":
                text = body.get("text", "")
                if not isinstance(text, str) or len(text) > 4000:
                    raise _json_error(web.HTTPBadRequest,
                                      "text must be a string of at most 4000 characters")
                await desk.reply(ticket_id, operator, text)
                ticket = await desk.get(ticket_id)
            elif action == "resolve":
                ticket = await desk.resolve(ticket_id, operator, str(body.get("note", ""))[:1000])
            elif action == "handback":
                ticket = await desk.hand_back(ticket_id, operator)
            else:
                raise _json_error(web.HTTPNotFound, f"no action {action!r}")
        except OperatorError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        except web.HTTPException:
            raise
        except StoreError:
            # Part of it may have happened (the customer may have the answer already):
            # the operator checks the ticket rather than sending it blindly again.
            log.exception("operator %s on ticket %d failed", action, ticket_id)
            return web.json_response({"error": ACTION_FAILED_TEXT}, status=500)
        except Exception as exc:
            # The desk could not deliver or record it (the platform or the store failed):
            # the console keeps the operator's text and says what went wrong.
            log.exception("operator %s on ticket %d failed", action, ticket_id)
            return web.json_response(
                {"error": f"{action} failed: {type(exc).__name__}: {exc}"}, status=502)
        return web.json_response({"ticket": ticket_json(ticket)})

    async def _history(self, request: web.Request) -> web.Response:
        """The customer's conversations on every account an operator linked."""
        self._operator(request)
        return await self._customer_action(
            self.pipeline.operators.history(int(request.match_info["id"])))

    async def _link(self, request: web.Request) -> web.Response:
        """Link the ticket's customer with another account: ``{"platform": "telegram",
        "platform_user_id": "12345"}``, or ``{"user_id": 7}`` for an account the console
        showed."""
        operator = self._operator(request)
        body = await self._operator_body(request)
        return await self._customer_action(
            self.pipeline.operators.link(
                int(request.match_info["id"]), operator, user_id=body.get("user_id"),
                platform=body.get("platform"), platform_user_id=body.get("platform_user_id"),
            ))

    async def _unlink(self, request: web.Request) -> web.Response:
        """Take one account (``{"user_id": 7}``) out of the ticket's customer."""
        operator = self._operator(request)
        body = await self._operator_body(request)
        return await self._customer_action(
            self.pipeline.operators.unlink(
                int(request.match_info["id"]), operator, body.get("user_id")))

    @staticmethod
    async def _customer_action(action: Awaitable[CustomerHistory]) -> web.Response:
        try:
            history = await action
        except OperatorInputError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except OperatorNotFound as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except OperatorError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response(history_json(history))

    @property
    def analytics(self) -> Analytics:
        if self._analytics is None:
            raise RuntimeError("web adapter not started")
        return self._analytics

    async def _analytics_data(self, request: web.Request) -> web.Response:
        self._operator(request)
        if self._analytics is None and self._pipeline is not None:
            raise _json_error(web.HTTPServiceUnavailable,
                              f"no analytics for a {type(self._pipeline.store).__name__}")
        q = request.query
        try:
            r = analytics.parse_range(q.get("since"), q.get("start") or None,
                                      q.get("end") or None)
            data = await self.analytics.dashboard(r)
        except AnalyticsError as exc:
            raise _json_error(web.HTTPBadRequest, str(exc)) from None
        return web.json_response(data)

    async def _latest_report(self, request: web.Request) -> web.Response:
        self._operator(request)
        latest = self._operators.latest_report
        return web.json_response({"report": latest.as_json() if latest else None})

    async def _latest_report_png(self, request: web.Request) -> web.Response:
        self._operator(request)
        latest = self._operators.latest_report
        if latest is None:
            raise _json_error(web.HTTPNotFound, "no report has been posted yet")
        return web.Response(body=latest.chart_png, content_type="image/png",
                            headers={"Cache-Control": "no-store"})

    async def _operator_ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=4096)
        await ws.prepare(request)
        try:
            first = await ws.receive_json(timeout=10)
            token = str(first.get("token", "")) if isinstance(first, dict) else ""
        except (TimeoutError, TypeError, ValueError, RecursionError):
            token = ""
        if not token or not hmac.compare_digest(token.encode(), self.token.encode()):
            await ws.send_json({"type": "error", "error": "operator token required"})
            await ws.close()
            return ws
        self._operators._sockets.add(ws)
        try:
            await ws.send_json({"type": "ready"})
            if self._operators.latest_report is not None:
                await ws.send_json({"type": "report",
                                    "report": self._operators.latest_report.as_json()})
            async for _ in ws:
                pass
        finally:
            self._operators._sockets.discard(ws)
        return ws
