"""The only code that touches the output file: one JSONL line per manifest row, durably.

Where it sits::

    poll scheduler / producer (bad rows) ──Outcome──▶ ResultWriter ──▶ results.jsonl
                                                           └──(after fsync)──▶ journal done-marks

Ordering rule: a row is marked done in the journal only after its line is fsynced, and the
journal's ``output_offset`` moves in the same transaction, with a digest of the output's last
bytes before it (``tail_digest``). At startup, :func:`repair_tail` cuts a line torn by a crash,
and :func:`reconcile` makes the journal agree with the output file, which is the authority for
what is done: when the bytes before the offset are still the ones the journal saw, it only marks
done the complete lines past ``output_offset`` (lines written, or fsynced, just before a crash
whose journal commit was lost); when the output was deleted, truncated or edited, it rescans the
whole file and redoes every row the journal had done whose line is gone
(``Journal.rebuild_from_output``). Together they give invariant 1: every row ends as exactly one
line, whatever crashes or hand edits happen.

Only one process writes an output at a time: :func:`lock_output` holds ``<output>.lock``.

``--retry-failed`` drops the failed rows' lines with :func:`rewrite_without_failed`
(write a temporary file, fsync, rename, fsync the directory), between
``Journal.begin_retry_failed`` and ``Journal.finish_retry_failed``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from bulk_engine.clock import Clock, MonotonicClock
from bulk_engine.errors import StorageError
from bulk_engine.journal import RETRYING, Journal, RebuildReport, lock_exclusively
from bulk_engine.models import Outcome, row_key
from bulk_engine.vocab import Status

__all__ = [
    "TAIL_BYTES",
    "OutputLock",
    "ReconcileReport",
    "ResultWriter",
    "WriterStatistics",
    "file_tail_digest",
    "fsync_dir",
    "reconcile",
    "repair_tail",
    "rewrite_without_failed",
    "storage_error",
    "tail_digest",
]

log = structlog.get_logger(__name__)

_CHUNK = 64 * 1024
_RECONCILE_BATCH = 1000  # lines per journal commit while reconciling
TAIL_BYTES = 4096  # the window before the journal's offset that tells an edited output


def tail_digest(window: bytes) -> str:
    """The digest the journal keeps of the output's last ``TAIL_BYTES`` before its offset."""
    return hashlib.sha256(window[-TAIL_BYTES:]).hexdigest()[:32]


def _read_window(path: Path, offset: int) -> bytes:
    """The file's last ``TAIL_BYTES`` before ``offset`` (fewer if it is shorter or missing)."""
    try:
        with open(path, "rb") as fh:
            start = max(0, offset - TAIL_BYTES)
            fh.seek(start)
            return fh.read(offset - start)
    except FileNotFoundError:
        return b""


def file_tail_digest(path: Path, offset: int) -> str | None:
    """:func:`tail_digest` of the file's bytes before ``offset``; None if it is shorter."""
    window = _read_window(path, offset)
    return tail_digest(window) if len(window) == offset - max(0, offset - TAIL_BYTES) else None


def storage_error(path: Path, what: str, exc: OSError) -> StorageError:
    """An OSError on the output as one clear line: which file, what failed, what to do."""
    reason = exc.strerror or str(exc)
    hint = ("free space on that disk, then rerun the same command (the state is saved)"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) else
            "check the disk and the file's permissions, then rerun the same command")
    return StorageError(f"cannot {what} output {path}: {reason}; {hint}")


class OutputLock:
    """``<output>.lock`` held with ``flock``: one process writes an output at a time.

    Two runs given the same output (even with different ``--journal``) would interleave their
    lines; the second is refused with a ConfigError instead.
    """

    def __init__(self, output: Path) -> None:
        # Beside the output as named (its directory resolved): an output that is itself a
        # symlink still gets its lock next to the link.
        output = Path(output)
        self.path = Path(os.path.realpath(output.parent)) / f"{output.name}.lock"
        self._fd: int | None = None

    def acquire(self, timeout: float = 1.0) -> None:
        self._fd = lock_exclusively(
            self.path, timeout, what="output's lock",
            busy=f"output {self.path.with_suffix('')} is being written by another running "
                 "bulk_engine process; wait for it to finish or choose another --output")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------- startup repair


def fsync_dir(path: Path) -> None:
    """fsync a directory: a rename or a new file in it survives a power loss."""
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


def _line_key(line: bytes) -> tuple[str, str, str | None] | None:
    """(journal key, status, error kind) of one output line, or None if it is not a record."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    row_id, status, line_no = rec.get("id"), rec.get("status"), rec.get("line")
    if not isinstance(row_id, str) or status not in (Status.COMPLETED, Status.FAILED):
        return None
    error = rec.get("error")
    kind = error.get("kind") if isinstance(error, dict) else None
    duplicate = kind == "duplicate_id"
    if duplicate and not isinstance(line_no, int):
        return None
    key = row_key(row_id, line_no if isinstance(line_no, int) else 0, duplicate=duplicate)
    return key, status, kind if isinstance(kind, str) else None


@dataclass(slots=True)
class ReconcileReport:
    """What :func:`reconcile` found."""

    repaired_bytes: int = 0  # torn tail cut by repair_tail
    start_offset: int = 0  # where the scan began
    end_offset: int = 0  # the output's size, now the journal's offset
    lines_marked: int = 0  # complete lines marked done in the journal
    already_done: int = 0  # of those, keys the journal had done already: duplicate lines
    bad_lines: int = 0  # lines that are not a valid record (should not happen)
    bad_line_offsets: list[int] = field(default_factory=list)  # first few, for the message
    rescanned: bool = False  # the output changed behind the journal: scanned whole, done-set
    rebuilt: RebuildReport | None = None  # what the rescan redid

    @property
    def rows_redone(self) -> int:
        return self.rebuilt.redone if self.rebuilt is not None else 0


def reconcile(path: Path, journal: Journal) -> ReconcileReport:
    """Make the journal agree with the output: call at startup, before anything is written.

    Repairs a torn tail. If the bytes before the journal's offset are still the ones it saw
    (``tail_digest``), streams the output from there to EOF and marks each line's row done
    (outcome and error kind from the line), in batches, moving the offset with each batch.
    Otherwise (the output was deleted, truncated or edited by hand) rescans the whole file and
    rebuilds the done-set from it: rows done in the journal whose line is gone are redone. Lines
    that are not valid records are counted, not fatal.
    """
    report = ReconcileReport(repaired_bytes=repair_tail(path))
    offset = journal.output_offset
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        size = -1
    known_tail = journal.output_tail
    # Intact: never written (no file, offset 0), or the bytes before the offset are the ones
    # the journal last saw (a journal from before tails were recorded trusts the size).
    intact = (size < 0 and offset == 0) or (size >= offset and (
        offset == 0 or known_tail is None or file_tail_digest(path, offset) == known_tail))
    if not intact:
        return _rebuild(path, journal, report, max(size, 0))
    if size < 0:  # never written: nothing to reconcile
        journal.mark_done_many([], 0, tail=tail_digest(b""))
        return report
    report.start_offset = offset
    items: list[tuple[str, str, str | None]] = []
    with open(path, "rb") as fh:
        fh.seek(offset)
        pos = offset
        for line_start, line, parsed in _scan(fh, offset, report):
            pos = line_start + len(line)
            if parsed is None:
                continue
            if journal.is_done(parsed[0]):
                report.already_done += 1
            items.append(parsed)
            report.lines_marked += 1
            if len(items) >= _RECONCILE_BATCH:
                journal.mark_done_many(items, pos, tail=file_tail_digest(path, pos))
                items = []
    journal.mark_done_many(items, size, tail=file_tail_digest(path, size))
    report.end_offset = size
    _warn_bad_lines(path, report)
    return report


def _scan(fh: Any, start: int, report: ReconcileReport
          ) -> Iterator[tuple[int, bytes, tuple[str, str, str | None] | None]]:
    """``(offset, line, parsed)`` for each line from ``start``; bad lines counted in ``report``."""
    pos = start
    for line in fh:
        line_start = pos
        pos += len(line)
        parsed = _line_key(line) if line.endswith(b"\n") else None
        if parsed is None:
            report.bad_lines += 1
            if len(report.bad_line_offsets) < 10:
                report.bad_line_offsets.append(line_start)
        yield line_start, line, parsed


def _rebuild(path: Path, journal: Journal, report: ReconcileReport, size: int) -> ReconcileReport:
    """The whole output decides what is done (see :meth:`Journal.rebuild_from_output`)."""
    report.rescanned = True
    report.start_offset = 0
    log.warning("output_changed", path=str(path), size=max(size, 0),
                journal_offset=journal.output_offset,
                hint="the output is not what the journal last saw (deleted, truncated or "
                     "edited): rescanning it; rows whose line is gone are redone")
    try:
        fh: Any = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        fh = None

    def items() -> Iterator[tuple[str, str, str | None]]:
        if fh is None:
            return
        for _, _, parsed in _scan(fh, 0, report):
            if parsed is not None:
                report.lines_marked += 1
                yield parsed

    try:
        report.rebuilt = journal.rebuild_from_output(
            items(), size, tail=file_tail_digest(path, size) if fh is not None
            else tail_digest(b""))
    finally:
        if fh is not None:
            fh.close()
    report.end_offset = size
    report.already_done = report.rebuilt.already_done
    if report.rebuilt.redone:
        log.warning("rows_redone", rows=report.rebuilt.redone,
                    repolled=report.rebuilt.repolled, resubmitted=report.rebuilt.resubmitted,
                    hint="their lines are not in the output: they are done again")
    if report.rebuilt.duplicate_keys:
        log.warning("output_duplicate_lines", rows=report.rebuilt.duplicate_keys,
                    hint="some rows have more than one line (two runs appended to one file?)")
    _warn_bad_lines(path, report)
    return report


def _warn_bad_lines(path: Path, report: ReconcileReport) -> None:
    if report.bad_lines:
        log.warning(
            "output_bad_lines",
            path=str(path),
            count=report.bad_lines,
            offsets=report.bad_line_offsets,
        )


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
    fsync_dir(path.parent)
    log.info("output_rewritten", path=str(path), lines_dropped=dropped, size=size)
    return size


# ---------------------------------------------------------------------- the writer


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    """Lines appended, made durable (fsynced and journaled), bytes written, fsyncs done."""

    lines_written: int
    lines_durable: int
    bytes_written: int
    fsyncs: int


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
        self._tail = b""  # the file's last TAIL_BYTES, for the journal's tail digest
        self._pending: list[Outcome] = []  # written, not yet fsynced
        self._first_pending_at = 0.0
        self._failed = False  # a flush failed: journal nothing more (see _flush)
        # Created in run(): anyio primitives need a running event loop.
        self._wake: anyio.Event | None = None
        self._flush_lock: anyio.Lock | None = None

    def statistics(self) -> WriterStatistics:
        """The writer's counters."""
        return WriterStatistics(self.lines_written, self.lines_durable, self.bytes_written,
                                self.fsyncs)

    async def run(self, receive: anyio.abc.ObjectReceiveStream[Outcome]) -> None:
        """Consume ``receive`` until it ends (or the task is cancelled), then flush everything.

        Closes ``receive`` on return. Expects :func:`reconcile` to have run at startup; a torn
        tail found anyway is repaired before appending.
        """
        self._wake = anyio.Event()
        self._flush_lock = anyio.Lock()
        try:
            repair_tail(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._size = os.fstat(self._fd).st_size
            self._tail = _read_window(self.path, self._size)
        except OSError as exc:
            raise storage_error(self.path, "open", exc) from None
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
        except BaseException as exc:
            # Never leave half a line for the next one to be glued to.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise storage_error(self.path, "write to", exc) from None
            raise
        self._size += len(data)
        self._tail = (self._tail + data)[-TAIL_BYTES:]
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
                tail = tail_digest(self._tail)
                try:
                    try:
                        await anyio.to_thread.run_sync(os.fsync, self._fd)
                    except OSError as exc:
                        raise storage_error(self.path, "fsync", exc) from None
                    self.fsyncs += 1
                    self.journal.mark_done_many(
                        ((o.key, o.status, o.error.kind if o.error else None) for o in batch),
                        offset, tail=tail)
                except BaseException:
                    self._failed = True
                    raise
                self.lines_durable += len(batch)
        if self.on_durable is not None:
            self.on_durable(batch)
