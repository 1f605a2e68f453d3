"""bulk_engine.pg.governor: the GCRA model, the SQL that implements it, and the shared
governor across workers and processes against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
import uuid

import pytest

from bulk_engine.pg.connect import Database
from bulk_engine.pg.governor import (
    PRIORITY_POLL,
    PRIORITY_SUBMIT,
    RESERVE_SQL,
    GcraState,
    Governor,
)
from bulk_engine.pg.rows import RowSpec, RunStore

from pg_cluster import (  # noqa: F401 - fixtures
    PgCluster,
    children,
    eventually,
    pg_cluster_fixture,
    pg_db_fixture,
    pg_dsn_fixture,
)

KEY = "sk-test-governor-0123456789"
T0 = 1_700_000_000.0  # a realistic database clock (0 would be 1970: "paused until then")


# ---------------------------------------------------------------------- the pure model


def test_model_grants_the_burst_then_the_rate() -> None:
    """Burst 3 at 10/s: three calls at once, the fourth 0.1 s later."""
    g = GcraState(rate=10, burst=3, min_rate=0.5)
    assert [g.reserve(100.0, 0.0).granted for _ in range(3)] == [True] * 3
    refused = g.reserve(100.0, 0.0)
    assert not refused.granted and refused.wait == pytest.approx(0.1)
    assert g.reserve(100.1, 0.0).granted


def test_model_books_a_slot_ahead_within_max_ahead() -> None:
    """With look-ahead, the fourth call is granted for 0.1 s later (the caller sleeps)."""
    g = GcraState(rate=10, burst=3, min_rate=0.5)
    for _ in range(3):
        g.reserve(T0, 1.0)
    r = g.reserve(T0, 1.0)
    assert r.granted and r.at == pytest.approx(T0 + 0.1, abs=1e-6)
    assert r.wait == pytest.approx(0.1, abs=1e-6)


def test_model_pause_holds_everyone_then_restarts_with_one_token() -> None:
    """A 5 s Retry-After: nothing before it ends, then one call, not a burst."""
    g = GcraState(rate=10, burst=5, min_rate=0.5)
    g.pause(5.0, now=T0)
    assert g.pause(1.0, now=T0 + 1) == T0 + 5  # a shorter pause never shortens it
    r = g.reserve(T0 + 1, 0.0)
    assert not r.granted and r.at == pytest.approx(T0 + 5, abs=1e-6)
    assert g.reserve(T0 + 5, 0.0).granted
    assert not g.reserve(T0 + 5, 0.0).granted
    assert g.reserve(T0 + 5.1, 0.0).granted


def test_model_a_429_halves_once_per_second_and_recovers_additively() -> None:
    """429s within one second are one decrease; 5 % of the ceiling comes back per second."""
    g = GcraState(rate=10, burst=1, min_rate=0.5)
    assert g.throttled(T0) and g.rate_at(T0) == 5.0
    assert not g.throttled(T0 + 0.5) and g.rate_at(T0 + 0.5) == pytest.approx(5.25)
    assert g.throttled(T0 + 1) and g.rate_at(T0 + 1) == pytest.approx(2.75)
    assert g.rate_at(T0 + 11) == pytest.approx(7.75)
    assert g.rate_at(T0 + 100) == 10.0
    for t in range(2, 40, 2):
        g.throttled(T0 + t)
    assert g.rate_at(T0 + 40) >= 0.5


def test_model_forgets_a_clock_stepped_back() -> None:
    """A database clock stepped back by an hour does not block callers for an hour."""
    g = GcraState(rate=10, burst=2, min_rate=0.5, tat=T0 + 3600, pause_until=T0 + 3600)
    r = g.reserve(T0, 2.0)
    assert r.at <= T0 + 300 + 0.2


# ---------------------------------------------------------------------- the SQL


async def _governor(db: Database, rate: float, burst: int, **kw: float) -> Governor:
    return await Governor.open(db, KEY, rate=rate, burst=burst, **kw)  # type: ignore[arg-type]


async def test_sql_computes_what_the_model_computes(pg_db: Database) -> None:
    """The PL/pgSQL functions, fed explicit times, agree with GcraState step by step."""
    gov = await _governor(pg_db, 10, 3)
    model = GcraState(rate=10, burst=3, min_rate=0.5)
    script = [("r", 0.0, 0.0)] * 4 + [("r", 0.05, 0.1), ("t", 0.06, 0), ("r", 0.07, 0.5),
                                      ("t", 0.5, 0), ("t", 1.2, 0), ("p", 1.3, 2.0),
                                      ("r", 1.4, 0.5), ("r", 3.3, 0.0), ("r", 3.31, 0.0),
                                      ("r", 20.0, 0.0), ("r", 20.0, 0.0), ("r", 20.0, 1.0)]
    for op, offset, arg in script:
        now = T0 + offset
        async with pg_db.session() as c:
            if op == "r":
                got = dict(await c.fetchrow(RESERVE_SQL, gov.key_fp, arg, now))
                want = model.reserve(now, arg)
                assert got["granted"] == want.granted, (op, offset)
                assert got["at"] == pytest.approx(want.at, abs=1e-6), (op, offset)
                assert got["wait"] == pytest.approx(want.wait, abs=1e-6), (op, offset)
                assert got["rate"] == pytest.approx(want.rate, abs=1e-9), (op, offset)
            elif op == "t":
                got = dict(await c.fetchrow(
                    "SELECT * FROM bulk_engine.gov_throttled($1, 1, $2)", gov.key_fp, now))
                assert got["decreased"] == model.throttled(now), (op, offset)
            else:
                until = await c.fetchval("SELECT bulk_engine.gov_pause($1, $2, $3)",
                                         gov.key_fp, arg, now)
                assert until == pytest.approx(model.pause(arg, now), abs=1e-6)


# ---------------------------------------------------------------------- one process


async def test_burst_is_honoured_then_the_rate(pg_db: Database) -> None:
    """A fresh key with burst 5 at 2/s: five grants for the same moment, the sixth 0.5 s on."""
    gov = await _governor(pg_db, 2, 5)
    grants = [await gov.acquire() for _ in range(6)]
    assert [g.wait for g in grants[:5]] == [0.0] * 5
    assert grants[5].wait > 0 and grants[5].at - grants[0].at >= 0.5 - 1e-6


async def test_polls_go_before_submits(pg_db: Database) -> None:
    """Callers queue by priority: polls that arrive after submits are granted first."""
    gov = await _governor(pg_db, 20, 1)
    await gov.acquire()  # the burst is spent: everyone below waits for a slot
    order: list[str] = []

    async def take(name: str, priority: int) -> None:
        await gov.acquire(priority)
        order.append(name)

    async with asyncio.TaskGroup() as tg:
        for i in range(4):
            tg.create_task(take(f"submit{i}", PRIORITY_SUBMIT))
        await eventually(lambda: gov.waiting == 4, timeout=5, what="submits queued")
        for i in range(2):
            tg.create_task(take(f"poll{i}", PRIORITY_POLL))
    assert order[:2] == ["poll0", "poll1"]
    assert order[2:] == [f"submit{i}" for i in range(4)]


async def test_a_cancelled_waiter_loses_nobody_else_their_turn(pg_db: Database) -> None:
    """Cancelling the caller that reserves for the queue hands the role on."""
    gov = await _governor(pg_db, 20, 1)
    await gov.acquire()
    first = asyncio.create_task(gov.acquire())
    second = asyncio.create_task(gov.acquire())
    await eventually(lambda: gov.waiting == 2, timeout=5, what="two waiters")
    first.cancel()
    grant = await asyncio.wait_for(second, 5)
    assert grant.at > 0 and gov.waiting == 0
    assert first.cancelled()


# ---------------------------------------------------------------------- shared feedback


async def test_a_retry_after_pauses_every_worker_then_one_token(pg_db: Database,
                                                                pg_dsn: str) -> None:
    """Worker A sees a 429 with Retry-After 1 s: worker B (another pool) waits it out too, and
    restarts at the rate, not with a burst."""
    async with await Database.connect(pg_dsn, max_size=2) as other:
        a = await _governor(pg_db, 10, 5)
        b = await _governor(other, 10, 5)
        await b.acquire()
        a.pause_for(1.0)
        await a.flush()
        state = await a.shared_state()
        assert 0.9 < state["pause_left"] <= 1.0
        start = time.monotonic()
        g1 = await b.acquire()
        waited = time.monotonic() - start
        g2 = await b.acquire()
    assert waited >= 0.85
    assert g2.at - g1.at >= 0.1 - 1e-6  # one token after the pause, then the rate


async def test_a_429_halves_the_shared_rate_once_for_a_burst_of_them(pg_db: Database,
                                                                     pg_dsn: str) -> None:
    """Three 429s at once in worker A: the shared rate halves once, worker B sees it."""
    async with await Database.connect(pg_dsn, max_size=2) as other:
        a = await _governor(pg_db, 40, 1)
        b = await _governor(other, 40, 1)
        for _ in range(3):
            a.on_throttled()
        await a.flush()
        await b.acquire()
        assert b.current_rate == pytest.approx(20.0, rel=0.05)
        state = await a.shared_state()
    assert state["rate_decreases"] == 1 and state["throttled_events"] == 3


async def test_a_429_report_retried_after_a_lost_answer_counts_once(pg_db: Database) -> None:
    """The same report applied twice (Database.run retried it) halves the rate once, even
    when the retry comes more than a second later."""
    gov = await _governor(pg_db, 40, 1)
    sql = "SELECT * FROM bulk_engine.gov_throttled($1, 1, $2, $3)"
    report = uuid.uuid4()
    async with pg_db.session() as c:
        first = await c.fetchrow(sql, gov.key_fp, T0, report)
        again = await c.fetchrow(sql, gov.key_fp, T0 + 5, report)
        other = await c.fetchrow(sql, gov.key_fp, T0 + 5, uuid.uuid4())
    assert first["decreased"] and not again["decreased"] and other["decreased"]
    state = await gov.shared_state()
    assert state["rate_decreases"] == 2 and state["throttled_events"] == 2


async def test_reopening_reconfigures_the_ceiling_only_when_asked(pg_db: Database) -> None:
    """The last worker to start with configure=True sets the key's rate; others keep it."""
    await _governor(pg_db, 10, 2)
    gov = await Governor.open(pg_db, KEY, rate=99, burst=9, configure=False)
    assert (await gov.shared_state())["rate"] == 10
    gov = await Governor.open(pg_db, KEY, rate=30, burst=3)
    state = await gov.shared_state()
    assert (state["rate"], state["burst"]) == (30, 3)


async def test_the_window_limit_is_stored_and_in_use_counts_in_flight_rows(
        pg_db: Database) -> None:
    """set_window/window: the limit, and the rows of this key whose analysis may run."""
    gov = await _governor(pg_db, 10, 2)
    assert await gov.window() == (None, 0)
    await gov.set_window(3)
    store = await RunStore.open(pg_db, "r", settings_fingerprint="x", settings_summary="{}")
    await store.load([RowSpec(key=f"k{i}", id=f"k{i}", folder="f", line=i) for i in range(3)])
    rows = await store.claim("w", 3, 60)
    for r in rows[:2]:
        assert await store.mark_submitting(r.lease, generation=1, fingerprint="f", path="/p",
                                           api_key_fp=gov.key_fp)
    assert await gov.window() == (3, 2)
    assert await store.finish(rows[0].lease, outcome="completed", line='{"id":"k0"}')
    assert await gov.window() == (3, 1)


# ---------------------------------------------------------------------- many processes


def _max_in_window(times: list[float], width: float) -> int:
    times = sorted(times)
    return max(bisect.bisect_left(times, t + width) - i for i, t in enumerate(times))


@pytest.mark.parametrize("rate", [20.0, 50.0])
async def test_four_processes_share_the_rate_within_3_percent(pg_dsn: str, rate: float,
                                                              pg_db: Database) -> None:
    """Four processes reserve as fast as they may for 3 s: together they get the burst plus
    the rate within 3 % (measured on the database clock and on this machine's wall clock),
    never more than burst + rate in any second, and each gets a fair share."""
    burst, seconds, procs = 5, 3.0, 4
    await _governor(pg_db, rate, burst)  # configured once; the children join as they find it
    with children([["governor-child", pg_dsn, KEY, str(rate), str(burst), str(seconds)]] * procs,
                  timeout=60) as results:
        per_child = [r["grants"] for r in results]
    ats = sorted(g[0] for grants in per_child for g in grants)
    walls = sorted(g[1] for grants in per_child for g in grants)
    n = len(ats)
    db_rate = (n - burst) / (ats[-1] - ats[0])
    wall_rate = (n - burst) / (walls[-1] - walls[0])
    seen = (f"{n} grants, {db_rate:.2f}/s on the database clock, {wall_rate:.2f}/s wall, "
            f"shares {[len(g) for g in per_child]}, longest gap "
            f"{max(b - a for a, b in itertools.pairwise(ats)):.3f} s")
    assert _max_in_window(ats, 1.0) <= burst + rate, seen  # never above: load-proof
    assert db_rate == pytest.approx(rate, rel=0.03), seen
    assert wall_rate == pytest.approx(rate, rel=0.03), seen
    assert min(len(g) for g in per_child) >= n / procs / 2, seen
    assert sum(r["stats"]["granted"] for r in results) == n


# ---------------------------------------------------------------------- outages


async def test_no_call_is_granted_while_the_database_is_down(pg_cluster: PgCluster,
                                                             pg_db: Database) -> None:
    """The server crashes mid-use: no grant while it is down, grants resume after restart."""
    gov = await _governor(pg_db, 50, 1)
    granted: list[float] = []

    async def caller() -> None:
        while True:
            await gov.acquire(PRIORITY_POLL)
            granted.append(time.monotonic())

    task = asyncio.create_task(caller())
    try:
        await eventually(lambda: len(granted) >= 10, timeout=10, what="grants before")
        await asyncio.to_thread(pg_cluster.stop, "immediate")
        down_from = time.monotonic()
        try:
            retries = pg_db.statistics().retries
            await eventually(lambda: pg_db.statistics().retries >= retries + 4, timeout=20,
                             what="reservations retried while down")
        finally:
            down_to = time.monotonic()
            await asyncio.to_thread(pg_cluster.start)
        during = [t for t in granted if down_from < t < down_to]
        assert during == []
        before = len(granted)
        await eventually(lambda: len(granted) >= before + 10, timeout=30, what="grants after")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert math.isfinite(down_to - down_from) and down_to - down_from > 0
