"""The poll scheduler on a FakeClock, and the pure poll policy that learns when to poll."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulk_engine.clock import FakeClock
from bulk_engine.models import Job, Submitted
from bulk_engine.ratelimit import PRIORITY_POLL, RateLimiter
from bulk_engine.scheduler import PollDecision, PollPolicy, PollScheduler, interval_npmle

DONE, AGAIN, DROP = PollDecision.DONE, PollDecision.AGAIN, PollDecision.DROP


async def settle(steps: int = 50) -> None:
    """Let every ready task run up to its next wait (no time passes)."""
    for _ in range(steps):
        await asyncio.sleep(0)


def make_sub(name: str, submitted_mono: float = 0.0) -> Submitted:
    job = Job(line=2, id=name, folder=name, path=Path("/archive") / name, files=())
    return Submitted(
        job=job, token=f"tok-{name}", submitted_at=1.7e9, submitted_mono=submitted_mono
    )


def policy(seed: int = 0, *, poll_min: float = 10, poll_max: float = 30, **kw: float) -> PollPolicy:
    return PollPolicy(poll_min, poll_max, rng=random.Random(seed), **kw)  # type: ignore[arg-type]


class Poller:
    """A poll callback that records (token, time) and answers from a script per token."""

    def __init__(self, clock: FakeClock, answers: dict[str, list[PollDecision]] | None = None):
        self.clock = clock
        self.answers = answers or {}
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, sub: Submitted) -> PollDecision:
        self.calls.append((sub.token, self.clock.now()))
        script = self.answers.get(sub.token)
        return script.pop(0) if script else DONE


# ---- the scheduler --------------------------------------------------------------------------


async def test_items_are_polled_in_due_order_at_their_due_times() -> None:
    """Each folder is polled at submitted_mono + delay, in due order (ties by arrival)."""
    clock = FakeClock()
    poller = Poller(clock)
    sched = PollScheduler(poller, policy(), clock=clock)
    sched.add(make_sub("a"), delay=30)
    sched.add(make_sub("b"), delay=10)
    sched.add(make_sub("c", submitted_mono=5.0), delay=15)
    sched.add(make_sub("d"))  # policy.first_delay() = poll_min = 10, after "b"
    run = asyncio.create_task(sched.run())
    await settle()
    sched.close()
    await clock.run_until_idle()
    await asyncio.wait_for(run, 1)
    assert poller.calls == [("tok-b", 10.0), ("tok-d", 10.0), ("tok-c", 20.0), ("tok-a", 30.0)]
    assert sched.pending == 0
    assert sched.stats() == {"polls": 4, "done": 4, "dropped": 0, "pending": 0}


async def test_an_earlier_add_wakes_the_sleeping_scheduler() -> None:
    """Asleep until t=100, the scheduler re-aims at once when a folder due at t=5 arrives."""
    clock = FakeClock()
    poller = Poller(clock)
    sched = PollScheduler(poller, policy(), clock=clock)
    sched.add(make_sub("late"), delay=100)
    run = asyncio.create_task(sched.run())
    await settle()
    assert clock.next_deadline == 100
    await clock.advance(1)
    sched.add(make_sub("early", submitted_mono=1.0), delay=4)
    await settle()
    assert clock.next_deadline == 5
    sched.add(make_sub("later", submitted_mono=1.0), delay=50)  # not earliest: no re-aim
    await settle()
    assert clock.next_deadline == 5
    sched.close()
    await clock.run_until_idle()
    await asyncio.wait_for(run, 1)
    assert poller.calls == [("tok-early", 5.0), ("tok-later", 51.0), ("tok-late", 100.0)]


async def test_again_reschedules_with_the_policy_within_poll_min_and_poll_max() -> None:
    """202 answers: sub.polls counts, last_pending_mono is set, gaps follow the policy."""
    clock = FakeClock()
    poller = Poller(clock, {"tok-a": [AGAIN] * 5})
    pol = policy(seed=3)
    twin = policy(seed=3)
    sched = PollScheduler(poller, pol, clock=clock)
    sub = make_sub("a")
    sched.add(sub)
    run = asyncio.create_task(sched.run())
    await settle()
    sched.close()
    await clock.run_until_idle()
    await asyncio.wait_for(run, 1)
    times = [t for _, t in poller.calls]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 10.0
    expected = [twin.next_delay(times[i + 1] - 0.0, i + 1) for i in range(5)]
    assert gaps == pytest.approx(expected)
    assert all(10 - 1e-9 <= g <= 30 + 1e-9 for g in gaps)
    assert gaps[0] == pytest.approx(15, rel=0.1) and gaps[-1] == pytest.approx(30, rel=0.1)
    assert sub.polls == 6
    assert sub.last_pending_mono == times[-2]
    assert list(pol._observations) == [(times[-2], times[-1])]


async def test_done_on_first_poll_is_observed_with_lower_zero() -> None:
    """A folder done at its first poll finished somewhere in (0, elapsed]."""
    clock = FakeClock()
    pol = policy()
    sched = PollScheduler(Poller(clock), pol, clock=clock)
    sched.add(make_sub("a", submitted_mono=0.0), delay=12)
    run = asyncio.create_task(sched.run())
    await settle()
    sched.close()
    await clock.run_until_idle()
    await asyncio.wait_for(run, 1)
    assert list(pol._observations) == [(0.0, 12.0)]


async def test_close_ends_run_at_once_when_empty() -> None:
    """Nothing pending: run() returns as soon as close() is called, without time passing."""
    clock = FakeClock()
    sched = PollScheduler(Poller(clock), policy(), clock=clock)
    run = asyncio.create_task(sched.run())
    await settle()
    assert not run.done()
    sched.close()
    await settle()
    assert run.done() and run.exception() is None
    assert clock.now() == 0.0
    with pytest.raises(RuntimeError):
        sched.add(make_sub("too-late"))
    with pytest.raises(RuntimeError):
        await sched.run()


async def test_close_waits_for_pending_and_in_flight_polls() -> None:
    """After close(), run() still polls out what is queued, including resubmissions from polls."""
    clock = FakeClock()
    sched: PollScheduler

    async def poll(sub: Submitted) -> PollDecision:
        if sub.token == "tok-expired":  # e.g. a 404: the callback resubmits and drops the token
            sched.add(make_sub("resubmitted", submitted_mono=clock.now()))
            return DROP
        return DONE

    pol = policy()
    sched = PollScheduler(poll, pol, clock=clock)
    sched.add(make_sub("expired"))
    run = asyncio.create_task(sched.run())
    await settle()
    sched.close()
    await clock.advance(10)
    assert not run.done()
    assert sched.pending == 1
    await clock.advance(10)
    await asyncio.wait_for(run, 1)
    assert sched.stats() == {"polls": 2, "done": 1, "dropped": 1, "pending": 0}
    assert list(pol._observations) == [(0.0, 10.0)]  # the dropped token taught nothing


async def test_concurrency_bound_is_respected() -> None:
    """Ten folders due together, max_concurrent_polls=3: never more than three in flight."""
    clock = FakeClock()
    gate = asyncio.Event()
    active = 0
    peak = 0

    async def poll(sub: Submitted) -> PollDecision:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await gate.wait()
        active -= 1
        return DONE

    sched = PollScheduler(poll, policy(), clock=clock, max_concurrent_polls=3)
    for i in range(10):
        sched.add(make_sub(f"s{i}"))
    run = asyncio.create_task(sched.run())
    await settle()
    await clock.advance(10)
    assert (sched.in_flight, sched.pending, peak) == (3, 10, 3)
    gate.set()
    sched.close()
    await settle()
    await asyncio.wait_for(run, 1)
    assert peak == 3
    assert sched.stats()["done"] == 10


async def test_callback_exception_fails_run_and_cancels_other_polls() -> None:
    """An exception escaping the callback is a bug: run() raises it, other polls are cancelled."""
    clock = FakeClock()
    cancelled = asyncio.Event()

    async def poll(sub: Submitted) -> PollDecision:
        if sub.token == "tok-bad":
            await clock.sleep(1)
            raise RuntimeError("boom")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return DONE

    sched = PollScheduler(poll, policy(), clock=clock)
    sched.add(make_sub("slow"))
    sched.add(make_sub("bad"))
    run = asyncio.create_task(sched.run())
    await settle()
    await clock.advance(11)
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(run, 1)
    assert cancelled.is_set()


async def test_a_resumed_token_due_in_the_past_is_polled_at_once() -> None:
    """submitted_mono long ago: the first poll happens immediately."""
    clock = FakeClock(start=1000.0)
    poller = Poller(clock)
    sched = PollScheduler(poller, policy(), clock=clock)
    sched.add(make_sub("old", submitted_mono=0.0))
    run = asyncio.create_task(sched.run())
    await settle()
    sched.close()
    await settle()
    await asyncio.wait_for(run, 1)
    assert poller.calls == [("tok-old", 1000.0)]


async def test_scheduler_rejects_a_zero_concurrency() -> None:
    """max_concurrent_polls must be at least 1."""
    with pytest.raises(ValueError):
        PollScheduler(Poller(FakeClock()), policy(), clock=FakeClock(), max_concurrent_polls=0)


# ---- the estimator --------------------------------------------------------------------------


def test_npmle_of_exact_observations_is_the_empirical_distribution() -> None:
    """lower == upper: every time carries 1/n."""
    support, cdf = interval_npmle([(3.0, 3.0), (1.0, 1.0), (2.0, 2.0), (2.0, 2.0)])
    assert support == [1.0, 2.0, 3.0]
    assert cdf == pytest.approx([0.25, 0.75, 1.0])


def test_npmle_of_current_status_data_is_the_fraction_done_at_each_poll() -> None:
    """Done at a first poll at 10 (3 of 4), the last one done by 20: F(10)=0.75, F(20)=1."""
    support, cdf = interval_npmle([(0, 10), (0, 10), (0, 10), (10, 20)])
    assert support == [10, 20]
    assert cdf == pytest.approx([0.75, 1.0])


def test_npmle_moves_left_censored_mass_down_to_what_is_known() -> None:
    """(0,6], (0,10], (6,10] twice: the likelihood a(1-a)^2 peaks at F(6) = 1/3."""
    support, cdf = interval_npmle([(0, 6), (0, 10), (6, 10), (6, 10)])
    assert support == [6, 10]
    assert cdf == pytest.approx([1 / 3, 1.0], abs=1e-3)
    assert interval_npmle([]) == ([], [])


# ---- the policy -----------------------------------------------------------------------------


def test_unlearned_policy_polls_at_poll_min_then_grows_by_half() -> None:
    """No observations: first poll at poll_min, then ×1.5 per poll, capped at poll_max."""
    pol = policy(jitter=0)
    assert pol.first_delay() == 10
    assert [pol.next_delay(0, n) for n in range(1, 6)] == [15, 22.5, 30, 30, 30]
    jittered = policy(seed=1)
    delays = [jittered.next_delay(0, 1) for _ in range(200)]
    assert min(delays) >= 13.5 and max(delays) <= 16.5 and len(set(delays)) > 100


def test_policy_needs_twenty_observations_to_learn() -> None:
    """19 observations: still poll_min; the 20th switches to the learned first poll."""
    pol = policy(jitter=0, poll_min=1, poll_max=5)
    for _ in range(19):
        pol.observe(8.0, 8.0)
    assert not pol.learned and pol.first_delay() == 1
    pol.observe(8.0, 8.0)
    assert pol.learned and pol.first_delay() == 8.0


def test_policy_learns_the_80th_percentile_of_completion_times() -> None:
    """200 completion times from uniform(0.3, 1.5): first poll near their 80th percentile (1.26)."""
    rng = random.Random(42)
    times = [rng.uniform(0.3, 1.5) for _ in range(200)]
    exact = policy(poll_min=0.1, poll_max=1.0, jitter=0)
    jittered = policy(seed=5, poll_min=0.1, poll_max=1.0)
    for t in times:
        exact.observe(t, t)
        jittered.observe(t, t)
    q80 = sorted(times)[159]  # smallest time with at least 80 % done
    assert exact.first_delay() == q80
    assert q80 == pytest.approx(1.26, rel=0.05)
    firsts = [jittered.first_delay() for _ in range(100)]
    assert all(0.9 * q80 <= f <= 1.1 * q80 for f in firsts)
    # after a miss at q80, aim at the time by which 95 % of the rest are done
    assert exact.next_delay(q80, 1) == pytest.approx(exact.quantile(0.99) - q80)  # type: ignore[operator]


def test_policy_window_forgets_old_workloads() -> None:
    """The sliding window follows a change of workload."""
    pol = policy(jitter=0, poll_min=1, poll_max=30, window=50)
    for _ in range(50):
        pol.observe(100.0, 100.0)
    assert pol.first_delay() == 100.0
    for _ in range(50):
        pol.observe(20.0, 20.0)
    assert pol.first_delay() == 20.0


def test_learned_first_poll_stays_inside_the_expiry_guard() -> None:
    """Very slow folders: the first poll waits at most expiry_guard; later gaps at most poll_max."""
    pol = policy(jitter=0)
    for _ in range(30):
        pol.observe(5000.0, 5000.0)
    assert pol.first_delay() == 3000.0
    assert pol.next_delay(3000.0, 1) == 30.0
    assert pol.next_delay(6000.0, 5) == 30.0  # beyond everything learned: fallback schedule


def test_policy_rejects_bad_settings_and_observations() -> None:
    """Validation with ValueError."""
    for kwargs in (
        {"poll_min": 0},
        {"poll_min": 40},
        {"window": 5},
        {"jitter": 1.0},
        {"target_quantile": 1.0},
        {"expiry_guard": 20},
    ):
        with pytest.raises(ValueError):
            policy(**kwargs)
    pol = policy()
    with pytest.raises(ValueError):
        pol.observe(5, 3)
    with pytest.raises(ValueError):
        pol.observe(0, float("inf"))
    pol.observe(-1, 3)  # a clock hiccup: lower clamps to 0
    assert list(pol._observations) == [(0.0, 3)]


def simulate(
    pol: PollPolicy, draw: Callable[[random.Random], float], n: int, seed: int = 0
) -> tuple[list[int], list[float], list[float]]:
    """Folders one after another: poll until done, feed the policy. Polls, first delays, gaps."""
    rng = random.Random(seed)
    polls: list[int] = []
    firsts: list[float] = []
    gaps: list[float] = []
    for _ in range(n):
        done_at = draw(rng)
        t = pol.first_delay()
        firsts.append(t)
        count, lower = 1, 0.0
        while t < done_at:
            gap = pol.next_delay(t, count)
            gaps.append(gap)
            lower, t, count = t, t + gap, count + 1
        pol.observe(lower, t)
        polls.append(count)
    return polls, firsts, gaps


@pytest.mark.parametrize(
    ("poll_min", "poll_max", "low", "high"), [(0.1, 1.0, 0.3, 1.5), (10, 30, 30, 90)]
)
def test_steady_workload_needs_fewer_than_one_and_a_half_polls_per_folder(
    poll_min: float, poll_max: float, low: float, high: float
) -> None:
    """Learning from its own interval-censored polls, the policy settles near q80, < 1.5 polls."""
    pol = policy(seed=9, poll_min=poll_min, poll_max=poll_max)
    polls, firsts, gaps = simulate(pol, lambda r: r.uniform(low, high), 2000)
    steady = polls[1000:]
    assert statistics.mean(steady) < 1.5
    assert statistics.mean(polls[:20]) > 1.5  # before learning it needed more
    q80 = low + 0.8 * (high - low)
    assert statistics.mean(firsts[1000:]) == pytest.approx(q80, rel=0.1)
    assert min(firsts) >= poll_min
    assert all(poll_min <= g <= poll_max for g in gaps)


def test_policy_is_deterministic_given_the_seed() -> None:
    """Same seed, same inputs, same delays."""
    runs = [simulate(policy(seed=4), lambda r: r.uniform(20, 80), 300) for _ in range(2)]
    assert runs[0] == runs[1]


@settings(max_examples=60, deadline=None)
@given(
    poll_min=st.floats(min_value=0.01, max_value=50),
    spread=st.floats(min_value=1, max_value=10),
    jitter=st.floats(min_value=0, max_value=0.5),
    observations=st.lists(
        st.tuples(st.floats(min_value=0, max_value=4000), st.floats(min_value=0, max_value=500)),
        max_size=60,
    ),
    probes=st.lists(
        st.tuples(st.floats(min_value=0, max_value=5000), st.integers(0, 1000)), max_size=10
    ),
)
def test_delays_always_within_bounds(
    poll_min: float,
    spread: float,
    jitter: float,
    observations: list[tuple[float, float]],
    probes: list[tuple[float, int]],
) -> None:
    """first_delay in [poll_min, expiry_guard], next_delay in [poll_min, poll_max], always."""
    poll_max = poll_min * spread
    pol = PollPolicy(poll_min, poll_max, rng=random.Random(0), jitter=jitter, window=20)
    for lower, width in observations:
        pol.observe(lower, lower + width)
        assert poll_min <= pol.first_delay() <= 3000.0
        for elapsed, polls in probes:
            assert poll_min <= pol.next_delay(elapsed, polls) <= poll_max


# ---- composition with the rest of the run ---------------------------------------------------


async def test_polls_through_the_shared_rate_limiter_keep_exact_times() -> None:
    """Five folders due together, polls at priority 0 through a 10/s limiter: 0.1 s apart."""
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    calls: list[tuple[str, float]] = []

    async def poll(sub: Submitted) -> PollDecision:
        await limiter.acquire(PRIORITY_POLL)
        calls.append((sub.token, clock.now()))
        return AGAIN if sub.polls == 1 else DONE

    sched = PollScheduler(poll, policy(jitter=0), clock=clock)
    for i in range(5):
        sched.add(make_sub(f"s{i}"))
    run = asyncio.create_task(sched.run())
    await settle()
    sched.close()
    await clock.run_until_idle()
    await asyncio.wait_for(run, 1)
    first = [(f"tok-s{i}", pytest.approx(10 + 0.1 * i)) for i in range(5)]
    second = [(f"tok-s{i}", pytest.approx(10 + 0.1 * i + 15)) for i in range(5)]
    assert calls == first + second


async def test_cancelling_run_from_an_anyio_scope_stops_polls_and_keeps_the_heap() -> None:
    """An interrupt (an anyio cancel scope, as in the engine) ends run() and its polls in flight."""
    clock = FakeClock()
    stopped = asyncio.Event()

    async def poll(sub: Submitted) -> PollDecision:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()
        return DONE  # pragma: no cover

    sched = PollScheduler(poll, policy(), clock=clock)
    sched.add(make_sub("stuck"))
    sched.add(make_sub("later"), delay=100)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sched.run)
        await settle()
        await clock.advance(10)
        assert sched.in_flight == 1
        tg.cancel_scope.cancel()
    assert stopped.is_set()
    assert len(sched._heap) == 1  # "later" is still known (the journal resumes it)
