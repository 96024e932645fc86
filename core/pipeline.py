"""The pipeline: every customer event, from the adapter back to the adapter.

Order of work for a text message: it is committed (in :meth:`Pipeline.submit`, before
anything else), queued on its conversation, scored for sentiment, checked by the
escalation policy, answered by the generator with suggestions from the recommender,
and the reply is stored before and after it is sent. Conversations run concurrently;
the messages of one conversation are handled strictly in order.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from core import metrics
from core.channels import CustomerChannel, ReplyStream
from core.config import Settings
from core.escalation import (
    REASON_GENERATION,
    REASON_NO_ANSWER,
    REASON_REQUESTED,
    Escalation,
    EscalationPolicy,
)
from core.generation import GenerationError, GenerationParams, Generator
from core.grounding import NO_ANSWER_TEXT, Grounder, StreamingPlaceholderFilter
from core.logs import CONVERSATION_ID
from core.messages import Citation, Inbound, Kind, Reply, Sender, Suggestion, User
from core.operators import Operator, OperatorDesk
from core.prompt import build_chat
from core.recommender import NoSuggestions, Recommender, SuggestionRequest, arm_of
from core.sentiment import Classifier
from core.store import SQLiteStore, StoredInbound, StoreError
from core.text import clean_text, truncate

log = logging.getLogger(__name__)

STORE_FALLBACK_TEXT = (
    "Sorry, we have a technical problem and could not answer just now. Your message is "
    "saved and we'll answer it here as soon as the problem is fixed."
)


@dataclass(frozen=True, slots=True, order=True)
class _Job:
    message_id: int
    inbound: Inbound = field(compare=False)
    stored: StoredInbound = field(compare=False)


class Pipeline:
    """The core of the service; adapters call :meth:`submit` and implement the channels."""

    __slots__ = (
        "_active", "_backlog", "_classifier", "_closing", "_generator", "_grounder", "_healer",
        "_inflight", "_params", "_policy", "_queues", "_recommender", "_settings",
        "_store_retry_s", "_workers", "channels", "operators", "store",
    )

    def __init__(
        self,
        settings: Settings,
        store: SQLiteStore,
        classifier: Classifier,
        generator: Generator,
        recommender: Recommender | None = None,
        grounder: Grounder | None = None,
        *,
        store_retry_s: float = 1.0,
    ) -> None:
        self._settings = settings
        self._grounder = grounder
        self.store = store
        self._classifier = classifier
        self._generator = generator
        self._recommender = recommender or NoSuggestions()
        self._policy = EscalationPolicy(settings.escalation)
        g = settings.generator
        self._params = GenerationParams(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
            repetition_penalty=g.repetition_penalty, no_repeat_ngram_size=g.no_repeat_ngram_size,
        )
        self.channels: dict[str, CustomerChannel] = {}
        self.operators = OperatorDesk(self, store, settings.escalation)
        self._queues: dict[int, list[_Job]] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._active: dict[int, asyncio.Task[str]] = {}
        self._closing = False
        # Message ids queued or being processed in this run: recovery never takes them twice.
        self._inflight: set[int] = set()
        # Writes that failed after the customer already had the reply, retried by the healer.
        self._backlog: list[Callable[[], Awaitable[object]]] = []
        self._healer: asyncio.Task[None] | None = None
        self._store_retry_s = store_retry_s
        breaker = getattr(generator, "breaker", None)
        if breaker is not None:
            states = {"closed": 0, "half_open": 1, "open": 2}
            metrics.BREAKER_STATE.set_function(lambda: states.get(str(breaker.state), -1))
        else:
            metrics.BREAKER_STATE.set_function(lambda: -1)

    def attach(self, channel: CustomerChannel) -> None:
        self.channels[channel.platform] = channel

    # -- intake ----------------------------------------------------------------------

    async def submit(self, inbound: Inbound) -> bool:
        """Commit an event and queue it; ``False`` when it was delivered before.

        Raises :class:`~core.store.StoreError` when the event could not be committed: the
        adapter must then tell the platform (or the browser) that it was not accepted.
        While the database is recovering from a fault, a committed event is not queued
        here; the healer queues it, in order, with the ones the fault interrupted.
        """
        stored = await self.store.record_inbound(inbound)
        if stored is None:
            metrics.DUPLICATES.labels(inbound.platform).inc()
            return False
        metrics.MESSAGES.labels(inbound.platform, inbound.kind.value).inc()
        if not self._closing and self._healer is None:
            self._enqueue(_Job(stored.message_id, inbound, stored))
        return True

    def _enqueue(self, job: _Job) -> None:
        if job.message_id in self._inflight:
            return
        self._inflight.add(job.message_id)
        metrics.QUEUE_DEPTH.set(len(self._inflight))
        key = job.stored.conversation_id
        queue = self._queues.setdefault(key, [])
        bisect.insort(queue, job)  # a recovered message goes before newer ones
        if key not in self._workers:
            self._workers[key] = asyncio.create_task(self._drain(key), name=f"conversation-{key}")
            metrics.QUEUED.set(len(self._workers))

    def _done(self, job: _Job) -> None:
        self._inflight.discard(job.message_id)
        metrics.QUEUE_DEPTH.set(len(self._inflight))

    async def _drain(self, key: int) -> None:
        queue = self._queues[key]
        try:
            while queue and not self._closing:
                job = queue.pop(0)
                token = CONVERSATION_ID.set(job.stored.conversation_id)
                try:
                    await self._process(job)
                except asyncio.CancelledError:
                    raise
                except StoreError as exc:
                    await self._store_failed(job, queue, exc)
                except Exception:
                    log.exception("message %s failed", job.stored.message_id)
                    await self._mark(job, "failed")
                finally:
                    CONVERSATION_ID.reset(token)
                    self._done(job)
        finally:
            # No await between the emptiness check and removal: nothing can slip in.
            if not queue or self._closing:
                self._queues.pop(key, None)
                for job in queue:
                    self._done(job)
            self._workers.pop(key, None)
            if queue and not self._closing:
                self._workers[key] = asyncio.create_task(self._drain(key))
            metrics.QUEUED.set(len(self._workers))

    # -- database faults -------------------------------------------------------------

    async def _store_failed(self, job: _Job, queue: list[_Job], exc: StoreError) -> None:
        """The database failed before this message was answered. The customer gets an
        honest apology (not recorded: the database is what failed); the message and the
        rest of its conversation stay committed and unanswered, and the healer answers
        them, in order, when the database works again."""
        log.error("message %s: database failed before the reply, apologising: %s",
                  job.stored.message_id, exc)
        for parked in queue:
            self._done(parked)
        queue.clear()
        channel = self.channels.get(job.inbound.platform)
        if channel is not None and job.inbound.kind in (Kind.TEXT, Kind.COMMAND):
            try:
                await channel.deliver(job.inbound.conversation_key,
                                      Reply(STORE_FALLBACK_TEXT, Sender.SYSTEM))
                metrics.UNDELIVERED.inc()
            except Exception:
                log.exception("could not send the apology either")
        self._start_healer()

    async def _after_send(self, write: Callable[[], Awaitable[object]]) -> None:
        """A write after the customer already has the reply: if the database fails it is
        kept and retried, so a reply already sent is never sent again."""
        try:
            await write()
        except StoreError as exc:
            log.error("database failed after a reply was sent; will retry the write: %s", exc)
            self._backlog.append(write)
            self._start_healer()

    def _start_healer(self) -> None:
        if self._healer is None and not self._closing:
            self._healer = asyncio.create_task(self._heal(), name="store-healer")

    async def _heal(self) -> None:
        """Retry until the database works: first the writes it owes for replies already
        sent, then the messages the fault left unanswered (new ones wait meanwhile)."""
        delay, count = self._store_retry_s, 0
        try:
            while True:
                if self._closing:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._store_retry_s * 8)
                try:
                    while self._backlog:
                        await self._backlog[0]()
                        self._backlog.pop(0)
                    count = await self.recover()
                    break
                except StoreError as exc:
                    log.warning("database still failing: %s", exc)
        finally:
            self._healer = None  # new events queue themselves again from here
        try:
            count += await self.recover()  # those committed while the first pass ran
        except StoreError:
            self._start_healer()
            return
        log.warning("database works again; %d waiting messages queued", count)

    async def recover(self) -> int:
        """Queue what a previous run (or a database fault) left accepted but unanswered."""
        rows = await self.store.unfinished_inbound(sorted(self._inflight))
        for row in rows:
            inbound = Inbound(
                platform=row["platform"],
                conversation_key=row["conversation_key"],
                user=User(row["platform"], row["platform_user_id"], row["display_name"]),
                platform_message_id=row["platform_message_id"],
                text=row["text"],
                kind=Kind(row["kind"]),
                payload=row["payload"],
            )
            convo = await self.store.conversation(row["conversation_id"])
            stored = StoredInbound(row["id"], row["conversation_id"], convo["user_id"],
                                   convo["state"])
            self._enqueue(_Job(stored.message_id, inbound, stored))
        if rows:
            log.info("recovered %d unanswered messages", len(rows))
        return len(rows)

    async def close(self, grace_s: float) -> None:
        """Let in-flight replies finish for ``grace_s``; the rest stay unanswered in the
        store (status ``received``) and are picked up by :meth:`recover` on next start."""
        self._closing = True
        if self._healer is not None:
            self._healer.cancel()
        workers = list(self._workers.values())
        if workers:
            _, pending = await asyncio.wait(workers, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.operators.stop()

    # -- processing ------------------------------------------------------------------

    async def _mark(self, job: _Job, status: str) -> None:
        try:
            await self.store.set_inbound_status(job.stored.message_id, status)
        except Exception:
            log.exception("could not mark message %s %s", job.stored.message_id, status)

    async def _process(self, job: _Job) -> None:
        inbound, stored = job.inbound, job.stored
        await self.store.set_inbound_status(stored.message_id, "processing")
        handler: Callable[[_Job], object] = {
            Kind.TEXT: self._on_text,
            Kind.COMMAND: self._on_command,
            Kind.SUGGESTION_CLICK: self._on_click,
            Kind.REACTION: self._on_reaction,
            Kind.ATTACHMENT: self._on_attachment,
        }[inbound.kind]
        status = str(await handler(job) or "answered")  # type: ignore[misc]
        await self._after_send(lambda: self.store.set_inbound_status(stored.message_id, status))
        log.debug("message %s (%s) done", stored.message_id, inbound.kind)

    async def _state(self, conversation_id: int) -> str:
        return str((await self.store.conversation(conversation_id))["state"])

    async def _on_text(self, job: _Job) -> str:
        stored = job.stored
        text = clean_text(job.inbound.text)
        if not text:
            await self.send_to_customer(
                stored.conversation_id,
                Reply("Your message looks empty. What can I help you with?", Sender.SYSTEM),
                reply_to=stored.message_id,
            )
            return "answered"
        text, was_cut = truncate(text, self._settings.service.max_message_chars)
        scores = await self._classifier.classify(text)
        await self.store.set_sentiment(stored.message_id, scores)
        metrics.SENTIMENT.labels(scores.label).inc()
        await self.store.log_event(
            "message", user_id=stored.user_id, conversation_id=stored.conversation_id,
            message_id=stored.message_id, value=scores.label,
            data={"p_negative": round(scores.negative, 4)},
        )
        state = await self._state(stored.conversation_id)
        if state in ("escalated", "operator"):
            await self.operators.customer_wrote(stored.conversation_id)
            return "relayed"
        if state == "resolved":
            await self.store.set_state(stored.conversation_id, "bot")
        if was_cut:
            limit = self._settings.service.max_message_chars
            await self.send_to_customer(
                stored.conversation_id,
                Reply(f"Your message was very long, so I read only its first {limit:,} "
                      "characters.", Sender.SYSTEM),
            )  # no reply_to: a notice, not the answer (recovery must still answer)
        recent = await self.store.recent_customer_messages(stored.conversation_id, 12)
        decision = self._policy.decide(
            text, [r["p_negative"] for r in recent], [r["text"] for r in recent[:-1]]
        )
        if decision is not None:
            await self.escalate(stored, decision)
            return "escalated"
        return await self._answer(job, text)

    async def _on_command(self, job: _Job) -> str:
        stored, inbound = job.stored, job.inbound
        command = inbound.payload.lower().lstrip("/")
        await self.store.log_event(
            "command", user_id=stored.user_id, conversation_id=stored.conversation_id,
            message_id=stored.message_id, value=command,
        )
        prompt = self._settings.prompt
        if command == "human":
            await self.escalate(stored, Escalation(REASON_REQUESTED, {"command": "/human"}))
            return "escalated"
        if command == "feedback":
            feedback = clean_text(inbound.text)
            await self.store.log_event(
                "feedback", user_id=stored.user_id, conversation_id=stored.conversation_id,
                message_id=stored.message_id, value=feedback or "(empty)",
                data={"source": "command"},
            )
            text = ("Thank you, your feedback was recorded." if feedback
                    else "Tell us how we did: /feedback followed by your comment.")
        elif command == "start":
            text = prompt.greeting
        else:
            text = prompt.help_text
        await self.send_to_customer(
            stored.conversation_id, Reply(text, Sender.SYSTEM), reply_to=stored.message_id
        )
        return "answered"

    async def _on_click(self, job: _Job) -> str:
        stored, item = job.stored, job.inbound.payload
        # Every adapter shows the clicked article (its link or its text), so a click is
        # also a view: the recommender learns from views.
        await self.store.log_events([
            {"type": kind, "user_id": stored.user_id, "conversation_id": stored.conversation_id,
             "message_id": stored.message_id, "item_id": item}
            for kind in ("suggestion_clicked", "article_viewed")
        ])
        return "logged"

    async def _on_reaction(self, job: _Job) -> str:
        """A reaction to a bot message is feedback on the article it cited (or, without a
        citation, the first one it suggested), so the recommender can learn from it."""
        stored, target = job.stored, job.inbound.text
        item: str | None = None
        if target:
            row = await self.store.outbound_by_platform_id(job.inbound.platform, target)
            if row is not None and row["conversation_id"] == stored.conversation_id:
                try:
                    shown = json.loads(row["payload"] or "{}")
                except ValueError:
                    shown = {}
                items = [*shown.get("citations", []), *shown.get("suggestions", [])]
                item = str(items[0]) if items else None
        await self.store.log_event(
            "feedback", user_id=stored.user_id, conversation_id=stored.conversation_id,
            message_id=stored.message_id, value=job.inbound.payload, item_id=item,
            data={"source": "reaction", "target": target},
        )
        return "logged"

    async def _on_attachment(self, job: _Job) -> str:
        stored = job.stored
        await self.store.log_event(
            "attachment", user_id=stored.user_id, conversation_id=stored.conversation_id,
            message_id=stored.message_id, value=job.inbound.payload,
        )
        if await self._state(stored.conversation_id) in ("escalated", "operator"):
            await self.operators.customer_wrote(stored.conversation_id)
            return "relayed"
        await self.send_to_customer(
            stored.conversation_id,
            Reply(self._settings.prompt.attachment_text, Sender.SYSTEM),
            reply_to=stored.message_id,
        )
        return "answered"

    # -- escalation ------------------------------------------------------------------

    async def escalate(
        self, stored: StoredInbound, decision: Escalation, text: str | None = None
    ) -> None:
        ticket_id = await self.store.open_ticket(
            stored.conversation_id, decision.reason, decision.scores
        )
        if ticket_id is None:
            await self.operators.customer_wrote(stored.conversation_id)
            return
        await self.store.log_event(
            "escalated", user_id=stored.user_id, conversation_id=stored.conversation_id,
            message_id=stored.message_id, value=decision.reason,
            data={"ticket_id": ticket_id, **decision.scores},
        )
        log.info("conversation %s escalated: %s", stored.conversation_id, decision.reason)
        metrics.ESCALATIONS.labels(decision.reason).inc()
        await self.send_to_customer(
            stored.conversation_id,
            Reply(text or self._settings.escalation.handoff_text, Sender.SYSTEM),
            reply_to=stored.message_id,
        )
        await self.operators.announce(ticket_id)

    def stop_generation(self, conversation_id: int) -> None:
        """A person took over: stop the bot's reply in progress."""
        task = self._active.get(conversation_id)
        if task is not None:
            task.cancel()

    # -- answering -------------------------------------------------------------------

    async def _answer(self, job: _Job, text: str) -> str:
        stored, inbound = job.stored, job.inbound
        settings = self._settings
        channel = self.channels[inbound.platform]
        rows = await self.store.history(
            stored.conversation_id, stored.message_id, settings.prompt.history_turns
        )
        history = [("assistant" if r["direction"] == "out" else "user", r["text"]) for r in rows]
        system = settings.prompt.system
        citations: tuple[Citation, ...] = ()
        facts: Mapping[str, str] = {}
        small_talk = False
        if self._grounder is not None:
            grounding = await self._grounder.ground(
                text, [t for role, t in history if role == "user"]
            )
            if grounding.no_answer:
                decision = Escalation(REASON_NO_ANSWER, {"question": text[:200]})
                await self.escalate(
                    stored, decision, settings.grounding.no_answer_text or NO_ANSWER_TEXT
                )
                return "escalated"
            system, citations, facts = (
                grounding.system_prompt, grounding.citations, grounding.context
            )
            small_talk = grounding.small_talk
        chat = build_chat(
            system, history, text,
            count_tokens=self._generator.count_tokens,
            token_budget=settings.prompt.history_token_budget,
        )
        # A greeting or a thank-you gets no help articles: they would read as noise.
        suggestions_task = asyncio.create_task(
            self._suggest(stored, text, history, none=small_talk)
        )
        out_id = await self.store.begin_outbound(
            stored.conversation_id, inbound.platform, Sender.BOT.value, stored.message_id
        )
        stream = channel.open_reply(inbound.conversation_key)
        started = time.perf_counter()
        first_token: list[float] = []
        await stream.begin()
        generation = asyncio.create_task(
            self._generate(chat, stream, started, first_token, facts)
        )
        self._active[stored.conversation_id] = generation
        try:
            reply_text = await generation
        except asyncio.CancelledError:
            if not generation.cancelled() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            suggestions_task.cancel()
            metrics.REPLIES.labels("handed_over").inc()
            await stream.abort()
            await self.store.finish_outbound(
                out_id, status="failed", error="handed to an operator",
                latency_ms=(time.perf_counter() - started) * 1000,
            )
            return "handed_over"
        except (GenerationError, TimeoutError) as exc:
            suggestions_task.cancel()
            return await self._generation_failed(job, stream, out_id, started, exc)
        finally:
            self._active.pop(stored.conversation_id, None)
        suggestions = await suggestions_task
        reply = Reply(reply_text, Sender.BOT, tuple(suggestions), citations)
        shown = {"citations": [c.id for c in citations], "suggestions": [s.id for s in suggestions]}
        try:  # complete and about to go out: from here on it is never generated again
            await self.store.finish_outbound(
                out_id, text=reply_text, status="sending", payload=json.dumps(shown)
            )
        except StoreError:
            await stream.abort()
            raise
        try:
            platform_id = await stream.finish(reply)
        except Exception as exc:  # the platform refused it: not sent, say so in the store
            await self.store.finish_outbound(out_id, status="failed", error=str(exc)[:500])
            raise
        latency = time.perf_counter() - started
        await self._after_send(lambda: self.store.finish_outbound(
            out_id, status="sent", platform_message_id=platform_id,
            latency_ms=latency * 1000, first_token_ms=first_token[0] if first_token else None,
        ))
        metrics.REPLIES.labels("answered").inc()
        metrics.REPLY_LATENCY.observe(latency)
        if first_token:
            metrics.FIRST_TOKEN.observe(first_token[0] / 1000)
        if suggestions:
            rows = [
                {"type": "suggestion_shown", "user_id": stored.user_id,
                 "conversation_id": stored.conversation_id, "message_id": out_id,
                 "item_id": s.id, "position": i, "data": json.dumps({"arm": arm_of(s)})}
                for i, s in enumerate(suggestions)
            ]
            await self._after_send(lambda: self.store.log_events(rows))
        return "answered"

    async def _generate(
        self, chat: list, stream: ReplyStream, started: float, first_token: list[float],
        facts: Mapping[str, str],
    ) -> str:
        text = ""
        shown = StreamingPlaceholderFilter(facts)  # no raw {{Order Number}} reaches a customer
        async with asyncio.timeout(self._settings.generator.timeout_s):
            pieces = self._generator.stream(chat, self._params)
            try:
                async for piece in pieces:
                    if not first_token:
                        first_token.append((time.perf_counter() - started) * 1000)
                    visible = shown.feed(piece)
                    if visible:
                        text += visible
                        await stream.update(text)
            finally:
                await pieces.aclose()  # type: ignore[attr-defined]
        text = (text + shown.flush()).strip()
        if not text:
            raise GenerationError("the model produced an empty reply")
        return text

    async def draft_reply(self, conversation_id: int) -> str:
        """Agent assist: what the bot would answer now, for an operator to send or edit."""
        rows = await self.store.history(conversation_id, 2**62, self._settings.prompt.history_turns)
        turns = [("assistant" if r["direction"] == "out" else "user", r["text"]) for r in rows]
        while turns and turns[-1][0] == "assistant":
            turns.pop()
        if not turns:
            return ""
        chat = build_chat(
            self._settings.prompt.system, turns[:-1], turns[-1][1],
            count_tokens=self._generator.count_tokens,
            token_budget=self._settings.prompt.history_token_budget,
        )
        pieces = self._generator.stream(chat, self._params)
        text = ""
        try:
            async with asyncio.timeout(self._settings.generator.timeout_s):
                async for piece in pieces:
                    text += piece
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]
        return text.strip()

    async def _generation_failed(
        self, job: _Job, stream: ReplyStream, out_id: int, started: float, exc: BaseException
    ) -> str:
        error = str(exc) or type(exc).__name__
        log.warning("generation failed for message %s: %s", job.stored.message_id, error)
        metrics.REPLIES.labels("fallback").inc()
        metrics.GENERATOR_ERRORS.labels(self._error_kind(exc)).inc()
        await stream.abort()
        await self.store.finish_outbound(
            out_id, status="failed", error=error,
            latency_ms=(time.perf_counter() - started) * 1000,
        )
        await self.send_to_customer(
            job.stored.conversation_id,
            Reply(self._settings.generator.fallback_text, Sender.SYSTEM),
            reply_to=job.stored.message_id,
        )
        ticket_id = await self.store.open_ticket(
            job.stored.conversation_id, REASON_GENERATION, {"error": error[:300]}
        )
        if ticket_id is not None:
            metrics.ESCALATIONS.labels(REASON_GENERATION).inc()
            await self.store.log_event(
                "escalated", user_id=job.stored.user_id,
                conversation_id=job.stored.conversation_id, value=REASON_GENERATION,
                data={"ticket_id": ticket_id},
            )
            await self.operators.announce(ticket_id)
        return "fallback"

    def _error_kind(self, exc: BaseException) -> str:
        breaker = getattr(self._generator, "breaker", None)
        if breaker is not None and str(breaker.state) == "open":
            return "circuit_open"
        text = str(exc)
        if isinstance(exc, TimeoutError) or "within" in text or "timed out" in text:
            return "timeout"
        if getattr(exc, "partial", False):
            return "cut_mid_stream"
        if "empty" in text:
            return "empty"
        return "error"

    async def _suggest(
        self, stored: StoredInbound, text: str, history: list[tuple[str, str]],
        *, none: bool = False,
    ) -> list[Suggestion]:
        k = self._settings.recommender.max_suggestions
        if none or not self._settings.recommender.enabled or k == 0:
            return []
        request = SuggestionRequest(
            stored.user_id, stored.conversation_id, text,
            tuple(t for role, t in history if role == "user")[-3:],
        )
        try:
            return await self._recommender.suggest(request, k)
        except Exception:
            log.exception("recommender failed; replying without suggestions")
            return []

    # -- delivery --------------------------------------------------------------------

    async def send_to_customer(
        self,
        conversation_id: int,
        reply: Reply,
        *,
        reply_to: int | None = None,
        operator: Operator | None = None,
    ) -> None:
        """Send a whole message, stored as pending before and sent after."""
        convo = await self.store.conversation(conversation_id)
        out_id = await self.store.begin_outbound(
            conversation_id, convo["platform"], reply.sender.value, reply_to, reply.text,
            status="sending",
        )
        channel = self.channels.get(convo["platform"])
        if channel is None:
            await self.store.finish_outbound(out_id, status="failed", error="platform offline")
            raise RuntimeError(f"no adapter for platform {convo['platform']!r} is running")
        try:
            platform_id = await channel.deliver(convo["conversation_key"], reply)
        except Exception as exc:
            await self.store.finish_outbound(out_id, status="failed", error=str(exc)[:500])
            raise
        await self._after_send(lambda: self.store.finish_outbound(
            out_id, status="sent", platform_message_id=platform_id,
            author=None if operator is None else operator.label,
        ))
