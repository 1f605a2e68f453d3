"""Stuck analyses on a FakeClock: reported once past stuck_factor × the learned p99, still
polled within the poll bounds, never given up for it; shown on the panel."""

from __future__ import annotations

import asyncio
import io
import itertools
import random
from pathlib import Path

from rich.console import Console
from structlog.testing import capture_logs

from bulk_engine.clock import FakeClock
from bulk_engine.models import Job, Submitted
from bulk_engine.progress import ProgressModel, render_panel, status_fields
from bulk_engine.scheduler import PollDecision, PollPolicy, PollScheduler
from bulk_engine.stats import LiveCounters
from bulk_engine.stuck import StuckWatch, outstanding_figures


def make_sub(name: str, at: float = 0.0) -> Submitted:
    job = Job(line=2, id=name, folder=name, path=Path("/archive") / name, files=())
    return Submitted(job=job, token=f"gAAAAA-token-of-{name}-0123456789", submitted_at=1.7e9,
                     submitted_mono=at)


def learned_policy(n: int = 30) -> PollPolicy:
    """A policy that has seen ``n`` folders finish within 2 s (p99 = 2 s)."""
    pol = PollPolicy(1.0, 5.0, rng=random.Random(0), jitter=0.0)
    for _ in range(n):
        pol.observe(0.0, 2.0)
    return pol


async def test_a_folder_far_past_the_learned_p99_is_reported_once_and_still_polled() -> None:
    """p99 = 2 s, factor 3: the folder still running at 6 s is reported once (row id, no
    token); its polls go on every poll_min..poll_max until it finishes; other folders never."""
    clock = FakeClock()
    pol = learned_policy()
    watch = StuckWatch(pol, factor=3.0)
    assert watch.threshold() == 6.0
    polls: list[tuple[str, float]] = []
    slow_polls = 12

    async def poll(sub: Submitted) -> PollDecision:
        polls.append((sub.job.id, clock.now()))
        if sub.job.id == "slow" and sub.polls < slow_polls:
            return PollDecision.AGAIN
        return PollDecision.DONE

    sched = PollScheduler(poll, pol, clock=clock, on_pending=watch.check)
    slow, quick = make_sub("slow"), make_sub("quick")
    sched.add(slow, delay=1.0)
    sched.add(quick, delay=1.0)
    with capture_logs() as logs:
        run = asyncio.create_task(sched.run())
        for _ in range(50):  # let the scheduler reach its first sleep
            await asyncio.sleep(0)
        sched.close()
        await clock.run_until_idle()
        await asyncio.wait_for(run, 1)
    stuck = [e for e in logs if e["event"] == "stuck_analysis"]
    assert len(stuck) == 1 and stuck[0]["id"] == "slow" and stuck[0]["log_level"] == "warning"
    assert stuck[0]["elapsed_s"] > 6.0 and stuck[0]["threshold_s"] == 6.0
    assert "gAAAA" not in repr(stuck[0])
    assert watch.reported == 1 and slow.stuck and not quick.stuck
    times = [t for name, t in polls if name == "slow"]
    assert len(times) == slow_polls and slow.polls == slow_polls  # polled to its end
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(1.0 - 1e-9 <= g <= 5.0 + 1e-9 for g in gaps), gaps
    assert sched.stats()["done"] == 2 and sched.stats()["dropped"] == 0


async def test_nothing_is_stuck_before_the_policy_has_learned() -> None:
    """Fewer than 20 observations: no distribution, no report, however long a folder runs."""
    pol = learned_policy(n=5)
    watch = StuckWatch(pol, factor=3.0)
    sub = make_sub("slow")
    with capture_logs() as logs:
        assert watch.threshold() is None
        assert not watch.check(sub, 10_000.0)
    assert logs == [] and not sub.stuck and watch.reported == 0


def test_statistics_count_outstanding_stuck_folders_and_the_oldest_token() -> None:
    """Over the scheduler's folders: how many are flagged stuck, the oldest one's age."""
    watch = StuckWatch(learned_policy(), factor=2.0)
    subs = [make_sub("a", at=10.0), make_sub("b", at=4.0), make_sub("c", at=7.0)]
    assert watch.check(subs[1], 5.0) and not watch.check(subs[1], 9.0)
    st = watch.statistics(subs, now=20.0)
    assert (st.reported, st.outstanding, st.threshold_s, st.oldest_age_s) == (1, 1, 4.0, 16.0)
    assert outstanding_figures([], 3.0) == (0, None)


def test_the_panel_shows_stuck_analyses() -> None:
    """A stuck count appears on the panel (and in the status line) only when there is one."""
    def shown(counters: LiveCounters) -> str:
        console = Console(width=120, file=io.StringIO())
        console.print(render_panel(ProgressModel(total_rows=10).snapshot(1.0, counters, None,
                                                                          10.0)))
        return console.file.getvalue()  # type: ignore[attr-defined, no-any-return]

    assert "2 running far past the usual time" in shown(LiveCounters(rows_read=5, stuck=2))
    assert "stuck" not in shown(LiveCounters(rows_read=5))
    assert status_fields(ProgressModel().snapshot(1.0, LiveCounters(stuck=3), None, 1.0))[
        "stuck"] == 3
