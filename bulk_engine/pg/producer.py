"""The ``--db`` producer: the manifest into the shared run, then rows claimed under leases.

Where it sits (one :class:`ClaimProducer` per API key of the worker, its *lane*)::

    manifest.csv ─load_manifest─▶ RunStore (every worker loads; each row is inserted once)
    RunStore.claim ─▶ ClaimProducer ─Ticket─▶ [bounded stream] ─▶ Submitters (this key)
    (this key's tokens first,   ├─Submitted (a live token) ─▶ PollScheduler (this key)
     then manifest order)       └─bad rows (a folder gone) ─▶ Finisher

Loading: every worker streams the manifest (``rules.row_stream``, folders not listed) into the
run; rows that are bad in the manifest itself (duplicate ids, unparsable lines, bad options) go
in done with their failed line. A worker that finds the run loaded skips it.

Claiming: small batches (``claim_batch``), when this lane has room (a unit free in its
:class:`LaneWindow`, which the submitters take before each upload and a row gives back when it
ends), and at most the key's free share of the shared outstanding window
(:func:`outstanding_window`) of new rows. A claimed row's folder is resolved against this
worker's manifest directory (``manifest.resolve_folder``) and listed now: paths resolve on each
worker (shared storage, mounted anywhere). Then, by the row's state:

* ``submitted`` (a live token, another worker's or an earlier run's): polled when the folder is
  the request the token was issued for (``policy.resume_action``, the request identity stored
  by ``mark_submitting``), never resubmitted; resubmitted under a new generation if it changed;
  failed if the folder is gone;
* ``submitting`` (its POST may have reached the API): sent again with the same generation, so
  the same Idempotency-Key, and flagged ``possible_duplicate``;
* ``pending``: sent under its next generation.

When no row is free, the lane waits for a slot to free or ``idle_s``, and tries again: rows
held by a worker that died come free when their leases run out. It ends once it holds nothing
and the run is finished (every row done), or at once when the worker drains (``SIGUSR1``: the
tokens it holds are still polled out; the rows it had claimed go back to the run).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Generator, Hashable
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from bulk_engine.backend import RowLost
from bulk_engine.clock import Clock
from bulk_engine.config import Settings
from bulk_engine.errors import ConfigError, ManifestError
from bulk_engine.finisher import Finisher
from bulk_engine.logs import get_logger
from bulk_engine.manifest import ProducerStats, list_folder, resolve_folder
from bulk_engine.models import BadRow, Job, Outcome, Submitted, Ticket, fingerprint_files
from bulk_engine.pg.backend import PgBackend, job_options
from bulk_engine.pg.governor import Governor
from bulk_engine.pg.rows import ClaimedRow, LeaseKeeper, LoadReport, RowSpec, RunStore
from bulk_engine.policy import ResumeAction, resume_action
from bulk_engine.producer import MAX_POLL_LATENESS_S, ProducerStatistics
from bulk_engine.rules import row_stream, scratch_seen
from bulk_engine.s3.url import S3Url
from bulk_engine.scheduler import PollScheduler
from bulk_engine.submitter import Submitter, sent_types
from bulk_engine.tuning import OutstandingWindow, WindowController
from bulk_engine.vocab import RowState

__all__ = ["ClaimProducer", "LaneWindow", "load_manifest", "outstanding_window", "row_specs"]

log = get_logger()


def row_specs(settings: Settings, manifest: Path) -> Generator[RowSpec, None, None]:
    """The manifest's rows as the run stores them (folders not listed: that is the claimer's)."""
    with scratch_seen() as seen:
        for item in row_stream(settings, manifest, seen=seen, is_done=None,
                               stats=ProducerStats(), list_folders=False):
            if isinstance(item, BadRow):
                yield RowSpec(key=item.key, id=item.id, folder=item.folder, line=item.line,
                              output=Outcome.from_bad_row(item).to_line(),
                              error_kind=item.kind)
            else:
                yield RowSpec(key=item.key, id=item.id, folder=item.folder, line=item.line,
                              options=job_options(item))


async def load_manifest(store: RunStore, settings: Settings, manifest: Path) -> LoadReport:
    """Load the manifest's rows into the run (idempotent; skipped once a worker loaded it)."""
    if store.run.loaded:
        return LoadReport(0, 0)
    specs = row_specs(settings, manifest)
    try:
        report = await store.load(specs)
    finally:
        specs.close()
    log.info("manifest_loaded", run=store.run.name, rows=report.rows_read,
             new=report.rows_inserted, rows_total=store.run.rows_total)
    return report


async def outstanding_window(governor: Governor, settings: Settings) -> tuple[int, int]:
    """The key's outstanding window across every worker: (limit, in use).

    The one place the limit is read: the value the lanes' adaptive windows publish with
    ``Governor.set_window`` (:meth:`ClaimProducer._publish_window`), at most this worker's
    ``max_outstanding``; without one, ``max_outstanding``. In use: rows of the key whose analysis
    may be running (``submitting`` or ``submitted``), whichever worker holds them.
    """
    limit, in_use = await governor.window()
    return (settings.max_outstanding if limit is None else min(limit, settings.max_outstanding),
            in_use)


class LaneWindow(OutstandingWindow):
    """One lane's outstanding window: a unit per folder submitted here and not yet retrieved,
    taken by the submitters before each upload (a live token taken over: by the producer) and
    given back when its row ends (``Finisher``); at most ``max_outstanding``.

    Adaptive with a ``WindowController`` (the default, ``adaptive_window``), fixed without:
    the lane learns the key's parallel capacity from its own folders' latencies, as a single
    machine does, and :class:`ClaimProducer` publishes what it learned as the key's window
    shared by every worker (:func:`outstanding_window`), which bounds the claims of new rows
    across workers. Time the producer spends held back by either window counts as waiting
    (``hold``). It also wakes the producer whenever a unit comes back (:meth:`wait_freed`): a
    finished row may make room for a claim.
    """

    def __init__(self, max_outstanding: int, *, controller: WindowController | None = None,
                 clock: Clock | None = None) -> None:
        super().__init__(max_outstanding=max_outstanding, controller=controller, clock=clock)
        self._freed = anyio.Event()

    def free(self) -> int:
        return self.limit - self.in_use

    def release(self, key: Hashable | None = None) -> None:
        super().release(key)
        self._freed.set()
        self._freed = anyio.Event()

    async def wait_freed(self, timeout: float) -> None:
        """Until a unit comes back, or ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            await self._freed.wait()


@dataclass(frozen=True, slots=True)
class _Listed:
    row: ClaimedRow
    item: Job | BadRow


class ClaimProducer:
    """Feeds one lane (one API key) of this worker from the shared run (module docstring)."""

    def __init__(self, settings: Settings, manifest: Path, *, store: RunStore,
                 keeper: LeaseKeeper, backend: PgBackend, governor: Governor, db_key_fp: str,
                 window: LaneWindow, finisher: Finisher, scheduler: PollScheduler,
                 submitter: Submitter, clock: Clock) -> None:
        self.settings = settings
        self._base = os.path.dirname(os.path.abspath(manifest))
        self._confine = (os.path.realpath(settings.confine_to)
                         if settings.confine_to is not None else None)
        self._store = store
        self._keeper = keeper
        self._backend = backend
        self._governor = governor
        self._db_key_fp = db_key_fp
        self._window = window
        self._finisher = finisher
        self._scheduler = scheduler
        self._submitter = submitter
        self._clock = clock
        self.idle_s = min(1.0, settings.lease / 4)
        self._published: tuple[int | None] | None = None  # (the shared window written,)
        self._accepted = self._rejected = self._resumed = 0

    def statistics(self) -> ProducerStatistics:
        """``rows_read``: rows claimed that started a work item here (accepted + rejected)."""
        return ProducerStatistics(self._accepted + self._rejected, self._accepted,
                                  self._rejected, 0, self._resumed, 0)

    async def run(self, send: MemoryObjectSendStream[Ticket]) -> None:
        """Claim and route rows until this worker holds none and the run is finished."""
        async with send:
            while True:
                if self._submitter.gate.draining:
                    return  # a drain (SIGUSR1): no new row; the tokens held are polled out
                free = self._window.free()
                if free <= 0:
                    self._window.hold(True)  # this lane's window binds
                    await self._window.wait_freed(self.idle_s)
                    continue
                while self._scheduler.lateness() > MAX_POLL_LATENESS_S:
                    await self._clock.sleep(1.0)  # due polls first: results expire
                await self._publish_window()
                limit, in_use = await outstanding_window(self._governor, self.settings)
                new = max(0, limit - in_use - self._backend.unsent(self._db_key_fp))
                if new == 0 and self._window.in_use == 0:
                    new = 1  # an idle lane may always start one: no wait behind rows nobody polls
                rows = await self._keeper.claim(min(free, self.settings.claim_batch),
                                                api_key_fp=self._db_key_fp, max_new=new)
                if rows:
                    self._window.hold(False)
                    await self._take(rows, send)
                elif self._backend.in_flight == 0 and await self._store.finished():
                    return
                else:
                    self._window.hold(new == 0)  # the key's shared window binds
                    await self._window.wait_freed(self.idle_s)

    async def _publish_window(self) -> None:
        """The key's shared window is what this lane learned (adaptive), or none (fixed: every
        worker's ``max_outstanding``). Written when it changes; the last writer wins, and every
        worker learns from the same server, so they agree within their noise."""
        value = self._window.limit if self._window.controller is not None else None
        if self._published != (value,):
            await self._governor.set_window(value)
            self._published = (value,)

    async def _take(self, rows: list[ClaimedRow], send: MemoryObjectSendStream[Ticket]) -> None:
        fresh = [r for r in rows if self._backend.adopt(r, for_key=self._db_key_fp)]
        for listed in await anyio.to_thread.run_sync(self._list_all, fresh):
            await self._route(listed.row, listed.item, send)

    def _list_all(self, rows: list[ClaimedRow]) -> list[_Listed]:
        return [_Listed(row, self._job(row)) for row in rows]

    def _job(self, row: ClaimedRow) -> Job | BadRow:
        """The row as a Job with its folder listed now, or why it cannot be sent."""
        s = self.settings
        try:
            path = resolve_folder(row.folder, self._base, self._confine)
            if isinstance(path, S3Url):  # the worker stops; the row waits, untouched
                raise ConfigError(f"row {row.id!r} is a folder in a bucket ({row.folder}): "
                                  "s3:// folders are not supported with --db yet; run this "
                                  "manifest without --db")
            files = list_folder(path, max_file_size=s.max_file_size,
                                follow_symlinks=s.follow_symlinks)
        except ManifestError as exc:
            return BadRow(row.line, row.id, row.folder, exc.kind, exc.message)
        opts = row.options
        types = opts.get("analyse_type")
        return Job(line=row.line, id=row.id, folder=row.folder, path=path, files=files,
                   use_case=opts.get("use_case"), analyse_type=tuple(types) if types else None,
                   payload=dict(opts.get("payload") or {}), fingerprint=fingerprint_files(files))

    async def _route(self, row: ClaimedRow, item: Job | BadRow,
                     send: MemoryObjectSendStream[Ticket]) -> None:
        if isinstance(item, BadRow):
            self._rejected += 1
            await self._finisher.bad_row(dataclasses.replace(
                Outcome.from_bad_row(item), attempts=row.generation))
            return
        job = item
        self._accepted += 1
        if row.state is RowState.SUBMITTED:
            payload, identity = self._submitter.submission(job, asynchronous=True)
            action = resume_action(in_manifest=True, bad_row=False,
                                   journaled_identity=row.request_fp, current_identity=identity)
            if action is ResumeAction.POLL:
                self._resumed += 1
                await self._window.acquire()  # its unit: the submitters take theirs themselves
                self._scheduler.add(Submitted(
                    job=job, token=row.token or "", submitted_at=row.submitted_at or time.time(),
                    submitted_mono=self._clock.now(), attempts=row.generation,
                    run_id=row.api_run_id, resumed=True,
                    possible_duplicate=row.possible_duplicate,
                    analyse_type=sent_types(payload)), delay=0.0)
                return
            log.info("row_changed", id=job.id,
                     hint="its folder changed since it was submitted: resubmitted under a new "
                          "key")
            try:
                await self._backend.mark_pending(row.key)
            except RowLost:  # lost already: no unit was taken for it, nothing to give back
                log.info("row_dropped", key=row.key, hint="another worker holds this row now")
                return
            await send.send(Ticket(job, row.generation + 1, row.possible_duplicate))
            return
        await send.send(Ticket(job, row.next_generation,
                               row.possible_duplicate or row.state is RowState.SUBMITTING))
