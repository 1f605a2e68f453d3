"""The poll scheduler: one timer heap for every accepted folder, and the policy that times polls.

Where it sits: submitters hand each ``Submitted`` (a 202 from ``POST /case``) to
``PollScheduler.add``; the scheduler calls the injected poll callback (``POST /case/retrieve``
through the shared rate limiter) when the folder is due, and reschedules it while the answer is
202. The callback turns final answers into ``Outcome`` records for the writer.

``PollPolicy`` decides *when*, as pure code: it learns how long folders take from the polls that
found them done, so that on a steady workload most folders need a single poll. ``PollScheduler``
only waits and calls: one task owns the heap, sleeps on the injected clock until the earliest due
time (or until an earlier item arrives), and runs due polls concurrently in a task group, at most
``max_concurrent_polls`` at a time.

How the policy learns
---------------------
A poll that answers 200 does not say when the folder finished, only that it finished after the
last poll that answered 202 and before this one: an interval ``(lower, upper]`` of elapsed time
since the submission (``lower = 0`` when the first poll already found it done). Neither simple
point estimate works once the policy feeds on its own polls. ``upper`` is the poll time itself:
when the first poll comes late, nearly every folder is done by then, every ``upper`` equals the
poll time, and the estimate can never come down (with jitter it even creeps up). The midpoint
halves every first-poll success and drags the estimate down.

So the policy keeps the last ``window`` intervals and computes the nonparametric maximum-likelihood
estimate of the completion-time distribution for interval-censored data (Turnbull's estimator,
by its EM "self-consistency" iteration). Mass sits on the right ends of Turnbull's innermost
intervals, so each quantile is read as "the time by which that fraction is known to be done". The
±``jitter`` on the learned first poll spreads first polls over a band; the fraction found done
across that band is the current-status data that lets the estimate move down as well as up. Exact
times (``lower == upper``) are handled too: the estimate is then the empirical distribution. The
fit is redone every ``window // 10`` observations, each EM step costs O(observations).

Delays, with ``polls`` = polls made so far:

- fewer than 20 observations: ``first_delay = poll_min``; after a 202, ``poll_min * 1.5**polls``
  jittered by ±``jitter``, clamped to ``[poll_min, poll_max]``.
- learned: ``first_delay`` = the ``target_quantile`` of the estimate, jittered, clamped to
  ``[poll_min, expiry_guard]`` (a slow workload may wait long for its first poll, but always
  inside the 60-minute result window). After a 202 at ``elapsed``, ``next_delay`` aims at the time
  by which ``retry_quantile`` (95 %) of the folders still unfinished at ``elapsed`` are done,
  jittered, clamped to ``[poll_min, poll_max]``; beyond the learned distribution it falls back to
  the exponential schedule above.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import math
import random
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from itertools import accumulate, count

from bulk_engine.clock import Clock
from bulk_engine.models import Submitted

__all__ = ["PendingHook", "PollCallback", "PollDecision", "PollPolicy", "PollScheduler",
           "interval_npmle"]

# Items due within this of now are polled now: float sums must not cause 1e-17 s re-sleeps.
_DUE_SLACK = 1e-9


class PollDecision(enum.Enum):
    """What the poll callback tells the scheduler after one ``POST /case/retrieve``."""

    DONE = "done"  # a final answer (200, or retrieve 500): the folder finished; learn from it
    AGAIN = "again"  # 202: still processing, poll again later
    DROP = "drop"  # stop polling this token without learning (expired, resubmitted, given up)


# ---- the estimator --------------------------------------------------------------------------


def interval_npmle(
    intervals: Iterable[tuple[float, float]],
    *,
    start: tuple[Sequence[float], Sequence[float]] | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> tuple[list[float], list[float]]:
    """Turnbull's NPMLE of a distribution seen only through intervals ``(lower, upper]``.

    ``lower == upper`` is an exact observation. Returns ``(support, cdf)``: the sorted times that
    carry mass (right ends of the innermost intervals) and the cumulative probability at each.
    EM stops when no cumulative probability moves by more than ``tol`` in one step; ``start``,
    a previous ``(support, cdf)``, warm-starts it (a sliding window changes little between fits).
    """
    intervals = list(intervals)
    if not intervals:
        return [], []
    # Innermost intervals: a left end immediately followed by a right end in endpoint order.
    # Ties: a right end u covers the point u, a left end l excludes it, so at one value right
    # ends sort before left ends; the left end of an exact observation sorts before everything.
    ends: list[tuple[float, int]] = []
    for lower, upper in intervals:
        ends.append((lower, -1 if lower >= upper else 1))
        ends.append((upper, 0))
    ends.sort()
    support = sorted(
        {ends[i + 1][0] for i in range(len(ends) - 1) if ends[i][1] != 0 and ends[i + 1][1] == 0}
    )
    # Each observation covers a run of support points; observations covering the same run are
    # interchangeable, so EM works on the distinct runs with their counts.
    spans: Counter[tuple[int, int]] = Counter()
    for lower, upper in intervals:
        last = bisect_right(support, upper) - 1
        first = bisect_left(support, upper) if lower >= upper else bisect_right(support, lower)
        spans[first, last] += 1
    runs = [(first, last + 1, times) for (first, last), times in spans.items()]
    m, n = len(support), len(intervals)
    p = [1.0 / m] * m
    if start is not None and start[0]:
        # Mass the previous fit put on each new support point's stretch, mixed with a little of
        # the uniform start so that no point starts at zero (EM never revives a zero).
        old_support, old_cdf = start
        previous = 0.0
        for j, s in enumerate(support):
            i = bisect_right(old_support, s) - 1
            here = old_cdf[i] if i >= 0 else 0.0
            p[j] = 0.9 * (here - previous) + 0.1 / m
            previous = here
        p[-1] += 0.9 * (1.0 - previous)
    for _ in range(max_iter):
        prefix = list(accumulate(p, initial=0.0))
        weights = [0.0] * (m + 1)
        for first, stop, times in runs:
            w = times / ((prefix[stop] - prefix[first]) or 1e-300)
            weights[first] += w
            weights[stop] -= w
        p = [pj * cover / n for pj, cover in zip(p, accumulate(weights), strict=False)]
        change = max(abs(new - old) for new, old in zip(accumulate(p), prefix[1:], strict=True))
        if change < tol:
            break
    total = sum(p)
    return support, [c / total for c in accumulate(p)]


# ---- the policy -----------------------------------------------------------------------------


class PollPolicy:
    """When to poll: a pure, seeded function of what was observed (see the module docstring)."""

    GROWTH = 1.5  # exponential growth of the unlearned schedule
    MIN_OBSERVATIONS = 20  # observations needed before the learned schedule is used
    _MAX_EXPONENT = 60

    def __init__(
        self,
        poll_min: float,
        poll_max: float,
        *,
        rng: random.Random,
        window: int = 200,
        target_quantile: float = 0.8,
        jitter: float = 0.1,
        expiry_guard: float = 3000.0,
        retry_quantile: float = 0.95,
    ) -> None:
        if not 0 < poll_min <= poll_max <= expiry_guard:
            raise ValueError(
                f"need 0 < poll_min <= poll_max <= expiry_guard, "
                f"got {poll_min}, {poll_max}, {expiry_guard}"
            )
        if window < self.MIN_OBSERVATIONS:
            raise ValueError(f"window must be at least {self.MIN_OBSERVATIONS}, got {window}")
        for name, q in (("target_quantile", target_quantile), ("retry_quantile", retry_quantile)):
            if not 0 < q < 1:
                raise ValueError(f"{name} must be in (0, 1), got {q}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.poll_min = float(poll_min)
        self.poll_max = float(poll_max)
        self.expiry_guard = float(expiry_guard)
        self.target_quantile = target_quantile
        self.retry_quantile = retry_quantile
        self.jitter = jitter
        self._rng = rng
        self._observations: deque[tuple[float, float]] = deque(maxlen=window)
        self._refit_every = max(1, window // 10)
        self._since_fit = 0
        self._support: list[float] = []
        self._cdf: list[float] = []

    @property
    def observations(self) -> int:
        """Observations currently in the sliding window."""
        return len(self._observations)

    @property
    def learned(self) -> bool:
        """True once the learned schedule is in use."""
        return len(self._observations) >= self.MIN_OBSERVATIONS

    def observe(self, lower: float, upper: float) -> None:
        """A folder was found done; it finished between ``lower`` and ``upper`` s after submit."""
        if not (math.isfinite(lower) and math.isfinite(upper)):
            raise ValueError(f"observation bounds must be finite, got {lower}, {upper}")
        lower = max(0.0, lower)
        if upper < lower:
            raise ValueError(f"need lower <= upper, got {lower} and {upper}")
        self._observations.append((lower, upper))
        self._since_fit += 1

    def quantile(self, q: float) -> float | None:
        """The learned time by which a fraction ``q`` of folders is done, or None if unlearned."""
        if not self._fit():
            return None
        i = min(bisect_left(self._cdf, q - 1e-12), len(self._support) - 1)
        return self._support[i]

    def first_delay(self) -> float:
        """Delay from the 202 of ``POST /case`` to the first poll."""
        target = self.quantile(self.target_quantile)
        if target is None:
            return self.poll_min
        return _clamp(self._jittered(target), self.poll_min, self.expiry_guard)

    def next_delay(self, elapsed: float, polls: int) -> float:
        """Delay to the next poll after one answered 202, ``elapsed`` s after the submission."""
        if self._fit():
            done_by_now = self._cdf_at(elapsed)
            still_running = 1.0 - done_by_now
            if still_running > 1e-6:
                target = self.quantile(done_by_now + self.retry_quantile * still_running)
                if target is not None and target > elapsed:
                    return _clamp(self._jittered(target - elapsed), self.poll_min, self.poll_max)
        growth = self.GROWTH ** min(max(polls, 0), self._MAX_EXPONENT)
        return _clamp(self._jittered(self.poll_min * growth), self.poll_min, self.poll_max)

    # ---- internals ----------------------------------------------------------------------------

    def _fit(self) -> bool:
        """Refit the estimate when due; False while there are too few observations."""
        if not self.learned:
            return False
        if not self._support or self._since_fit >= self._refit_every:
            self._support, self._cdf = interval_npmle(
                self._observations, start=(self._support, self._cdf)
            )
            self._since_fit = 0
        return True

    def _cdf_at(self, t: float) -> float:
        i = bisect_right(self._support, t) - 1
        return self._cdf[i] if i >= 0 else 0.0

    def _jittered(self, delay: float) -> float:
        if self.jitter == 0:
            return delay
        return delay * self._rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)


def _clamp(x: float, low: float, high: float) -> float:
    return min(high, max(low, x))


# ---- the scheduler --------------------------------------------------------------------------


PollCallback = Callable[[Submitted], Awaitable[PollDecision]]
# Told of each 202 with the seconds since the folder's submission (stuck.StuckWatch.check).
PendingHook = Callable[[Submitted, float], object]


class PollScheduler:
    """Polls every added ``Submitted`` when due, until the callback says DONE or DROP.

    The scheduler counts polls: it increments ``sub.polls`` just before each call of ``poll``,
    so the callback sees the count including the current poll (and can write it on the
    outcome). After AGAIN it sets ``sub.last_pending_mono`` and reschedules with
    ``policy.next_delay``; after DONE it reports ``(lower, upper)`` to ``policy.observe``. The
    callback handles its own API errors: an exception escaping it is a bug, and fails ``run()``.

    The callback may ``add()`` another ``Submitted`` (a resubmission), even after ``close()``:
    ``run()`` returns only when nothing is queued or in flight.
    """

    def __init__(
        self,
        poll: PollCallback,
        policy: PollPolicy,
        *,
        clock: Clock,
        max_concurrent_polls: int = 64,
        on_pending: PendingHook | None = None,
    ) -> None:
        if max_concurrent_polls < 1:
            raise ValueError(f"max_concurrent_polls must be at least 1, got {max_concurrent_polls}")
        self._poll = poll
        self.policy = policy
        self._clock = clock
        self._max = max_concurrent_polls
        self._heap: list[tuple[float, int, Submitted]] = []
        self._seq = count()
        self._wake = asyncio.Event()
        self._in_flight = 0
        self._holds = 0
        self._closed = False
        self._started = False
        self._finished = False
        self._alarm: asyncio.Task[None] | None = None
        self._alarm_at = math.inf
        self._on_pending = on_pending
        self._polling: dict[int, Submitted] = {}  # polls in flight, by id()
        self.polls_total = 0
        self.done_total = 0
        self.dropped_total = 0

    @property
    def pending(self) -> int:
        """Folders waiting in the heap plus polls in flight."""
        return len(self._heap) + self._in_flight

    @property
    def in_flight(self) -> int:
        """Polls running right now."""
        return self._in_flight

    def stats(self) -> dict[str, int]:
        """Counters for the run summary."""
        return {
            "polls": self.polls_total,
            "done": self.done_total,
            "dropped": self.dropped_total,
            "pending": self.pending,
        }

    def add(self, sub: Submitted, *, delay: float | None = None) -> None:
        """Schedule the first poll of ``sub`` at ``sub.submitted_mono + delay``.

        ``delay=None`` asks the policy (``first_delay``). A due time in the past (a resumed token)
        is polled at once.
        """
        if self._finished:
            raise RuntimeError("the poll scheduler has finished; no more folders can be added")
        if delay is None:
            delay = self.policy.first_delay()
        self._push(sub.submitted_mono + max(0.0, delay), sub)

    def close(self) -> None:
        """No more folders from the submitters: ``run()`` returns once everything is polled out."""
        self._closed = True
        self._wake.set()

    def hold(self) -> None:
        """Keep ``run()`` alive: a folder is being resubmitted and will be ``add()``-ed back."""
        self._holds += 1

    def release(self) -> None:
        """The resubmission announced by ``hold()`` is over (added back, or finished)."""
        self._holds -= 1
        self._wake.set()

    def outstanding(self) -> Iterator[Submitted]:
        """Every folder held now: waiting in the heap or being polled (for the metrics)."""
        yield from (entry[2] for entry in self._heap)
        yield from self._polling.values()

    def lateness(self) -> float:
        """How far behind schedule the earliest due poll is (0 when on time)."""
        if not self._heap:
            return 0.0
        return max(0.0, self._clock.now() - self._heap[0][0])

    async def run(self) -> None:
        """Poll until closed and empty. Re-raises the callback's exception if one escapes it."""
        if self._started:
            raise RuntimeError("PollScheduler.run() can only be called once")
        self._started = True
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    self._wake.clear()
                    now = self._clock.now()
                    while (
                        self._heap
                        and self._in_flight < self._max
                        and self._heap[0][0] <= now + _DUE_SLACK
                    ):
                        _, _, sub = heapq.heappop(self._heap)
                        self._in_flight += 1
                        tg.create_task(self._poll_one(sub))
                    if (self._closed and not self._heap and self._in_flight == 0
                            and self._holds == 0):
                        break
                    self._set_alarm(tg, now)
                    await self._wake.wait()
                self._cancel_alarm()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._finished = True

    # ---- internals ----------------------------------------------------------------------------

    def _push(self, due: float, sub: Submitted) -> None:
        entry = (due, next(self._seq), sub)
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:  # a new earliest item: the sleeping loop must re-aim
            self._wake.set()

    def _set_alarm(self, tg: asyncio.TaskGroup, now: float) -> None:
        """Keep one alarm task sleeping until the earliest due time, if a poll could start then."""
        if not self._heap or self._in_flight >= self._max:
            self._cancel_alarm()  # a finishing poll wakes the loop instead
            return
        target = self._heap[0][0]
        if self._alarm is not None and not self._alarm.done() and self._alarm_at == target:
            return
        self._cancel_alarm()
        self._alarm_at = target
        self._alarm = tg.create_task(self._ring(target - now))

    def _cancel_alarm(self) -> None:
        if self._alarm is not None and not self._alarm.done():
            self._alarm.cancel()
        self._alarm = None

    async def _ring(self, delay: float) -> None:
        await self._clock.sleep(delay)
        self._wake.set()

    async def _poll_one(self, sub: Submitted) -> None:
        self._polling[id(sub)] = sub
        try:
            sub.polls += 1
            self.polls_total += 1
            decision = await self._poll(sub)
        finally:
            self._in_flight -= 1
            del self._polling[id(sub)]
            self._wake.set()
        now = self._clock.now()
        elapsed = max(0.0, now - sub.submitted_mono)
        if decision is PollDecision.AGAIN:
            sub.last_pending_mono = now
            if self._on_pending is not None:
                self._on_pending(sub, elapsed)
            self._push(now + self.policy.next_delay(elapsed, sub.polls), sub)
        elif decision is PollDecision.DONE:
            self.done_total += 1
            lower = 0.0
            if sub.last_pending_mono is not None:
                lower = min(elapsed, max(0.0, sub.last_pending_mono - sub.submitted_mono))
            self.policy.observe(lower, elapsed)
        elif decision is PollDecision.DROP:
            self.dropped_total += 1
        else:
            raise TypeError(f"poll callback returned {decision!r}, not a PollDecision")
