"""One worker of a backfill shared by many machines through PostgreSQL: the engine with ``--db``.

Where it sits: ``runner.run_engine`` (so the CLI) runs a :class:`PgWorker` instead of an
``Engine`` when ``--db`` is given. It is an Engine whose run creates other stages::

    manifest ─load_manifest─▶ the run in PostgreSQL ◀─claims, fenced transitions, finish─┐
                                                                                          │
    per API key (a lane): ClaimProducer ─▶ Submitters ─▶ PollScheduler ⇄ Poller ──────────┤
                          CaseClient ─▶ GuardedLimiter ─▶ Governor (the key's shared rate)│
    every lane:           Finisher ─▶ DatabaseSink (done + its line, one fenced UPDATE) ──┘
    the worker:           LeaseKeeper (renewals), LeaseGuard, the run's progress

The shared stages (``Submitter``, ``Poller``, ``Finisher``, ``PollScheduler``, ``CaseClient``)
are the single-machine ones; what differs is the journal (``PgBackend``: transitions fenced by
leases, ``RowLost`` when a row is another worker's now), the producer (claims instead of the
manifest), the sink (the database instead of a file) and the limiter (the key's ``Governor``
behind the lease guard instead of the local ``RateLimiter``). Each key has its own lane: a row
is pinned to the key that submitted it (its token works only with that key).

Task layout, as the Engine's: the sink in the outer group; the lanes' pipelines (and the
manifest's loading) in an inner cancel scope that an interrupt or a fatal error cancels; lease
renewals, the governors' feedback and the progress watch in a group around both, cancelled last,
so that the sink's last writes still have live leases. On the way out the worker gives back its
leases (others take its rows at once, live tokens included) and records that it stopped.

Exit code: the run's, not this worker's: 0 when every row of the run completed, 2 when some
failed, 1 on a fatal error, 130/143 when interrupted (the rows it held go back to the others).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import time
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import TypeVar

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from bulk_engine.backend import RowLost
from bulk_engine.client import CaseClient, ClientStats, key_fingerprint
from bulk_engine.clock import Clock
from bulk_engine.config import Settings
from bulk_engine.engine import MAX_CONCURRENT_POLLS, Engine, RunResult, RunStatistics
from bulk_engine.errors import AuthError, BulkEngineError, ConfigError, first_error
from bulk_engine.finisher import Finisher, FinisherStatistics
from bulk_engine.logs import add_secret, get_logger
from bulk_engine.manifest import check_manifest
from bulk_engine.models import Outcome, Submitted, Ticket
from bulk_engine.pg.backend import PgBackend
from bulk_engine.pg.connect import Database, DatabaseStatistics, parse_dsn, redact_dsn
from bulk_engine.pg.governor import Governor
from bulk_engine.pg.guard import GuardedLimiter, LeaseGuard
from bulk_engine.pg.producer import ClaimProducer, LaneWindow, load_manifest
from bulk_engine.pg.rows import (
    LeaseKeeper,
    RunCounts,
    RunStore,
    WorkerInfo,
    default_run_name,
    run_identity,
)
from bulk_engine.pg.sink import DatabaseSink
from bulk_engine.policy import MassFailureWindow
from bulk_engine.poller import Poller
from bulk_engine.producer import ProducerStatistics
from bulk_engine.scheduler import PollDecision, PollPolicy, PollScheduler
from bulk_engine.startup import retry_kinds
from bulk_engine.stats import LiveCounters, WorkerShare
from bulk_engine.submitter import Submitter, SubmitterStatistics

__all__ = ["PgRunStatistics", "PgWorker", "RunProgress"]

log = get_logger()

_D = TypeVar("_D")


@dataclass(frozen=True, slots=True)
class RunProgress:
    """The whole run as the database shows it: rows per state and outcome, every worker."""

    counts: RunCounts
    workers: tuple[WorkerInfo, ...]
    worker: str  # this one's id
    lease_s: float

    def shares(self) -> tuple[WorkerShare, ...]:
        return tuple(
            WorkerShare(name=f"{w.host}:{w.pid}", done=w.done, held=sum(w.held.values()),
                        alive=not w.stopped and w.heartbeat_age_s < self.lease_s,
                        this=w.id == self.worker)
            for w in self.workers)


@dataclass(frozen=True, slots=True)
class PgRunStatistics(RunStatistics):
    """``RunStatistics`` of a worker, with the run's progress and the worker's ``--db`` figures."""

    run: RunProgress | None = None
    rows_lost: int = 0  # rows another worker took over from this one (no line from here)
    lease_lapses: int = 0  # renewals that came after the leases may have run out
    stale_slots: int = 0  # rate slots dropped because the process was paused past them
    db: DatabaseStatistics | None = None

    def counters(self) -> LiveCounters:
        c = RunStatistics.counters(self)
        if self.run is None:
            return c
        counts = self.run.counts
        return dataclasses.replace(c, run_done=counts.done, run_total=counts.total,
                                   workers=self.run.shares())

    def summary_extras(self) -> dict[str, float | int]:
        extras = RunStatistics.summary_extras(self)
        extras.update(rows_lost=self.rows_lost, lease_lapses=self.lease_lapses,
                      stale_rate_slots=self.stale_slots)
        if self.db is not None:
            extras.update(db_operations=self.db.operations, db_outages=self.db.outages,
                          db_unavailable_s=round(self.db.unavailable_seconds, 1))
        return extras


def _summed(cls: Callable[..., _D], items: Iterable[object]) -> _D:
    """One statistics dataclass whose every field is the sum of ``items``' fields (numbers,
    or Counters), over at least one item."""
    rows = list(items)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: functools.reduce(operator.add, (getattr(r, n) for r in rows))
                  for n in names})


@dataclass(eq=False)
class _Lane:
    """One API key's stages in this worker."""

    governor: Governor
    client: CaseClient
    window: LaneWindow
    finisher: Finisher
    scheduler: PollScheduler
    submitter: Submitter
    poller: Poller
    producer: ClaimProducer

    async def pipeline(self, concurrency: int) -> None:
        """Claims → submitters → scheduler, until the run is finished (Engine._pipeline's
        layout, with the claim-driven producer and no resume step: claims bring the tokens)."""
        job_send, job_recv = anyio.create_memory_object_stream[Ticket](concurrency)
        clones = [job_recv.clone() for _ in range(concurrency)]
        job_recv.close()
        try:
            async with anyio.create_task_group() as tg:
                self.poller.start(self.scheduler, tg)
                tg.start_soon(self.scheduler.run)
                async with anyio.create_task_group() as feeders:
                    feeders.start_soon(self.producer.run, job_send)
                    for clone in clones:
                        feeders.start_soon(self.submitter.worker, clone)
                self.scheduler.close()
        finally:
            job_send.close()
            for clone in clones:
                clone.close()


@dataclass(eq=False)
class _Parts:
    """What a started worker is made of (for its statistics)."""

    db: Database
    store: RunStore
    worker: str
    keeper: LeaseKeeper
    guard: LeaseGuard
    sink: DatabaseSink
    lanes: list[_Lane]


class PgWorker(Engine):
    """One worker of a run shared through PostgreSQL: ``await PgWorker(settings, manifest).run()``
    with ``settings.db`` set. Every worker given the same manifest and settings joins the run."""

    def __init__(self, settings: Settings, manifest: Path | None, *,
                 clock: Clock | None = None, rng: Random | None = None) -> None:
        if settings.db is None:
            raise ConfigError("a PgWorker needs settings.db (--db postgresql://...)")
        if manifest is None:
            raise ConfigError("--db needs a manifest CSV (every worker is given the same one): "
                              "--root is not supported with --db; list the folders in a manifest")
        if settings.rate_limit is None:
            raise ConfigError("--db needs --rate-limit R, each key's calls per second: the "
                              "shared governor holds every worker to it ('auto' finds the rate "
                              "of one process only)")
        super().__init__(settings, manifest, clock=clock, rng=rng)
        self._parts: _Parts | None = None
        self._progress: RunProgress | None = None

    # ---- figures --------------------------------------------------------------------------

    def statistics(self) -> RunStatistics:
        """This worker's stages summed over its keys, with the run's progress."""
        parts = self._parts
        if parts is None:
            return Engine.statistics(self)
        lanes = parts.lanes
        return PgRunStatistics(
            producer=_summed(ProducerStatistics, (x.producer.statistics() for x in lanes)),
            submitter=_summed(SubmitterStatistics, (x.submitter.statistics() for x in lanes)),
            finisher=_summed(FinisherStatistics, (x.finisher.statistics() for x in lanes)),
            processing=sum(x.scheduler.pending for x in lanes),
            client=_summed(ClientStats, (x.client.stats for x in lanes)),
            health=self.health.statistics(),
            current_rate=sum(x.governor.current_rate for x in lanes),
            rows_redone=0,
            resubmits=sum(x.poller.resubmits for x in lanes),
            run=self._progress,
            rows_lost=sum(x.finisher.dropped for x in lanes) + parts.sink.statistics().refused,
            lease_lapses=parts.keeper.lapses,
            stale_slots=parts.guard.stale_grants,
            db=parts.db.statistics(),
            # The window this worker learned (one key; with several, each key has its own).
            window=lanes[0].window.statistics() if len(lanes) == 1 else None,
        )

    # ---- the run --------------------------------------------------------------------------

    async def run(self) -> RunResult:
        s = self.settings
        assert s.db is not None and self.manifest is not None
        check_manifest(self.manifest)
        keys = s.api_keys
        _, password = parse_dsn(s.db)
        for secret in (password, *keys):
            add_secret(secret)
        db = await Database.connect(s.db, wait_s=s.connect_timeout, max_size=4 + 3 * len(keys))
        try:
            await self._run_on(db, keys)
        finally:
            await db.close()
        return self._result()

    async def _run_on(self, db: Database, keys: tuple[str, ...]) -> None:
        s = self.settings
        assert s.db is not None and self.manifest is not None and s.rate_limit is not None
        summary, fingerprint = run_identity(s, manifest=self.manifest)
        name = s.run or default_run_name(fingerprint)
        store = await RunStore.open(db, name, settings_fingerprint=fingerprint,
                                    settings_summary=summary)
        worker = await store.register_worker()
        if s.retry_failed:  # their lines leave the run at once: a row has one line at most
            kinds = retry_kinds(s)  # --retry-failed KINDS: those (and the transport ones)
            log.info("retry_failed", rows=await store.reset_failed(kinds=kinds),
                     kinds="all" if kinds is None else ",".join(sorted(kinds)))
        keeper = LeaseKeeper(store, worker, lease_s=s.lease, clock=self.clock)
        governors = [await Governor.open(db, key, rate=s.rate_limit, burst=s.burst,
                                         clock=self.clock) for key in keys]
        backend = PgBackend(store, keeper, min_lease_s=s.lease / 4,
                            key_fps={key_fingerprint(k): db.key_fingerprint(k) for k in keys})
        guard = LeaseGuard(store, keeper, backend, clock=self.clock)
        sink = DatabaseSink(backend, on_durable=self._on_durable)
        self.summary.extra.update(run=name, worker=worker)
        log.info("worker_started", run=name, worker=worker, keys=len(keys), lease_s=s.lease,
                 db=redact_dsn(s.db), loaded=store.run.loaded)
        out_send, out_recv = anyio.create_memory_object_stream[Outcome](
            (s.concurrency * 4 + 64) * len(keys))
        mass_failure = MassFailureWindow(s.failure_window, s.max_failure_rate)
        async with AsyncExitStack() as stack:
            lanes = []
            for key, governor in zip(keys, governors, strict=True):
                client = await stack.enter_async_context(CaseClient(
                    s.replace(api_key=key), limiter=GuardedLimiter(governor, guard),
                    clock=self.clock, rng=self.rng, health=self.health,
                    max_connections=s.concurrency + MAX_CONCURRENT_POLLS + 4))
                lanes.append(self._lane(key, governor, client, store, keeper, backend, guard,
                                        out_send, mass_failure))
            self._parts = _Parts(db, store, worker, keeper, guard, sink, lanes)
            async with anyio.create_task_group() as background:
                background.start_soon(keeper.run)
                for governor in governors:
                    background.start_soon(governor.run)
                background.start_soon(self._watch, store, worker)
                try:
                    async with anyio.create_task_group() as outer:
                        outer.start_soon(sink.run, out_recv)
                        async with out_send:
                            await self._pipelines(store, lanes)
                finally:
                    await self._leave(store, worker)
                    background.cancel_scope.cancel()

    def _lane(self, key: str, governor: Governor, client: CaseClient, store: RunStore,
              keeper: LeaseKeeper, backend: PgBackend, guard: LeaseGuard,
              outcomes: MemoryObjectSendStream[Outcome],
              mass_failure: MassFailureWindow) -> _Lane:
        """One key's stages: the single-machine ones, fed by claims, fenced by leases."""
        s = self.settings
        assert self.manifest is not None
        window = LaneWindow(s.max_outstanding, controller=self._window_controller(),
                            clock=self.clock)
        finisher = Finisher(outcomes, outstanding=window, mass_failure=mass_failure)

        async def poll(sub: Submitted) -> PollDecision:
            # A row whose lease was lost is not polled (and not if it is lost while its poll
            # waits for a rate slot: the guard checks the row named here when granted).
            key = sub.job.key
            try:
                if not backend.holds(key):
                    raise RowLost(key)
                with guard.polling(key):
                    return await poller.poll(sub)
            except RowLost:
                backend.end(key)
                finisher.drop(key)
                return PollDecision.DROP

        scheduler = PollScheduler(poll, PollPolicy(s.poll_min, s.poll_max, rng=self.rng),
                                  clock=self.clock, max_concurrent_polls=MAX_CONCURRENT_POLLS)
        submitter = Submitter(s.replace(api_key=key), client=client, backend=backend,
                              scheduler=scheduler, finisher=finisher,
                              key_fp=key_fingerprint(key), clock=self.clock, window=window,
                              gate=self.gate)
        poller = Poller(s, client=client, backend=backend, finisher=finisher,
                        submitter=submitter, clock=self.clock)
        db_key_fp = governor.key_fp
        producer = ClaimProducer(s, self.manifest, store=store, keeper=keeper, backend=backend,
                                 governor=governor, db_key_fp=db_key_fp, window=window,
                                 finisher=finisher, scheduler=scheduler, submitter=submitter,
                                 clock=self.clock)
        return _Lane(governor, client, window, finisher, scheduler, submitter, poller, producer)

    async def _pipelines(self, store: RunStore, lanes: list[_Lane]) -> None:
        """The manifest's loading and every lane, in the cancel scope an interrupt cancels."""
        s = self.settings
        assert self.manifest is not None
        with anyio.CancelScope() as scope:
            self._cancel_scope = scope
            if self._interrupted:
                scope.cancel()
            try:
                async with anyio.create_task_group() as tg:
                    if not store.run.loaded:
                        tg.start_soon(load_manifest, store, s, self.manifest)
                    for lane in lanes:
                        tg.start_soon(lane.pipeline, s.concurrency)
            except BaseException as exc:
                self._fatal = first_error(exc, (BulkEngineError,))
                if self._fatal is None:
                    raise
            finally:
                for lane in lanes:
                    await lane.submitter.forget_unsent(
                        refused=isinstance(self._fatal, AuthError))

    async def _leave(self, store: RunStore, worker: str) -> None:
        """Give the leases back (others take the rows at once) and read the run's totals;
        shielded, and bounded: a database that stays away leaves the leases to run out."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            released = await store.release(worker)
            counts = await store.counts()
            self._final_counts = {**counts.by_state, **counts.by_outcome}
            self.summary.extra.update(run_rows=counts.total, run_done=counts.done)
            log.info("worker_stopped", worker=worker, leases_released=released,
                     run_done=counts.done, run_total=counts.total)

    async def _watch(self, store: RunStore, worker: str) -> None:
        """Refresh the run's progress for the panel and the status line."""
        period = min(max(2.0, self.settings.status_interval / 2), 10.0)
        while True:
            started = time.monotonic()
            counts = await store.counts()
            workers = tuple(await store.workers())
            self._progress = RunProgress(counts, workers, worker, self.settings.lease)
            # The counts read every row of the run: never more than a tenth of the time.
            await self.clock.sleep(max(period, 10 * (time.monotonic() - started)))
