"""A backfill in virtual time: hours of the real API's pace checked in seconds.

The engine's deciding parts run for real: ``PollPolicy`` / ``PollScheduler`` (when to poll),
``RateLimiter`` (every call takes a token; numeric or ``RateLimiter.auto``), and the
outstanding window (``OutstandingWindow``, fixed or with the adaptive ``WindowController``).
The server is ``EmulatorState``, sans-I/O: per-key slots with FIFO queueing, processing times,
result expiry, a token bucket answering 429 + ``Retry-After``, limits changed mid-run with
``set_limits``. Time is a ``FakeClock`` that jumps to the next deadline whenever every task
waits, so a 20-hour backfill of 10,000 folders takes a minute of CPU. No HTTP and no files: a
call costs ``rtt`` seconds of virtual time, an upload ``upload`` seconds.

The wiring is the one recommended for the engine: a producer feeds ``concurrency`` submitters
(and, like the engine, stops taking folders while the earliest due poll is over 60 s late); a
submitter takes a window unit, uploads, takes a rate token, and hands the 202 to the scheduler
and the window; the poll callback takes a rate token (polls first), asks the server, reports a
202 (``pending``) or the first 200 (``observe``, the scheduler's interval) to the window, and
gives the unit back. A 429 pauses the limiter for ``Retry-After`` and is retried with
full-jitter backoff, as ``client.py`` does.

    python benchmarks/sim_backfill.py                          # real constants, 10,000 folders
    python benchmarks/sim_backfill.py --folders 2000 --windows adaptive 12
    python benchmarks/sim_backfill.py --cap-schedule 20000:5,40000:10   # another job takes slots
    python benchmarks/sim_backfill.py --processing-time 3:12 --poll-min 1 --poll-max 3 \\
        --folders 500                                           # bench_cap's constants

Printed per window setting: results lost to expiry (must be 0), polls per folder, p50/p95
latency (start of the submit to the result, as the output's ``latency_s``) against the mean
processing time L, throughput against cap/L, how busy the key's slots were, 429s, the window's
trajectory. Exit 0 when no result was lost, 3 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bulk_engine.backoff import full_jitter
from bulk_engine.clock import FakeClock
from bulk_engine.emulator.config import EmulatorConfig
from bulk_engine.emulator.state import EmulatorState
from bulk_engine.emulator.upload import Payload, Upload
from bulk_engine.models import Job, Submitted
from bulk_engine.ratelimit import PRIORITY_POLL, PRIORITY_SUBMIT, RateLimiter
from bulk_engine.scheduler import PollDecision, PollPolicy, PollScheduler
from bulk_engine.tuning import OutstandingWindow, RateController, WindowController

# The engine's brake: no new folders while the earliest due poll is this late (engine.py).
MAX_POLL_LATENESS_S = 60.0


# ---- what a simulation runs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """The server, the engine's settings and the workload of one simulated run."""

    folders: int = 10_000
    processing: tuple[float, float] = (30.0, 120.0)
    cap: int = 10
    result_ttl: float = 3600.0
    server_rate: float | None = None  # calls/s per key at the server (None: no limit)
    server_burst: int = 10
    # (time s, {"max_parallel_analyses": n, "rate_limit": r, ...}): set_limits during the run
    limit_changes: tuple[tuple[float, dict[str, Any]], ...] = ()
    engine_rate: float | None = 10.0  # None: RateLimiter.auto (no ceiling)
    engine_burst: int = 10
    idle_tokens: float | None = 2.0  # RateLimiter(idle_tokens=...): no burst after a pause
    concurrency: int = 8
    poll_min: float = 10.0
    poll_max: float = 30.0
    rtt: float = 0.05  # seconds per API call, there and back
    upload: float = 0.2  # seconds to send one folder
    seed: int = 1

    @property
    def mean_processing(self) -> float:
        return (self.processing[0] + self.processing[1]) / 2


BENCH_CAP = Scenario(folders=500, processing=(3.0, 12.0), poll_min=1.0, poll_max=3.0,
                     rtt=0.005, upload=0.01)
"""bench_cap.py's constants (emulator --max-parallel-analyses 10, processing 3-12 s)."""


class Window(Protocol):
    """What the simulated engine needs from its outstanding window (``OutstandingWindow``)."""

    @property
    def limit(self) -> int: ...

    async def acquire(self) -> None: ...

    def submitted(self, key: int) -> None: ...

    def pending(self, key: int) -> None: ...

    def observe(self, key: int, lower: float, upper: float) -> None: ...

    def release(self, key: int | None = None) -> None: ...


WindowFactory = Callable[[FakeClock], Window]


def fixed_window(limit: int) -> WindowFactory:
    """Today's engine: a plain bound of ``limit`` folders submitted and not retrieved."""
    return lambda clock: OutstandingWindow(max_outstanding=limit)


def adaptive_window(max_outstanding: int = 2000, **kw: Any) -> WindowFactory:
    """The adaptive window: a ``WindowController`` under ``max_outstanding``."""
    kw.setdefault("max_limit", max_outstanding)
    return lambda clock: OutstandingWindow(
        clock=clock, max_outstanding=max_outstanding, controller=WindowController(**kw))


@dataclass
class Folder:
    """One simulated row, with what the figures need."""

    index: int
    asked_at: float = math.nan  # the submitter starts on it (the output's submitted_at)
    accepted_at: float = math.nan  # its 202
    done_at: float = math.nan  # its first 200
    run_id: str = ""
    polls: int = 0
    lost: bool = False


@dataclass
class SimResult:
    """What one run produced; ``figures()`` summarises it."""

    scenario: Scenario
    label: str
    folders: list[Folder]
    wall: float
    calls: int
    throttled: int
    trajectory: list[tuple[float, int, int, float]] = field(default_factory=list)
    max_parallel: int = 0
    server_busy: float = 0.0
    cpu_s: float = 0.0

    def figures(self) -> dict[str, Any]:
        """The figures: losses, polls, latency against L, throughput against cap/L, 429s."""
        done = [f for f in self.folders if not f.lost and not math.isnan(f.done_at)]
        lat = sorted(f.done_at - f.asked_at for f in done)
        s = self.scenario
        cap_rate = s.cap / s.mean_processing
        p50, p95 = _quantile(lat, 0.5), _quantile(lat, 0.95)
        windows = sorted(w for _, w, _, _ in self.trajectory)
        return {
            "label": self.label,
            "folders": len(self.folders),
            "completed": len(done),
            "lost_to_expiry": sum(f.lost for f in self.folders),
            "polls_per_folder": round(sum(f.polls for f in done) / max(1, len(done)), 3),
            "latency_p50_s": round(p50, 2),
            "latency_p95_s": round(p95, 2),
            "p50_over_L": round(p50 / s.mean_processing, 3),
            "p95_over_L": round(p95 / s.mean_processing, 3),
            "wall_s": round(self.wall, 1),
            "throughput_per_s": round(len(done) / self.wall, 5) if self.wall else math.nan,
            "throughput_over_cap_rate": round(len(done) / self.wall / cap_rate, 4),
            "server_busy": round(self.server_busy, 4),
            "calls": self.calls,
            "throttled_429": self.throttled,
            "share_429": round(self.throttled / self.calls, 5) if self.calls else 0.0,
            "max_parallel_observed": self.max_parallel,
            "window_p50": _quantile(windows, 0.5),
            "window_min_max": [windows[0], windows[-1]] if windows else None,
            "cpu_s": round(self.cpu_s, 2),
        }


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return float(values[lo] + (values[hi] - values[lo]) * (pos - lo))


# ---- driving virtual time -----------------------------------------------------------------------


async def _settle() -> None:
    """Return once every other task waits (nothing is ready to run in the event loop)."""
    loop = asyncio.get_running_loop()
    ready = getattr(loop, "_ready", None)  # asyncio's run queue: private, benchmark use only
    for _ in range(100_000):
        await asyncio.sleep(0)
        if ready is not None and not ready:
            return
    if ready is not None:  # pragma: no cover - a task that never waits
        raise RuntimeError("the simulation never settles: some task spins without waiting")


async def _run_until(clock: FakeClock, done: Callable[[], bool], tasks: Sequence[asyncio.Task[Any]],
                     *, until: float = math.inf) -> None:
    """Jump the clock from deadline to deadline until ``done()`` (or ``until``)."""
    while not done() and clock.now() < until:
        await _settle()
        for t in tasks:
            if t.done() and not t.cancelled() and (exc := t.exception()) is not None:
                raise exc
        if done():
            break
        deadline = clock.next_deadline
        if deadline is None:
            raise RuntimeError("deadlock: nothing to wait for and work left")
        await clock.advance(max(0.0, min(deadline, until) - clock.now()) + 1e-9)


async def _server_call(sc: Scenario, state: EmulatorState, limiter: RateLimiter,
                       clock: FakeClock, rng: random.Random, priority: int) -> int:
    """One API call with the client's 429 handling; returns how many 429s it met."""
    throttled = 0
    attempt = 0
    while True:
        await limiter.acquire(priority)
        await clock.sleep(sc.rtt / 2)
        wait = state.take_rate_token(0)
        if wait <= 0:
            return throttled
        throttled += 1
        state.count("rate_limited")
        await clock.sleep(sc.rtt / 2)
        limiter.on_throttled()
        limiter.pause_for(max(1, math.ceil(wait - 1e-9)))
        await clock.sleep(full_jitter(attempt, base=0.5, cap=30.0, rng=rng))
        attempt += 1


def _limiter(sc: Scenario, clock: FakeClock) -> RateLimiter:
    if sc.engine_rate is None:
        return RateLimiter.auto(sc.engine_burst, clock=clock, idle_tokens=sc.idle_tokens)
    return RateLimiter(sc.engine_rate, sc.engine_burst, clock=clock, initial_tokens=1.0,
                       idle_tokens=sc.idle_tokens)


class _Backfill:
    def __init__(self, sc: Scenario, window: Window, limiter: RateLimiter, clock: FakeClock,
                 sample_every: float) -> None:
        self.sc = sc
        self.clock = clock
        self.rng = random.Random(sc.seed)
        self.state = EmulatorState(
            EmulatorConfig(processing_time=sc.processing, max_parallel_analyses=sc.cap,
                           rate_limit=sc.server_rate, burst=sc.server_burst,
                           result_ttl=sc.result_ttl, seed=sc.seed),
            clock=clock,
        )
        self.limiter = limiter
        self.window = window
        self.scheduler = PollScheduler(self._poll, PollPolicy(sc.poll_min, sc.poll_max,
                                                              rng=self.rng), clock=clock)
        self.folders = [Folder(i) for i in range(sc.folders)]
        self.by_token: dict[str, Folder] = {}
        self.calls = 0
        self.throttled = 0
        self.finished = 0
        self.in_use = 0
        self.sample_every = sample_every
        self.trajectory: list[tuple[float, int, int, float]] = []

    async def _call(self, priority: int) -> None:
        throttled = await _server_call(self.sc, self.state, self.limiter, self.clock, self.rng,
                                       priority)
        self.throttled += throttled
        self.calls += 1 + throttled

    async def _submit(self, folder: Folder) -> None:
        await self.window.acquire()
        self.in_use += 1
        folder.asked_at = self.clock.now()
        await self.clock.sleep(self.sc.upload)  # small folders are read before the token
        await self._call(PRIORITY_SUBMIT)
        upload = Upload(Payload(asynchronous=True), (), f"{folder.index:064x}")
        folder.run_id = self.state.submit(0, upload, None).run.run_id
        await self.clock.sleep(self.sc.rtt / 2)
        self.limiter.on_success()
        folder.accepted_at = self.clock.now()
        self.window.submitted(folder.index)
        token = f"tok-{folder.index}"
        self.by_token[token] = folder
        job = Job(line=folder.index, id=str(folder.index), folder="", path=Path("."), files=())
        self.scheduler.add(Submitted(job=job, token=token, submitted_at=folder.asked_at,
                                     submitted_mono=folder.accepted_at))

    async def _poll(self, sub: Submitted) -> PollDecision:
        folder = self.by_token[sub.token]
        folder.polls += 1
        await self._call(PRIORITY_POLL)
        status = self.state.run_status(self.state.runs[folder.run_id])
        await self.clock.sleep(self.sc.rtt / 2)
        self.limiter.on_success()
        now = self.clock.now()
        if status in ("queued", "running"):
            self.window.pending(folder.index)
            return PollDecision.AGAIN
        if status == "expired":
            folder.lost = True
            decision = PollDecision.DROP
        else:
            folder.done_at = now
            lower = 0.0
            if sub.last_pending_mono is not None:
                lower = sub.last_pending_mono - sub.submitted_mono
            self.window.observe(folder.index, lower, now - sub.submitted_mono)
            decision = PollDecision.DONE
        self.window.release(folder.index)
        self.in_use -= 1
        self.finished += 1
        return decision

    async def _producer(self, queue: asyncio.Queue[Folder | None]) -> None:
        for folder in self.folders:
            while self.scheduler.lateness() > MAX_POLL_LATENESS_S:
                await self.clock.sleep(1.0)
            await queue.put(folder)
        for _ in range(self.sc.concurrency):
            await queue.put(None)

    async def _submitter(self, queue: asyncio.Queue[Folder | None]) -> None:
        while (folder := await queue.get()) is not None:
            await self._submit(folder)

    async def _sampler(self) -> None:
        while True:
            self.trajectory.append((round(self.clock.now(), 1), self.window.limit, self.in_use,
                                    round(self.limiter.current_rate, 2)))
            await self.clock.sleep(self.sample_every)

    async def _changes(self) -> None:
        for at, change in sorted(self.sc.limit_changes, key=lambda c: c[0]):
            await self.clock.sleep(max(0.0, at - self.clock.now()))
            self.state.set_limits(**change)

    async def run(self) -> float:
        queue: asyncio.Queue[Folder | None] = asyncio.Queue(self.sc.concurrency)
        tasks = [asyncio.create_task(c) for c in (
            self.scheduler.run(), self._producer(queue), self._sampler(), self._changes(),
            *(self._submitter(queue) for _ in range(self.sc.concurrency)))]
        try:
            await _run_until(self.clock, lambda: self.finished == len(self.folders), tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return max(f.done_at for f in self.folders if not math.isnan(f.done_at))


def _server_busy(state: EmulatorState, sc: Scenario, wall: float) -> float:
    """Our analyses' slot-seconds over the slot-seconds the cap allowed (changes included)."""
    busy = sum(min(r.finished_at, wall) - min(r.started_at, wall) for r in state.runs.values())
    changes = sorted((at, c["max_parallel_analyses"]) for at, c in sc.limit_changes
                     if "max_parallel_analyses" in c)
    allowed, t, cap = 0.0, 0.0, sc.cap
    for at, new in changes:
        if at >= wall:
            break
        allowed += cap * (at - t)
        t, cap = at, new
    allowed += cap * (wall - t)
    return busy / allowed if allowed else math.nan


def simulate(sc: Scenario, make_window: WindowFactory, *, label: str = "",
             sample_every: float | None = None) -> SimResult:
    """Run one backfill to the end: every folder is completed, or lost to expiry."""
    clock = FakeClock()
    window = make_window(clock)
    sim = _Backfill(sc, window, _limiter(sc, clock), clock,
                    sample_every or max(1.0, sc.mean_processing / 2))
    cpu0 = time.process_time()
    wall = asyncio.run(sim.run())
    return SimResult(
        scenario=sc, label=label, folders=sim.folders, wall=wall, calls=sim.calls,
        throttled=sim.throttled, trajectory=sim.trajectory,
        max_parallel=sim.state.stats()["max_parallel_observed"],
        server_busy=_server_busy(sim.state, sc, wall), cpu_s=time.process_time() - cpu0,
    )


# ---- the rate alone -----------------------------------------------------------------------------


@dataclass
class RateRun:
    """A rate-bound run: callers that always have a call to make, against a key's bucket."""

    successes: int
    throttled: int
    duration: float
    trajectory: list[tuple[float, float]]

    @property
    def share_429(self) -> float:
        return self.throttled / max(1, self.successes + self.throttled)


def simulate_rate(server_rate: float, *, duration: float = 120.0, auto: bool = True,
                  ceiling: float | None = None, burst: int = 10, callers: int = 8,
                  rtt: float = 0.02, changes: tuple[tuple[float, float], ...] = (),
                  controller: RateController | None = None, seed: int = 1) -> RateRun:
    """``callers`` tasks call without pause through one limiter (auto, or numeric at
    ``server_rate``: the hand-tuned reference) against an ``EmulatorState`` bucket of
    ``server_rate``/``burst``; ``changes`` are ``(time, new server rate)``."""
    clock = FakeClock()
    rng = random.Random(seed)
    state = EmulatorState(EmulatorConfig(rate_limit=server_rate, burst=burst, seed=seed),
                          clock=clock)
    sc = Scenario(rtt=rtt)
    if auto:
        limiter = RateLimiter.auto(10, clock=clock, ceiling=ceiling, controller=controller)
    else:
        limiter = RateLimiter(server_rate, 10, clock=clock, initial_tokens=1.0, idle_tokens=2)
    counts = {"ok": 0, "429": 0}
    trajectory: list[tuple[float, float]] = []

    async def caller() -> None:
        while True:
            throttled = await _server_call(sc, state, limiter, clock, rng, PRIORITY_SUBMIT)
            counts["429"] += throttled  # (not `+= await`: that reads the count before waiting)
            await clock.sleep(rtt / 2)
            counts["ok"] += 1
            limiter.on_success()

    async def change() -> None:
        for at, rate in changes:
            await clock.sleep(max(0.0, at - clock.now()))
            state.set_limits(rate_limit=rate)

    async def sample() -> None:
        while True:
            trajectory.append((round(clock.now(), 1), round(limiter.current_rate, 2)))
            await clock.sleep(5.0)

    async def main() -> None:
        tasks = [asyncio.create_task(c) for c in (
            change(), sample(), *(caller() for _ in range(callers)))]
        try:
            await _run_until(clock, lambda: False, tasks, until=duration)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    return RateRun(counts["ok"], counts["429"], duration, trajectory)


# ---- command line -------------------------------------------------------------------------------


def _window_factory(spec: str, max_outstanding: int) -> WindowFactory:
    if spec == "adaptive":
        return adaptive_window(max_outstanding)
    return fixed_window(int(spec))


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _trajectory(r: SimResult, points: int = 24) -> str:
    """The window's limit (and units in use) at evenly spaced times, in minutes."""
    traj = r.trajectory
    step = max(1, len(traj) // points)
    return ", ".join(f"{t / 60:.0f}m:{w}({u})" for t, w, u, _ in traj[::step])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folders", type=int, default=10_000)
    p.add_argument("--processing-time", default="30:120", metavar="MIN:MAX")
    p.add_argument("--poll-min", type=float, default=10.0)
    p.add_argument("--poll-max", type=float, default=30.0)
    p.add_argument("--cap", type=int, default=10, help="the key's parallel analyses (10)")
    p.add_argument("--result-ttl", type=float, default=3600.0)
    p.add_argument("--rate-limit", default="10", help="the engine's: calls/s, or 'auto' (10)")
    p.add_argument("--server-rate", type=float, default=None, help="the key's (default: none)")
    p.add_argument("--cap-schedule", default="", metavar="T:CAP,...",
                   help="cap changes at virtual seconds, e.g. 20000:5,40000:10")
    p.add_argument("--max-outstanding", type=int, default=2000,
                   help="bound of the adaptive window (2000)")
    p.add_argument("--windows", nargs="+", default=["2000", "12", "adaptive"],
                   help="window settings to compare: a number (fixed) or 'adaptive'")
    p.add_argument("--rtt", type=float, default=0.05)
    p.add_argument("--upload", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the figures as JSON to this path")
    ns = p.parse_args(argv)
    lo, hi = (float(x) for x in ns.processing_time.split(":"))
    changes = tuple((float(t), {"max_parallel_analyses": int(c)})
                    for t, c in (item.split(":") for item in ns.cap_schedule.split(",") if item))
    sc = Scenario(folders=ns.folders, processing=(lo, hi), poll_min=ns.poll_min,
                  poll_max=ns.poll_max, cap=ns.cap, result_ttl=ns.result_ttl,
                  engine_rate=None if ns.rate_limit == "auto" else float(ns.rate_limit),
                  server_rate=ns.server_rate, limit_changes=changes, rtt=ns.rtt,
                  upload=ns.upload, seed=ns.seed)
    print(f"simulation (virtual time) on Python {platform.python_version()}: "
          f"{sc.folders} folders, processing {lo:g}-{hi:g} s (L = {sc.mean_processing:g} s), "
          f"cap {sc.cap}{' then ' + ns.cap_schedule if changes else ''}, polls "
          f"{sc.poll_min:g}-{sc.poll_max:g} s, result TTL {sc.result_ttl:g} s, engine rate "
          f"{ns.rate_limit}, server rate {ns.server_rate or 'none'}, seed {sc.seed}")
    results = []
    for spec in ns.windows:
        r = simulate(sc, _window_factory(spec, ns.max_outstanding),
                     label=f"adaptive (<= {ns.max_outstanding})" if spec == "adaptive"
                     else f"fixed {spec}")
        results.append(r)
        print(f"  {r.label}: {r.cpu_s:.1f} s of CPU for {r.wall / 3600:.2f} h of backfill",
              flush=True)
    print()
    rows = []
    for r in results:
        f = r.figures()
        rows.append([f["label"], f["lost_to_expiry"], f["polls_per_folder"],
                     f"{f['latency_p50_s']:.0f} ({f['p50_over_L']:.2f} L)",
                     f"{f['latency_p95_s']:.0f} ({f['p95_over_L']:.2f} L)",
                     f"{f['throughput_over_cap_rate']:.3f}", f"{f['server_busy']:.3f}",
                     f["throttled_429"], f"{r.wall / 3600:.2f}",
                     f"{f['window_p50']:g} [{f['window_min_max'][0]}..{f['window_min_max'][1]}]"])
    print(_md_table(["window", "lost to expiry", "polls/folder", "p50 latency s",
                     "p95 latency s", "throughput / (cap/L)", "slots busy", "429s",
                     "wall h", "window p50 [min..max]"], rows))
    for r in results:
        if r.label.startswith("adaptive"):
            print(f"\nwindow trajectory, {r.label} — minute:limit(in use): {_trajectory(r)}")
    lost = sum(r.figures()["lost_to_expiry"] for r in results)
    print(f"\nresults lost to expiry: {lost} (must be 0) -> {'met' if lost == 0 else 'MISSED'}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(
            {"scenario": asdict(sc), "argv": sys.argv,
             "results": [{**r.figures(), "trajectory_t_limit_inuse_rate": r.trajectory}
                         for r in results]}, indent=1) + "\n", encoding="utf-8")
        print(f"saved {ns.json}")
    return 0 if lost == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
