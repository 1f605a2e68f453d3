"""Self-tuning: how many folders may be outstanding at the API, and how fast to call it.

Where it sits: the submitters take a unit of the ``OutstandingWindow`` before each upload and
the row gives it back when it is finished; the poll callback tells the window what it learns
(``pending`` on a 202, ``observe`` on the first 200/500). ``RateLimiter`` (``ratelimit.py``)
consults a ``RateController`` on every success and 429 when the rate is ``auto``. Both
controllers are pure code driven by the clock times they are given, and both can be saved as
JSON (``TuningSnapshot``) and started again from it.

The window (``WindowController``)
---------------------------------
The API runs at most C analyses in parallel per key (C is unknown; another job on the key takes
some); the rest queue. A folder's latency, from its 202 to its first 200, is then its queueing
delay plus its processing time, and it is only seen as an interval ``(lower, upper]``: not done
at its last 202 poll, done at this one.

- **Baseline.** The first ``warmup`` folders (10) are sent while at most ``initial_limit`` (10,
  the documented cap) are out, so they do not queue. Their intervals give the processing-time
  distribution F, each interval's weight spread evenly over it (``LatencyModel``).
- **Signal.** Every round (a quarter of the window's worth of *fresh* folders, those sent
  since the last change of the limit, seen done), the queueing delay d is fitted by maximum
  likelihood: the delay that makes ``d + F`` best explain the fresh folders' intervals, the
  ones still running counting as "not done at their last 202" (taking only the finished ones
  would favour the fast). The fit gives a likely range as well as a value. The interval is
  where the client's own delays go: a poll that waited for a rate token or for the scheduler
  only widens its folder's interval, it never moves it, so nothing needs subtracting (a
  residence-time signal, submit to first 200, would read rate-limiter waits as queueing).
- **Queue.** By Little's law the folders queued at the API are ``q = X * d`` (X: folders seen
  done per second). The target is ``max(1.5, 0.9 * sqrt(limit), 0.15 * X * baseline)``
  folders: enough that a slot freed is refilled at once although completions are seen late
  (the detection lag) and in bunches (the poll schedule), growing like the spread of those
  bunches, and never below what the delay estimate can resolve for a large cap.
- **Rules** (TCP Vegas keeping a small queue, with slow start, and Netflix's Gradient2 in
  scaling the allowance with the square root of the limit):
  WARMUP: the limit grows by one per folder seen done while submitters wait, up to twice the
  start. PROBING: the limit doubles every round in which submitters waited and no queue shows,
  until one does. SETTLED: the limit steps down when the whole likely range of q is above the
  target, up when the likely value is below it (or the delay is small for the latency), and
  holds otherwise; three clear rounds go back to PROBING. Where the polls say nothing (they
  come after every folder is done) no delay is assumed: a queue soon shows as folders still
  running at their polls. Cuts happen only when the window held submitters back for at least
  half the round, or is far above what is in use: when the rate limiter holds submitters
  instead, the window is not causing a queue, so a rate-bound run never loses throughput to a
  noisy estimate (and since cuts are limit changes, never pauses, the limiter is never idled
  by them).
- **Keeping the baseline honest.** A round surely faster than the baseline moves the baseline
  (it had some queueing in it). Six clear-evidence cuts in a row that shrink the throughput
  with the window but not the delay move it the other way (the folders got slower: a queue
  would drain, and hold the throughput while it does), and probing starts again.

The async ``OutstandingWindow`` enforces ``min(controller.limit, max_outstanding)`` on the
units held (without a controller: ``max_outstanding``, today's semaphore).

The rate (``RateController``)
-----------------------------
Start low, double while calls succeed (slow start, capped at twice the rate actually accepted,
so an idle run does not inflate it); on a 429 estimate the limit as the rate the server
accepted just before, cut to 0.7 of it and aim at 0.97 of it (the ``RateLimiter`` also pauses
everyone for the ``Retry-After``); after a quiet spell probe upwards by 5 % of the estimate
every 5 s, and probe half as often each time a probe finds the limit where it was (like the
plateau of CUBIC, the scheme botocore's adaptive retry mode uses). A numeric rate is a hard
ceiling. See ``RateController``.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import math
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bulk_engine.clock import Clock

__all__ = [
    "AdjustableSemaphore",
    "LatencyModel",
    "OutstandingWindow",
    "RateController",
    "RatePhase",
    "SemaphoreStatistics",
    "ShiftFit",
    "TuningSnapshot",
    "WindowController",
    "WindowPhase",
    "WindowStatistics",
    "fit_shift",
]


# ---- the latency model ----------------------------------------------------------------------


class LatencyModel:
    """A latency distribution as a piecewise-linear CDF through ``(xs[i], ps[i])``, rising
    from 0 at ``xs[0]`` to 1 at ``xs[-1]``; usually built by ``from_intervals``."""

    __slots__ = ("_mean", "ps", "xs")

    def __init__(self, xs: Sequence[float], ps: Sequence[float]) -> None:
        if len(xs) != len(ps) or len(xs) < 2:
            raise ValueError("need at least two (x, p) points of equal count")
        if xs[0] < 0 or any(b < a for a, b in itertools.pairwise(xs)):
            raise ValueError("xs must be non-negative and non-decreasing")
        if ps[0] != 0.0 or abs(ps[-1] - 1.0) > 1e-9:
            raise ValueError("ps must go from 0 to 1")
        if any(b < a for a, b in itertools.pairwise(ps)):
            raise ValueError("ps must be non-decreasing")
        self.xs = tuple(float(x) for x in xs)
        self.ps = (*(float(p) for p in ps[:-1]), 1.0)
        self._mean = self.xs[0] + sum(
            (self.xs[k + 1] - self.xs[k]) * (1.0 - (self.ps[k] + self.ps[k + 1]) / 2)
            for k in range(len(self.xs) - 1))

    @classmethod
    def from_intervals(cls, intervals: Iterable[tuple[float, float]]) -> LatencyModel | None:
        """The distribution of ``(lower, upper]`` observations, each spread evenly over its
        interval (None without any finite one).

        Not the maximum-likelihood estimate: Turnbull's NPMLE (``scheduler.interval_npmle``)
        and its EM relatives pile the weight of wide, overlapping intervals onto the few spots
        where most of them overlap, which from the dozen coarse intervals of a run's first
        folders put the 80th percentile off by a third of the mean in the simulations. Even
        spreading is biased for skewed shapes but stable: within about 0.1 in probability,
        from ten folders polled on the scheduler's first, exponential schedule.
        """
        obs = sorted((max(0.0, lo), max(0.0, up)) for lo, up in intervals if math.isfinite(up))
        if not obs:
            return None
        ramps = [(lo, up) if up - lo > 1e-9 else (max(0.0, up - 1e-6), up + 1e-6)
                 for lo, up in obs]
        xs = sorted({x for ramp in ramps for x in ramp})
        n = len(ramps)
        ps = [sum(min(1.0, max(0.0, (x - lo) / (up - lo))) for lo, up in ramps) / n
              for x in xs]
        ps[0], ps[-1] = 0.0, 1.0
        return cls(xs, ps)

    @property
    def mean(self) -> float:
        """Mean latency."""
        return self._mean

    def cdf(self, t: float) -> float:
        """P(latency <= t)."""
        xs, ps = self.xs, self.ps
        if t <= xs[0]:
            return 0.0
        if t >= xs[-1]:
            return 1.0
        i = bisect_right(xs, t) - 1
        x0, x1 = xs[i], xs[i + 1]
        if x1 <= x0:
            return ps[i + 1]
        return ps[i] + (ps[i + 1] - ps[i]) * (t - x0) / (x1 - x0)

    def shifted(self, delta: float) -> LatencyModel:
        """The same shape, ``delta`` seconds later (earlier if negative, never below 0)."""
        delta = max(delta, -self.xs[0])
        return LatencyModel([x + delta for x in self.xs], self.ps)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form (``from_json`` reads it back)."""
        return {"xs": [round(x, 4) for x in self.xs], "ps": [round(p, 6) for p in self.ps]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyModel:
        """The model ``to_json`` wrote (raises ``ValueError`` on a malformed one)."""
        try:
            xs, ps = [float(x) for x in data["xs"]], [float(p) for p in data["ps"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a latency model: {exc}") from None
        if ps:
            ps[-1] = 1.0
        return cls(xs, ps)

    def __repr__(self) -> str:
        return f"LatencyModel(mean={self._mean:.3g}, points={len(self.xs)})"


@dataclass(frozen=True, slots=True)
class ShiftFit:
    """How much later than a model recent folders finished: the likeliest delay, and the range
    of delays the data cannot tell apart from it."""

    best: float
    low: float
    high: float


def fit_shift(model: LatencyModel, intervals: Sequence[tuple[float, float]], *,
              low: float, high: float, prefer: float = 0.0, outlier: float = 0.03,
              spread: float = 2.0) -> ShiftFit:
    """The delay ``d`` that best explains ``intervals`` as ``d + model`` (maximum likelihood).

    Each ``(lower, upper]`` contributes ``P(lower < d + X <= upper)`` (``upper`` may be
    ``inf``: a folder still running at ``lower``), mixed with a small uniform ``outlier``
    share so that one folder unlike the model cannot dominate. Searched on a grid of 49 points
    over ``[low, high]``, refined around the best. When polls come long after every folder is
    done the likelihood is flat; of the delays tied for best, the one closest to ``prefer`` is
    taken. ``low`` and ``high`` of the result bound the delays whose log-likelihood is within
    ``spread`` of the best (about a 95 % range for ``spread`` = 2).
    """
    if not intervals or high <= low:
        return ShiftFit(prefer, low, high)
    scale = max(model.mean, 1e-6) * 20.0

    def loglik(d: float) -> float:
        total = 0.0
        for lo, up in intervals:
            p = model.cdf(up - d) - (model.cdf(lo - d) if lo > 0 else 0.0)
            width = min(1.0, max(up - lo, 1e-9) / scale)
            total += math.log((1.0 - outlier) * p + outlier * width)
        return total

    def best_of(points: list[float], values: list[float]) -> tuple[float, float]:
        top = max(values)
        ties = [d for d, v in zip(points, values, strict=True) if v >= top - 1e-6]
        return min(ties, key=lambda d: abs(d - prefer)), top

    step = (high - low) / 48
    grid = [low + k * step for k in range(49)]
    values = [loglik(d) for d in grid]
    best, top = best_of(grid, values)
    fine = [best + step * k / 8 for k in range(-8, 9) if low <= best + step * k / 8 <= high]
    fine_best, fine_top = best_of(fine, [loglik(d) for d in fine])
    if fine_top > top + 1e-9:
        best, top = fine_best, fine_top
    inside = [d for d, v in zip(grid, values, strict=True) if v >= top - spread]
    return ShiftFit(best, min(inside, default=best) - step, max(inside, default=best) + step)


# ---- the adjustable semaphore ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SemaphoreStatistics:
    """A snapshot of an ``AdjustableSemaphore``."""

    limit: int
    in_use: int
    waiting: int


class _Gate:
    """Units handed out FIFO while ``_room()`` allows; cancellation-safe.

    A waiter cancelled while queued leaves no trace; one cancelled after it was granted but
    before it resumed hands its unit on, so no unit is ever lost. Works under asyncio and under
    anyio's asyncio backend (whose cancel scopes cancel with ``CancelledError``).
    """

    def __init__(self) -> None:
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def _room(self) -> bool:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _waiting_started(self) -> None:
        """Hook: the queue of waiters just became non-empty."""

    def _waiting_stopped(self) -> None:
        """Hook: the queue of waiters just became empty."""

    @property
    def in_use(self) -> int:
        """Units held right now."""
        return self._in_use

    @property
    def waiting(self) -> int:
        """Callers queued in ``acquire``."""
        return sum(1 for f in self._waiters if not f.done())

    def try_acquire(self) -> bool:
        """Take a unit if one is free and nobody waits; never blocks."""
        self._drop_done_head()
        if not self._waiters and self._room():
            self._in_use += 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a unit (FIFO)."""
        if self.try_acquire():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        first = self.waiting == 0
        self._waiters.append(fut)
        if first:
            self._waiting_started()
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._in_use -= 1  # granted, then cancelled before it resumed: hand it on
            else:
                fut.cancel()
            self._dispatch()
            raise

    def _drop_done_head(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()

    def _dispatch(self) -> None:
        """Grant units to the waiters at the head while there is room."""
        self._drop_done_head()
        had = bool(self._waiters)
        while self._waiters and self._room():
            fut = self._waiters.popleft()
            if fut.done():
                continue
            self._in_use += 1
            fut.set_result(None)
        self._drop_done_head()
        if had and not self._waiters:
            self._waiting_stopped()

    def _give_back(self) -> None:
        if self._in_use <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._in_use -= 1
        self._dispatch()


class AdjustableSemaphore(_Gate):
    """A counting semaphore whose ``limit`` may change while callers wait.

    ``acquire()`` waits until fewer than ``limit`` units are in use, FIFO. Lowering ``limit``
    below ``in_use`` evicts nobody: callers wait until enough units come back. Raising it
    wakes as many waiters as there is room for, at once.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = _check_limit(limit)

    @property
    def limit(self) -> int:
        """Units that may be held at once."""
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._limit = _check_limit(value)
        self._dispatch()

    def _room(self) -> bool:
        return self._in_use < self._limit

    def release(self) -> None:
        """Give a unit back."""
        self._give_back()

    def statistics(self) -> SemaphoreStatistics:
        """Limit, units held and callers waiting."""
        return SemaphoreStatistics(self._limit, self._in_use, self.waiting)


def _check_limit(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"limit must be an integer >= 1, got {value!r}")
    return value


# ---- the window controller (pure) -----------------------------------------------------------


class WindowPhase(enum.StrEnum):
    """Where the window controller stands."""

    WARMUP = "warmup"  # learning the baseline latency from the first folders
    PROBING = "probing"  # no queue seen at the API: the limit doubles while it binds
    SETTLED = "settled"  # the API queues our folders: the limit holds a small queue


@dataclass(slots=True)
class _Tracked:
    """A folder at the API, as the controller follows it."""

    submitted: float  # clock time of its 202
    since: float = 0.0  # known not done this many seconds after its 202 (its last 202 poll)
    early: bool = False  # one of the baseline's folders


class WindowController:
    """How many folders may be outstanding at once, learned from their latencies (see the
    module docstring). Pure code: every method takes the clock time ``now`` it applies to.

    The caller reports each folder's life: ``submitted`` (its 202), ``pending`` (a poll said
    202), ``done`` (the first 200 or 500, with the poll scheduler's interval) and ``forget``
    (dropped, or about to be sent again); it reads ``limit``.
    """

    CUT_AFTER_HELD_SHARE = 0.5  # cut only when the window held submitters back this much
    MAX_OBSERVED = 256

    def __init__(
        self,
        *,
        initial_limit: int = 10,
        min_limit: int = 2,
        max_limit: int = 2000,
        warmup: int | None = None,
        queue_per_sqrt: float = 0.9,
        min_queue: float = 1.5,
        growth: float = 2.0,
        gain: float = 0.3,
        clear_share: float = 0.2,
        round_size: int = 8,
        warmup_cap: float = 2.0,
        delay_share: float = 0.15,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, got {min_limit}, {max_limit}")
        if not min_limit <= initial_limit <= max_limit:
            raise ValueError(f"initial_limit must be within [{min_limit}, {max_limit}], "
                             f"got {initial_limit}")
        warmup = min(10, initial_limit) if warmup is None else warmup
        if not 4 <= warmup <= initial_limit:
            raise ValueError(f"warmup must be between 4 and initial_limit, got {warmup}")
        if not 0 < gain <= 1:
            raise ValueError(f"gain must be in (0, 1], got {gain}")
        if not growth > 1 or not warmup_cap >= 1:
            raise ValueError(f"need growth > 1 and warmup_cap >= 1, got {growth}, {warmup_cap}")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.initial_limit = initial_limit
        self.warmup = warmup
        self.queue_per_sqrt = queue_per_sqrt
        self.min_queue = min_queue
        self.growth = growth
        self.gain = gain
        self.clear_share = clear_share
        self.round_size = round_size
        self.warmup_cap = warmup_cap
        self.delay_share = delay_share
        self._k = float(initial_limit)
        self.phase = WindowPhase.WARMUP
        self.baseline: LatencyModel | None = None
        self.shift = 0.0  # seconds of queueing at the API on top of the baseline (estimate)
        self.queue = 0.0  # folders queued at the API (estimate)
        self.last_fit: ShiftFit | None = None
        self._folders: dict[Hashable, _Tracked] = {}
        # (submitted, lower, upper, seen) of the folders seen done lately
        self._recent: deque[tuple[float, float, float, float]] = deque(maxlen=self.MAX_OBSERVED)
        self._early: list[tuple[float, float]] = []
        self._early_sent = 0
        self._changed_at = -math.inf  # folders submitted before this saw an older limit
        self._fresh = 0  # of those submitted since, seen done this round
        self._round_start = 0.0
        self._waited = 0.0  # seconds submitters waited for the window this round
        self._binding = False  # whether any did
        self._ambiguous = False
        self._quiet = 0
        self._shrinking = 0
        self._shrink_from = (0.0, 0.0, 0.0)  # (shift, limit, throughput) when the cuts began
        self.observations = 0
        self.rounds = 0
        self.rebases = 0

    # ---- reading ------------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """Folders that may be outstanding at once."""
        return min(self.max_limit, max(self.min_limit, int(self._k + 0.5)))

    @property
    def target_queue(self) -> float:
        """Folders to keep queued at the API when a cap binds: ``max(min_queue, queue_per_sqrt
        * sqrt(limit), delay_share * running)``, ``running`` being the folders processing by
        Little's law (throughput x baseline latency). The last term keeps the target above
        what the delay estimate can resolve when the cap is large."""
        running = 0.0 if self.baseline is None else self._throughput() * self.baseline.mean
        return max(self.min_queue, self.queue_per_sqrt * math.sqrt(self._k),
                    self.delay_share * running)

    def intervals(self, n: int = 100) -> list[tuple[float, float]]:
        """The latest ``n`` latency intervals seen (to prime a ``PollPolicy`` on a rerun)."""
        return [(lo, up) for _, lo, up, _ in list(self._recent)[-n:]]

    # ---- a folder's life ----------------------------------------------------------------------

    def submitted(self, key: Hashable, now: float) -> None:
        """The folder was accepted (its 202) at ``now``."""
        early = (self.phase is WindowPhase.WARMUP and self._early_sent < self.warmup
                 and len(self._folders) < self.initial_limit)
        self._early_sent += early
        self._folders[key] = _Tracked(now, early=early)

    def pending(self, key: Hashable, now: float) -> None:
        """A poll of the folder answered 202 at ``now``."""
        folder = self._folders.get(key)
        if folder is not None:
            folder.since = max(folder.since, now - folder.submitted)

    def forget(self, key: Hashable) -> None:
        """Stop following the folder without learning from it (dropped, or sent again)."""
        folder = self._folders.pop(key, None)
        if folder is not None and folder.early:
            self._early_sent -= 1  # it will not report: let another folder take its place

    def done(self, key: Hashable, lower: float, upper: float, now: float, *,
             waited: float = 0.0) -> None:
        """The folder was found done between ``lower`` and ``upper`` s after its 202.

        ``waited``: seconds, since the previous ``done``, during which a submitter waited for
        the window (any positive value: the window held someone back).
        """
        if not (math.isfinite(lower) and math.isfinite(upper)) or upper < lower:
            raise ValueError(f"need finite lower <= upper, got {lower}, {upper}")
        folder = self._folders.pop(key, None)
        if folder is None:
            return
        lower, upper = max(0.0, lower), max(0.0, upper)
        self.observations += 1
        self._recent.append((folder.submitted, lower, upper, now))
        self._waited += max(0.0, waited)
        self._binding |= waited > 0
        if self.phase is WindowPhase.WARMUP:
            if folder.early:
                self._early.append((lower, upper))
            if waited > 0:  # slow start, but blind as it is, not beyond warmup_cap x start
                self._k = min(self._k + 1.0, self.warmup_cap * self.initial_limit,
                              float(self.max_limit))
            early_out = any(f.early for f in self._folders.values())
            if not early_out and (len(self._early) >= self.warmup
                                  or self.observations >= 3 * self.warmup):
                self.baseline = LatencyModel.from_intervals(
                    self._early or [(lo, up) for _, lo, up, _ in self._recent])
                self.phase = WindowPhase.PROBING
                self._changed(now)
            return
        if folder.submitted >= self._changed_at:
            self._fresh += 1
        if self._fresh >= max(self.round_size, math.ceil(self._k / 4)):
            self._end_round(now)

    # ---- internals ----------------------------------------------------------------------------

    def _changed(self, now: float) -> None:
        """A new round: the limit changed, judge it only by folders submitted from now on."""
        self._changed_at = now
        self._new_round(now)

    def _new_round(self, now: float) -> None:
        self._fresh = 0
        self._round_start = now
        self._waited = 0.0
        self._binding = False

    def _sample(self) -> list[tuple[float, float]]:
        """Fresh folders, done or not: done ones as ``(lower, upper]``, running ones as
        ``(since, inf)`` once a poll found them running."""
        since = self._changed_at
        size = max(16, 2 * self.round_size, math.ceil(self._k / 2))
        done = [(lo, up) for at, lo, up, _ in self._recent if at >= since][-size:]
        running = [(f.since, math.inf) for f in self._folders.values()
                   if f.submitted >= since and f.since > 0]
        sample = done + running
        if len(sample) < 16:  # too few since the change: complete with the latest others
            sample += [(lo, up) for at, lo, up, _ in list(self._recent)[-16:] if at < since]
        return sample

    def _throughput(self) -> float:
        """Folders seen done per second lately."""
        seen = [t for *_, t in self._recent][-max(16, math.ceil(self._k)):]
        if len(seen) < 2 or seen[-1] <= seen[0]:
            return 0.0
        return (len(seen) - 1) / (seen[-1] - seen[0])

    def _rebase(self, delta: float) -> None:
        assert self.baseline is not None
        self.baseline = self.baseline.shifted(delta)
        self.rebases += 1

    def _end_round(self, now: float) -> None:
        assert self.baseline is not None
        base = self.baseline.mean
        sample = self._sample()
        high = max([base, *(up for _, up in sample if math.isfinite(up)),
                    *(lo for lo, _ in sample)])
        # Where the polls say nothing (they come after every folder is done), assume no delay:
        # a queue shows itself soon enough, as folders still running at their polls.
        fit = fit_shift(self.baseline, sample, low=-0.5 * base, high=high, prefer=0.0)
        binding = self._binding  # the window held someone back: it may need to grow
        span = now - self._round_start
        held = span > 0 and self._waited >= self.CUT_AFTER_HELD_SHARE * span
        self.rounds += 1
        self.last_fit = fit
        self._new_round(now)
        if fit.high < -0.05 * base:
            # Surely faster than the baseline: the baseline had some queueing in it.
            self._rebase(fit.best)
            base = self.baseline.mean
            fit = ShiftFit(0.0, fit.low - fit.best, fit.high - fit.best)
        rate = self._throughput()
        q, q_low, q_high = (rate * max(0.0, d) for d in (fit.best, fit.low, fit.high))
        target = self.target_queue
        # Cut only where the window is what holds submitters back (not the rate limiter: a
        # noisy estimate must not cost a rate-bound run anything), or where it is far above
        # what is in use (Little: throughput x latency), so that a queue cannot grow into it.
        held = held or self._k > 1.5 * rate * (base + max(0.0, fit.best)) + target
        vague = fit.high - fit.low > 0.5 * base  # polls come too late to tell much
        clear = fit.high < self.clear_share * base  # surely little queueing, for the latency
        before = self._k
        if self.phase is WindowPhase.PROBING:
            # Stop doubling at the first sign of a queue (not only at the target: a doubling
            # overshoots by a window), a sign being more than min_queue folders, or more than
            # delay_share of those running for a large cap.
            sign = max(self.min_queue, self.delay_share * rate * base)
            if held and (q_low > sign or (q > sign and self._ambiguous)):
                # A queue is forming: stop doubling, steer from here.
                self.phase = WindowPhase.SETTLED
                self._quiet = 0
                self._k = max(self._k / 2, self._k - max(0.0, q - target))
            elif binding and q < sign and fit.best < self.clear_share * base:
                self._k = max(self._k + 1.0, self._k * self.growth)
            self._ambiguous = held and q > sign
        else:
            if held and q_low > target:
                self._k -= min(max(1.0, self.gain * (q - target)), self._k / 4)
            elif held and vague and q > target:
                self._k -= 1.0  # last seen queued, blind since: back off slowly
            elif binding and (q + (q_high - q) / 2 < target or clear):
                self._k += max(1.0, self.gain * (target - q))
            self._quiet = self._quiet + 1 if binding and clear else 0
            if self._quiet >= 3:
                self.phase = WindowPhase.PROBING
                self._quiet = 0
        self.shift = max(0.0, fit.best)
        self.queue = q
        self._k = min(float(self.max_limit), max(float(self.min_limit), self._k))
        self._watch_drift(before, vague)
        if abs(self._k - before) >= 0.5:
            self._changed(now)

    def _watch_drift(self, before: float, vague: bool) -> None:
        """Cuts that shrink the throughput with the window but not the delay: the folders got
        slower, this is no queue (a queue drains, and while it does the throughput holds).
        After six such cuts (the window down a fifth or more, the throughput down at least
        half as much), the delay goes into the baseline and probing starts again."""
        if self._k >= before - 0.5 or vague:  # only cuts on clear evidence count
            self._shrinking = 0
            return
        rate = self._throughput()
        if self._shrinking == 0:
            self._shrink_from = (self.shift, before, rate)
        self._shrinking += 1
        shift0, k0, rate0 = self._shrink_from
        k_fall = 1.0 - self._k / k0
        rate_fall = 1.0 - rate / rate0 if rate0 > 0 else 0.0
        if (self._shrinking >= 6 and self.shift > 0.8 * shift0 and k_fall >= 0.2
                and rate_fall >= 0.5 * k_fall):
            self._rebase(self.shift)
            self.shift = self.queue = 0.0
            self._shrinking = 0
            self.phase = WindowPhase.PROBING

    # ---- persistence --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What was learned, JSON-serialisable (``TuningSnapshot`` wraps it)."""
        return {
            "limit": self.limit,
            "phase": str(self.phase),
            "baseline": None if self.baseline is None else self.baseline.to_json(),
            "queue_delay_s": round(self.shift, 4),
            "intervals": [[round(lo, 3), round(up, 3)] for lo, up in self.intervals()],
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any], **kwargs: Any) -> WindowController:
        """Start where a previous run left off, then re-validate.

        The baseline comes back, so there is no warm-up: the first rounds check the saved
        limit (``initial_limit``, clamped to the bounds given) against fresh folders, cutting
        it if they queue, probing upwards again once it is clearly below the cap. Without a
        baseline in ``data`` this is a cold start at that limit.
        """
        limit = int(data.get("limit") or kwargs.get("initial_limit", 10))
        lo, hi = kwargs.get("min_limit", 2), kwargs.get("max_limit", 2000)
        kwargs["initial_limit"] = min(hi, max(lo, limit))
        kwargs.setdefault("warmup", min(10, kwargs["initial_limit"]))
        controller = cls(**kwargs)
        baseline = data.get("baseline")
        if baseline:
            controller.baseline = LatencyModel.from_json(baseline)
            controller.phase = WindowPhase.SETTLED
            controller.shift = float(data.get("queue_delay_s") or 0.0)
        return controller


# ---- the outstanding window (async) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowStatistics:
    """A snapshot of an ``OutstandingWindow``."""

    limit: int  # folders that may be outstanding now
    in_use: int  # units held: folders uploading, or submitted and not yet retrieved
    waiting: int  # submitters waiting for a unit
    max_outstanding: int  # the hard bound on limit
    phase: str  # "fixed", or the controller's WindowPhase
    baseline_s: float | None  # mean latency without queueing (None: not learned yet)
    queue_delay_s: float  # estimated queueing at the API, per folder
    queue_estimate: float  # estimated folders queued at the API
    target_queue: float  # what the controller aims at when a cap binds
    observations: int  # folders the controller learned from


class OutstandingWindow(_Gate):
    """How many folders may be submitted and not yet retrieved; adaptive with a controller.

    A submitter takes a unit (``acquire``) before uploading a folder; the row gives it back
    (``release``) when it is finished. Without a controller the limit is ``max_outstanding``;
    with one it is ``min(controller.limit, max_outstanding)``, fed through ``submitted``,
    ``pending`` and ``observe``, keyed by anything hashable that names the folder (its row
    key). Waiters are woken, FIFO, when a unit comes back or the limit grows.
    """

    def __init__(self, *, max_outstanding: int = 2000,
                 controller: WindowController | None = None,
                 clock: Clock | None = None) -> None:
        super().__init__()
        if controller is not None and clock is None:
            raise ValueError("an adaptive window needs the clock its controller reads")
        self.max_outstanding = _check_limit(max_outstanding)
        self.controller = controller
        self._clock = clock
        now = clock.now() if clock is not None else 0.0
        self._waited = 0.0  # seconds someone waited for a unit since the last observe
        self._wait_since = now
        self._blocked = False  # someone started waiting since the last observe
        self._holding = False  # a caller other than acquire() is held back (see hold)
        self._hold_since = now

    @property
    def limit(self) -> int:
        """Units that may be held at once now."""
        if self.controller is None:
            return self.max_outstanding
        return min(self.max_outstanding, self.controller.limit)

    def set_max_outstanding(self, value: int) -> None:
        """A new hard bound (``--max-outstanding`` changed live); waiters wake if it grew."""
        self.max_outstanding = _check_limit(value)
        if self.controller is not None:
            self.controller.max_limit = max(self.controller.min_limit, value)
        self._dispatch()

    def statistics(self) -> WindowStatistics:
        """Limit, units held, waiters, and what the controller believes."""
        c = self.controller
        return WindowStatistics(
            limit=self.limit, in_use=self._in_use, waiting=self.waiting,
            max_outstanding=self.max_outstanding,
            phase="fixed" if c is None else str(c.phase),
            baseline_s=None if c is None or c.baseline is None else round(c.baseline.mean, 4),
            queue_delay_s=0.0 if c is None else round(c.shift, 4),
            queue_estimate=0.0 if c is None else round(c.queue, 3),
            target_queue=0.0 if c is None else round(c.target_queue, 3),
            observations=0 if c is None else c.observations,
        )

    # ---- a folder's life ----------------------------------------------------------------------

    def submitted(self, key: Hashable) -> None:
        """The folder holding a unit was accepted (its 202)."""
        if self.controller is not None:
            self.controller.submitted(key, self._now())

    def pending(self, key: Hashable) -> None:
        """A poll of the folder answered 202."""
        if self.controller is not None:
            self.controller.pending(key, self._now())

    def hold(self, held: bool) -> None:
        """Whether work is being held back by this window without waiting in ``acquire``: the
        ``--db`` claim loop, which claims no row while its lane's window (or the key's window
        shared by every worker) is full. The controller counts that time as submitters
        waiting, so the window can grow when it binds and be cut when it holds a queue."""
        if held == self._holding:
            return
        self._holding = held
        if self._clock is None:
            return
        now = self._clock.now()
        if held:
            self._hold_since = now
            self._blocked = True
        else:
            self._waited += max(0.0, now - self._hold_since)

    def observe(self, key: Hashable, lower: float, upper: float) -> None:
        """The folder was found done (200 or 500) between ``lower`` and ``upper`` s after its
        202, as the poll scheduler measures it; ``release`` follows when its row is written."""
        if self.controller is None:
            return
        now = self._now()
        if self._holding:  # the hold so far counts for this observation; the rest, later
            self._waited += max(0.0, now - self._hold_since)
            self._hold_since = now
        waited = self._waited + (now - self._wait_since if self.waiting else 0.0)
        if self._blocked and waited <= 0.0:
            waited = 1e-9  # someone waited, if only for an instant
        self.controller.done(key, lower, upper, now, waited=waited)
        self._waited, self._wait_since = 0.0, now
        self._blocked = bool(self.waiting) or self._holding
        self._dispatch()

    def requeue(self, key: Hashable) -> None:
        """The folder is about to be submitted again (its token expired); it keeps its unit
        and reports ``submitted`` again on its new 202."""
        if self.controller is not None:
            self.controller.forget(key)

    def release(self, key: Hashable | None = None) -> None:
        """The folder's row is finished, whatever the outcome: give its unit back."""
        if key is not None and self.controller is not None:
            self.controller.forget(key)
        self._give_back()

    # ---- the gate -----------------------------------------------------------------------------

    def _now(self) -> float:
        assert self._clock is not None
        return self._clock.now()

    def _room(self) -> bool:
        return self._in_use < self.limit

    def _waiting_started(self) -> None:
        if self._clock is not None:
            self._wait_since = self._clock.now()
        self._blocked = True

    def _waiting_stopped(self) -> None:
        if self._clock is not None:
            self._waited += max(0.0, self._clock.now() - self._wait_since)


# ---- the rate controller (pure) -------------------------------------------------------------


class RatePhase(enum.StrEnum):
    """Where the rate controller stands."""

    STARTING = "starting"  # no 429 yet: the rate doubles while calls succeed
    SETTLED = "settled"  # just under the limit learned at the last 429
    PROBING = "probing"  # quiet for a while: creeping up to see whether the limit rose


class RateController:
    """Finds the calls per second a key may make from which calls succeed and which get 429.
    Pure code: every method takes the clock time ``now``; ``RateLimiter`` consults it.

    - From ``initial`` calls/s, the rate doubles every ``double_every`` seconds of calls without
      a 429, never beyond twice what was accepted lately plus one (a run that calls less than
      allowed does not inflate it), nor ``ceiling``.
    - On a 429 (the first of an overload: at most one cut per ``cut_window`` seconds), the limit
      estimate becomes the rate the server accepted just before (over the last ``window``
      seconds; the last ``double_every`` while starting, where the rate was still climbing);
      the rate is cut to ``backoff`` x estimate and recovers to ``settle`` x estimate over
      ``recover_seconds``. A 429 before probing started means the estimate was high: it drops
      to ``settle`` x itself at least.
    - After a quiet spell (``probe_after`` seconds at first) the aim rises by ``probe_step`` x
      estimate every ``probe_every`` seconds. A probe that meets the limit where it was (within
      10 %) doubles the quiet spell needed before the next one, up to ``max_probe_after``; one
      that finds it moved resets it. The first estimate, made while climbing, is probed
      sooner (after a quarter of ``probe_after``) and ``first_probe_boost`` times faster.
    """

    def __init__(
        self,
        *,
        ceiling: float | None = None,
        initial: float = 2.0,
        floor: float = 0.2,
        double_every: float = 0.5,
        backoff: float = 0.7,
        settle: float = 0.97,
        recover_seconds: float = 3.0,
        probe_after: float = 10.0,
        max_probe_after: float = 160.0,
        probe_every: float = 5.0,
        probe_step: float = 0.05,
        first_probe_boost: float = 3.0,
        window: float = 1.5,
        cut_window: float = 1.0,
    ) -> None:
        if ceiling is not None and not (math.isfinite(ceiling) and ceiling > 0):
            raise ValueError(f"ceiling must be a positive number of calls/s, got {ceiling}")
        if not 0 < floor <= initial:
            raise ValueError(f"need 0 < floor <= initial, got {floor}, {initial}")
        if not 0 < backoff <= settle <= 1:
            raise ValueError(f"need 0 < backoff <= settle <= 1, got {backoff}, {settle}")
        for name, value in (("double_every", double_every), ("recover_seconds", recover_seconds),
                            ("probe_every", probe_every), ("window", window)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.ceiling = ceiling
        self.floor = floor
        self.double_every = double_every
        self.backoff = backoff
        self.settle = settle
        self.recover_seconds = recover_seconds
        self.probe_after = probe_after
        self.max_probe_after = max_probe_after
        self.probe_every = probe_every
        self.probe_step = probe_step
        self.first_probe_boost = first_probe_boost
        self._first_probe = False
        self.window = window
        self.cut_window = cut_window
        self.phase = RatePhase.STARTING
        self.rate = self._bounded(initial)
        self.aim = self.rate
        self.limit_estimate: float | None = None
        self._quiet_needed = probe_after
        self._started: float | None = None
        self._last: float | None = None
        self._last_cut = -math.inf
        self._accepted: deque[float] = deque()
        self.successes = 0
        self.throttled = 0
        self.cuts = 0

    def _bounded(self, rate: float) -> float:
        rate = max(self.floor, rate)
        return rate if self.ceiling is None else min(self.ceiling, rate)

    def accepted_rate(self, now: float, window: float | None = None) -> float:
        """Calls/s that succeeded over the last ``window`` seconds (at most ``self.window``;
        less at the very start)."""
        window = self.window if window is None else min(window, self.window)
        acc = self._accepted
        while acc and acc[0] <= now - self.window:
            acc.popleft()
        span = window if self._started is None else min(window, now - self._started)
        if span <= 0:
            return 0.0
        return sum(1 for t in acc if t > now - span) / span

    def on_success(self, now: float) -> float:
        """A call succeeded at ``now``; returns the rate to use from now on."""
        if self._started is None:
            self._started = now
        self.successes += 1
        self._accepted.append(now)
        dt = max(0.0, now - (now if self._last is None else self._last))
        self._last = now
        demand_cap = 2.0 * self.accepted_rate(now) + 1.0
        if self.phase is RatePhase.STARTING:
            grown = self.rate * 2.0 ** (dt / self.double_every)
            self.rate = self.aim = self._bounded(min(grown, max(self.rate, demand_cap)))
            return self.rate
        assert self.limit_estimate is not None
        if self.phase is RatePhase.SETTLED and now - self._last_cut >= self._quiet_needed:
            self.phase = RatePhase.PROBING
        if self.phase is RatePhase.PROBING:
            step = self.probe_step * (self.first_probe_boost if self._first_probe else 1.0)
            self.aim += step * self.limit_estimate * dt / self.probe_every
            self.aim = min(self.aim, max(self.rate, demand_cap))
        step = (1.0 - self.backoff) * self.limit_estimate * dt / self.recover_seconds
        self.rate = self._bounded(min(self.aim, self.rate + step))
        return self.rate

    def on_throttled(self, now: float) -> float:
        """A call got 429 at ``now``; returns the rate to use from now on."""
        if self._started is None:
            self._started = now
        self.throttled += 1
        if now - self._last_cut < self.cut_window:
            return self.rate  # the same overload as the last cut
        window = (max(self.double_every, 5.0 / self.rate) if self.phase is RatePhase.STARTING
                  else self.window)
        accepted = self.accepted_rate(now, window)
        estimate = min(self.rate, accepted) if accepted > 0 else self.rate
        previous = self.limit_estimate
        if previous is not None and now - self._last_cut < self._quiet_needed:
            estimate = min(estimate, self.settle * previous)  # throttled before probing
        if previous is not None and self.phase is RatePhase.PROBING:
            moved = abs(estimate - previous) > 0.1 * previous
            self._quiet_needed = (self.probe_after if moved
                                  else min(self.max_probe_after, 2.0 * self._quiet_needed))
        # An estimate made while climbing also depends on how many calls happened to be
        # ready: check it sooner and faster than later ones.
        self._first_probe = self.phase is RatePhase.STARTING
        if self._first_probe:
            self._quiet_needed = self.probe_after / 4
        self.limit_estimate = max(self.floor, estimate)
        self.rate = self._bounded(self.backoff * self.limit_estimate)
        self.aim = self._bounded(self.settle * self.limit_estimate)
        self.phase = RatePhase.SETTLED
        self._last_cut = self._last = now
        self.cuts += 1
        return self.rate

    # ---- persistence --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What was learned, JSON-serialisable (``TuningSnapshot`` wraps it)."""
        return {
            "limit_estimate": None if self.limit_estimate is None
            else round(self.limit_estimate, 4),
            "rate": round(self.rate, 4),
            "phase": str(self.phase),
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any], **kwargs: Any) -> RateController:
        """Start where a previous run left off, then re-validate: settled just under the saved
        estimate (within ``ceiling``), probing after the usual quiet spell, cut by the first
        429 if the key's limit is lower now. Without an estimate: a cold start."""
        controller = cls(**kwargs)
        estimate = data.get("limit_estimate")
        if isinstance(estimate, int | float) and math.isfinite(estimate) and estimate > 0:
            controller.limit_estimate = controller._bounded(float(estimate))
            controller.rate = controller.aim = controller._bounded(
                controller.settle * controller.limit_estimate)
            controller.phase = RatePhase.SETTLED
        return controller


# ---- persisted learning ---------------------------------------------------------------------


@dataclass(frozen=True)
class TuningSnapshot:
    """What a run learned about a key, to start the next run with the same key from it.

    ``rate`` and ``window`` are the controllers' ``snapshot()`` (None when not used);
    ``saved_at`` is wall-clock seconds (``time.time()``): the caller decides how old is too old.
    The caller stores it per base URL and key fingerprint (never the key itself).
    """

    rate: dict[str, Any] | None = None
    window: dict[str, Any] | None = None
    saved_at: float = 0.0
    VERSION = 1

    @classmethod
    def capture(cls, *, rate: RateController | None = None,
                window: WindowController | None = None,
                saved_at: float | None = None) -> TuningSnapshot:
        """Snapshot the given controllers now."""
        return cls(rate=None if rate is None else rate.snapshot(),
                   window=None if window is None else window.snapshot(),
                   saved_at=time.time() if saved_at is None else saved_at)

    def to_json(self) -> str:
        """The snapshot as a JSON document."""
        import json

        return json.dumps({"version": self.VERSION, "saved_at": round(self.saved_at, 3),
                           "rate": self.rate, "window": self.window}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TuningSnapshot:
        """Read ``to_json``'s output; raises ``ValueError`` if it is not one (another version
        included: better a cold start than a misread warm one)."""
        import json

        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not a tuning snapshot: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != cls.VERSION:
            raise ValueError("not a tuning snapshot of this version")
        rate, window = data.get("rate"), data.get("window")
        if not isinstance(rate, dict | None) or not isinstance(window, dict | None):
            raise ValueError("not a tuning snapshot: rate and window must be objects or null")
        saved_at = data.get("saved_at", 0.0)
        if not isinstance(saved_at, int | float):
            raise ValueError("not a tuning snapshot: saved_at must be a number")
        if window is not None and window.get("baseline"):
            LatencyModel.from_json(window["baseline"])  # validates
        return cls(rate=rate, window=window, saved_at=float(saved_at))

    def age(self, now_wall: float | None = None) -> float:
        """Seconds since it was saved."""
        return (time.time() if now_wall is None else now_wall) - self.saved_at

    def rate_controller(self, **kwargs: Any) -> RateController:
        """A ``RateController`` warm-started from this snapshot (cold if it holds no rate)."""
        return RateController.from_snapshot(self.rate or {}, **kwargs)

    def window_controller(self, **kwargs: Any) -> WindowController:
        """A ``WindowController`` warm-started from this snapshot (cold if it holds none)."""
        return WindowController.from_snapshot(self.window or {}, **kwargs)

    def latency_intervals(self) -> list[tuple[float, float]]:
        """Latency intervals of the last run's folders, to prime ``PollPolicy.observe`` so the
        first polls of the rerun come at the learned time instead of ``poll_min``."""
        raw = (self.window or {}).get("intervals") or []
        out: list[tuple[float, float]] = []
        for item in raw:
            if (isinstance(item, list | tuple) and len(item) == 2
                    and all(isinstance(v, int | float) and math.isfinite(v) for v in item)
                    and 0 <= item[0] <= item[1]):
                out.append((float(item[0]), float(item[1])))
        return out
