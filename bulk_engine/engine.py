"""The engine: wires the stages of one run together. Decisions live in the stages and in
``policy.py``; this module only creates the run's objects (in :meth:`Engine._stages`) and starts
their tasks. See ``docs/architecture.md`` for the pipeline, the invariants and where each
decision lives.

    manifest ─▶ Producer ─▶ [bounded stream] ─▶ N × Submitter ─▶ PollScheduler ⇄ Poller
                   │                                  │                  │
                   └─ bad rows ───────────────────────┴─▶ Finisher ◀─────┘
                                                            │
                                                 [stream] ──▶ ResultWriter ─▶ results.jsonl
                one RateLimiter (auto: it finds the key's rate) and one ApiHealth for every
                API call (CaseClient); one OutstandingWindow (adaptive: it finds the API's
                parallel capacity) between the producer and the API
                Journal (SQLite): submitting / submitted+token / done, for crash-safe resume
                S3Access: the S3 client of s3:// folders, opened when a row first needs it

Task layout (one task group per run, no loose tasks): the writer runs in the outer group; the
producer, the submitters and the scheduler run in an inner cancel scope. An interrupt or a fatal
error cancels the inner scope only, then the writer drains what was already decided and
commits it, so nothing decided is lost and nothing is written twice.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from bulk_engine.backend import SqliteBackend
from bulk_engine.client import CaseClient, ClientStats, key_fingerprint
from bulk_engine.clock import Clock, MonotonicClock
from bulk_engine.config import Settings
from bulk_engine.control import (
    ControlStatistics,
    SubmitGate,
    changed_settings,
    retune_limiter,
    tunable_values,
)
from bulk_engine.errors import AuthError, BulkEngineError, ConfigError, first_error
from bulk_engine.finisher import Finisher, FinisherStatistics
from bulk_engine.health import ApiHealth, HealthStatistics
from bulk_engine.journal import Journal, settings_fingerprint, settings_summary
from bulk_engine.learned import LearnedLimits
from bulk_engine.logs import get_logger
from bulk_engine.manifest import ProducerStats, check_manifest
from bulk_engine.models import Outcome, Ticket
from bulk_engine.policy import MassFailureWindow
from bulk_engine.poller import Poller
from bulk_engine.producer import Producer, ProducerStatistics
from bulk_engine.ratelimit import RateLimiter, RateLimiterStatistics
from bulk_engine.s3.access import S3Access, bind_store
from bulk_engine.s3.url import S3Url
from bulk_engine.scheduler import PollPolicy, PollScheduler
from bulk_engine.startup import StartupReport, prepare_output
from bulk_engine.stats import LiveCounters, Summary
from bulk_engine.stuck import StuckStatistics, StuckWatch
from bulk_engine.submitter import Submitter, SubmitterStatistics
from bulk_engine.tuning import (
    OutstandingWindow,
    RateController,
    TuningSnapshot,
    WindowController,
    WindowStatistics,
)
from bulk_engine.vocab import ExitCode, Status
from bulk_engine.writer import OutputLock, ReconcileReport, ResultWriter

if TYPE_CHECKING:
    from bulk_engine.s3.source import S3Stats

__all__ = [
    "MAX_CONCURRENT_POLLS",
    "MIN_ADAPTIVE_WINDOW",
    "Engine",
    "RunResult",
    "RunStatistics",
]

log = get_logger()

# Concurrent polls at most; the connection pool holds them and the uploads.
MAX_CONCURRENT_POLLS = 64
# Below this --max-outstanding the window stays fixed (the controller learns from a warm-up of
# at least 4 folders at once).
MIN_ADAPTIVE_WINDOW = 4


@dataclass(frozen=True, slots=True)
class RunStatistics:
    """Every stage's ``statistics()`` at one moment: what the panel, the ``status`` event, the
    summary and the benchmarks read."""

    producer: ProducerStatistics
    submitter: SubmitterStatistics
    finisher: FinisherStatistics
    processing: int  # tokens the scheduler holds: submitted, result not yet retrieved
    client: ClientStats
    health: HealthStatistics
    current_rate: float  # the limiter's rate now (below the configured one after 429s)
    rows_redone: int  # rows done in the journal whose line was gone from the output
    resubmits: int  # rows resubmitted after a dead token (404/401)
    poll_lateness_s: float = 0.0  # how late the earliest due poll is (rate saturated)
    control: ControlStatistics = field(default_factory=ControlStatistics)  # pause, drain, tunables
    stuck: StuckStatistics = field(default_factory=StuckStatistics)  # and the oldest token
    s3: S3Stats | None = None  # the S3 source's counters, when a row needed a bucket
    window: WindowStatistics | None = None  # the outstanding window (None before the run)
    limiter: RateLimiterStatistics | None = None  # the rate: fixed or auto, what it learned

    def tuning(self) -> dict[str, Any]:
        """What the self-tuning found: the window and the rate (the summary's ``window`` and
        ``rate``, the panel's lines)."""
        out: dict[str, Any] = {}
        if self.window is not None:
            w = self.window
            out["window"] = {
                "limit": w.limit, "max": w.max_outstanding, "phase": w.phase,
                "in_use": w.in_use, "queue_estimate": round(w.queue_estimate, 2),
                "baseline_s": w.baseline_s, "observations": w.observations}
        if self.limiter is not None:
            r = self.limiter
            out["rate"] = {
                "mode": r.mode, "calls_per_s": round(r.rate, 2), "ceiling": r.ceiling,
                "phase": r.phase, "limit_estimate":
                    None if r.limit_estimate is None else round(r.limit_estimate, 2)}
        return out

    def counters(self) -> LiveCounters:
        """The figures of the live panel."""
        p = self.producer
        return LiveCounters(
            rows_read=p.rows_read, rows_skipped_done=p.rows_skipped_done,
            rows_resumed=p.rows_resumed, submitted=self.submitter.submitted,
            processing=self.processing, completed=self.finisher.completed,
            failed=self.finisher.failed, bytes_uploaded=self.client.bytes_uploaded,
            stuck=self.stuck.reported)

    def summary_extras(self) -> dict[str, float | int]:
        """The live run's part of the end-of-run summary (an output file cannot tell these)."""
        p, c = self.producer, self.client
        return {
            "rows_read": p.rows_read, "rows_rejected": p.rows_rejected,
            "rows_skipped_done": p.rows_skipped_done, "rows_resumed": p.rows_resumed,
            "rows_redone": self.rows_redone, "rows_dropped": p.rows_dropped,
            "resubmits": self.resubmits, "api_calls": c.calls, "submits": c.submits,
            "polls": c.polls, "throttled_429": c.throttled, "unavailable_503": c.unavailable,
            "retries": c.retries, "ambiguous_submits": c.ambiguous_submits,
            "bytes_uploaded": c.bytes_uploaded, "final_rate_limit": round(self.current_rate, 3),
            "stuck_analyses": self.stuck.reported, "rows_withdrawn": self.finisher.withdrawn,
            **({f"s3_{k}": v for k, v in dataclasses.asdict(self.s3).items()}
               if self.s3 is not None else {}),
            **self.tuning(),
        }


@dataclass
class RunResult:
    """What a run returns: its exit code, the summary, and a fatal error if any."""

    exit_code: int
    summary: Summary
    error: BaseException | None = None
    interrupted: bool = False
    counters: LiveCounters = field(default_factory=LiveCounters)


@dataclass(eq=False)
class _Stages:
    """The run's objects, created together in :meth:`Engine._stages`."""

    backend: SqliteBackend
    client: CaseClient
    scheduler: PollScheduler
    finisher: Finisher
    submitter: Submitter
    poller: Poller
    producer: Producer
    writer: ResultWriter
    outcomes: MemoryObjectReceiveStream[Outcome]
    outstanding: OutstandingWindow
    mass_failure: MassFailureWindow
    stuck: StuckWatch


class Engine:
    """One run of the backfill: ``await Engine(settings, manifest).run()``."""

    def __init__(self, settings: Settings, manifest: Path | None, *,
                 clock: Clock | None = None, rng: random.Random | None = None) -> None:
        if manifest is None and settings.root is None:
            raise ConfigError("give a manifest CSV, or --root DIR to walk a folder tree")
        if not settings.api_key and not settings.dry_run:
            raise ConfigError(
                "no API key: set BULK_ENGINE_API_KEY (or api_key in --config, or --api-key)")
        if settings.db is not None and type(self) is Engine:
            # --db: this process is one worker of a shared run (the runner picks PgWorker).
            raise ConfigError("settings.db is set: run bulk_engine.pg.worker.PgWorker (what "
                              "the command line runs with --db), not Engine")
        self.settings = settings
        self.manifest = manifest
        self.clock = clock or MonotonicClock()
        self.rng = rng or random.Random(settings.seed)
        self.summary = Summary()
        self.limiter = self._new_limiter(settings)
        self._learned: TuningSnapshot | None = None  # loaded at the start of run()
        self.health = ApiHealth(self.clock, outage_after=settings.outage_after)
        self.client: CaseClient | None = None
        self.s3: S3Access | None = None  # the run's S3 access (buckets), while it runs
        self.producer_stats = ProducerStats()  # replaced by the producer's when the run starts
        self._stages_: _Stages | None = None
        self._startup = StartupReport(ReconcileReport(), 0)
        self._cancel_scope: anyio.CancelScope | None = None
        self._interrupted = False
        self._fatal: BaseException | None = None
        self._final_counts: dict[str, int] = {}
        # Control without restart (control.py): the gate of new submissions, and how to start
        # one more submitter when concurrency is raised (set while the submitters run).
        self.gate = SubmitGate()
        self.started_at = time.time()
        self._add_submitter: Callable[[], bool] | None = None
        self._submitters = 0
        self._settings_applied = 0
        self._settings_refused = 0

    # ---- control and figures ----------------------------------------------------------------

    def interrupt(self) -> None:
        """Stop taking rows, cancel in-flight work, persist what was decided (Ctrl-C, SIGTERM)."""
        self._interrupted = True
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    # ---- control without restart (control.py; README "Long runs: metrics and control") --------

    def pause(self) -> bool:
        """No new upload starts until :meth:`resume`; polls go on. True if this changed it."""
        changed = self.gate.pause()
        if changed:
            log.warning("paused", hint="no new upload starts; polls go on (resume to go on)")
        return changed

    def resume(self) -> bool:
        """New uploads start again after :meth:`pause`. True if the run was paused."""
        changed = self.gate.resume()
        if changed:
            log.info("resumed")
        return changed

    def drain(self) -> bool:
        """Stop sending new folders for good, finish every accepted token (lines written),
        then end as usual. True the first time."""
        changed = self.gate.drain()
        if changed:
            log.warning("draining", outstanding=self.statistics().processing,
                        hint="no new folder is sent; every accepted one is retrieved, then "
                             "the run ends (rerun the same command to go on)")
        return changed

    def apply_settings(self, values: Mapping[str, Any], *,
                       source: str = "apply_settings") -> dict[str, list[Any]]:
        """New values for tunables (``control.TUNABLES``), validated through ``Settings`` as a
        whole, then applied live; returns ``{name: [old, new]}`` of what changed. A bad value
        raises ConfigError and changes nothing."""
        try:
            new = changed_settings(self.settings, values, source=source)
        except ConfigError as exc:
            self.refuse_settings(str(exc), source=source)
            raise
        old = self.settings
        changes = {k: [v, getattr(new, k)] for k, v in tunable_values(old).items()
                   if getattr(new, k) != v}
        self.settings = new
        self._settings_applied += 1
        if changes:
            self._apply_live(new)
        log.info("settings_applied", source=source, changes=changes or None)
        return changes

    def refuse_settings(self, error: str, *, source: str) -> None:
        """A change of settings was refused (bad value, bad file): logged and counted; the old
        values stay."""
        self._settings_refused += 1
        log.error("config_reload_failed" if source == "SIGHUP" else "settings_refused",
                  source=source, error=error, hint="the old values are kept")

    def control_state(self) -> dict[str, Any]:
        """What a control answer shows: paused, draining, the tunables now (never a secret)."""
        return {"paused": self.gate.paused, "draining": self.gate.draining,
                "settings": tunable_values(self.settings)}

    def outstanding_limit(self) -> int:
        """The outstanding window's limit now (adaptive: what it learned, at most
        ``max_outstanding``)."""
        st = self._stages_
        return st.outstanding.limit if st is not None else self.settings.max_outstanding

    def _apply_live(self, new: Settings) -> None:
        retune_limiter(self.limiter, rate=new.rate_limit, burst=new.burst)
        st = self._stages_
        if st is None:
            return  # not started: the stages are created from self.settings
        st.submitter.set_concurrency(new.concurrency)
        while self._submitters < new.concurrency and self._add_submitter is not None:
            if not self._add_submitter():
                break
        policy = st.scheduler.policy
        policy.poll_min, policy.poll_max = new.poll_min, new.poll_max
        st.outstanding.set_max_outstanding(new.max_outstanding)
        st.mass_failure.retune(new.failure_window, new.max_failure_rate)
        st.stuck.factor = new.stuck_factor

    # ---- figures ------------------------------------------------------------------------------

    def statistics(self) -> RunStatistics:
        """Every stage's figures now (zeros before the run starts)."""
        st = self._stages_
        return RunStatistics(
            producer=st.producer.statistics() if st else ProducerStatistics(0, 0, 0, 0, 0, 0),
            submitter=st.submitter.statistics() if st else SubmitterStatistics(0, 0),
            finisher=st.finisher.statistics() if st else FinisherStatistics(0, 0),
            processing=st.scheduler.pending if st else 0,
            client=self.client.stats if self.client else ClientStats(),
            health=self.health.statistics(),
            current_rate=self.limiter.current_rate,
            rows_redone=self._startup.rows_redone,
            resubmits=st.poller.resubmits if st else 0,
            poll_lateness_s=st.scheduler.lateness() if st else 0.0,
            control=ControlStatistics(
                paused=self.gate.paused, draining=self.gate.draining,
                rate_limit=self.limiter.rate, burst=self.limiter.burst,
                concurrency=st.submitter.concurrency if st else self.settings.concurrency,
                outstanding_limit=self.outstanding_limit(),
                withdrawn=st.finisher.statistics().withdrawn if st else 0,
                settings_applied=self._settings_applied,
                settings_refused=self._settings_refused),
            stuck=(st.stuck.statistics(st.scheduler.outstanding(), self.clock.now()) if st
                   else StuckStatistics()),
            s3=self.s3.statistics() if self.s3 is not None else None,
            window=st.outstanding.statistics() if st else None,
            limiter=self.limiter.statistics(),
        )

    @property
    def counters(self) -> LiveCounters:
        """The live panel's figures now (``statistics().counters()``)."""
        return self.statistics().counters()

    # ---- the run ------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        s = self.settings
        self.started_at = time.time()
        source = self.manifest if self.manifest is not None else s.root
        assert source is not None
        # An unusable source or output stops the run before any state is created for it.
        if self.manifest is not None:
            check_manifest(self.manifest)
        elif not isinstance(source, S3Url) and not source.is_dir():
            raise ConfigError(f"--root {source} is not a directory; give the archive's top folder")
        if s.output.exists() and not s.output.is_file():
            raise ConfigError(f"--output {s.output} is not a regular file (a directory or a "
                              "device?); give the path of a JSONL file")
        s.output.parent.mkdir(parents=True, exist_ok=True)
        with OutputLock(s.output):
            journal = Journal.open(s.journal_path)
            try:
                journal.check_settings(settings_fingerprint(s, source),
                                       summary=settings_summary(s, source))
                self._startup = prepare_output(s, journal)
                learned = LearnedLimits(s.base_url, key_fingerprint(s.api_key))
                self._warm_start(learned.load(journal))
                try:
                    await self._run_stages(journal)
                finally:
                    self._save_learned(learned, journal)
                self._final_counts = journal.counts()
            finally:
                journal.close()
        return self._result()

    # ---- self-tuning (tuning.py, learned.py) -------------------------------------------------

    def _new_limiter(self, settings: Settings, controller: RateController | None = None
                     ) -> RateLimiter:
        """``--rate-limit auto`` (None): a RateController finds the key's rate from its 429s;
        a number: a fixed ceiling, with AIMD below it after 429s. Either starts with one token
        (the server's bucket may be drained already) and saves up at most two in a quiet spell,
        so a pause never comes back as a burst the server refuses."""
        if settings.rate_limit is None:
            return RateLimiter.auto(settings.burst, clock=self.clock, controller=controller)
        return RateLimiter(settings.rate_limit, settings.burst, clock=self.clock,
                           initial_tokens=1.0, idle_tokens=min(float(settings.burst), 2.0))

    def _warm_start(self, snapshot: TuningSnapshot | None) -> None:
        """Start the rate (and, in ``_stages``, the window and the poll policy) from what the
        last run with this key learned."""
        self._learned = snapshot
        if snapshot is not None and self.settings.rate_limit is None:
            self.limiter = self._new_limiter(self.settings, snapshot.rate_controller())

    def _window_controller(self) -> WindowController | None:
        """The adaptive window's controller (None: a fixed window of ``max_outstanding``),
        warm-started from what the last run with this key learned."""
        s = self.settings
        if not s.adaptive_window or s.max_outstanding < MIN_ADAPTIVE_WINDOW:
            return None  # a bound this small is the window: nothing to learn under it
        # Start at the documented cap (10) or below max_outstanding, whichever is lower.
        bounds: dict[str, Any] = dict(
            min_limit=min(2, s.max_outstanding), max_limit=s.max_outstanding,
            initial_limit=min(10, s.max_outstanding), warmup=min(10, s.max_outstanding))
        if self._learned is not None and self._learned.window:
            return self._learned.window_controller(**bounds)
        return WindowController(**bounds)

    def _window(self) -> OutstandingWindow:
        return OutstandingWindow(max_outstanding=self.settings.max_outstanding,
                                 controller=self._window_controller(), clock=self.clock)

    def _save_learned(self, learned: LearnedLimits, journal: Journal) -> None:
        st = self._stages_
        window = st.outstanding.controller if st is not None else None
        rate = self.limiter.controller
        if window is None and rate is None:
            return  # nothing adaptive this run
        learned.save(journal, TuningSnapshot.capture(rate=rate, window=window))

    def _stages(self, journal: Journal, client: CaseClient,
                outcomes: MemoryObjectSendStream[Outcome],
                received: MemoryObjectReceiveStream[Outcome]) -> _Stages:
        """Every object of the run, created in one place."""
        s = self.settings
        backend = SqliteBackend(journal)
        outstanding = self._window()  # adaptive, at most max_outstanding (apply_settings)
        mass_failure = MassFailureWindow(s.failure_window, s.max_failure_rate)
        finisher = Finisher(outcomes, outstanding=outstanding, mass_failure=mass_failure)
        policy = PollPolicy(s.poll_min, s.poll_max, rng=self.rng)
        for lower, upper in self._learned.latency_intervals() if self._learned else ():
            policy.observe(lower, upper)  # first polls at the learned time, not poll_min
        stuck = StuckWatch(policy, factor=s.stuck_factor)
        # The scheduler calls the poller, which resubmits through the submitter, which hands
        # tokens to the scheduler: the callback is bound to the poller created below.
        scheduler = PollScheduler(lambda sub: poller.poll(sub), policy,
                                  clock=self.clock, max_concurrent_polls=MAX_CONCURRENT_POLLS,
                                  on_pending=stuck.check)
        submitter = Submitter(s, client=client, backend=backend, scheduler=scheduler,
                              finisher=finisher, key_fp=key_fingerprint(s.api_key),
                              clock=self.clock, window=outstanding, gate=self.gate)
        poller = Poller(s, client=client, backend=backend, finisher=finisher,
                        submitter=submitter, clock=self.clock)
        producer = Producer(s, self.manifest, journal=journal, backend=backend,
                            finisher=finisher, scheduler=scheduler, submitter=submitter,
                            outstanding=outstanding, clock=self.clock, s3=self.s3)
        self.producer_stats = producer.stats
        writer = ResultWriter(s.output, journal, fsync_every=s.fsync_every,
                              fsync_interval=s.fsync_interval, on_durable=self._on_durable)
        return _Stages(backend, client, scheduler, finisher, submitter, poller, producer,
                       writer, received, outstanding, mass_failure, stuck)

    async def _run_stages(self, journal: Journal) -> None:
        s = self.settings
        out_send, out_recv = anyio.create_memory_object_stream[Outcome](s.concurrency * 4 + 64)
        # Opened when a row first needs a bucket; the journal is bound to the store it reads.
        s3 = S3Access.for_settings(s, rng=self.rng, clock=self.clock, on_open=bind_store(journal))
        async with s3, CaseClient(
            s, limiter=self.limiter, clock=self.clock, rng=self.rng,
            max_connections=s.concurrency + MAX_CONCURRENT_POLLS + 4, health=self.health, s3=s3,
        ) as client:
            self.s3 = s3
            self.client = client
            st = self._stages_ = self._stages(journal, client, out_send, out_recv)
            async with anyio.create_task_group() as outer:
                outer.start_soon(st.writer.run, out_recv)
                async with out_send:
                    with anyio.CancelScope() as scope:
                        self._cancel_scope = scope
                        if self._interrupted:
                            scope.cancel()
                        try:
                            await self._pipeline(st)
                        except BaseException as exc:
                            self._fatal = first_error(exc, (BulkEngineError,))
                            if self._fatal is None:
                                raise
                        finally:
                            await st.submitter.forget_unsent(
                                refused=isinstance(self._fatal, AuthError))

    async def _pipeline(self, st: _Stages) -> None:
        """Resume live tokens, then producer → submitters → scheduler until every row ends."""
        s = self.settings
        job_send, job_recv = anyio.create_memory_object_stream[Ticket](s.concurrency)
        clones = [job_recv.clone() for _ in range(s.concurrency)]
        try:
            async with anyio.create_task_group() as tg:
                st.poller.start(st.scheduler, tg)  # resubmissions after a 404/401 run here
                tg.start_soon(st.scheduler.run)
                async with anyio.create_task_group() as feeders:
                    await st.producer.resume(feeders)
                    feeders.start_soon(st.producer.run, job_send)
                    for clone in clones:
                        feeders.start_soon(st.submitter.worker, clone)
                    self._submitters = len(clones)
                    self._add_submitter = lambda: self._one_more_submitter(
                        feeders, st.submitter, job_recv, clones)
                self._add_submitter = None
                st.scheduler.close()
        finally:
            self._add_submitter = None
            # The tasks close their streams, but an interrupt or a fatal error (a 403 while
            # live tokens resume) can cancel them before they start. Closing twice is harmless.
            job_send.close()
            job_recv.close()  # kept open until now: apply_settings clones it for new submitters
            for clone in clones:
                clone.close()

    def _one_more_submitter(self, feeders: anyio.abc.TaskGroup, submitter: Submitter,
                            job_recv: MemoryObjectReceiveStream[Ticket],
                            clones: list[MemoryObjectReceiveStream[Ticket]]) -> bool:
        """Concurrency raised live: one more submitter on the tickets; False once the
        producer is done (nothing left to share)."""
        try:
            clone = job_recv.clone()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        clones.append(clone)
        feeders.start_soon(submitter.worker, clone)
        self._submitters += 1
        return True

    def _on_durable(self, outcomes: list[Outcome]) -> None:
        for out in outcomes:
            self.summary.add(out.to_json(), (out.submitted_at, out.completed_at))

    def _result(self) -> RunResult:
        stats = self.statistics()
        self.summary.extra.update(stats.summary_extras())
        # The whole output so far, earlier runs included (from the journal):
        self.summary.extra["total_completed"] = self._final_counts.get(Status.COMPLETED, 0)
        self.summary.extra["total_failed"] = self._final_counts.get(Status.FAILED, 0)
        if self._fatal is not None:
            code = ExitCode.FATAL
        elif self._interrupted:
            code = ExitCode.INTERRUPTED
        elif self._final_counts.get(Status.FAILED, 0):
            # Counted from the journal, so a rerun of a finished run exits as the run did.
            code = ExitCode.SOME_FAILED
        else:
            code = ExitCode.OK
        return RunResult(code, self.summary, self._fatal, self._interrupted, stats.counters())
