"""The producer: the manifest's rows, in order, to the submitters — and the tokens an earlier
run left, back to the poll scheduler.

Where it sits::

    manifest.csv / --root ─▶ rules.row_stream (worker thread) ─▶ Producer.run ─Ticket─▶ submitters
                                                                      └─bad rows─▶ Finisher
    journal (live tokens) ─▶ Producer.resume ─Submitted─▶ PollScheduler

The row stream is read in a worker thread (CSV parsing and folder listing block), in batches,
through a read-only journal connection that skips rows an earlier run finished before their
folder is listed. The stream to the submitters is bounded (backpressure); each submitter takes
a unit of the outstanding window (``tuning.OutstandingWindow``) before it uploads, so at most
the window's limit of folders are submitted and not yet retrieved. While due polls run more than
``MAX_POLL_LATENESS_S`` late (the rate is saturated), no new folder is taken: retrieving results
inside their 60-minute window comes first.

On resume, each journaled live token is checked against the manifest as it is now
(``policy.resume_action``): polled when its row is the same request, resubmitted under a new key
when the row's folder, options or files changed, failed when the row became bad, dropped (no
line) when the row left the manifest. The manifest is the authority for which rows exist.

Folders in buckets (``s3://``) are listed the same way, through the run's ``S3Access`` (its
calls run on the event loop; ``s3.access.S3Folders``), and re-listed on resume: a folder whose
objects were overwritten has another fingerprint (ETags), so its token is not polled but the
folder is resubmitted under a new key.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from bulk_engine.backend import JournalBackend
from bulk_engine.clock import Clock
from bulk_engine.config import Settings
from bulk_engine.errors import ManifestError
from bulk_engine.finisher import Finisher
from bulk_engine.journal import Journal, JournalReader, RowRecord
from bulk_engine.logs import get_logger
from bulk_engine.manifest import ProducerStats, list_folder
from bulk_engine.models import (
    BadRow,
    ErrorInfo,
    Job,
    Outcome,
    Submitted,
    Ticket,
    fingerprint_files,
    fingerprint_folder,
)
from bulk_engine.policy import ResumeAction, resume_action
from bulk_engine.rules import row_stream
from bulk_engine.s3.access import S3Access
from bulk_engine.s3.url import S3Url
from bulk_engine.scheduler import PollScheduler
from bulk_engine.submitter import Submitter, sent_types
from bulk_engine.vocab import RowState, Status

__all__ = ["MAX_POLL_LATENESS_S", "Producer", "ProducerStatistics", "SlotAcquirer"]

log = get_logger()

# New folders wait while the earliest due poll is this late (results expire in 60 minutes).
MAX_POLL_LATENESS_S = 60.0
_BATCH = 64  # rows per worker-thread hop, at most
# ...and a hop ends after this long: rows whose folders take a request each to list (buckets)
# reach the submitters while the listing goes on, and an interrupt is not held up by a batch.
_BATCH_S = 0.05


class SlotAcquirer(Protocol):
    async def acquire(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ProducerStatistics:
    """What the producer saw: ``rows_read == accepted + rejected + skipped_done``."""

    rows_read: int
    rows_accepted: int
    rows_rejected: int
    rows_skipped_done: int  # finished by an earlier run: skipped, no API call
    rows_resumed: int  # live tokens of an earlier run this run took over
    rows_dropped: int  # live tokens whose row left the manifest


class Producer:
    """Feeds the submitters from the manifest, and the scheduler from the journal's tokens."""

    def __init__(self, settings: Settings, manifest: Path | None, *, journal: Journal,
                 backend: JournalBackend, finisher: Finisher, scheduler: PollScheduler,
                 submitter: Submitter, outstanding: SlotAcquirer, clock: Clock,
                 s3: S3Access | None = None) -> None:
        self.settings = settings
        self._s3 = s3
        self.manifest = manifest
        self._journal = journal
        self._backend = backend
        self._finisher = finisher
        self._scheduler = scheduler
        self._submitter = submitter
        self._outstanding = outstanding
        self._clock = clock
        self.stats = ProducerStats()
        # Rows whose journaled token this run took over at startup: the producer must not send
        # them again when it meets them, whatever state the journal shows by then.
        self._resumed: set[str] = set()
        self._reader_known: set[str] = set()
        self._rows_resumed = 0
        self._rows_dropped = 0

    def statistics(self) -> ProducerStatistics:
        st = self.stats
        return ProducerStatistics(st.rows_read, st.rows_accepted, st.rows_rejected,
                                  st.rows_skipped_done, self._rows_resumed, self._rows_dropped)

    # ---- the manifest ---------------------------------------------------------------------------

    async def run(self, send: MemoryObjectSendStream[Ticket]) -> None:
        """Stream rows from a worker thread in batches; route each one."""
        reader = self._journal.reader()
        self._reader_known = reader.known
        resumed = self._resumed

        def is_done(key: str) -> bool:
            # Rows this run took over at startup are not "done by an earlier run", even once
            # finished: they are passed through (and skipped in _route), not counted as skipped.
            return key not in resumed and reader.is_done(key)

        rows = self._rows(reader, is_done=is_done, stats=self.stats)
        try:
            async with send:
                while batch := await anyio.to_thread.run_sync(_take, rows, _BATCH):
                    for item in batch:
                        if self._submitter.gate.draining:
                            return  # a drain: no new row (the rerun takes them)
                        await self._route(item, send)
        finally:
            reader.close()

    def _rows(self, reader: JournalReader, *, is_done: Callable[[str], bool],
              stats: ProducerStats, list_folders: bool = True) -> Iterator[Job | BadRow]:
        return row_stream(self.settings, self.manifest, seen=reader.seen, is_done=is_done,
                          stats=stats, list_folders=list_folders,
                          s3=self._s3.blocking() if self._s3 is not None else None)

    async def _route(self, item: Job | BadRow, send: MemoryObjectSendStream[Ticket]) -> None:
        """Send a job to the submitters, or a bad row straight to the sink."""
        if item.key in self._resumed:
            # Owned since startup by its resumed token (or that token's resubmission), which
            # writes its line. A key meets the producer once: free the memory.
            self._resumed.discard(item.key)
            return
        if isinstance(item, BadRow):
            await self._finisher.bad_row(Outcome.from_bad_row(item))
            return
        # The producer's reader saw every key the journal holds (not done): others are new.
        rec = await self._backend.get(item.key) if item.key in self._reader_known else None
        self._reader_known.discard(item.key)
        if rec is not None and rec.state in (RowState.DONE, RowState.SUBMITTED):
            return  # safety nets: done rows are skipped by the reader, tokens were resumed
        while self._scheduler.lateness() > MAX_POLL_LATENESS_S:
            await self._clock.sleep(1.0)
        attempts, dup = 1, False
        if rec is not None and rec.state == RowState.SUBMITTING:
            # A crash mid-POST: the server may hold a run. Same generation → same idempotency
            # key (if the request is the same), so a server that honours it replays the run.
            attempts, dup = max(rec.attempts, 1), True
        elif rec is not None and rec.state == RowState.PENDING and rec.attempts:
            attempts = rec.attempts + 1
        await send.send(Ticket(item, attempts, dup))

    # ---- tokens of an earlier run --------------------------------------------------------------

    async def resume(self, tg: anyio.abc.TaskGroup) -> None:
        """Take over the tokens journaled by an earlier run (see the module docstring)."""
        records = await self._backend.live_tokens()
        if not records:
            return
        wanted = {r.key: r for r in records}
        found = await anyio.to_thread.run_sync(self._find_rows, set(wanted))
        for key, rec in wanted.items():
            await self._resume_one(rec, found.get(key), tg)

    async def _resume_one(self, rec: RowRecord, item: Job | BadRow | None,
                          tg: anyio.abc.TaskGroup) -> None:
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
        payload, identity = (self._submitter.submission(job, asynchronous=True, key_fp=rec.key_fp)
                             if job is not None else ({}, None))
        action = resume_action(
            in_manifest=item is not None, bad_row=bad is not None,
            journaled_identity=rec.request_fp or _legacy_identity(rec, job, identity),
            current_identity=identity)
        if action is ResumeAction.DROP:
            self._rows_dropped += 1
            log.warning("row_left_manifest", id=rec.id, line=rec.line,
                        hint="its journaled token is dropped: no line for a row that is no "
                             "longer in the manifest")
            await self._backend.forget(rec.key)
            return
        self._rows_resumed += 1
        self._resumed.add(rec.key)
        if action is ResumeAction.FAIL:
            assert bad is not None
            await self._finisher.bad_row(Outcome(
                key=rec.key, line=rec.line or 0, id=rec.id or "", folder=rec.folder or "",
                status=Status.FAILED, error=bad, completed_at=time.time(), attempts=rec.attempts))
            return
        assert job is not None
        await self._outstanding.acquire()
        if action is ResumeAction.RESUBMIT:
            # Never pair a changed row with the result of its old request: resubmit.
            log.info("row_changed", id=job.id,
                     hint="its folder, options or files changed since it was submitted: "
                          "resubmitted under a new key")
            await self._backend.mark_pending(rec.key)
            tg.start_soon(self._submitter.submit,
                          Ticket(job, rec.attempts + 1, rec.possible_duplicate))
            return
        self._scheduler.add(Submitted(
            job=job, token=rec.token or "", submitted_at=rec.submitted_at or time.time(),
            submitted_mono=self._clock.now(), attempts=rec.attempts, run_id=rec.run_id,
            resumed=True, possible_duplicate=rec.possible_duplicate,
            analyse_type=sent_types(payload)), delay=0.0)

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
        """``job`` with its folder listed now (raises ManifestError); in a worker thread."""
        s = self.settings
        if isinstance(job.path, S3Url):
            if self._s3 is None:
                raise ManifestError("folder_unreadable", f"{job.path}: no S3 access in this run")
            entries = self._s3.blocking().list_folder(job.path, max_file_size=s.max_file_size)
            return dataclasses.replace(job, files=entries, fingerprint=fingerprint_folder(entries))
        files = list_folder(job.path, max_file_size=s.max_file_size,
                            follow_symlinks=s.follow_symlinks)
        return dataclasses.replace(job, files=files, fingerprint=fingerprint_files(files))


def _take(rows: Iterator[Job | BadRow], n: int) -> list[Job | BadRow]:
    """Up to ``n`` rows, fewer when listing them takes longer than ``_BATCH_S``."""
    out: list[Job | BadRow] = []
    end = time.monotonic() + _BATCH_S
    for item in rows:
        out.append(item)
        if len(out) >= n or time.monotonic() >= end:
            break
    return out


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
