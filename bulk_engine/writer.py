"""The only code that touches the output file: one JSONL line per manifest row, durably.

Where it sits::

    poll scheduler / producer (bad rows) ──Outcome──▶ ResultWriter ──▶ results.jsonl
                                                           └──(after fsync)──▶ journal done-marks

Ordering rule: a row is marked done in the journal only after its line is fsynced, and the
journal's ``output_offset`` moves in the same transaction. At startup, :func:`repair_tail` cuts a
line torn by a crash, and :func:`reconcile` marks done every complete line past
``output_offset`` (lines written, or fsynced, just before a crash whose journal commit was lost).
Together they give invariant 1: every row ends as exactly one line, whatever crashes happen.

``--retry-failed`` drops the failed rows' lines with :func:`rewrite_without_failed`
(write a temporary file, fsync, rename, fsync the directory), between
``Journal.begin_retry_failed`` and ``Journal.finish_retry_failed``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from bulk_engine.clock import Clock, MonotonicClock
from bulk_engine.journal import RETRYING, Journal
from bulk_engine.models import Outcome, row_key

log = structlog.get_logger(__name__)

_CHUNK = 64 * 1024
_RECONCILE_BATCH = 1000  # lines per journal commit while reconciling


# ---------------------------------------------------------------------- startup repair


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_tail(path: Path) -> int:
    """Cut a torn last line (no trailing newline) back to the last ``\\n`` and fsync.

    Returns the number of bytes removed (0 for a clean or missing file).
    """
    try:
        fh = open(path, "r+b")  # noqa: SIM115 - closed below, needs r+b for truncate
    except FileNotFoundError:
        return 0
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # Scan backwards for the last newline.
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - _CHUNK)
            fh.seek(start)
            chunk = fh.read(end - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    removed = size - keep
    log.warning("output_tail_repaired", path=str(path), bytes_removed=removed)
    return removed


def _line_key(line: bytes) -> tuple[str, str] | None:
    """(journal key, status) of one output line, or None if it is not a valid record."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    row_id, status, line_no = rec.get("id"), rec.get("status"), rec.get("line")
    if not isinstance(row_id, str) or status not in ("completed", "failed"):
        return None
    error = rec.get("error")
    duplicate = isinstance(error, dict) and error.get("kind") == "duplicate_id"
    if duplicate and not isinstance(line_no, int):
        return None
    return row_key(row_id, line_no if isinstance(line_no, int) else 0, duplicate=duplicate), status


@dataclass(slots=True)
class ReconcileReport:
    """What :func:`reconcile` found past the journal's offset."""

    repaired_bytes: int = 0  # torn tail cut by repair_tail
    start_offset: int = 0  # where the scan began
    end_offset: int = 0  # the output's size, now the journal's offset
    lines_marked: int = 0  # complete lines marked done in the journal
    already_done: int = 0  # of those, keys the journal had done already: duplicate lines
    bad_lines: int = 0  # lines that are not a valid record (should not happen)
    bad_line_offsets: list[int] = field(default_factory=list)  # first few, for the message
    rescanned: bool = False  # the offset was past EOF (file replaced): scanned from 0


def reconcile(path: Path, journal: Journal) -> ReconcileReport:
    """Make the journal agree with the output: call at startup, before anything is written.

    Repairs a torn tail, then streams the output from ``journal.output_offset`` to EOF and
    marks each line's row done (outcome = the line's status), in batches, moving the offset
    with each batch. Lines that are not valid records are counted, not fatal.
    """
    report = ReconcileReport(repaired_bytes=repair_tail(path))
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        report.start_offset = report.end_offset = 0
        if journal.output_offset != 0:
            log.warning("output_missing", path=str(path), journal_offset=journal.output_offset)
            report.rescanned = True
        journal.mark_done_many([], 0)
        return report
    with fh:
        size = os.fstat(fh.fileno()).st_size
        start = journal.output_offset
        if start > size:
            # The file is shorter than the journal says: replaced (an interrupted
            # --retry-failed rewrite) or edited by hand. Every line in it is done, so
            # scanning from the start is safe; it only costs time.
            log.warning(
                "output_shorter_than_journal", path=str(path), size=size, journal_offset=start
            )
            start = 0
            report.rescanned = True
        report.start_offset = start
        fh.seek(start)
        pos = start
        items: list[tuple[str, str]] = []
        for line in fh:
            line_start = pos
            pos += len(line)
            parsed = _line_key(line) if line.endswith(b"\n") else None
            if parsed is None:
                report.bad_lines += 1
                if len(report.bad_line_offsets) < 10:
                    report.bad_line_offsets.append(line_start)
            else:
                if journal.is_done(parsed[0]):
                    report.already_done += 1
                items.append(parsed)
                report.lines_marked += 1
            if len(items) >= _RECONCILE_BATCH:
                journal.mark_done_many(items, pos)
                items = []
        journal.mark_done_many(items, size)
        report.end_offset = size
    if report.bad_lines:
        log.warning(
            "output_bad_lines",
            path=str(path),
            count=report.bad_lines,
            offsets=report.bad_line_offsets,
        )
    return report


def rewrite_without_failed(path: Path, journal: Journal) -> int:
    """Rewrite the output without the lines of rows in state ``retrying``; returns the new size.

    Streams into ``<path>.tmp``, fsyncs it, renames it over ``path`` and fsyncs the directory.
    Order of the kept lines is preserved. Idempotent: redoing it after a crash (at any point)
    gives the same file. Lines that are not valid records are kept; a torn tail is dropped.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        src = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        src = None
    dropped = 0
    with open(tmp, "wb") as dst:
        if src is not None:
            with src:
                for line in src:
                    if not line.endswith(b"\n"):
                        dropped += 1  # torn by a crash: repair_tail would cut it too
                        continue
                    parsed = _line_key(line)
                    if parsed is not None:
                        rec = journal.get(parsed[0])
                        if rec is not None and rec.state == RETRYING:
                            dropped += 1
                            continue
                    dst.write(line)
        dst.flush()
        os.fsync(dst.fileno())
        size = dst.tell()
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    log.info("output_rewritten", path=str(path), lines_dropped=dropped, size=size)
    return size


# ---------------------------------------------------------------------- the writer


class ResultWriter:
    """The single consumer of Outcomes: appends their lines, fsyncs in batches, then journals.

    A batch becomes durable when ``fsync_every`` lines are waiting or the oldest waiting line is
    ``fsync_interval`` seconds old (even if no new line arrives), whichever comes first, and at
    the end of the stream. For each durable batch: ``os.fsync`` (in a worker thread), then
    ``journal.mark_done_many`` with the file size, then ``on_durable(batch)``.

    Cancellation (Ctrl-C) still makes every line already received durable and journaled: the
    final flush runs shielded. (An Outcome handed over by the sender at the very instant of
    cancellation can be lost inside the memory stream; its row is then not done in the journal,
    so a rerun redoes it: never a missing or doubled line.)
    """

    def __init__(
        self,
        path: Path,
        journal: Journal,
        *,
        fsync_every: int = 64,
        fsync_interval: float = 0.25,
        clock: Clock | None = None,
        on_durable: Callable[[list[Outcome]], None] | None = None,
    ) -> None:
        """Prepare a writer for ``path``; nothing is opened until :meth:`run`."""
        if fsync_every < 1:
            raise ValueError("fsync_every must be at least 1")
        if fsync_interval <= 0:
            raise ValueError("fsync_interval must be positive")
        self.path = Path(path)
        self.journal = journal
        self.fsync_every = fsync_every
        self.fsync_interval = fsync_interval
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.on_durable = on_durable
        self.lines_written = 0  # appended to the file
        self.lines_durable = 0  # fsynced and journaled
        self.bytes_written = 0
        self.fsyncs = 0
        self._fd = -1
        self._size = 0  # file size after the last complete line we wrote
        self._pending: list[Outcome] = []  # written, not yet fsynced
        self._first_pending_at = 0.0
        self._failed = False  # a flush failed: journal nothing more (see _flush)
        # Created in run(): anyio primitives need a running event loop.
        self._wake: anyio.Event | None = None
        self._flush_lock: anyio.Lock | None = None

    def stats(self) -> dict[str, Any]:
        """The writer's counters, for the run's stats record."""
        return {
            "lines_written": self.lines_written,
            "lines_durable": self.lines_durable,
            "bytes_written": self.bytes_written,
            "fsyncs": self.fsyncs,
        }

    async def run(self, receive: anyio.abc.ObjectReceiveStream[Outcome]) -> None:
        """Consume ``receive`` until it ends (or the task is cancelled), then flush everything.

        Closes ``receive`` on return. Expects :func:`reconcile` to have run at startup; a torn
        tail found anyway is repaired before appending.
        """
        self._wake = anyio.Event()
        self._flush_lock = anyio.Lock()
        repair_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size
        try:
            async with receive, anyio.create_task_group() as tg:
                tg.start_soon(self._interval_flusher)
                async for outcome in receive:
                    self._append(outcome)
                    if len(self._pending) >= self.fsync_every:
                        await self._flush()
                tg.cancel_scope.cancel()
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await self._flush()
            finally:
                os.close(self._fd)
                self._fd = -1

    def _append(self, outcome: Outcome) -> None:
        """Write one line (synchronously: a small write to the page cache)."""
        data = outcome.to_line()
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except BaseException:
            # Never leave half a line for the next one to be glued to.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size += len(data)
        self.lines_written += 1
        self.bytes_written += len(data)
        if not self._pending:
            self._first_pending_at = self.clock.now()
            if self._wake is not None:
                self._wake.set()
        self._pending.append(outcome)

    async def _interval_flusher(self) -> None:
        """Flush when the oldest waiting line is ``fsync_interval`` old, even with no new line."""
        while True:
            if not self._pending:
                self._wake = wake = anyio.Event()
                await wake.wait()
                continue
            delay = self._first_pending_at + self.fsync_interval - self.clock.now()
            if delay > 0:
                await self.clock.sleep(delay)
                continue  # the batch may have been flushed by count meanwhile: recheck
            await self._flush()

    async def _flush(self) -> None:
        """fsync what was written, then mark it done; shielded so it completes once started.

        If the fsync or the journal commit fails, nothing more is ever journaled by this writer:
        a later offset would cover lines whose rows are not done, and reconcile (which starts at
        the offset) would miss them. The error propagates and the run stops; a rerun reconciles
        from the last good offset.
        """
        assert self._flush_lock is not None, "run() not started"
        with anyio.CancelScope(shield=True):
            async with self._flush_lock:
                if not self._pending or self._failed:
                    return
                batch, self._pending = self._pending, []
                offset = self._size  # lines written during the fsync belong to the next batch
                try:
                    await anyio.to_thread.run_sync(os.fsync, self._fd)
                    self.fsyncs += 1
                    self.journal.mark_done_many(((o.key, o.status) for o in batch), offset)
                except BaseException:
                    self._failed = True
                    raise
                self.lines_durable += len(batch)
        if self.on_durable is not None:
            self.on_durable(batch)
