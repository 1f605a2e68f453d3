"""One rate limiter per run, shared by every API call (uploads and polls alike).

Where it sits: submitters call ``acquire(PRIORITY_SUBMIT)`` before each ``POST /case`` and the poll
callback calls ``acquire(PRIORITY_POLL)`` before each ``POST /case/retrieve``. When an answer is a
429 or 503, the caller reports it here (``on_throttled``, and ``pause_for`` with the parsed
``Retry-After``) so that the whole run slows down, not just the task that was refused.

Model: a token bucket holding at most ``burst`` tokens that refills at ``current_rate`` tokens per
second; a call takes one token. Over any window of length T at most ``burst + rate * T`` calls go.
The decision is pure (``_reserve(now)``: take a token now, or say how long to wait), so it is
tested without an event loop.

Waiting: callers queue by priority, lower number first (due polls, priority 0, always go before
new submissions, priority 1), FIFO within a priority. Only one waiter at a time sleeps on the
clock, until the next token; when it wakes it grants tokens to the best waiters, whoever they
are, and hands the sleeping role on (a rate increase during that sleep is noticed at the wake).
A cancelled waiter leaves the queue without losing anyone's place; a waiter cancelled just after
it was granted gives its token back to the next waiter.

Pause: ``pause_for(s)`` (a ``Retry-After``) holds every caller until ``now + s``; a later pause
extends it, a shorter one never shortens it. Tokens stop accumulating beyond one while paused, so
the run restarts at its rate instead of with a burst the server just refused.

Adaptive rate (AIMD), on unless ``adaptive=False``:

- ``on_throttled()`` (a 429 was seen): multiply ``current_rate`` by 0.5, floored at ``min_rate``
  (default ``rate / 20``), and drop any saved-up burst. At most one decrease per 1-second window:
  the 429s of calls sent in the same moment describe one overload, not several.
- ``on_success()``: additive increase towards the configured ``rate``, by 5 % of it per second of
  clock time since the last decrease or success (not per call, so the recovery speed does not
  depend on the call rate), never above ``rate``.

Auto rate (``RateLimiter.auto``): a ``tuning.RateController`` replaces the AIMD above and sets
``current_rate`` on every success and 429 (slow start, then just under the limit it learned,
probing upwards now and then); a numeric rate given as ``ceiling`` stays a hard ceiling. The
``Retry-After`` pause works as for a numeric rate.

Quiet spells: ``idle_tokens`` (default: ``burst``) bounds what a spell without waiters saves up,
so that when submissions resume after a pause (a full outstanding window, a ``Retry-After``)
calls go out at the steady rate, not as a burst the server's own bucket may refuse. While
callers wait, the bucket still holds up to ``burst`` tokens, to catch up after event-loop lag.

``statistics()`` returns a frozen ``RateLimiterStatistics``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Any, Protocol

from bulk_engine.clock import Clock
from bulk_engine.tuning import RateController

__all__ = ["PRIORITY_POLL", "PRIORITY_SUBMIT", "Limiter", "RateLimiter", "RateLimiterStatistics"]

PRIORITY_POLL = 0
PRIORITY_SUBMIT = 1

# Float slack: token sums like 0.1 + 0.1 + 0.1 must count as "one token" at the instant they
# should, or a sleeper wakes a hair too early and sleeps again for 1e-17 s.
_EPS = 1e-9


class _Waiter:
    """One caller queued in ``acquire``."""

    __slots__ = ("cancelled", "granted", "wake")

    def __init__(self) -> None:
        self.granted = False
        self.cancelled = False
        self.wake: asyncio.Future[None] | None = None

    def notify(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)


@dataclass(frozen=True, slots=True)
class RateLimiterStatistics:
    """A snapshot of a ``RateLimiter``."""

    mode: str  # "fixed" (a numeric rate, with its AIMD) or "auto"
    rate: float  # calls/s allowed now
    ceiling: float | None  # the configured rate (None: auto without a ceiling)
    phase: str | None  # auto: the RateController's phase (starting, settled, probing)
    limit_estimate: float | None  # auto: calls/s the server accepted at the last 429
    granted: int  # calls let through
    throttled: int  # 429s reported (on_throttled)
    rate_decreases: int  # of those, the ones that lowered the rate
    paused_seconds: float  # length of the union of all Retry-After pauses
    waiting: int  # callers queued now


class RateLimiter:
    """A token bucket with explicit burst, priorities, a global pause and AIMD adaptation.

    ``rate`` is the configured calls per second (the ceiling); ``burst`` the number of calls that
    may go back to back after a quiet spell; ``initial_tokens`` (default: ``burst``) how many may
    go at once at the start. All time comes from ``clock``.
    """

    DECREASE_FACTOR = 0.5
    DECREASE_WINDOW = 1.0  # seconds: 429s closer together than this count as one event
    RECOVERY_PER_SECOND = 0.05  # fraction of the configured rate regained per clean second

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Clock,
        adaptive: bool = True,
        min_rate: float | None = None,
        initial_tokens: float | None = None,
        idle_tokens: float | None = None,
        controller: RateController | None = None,
    ) -> None:
        if not (rate > 0 and (math.isfinite(rate) or controller is not None)):
            raise ValueError(f"rate must be a positive number of calls per second, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        if controller is not None:
            floor = controller.floor if min_rate is None else min_rate
        else:
            floor = rate / 20 if min_rate is None else min_rate
        if not 0 < floor <= rate:
            raise ValueError(f"need 0 < min_rate <= rate, got {floor} and {rate}")
        if idle_tokens is not None and not 1.0 <= idle_tokens <= burst:
            raise ValueError(f"idle_tokens must be between 1 and burst, got {idle_tokens}")
        self.rate = float(rate)
        self.burst = int(burst)
        # None: a quiet spell saves up the whole burst (the classic bucket).
        self.idle_tokens = float(self.burst) if idle_tokens is None else float(idle_tokens)
        self.min_rate = float(floor)
        self.adaptive = adaptive
        self._clock = clock
        self.controller = controller
        start = clock.now()
        self._current = self.rate if controller is None else min(self.rate, controller.rate)
        # None: start with a full bucket. The engine starts with one token: the server's bucket
        # may be drained already (another run of the key), and a start-up burst that meets the
        # server's own burst leaves no room for network jitter (a 429, then AIMD halves the rate).
        self._tokens = (
            float(self.burst) if initial_tokens is None
            else min(float(self.burst), max(0.0, float(initial_tokens)))
        )
        self._last = start  # time up to which _tokens is accounted
        self._pause_until = -math.inf
        self._last_decrease = -math.inf
        self._recover_from = start
        self._queue: list[tuple[int, int, _Waiter]] = []  # (priority, seq, waiter), lazy deletion
        self._live = 0  # waiters in _queue that are neither granted nor cancelled
        self._seq = itertools.count()
        self._sleeper: _Waiter | None = None
        self.granted = 0
        self.throttled_events = 0  # every on_throttled() call
        self.rate_decreases = 0  # the ones that actually lowered the rate
        self.paused_seconds_total = 0.0  # length of the union of all pauses

    # ---- public state -------------------------------------------------------------------------

    @property
    def current_rate(self) -> float:
        """Calls per second allowed right now (``rate`` unless adaptation lowered it)."""
        return self._current

    @property
    def waiting(self) -> int:
        """Callers queued in ``acquire``."""
        return self._live

    @property
    def paused_until(self) -> float:
        """Clock time until which every caller is held (``-inf`` if never paused)."""
        return self._pause_until

    @classmethod
    def auto(
        cls,
        burst: int,
        *,
        clock: Clock,
        ceiling: float | None = None,
        initial_tokens: float | None = 1.0,
        idle_tokens: float | None = None,
        controller: RateController | None = None,
        **controller_options: Any,
    ) -> RateLimiter:
        """A limiter whose rate a ``RateController`` finds (``--rate-limit auto``).

        ``ceiling``: a numeric rate that stays a hard ceiling (None: none). ``controller``: one
        warm-started from a snapshot (``TuningSnapshot.rate_controller(ceiling=...)``); else a
        new one built with ``controller_options``. ``idle_tokens`` defaults to ``min(burst, 2)``:
        after a pause, calls resume at the learned rate rather than as a burst.
        """
        if controller is None:
            controller = RateController(ceiling=ceiling, **controller_options)
        elif controller_options:
            raise TypeError("give either a controller or options for a new one, not both")
        return cls(
            math.inf if ceiling is None else ceiling, burst, clock=clock,
            initial_tokens=initial_tokens,
            idle_tokens=min(float(burst), 2.0) if idle_tokens is None else idle_tokens,
            controller=controller,
        )

    def statistics(self) -> RateLimiterStatistics:
        """The limiter's state and counters (``stats()`` is the older dict form)."""
        c = self.controller
        return RateLimiterStatistics(
            mode="fixed" if c is None else "auto",
            rate=self._current,
            ceiling=self.rate if math.isfinite(self.rate) else None,
            phase=None if c is None else str(c.phase),
            limit_estimate=None if c is None else c.limit_estimate,
            granted=self.granted,
            throttled=self.throttled_events,
            rate_decreases=self.rate_decreases,
            paused_seconds=self.paused_seconds_total,
            waiting=self._live,
        )

    def reconfigure(self, *, rate: float | None, burst: int) -> None:
        """A new ceiling and burst, effective now (``--rate-limit``/``--burst`` changed live).

        A fixed rate's current value (below the ceiling after 429s) keeps its ratio to the
        ceiling, so a run slowed by the API stays slowed and recovers towards the new ceiling;
        the adaptation's floor moves with it. ``rate=None`` (auto) keeps an auto limiter's
        learned rate (a fixed limiter cannot become auto live). Tokens earned so far count at
        the old rate; saved-up tokens never exceed the new burst.
        """
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        now = self._clock.now()
        self._refill(now)
        self.burst = int(burst)
        self.idle_tokens = min(self.idle_tokens, float(burst))
        self._tokens = min(self._tokens, float(burst))
        if rate is None:
            return
        if self.controller is not None:
            self.controller.ceiling = rate
            self.rate = float(rate)
            self._current = min(self._current, float(rate))
            return
        scale = rate / self.rate
        self.min_rate = min(rate, self.min_rate * scale)
        self._current = min(float(rate), self._current * scale)
        self.rate = float(rate)

    def stats(self) -> dict[str, float | int]:
        """Counters for the run summary and the benchmarks."""
        return {
            "granted": self.granted,
            "throttled_events": self.throttled_events,
            "rate_decreases": self.rate_decreases,
            "paused_seconds_total": self.paused_seconds_total,
            "current_rate": self._current,
        }

    # ---- pure core: bucket arithmetic, no waiting ---------------------------------------------

    def _refill(self, now: float) -> None:
        """Account the tokens earned between ``_last`` and ``now``."""
        if now <= self._last:
            return
        if self._last < self._pause_until:  # while paused, save up one token at most
            until = min(now, self._pause_until)
            self._tokens = min(1.0, self._tokens + (until - self._last) * self._current)
            self._last = until
        if now > self._last:
            tokens = min(float(self.burst), self._tokens + (now - self._last) * self._current)
            if self._live == 0:  # nobody waited: a quiet spell saves up idle_tokens at most
                tokens = min(tokens, max(self._tokens, self.idle_tokens))
            self._tokens = tokens
            self._last = now

    def _delay(self, now: float) -> float:
        """Seconds from ``now`` until a token is free and no pause holds (after ``_refill``)."""
        # The pause cap (one token) never delays reaching one token, so this holds across it.
        ready = self._last + max(0.0, 1.0 - self._tokens) / self._current
        return max(0.0, self._pause_until - now, ready - now)

    def _reserve(self, now: float) -> float:
        """Take a token and return 0.0 if a call may go at ``now``; else the wait (none taken)."""
        self._refill(now)
        delay = self._delay(now)
        if delay > _EPS:
            return delay
        self._tokens -= 1.0
        return 0.0

    def _set_rate(self, now: float, rate: float) -> None:
        self._refill(now)  # tokens earned so far count at the old rate
        self._current = rate

    # ---- feedback from the callers ------------------------------------------------------------

    def pause_for(self, seconds: float) -> None:
        """Hold every caller until ``now + seconds``; extends, never shortens, a running pause."""
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        now = self._clock.now()
        self._refill(now)
        until = now + seconds
        if until <= self._pause_until:
            return
        self.paused_seconds_total += until - max(self._pause_until, now)
        self._pause_until = until
        self._tokens = min(self._tokens, 1.0)

    def on_throttled(self) -> None:
        """A 429 was seen: halve the rate (once per ``DECREASE_WINDOW``), not below ``min_rate``."""
        self.throttled_events += 1
        if self.controller is not None:
            now = self._clock.now()
            rate = min(self.rate, self.controller.on_throttled(now))
            if rate < self._current:
                self._set_rate(now, rate)
                self._tokens = min(self._tokens, 1.0)
                self.rate_decreases += 1
            return
        if not self.adaptive:
            return
        now = self._clock.now()
        if now - self._last_decrease < self.DECREASE_WINDOW:
            return
        self._set_rate(now, max(self.min_rate, self._current * self.DECREASE_FACTOR))
        self._tokens = min(self._tokens, 1.0)
        self._last_decrease = now
        self._recover_from = now
        self.rate_decreases += 1

    def on_success(self) -> None:
        """A call went through: recover towards ``rate`` in proportion to the clean time elapsed."""
        if self.controller is not None:
            now = self._clock.now()
            rate = min(self.rate, self.controller.on_success(now))
            if rate != self._current:
                self._set_rate(now, rate)
            return
        if not self.adaptive:
            return
        now = self._clock.now()
        if self._current < self.rate and now > self._recover_from:
            gain = self.RECOVERY_PER_SECOND * self.rate * (now - self._recover_from)
            self._set_rate(now, min(self.rate, self._current + gain))
        self._recover_from = max(self._recover_from, now)

    # ---- waiting ------------------------------------------------------------------------------

    async def acquire(self, priority: int = PRIORITY_SUBMIT) -> None:
        """Wait until a call may go. Lower ``priority`` goes first; FIFO within a priority."""
        if self._live == 0 and self._reserve(self._clock.now()) == 0.0:
            self.granted += 1
            return
        waiter = _Waiter()
        heapq.heappush(self._queue, (priority, next(self._seq), waiter))
        self._live += 1
        try:
            while not waiter.granted:
                if self._sleeper is None:
                    await self._sleep_as_head(waiter)
                    self._dispatch()
                else:
                    waiter.wake = asyncio.get_running_loop().create_future()
                    try:
                        await waiter.wake
                    finally:
                        waiter.wake = None
        except BaseException:
            if waiter.granted:  # cancelled between the grant and our return: give it back
                self.granted -= 1
                self._tokens = min(float(self.burst), self._tokens + 1.0)
                self._dispatch()
            else:
                waiter.cancelled = True
                self._live -= 1
            raise
        finally:
            self._hand_off()

    async def _sleep_as_head(self, waiter: _Waiter) -> None:
        """Sleep on the clock until the next token might be free; one sleeper at a time."""
        self._sleeper = waiter
        try:
            now = self._clock.now()
            self._refill(now)
            delay = self._delay(now)
            if delay > _EPS:
                await self._clock.sleep(delay)
        finally:
            self._sleeper = None

    def _head(self) -> _Waiter | None:
        while self._queue and self._queue[0][2].cancelled:
            heapq.heappop(self._queue)
        return self._queue[0][2] if self._queue else None

    def _dispatch(self) -> None:
        """Grant free tokens to the best waiters, in (priority, arrival) order."""
        now = self._clock.now()
        while (head := self._head()) is not None:
            # A waiter asleep on the clock cannot be woken early: a given-back token waits in
            # the bucket until the sleeper's planned wake. (Only a give-back gets here mid-sleep.)
            if head is self._sleeper or self._reserve(now) > 0.0:
                break
            heapq.heappop(self._queue)
            self._live -= 1
            self.granted += 1
            head.granted = True
            head.notify()

    def _hand_off(self) -> None:
        """If nobody sleeps for the queue, wake its head so that it takes the role."""
        if self._sleeper is None and (head := self._head()) is not None:
            head.notify()


class Limiter(Protocol):
    """What the client asks of a rate limiter: :class:`RateLimiter` (one process) and
    ``pg.governor.Governor`` (every worker of a key, through PostgreSQL) both are one."""

    @property
    def current_rate(self) -> float: ...

    @property
    def paused_until(self) -> float: ...

    async def acquire(self, priority: int = PRIORITY_SUBMIT) -> object: ...

    def pause_for(self, seconds: float) -> None: ...

    def on_throttled(self) -> None: ...

    def on_success(self) -> None: ...
