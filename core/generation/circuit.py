"""A circuit breaker for a remote generator: fail fast while the server is down.

Without it every customer message waits out connect timeouts and retries against a dead
server. After ``failure_threshold`` consecutive failed requests the breaker opens:
requests fail at once, and a background probe (``GET /health`` for the vLLM backend)
runs every ``probe_interval_s``. A passing probe half-opens it: one trial request goes
through while the others still fail fast; its success closes the breaker, its failure
opens it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum

log = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpen(Exception):
    """The breaker refuses a request; the message says why and since when."""


class CircuitBreaker:
    """Counts consecutive failures; ``probe`` returns True when the server looks healthy."""

    __slots__ = (
        "_failures", "_last_error", "_name", "_opened_at", "_probe", "_probe_interval_s",
        "_prober", "_state", "_trial_running", "failure_threshold",
    )

    def __init__(
        self,
        name: str,
        probe: Callable[[], Awaitable[bool]],
        *,
        failure_threshold: int = 5,
        probe_interval_s: float = 2.0,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self._name = name
        self._probe = probe
        self._probe_interval_s = probe_interval_s
        self.failure_threshold = failure_threshold
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._last_error = ""
        self._trial_running = False
        self._prober: asyncio.Task[None] | None = None

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def acquire(self) -> None:
        """Admit a request or raise :class:`CircuitOpen`; pair with exactly one of
        :meth:`success`, :meth:`failure` or :meth:`release`."""
        if self._state is BreakerState.CLOSED:
            return
        if self._state is BreakerState.HALF_OPEN and not self._trial_running:
            self._trial_running = True
            return
        waited = time.monotonic() - self._opened_at
        raise CircuitOpen(
            f"{self._name} is unavailable: circuit open for {waited:.0f} s after "
            f"{self._failures} consecutive failures (last: {self._last_error or 'none'})"
        )

    def success(self) -> None:
        if self._state is not BreakerState.CLOSED:
            log.info("%s recovered; circuit closed", self._name)
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trial_running = False
        self._stop_probing()

    def failure(self, error: str) -> None:
        self._failures += 1
        self._last_error = error[:200]
        self._trial_running = False
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self.trip(error)

    def release(self) -> None:
        """The request ended without telling anything about the server (cancelled)."""
        self._trial_running = False

    def trip(self, error: str) -> None:
        """Open now (also used at start-up when the server is not there yet)."""
        self._last_error = error[:200]
        if self._state is not BreakerState.OPEN:
            log.warning("%s failing (%s); circuit open, probing every %.1f s",
                        self._name, self._last_error, self._probe_interval_s)
            self._opened_at = time.monotonic()
        self._state = BreakerState.OPEN
        self._trial_running = False
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(
                self._probe_until_healthy(), name=f"probe-{self._name}"
            )

    async def _probe_until_healthy(self) -> None:
        while self._state is BreakerState.OPEN:
            await asyncio.sleep(self._probe_interval_s)
            try:
                healthy = await self._probe()
            except Exception as exc:
                log.debug("%s probe failed: %s", self._name, exc)
                healthy = False
            if healthy and self._state is BreakerState.OPEN:
                log.info("%s answers its health check; circuit half-open", self._name)
                self._state = BreakerState.HALF_OPEN

    def _stop_probing(self) -> None:
        if self._prober is not None and not self._prober.done():
            self._prober.cancel()
        self._prober = None

    async def close(self) -> None:
        prober, self._prober = self._prober, None
        if prober is not None and not prober.done():
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
