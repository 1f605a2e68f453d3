"""Is the API answering? One small state machine, fed by every HTTP exchange.

Where it sits: ``client.py`` reports each exchange's outcome (``record_success`` /
``record_failure``, per endpoint); the submitters ask ``admit()`` before each new upload; the
engine consults ``healthy`` when a call has spent its retries; the progress panel, the ``status``
event and the metrics read ``statistics()``.

The rule: an endpoint (``submit``, ``retrieve``) is failing once ``threshold`` exchanges in a
row failed for transport reasons (connect errors, timeouts, 5xx, answers that are not the
documented shape) over at least ``outage_after`` seconds; any success on it clears that (a
blip shorter than that is a row's bad luck, not an outage). The API is unhealthy while any
endpoint is failing. While unhealthy:

- new uploads go one at a time (each a probe), so an outage does not turn the archive into
  failed lines, and a POST that works again makes the API healthy at once;
- a row whose call spends its retries is not failed: the engine stops the run instead (exit 1,
  state saved, a rerun resumes), because the fault is the API's, not the row's.

429s are not failures here: the rate limiter handles them. Transitions are logged at warning
(unhealthy) and info (healthy again), so an outage is visible without debug logs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from bulk_engine.clock import Clock
from bulk_engine.logs import get_logger

__all__ = ["ApiHealth", "HealthStatistics"]

log = get_logger()

ENDPOINTS = ("submit", "retrieve")


@dataclass(frozen=True, slots=True)
class HealthStatistics:
    """A snapshot of :class:`ApiHealth`."""

    healthy: bool
    unhealthy_since_wall: float | None  # epoch seconds when the current outage began
    failing_endpoints: tuple[str, ...]
    last_failure_kind: str | None
    consecutive_failures: int  # the largest run of failures among the endpoints
    outages: int  # transitions to unhealthy so far

    def describe(self) -> str:
        """``ok``, or ``unhealthy since 12:03:04 (retrieve: server_error)``."""
        if self.healthy or self.unhealthy_since_wall is None:
            return "ok"
        since = time.strftime("%H:%M:%S", time.localtime(self.unhealthy_since_wall))
        what = ", ".join(self.failing_endpoints)
        return f"unhealthy since {since} ({what}: {self.last_failure_kind})"


class ApiHealth:
    """Per-endpoint runs of transport failures; unhealthy while any run reaches ``threshold``."""

    def __init__(self, clock: Clock, *, threshold: int = 5, outage_after: float = 10.0) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")
        self._clock = clock
        self.threshold = threshold
        self.outage_after = outage_after
        self._runs = dict.fromkeys(ENDPOINTS, 0)
        self._first_failure = dict.fromkeys(ENDPOINTS, 0.0)  # clock time of each run's start
        self._since: float | None = None  # clock time the outage began
        self._since_wall: float | None = None
        self._last_kind: str | None = None
        self._outages = 0
        self._probe = asyncio.Lock()

    @property
    def healthy(self) -> bool:
        return self._since is None

    def unhealthy_for(self) -> float:
        """Seconds the current outage has lasted (0 while healthy)."""
        return 0.0 if self._since is None else self._clock.now() - self._since

    def record_success(self, endpoint: str) -> None:
        """An exchange on ``endpoint`` got an answer of the documented shape (429s included)."""
        self._runs[endpoint] = 0
        if self._since is not None and not any(self._failing(e) for e in ENDPOINTS):
            log.info("api_healthy_again", after_s=round(self._clock.now() - self._since, 1))
            self._since = self._since_wall = None

    def record_failure(self, endpoint: str, kind: str) -> None:
        """An exchange on ``endpoint`` failed for a transport reason (``kind``: network, ...)."""
        now = self._clock.now()
        if self._runs[endpoint] == 0:
            self._first_failure[endpoint] = now
        self._runs[endpoint] += 1
        self._last_kind = kind
        if self._since is None and self._failing(endpoint):
            self._since = now
            self._since_wall = time.time()
            self._outages += 1
            log.warning("api_unhealthy", endpoint=endpoint, kind=kind,
                        consecutive_failures=self._runs[endpoint],
                        hint="new uploads wait (one probe at a time); polls go on")

    def _failing(self, endpoint: str) -> bool:
        return (self._runs[endpoint] >= self.threshold and
                self._clock.now() - self._first_failure[endpoint] >= self.outage_after)

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Let a new upload through: at once while healthy, one at a time (a probe) otherwise."""
        if self.healthy:
            yield
            return
        async with self._probe:
            yield

    def statistics(self) -> HealthStatistics:
        return HealthStatistics(
            healthy=self.healthy,
            unhealthy_since_wall=self._since_wall,
            failing_endpoints=tuple(e for e in ENDPOINTS if self._failing(e)),
            last_failure_kind=self._last_kind,
            consecutive_failures=max(self._runs.values()),
            outages=self._outages,
        )
