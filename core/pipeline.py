"""The pipeline: every customer event, from the adapter back to the adapter.

Order of work for a text message: it is committed (in :meth:`Pipeline.submit`, before
anything else), queued on its conversation, scored for sentiment, checked by the
escalation policy, classified as a conversation act (praise, greetings and complaints get
a fixed courtesy reply, a request for a person a hand-off), answered from the knowledge
base by the generator with every sentence checked before it is shown (or extractively),
with suggestions from the recommender, and the reply is stored before and after it is
sent. Conversations run concurrently; the messages of one conversation are handled
strictly in order.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from core import courtesy, metrics
from core.acts import Act, ActClassifier, reconcile, sincere_praise
from core.answers import CheckedAnswer, ClaimGate, Extract, extractive_answer, substantive
from core.channels import CustomerChannel, ReplyStream
from core.config import Settings
from core.escalation import (
    REASON_GENERATION,
    REASON_LANGUAGE,
    REASON_NO_ANSWER,
    REASON_REQUESTED,
    Escalation,
    EscalationPolicy,
)
from core.faithfulness import FaithfulnessChecker, named, unknown_names
from core.generation import GenerationError, GenerationParams, Generator
from core.grounding import (
    NO_ANSWER_TEXT,
    NO_ANSWER_UNHAPPY_TEXT,
    Grounder,
    Grounding,
    StreamingPlaceholderFilter,
)
from core.language import Detected, LanguageDetector, handoff_line, quote_intro
from core.logs import CONVERSATION_ID
from core.messages import Citation, Inbound, Kind, Reply, Sender, Suggestion, User
from core.operators import Operator, OperatorDesk
from core.prompt import build_chat
from core.recommender import NoSuggestions, Recommender, SuggestionRequest, arm_of
from core.replicas import LeaseLost, Leases
from core.retrieval import Hit
from core.sentiment import Classifier
from core.store import Scores, Store, StoredInbound, StoreError
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


_ANSWERING: contextvars.ContextVar[_Job | None] = contextvars.ContextVar(
    "answering", default=None)
"""The message the current task is answering (set by the worker): with several replicas,
the replies it sends are fenced by its conversation's lease and its status."""


@dataclass(slots=True)
class _Owed:
    """A write the database owes (a reply already went out); ``tries`` counts the rounds
    in which it failed although the database took other writes."""

    write: Callable[[], Awaitable[object]]
    tries: int = 0


BACKLOG_MAX_TRIES = 5
"""A backlog write that fails this often while the database works is set aside (logged and
counted), so one bad write cannot block the answers waiting behind it."""
CLOSE_FLUSH_S = 2.0
"""How long :meth:`Pipeline.close` tries to write the backlog before giving up on it."""


NAMES_UNKNOWN_SHARE = 0.75
"""The passage is silent on the question's names when it lacks this share of them: one
capitalised common word ("@Shop Check in is broken for my trip to Lisbon") must not count
as a name the passage knows."""
UNKNOWN_SENTIMENT = Scores("neutral", 1 / 3, 1 / 3, 1 / 3)
"""A message in a language the sentiment model cannot read: no label is known."""
MIXED_PRAISE_NEGATIVE = 0.5
MIXED_COMPLAINT_NEGATIVE = 0.3
"""Where act and sentiment disagree, the courtesy reply is a neutral thank-you."""
UNHAPPY_NEGATIVE = 0.5
"""At this P(negative) the no-answer hand-off starts with an apology."""
SINCERE_MAX_NEGATIVE = 0.9
"""A "complaint" with warm words is thanked neutrally only below this P(negative): above,
the warm words are more likely a jab than thanks, and the apology stands."""


def _job_from_row(row: Mapping) -> _Job:
    """An unanswered message as the store returns it, ready to queue again."""
    inbound = Inbound(
        platform=row["platform"],
        conversation_key=row["conversation_key"],
        user=User(row["platform"], row["platform_user_id"], row["display_name"]),
        platform_message_id=row["platform_message_id"],
        text=row["text"],
        kind=Kind(row["kind"]),
        payload=row["payload"],
    )
    stored = StoredInbound(row["id"], row["conversation_id"], row["user_id"], row["state"])
    return _Job(stored.message_id, inbound, stored)


class EmptyReply(GenerationError):
    """The model streamed nothing visible."""

    kind = "empty"


async def _stop_stream(pieces: AsyncIterator[str], waiting: asyncio.Future[str] | None) -> None:
    """Stop a generation stream: the pending read cancelled and awaited first (an async
    generator cannot be closed while a read of it runs), then the stream closed."""
    if waiting is not None and not waiting.done():
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
            await waiting
    await pieces.aclose()  # type: ignore[attr-defined]


def _healer_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the store healer stopped", exc_info=task.exception())


class Pipeline:
    """The core of the service; adapters call :meth:`submit` and implement the channels."""

    __slots__ = (
        "_active", "_acts", "_apologised", "_backlog", "_checker", "_classifier", "_closing",
        "_closing_streams", "_coordinator", "_faults", "_generator", "_grounder", "_healer",
        "_held", "_inflight", "_languages", "_leases", "_params", "_parked", "_policy",
        "_queues", "_recommender", "_recovered", "_retry_delay", "_settings", "_store_retry_s",
        "_watchers", "_workers", "channels", "operators", "store",
    )

    def __init__(
        self,
        settings: Settings,
        store: Store,
        classifier: Classifier,
        generator: Generator,
        recommender: Recommender | None = None,
        grounder: Grounder | None = None,
        *,
        acts: ActClassifier | None = None,
        checker: FaithfulnessChecker | None = None,
        languages: LanguageDetector | None = None,
        store_retry_s: float = 1.0,
        recover_first: bool = False,
        replica: str | None = None,
        lease_ttl_s: float = 30.0,
        sweep_s: float = 1.0,
    ) -> None:
        """``acts``: conversation acts before answering (none: every message is a question);
        ``checker``: the faithfulness check of grounded answers (none: shown unchecked);
        ``languages``: the customer's language (none: every message is English);
        ``replica``: this replica's id when several share the database (none: this
        process is the only one, as with SQLite): conversations are then answered under
        leases (``core.replicas``), and what no live replica holds is swept up."""
        self._settings = settings
        self._languages = languages
        self._grounder = grounder
        self._acts = acts if settings.answers.acts else None
        self._checker = checker if settings.answers.check else None
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
        # Generation streams being stopped after the time budget ran out (see _generate).
        self._closing_streams: set[asyncio.Future[None]] = set()
        # Message ids queued or being processed in this run: recovery never takes them twice.
        self._inflight: set[int] = set()
        # Sets that running recoveries watch: ids finished meanwhile are not queued again.
        self._watchers: list[set[int]] = []
        # Committed but not queued (startup recovery not run yet, or the healer running):
        # queued in order, together with what recovery finds.
        self._held: list[_Job] = []
        self._recovered = not recover_first
        # Writes that failed after the customer already had the reply, retried by the healer.
        self._backlog: list[_Owed] = []
        self._healer: asyncio.Task[None] | None = None
        self._store_retry_s = store_retry_s
        # The healer's wait; grows while the database keeps failing, back to the base only
        # once a message is completed (not when a probe merely succeeds).
        self._retry_delay = store_retry_s
        self._apologised: set[int] = set()  # at most one apology per message
        self._parked: set[int] = set()  # left unanswered by a fault, not queued
        self._faults = 0
        self._leases = (Leases(store, replica, lease_ttl_s, sweep_s)
                        if replica is not None else None)
        self._coordinator: asyncio.Task[None] | None = None
        breaker = getattr(generator, "breaker", None)
        if breaker is not None:
            states = {"closed": 0, "half_open": 1, "open": 2}
            metrics.BREAKER_STATE.set_function(lambda: states.get(str(breaker.state), -1))
        else:
            metrics.BREAKER_STATE.set_function(lambda: -1)

    def _answerable(self, question: str, best: Hit, extract: Extract) -> bool:
        """Whether the best passage is about the question at all: its quoted sentences close
        enough in meaning (closer for a weakly retrieved passage), and not silent on (most
        of) the names the question mentions (Delta One, CDG) unless very close."""
        a = self._settings.answers
        floor = a.min_relevance if best.score >= a.weak_score else a.weak_relevance
        if extract.relevance < floor:
            return False
        names = named(question)
        unknown = unknown_names(question, [best.text]) if names else []
        return not (names and len(unknown) >= NAMES_UNKNOWN_SHARE * len(names)
                    and extract.relevance < a.names_relevance)

    def describe(self, item_id: str) -> Suggestion | None:
        """A suggested article by id, for a button pressed on a reply another replica
        (or this one before a restart) sent."""
        return self._recommender.describe(item_id)

    @property
    def grounder(self) -> Grounder | None:
        """The knowledge-base grounding answers stand on (offline evaluations re-check)."""
        return self._grounder

    def attach(self, channel: CustomerChannel) -> None:
        self.channels[channel.platform] = channel

    @property
    def idle(self) -> bool:
        """Nothing queued, running, held, owed to the database, or being healed."""
        return not (self._inflight or self._workers or self._held or self._backlog
                    or self._healer is not None)

    # -- intake ----------------------------------------------------------------------

    async def submit(self, inbound: Inbound) -> bool:
        """Commit an event and queue it; ``False`` when it was delivered before.

        Raises :class:`~core.store.StoreError` when the event could not be committed: the
        adapter must then tell the platform (or the browser) that it was not accepted.
        Before startup recovery has run, and while the database is recovering from a
        fault, a committed event is held, not queued: recovery queues it, in order, with
        the older ones still unanswered.
        """
        stored = await self.store.record_inbound(inbound)
        if stored is None:
            metrics.DUPLICATES.labels(inbound.platform).inc()
            return False
        metrics.MESSAGES.labels(inbound.platform, inbound.kind.value).inc()
        job = _Job(stored.message_id, inbound, stored)
        if self._leases is not None and not await self._take(stored.conversation_id):
            return True  # committed; the replica answering the conversation takes it up
        if self._closing:
            pass  # committed; the next start answers it
        elif self._healer is not None or not self._recovered:
            self._held.append(job)
        else:
            self._enqueue(job)
        return True

    async def _take(self, conversation_id: int) -> bool:
        """Take the conversation's lease for this replica. A database fault is not the
        customer's problem here: the message is committed, and the sweep takes it up."""
        assert self._leases is not None
        try:
            return await self._leases.take(conversation_id)
        except StoreError as exc:
            log.warning("could not take conversation %s (the sweep will): %s",
                        conversation_id, exc)
            return False

    def _enqueue(self, job: _Job) -> None:
        if job.message_id in self._inflight:
            return
        self._parked.discard(job.message_id)
        self._inflight.add(job.message_id)
        metrics.QUEUE_DEPTH.set(len(self._inflight))
        key = job.stored.conversation_id
        queue = self._queues.setdefault(key, [])
        bisect.insort(queue, job)  # a recovered message goes before newer ones
        if key not in self._workers:
            self._workers[key] = asyncio.create_task(self._drain(key), name=f"conversation-{key}")
            metrics.QUEUED.set(len(self._workers))

    def _release(self, job: _Job) -> None:
        """Not in flight any more (finished, or handed back to recovery)."""
        self._inflight.discard(job.message_id)
        metrics.QUEUE_DEPTH.set(len(self._inflight))

    def _done(self, job: _Job) -> None:
        self._release(job)
        for seen in self._watchers:
            seen.add(job.message_id)

    async def _drain(self, key: int) -> None:
        queue = self._queues[key]
        try:
            while not self._closing:
                if self._leases is not None and not await self._adopt(key, queue):
                    break
                if not queue:
                    break
                job = queue.pop(0)
                token = CONVERSATION_ID.set(job.stored.conversation_id)
                answering = _ANSWERING.set(job)
                handed_back = False
                try:
                    await self._process(job)
                    self._retry_delay = self._store_retry_s  # the database works end to end
                except asyncio.CancelledError:
                    raise
                except LeaseLost as exc:
                    log.warning("message %s: %s; leaving it to that replica",
                                job.stored.message_id, exc)
                    for dropped in (job, *queue):
                        self._release(dropped)
                    queue.clear()
                    handed_back = True
                except StoreError as exc:
                    self._park(job, queue)
                    handed_back = True
                    await self._apologise(job, exc)
                except Exception:
                    log.exception("message %s failed", job.stored.message_id)
                    await self._mark(job, "failed")
                finally:
                    CONVERSATION_ID.reset(token)
                    _ANSWERING.reset(answering)
                    if not handed_back:
                        self._done(job)
                        self._apologised.discard(job.message_id)
        finally:
            # No await between the emptiness check and removal: nothing can slip in.
            if not queue or self._closing:
                self._queues.pop(key, None)
                for job in queue:
                    self._release(job)
                queue.clear()
            self._workers.pop(key, None)
            if queue and not self._closing:
                self._workers[key] = asyncio.create_task(self._drain(key))
            metrics.QUEUED.set(len(self._workers))

    async def _adopt(self, key: int, queue: list[_Job]) -> bool:
        """Before each message of a conversation this replica holds: the queue becomes what
        the database says is unanswered, in order (what other replicas committed for it
        meanwhile joins; what another answered while the lease had lapsed leaves); when
        nothing is left, give the lease back. ``False``: stop (the lease is gone, given
        back, or the database failed)."""
        assert self._leases is not None
        try:
            if await self._leases.extend(key):
                # Held without a lapse since this replica's last message: nobody else can
                # have left a reply half-sent, so reading what is unanswered is enough.
                rows = await self.store.unanswered_inbound(key)
            elif not await self._leases.take(key):
                for job in queue:
                    self._release(job)
                queue.clear()
                return False
            else:
                # Nothing of this conversation is being answered here between two messages,
                # so recovery's rules apply to all of it.
                rows = await self.store.unfinished_inbound((), [key])
            unanswered = {row["id"] for row in rows}
            for job in [j for j in queue if j.message_id not in unanswered]:
                queue.remove(job)
                self._done(job)  # answered by another replica meanwhile
            queued = {j.message_id for j in queue}
            for row in rows:
                job = _job_from_row(row)
                if job.message_id not in queued:
                    self._parked.discard(job.message_id)
                    self._inflight.add(job.message_id)
                    bisect.insort(queue, job)
            metrics.QUEUE_DEPTH.set(len(self._inflight))
            if queue:
                return True
            await self._leases.release(key)
        except StoreError as exc:
            # Committed and unanswered: the sweep takes the conversation up again once the
            # database answers (the lease, if still held, is this replica's own).
            log.warning("conversation %s: could not look for more messages: %s", key, exc)
            for job in queue:
                self._release(job)
            queue.clear()
            return False
        # A message committed here while the lease was being given back waits in the queue.
        return bool(queue) and await self._take(key)

    # -- database faults -------------------------------------------------------------

    def _park(self, job: _Job, queue: list[_Job]) -> None:
        """The database failed before this message was answered: it and the rest of its
        conversation stay committed and unanswered, for the healer to queue in order.
        The healer starts first, so no newer message is queued ahead of them meanwhile;
        nothing here awaits."""
        self._faults += 1
        self._start_healer()
        for parked in (job, *queue):
            self._release(parked)
            self._parked.add(parked.message_id)
        queue.clear()

    async def _apologise(self, job: _Job, exc: StoreError) -> None:
        """An honest apology (not recorded: the database is what failed), once per
        message however often the fault interrupts it."""
        if job.message_id in self._apologised:
            log.warning("message %s: database failed again before the reply: %s",
                        job.stored.message_id, exc)
            return
        log.error("message %s: database failed before the reply, apologising: %s",
                  job.stored.message_id, exc)
        channel = self.channels.get(job.inbound.platform)
        if channel is None or job.inbound.kind not in (Kind.TEXT, Kind.COMMAND):
            return
        self._apologised.add(job.message_id)
        try:
            await channel.deliver(job.inbound.conversation_key,
                                  Reply(STORE_FALLBACK_TEXT, Sender.SYSTEM))
            metrics.UNDELIVERED.inc()
        except Exception:
            log.exception("could not send the apology either")

    async def _after_send(self, write: Callable[[], Awaitable[object]]) -> None:
        """A write after the customer already has the reply: if the database fails it is
        kept and retried, so a reply already sent is never sent again."""
        try:
            await write()
        except StoreError as exc:
            log.error("database failed after a reply was sent; will retry the write: %s", exc)
            self._owe(write)

    def _owe(self, write: Callable[[], Awaitable[object]]) -> None:
        self._backlog.append(_Owed(write))
        metrics.STORE_BACKLOG.set(len(self._backlog))
        self._start_healer()

    def _start_healer(self) -> None:
        if self._healer is None and not self._closing:
            # A fresh context: the healer works for no one conversation.
            self._healer = asyncio.create_task(
                self._heal(), name="store-healer", context=contextvars.Context()
            )
            self._healer.add_done_callback(_healer_ended)

    async def _heal(self) -> None:
        """Retry until the database takes writes again: first the writes it owes for
        replies already sent, then the messages the fault left unanswered, with those
        committed meanwhile (new ones are held until then, so order is kept)."""
        try:
            while not self._closing:
                await asyncio.sleep(self._retry_delay)
                self._retry_delay = min(self._retry_delay * 2, self._store_retry_s * 8)
                try:
                    if await self._heal_once():
                        return
                except StoreError as exc:
                    log.warning("database still failing: %s", exc)
                except Exception:
                    log.exception("the store healer failed; trying again")
        finally:
            if self._healer is asyncio.current_task():
                self._healer = None

    async def _heal_once(self) -> bool:
        """One round; ``True`` when everything waiting is queued and nothing is owed."""
        probed = False
        if self._parked:
            # A real write: a transaction that changes nothing succeeds on a full disk.
            await self.store.set_inbound_status(min(self._parked), "received")
            probed = True
        while self._backlog:
            owed = self._backlog[0]
            try:
                await owed.write()
            except Exception as exc:
                if probed or not isinstance(exc, StoreError) or exc.rejected:
                    owed.tries += 1  # the database works: the write itself fails
                if owed.tries < BACKLOG_MAX_TRIES:
                    raise
                log.error("a database write failed %d times although the database works; "
                          "set aside: %s", owed.tries, exc)
                metrics.STORE_WRITES_LOST.labels("failing").inc()
            self._backlog.pop(0)
            metrics.STORE_BACKLOG.set(len(self._backlog))
            probed = True
        count = await self.recover(finish_healing=True)
        if self._healer is not None:
            return False  # another fault came meanwhile: its messages need a round too
        log.warning("database works again; %d waiting messages queued", count)
        return True

    async def recover(self, *, finish_healing: bool = False) -> int:
        """Queue what a previous run (or a database fault) left accepted but unanswered,
        together with what was committed but held meanwhile, all in one step."""
        seen: set[int] = set()
        self._watchers.append(seen)
        faults, parked = self._faults, set(self._parked)
        try:
            rows = await self._unanswered()
        finally:
            self._watchers.remove(seen)
        # From here to the end, no await: nothing can finish or be submitted in between.
        jobs = list(self._held)
        jobs += [_job_from_row(row) for row in rows if row["id"] not in seen]
        self._held.clear()
        if not self._closing:
            for job in sorted(jobs):
                if job.message_id not in seen:
                    self._enqueue(job)
        self._parked -= parked  # found now, or answered: those parked since need a round
        self._recovered = True
        if (finish_healing and self._faults == faults and not self._backlog
                and self._healer is asyncio.current_task()):
            self._healer = None  # new events queue themselves again from here
        if rows:
            log.info("recovered %d unanswered messages", len(rows))
        if self._leases is not None and self._coordinator is None and not self._closing:
            self._coordinator = asyncio.create_task(
                self._coordinate(), name="replica-leases", context=contextvars.Context())
        return len(rows)

    async def _unanswered(self) -> list[dict]:
        """What recovery queues: every unanswered message, or with several replicas, those
        of the conversations no live replica holds, each taken for this one first."""
        if self._leases is None:
            return await self.store.unfinished_inbound(sorted(self._inflight))
        rows: list[dict] = []
        for conversation_id in await self._leases.orphans():
            if conversation_id in self._workers:
                continue  # being answered here: its worker picks up the rest itself
            if await self._leases.take(conversation_id):
                found = await self.store.unfinished_inbound(
                    sorted(self._inflight), [conversation_id])
                if not found and conversation_id not in self._workers:
                    # Answered meanwhile: no worker here will give the lease back.
                    await self._leases.release(conversation_id)
                rows += found
        return rows

    async def _coordinate(self) -> None:
        """With several replicas: renew this replica's leases well before they expire, and
        sweep up what others left (a replica that died, a message committed on one replica
        while another held its conversation)."""
        assert self._leases is not None
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while not self._closing:
            await asyncio.sleep(self._leases.sweep_s)
            try:
                if loop.time() - renewed >= self._leases.ttl_s / 3:
                    await self._leases.renew()
                    renewed = loop.time()
                if self._healer is None and self._recovered and not self._closing:
                    await self.recover()
            except StoreError as exc:
                log.warning("replica sweep: database failed: %s", exc)
            except Exception:
                log.exception("replica sweep failed; trying again")

    async def close(self, grace_s: float) -> None:
        """Let in-flight replies finish for ``grace_s``; the rest stay unanswered in the
        store (status ``received``) and are picked up by :meth:`recover` on next start.
        Writes still owed to the database are tried once, for a short time."""
        self._closing = True
        if self._healer is not None:
            self._healer.cancel()
        if self._coordinator is not None:
            self._coordinator.cancel()
            await asyncio.gather(self._coordinator, return_exceptions=True)
        workers = list(self._workers.values())
        if workers:
            _, pending = await asyncio.wait(workers, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._flush_backlog()
        if self._leases is not None:
            try:
                await self._leases.release_all()  # the others need not wait for expiry
            except StoreError as exc:
                log.warning("closing: leases not given back (they expire): %s", exc)
        await self.operators.stop()

    async def _flush_backlog(self) -> None:
        if not self._backlog:
            return
        total = len(self._backlog)
        try:
            async with asyncio.timeout(CLOSE_FLUSH_S):
                while self._backlog:
                    await self._backlog[0].write()
                    self._backlog.pop(0)
        except Exception as exc:
            log.error("closing: %d of %d writes owed to the database are lost: %s",
                      len(self._backlog), total, str(exc) or type(exc).__name__)
            metrics.STORE_WRITES_LOST.labels("closed").inc(len(self._backlog))
        else:
            log.info("closing: wrote the %d writes owed to the database", total)
        metrics.STORE_BACKLOG.set(len(self._backlog))


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
        taken = time.perf_counter()
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
        detected = (await asyncio.to_thread(self._languages.detect, text)
                    if self._languages is not None else None)
        foreign = detected is not None and not detected.english
        # The sentiment model reads English only: another language is "not known", neutral
        # at even odds, so no rule that needs sentiment fires on a guess.
        scores = UNKNOWN_SENTIMENT if foreign else await self._classifier.classify(text)
        await self.store.set_sentiment(stored.message_id, scores)
        metrics.SENTIMENT.labels(scores.label).inc()
        act = None if foreign else await self._act(text, scores)
        await self.store.log_event(
            "message", user_id=stored.user_id, conversation_id=stored.conversation_id,
            message_id=stored.message_id, value=scores.label,
            data={"p_negative": round(scores.negative, 4),
                  **({"act": act.value} if act is not None else {}),
                  **({"language": detected.language, "sentiment": "not_known"}
                     if foreign and detected is not None else {})},
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
            text, [r["p_negative"] for r in recent], [r["text"] for r in recent[:-1]],
            p_positive=scores.positive,
        )
        if decision is None and act is Act.REQUEST_PERSON:
            decision = Escalation(REASON_REQUESTED, {"text": text[:200], "act": act.value})
        if decision is not None:
            await self.escalate(stored, decision, handoff_line(detected.language)
                                if foreign and detected is not None else None)
            return "escalated"
        if foreign and detected is not None:
            return await self._answer_in(job, text, detected)
        if act in (Act.PRAISE, Act.GREETING, Act.COMPLAINT):
            return await self._courtesy(job, act, text, scores)
        return await self._answer(job, text, act, taken, scores)

    def _no_answer_text(self, scores: Scores | None) -> str:
        """The team's own no-answer line if set; else an apology first when the customer
        is unhappy."""
        if self._settings.grounding.no_answer_text:
            return self._settings.grounding.no_answer_text
        if scores is not None and scores.negative >= UNHAPPY_NEGATIVE:
            return NO_ANSWER_UNHAPPY_TEXT
        return NO_ANSWER_TEXT

    async def _act(self, text: str, scores: Scores) -> Act | None:
        if self._acts is None:
            return None
        sentiment = (scores.negative, scores.neutral, scores.positive)
        result = reconcile(
            await asyncio.to_thread(self._acts.classify, text, None, sentiment), text, sentiment
        )
        metrics.ACTS.labels(result.act.value).inc()
        return result.act

    async def _courtesy(
        self, job: _Job, act: Act, text: str, scores: Scores | None = None,
    ) -> str:
        """Praise, a greeting or a complaint without a question: a fixed, honest reply (no
        facts, no promises), never a generated one and never the no-answer hand-off. When
        the act and the sentiment disagree (praise at P(negative) >= 0.5, a complaint below
        0.3), or a "complaint" says warm words without sarcasm, a thank-you that fits
        either, since the wrong one would insult. A statement with no ask is thanked."""
        write = {
            Act.PRAISE: courtesy.acknowledge_praise,
            Act.GREETING: courtesy.greet,
            Act.COMPLAINT: courtesy.apologise,
        }.get(act, courtesy.clarify)
        if write is courtesy.clarify and courtesy.states_something(text):
            write = courtesy.acknowledge
        if (scores is not None and (
            (act is Act.PRAISE and scores.negative >= MIXED_PRAISE_NEGATIVE)
            or (act is Act.COMPLAINT and scores.negative < MIXED_COMPLAINT_NEGATIVE)
        )) or (act is Act.COMPLAINT and sincere_praise(text)
               and (scores is None or scores.negative < SINCERE_MAX_NEGATIVE)):
            write = courtesy.acknowledge
        stored, inbound = job.stored, job.inbound
        out_id = await self.store.begin_outbound(
            stored.conversation_id, inbound.platform, Sender.BOT.value, stored.message_id
        )
        stream = self.channels[inbound.platform].open_reply(inbound.conversation_key)
        started = time.perf_counter()
        await stream.begin()
        await self._finish_reply(out_id, stream, Reply(write(text), Sender.BOT),
                                 {"act": act.value, "courtesy": write.__name__}, started, [])
        metrics.REPLIES.labels("acknowledged").inc()
        return "acknowledged"

    async def _answer_in(self, job: _Job, text: str, detected: Detected) -> str:
        """Another language: nothing here understands it well enough to answer in it, so
        the English help centre is quoted under one line in the customer's language when a
        passage clearly answers, and otherwise a person takes over, told so in that
        language. Never a generated reply: the model would answer in English or invent."""
        stored, inbound = job.stored, job.inbound
        extract: Extract | None = None
        grounding = (await self._grounder.ground(text, [])
                     if self._grounder is not None and self._checker is not None else None)
        if grounding is not None and grounding.hits and not grounding.no_answer:
            extract = await asyncio.to_thread(
                extractive_answer, self._checker, text, grounding.hits,
                self._settings.answers.extract_sentences,
            )
            if not self._answerable(text, grounding.hits[0], extract):
                extract = None
        if extract is None:
            decision = Escalation(REASON_LANGUAGE, {
                "language": detected.language, "confidence": round(detected.confidence, 3),
                "text": text[:200]})
            await self.escalate(stored, decision, handoff_line(detected.language))
            return "escalated"
        out_id = await self.store.begin_outbound(
            stored.conversation_id, inbound.platform, Sender.BOT.value, stored.message_id
        )
        stream = self.channels[inbound.platform].open_reply(inbound.conversation_key)
        started = time.perf_counter()
        await stream.begin()
        answer = CheckedAnswer(f"{quote_intro(detected.language)} {extract.text}",
                               extract.citations, (), extractive=True, reason="language")
        reply = Reply(answer.text, Sender.BOT, (), answer.citations)
        await self._finish_reply(out_id, stream, reply, {
            "language": detected.language, "citations": [c.id for c in answer.citations],
            "answer": answer.record()}, started, [])
        self._count_claims(answer)
        metrics.REPLIES.labels("extractive").inc()
        return "answered"

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

    async def _answer(
        self, job: _Job, text: str, act: Act | None = None, taken: float | None = None,
        scores: Scores | None = None,
    ) -> str:
        """A question: grounded, generated and checked, or quoted from the help centre.
        ``taken`` is when the message was taken up: the time budget, the first-text time
        and the latency count from there (sentiment, act and retrieval included), since
        that is how long the customer has been waiting."""
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
        grounding: Grounding | None = None
        if self._grounder is not None:
            grounding = await self._grounder.ground(
                text, [t for role, t in history if role == "user"]
            )
            if grounding.small_talk and self._acts is not None:
                return await self._courtesy(job, Act.GREETING, text)
            if grounding.no_answer and act is Act.OTHER:
                # Not a question: asking what they need beats handing a person nothing.
                return await self._courtesy(job, Act.OTHER, text)
            if grounding.no_answer:
                decision = Escalation(REASON_NO_ANSWER, {"question": text[:200]})
                await self.escalate(stored, decision, self._no_answer_text(scores))
                return "escalated"
            system, citations, facts = (
                grounding.system_prompt, grounding.citations, grounding.context
            )
        small_talk = grounding is not None and grounding.small_talk
        checker = self._checker if grounding is not None and grounding.hits else None
        extract: Extract | None = None
        if checker is not None and grounding is not None:
            extract = await asyncio.to_thread(
                extractive_answer, checker, text, grounding.hits,
                settings.answers.extract_sentences,
            )
            if not self._answerable(text, grounding.hits[0], extract):
                # The best passage is about something else: a true answer to another
                # question helps nobody, so this is a question the base cannot answer.
                decision = Escalation(REASON_NO_ANSWER, {
                    "question": text[:200], "article": grounding.hits[0].article_id,
                    "relevance": round(extract.relevance, 3),
                })
                await self.escalate(stored, decision, self._no_answer_text(scores))
                return "escalated"
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
        started = time.perf_counter() if taken is None else taken
        first_token: list[float] = []
        await stream.begin()
        gate = None
        if checker is not None and grounding is not None:
            gate = ClaimGate(
                checker, [h.text for h in grounding.hits],
                [text, *(t for role, t in history if role == "user")],
                settings.answers.max_sentences,
            )
        generation = asyncio.create_task(
            self._checked_reply(chat, stream, started, first_token, facts, gate, extract,
                                grounding, citations)
        )
        self._active[stored.conversation_id] = generation
        try:
            answer = await generation
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
        reply_text = answer.text
        reply = Reply(reply_text, Sender.BOT, tuple(suggestions), answer.citations)
        shown = {"citations": [c.id for c in answer.citations],
                 "suggestions": [s.id for s in suggestions]}
        if answer.checked:
            shown["answer"] = answer.record()
            self._count_claims(answer)
        latency = await self._finish_reply(out_id, stream, reply, shown, started, first_token)
        metrics.REPLIES.labels("extractive" if answer.extractive else "answered").inc()
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

    async def _finish_reply(
        self, out_id: int, stream: ReplyStream, reply: Reply, shown: dict, started: float,
        first_token: list[float],
    ) -> float:
        """Send a complete reply on its stream: stored as ``sending`` first (from here on it
        is never produced again), then ``sent``. Returns the latency in seconds."""
        try:
            await self._fence()
            known = {} if stream.known_id is None else {"platform_message_id": stream.known_id}
            await self.store.finish_outbound(
                out_id, text=reply.text, status="sending", payload=json.dumps(shown), **known
            )
        except (StoreError, LeaseLost):
            await stream.abort()
            raise
        try:
            platform_id = await stream.finish(reply)
        except asyncio.CancelledError:
            # Stopped at shutdown mid-send: it may already have reached the customer, so it
            # stays 'sending', which counts as sent. The last hop is at most once.
            raise
        except Exception as exc:  # refused by the platform: not sent, say so
            await self._not_sent(out_id, exc)
            raise
        latency = time.perf_counter() - started
        await self._after_send(lambda: self.store.finish_outbound(
            out_id, status="sent", platform_message_id=platform_id,
            latency_ms=latency * 1000, first_token_ms=first_token[0] if first_token else None,
        ))
        return latency

    @staticmethod
    def _count_claims(answer: CheckedAnswer) -> None:
        metrics.CLAIMS.labels("supported").inc(answer.n_supported)
        metrics.CLAIMS.labels("dropped").inc(len(answer.withheld))
        if answer.extractive:
            metrics.EXTRACTIVE.labels(answer.reason).inc()

    async def _checked_reply(
        self, chat: list, stream: ReplyStream, started: float, first_token: list[float],
        facts: Mapping[str, str], gate: ClaimGate | None, extract: Extract | None,
        grounding: Grounding | None, citations: tuple[Citation, ...],
    ) -> CheckedAnswer:
        """The generated answer, checked when there are passages to check it against; the
        extractive answer when too little of it stands (or the configured mode says so)."""
        mode = self._settings.answers.mode
        if gate is None or extract is None or grounding is None:
            text = await self._generate(chat, stream, started, first_token, facts, None)
            if not text:
                raise EmptyReply("the model produced an empty reply")
            return CheckedAnswer(text, citations, checked=False)
        raw = ""
        enough = mode == "auto" and extract.relevance >= self._settings.answers.quote_at
        # A one-slot model busy with another conversation cannot write a checked sentence
        # within the budget: quote at once rather than queue (and slow the others).
        busy = mode == "auto" and self._generator.saturated
        if mode != "extract" and not enough and not busy:
            raw = await self._generate(chat, stream, started, first_token, facts, gate)
            if substantive(gate.claims):
                cited = gate.citations(grounding.hits)
                return CheckedAnswer(gate.shown, cited, tuple(gate.claims))
        left = self._budget_left(started, gate)
        if mode == "extract":
            reason = "mode"
        elif enough:
            reason = "enough"
        elif busy:
            reason = "model_busy"
        elif left is not None and left <= 0 and not gate.shown:
            reason = "no_text_in_time"
        else:
            reason = "too_little_supported" if raw else "empty"
        text = extract.text
        if gate.shown:  # courtesy that passed ("I'm happy to help.") stays in front
            text = f"{gate.shown} {text}"
        await stream.update(text)
        return CheckedAnswer(text, extract.citations, tuple(gate.claims), extractive=True,
                             reason=reason)

    async def _generate(
        self, chat: list, stream: ReplyStream, started: float, first_token: list[float],
        facts: Mapping[str, str], gate: ClaimGate | None,
    ) -> str:
        """Stream the model's reply; with a ``gate`` only checked sentences are shown, and
        in ``auto`` mode generation stops when the time budget for the first shown text or
        for the whole reply is spent. Returns all the text the model wrote."""
        text = ""
        shown = StreamingPlaceholderFilter(facts)  # no raw {{Order Number}} reaches a customer
        ended = out_of_time = False
        waiting: asyncio.Future[str] | None = None
        async with asyncio.timeout(self._settings.generator.timeout_s):
            pieces = self._generator.stream(chat, self._params)
            try:
                while not (gate is not None and gate.full):
                    limit = self._budget_left(started, gate)
                    if limit is not None and limit <= 0:
                        out_of_time = True
                        break
                    # Not wait_for: on a timeout it waits until the model's step is over.
                    waiting = asyncio.ensure_future(anext(pieces))
                    done, _ = await asyncio.wait({waiting}, timeout=limit)
                    if not done:
                        out_of_time = True
                        break
                    next_piece, waiting = waiting, None
                    try:
                        piece = next_piece.result()
                    except StopAsyncIteration:
                        ended = True
                        break
                    if not first_token:
                        first_token.append((time.perf_counter() - started) * 1000)
                    visible = shown.feed(piece)
                    if not visible:
                        continue
                    text += visible
                    if gate is None:
                        await stream.update(text)
                    elif await gate.feed(visible):
                        await stream.update(gate.shown)
            finally:
                stop = _stop_stream(pieces, waiting)
                if out_of_time:
                    # Stopping the model can wait for the step it is in (a long prompt's
                    # prefill takes a second or more on a CPU); the customer's answer does
                    # not wait for that.
                    self._closing_streams.add(closer := asyncio.ensure_future(stop))
                    closer.add_done_callback(self._stream_closed)
                else:
                    await stop
        tail = shown.flush() if ended or gate is None else ""
        text += tail
        if gate is not None and ended:
            grew = await gate.feed(tail)
            if await gate.flush() or grew:
                await stream.update(gate.shown)
        return text.strip()

    def _stream_closed(self, closer: asyncio.Future[None]) -> None:
        self._closing_streams.discard(closer)
        if not closer.cancelled() and closer.exception() is not None:
            log.warning("closing a generation stream failed: %r", closer.exception())

    def _budget_left(self, started: float, gate: ClaimGate | None) -> float | None:
        """Seconds left of the ``auto`` mode's budget (none: no budget, wait for the model)."""
        a = self._settings.answers
        if gate is None or a.mode != "auto":
            return None
        limit = a.reply_s if gate.shown else a.first_text_s
        return started + limit - time.perf_counter()

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
        # The ticket first: once the fallback (which answers the message) is sent, a store
        # fault could no longer bring the message back, and nobody would follow it up.
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
        await self.send_to_customer(
            job.stored.conversation_id,
            Reply(self._settings.generator.fallback_text, Sender.SYSTEM),
            reply_to=job.stored.message_id,
        )
        if ticket_id is not None:
            await self.operators.announce(ticket_id)
        return "fallback"

    @staticmethod
    def _error_kind(exc: BaseException) -> str:
        """The metric label, from what failed (its type), not from the breaker's state
        after the failure nor from words in the message."""
        if isinstance(exc, TimeoutError):
            return "timeout"
        kind = getattr(exc, "kind", None)
        if isinstance(kind, str):
            return kind
        if getattr(exc, "partial", False):
            return "cut_mid_stream"
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
        answering = _ANSWERING.get()
        if answering is not None and answering.stored.conversation_id == conversation_id:
            await self._fence()
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
        except asyncio.CancelledError:
            raise  # may have reached the customer: stays 'sending' (at most once)
        except Exception as exc:  # refused by the platform: not sent, say so
            await self._not_sent(out_id, exc)
            raise
        await self._after_send(lambda: self.store.finish_outbound(
            out_id, status="sent", platform_message_id=platform_id,
            author=None if operator is None else operator.label,
        ))

    async def _fence(self) -> None:
        """With several replicas, the last hop of an answer: renew the conversation's
        lease, and stop (:class:`LeaseLost`) if another replica took it over, or took it,
        answered and gave it back while this one's lease had lapsed."""
        job = _ANSWERING.get()
        if self._leases is None or job is None:
            return
        status = await self._leases.fence(job.stored.conversation_id, job.message_id)
        if status not in ("received", "processing"):
            raise LeaseLost(job.stored.conversation_id)

    async def _not_sent(self, out_id: int, exc: BaseException) -> None:
        """Record a reply the platform refused as ``failed``, so recovery answers its message
        again; a reply that may really have reached the platform stays ``sending``.
        Shielded, so a shutdown that cancels the sender cannot skip it; a database fault
        puts the write in the backlog."""
        error = str(exc)[:500] or type(exc).__name__
        write = lambda: self.store.finish_outbound(out_id, status="failed", error=error)  # noqa: E731
        try:
            await asyncio.shield(write())
        except StoreError as store_exc:
            log.error("could not record reply %s as not sent; will retry: %s", out_id, store_exc)
            self._owe(write)
        except asyncio.CancelledError:
            pass  # cancelled again: the shielded write still runs
