"""Is the API answering? One small state machine, fed by every HTTP exchange.

Where it sits: ``client.py`` reports each exchange's outcome (``record_success`` /
``record_failure``, per endpoint, with the row it was for); the submitters ask ``admit()``
before each new upload; when a call has spent its retries the engine asks ``verdict()`` whether
the row or the API is at fault; the progress panel, the ``status`` event and the metrics read
``statistics()``.

The rule: an endpoint (``submit``, ``retrieve``) is *down* once its exchanges failed for
transport reasons (connect errors, timeouts, 5xx, answers that are not the documented shape)
``threshold`` times in a row, for at least two different rows, over at least ``outage_after``
seconds; any success on it brings it back. One row failing alone is that row's problem; a blip
shorter than ``outage_after`` is bad luck, not an outage. The API is unhealthy while an endpoint
is down:

- no new upload starts while ``retrieve`` is down (the polls, which go on, are the probes);
  while only ``submit`` is down, uploads go one at a time, each a probe;
- a row whose call spent its retries is not failed: the engine stops the run instead (exit 1,
  state saved, a rerun resumes), because the fault is the API's, not the row's. When a row
  spends its retries while its endpoint is *suspect* (failing in a row, not yet for
  ``outage_after``), ``verdict()`` waits for the answer — a success elsewhere, or the outage —
  so that no row is failed in the first seconds of an outage.

429s are not failures here: the rate limiter handles them. Transitions are logged at warning
(unhealthy) and info (healthy again), so an outage is visible without debug logs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from bulk_engine.clock import Clock
from bulk_engine.errors import ApiUnavailableError
from bulk_engine.logs import get_logger

__all__ = [
    "ENDPOINTS",
    "ApiHealth",
    "HealthStatistics",
]

log = get_logger()

ENDPOINTS = ("submit", "retrieve")


@dataclass(frozen=True, slots=True)
class HealthStatistics:
    """A snapshot of :class:`ApiHealth`."""

    healthy: bool
    unhealthy_since_wall: float | None  # epoch seconds when the current outage began
    failing_endpoints: tuple[str, ...]
    last_failure_kind: str | None
    last_failure_message: str | None  # already redacted by the client
    consecutive_failures: int  # the longest current run of failures among the endpoints
    outages: int  # transitions to unhealthy so far

    def describe(self) -> str:
        """``ok``, or ``unhealthy since 12:03:04 (retrieve: server_error)``."""
        if self.healthy or self.unhealthy_since_wall is None:
            return "ok"
        since = time.strftime("%H:%M:%S", time.localtime(self.unhealthy_since_wall))
        what = ", ".join(self.failing_endpoints)
        return f"unhealthy since {since} ({what}: {self.last_failure_kind})"


@dataclass(slots=True)
class _Run:
    """The current run of failures of one endpoint."""

    count: int = 0
    first_at: float = 0.0  # clock time of its first failure
    first_source: str | None = None
    several_sources: bool = False


class ApiHealth:
    """Per-endpoint runs of transport failures; unhealthy while an endpoint is down."""

    def __init__(self, clock: Clock, *, threshold: int = 5, outage_after: float = 10.0) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")
        self._clock = clock
        self.threshold = threshold
        self.outage_after = outage_after
        self._runs = {e: _Run() for e in ENDPOINTS}
        self._down: set[str] = set()
        self._since: float | None = None  # clock time the outage began
        self._since_wall: float | None = None
        self._last_kind: str | None = None
        self._last_message: str | None = None
        self._outages = 0
        self._probe: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None

    @property
    def healthy(self) -> bool:
        return not self._down

    # ---- feedback from the client -------------------------------------------------------------

    def record_success(self, endpoint: str) -> None:
        """An exchange on ``endpoint`` got an answer of the documented shape (429s included)."""
        run = self._runs[endpoint]
        if run.count == 0 and endpoint not in self._down:
            return
        self._runs[endpoint] = _Run()
        if endpoint in self._down:
            self._down.discard(endpoint)
            if not self._down:
                assert self._since is not None
                log.info("api_healthy_again", after_s=round(self._clock.now() - self._since, 1))
                self._since = self._since_wall = None
        self._notify()

    def record_failure(self, endpoint: str, kind: str, source: str | None = None,
                       message: str | None = None) -> None:
        """An exchange on ``endpoint`` for the row ``source`` failed for a transport reason
        (``message``: what it said, redacted)."""
        run = self._runs[endpoint]
        if run.count == 0:
            run.first_at = self._clock.now()
            run.first_source = source
        elif source != run.first_source:
            run.several_sources = True
        run.count += 1
        self._last_kind = kind
        self._last_message = message
        if endpoint not in self._down and self._suspect(endpoint) and self._overdue(endpoint):
            self._go_down(endpoint)

    # ---- what the engine asks -----------------------------------------------------------------

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Let a new upload start: at once while healthy; never while ``retrieve`` is down;
        one at a time (a probe) while only ``submit`` is down."""
        while "retrieve" in self._down:
            await self._wait_change(None)
        if self.healthy:
            yield
            return
        if self._probe is None:
            self._probe = asyncio.Lock()
        async with self._probe:
            yield

    async def verdict(self, endpoint: str) -> bool:
        """A call on ``endpoint`` spent its retries: is the API healthy (the row is at fault)?

        While the endpoint is suspect, waits until it is decided: a success anywhere on it
        (healthy), or ``outage_after`` seconds of failures (down).
        """
        while endpoint not in self._down and self._suspect(endpoint):
            left = self._runs[endpoint].first_at + self.outage_after - self._clock.now()
            if left <= 0:
                self._go_down(endpoint)
                break
            await self._wait_change(left)
        return self.healthy

    def outage_error(self) -> ApiUnavailableError:
        """The error that stops a run during an outage, saying what the API last answered."""
        st = self.statistics()
        last = f" Last answer: {st.last_failure_message}." if st.last_failure_message else ""
        return ApiUnavailableError(
            f"the API is {st.describe()}, {st.consecutive_failures} calls in a row: stopping "
            f"rather than failing rows for it.{last} The rows in flight are saved, not failed; "
            "check the API's status (and --base-url), then rerun the same command to resume."
        )

    def statistics(self) -> HealthStatistics:
        return HealthStatistics(
            healthy=self.healthy,
            unhealthy_since_wall=self._since_wall,
            failing_endpoints=tuple(e for e in ENDPOINTS if e in self._down),
            last_failure_kind=self._last_kind,
            last_failure_message=self._last_message,
            consecutive_failures=max(r.count for r in self._runs.values()),
            outages=self._outages,
        )

    # ---- internals ----------------------------------------------------------------------------

    def _suspect(self, endpoint: str) -> bool:
        run = self._runs[endpoint]
        return run.count >= self.threshold and run.several_sources

    def _overdue(self, endpoint: str) -> bool:
        return self._clock.now() - self._runs[endpoint].first_at >= self.outage_after

    def _go_down(self, endpoint: str) -> None:
        self._down.add(endpoint)
        if self._since is None:
            self._since = self._clock.now()
            self._since_wall = time.time()
            self._outages += 1
        log.warning("api_unhealthy", endpoint=endpoint, kind=self._last_kind,
                    consecutive_failures=self._runs[endpoint].count,
                    hint="no new upload starts until the API answers again; polls go on")
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_change(self, timeout: float | None) -> None:
        """Until the state changes, or ``timeout`` seconds on the clock pass."""
        if self._changed is None:
            self._changed = asyncio.Event()
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._changed.wait())}
        if timeout is not None:
            waiters.add(asyncio.ensure_future(self._clock.sleep(timeout)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                if not w.done():
                    w.cancel()
                    with suppress(asyncio.CancelledError):
                        await w
