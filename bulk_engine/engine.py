"""The engine: wires the stages of one run together. Decisions live in the stages and in
``policy.py``; this module only creates the run's objects (in :meth:`Engine._stages`) and starts
their tasks. See ``docs/architecture.md`` for the pipeline, the invariants and where each
decision lives.

    manifest ─▶ Producer ─▶ [bounded stream] ─▶ N × Submitter ─▶ PollScheduler ⇄ Poller
                   │                                  │                  │
                   └─ bad rows ───────────────────────┴─▶ Finisher ◀─────┘
                                                            │
                                                 [stream] ──▶ ResultWriter ─▶ results.jsonl
                one RateLimiter and one ApiHealth for every API call (CaseClient)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from bulk_engine.backend import SqliteBackend
from bulk_engine.client import CaseClient, ClientStats, key_fingerprint
from bulk_engine.clock import Clock, MonotonicClock
from bulk_engine.config import Settings
from bulk_engine.errors import AuthError, BulkEngineError, ConfigError, first_error
from bulk_engine.finisher import Finisher, FinisherStatistics
from bulk_engine.health import ApiHealth, HealthStatistics
from bulk_engine.journal import Journal, settings_fingerprint, settings_summary
from bulk_engine.manifest import ProducerStats, check_manifest
from bulk_engine.models import Outcome, Ticket
from bulk_engine.policy import MassFailureWindow
from bulk_engine.poller import Poller
from bulk_engine.producer import Producer, ProducerStatistics
from bulk_engine.ratelimit import RateLimiter
from bulk_engine.s3.access import S3Access, bind_store
from bulk_engine.s3.url import S3Url
from bulk_engine.scheduler import PollPolicy, PollScheduler
from bulk_engine.startup import StartupReport, prepare_output
from bulk_engine.stats import LiveCounters, Summary
from bulk_engine.submitter import Submitter, SubmitterStatistics
from bulk_engine.vocab import ExitCode, Status
from bulk_engine.writer import OutputLock, ReconcileReport, ResultWriter

if TYPE_CHECKING:
    from bulk_engine.s3.source import S3Stats

__all__ = [
    "MAX_CONCURRENT_POLLS",
    "Engine",
    "RunResult",
    "RunStatistics",
]

# Concurrent polls at most; the connection pool holds them and the uploads.
MAX_CONCURRENT_POLLS = 64


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
    s3: S3Stats | None = None  # the S3 source's counters, when a row needed a bucket

    def counters(self) -> LiveCounters:
        """The figures of the live panel."""
        p = self.producer
        return LiveCounters(
            rows_read=p.rows_read, rows_skipped_done=p.rows_skipped_done,
            rows_resumed=p.rows_resumed, submitted=self.submitter.submitted,
            processing=self.processing, completed=self.finisher.completed,
            failed=self.finisher.failed, bytes_uploaded=self.client.bytes_uploaded)

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
            **({f"s3_{k}": v for k, v in dataclasses.asdict(self.s3).items()}
               if self.s3 is not None else {}),
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


class Engine:
    """One run of the backfill: ``await Engine(settings, manifest).run()``."""

    def __init__(self, settings: Settings, manifest: Path | None, *,
                 clock: Clock | None = None, rng: random.Random | None = None) -> None:
        if manifest is None and settings.root is None:
            raise ConfigError("give a manifest CSV, or --root DIR to walk a folder tree")
        if not settings.api_key and not settings.dry_run:
            raise ConfigError(
                "no API key: set BULK_ENGINE_API_KEY (or api_key in --config, or --api-key)")
        self.settings = settings
        self.manifest = manifest
        self.clock = clock or MonotonicClock()
        self.rng = rng or random.Random(settings.seed)
        self.summary = Summary()
        # Start at the steady rate, not with a burst: see RateLimiter's ``initial_tokens``.
        self.limiter = RateLimiter(settings.rate_limit, settings.burst, clock=self.clock,
                                   initial_tokens=1.0)
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

    # ---- control and figures ----------------------------------------------------------------

    def interrupt(self) -> None:
        """Stop taking rows, cancel in-flight work, persist what was decided (Ctrl-C, SIGTERM)."""
        self._interrupted = True
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

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
            s3=self.s3.statistics() if self.s3 is not None else None,
        )

    @property
    def counters(self) -> LiveCounters:
        """The live panel's figures now (``statistics().counters()``)."""
        return self.statistics().counters()

    # ---- the run ------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        s = self.settings
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
                await self._run_stages(journal)
                self._final_counts = journal.counts()
            finally:
                journal.close()
        return self._result()

    def _stages(self, journal: Journal, client: CaseClient,
                outcomes: MemoryObjectSendStream[Outcome],
                received: MemoryObjectReceiveStream[Outcome]) -> _Stages:
        """Every object of the run, created in one place."""
        s = self.settings
        backend = SqliteBackend(journal)
        outstanding = anyio.Semaphore(s.max_outstanding)
        finisher = Finisher(outcomes, outstanding=outstanding,
                            mass_failure=MassFailureWindow(s.failure_window, s.max_failure_rate))
        # The scheduler calls the poller, which resubmits through the submitter, which hands
        # tokens to the scheduler: the callback is bound to the poller created below.
        scheduler = PollScheduler(lambda sub: poller.poll(sub),
                                  PollPolicy(s.poll_min, s.poll_max, rng=self.rng),
                                  clock=self.clock, max_concurrent_polls=MAX_CONCURRENT_POLLS)
        submitter = Submitter(s, client=client, backend=backend, scheduler=scheduler,
                              finisher=finisher, key_fp=key_fingerprint(s.api_key),
                              clock=self.clock)
        poller = Poller(s, client=client, backend=backend, finisher=finisher,
                        submitter=submitter)
        producer = Producer(s, self.manifest, journal=journal, backend=backend,
                            finisher=finisher, scheduler=scheduler, submitter=submitter,
                            outstanding=outstanding, clock=self.clock, s3=self.s3)
        self.producer_stats = producer.stats
        writer = ResultWriter(s.output, journal, fsync_every=s.fsync_every,
                              fsync_interval=s.fsync_interval, on_durable=self._on_durable)
        return _Stages(backend, client, scheduler, finisher, submitter, poller, producer,
                       writer, received)

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
        job_recv.close()
        try:
            async with anyio.create_task_group() as tg:
                st.poller.start(st.scheduler, tg)  # resubmissions after a 404/401 run here
                tg.start_soon(st.scheduler.run)
                async with anyio.create_task_group() as feeders:
                    await st.producer.resume(feeders)
                    feeders.start_soon(st.producer.run, job_send)
                    for clone in clones:
                        feeders.start_soon(st.submitter.worker, clone)
                st.scheduler.close()
        finally:
            # The tasks close their streams, but an interrupt or a fatal error (a 403 while
            # live tokens resume) can cancel them before they start. Closing twice is harmless.
            job_send.close()
            for clone in clones:
                clone.close()

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
