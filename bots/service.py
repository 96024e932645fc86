"""Assembling the service from config: store, models, pipeline and adapters."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from pathlib import Path

from psycopg.conninfo import make_conninfo

from core import report
from core.acts import ActClassifier
from core.adapter import Adapter
from core.analytics import Analytics, TimeRange, open_analytics
from core.config import ConfigError, Settings
from core.faithfulness import FaithfulnessChecker
from core.generation import Generator
from core.generation.model_files import ensure_hf_model
from core.grounding import Grounder
from core.language import LanguageDetector
from core.pipeline import Pipeline
from core.recommender import NoSuggestions, Recommender
from core.replicas import default_replica_id
from core.retrieval import Retriever
from core.sentiment import build_classifier
from core.store import SQLiteStore
from core.store_postgres import PostgresStore, describe_url

log = logging.getLogger(__name__)

REPORTS_POSTED = "reports:posted"
"""Shared-state scope: which report period a replica has claimed."""


def build_store(settings: Settings) -> SQLiteStore | PostgresStore:
    """PostgreSQL when ``store.url`` is set (the password only from the environment),
    else the embedded SQLite file."""
    s = settings.store
    if not s.url:
        log.info("store: SQLite at %s", s.path)
        return SQLiteStore(s.path, busy_timeout_ms=s.busy_timeout_ms)
    password = settings.secret(s.password_env)
    url = make_conninfo(s.url, password=password) if password else s.url
    log.info("store: PostgreSQL at %s (pool %d-%d, password %s)", describe_url(s.url),
             s.pool_min, s.pool_max, f"from ${s.password_env}" if password else "none")
    return PostgresStore(url, min_size=s.pool_min, max_size=s.pool_max)


async def build_generator(settings: Settings) -> Generator:
    g = settings.generator
    if g.backend == "vllm":
        try:
            from core.generation.vllm import VLLMGenerator
        except ImportError:
            raise ConfigError("generator.backend: the vllm backend is not available") from None
        return VLLMGenerator(
            g, api_key=settings.secret(g.api_key_env),
            tokenizer_dir=Path(g.tokenizer) if g.tokenizer else None,
            failure_threshold=g.breaker_failures, probe_interval_s=g.breaker_probe_s,
        )
    from core.generation.embedded import TransformersGenerator

    model_dir = await asyncio.to_thread(ensure_hf_model, g.model, Path(settings.service.data_dir))
    log.info("generator: %s in process (transformers), weights in %s", g.model, model_dir)
    return TransformersGenerator(
        model_dir, device=g.device, threads=g.threads, max_concurrent=g.max_concurrent
    )


async def open_retriever(settings: Settings) -> Retriever | None:
    """The knowledge-base index, shared by grounded answers and suggestions."""
    if not (settings.grounding.enabled or settings.recommender.enabled):
        return None
    cache = Path(settings.service.data_dir) / "cache"
    return await Retriever.open(
        settings.recommender.knowledge_dir, cache, threshold=settings.grounding.threshold,
        reload_interval_s=settings.grounding.reload_interval_s,
    )


async def build_recommender(
    settings: Settings, store: SQLiteStore | PostgresStore, retriever: Retriever | None
) -> Recommender:
    if not settings.recommender.enabled:
        return NoSuggestions()
    from core.suggestions import build_default_recommender

    return await build_default_recommender(settings, store, retriever)


def build_grounder(settings: Settings, retriever: Retriever | None) -> Grounder | None:
    g = settings.grounding
    if not g.enabled or retriever is None:
        return None
    known = {
        "company_name": g.company_name, "website_url": g.website_url,
        "support_phone": g.support_phone, "support_email": g.support_email,
        "support_hours": g.support_hours,
    }
    return Grounder(
        retriever, settings.prompt.system, k=g.k, max_context_chars=g.max_context_chars,
        cite_margin=g.cite_margin, known=known, reload_interval_s=g.reload_interval_s,
    )


def build_answer_checks(
    settings: Settings, retriever: Retriever | None,
) -> tuple[ActClassifier | None, FaithfulnessChecker | None]:
    """The conversation-act classifier and the faithfulness check, both on the retriever's
    MiniLM (one encoder, one query cache for the message and its passages)."""
    if retriever is None:
        return None, None
    a = settings.answers
    acts = ActClassifier(retriever.embed) if a.acts else None
    checker = FaithfulnessChecker(retriever.embed) if a.check else None
    log.info("answers: acts %s, faithfulness check %s, mode %s",
             "on" if acts else "off", "on" if checker else "off", a.mode)
    return acts, checker


async def build_language_detector(settings: Settings) -> LanguageDetector | None:
    """The customer's language, loaded now (about 2 s) so the first message does not wait;
    none when ``[language] detect`` is off."""
    if not settings.language.detect:
        log.info("language: every message read as English (detection off)")
        return None
    detector = LanguageDetector(tuple(settings.language.languages))
    await asyncio.to_thread(detector.load)
    log.info("language: detected among %s; anything but English is quoted from the help "
             "centre under a line in that language, or handed to a person",
             ", ".join(detector.languages))
    return detector


def build_adapters(settings: Settings) -> list[Adapter]:
    """Every enabled platform; a missing token is a config error, not a crash later."""
    adapters: list[Adapter] = []
    if settings.web.enabled:
        from adapters.web import WebAdapter

        adapters.append(WebAdapter(
            settings.web, settings.secret(settings.web.operator_token_env),
            token_file=Path(settings.service.data_dir) / "operator-token",
            relay=bool(settings.store.url),
        ))
    if settings.telegram.enabled:
        from adapters.telegram import TelegramAdapter

        token = settings.secret(settings.telegram.token_env)
        if token is None:
            raise ConfigError(f"telegram.enabled is true but ${settings.telegram.token_env} is "
                              "not set in the environment")
        adapters.append(TelegramAdapter(settings.telegram, token))
    if settings.discord.enabled:
        from adapters.discord import DiscordAdapter

        token = settings.secret(settings.discord.token_env)
        if token is None:
            raise ConfigError(f"discord.enabled is true but ${settings.discord.token_env} is "
                              "not set in the environment")
        adapters.append(DiscordAdapter(settings.discord, token))
    return adapters


def next_report_delay(out_dir: str | Path, every_s: float, now: float | None = None) -> float:
    """Seconds until the next scheduled report: ``every_s`` after the newest report file in
    ``out_dir`` (0 when that is past or there is none), so a service restarted more often
    than ``every_s`` still posts on time."""
    files = Path(out_dir).glob("sentiment-*.txt") if Path(out_dir).is_dir() else ()
    newest = max((f.stat().st_mtime for f in files), default=None)
    if newest is None:
        return 0.0
    now = time.time() if now is None else now
    return max(0.0, newest + every_s - now)


class Service:
    """The running service: start everything in order, stop it in reverse."""

    __slots__ = (
        "_analytics", "_reporter", "adapters", "classifier", "generator", "pipeline", "recommender",
        "settings", "store",
    )

    def __init__(self, settings: Settings, adapters: list[Adapter] | None = None) -> None:
        self.settings = settings
        self.adapters = adapters if adapters is not None else build_adapters(settings)
        self.store = build_store(settings)
        s = settings.sentiment
        self.classifier = build_classifier(
            s.encoder, s.head, s.model, s.max_batch, s.max_wait_ms, quantize=s.quantize,
            runtime=s.runtime, threads=s.threads,
        )
        self.generator: Generator | None = None
        self.recommender: Recommender | None = None
        self.pipeline: Pipeline | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._analytics: Analytics | None = None

    async def start(self) -> Pipeline:
        await self.store.open()
        # The analytics indexes, built before any traffic (on a large database the first
        # build takes seconds, which would otherwise hold up the store's writes).
        self._analytics = await open_analytics(self.store, create_indexes=True)
        # One model load at a time: transformers' meta-device loading is not thread-safe.
        self.generator = await build_generator(self.settings)
        await self.generator.start()
        await self.classifier.start()
        retriever = await open_retriever(self.settings)
        self.recommender = await build_recommender(self.settings, self.store, retriever)
        acts, checker = build_answer_checks(self.settings, retriever)
        self.pipeline = Pipeline(
            self.settings, self.store, self.classifier, self.generator, self.recommender,
            build_grounder(self.settings, retriever), acts=acts, checker=checker,
            languages=await build_language_detector(self.settings), recover_first=True,
            replica=self._replica(), lease_ttl_s=self.settings.service.lease_ttl_s,
            sweep_s=self.settings.service.sweep_interval_s,
        )
        # Adapters accept messages from here; until recovery has queued the older
        # unanswered ones, a new message is only committed, so each conversation is
        # answered in order.
        for adapter in self.adapters:
            await adapter.start(self.pipeline)
        await self.pipeline.recover()
        await self.pipeline.operators.start()
        if self.settings.report.enabled and self._analytics is not None:
            self._reporter = asyncio.create_task(self._report_loop(), name="sentiment-report")
        self._set_ready(True)
        return self.pipeline

    def _replica(self) -> str | None:
        """On PostgreSQL several replicas may share the database, and this one answers only
        the conversations it holds a lease on; SQLite has one process and no leases."""
        if not isinstance(self.store, PostgresStore):
            return None
        s = self.settings.service
        replica = s.replica_id or default_replica_id()
        log.info("replica %r: conversation leases of %.0f s, swept every %.1f s",
                 replica, s.lease_ttl_s, s.sweep_interval_s)
        return replica

    def _set_ready(self, ready: bool) -> None:
        """Tell adapters that serve a readiness probe (the web adapter's ``/readyz``)."""
        for adapter in self.adapters:
            if hasattr(adapter, "ready"):
                adapter.ready = ready

    async def post_report(self) -> report.Report:
        """Build the sentiment report for the last period, post it to every operator channel
        (one that fails is logged; the others still get it), then write it to ``out_dir``
        (a disk error is logged and keeps no channel from getting it)."""
        if self.pipeline is None:
            raise RuntimeError("the service is not started")
        if self._analytics is None:
            raise RuntimeError("the service is not started")
        settings = self.settings.report
        r = TimeRange.last(settings.period_s)
        built = await self._analytics.call(lambda conn: report.build(conn, r))
        posted = await self.pipeline.operators.post_report(built.summary, built.chart_png)
        log.info("sentiment report up to %s posted to %d operator channel(s)",
                 f"{r.end:%Y-%m-%d %H:%M} UTC", posted)
        try:
            await asyncio.to_thread(report.write, built, settings.out_dir)
        except OSError as exc:
            log.error("could not write the sentiment report into %s: %s", settings.out_dir, exc)
        return built

    async def _report_is_mine(self, every_s: float) -> bool:
        """Every replica keeps the schedule; the first to claim a period posts its report,
        so the operator rooms get one, not one per replica."""
        period, mine = str(int(time.time() // every_s)), uuid.uuid4().hex
        if await self.store.share_if(REPORTS_POSTED, period, mine, None) == mine:
            return True
        log.info("the sentiment report of this period is posted by another replica")
        return False

    async def _report_loop(self) -> None:
        every = self.settings.report.every_s
        delay = await asyncio.to_thread(next_report_delay, self.settings.report.out_dir, every)
        log.info("next sentiment report in %.0f s", delay)
        while True:
            await asyncio.sleep(delay)
            delay = every
            try:
                if await self._report_is_mine(every):
                    await self.post_report()
            except Exception:
                log.exception("the sentiment report failed; next try in %.0f s",
                              self.settings.report.every_s)

    async def stop(self) -> None:
        """In-flight replies finish first (new events are still committed, and answered
        after the next start); then the platforms disconnect."""
        self._set_ready(False)
        if self._reporter is not None:
            self._reporter.cancel()
            await asyncio.gather(self._reporter, return_exceptions=True)
        if self.pipeline is not None:
            await self.pipeline.close(self.settings.service.shutdown_grace_s)
        for adapter in self.adapters:
            try:
                await adapter.stop()
            except Exception:
                log.exception("stopping %s failed", adapter.platform)
        if self.generator is not None:
            await self.generator.close()
        close = getattr(self.recommender, "close", None)
        if close is not None:
            await close()
        await self.classifier.close()
        if self._analytics is not None:
            await self._analytics.close()
        await self.store.close()

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        log.info("supportbot is running; Ctrl-C to stop")
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await self.stop()
