"""One rate governor per API key, shared by every worker through the database.

Where it sits: the distributed counterpart of ``ratelimit.RateLimiter``, with the same calls
(``acquire(priority)``, ``pause_for(s)``, ``on_throttled()``, ``on_success()``): the client asks
it before every ``POST /case`` and ``POST /case/retrieve``; 429s and ``Retry-After`` go back to it.

Model: GCRA (the virtual-scheduling form of a token bucket) on the database clock
(``clock_timestamp()``; no worker's clock is ever compared with another's). State per key: the
theoretical arrival time ``tat``; a call at ``t`` conforms if ``t >= tat - tau`` with
``T = 1/rate`` and ``tau = (burst - 1) * T``, and then ``tat = max(tat, t) + T``. Over any window
of length W at most ``burst + rate * W`` calls are granted, whichever worker asks.

A reservation is one round trip: one ``UPDATE … RETURNING`` of the key's row
(:data:`RESERVE_SQL`, the step itself in the SQL function ``gov_step``). It may book a slot up to
``max_ahead`` seconds in the future; the worker then sleeps until the slot (on its own
monotonic clock: a duration computed by the database, not a date). Each process books one slot
at a time, so at most one slot per worker is ever outstanding.

Shared feedback (also in SQL, see ``schema.py``):

* ``pause_for(s)`` (a ``Retry-After``): every worker waits until ``db_now + s``; extends, never
  shortens; after it the bucket holds one token, not a burst.
* ``on_throttled()`` (a 429): halve the rate in force, at most once per second across all
  workers (the 429s of one moment are one overload), floor ``min_rate``; recovery is additive,
  5 % of the ceiling per second, computed when read (no database write per successful call).

These two are synchronous, like the local limiter's: they take effect in this process at once
and are written to the database by :meth:`Governor.run` (start it in the worker's task group), or
at the latest before this process's next reservation. A booked slot that a new pause overtakes is
dropped, not used; a slot booked before another worker's pause can still go if its wait was short
(``recheck_after``), like a call already in flight.

Locally, callers queue by priority (polls, ``PRIORITY_POLL``, before submits), FIFO within one:
one waiter at a time reserves for the queue, and a slot goes, when it comes due, to the best
waiter at that moment.

Database down: the reservation waits in ``Database.run`` (retrying with backoff), so no call is
granted while the database cannot be reached, however long that is.

The parallel-analysis window: ``set_window(limit)`` stores the limit (the self-tuning code decides
it), ``window()`` reads it with the in-use count, the rows of this key in ``submitting`` or
``submitted`` (their analyses may be running, whichever worker holds them, dead or alive).

:class:`GcraState` is the same arithmetic in pure Python, for unit tests and documentation; a
test checks the SQL against it step by step.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bulk_engine.clock import Clock, MonotonicClock
from bulk_engine.logs import get_logger
from bulk_engine.pg.connect import Conn, Database
from bulk_engine.ratelimit import PRIORITY_POLL as PRIORITY_POLL  # re-exported, as is
from bulk_engine.ratelimit import PRIORITY_SUBMIT, RateLimiter
from bulk_engine.ratelimit import Limiter as Limiter  # the protocol both limiters satisfy

log = get_logger()

__all__ = [
    "DECREASE_FACTOR",
    "DECREASE_WINDOW_S",
    "MAX_PAUSE_S",
    "RECOVERY_PER_SECOND",
    "RESERVE_SQL",
    "GcraState",
    "Governor",
    "GovernorStatistics",
    "Grant",
    "Reservation",
]

MAX_PAUSE_S = 300.0

#: One reservation: $1 key fingerprint, $2 max_ahead, $3 the time (NULL: the database clock;
#: tests pass explicit times). One HOT update of one row; the answer comes back in ``last_*``.
RESERVE_SQL = """
UPDATE bulk_engine.governors x
   SET (tat, pause_until, granted, last_granted, last_at, last_wait, last_rate, last_now) =
       (SELECT s.n_tat, s.n_pause, x.granted + s.ok::int, s.ok, s.at, s.wait, s.rate, n.now
          FROM (SELECT coalesce($3::double precision,
                                extract(epoch FROM clock_timestamp())::double precision) AS now
               ) n,
               bulk_engine.gov_step(x.tat, x.pause_until, x.rate, x.burst, x.decreased_rate,
                                    x.decreased_at, n.now, $2) s)
 WHERE x.key_fp = $1
RETURNING last_granted AS granted, last_at AS at, last_wait AS wait, last_rate AS rate,
          pause_until, last_now AS db_now
"""
DECREASE_FACTOR = 0.5
DECREASE_WINDOW_S = 1.0
RECOVERY_PER_SECOND = 0.05


# ---------------------------------------------------------------------- the pure model


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer to one reservation (database clock seconds)."""

    granted: bool
    at: float  # granted: when the call may go; else when the next free slot would be
    wait: float  # granted: at - now; else how long before asking again
    rate: float  # the rate in force
    pause_until: float
    db_now: float


@dataclass(slots=True)
class GcraState:
    """The governor of one key, as the SQL functions compute it (pure; for tests and docs)."""

    rate: float
    burst: int
    min_rate: float
    tat: float = 0.0
    pause_until: float = 0.0
    decreased_rate: float | None = None
    decreased_at: float = 0.0

    def rate_at(self, now: float) -> float:
        if self.decreased_rate is None:
            return self.rate
        return min(self.rate, self.decreased_rate
                   + RECOVERY_PER_SECOND * self.rate * max(0.0, now - self.decreased_at))

    def reserve(self, now: float, max_ahead: float) -> Reservation:
        rate = self.rate_at(now)
        t = 1.0 / rate
        tau = (self.burst - 1) * t
        pause = min(self.pause_until, now + MAX_PAUSE_S)
        base = min(max(self.tat, now), max(pause, now + max_ahead) + tau + t)
        if pause > base - tau:
            base = pause + tau
        allowed = base - tau
        if allowed <= now + max_ahead:
            self.tat = base + t
            self.pause_until = pause
            return Reservation(True, max(allowed, now), max(0.0, allowed - now), rate, pause,
                               now)
        return Reservation(False, allowed, allowed - max_ahead - now, rate, pause, now)

    def throttled(self, now: float) -> bool:
        rate = self.rate_at(now)
        if 0 <= now - self.decreased_at < DECREASE_WINDOW_S:
            return False
        new = max(self.min_rate, rate * DECREASE_FACTOR)
        self.decreased_rate = new
        self.decreased_at = now
        self.tat = max(self.tat, now + (self.burst - 1) / new)
        return True

    def pause(self, seconds: float, now: float) -> float:
        until = now + min(max(seconds, 0.0), MAX_PAUSE_S)
        if until <= self.pause_until:
            return self.pause_until
        self.pause_until = until
        self.tat = max(self.tat, now + (self.burst - 1) / self.rate_at(now))
        return until


# ---------------------------------------------------------------------- the shared governor


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission for one API call, at ``at`` on the database clock."""

    at: float
    rate: float
    priority: int
    wait: float = 0.0  # seconds slept for the slot (0: a token was there, burst included)
    due: float | None = None  # when the slot was due on this process's clock (None: unknown)


@dataclass(frozen=True, slots=True)
class GovernorStatistics:
    """This process's view of the governor (the database row has the totals of all workers)."""

    granted: int
    reservations: int  # round trips to reserve
    refused: int  # answers "no slot within max_ahead": asked again later
    dropped: int  # booked slots not used (overtaken by a pause, or no waiter left)
    throttled_events: int
    pauses: int
    current_rate: float
    waiting: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Waiter:
    __slots__ = ("cancelled", "grant", "wake")

    def __init__(self) -> None:
        self.grant: Grant | None = None
        self.cancelled = False
        self.wake: asyncio.Future[None] | None = None

    def notify(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)


class Governor:
    """The shared rate of one API key, seen from one process. Open with :meth:`open`."""

    def __init__(self, db: Database, key_fp: str, *, rate: float, max_ahead: float = 2.0,
                 recheck_after: float = 0.5, clock: Clock | None = None) -> None:
        """Use :meth:`open` (it creates or configures the key's row)."""
        self.db = db
        self.key_fp = key_fp
        self.max_ahead = float(max_ahead)
        self.recheck_after = float(recheck_after)
        self._clock = clock or MonotonicClock()
        self._current_rate = float(rate)
        self._queue: list[tuple[int, int, _Waiter]] = []
        self._live = 0
        self._seq = itertools.count()
        self._pumping = False
        self._pause_until_mono = -math.inf  # this process's own pause (local clock)
        self._pause_epoch = 0  # bumped by every local pause: a slot booked before is void
        self._pending_pause: tuple[float, float] | None = None  # (until_mono, asked_at_mono)
        self._pending_throttled = 0
        self._feedback = asyncio.Event()
        self._granted = self._reservations = self._refused = self._dropped = 0
        self._throttled_events = self._pauses = 0

    @classmethod
    async def open(cls, db: Database, api_key: str, *, rate: float, burst: int,
                   min_rate: float | None = None, configure: bool = True,
                   max_ahead: float = 2.0, recheck_after: float = 0.5,
                   clock: Clock | None = None) -> Governor:
        """The governor of ``api_key`` (stored by fingerprint only).

        ``configure``: set the key's ceiling to ``rate``/``burst`` (the last worker to start, or
        to reload, wins; a change is logged). Without it, an existing row is left as it is.
        """
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of calls per second, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        floor = rate / 20 if min_rate is None else float(min_rate)
        key_fp = db.key_fingerprint(api_key)

        async def op(c: Conn) -> tuple[float, int] | None:
            async with c.transaction():
                before = await c.fetchrow(
                    "SELECT rate, burst FROM bulk_engine.governors WHERE key_fp = $1 FOR UPDATE",
                    key_fp)
                if before is None:
                    await c.execute(
                        "INSERT INTO bulk_engine.governors (key_fp, rate, burst, min_rate) "
                        "VALUES ($1, $2, $3, $4) ON CONFLICT (key_fp) DO NOTHING",
                        key_fp, float(rate), int(burst), floor)
                    return None
                if configure:
                    await c.execute(
                        "UPDATE bulk_engine.governors SET rate = $2, burst = $3, min_rate = $4, "
                        "updated_at = clock_timestamp() WHERE key_fp = $1",
                        key_fp, float(rate), int(burst), floor)
                return float(before["rate"]), int(before["burst"])

        before = await db.run(op, what="set up the rate governor")
        if configure and before is not None and before != (float(rate), int(burst)):
            log.info("governor_reconfigured", key=key_fp, rate=rate, burst=burst,
                     previous_rate=before[0], previous_burst=before[1])
        return cls(db, key_fp, rate=rate, max_ahead=max_ahead, recheck_after=recheck_after,
                   clock=clock)

    # ------------------------------------------------------------------ state

    @property
    def current_rate(self) -> float:
        """The rate in force at the last reservation (lowered by shared 429 back-off)."""
        return self._current_rate

    @property
    def waiting(self) -> int:
        return self._live

    @property
    def paused_until(self) -> float:
        """This process's clock time until which its calls are held by a ``Retry-After`` it
        saw (other workers' pauses reach it through the database)."""
        return self._pause_until_mono

    def statistics(self) -> GovernorStatistics:
        return GovernorStatistics(
            granted=self._granted, reservations=self._reservations, refused=self._refused,
            dropped=self._dropped, throttled_events=self._throttled_events,
            pauses=self._pauses, current_rate=self._current_rate, waiting=self._live)

    async def shared_state(self) -> dict[str, Any]:
        """The key's row as every worker sees it (totals, rate in force, pause left)."""
        rec = await self.db.run(lambda c: c.fetchrow(
            """
            SELECT rate, burst, min_rate, granted, throttled_events, rate_decreases,
                   paused_seconds_total, window_limit,
                   bulk_engine.gov_rate(rate, decreased_rate, decreased_at,
                                        extract(epoch FROM clock_timestamp())) AS current_rate,
                   greatest(0, pause_until - extract(epoch FROM clock_timestamp())) AS pause_left
              FROM bulk_engine.governors WHERE key_fp = $1
            """, self.key_fp), what="read the rate governor")
        return dict(rec) if rec is not None else {}

    # ------------------------------------------------------------------ the window

    async def set_window(self, limit: int | None) -> None:
        """Store the shared parallel-analysis window (None: no limit)."""
        if limit is not None and limit < 1:
            raise ValueError(f"the window must be at least 1, got {limit}")
        await self.db.run(lambda c: c.execute(
            "UPDATE bulk_engine.governors SET window_limit = $2, updated_at = clock_timestamp() "
            "WHERE key_fp = $1", self.key_fp, limit), what="set the analysis window")

    async def window(self) -> tuple[int | None, int]:
        """(limit, in use): rows of this key whose analysis may be running, in every run."""
        rec = await self.db.run(lambda c: c.fetchrow(
            """
            SELECT (SELECT window_limit FROM bulk_engine.governors WHERE key_fp = $1) AS lim,
                   (SELECT count(*) FROM bulk_engine.rows
                     WHERE api_key_fp = $1 AND state IN ('submitting', 'submitted')) AS in_use
            """, self.key_fp), what="read the analysis window")
        assert rec is not None
        return rec["lim"], int(rec["in_use"])

    # ------------------------------------------------------------------ feedback

    def pause_for(self, seconds: float) -> None:
        """A ``Retry-After``: hold every worker of the key ``seconds`` (this one at once)."""
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        seconds = min(seconds, MAX_PAUSE_S)
        now = self._clock.now()
        until = now + seconds
        self._pauses += 1
        if until > self._pause_until_mono:
            self._pause_until_mono = until
            self._pause_epoch += 1
        if self._pending_pause is None or until > self._pending_pause[0]:
            self._pending_pause = (until, now)
        self._feedback.set()

    def on_throttled(self) -> None:
        """A 429: halve the shared rate (once per second across all workers)."""
        self._throttled_events += 1
        self._pending_throttled += 1
        self._feedback.set()

    def on_success(self) -> None:
        """A call went through. Recovery after a 429 is computed from time in the database:
        nothing to write per call."""

    async def flush(self) -> None:
        """Write pending feedback (pause, 429) to the database now."""
        self._feedback.clear()
        if events := self._pending_throttled:
            self._pending_throttled = 0
            report = uuid.uuid4()  # a retry after a lost answer must not halve twice
            res = await self.db.run(lambda c: c.fetchrow(
                "SELECT * FROM bulk_engine.gov_throttled($1, $2, NULL, $3)", self.key_fp,
                events, report), what="share a 429")
            if res is not None:
                self._current_rate = float(res["rate"])
                if res["decreased"]:
                    log.info("rate_decreased", rate=round(self._current_rate, 3))
        if self._pending_pause is not None:
            until, _asked = self._pending_pause
            self._pending_pause = None
            left = until - self._clock.now()  # time spent queueing counts against the pause
            if left > 0:
                await self.db.run(lambda c: c.fetchval(
                    "SELECT bulk_engine.gov_pause($1, $2)", self.key_fp, left),
                    what="share a Retry-After pause")

    async def run(self) -> None:
        """Write feedback as soon as it comes, until cancelled (run it in the task group)."""
        while True:
            await self._feedback.wait()
            await self.flush()

    # ------------------------------------------------------------------ acquiring

    async def acquire(self, priority: int = PRIORITY_SUBMIT) -> Grant:
        """Wait until a call may go. Lower ``priority`` first; FIFO within a priority.

        Never grants while the database cannot be reached.
        """
        waiter = _Waiter()
        heapq.heappush(self._queue, (priority, next(self._seq), waiter))
        self._live += 1
        try:
            while waiter.grant is None:
                if not self._pumping:
                    self._pumping = True
                    try:
                        grant = await self._reserve_one()
                    finally:
                        self._pumping = False
                    if grant is not None:
                        self._dispatch(grant)
                else:
                    waiter.wake = asyncio.get_running_loop().create_future()
                    try:
                        await waiter.wake
                    finally:
                        waiter.wake = None
        except BaseException:
            if waiter.grant is not None:  # cancelled just after the grant: pass it on
                self._granted -= 1
                self._dispatch(waiter.grant)
            else:
                waiter.cancelled = True
                self._live -= 1
            raise
        finally:
            self._hand_off()
        return waiter.grant

    def _head(self) -> _Waiter | None:
        while self._queue and self._queue[0][2].cancelled:
            heapq.heappop(self._queue)
        return self._queue[0][2] if self._queue else None

    def _dispatch(self, grant: Grant) -> None:
        head = self._head()
        if head is None:
            self._dropped += 1
            return
        priority, _, _ = heapq.heappop(self._queue)
        self._live -= 1
        self._granted += 1
        head.grant = Grant(grant.at, grant.rate, priority, grant.wait, grant.due)
        head.notify()

    def _hand_off(self) -> None:
        """If nobody reserves for the queue, wake its head so that it takes the role."""
        if not self._pumping and (head := self._head()) is not None:
            head.notify()

    async def _reserve_one(self) -> Grant | None:
        """One slot from the database, slept until; None if it has to be asked for again."""
        if self._pending_pause is not None or self._pending_throttled:
            await self.flush()
        while (left := self._pause_until_mono - self._clock.now()) > 0:
            await self._clock.sleep(left)
        epoch = self._pause_epoch
        rec = await self.db.run(lambda c: c.fetchrow(
            RESERVE_SQL, self.key_fp, self.max_ahead, None), what="reserve an API call")
        if rec is None:
            raise RuntimeError(f"the governor row of {self.key_fp} is gone")
        self._reservations += 1
        res = Reservation(**dict(rec))
        self._current_rate = res.rate
        if not res.granted:
            self._refused += 1
            await self._clock.sleep(max(res.wait, 0.001))
            return None
        due = self._clock.now() + res.wait
        if res.wait > 0:
            await self._clock.sleep(res.wait)
        if self._pause_epoch != epoch:  # our own 429 came while we waited: not this slot
            self._dropped += 1
            return None
        if res.wait >= self.recheck_after and await self._paused_in_db():
            self._dropped += 1  # another worker's pause came while we waited
            return None
        return Grant(res.at, res.rate, PRIORITY_SUBMIT, res.wait, due)  # priority: the taker's

    async def _paused_in_db(self) -> bool:
        paused = await self.db.run(lambda c: c.fetchval(
            "SELECT pause_until > extract(epoch FROM clock_timestamp()) "
            "FROM bulk_engine.governors WHERE key_fp = $1", self.key_fp),
            what="check the shared pause")
        return bool(paused)


if TYPE_CHECKING:  # both limiters conform: the engine can take either
    def _local(limiter: RateLimiter) -> Limiter:
        return limiter

    def _shared(limiter: Governor) -> Limiter:
        return limiter
