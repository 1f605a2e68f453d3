"""The engine: wires producer, submitters, poll scheduler and writer into one run.

    manifest ─▶ producer ─▶ [bounded stream] ─▶ N submitters ─▶ PollScheduler ─▶ ResultWriter
                                 └────── one RateLimiter for every API call ──────┘
                 Journal (SQLite): submitting / submitted+token / done, for crash-safe resume

This module only wires stages together and applies the error policy of DESIGN.md; the
decisions live in the stage modules (``ratelimit``, ``backoff``, ``scheduler``, ``client``).

Task layout (one task group per run, no loose tasks): the writer runs in the outer group; the
producer, the submitters and the scheduler run in an inner cancel scope. An interrupt or a fatal
error cancels the inner scope only, then the writer drains what was already decided and
commits it, so nothing decided is lost and nothing is written twice.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from bulk_engine.client import CaseClient, idempotency_key, key_fingerprint, submission_for
from bulk_engine.clock import Clock, MonotonicClock
from bulk_engine.config import Settings
from bulk_engine.errors import (
    AmbiguousSubmitError,
    ApiError,
    ApiUnavailableError,
    AuthError,
    BulkEngineError,
    ConfigError,
    ManifestError,
    PermanentError,
    TransientError,
    first_error,
)
from bulk_engine.health import ApiHealth
from bulk_engine.journal import (
    Journal,
    JournalReader,
    RowRecord,
    settings_fingerprint,
    settings_summary,
)
from bulk_engine.logs import get_logger, short_token
from bulk_engine.manifest import ProducerStats, check_manifest, list_folder
from bulk_engine.models import BadRow, ErrorInfo, Job, Outcome, Submitted, fingerprint_files
from bulk_engine.policy import (
    MassFailureWindow,
    ResumeAction,
    RetrieveAction,
    resume_action,
    retrieve_decision,
)
from bulk_engine.ratelimit import RateLimiter
from bulk_engine.rules import goes_sync, row_stream
from bulk_engine.scheduler import PollDecision, PollPolicy, PollScheduler
from bulk_engine.stats import LiveCounters, Summary, decision_of
from bulk_engine.vocab import NOT_FINAL_KINDS, ExitCode, RowState, Status
from bulk_engine.writer import (
    OutputLock,
    ResultWriter,
    file_tail_digest,
    reconcile,
    rewrite_without_failed,
)

log = get_logger()

# New folders wait while the earliest due poll is this late (results expire in 60 minutes).
MAX_POLL_LATENESS_S = 60.0


@dataclass(slots=True)
class _Sending:
    """A submission under way: can its body have reached a server yet?"""

    attempts: int  # its generation
    in_flight: bool = False  # a request of it is on the wire right now
    maybe_sent: bool = False  # an attempt failed after its body may have arrived


@dataclass(slots=True)
class Ticket:
    """A job on its way to a submitter, with the journal's memory of it."""

    job: Job
    attempts: int  # the submission generation (1 = first); keys the Idempotency-Key
    possible_duplicate: bool = False


@dataclass
class RunResult:
    """What a run returns: its exit code, the summary, and a fatal error if any."""

    exit_code: int
    summary: Summary
    error: BaseException | None = None
    interrupted: bool = False
    counters: LiveCounters = field(default_factory=LiveCounters)


class Engine:
    """One run of the backfill. ``await Engine(settings, manifest).run()``."""

    def __init__(
        self,
        settings: Settings,
        manifest: Path | None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if manifest is None and settings.root is None:
            raise ConfigError("give a manifest CSV, or --root DIR to walk a folder tree")
        if not settings.api_key and not settings.dry_run:
            raise ConfigError(
                "no API key: set BULK_ENGINE_API_KEY (or api_key in --config, or --api-key)"
            )
        self.settings = settings
        self.manifest = manifest
        self.clock = clock or MonotonicClock()
        self.rng = rng or random.Random(settings.seed)
        self.counters = LiveCounters()
        self.producer_stats = ProducerStats()
        self.summary = Summary()
        # Start at the steady rate, not with a burst: see RateLimiter's ``initial_tokens``.
        self.limiter = RateLimiter(settings.rate_limit, settings.burst, clock=self.clock,
                                   initial_tokens=1.0)
        self.resubmits = 0
        self.rows_redone = 0  # done rows whose line was gone from the output at startup
        self.rows_dropped = 0  # journaled rows that left the manifest
        self.health = ApiHealth(self.clock, outage_after=settings.outage_after)
        self._key_fp = key_fingerprint(settings.api_key)
        self._mass_failure = MassFailureWindow(settings.failure_window, settings.max_failure_rate)
        self._cancel_scope: anyio.CancelScope | None = None
        self._interrupted = False
        self._fatal: BaseException | None = None
        self._final_counts: dict[str, int] = {}
        # Rows whose POST /case went out and has no final answer yet.
        self._sending: dict[str, _Sending] = {}
        # Rows whose journaled token this run took over at startup: the producer must not send
        # them again when it meets them, whatever state the journal shows by then (a 404 or a
        # changed folder moves them through pending/submitting while their task owns them).
        self._resumed: set[str] = set()
        self.client: CaseClient | None = None

    # --- control ---------------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Stop taking rows, cancel in-flight work, persist what was decided (Ctrl-C, SIGTERM)."""
        self._interrupted = True
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    # --- the run ---------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        s = self.settings
        source = self.manifest if self.manifest is not None else s.root
        assert source is not None
        # An unusable source stops the run before any state is created for it.
        if self.manifest is not None:
            check_manifest(self.manifest)
        elif not source.is_dir():
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
                self._startup(journal)
                self._journal = journal
                await self._run_pipeline()
            finally:
                journal.close()
        return self._result()

    def _startup(self, journal: Journal) -> None:
        """Make journal and output agree, and send back the failed rows this run retries."""
        s = self.settings
        if journal.rewrite_pending:  # a --retry-failed rewrite cut short by a crash
            self._rewrite_output(journal)
        report = reconcile(s.output, journal)  # cuts a torn tail first
        self.rows_redone = report.rows_redone
        if report.repaired_bytes:
            log.warning("output_tail_repaired", bytes_removed=report.repaired_bytes,
                        path=str(s.output))
        # A plain rerun retries rows that failed for transport reasons (an outage is not the
        # row's fault); --retry-failed retries every failed row.
        kinds = None if s.retry_failed else NOT_FINAL_KINDS
        n = journal.begin_retry_failed(kinds)
        if n:
            self._rewrite_output(journal)
        if n or s.retry_failed:
            log.info("retry_failed", rows=n,
                     kinds="all" if kinds is None else ",".join(sorted(kinds)))

    def _rewrite_output(self, journal: Journal) -> None:
        out = self.settings.output
        size = rewrite_without_failed(out, journal)
        journal.finish_retry_failed(size, tail=file_tail_digest(out, size))

    def _result(self) -> RunResult:
        c = self.client.stats if self.client else None
        self.summary.extra.update({
            "rows_read": self.producer_stats.rows_read,
            "rows_rejected": self.producer_stats.rows_rejected,
            "rows_skipped_done": self.counters.rows_skipped_done,
            "rows_resumed": self.counters.rows_resumed,
            "rows_redone": self.rows_redone,
            "rows_dropped": self.rows_dropped,
            "resubmits": self.resubmits,
            "api_calls": c.calls if c else 0,
            "submits": c.submits if c else 0,
            "polls": c.polls if c else 0,
            "throttled_429": c.throttled if c else 0,
            "unavailable_503": c.unavailable if c else 0,
            "retries": c.retries if c else 0,
            "ambiguous_submits": c.ambiguous_submits if c else 0,
            "bytes_uploaded": c.bytes_uploaded if c else 0,
            "final_rate_limit": round(self.limiter.current_rate, 3),
            # The whole output so far, earlier runs included (from the journal):
            "total_completed": self._final_counts.get(Status.COMPLETED, 0),
            "total_failed": self._final_counts.get(Status.FAILED, 0),
        })
        if self._fatal is not None:
            code = ExitCode.FATAL
        elif self._interrupted:
            code = ExitCode.INTERRUPTED
        elif self._final_counts.get(Status.FAILED, 0):
            # Counted from the journal, so a rerun of a finished run exits as the run did.
            code = ExitCode.SOME_FAILED
        else:
            code = ExitCode.OK
        return RunResult(code, self.summary, self._fatal, self._interrupted, self.counters)

    async def _run_pipeline(self) -> None:
        s = self.settings
        self._outstanding = anyio.Semaphore(s.max_outstanding)
        self._uploads = anyio.CapacityLimiter(s.concurrency)
        policy = PollPolicy(s.poll_min, s.poll_max, rng=self.rng)
        self.scheduler = PollScheduler(self._poll, policy, clock=self.clock)
        out_send, out_recv = anyio.create_memory_object_stream[Outcome](s.concurrency * 4 + 64)
        self._out = out_send
        writer = ResultWriter(
            s.output, self._journal, fsync_every=s.fsync_every, fsync_interval=s.fsync_interval,
            on_durable=self._on_durable,
        )
        polls = 64
        async with CaseClient(
            s, limiter=self.limiter, clock=self.clock, rng=self.rng,
            max_connections=s.concurrency + polls + 4, health=self.health,
        ) as client:
            self.client = client
            async with anyio.create_task_group() as outer:
                outer.start_soon(writer.run, out_recv)
                async with out_send:
                    with anyio.CancelScope() as scope:
                        self._cancel_scope = scope
                        if self._interrupted:
                            scope.cancel()
                        try:
                            await self._inner()
                        except BaseException as exc:
                            fatal = first_error(exc, (BulkEngineError,))
                            if fatal is None:
                                raise
                            self._fatal = fatal
                        finally:
                            self._forget_unsent(refused=isinstance(self._fatal, AuthError))
        self._final_counts = self._journal.counts()

    def _forget_unsent(self, *, refused: bool) -> None:
        """Submissions cut short (a stop, an interrupt) that cannot have created a run go back
        to pending, so the rerun does not flag them as possible duplicates: those whose every
        attempt failed before its body reached a server (connect errors), or all of them when
        the key was ``refused`` (the API creates no run for a refused key)."""
        with self._journal.batch():
            for key, st in self._sending.items():
                if refused or not (st.maybe_sent or st.in_flight):
                    self._journal.mark_pending(key, attempts=st.attempts - 1)
        self._sending.clear()

    async def _inner(self) -> None:
        s = self.settings
        job_send, job_recv = anyio.create_memory_object_stream[Ticket](s.concurrency)
        clones = [job_recv.clone() for _ in range(s.concurrency)]
        job_recv.close()
        try:
            async with anyio.create_task_group() as tg:
                self._tasks = tg  # resubmissions after a 404/401 run here
                tg.start_soon(self.scheduler.run)
                async with anyio.create_task_group() as feeders:
                    await self._resume_live_tokens(feeders)
                    feeders.start_soon(self._produce, job_send)
                    for clone in clones:
                        feeders.start_soon(self._submit_worker, clone)
                self.scheduler.close()
        finally:
            # The tasks close their streams, but an interrupt or a fatal error (a 403 while
            # live tokens resume) can cancel them before they start. Closing twice is harmless.
            job_send.close()
            for clone in clones:
                clone.close()

    # --- producer --------------------------------------------------------------------------------

    def _rows(self, reader: JournalReader, *, is_done: Any, stats: ProducerStats,
              list_folders: bool = True) -> Iterator[Job | BadRow]:
        """The row stream. Done rows are skipped, and duplicate ids flagged, before listing."""
        return row_stream(self.settings, self.manifest, seen=reader.seen, is_done=is_done,
                          stats=stats, list_folders=list_folders)

    async def _produce(self, send: MemoryObjectSendStream[Ticket]) -> None:
        """Stream rows from a worker thread (CSV parsing and folder listing block) in batches."""
        reader = self._journal.reader()
        self._reader_known = reader.known
        resumed = self._resumed

        def is_done(key: str) -> bool:
            # Rows this run took over at startup are not "done by an earlier run", even once
            # finished: they are passed through (and skipped in _route), not counted as skipped.
            return key not in resumed and reader.is_done(key)

        rows = self._rows(reader, is_done=is_done, stats=self.producer_stats)
        try:
            async with send:
                while True:
                    batch = await anyio.to_thread.run_sync(_take, rows, 64)
                    self.counters.rows_read = self.producer_stats.rows_read
                    self.counters.rows_skipped_done = self.producer_stats.rows_skipped_done
                    if not batch:
                        return
                    for item in batch:
                        await self._route(item, send)
        finally:
            reader.close()

    async def _route(self, item: Job | BadRow, send: MemoryObjectSendStream[Ticket]) -> None:
        """Send a job to the submitters, or a bad row straight to the writer."""
        if item.key in self._resumed:
            # Owned since startup by its resumed token (or that token's resubmission), which
            # writes its line, even if the folder has since become a bad row. A key meets the
            # producer once: free the memory.
            self._resumed.discard(item.key)
            return
        if isinstance(item, BadRow):
            await self._emit(Outcome.from_bad_row(item), api=False)
            return
        j = self._journal
        # The producer's reader saw every key the journal holds (not done): others are new.
        rec = j.get(item.key) if item.key in self._reader_known else None
        self._reader_known.discard(item.key)
        if rec is not None and rec.state == RowState.DONE:
            return  # the producer's reader skips (and counts) done rows; this is a safety net
        if rec is not None and rec.state == RowState.SUBMITTED:
            return  # its token is already in the scheduler (resumed at start)
        # Polls first: while due polls run late (the rate is saturated), take no new folders,
        # so every token is retrieved well inside the 60-minute result window.
        while self.scheduler.lateness() > MAX_POLL_LATENESS_S:
            await self.clock.sleep(1.0)
        attempts, dup = 1, False
        if rec is not None and rec.state == RowState.SUBMITTING:
            # A crash mid-POST: the server may hold a run. Same generation → same idempotency
            # key (if the request is the same), so a server that honours it replays the run.
            attempts, dup = max(rec.attempts, 1), True
        elif rec is not None and rec.state == RowState.PENDING and rec.attempts:
            attempts = rec.attempts + 1
        await self._outstanding.acquire()
        await send.send(Ticket(item, attempts, dup))

    async def _resume_live_tokens(self, tg: anyio.abc.TaskGroup) -> None:
        """Tokens journaled by an earlier run are polled, never resubmitted — if their row is
        still the same request.

        The manifest is read once (no folder listed) to find each token's row as it is now: a
        row that left the manifest is dropped with a warning (no line), a row that became bad
        gets its failed line, a row whose folder, options or files changed is resubmitted under
        a new key (``policy.resume_action``). The producer skips these rows when it meets them.
        """
        records = self._journal.live_tokens()
        if not records:
            return
        wanted = {r.key: r for r in records}
        found = await anyio.to_thread.run_sync(self._find_rows, set(wanted))
        for key, rec in wanted.items():
            item = found.get(key)
            job: Job | None = None
            bad: ErrorInfo | None = None
            if isinstance(item, BadRow):
                bad = ErrorInfo(item.kind, item.message)
            elif item is not None:
                try:
                    job = await anyio.to_thread.run_sync(self._listed, item)
                except ManifestError as exc:
                    bad = ErrorInfo(exc.kind, exc.message)
            # Compared under the key the token was issued to: a token of another key is polled,
            # and the API's 403 stops the run (the journal belongs to another key).
            identity = (self._submission(job, asynchronous=True, key_fp=rec.key_fp)[1]
                        if job is not None else None)
            action = resume_action(
                in_manifest=item is not None, bad_row=bad is not None,
                journaled_identity=rec.request_fp or _legacy_identity(rec, job, identity),
                current_identity=identity)
            if action is ResumeAction.DROP:
                self.rows_dropped += 1
                log.warning("row_left_manifest", id=rec.id, line=rec.line,
                            hint="its journaled token is dropped: no line for a row that is no "
                                 "longer in the manifest")
                self._journal.forget(key)
                continue
            self.counters.rows_resumed += 1
            self._resumed.add(key)
            if action is ResumeAction.FAIL:
                assert bad is not None
                await self._emit(Outcome(
                    key=key, line=rec.line or 0, id=rec.id or "", folder=rec.folder or "",
                    status=Status.FAILED, error=bad, completed_at=time.time(),
                    attempts=rec.attempts,
                ), api=False)
                continue
            assert job is not None
            await self._outstanding.acquire()
            if action is ResumeAction.RESUBMIT:
                # Never pair a changed row with the result of its old request: resubmit.
                log.info("row_changed", id=job.id,
                         hint="its folder, options or files changed since it was submitted: "
                              "resubmitted under a new key")
                self._journal.mark_pending(key)
                tg.start_soon(self._submit, Ticket(job, rec.attempts + 1, rec.possible_duplicate))
                continue
            sub = Submitted(
                job=job, token=rec.token or "", submitted_at=rec.submitted_at or time.time(),
                submitted_mono=self.clock.now(), attempts=rec.attempts, run_id=rec.run_id,
                resumed=True, possible_duplicate=rec.possible_duplicate,
                analyse_type=_sent_types(self._submission(job, asynchronous=True)[0]),
            )
            self.counters.processing += 1
            self.scheduler.add(sub, delay=0.0)

    def _find_rows(self, keys: set[str]) -> dict[str, Job | BadRow]:
        """The manifest's rows for ``keys`` as they are now (folders not listed)."""
        reader = self._journal.reader()
        found: dict[str, Job | BadRow] = {}
        try:
            rows = self._rows(reader, is_done=lambda key: key not in keys, stats=ProducerStats(),
                              list_folders=False)
            for item in rows:
                if item.key in keys:
                    found[item.key] = item
                    if len(found) == len(keys):
                        break
        finally:
            reader.close()
        return found

    def _listed(self, job: Job) -> Job:
        """``job`` with its folder listed now (raises ManifestError)."""
        s = self.settings
        files = list_folder(job.path, max_file_size=s.max_file_size,
                            follow_symlinks=s.follow_symlinks)
        return dataclasses.replace(job, files=files, fingerprint=fingerprint_files(files))

    # --- submitters ------------------------------------------------------------------------------

    async def _submit_worker(self, recv: MemoryObjectReceiveStream[Ticket]) -> None:
        async with recv:
            async for ticket in recv:
                await self._submit(ticket)

    def _mode_for(self, job: Job) -> str:
        return "sync" if goes_sync(self.settings, job) else "async"

    def _submission(self, job: Job, *, asynchronous: bool, key_fp: str | None = None
                    ) -> tuple[dict[str, Any], str]:
        """The payload to send for ``job`` and its request identity (keys the submission)."""
        return submission_for(self.settings, job, asynchronous=asynchronous,
                              key_fp=key_fp or self._key_fp)

    async def _submit(self, ticket: Ticket) -> None:
        """Upload one folder (with retries) and hand its token to the scheduler."""
        job, s = ticket.job, self.settings
        assert self.client is not None
        client = self.client
        structlog.contextvars.bind_contextvars(id=job.id)  # this task's logs name the row
        payload, identity = self._submission(job, asynchronous=self._mode_for(job) == "async")
        idem = idempotency_key(identity, ticket.attempts) if s.idempotency else None
        submitted_wall = time.time()
        sending = _Sending(ticket.attempts)

        def before_send() -> None:
            # Journal intent once, when the first request of this submission really goes out.
            if job.key not in self._sending:
                self._journal.mark_submitting(job, ticket.attempts, identity, self._key_fp)
                self._sending[job.key] = sending
            sending.in_flight = True

        def after_attempt(exc: ApiError) -> None:
            sending.in_flight = False
            sending.maybe_sent = sending.maybe_sent or isinstance(exc, AmbiguousSubmitError)

        def on_retry(exc: ApiError) -> None:
            after_attempt(exc)
            _log_retry(exc)

        try:
            async with self._uploads, client.health.admit():
                answer = await client.call_with_retries(
                    lambda: client.submit_once(job, payload=payload, idem_key=idem,
                                               before_send=before_send),
                    endpoint="submit", source=job.key, on_retry=on_retry,
                )
        except (PermanentError, TransientError) as exc:
            after_attempt(exc)
            if isinstance(exc, TransientError) and not await client.health.verdict("submit"):
                raise self._outage() from None  # _forget_unsent settles this row's journal
            self._sending.pop(job.key, None)
            await self._finish_job(job, ticket.attempts, 0, status=Status.FAILED,
                                   error=ErrorInfo(exc.kind, exc.message, exc.http_status),
                                   submitted_at=submitted_wall,
                                   possible_duplicate=ticket.possible_duplicate)
            return
        self._sending.pop(job.key, None)
        self.counters.submitted += 1
        self.counters.bytes_uploaded += job.total_bytes
        if answer.token is None:  # sync mode: the answer is the result
            await self._finish_job(job, ticket.attempts, 0, status=Status.COMPLETED,
                                   result=answer.result, submitted_at=submitted_wall,
                                   possible_duplicate=ticket.possible_duplicate)
            return
        self._journal.mark_submitted(job.key, answer.token, None, submitted_wall)
        self.counters.processing += 1
        log.debug("submitted", id=job.id, token=short_token(answer.token))
        self.scheduler.add(Submitted(
            job=job, token=answer.token, submitted_at=submitted_wall,
            submitted_mono=self.clock.now(), attempts=ticket.attempts,
            possible_duplicate=ticket.possible_duplicate, analyse_type=_sent_types(payload),
        ))

    def _outage(self) -> ApiUnavailableError:
        st = self.health.statistics()
        last = f" Last answer: {st.last_failure_message}." if st.last_failure_message else ""
        return ApiUnavailableError(
            f"the API is {st.describe()}, {st.consecutive_failures} calls in a row: stopping "
            f"rather than failing rows for it.{last} The rows in flight are saved, not failed; "
            "check the API's status (and --base-url), then rerun the same command to resume."
        )

    # --- polls -----------------------------------------------------------------------------------

    async def _poll(self, sub: Submitted) -> PollDecision:
        """One poll of one token, with transport retries; applies the retrieve policy."""
        assert self.client is not None
        client = self.client
        structlog.contextvars.bind_contextvars(id=sub.job.id)  # one task per poll
        try:
            answer = await client.call_with_retries(
                lambda: client.retrieve_once(sub.token, sub.analyse_type),
                endpoint="retrieve", source=sub.job.key, on_retry=_log_retry)
        except (PermanentError, TransientError) as exc:
            if isinstance(exc, TransientError) and not await client.health.verdict("retrieve"):
                raise self._outage() from None  # the token stays journaled: a rerun polls it
            await self._finish_sub(sub, Status.FAILED, error=ErrorInfo(
                exc.kind, exc.message, exc.http_status))
            return PollDecision.DROP  # not a completion time: the policy must not learn it
        decision = retrieve_decision(answer.status, sub.attempts, self.settings.max_attempts)
        if decision.action is RetrieveAction.AGAIN:
            sub.run_id = answer.run_id or sub.run_id
            return PollDecision.AGAIN
        if decision.action is RetrieveAction.COMPLETE:
            await self._finish_sub(sub, Status.COMPLETED, result=answer.body)
            return PollDecision.DONE
        assert decision.kind is not None
        if decision.action is RetrieveAction.RESUBMIT:
            self.resubmits += 1
            log.info("resubmit", id=sub.job.id, reason=decision.kind, attempt=sub.attempts + 1)
            self._journal.mark_pending(sub.job.key)
            self.counters.processing -= 1
            # The upload runs in its own task: a poll slot must not wait on an upload slot, or a
            # storm of expired tokens would stall every other poll behind the re-uploads.
            self.scheduler.hold()
            self._tasks.start_soon(
                self._resubmit, Ticket(sub.job, sub.attempts + 1, sub.possible_duplicate))
            return PollDecision.DROP
        if decision.kind == "analysis_failed":
            await self._finish_sub(sub, Status.FAILED, error=ErrorInfo(
                "analysis_failed", f"the API could not analyse this folder: {answer.message}",
                500))
            return PollDecision.DONE
        await self._finish_sub(sub, Status.FAILED, error=ErrorInfo(
            decision.kind, f"retrieve answered {answer.status} ({answer.message}) and the "
            f"attempt budget ({self.settings.max_attempts}) is spent", answer.status))
        return PollDecision.DROP

    async def _resubmit(self, ticket: Ticket) -> None:
        try:
            await self._submit(ticket)
        finally:
            self.scheduler.release()

    async def _finish_sub(self, sub: Submitted, status: Status, *, result: Any = None,
                          error: ErrorInfo | None = None) -> None:
        self.counters.processing -= 1
        await self._finish_job(sub.job, sub.attempts, sub.polls, status=status, result=result,
                               error=error, submitted_at=sub.submitted_at, run_id=sub.run_id,
                               possible_duplicate=sub.possible_duplicate)

    async def _finish_job(self, job: Job, attempts: int, polls: int, *, status: Status,
                          result: Any = None, error: ErrorInfo | None = None,
                          submitted_at: float | None = None, run_id: str | None = None,
                          possible_duplicate: bool = False) -> None:
        out = Outcome(
            key=job.key, line=job.line, id=job.id, folder=job.folder, status=status,
            result=result, error=error, run_id=run_id, attempts=attempts, polls=polls,
            submitted_at=submitted_at, completed_at=time.time(), files=len(job.files),
            total_bytes=job.total_bytes, possible_duplicate=possible_duplicate,
            path=str(job.path),
        )
        self._outstanding.release()
        # Shielded: a result in hand must reach the writer even on Ctrl-C (no hang: a dead
        # writer has closed its stream, and the send raises).
        with anyio.CancelScope(shield=True):
            await self._emit(out, api=True)

    async def _emit(self, out: Outcome, *, api: bool) -> None:
        if out.status == Status.COMPLETED:
            self.counters.completed += 1
        else:
            self.counters.failed += 1
        log.info("row_done", id=out.id, status=out.status, attempts=out.attempts,
                 polls=out.polls, error=out.error.kind if out.error else None,
                 decision=decision_of(out.result), latency_s=out.to_json()["latency_s"])
        await self._out.send(out)
        if api:
            # Stop when most recent API rows failed server-side (state saved; rerun resumes).
            self._mass_failure.add(out.error.kind if out.error else None)

    def _on_durable(self, outcomes: list[Outcome]) -> None:
        for out in outcomes:
            self.summary.add(out.to_json(), (out.submitted_at, out.completed_at))


def _log_retry(exc: ApiError) -> None:
    """A transient failure about to be retried (the row id comes from the task's context)."""
    log.debug("retry", kind=exc.kind, http_status=exc.http_status, message=exc.message)


def _take(rows: Iterator[Job | BadRow], n: int) -> list[Job | BadRow]:
    return list(islice(rows, n))


def _sent_types(payload: dict[str, Any]) -> tuple[str, ...]:
    """The analyse types a payload asks for (a manifest's payload column may override them)."""
    value = payload.get("analyse_type")
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _legacy_identity(rec: RowRecord, job: Job | None, identity: str | None) -> str | None:
    """For a token journaled before request identities were (schema 1): the old rule (same
    folder path, options and files) stands in — ``identity`` when it holds, else None."""
    if job is None or rec.path is None:
        return None
    extra = json.loads(rec.extra) if rec.extra else {}
    same = (rec.path == str(job.path) and rec.fingerprint == job.fingerprint
            and extra.get("use_case") == job.use_case
            and (tuple(extra["analyse_type"]) if extra.get("analyse_type") else None)
            == job.analyse_type and (extra.get("payload") or {}) == job.payload)
    return identity if same else None


__all__ = ["Engine", "RunResult"]
