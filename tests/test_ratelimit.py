"""The shared rate limiter: exact grant times on a FakeClock; priorities, pause, AIMD, cancel."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulk_engine.clock import FakeClock
from bulk_engine.ratelimit import PRIORITY_POLL, PRIORITY_SUBMIT, RateLimiter


async def settle(steps: int = 50) -> None:
    """Let every ready task run up to its next wait (no time passes)."""
    for _ in range(steps):
        await asyncio.sleep(0)


class ManualClock:
    """A clock for the pure core: time is set by the test, nothing ever sleeps."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - never awaited
        raise AssertionError("the pure core must not sleep")


class Recorder:
    """Starts acquire() tasks and records (name, grant time) in grant order."""

    def __init__(self, limiter: RateLimiter, clock: FakeClock) -> None:
        self.limiter = limiter
        self.clock = clock
        self.grants: list[tuple[str, float]] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self, name: str, priority: int = PRIORITY_SUBMIT) -> asyncio.Task[None]:
        async def go() -> None:
            await self.limiter.acquire(priority)
            self.grants.append((name, self.clock.now()))

        task = asyncio.create_task(go(), name=name)
        self.tasks[name] = task
        await settle()
        return task

    def names(self) -> list[str]:
        return [name for name, _ in self.grants]

    def times(self) -> list[float]:
        return [t for _, t in self.grants]


# ---- pure core ------------------------------------------------------------------------------


def test_reserve_paces_at_the_rate_with_burst_one() -> None:
    """rate 10, burst 1: a token now, then the next one 0.1 s later."""
    clock = ManualClock()
    limiter = RateLimiter(10, 1, clock=clock)
    assert limiter._reserve(0.0) == 0.0
    assert limiter._reserve(0.0) == pytest.approx(0.1)
    assert limiter._reserve(0.05) == pytest.approx(0.05)
    assert limiter._reserve(0.1) == 0.0


def test_reserve_allows_the_burst_back_to_back() -> None:
    """burst 5: five tokens at t=0, then one every 1/rate."""
    limiter = RateLimiter(10, 5, clock=ManualClock())
    assert [limiter._reserve(0.0) for _ in range(5)] == [0.0] * 5
    assert limiter._reserve(0.0) == pytest.approx(0.1)
    assert limiter._reserve(0.1) == 0.0
    assert limiter._reserve(0.1) == pytest.approx(0.1)


def test_reserve_refills_up_to_burst_only() -> None:
    """A long idle spell saves up ``burst`` tokens, not more."""
    limiter = RateLimiter(10, 3, clock=ManualClock())
    for _ in range(3):
        limiter._reserve(0.0)
    assert [limiter._reserve(100.0) for _ in range(3)] == [0.0] * 3
    assert limiter._reserve(100.0) == pytest.approx(0.1)


def test_limiter_validates_its_settings() -> None:
    """Non-positive rate, burst below 1, or a min_rate above rate are refused."""
    clock = ManualClock()
    for kwargs in (
        {"rate": 0, "burst": 1},
        {"rate": float("inf"), "burst": 1},
        {"rate": 1, "burst": 0},
        {"rate": 1, "burst": 1, "min_rate": 2},
    ):
        with pytest.raises(ValueError):
            RateLimiter(clock=clock, **kwargs)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=50),
    burst=st.integers(min_value=1, max_value=8),
    events=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=2),  # gap before this caller arrives
            st.sampled_from(["call", "call", "call", "throttled", "success", "pause"]),
            st.floats(min_value=0, max_value=3),  # pause length
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_grants_never_exceed_burst_plus_rate_times_window(
    rate: float, burst: int, events: list[tuple[float, str, float]]
) -> None:
    """Over any window of length T, grants <= burst + rate*T, whatever pauses and 429s happen."""
    clock = ManualClock()
    limiter = RateLimiter(rate, burst, clock=clock)
    grants: list[float] = []
    arrival = 0.0
    for gap, kind, pause in events:
        arrival += gap
        clock.t = max(clock.t, arrival)
        if kind == "throttled":
            limiter.on_throttled()
        elif kind == "success":
            limiter.on_success()
        elif kind == "pause":
            limiter.pause_for(pause)
        else:
            while (delay := limiter._reserve(clock.t)) > 0:
                clock.t += delay
            grants.append(clock.t)
    for i in range(len(grants)):
        for j in range(i, len(grants)):
            window = grants[j] - grants[i]
            assert j - i + 1 <= burst + rate * window + 1e-6


# ---- acquire on a FakeClock -----------------------------------------------------------------


async def test_rate_10_burst_1_grants_every_tenth_of_a_second() -> None:
    """One caller looping: grants at 0, 0.1, 0.2, 0.3, 0.4."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    times: list[float] = []

    async def worker() -> None:
        for _ in range(5):
            await limiter.acquire()
            times.append(clock.now())

    task = asyncio.create_task(worker())
    await settle()
    await clock.run_until_idle()
    await task
    assert times == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert limiter.granted == 5


async def test_burst_5_grants_five_at_once_then_paces() -> None:
    """Eight concurrent callers, burst 5: five at t=0, then 0.1 apart."""
    clock = FakeClock()
    limiter = RateLimiter(10, 5, clock=clock)
    rec = Recorder(limiter, clock)
    for i in range(8):
        await rec.start(f"c{i}")
    await clock.run_until_idle()
    assert rec.names() == [f"c{i}" for i in range(8)]
    assert rec.times() == pytest.approx([0, 0, 0, 0, 0, 0.1, 0.2, 0.3])


async def test_polls_go_before_waiting_submissions_fifo_within_priority() -> None:
    """Waiting priority-0 callers are granted before any waiting priority-1 caller; FIFO each."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    await limiter.acquire()  # the bucket is now empty
    rec = Recorder(limiter, clock)
    await rec.start("submit-1", PRIORITY_SUBMIT)
    await rec.start("submit-2", PRIORITY_SUBMIT)
    await rec.start("poll-1", PRIORITY_POLL)
    await rec.start("poll-2", PRIORITY_POLL)
    await clock.advance(0.15)
    await rec.start("poll-3", PRIORITY_POLL)  # arrives late, still overtakes the submissions
    await clock.run_until_idle()
    assert rec.names() == ["poll-1", "poll-2", "poll-3", "submit-1", "submit-2"]
    assert rec.times() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


async def test_only_the_head_waiter_sleeps_on_the_clock() -> None:
    """Ten queued callers cause one clock sleep at a time: one per grant, not one per caller."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    await limiter.acquire()
    rec = Recorder(limiter, clock)
    for i in range(10):
        await rec.start(f"c{i}")
    assert limiter.waiting == 10
    assert clock.sleeps == pytest.approx([0.1])
    await clock.run_until_idle()
    assert rec.times() == pytest.approx([0.1 * i for i in range(1, 11)])
    assert clock.sleeps == pytest.approx([0.1] * 10)
    assert limiter.waiting == 0


async def test_cancelled_sleeping_head_hands_over_without_losing_time() -> None:
    """Cancelling the waiter that sleeps on the clock: the next ones keep their exact times."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    await limiter.acquire()
    rec = Recorder(limiter, clock)
    a = await rec.start("a")
    await rec.start("b")
    await rec.start("c")
    await clock.advance(0.05)
    a.cancel()
    await settle()
    assert a.cancelled()
    assert limiter.waiting == 2
    await clock.run_until_idle()
    assert rec.grants == [("b", pytest.approx(0.1)), ("c", pytest.approx(0.2))]
    assert limiter.granted == 3


async def test_cancelled_middle_waiter_leaves_no_hole() -> None:
    """A cancelled waiter gives up its place: the one behind it moves up a slot."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    await limiter.acquire()
    rec = Recorder(limiter, clock)
    await rec.start("a")
    b = await rec.start("b")
    await rec.start("c")
    b.cancel()
    await settle()
    await clock.run_until_idle()
    assert rec.grants == [("a", pytest.approx(0.1)), ("c", pytest.approx(0.2))]
    assert limiter.waiting == 0


async def test_waiter_cancelled_after_its_grant_gives_the_token_on() -> None:
    """Cancelled between grant and resumption: the token goes to the next waiter at once."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    await limiter.acquire()
    rec = Recorder(limiter, clock)
    await rec.start("sleeper", PRIORITY_SUBMIT)  # first in: sleeps on the clock
    doomed = await rec.start("doomed", PRIORITY_POLL)
    await rec.start("next", PRIORITY_POLL)
    dispatch = limiter._dispatch

    def dispatch_then_cancel() -> None:
        dispatch()
        if not doomed.done():
            doomed.cancel()  # granted just now, cancelled before it can run

    limiter._dispatch = dispatch_then_cancel  # type: ignore[method-assign]
    await clock.run_until_idle()
    assert doomed.cancelled()
    assert rec.grants == [("next", pytest.approx(0.1)), ("sleeper", pytest.approx(0.2))]
    assert limiter.granted == 3  # the first call, "next" and "sleeper"; not "doomed"
    assert limiter.waiting == 0


async def test_pause_for_holds_everyone_and_never_shortens() -> None:
    """A Retry-After pause delays every waiter; a shorter pause later changes nothing."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    await limiter.acquire()
    rec = Recorder(limiter, clock)
    await rec.start("poll", PRIORITY_POLL)
    await rec.start("submit", PRIORITY_SUBMIT)
    await clock.advance(0.05)
    limiter.pause_for(1.0)  # until 1.05
    await clock.advance(0.45)
    limiter.pause_for(0.1)  # would end at 0.6: ignored
    assert limiter.paused_until == pytest.approx(1.05)
    await clock.run_until_idle()
    assert rec.grants == [("poll", pytest.approx(1.05)), ("submit", pytest.approx(1.15))]
    assert limiter.paused_seconds_total == pytest.approx(1.0)


async def test_pause_extension_counts_only_the_added_time() -> None:
    """A longer pause extends the running one; paused_seconds_total counts the union."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    limiter.pause_for(1.0)
    await clock.advance(0.5)
    limiter.pause_for(2.0)  # until 2.5
    assert limiter.paused_until == pytest.approx(2.5)
    assert limiter.paused_seconds_total == pytest.approx(2.5)
    limiter.pause_for(0)
    limiter.pause_for(float("nan"))
    assert limiter.paused_seconds_total == pytest.approx(2.5)


async def test_no_burst_right_after_a_pause() -> None:
    """Tokens saved up before or during a pause do not come out as a burst after it."""
    clock = FakeClock()
    limiter = RateLimiter(10, 5, clock=clock)
    limiter.pause_for(3.0)
    rec = Recorder(limiter, clock)
    for i in range(4):
        await rec.start(f"c{i}")
    await clock.run_until_idle()
    assert rec.times() == pytest.approx([3.0, 3.1, 3.2, 3.3])


# ---- adaptive rate (AIMD) -------------------------------------------------------------------


async def test_throttled_halves_the_rate_once_per_window_down_to_the_floor() -> None:
    """429s: ×0.5 at most once a second, never below min_rate (default rate/20)."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    assert limiter.min_rate == 0.5
    limiter.on_throttled()
    assert limiter.current_rate == 5.0
    await clock.advance(0.5)
    limiter.on_throttled()  # same overload: counted, not applied
    assert limiter.current_rate == 5.0
    await clock.advance(0.5)
    limiter.on_throttled()
    assert limiter.current_rate == 2.5
    rates = []
    for _ in range(4):
        await clock.advance(1.0)
        limiter.on_throttled()
        rates.append(limiter.current_rate)
    assert rates == [1.25, 0.625, 0.5, 0.5]
    assert limiter.throttled_events == 7
    assert limiter.rate_decreases == 6


async def test_success_recovers_additively_with_clock_time_up_to_the_rate() -> None:
    """+5 % of the configured rate per clean second, however many calls; capped at rate."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    limiter.on_throttled()  # t=0: 5.0
    await clock.advance(2.0)
    limiter.on_success()
    assert limiter.current_rate == pytest.approx(6.0)
    for _ in range(50):  # many calls at the same instant add nothing
        limiter.on_success()
    assert limiter.current_rate == pytest.approx(6.0)
    await clock.advance(1.0)
    limiter.on_success()
    assert limiter.current_rate == pytest.approx(6.5)
    await clock.advance(60.0)
    limiter.on_success()
    assert limiter.current_rate == 10.0


async def test_grants_follow_the_lowered_rate() -> None:
    """After a 429 at rate 10, calls go 0.2 s apart."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    await limiter.acquire()
    limiter.on_throttled()
    rec = Recorder(limiter, clock)
    for i in range(3):
        await rec.start(f"c{i}")
    await clock.run_until_idle()
    assert rec.times() == pytest.approx([0.2, 0.4, 0.6])


async def test_non_adaptive_limiter_counts_but_keeps_its_rate() -> None:
    """adaptive=False: 429s are counted, the rate never moves."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock, adaptive=False)
    limiter.on_throttled()
    limiter.on_success()
    assert limiter.current_rate == 10.0
    assert limiter.throttled_events == 1
    assert limiter.stats()["rate_decreases"] == 0


async def test_custom_min_rate_is_the_floor() -> None:
    """min_rate bounds the decrease."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock, min_rate=4.0)
    limiter.on_throttled()
    await clock.advance(1.0)
    limiter.on_throttled()
    assert limiter.current_rate == 4.0


# ---- quiet spells and the auto rate ---------------------------------------------------------


async def test_idle_tokens_bound_the_burst_after_a_quiet_spell() -> None:
    """burst 5 but idle_tokens 2: after 10 quiet seconds, two calls go at once, then 0.1 s
    apart (a pause of the submitters must not come back as a burst)."""
    clock = FakeClock()
    limiter = RateLimiter(10, 5, clock=clock, idle_tokens=2)
    for _ in range(5):  # the initial bucket (full here) is spent at the start
        await limiter.acquire()
    await clock.advance(10.0)
    rec = Recorder(limiter, clock)
    for i in range(5):
        await rec.start(f"c{i}")
    await clock.run_until_idle()
    assert rec.times() == pytest.approx([10.0, 10.0, 10.1, 10.2, 10.3])


def test_idle_tokens_default_keeps_the_full_burst_and_is_validated() -> None:
    clock = ManualClock()
    limiter = RateLimiter(10, 5, clock=clock)
    assert limiter.idle_tokens == 5.0
    clock.t = 10.0
    assert [limiter._reserve(10.0) for _ in range(5)] == [0.0] * 5
    for bad in (0.5, 6.0):
        with pytest.raises(ValueError):
            RateLimiter(10, 5, clock=clock, idle_tokens=bad)


async def test_auto_limiter_follows_its_controller_within_the_ceiling() -> None:
    """The controller's rate replaces the AIMD: it doubles with clean time up to the ceiling,
    a 429 cuts it, and the Retry-After pause still holds everyone."""
    clock = FakeClock()
    limiter = RateLimiter.auto(10, clock=clock, ceiling=8.0)
    assert limiter.current_rate == 2.0 and limiter.idle_tokens == 2.0
    for _ in range(40):
        await clock.advance(0.05)
        limiter.on_success()
    assert limiter.current_rate == 8.0  # doubled twice in a second, then the ceiling
    limiter.on_throttled()
    limiter.pause_for(1.0)
    assert limiter.current_rate < 8.0 and limiter.rate_decreases == 1
    assert limiter.paused_until == pytest.approx(clock.now() + 1.0)
    stats = limiter.statistics()
    assert stats.mode == "auto" and stats.throttled == 1 and stats.ceiling == 8.0
    assert RateLimiter.auto(10, clock=clock).statistics().ceiling is None
