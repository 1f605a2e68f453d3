"""One conformance suite for both rate limiters the client can be given: the local
``ratelimit.RateLimiter`` and the shared ``pg.governor.Governor`` (bulk_engine.pg.Limiter).

Timings are asserted as lower bounds only (a busy machine makes waits longer, never shorter).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator

import pytest

from bulk_engine.clock import MonotonicClock
from bulk_engine.pg.connect import Database
from bulk_engine.pg.governor import PRIORITY_POLL, PRIORITY_SUBMIT, Governor, Limiter
from bulk_engine.ratelimit import RateLimiter

from pg_cluster import (  # noqa: F401 - fixtures
    PgCluster,
    eventually,
    pg_cluster_fixture,
)

RATE, BURST = 20.0, 3
_dbs = itertools.count(os.getpid() * 1000)


@pytest.fixture(params=["local", "shared"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    if request.param == "local":
        yield RateLimiter(RATE, BURST, clock=MonotonicClock())
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    async with await Database.connect(cluster.create_database(f"lim{next(_dbs)}")) as db:
        yield await Governor.open(db, "sk-conformance", rate=RATE, burst=BURST)


def _waiting(limiter: Limiter) -> int:
    return int(getattr(limiter, "waiting"))  # noqa: B009 - not in the protocol on purpose


async def test_the_burst_goes_at_once_then_the_rate(limiter: Limiter) -> None:
    """Three calls at once, the fourth one interval later."""
    start = time.monotonic()
    for _ in range(BURST):
        await limiter.acquire()
    burst_s = time.monotonic() - start
    await limiter.acquire()
    assert time.monotonic() - start >= 1 / RATE - 0.005
    assert burst_s < (BURST - 1) / RATE  # spaced at the rate, three calls would take this


async def test_polls_queued_after_submits_go_first(limiter: Limiter) -> None:
    """Priorities: polls waiting behind submits are granted before them."""
    for _ in range(BURST):
        await limiter.acquire()
    order: list[str] = []

    async def take(name: str, priority: int) -> None:
        await limiter.acquire(priority)
        order.append(name)

    async with asyncio.TaskGroup() as tg:
        for i in range(3):
            tg.create_task(take(f"submit{i}", PRIORITY_SUBMIT))
        await eventually(lambda: _waiting(limiter) == 3, timeout=5, what="submits queued")
        tg.create_task(take("poll", PRIORITY_POLL))
        await eventually(lambda: _waiting(limiter) == 4, timeout=5, what="the poll queued")
    assert order[0] == "poll"


async def test_a_pause_holds_the_next_call(limiter: Limiter) -> None:
    """pause_for(s): the next call waits at least s."""
    await limiter.acquire()
    limiter.pause_for(0.3)
    start = time.monotonic()
    await limiter.acquire()
    assert time.monotonic() - start >= 0.3 - 0.01


async def test_a_429_lowers_the_rate(limiter: Limiter) -> None:
    """on_throttled halves the rate in force (once, for calls of one moment)."""
    await limiter.acquire()
    limiter.on_throttled()
    limiter.on_throttled()
    await limiter.acquire()  # the shared governor learns its rate at a reservation
    assert limiter.current_rate == pytest.approx(RATE / 2, rel=0.1)
    limiter.on_success()
