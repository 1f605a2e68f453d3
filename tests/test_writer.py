"""ResultWriter and the startup repair: durable lines first, journal done-marks after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from bulk_engine.clock import FakeClock, MonotonicClock
from bulk_engine.journal import Journal
from bulk_engine.models import ErrorInfo, Outcome, row_key
from bulk_engine.writer import (
    ResultWriter,
    reconcile,
    repair_tail,
    rewrite_without_failed,
)

REPO = Path(__file__).resolve().parents[1]


def make_outcome(i: int, status: str = "completed", *, kind: str | None = None) -> Outcome:
    line = i + 2
    row_id = f"row-{i}"
    return Outcome(
        key=row_key(row_id, line, duplicate=kind == "duplicate_id"),
        line=line,
        id=row_id,
        folder=f"folders/{i}",
        status=status,
        result={"score": i} if status == "completed" else None,
        error=ErrorInfo(kind or "server_failed", "boom") if status == "failed" else None,
        submitted_at=1_700_000_000.0,
        completed_at=1_700_000_012.5,
    )


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def size_of(path: Path) -> int:
    return path.stat().st_size


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal.open(tmp_path / "results.jsonl.journal")
    yield j
    j.close()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "results.jsonl"


async def run_writer(writer: ResultWriter, outcomes: list[Outcome]) -> None:
    send, receive = anyio.create_memory_object_stream[Outcome](0)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, receive)
            async with send:
                for o in outcomes:
                    await send.send(o)


# ---------------------------------------------------------------------- repair_tail


def test_repair_tail_cuts_a_torn_last_line(out: Path) -> None:
    """A last line without its newline (torn by a crash) is cut back to the last newline."""
    good = make_outcome(1).to_line() + make_outcome(2).to_line()
    out.write_bytes(good + b'{"id":"row-3","fol')
    assert repair_tail(out) == len(b'{"id":"row-3","fol')
    assert out.read_bytes() == good


def test_repair_tail_leaves_a_clean_file_alone(out: Path) -> None:
    """A file ending in a newline is not touched."""
    good = make_outcome(1).to_line()
    out.write_bytes(good)
    assert repair_tail(out) == 0
    assert out.read_bytes() == good


def test_repair_tail_on_missing_or_empty_file_is_a_noop(out: Path) -> None:
    """No file, or an empty one: nothing to repair."""
    assert repair_tail(out) == 0
    assert not out.exists()
    out.write_bytes(b"")
    assert repair_tail(out) == 0


def test_repair_tail_handles_a_torn_line_longer_than_a_chunk(out: Path) -> None:
    """A torn line of 200 kB (results are verbatim, can be large) is cut whole."""
    good = make_outcome(1).to_line()
    out.write_bytes(good + b"x" * 200_000)
    assert repair_tail(out) == 200_000
    assert out.read_bytes() == good
    out.write_bytes(b"y" * 70_000)  # no newline at all: nothing survives
    assert repair_tail(out) == 70_000
    assert out.read_bytes() == b""


# ---------------------------------------------------------------------- reconcile


def test_reconcile_marks_lines_past_the_offset_with_their_keys(out: Path, journal: Journal) -> None:
    """Lines written after the journal's offset become done, with duplicate_id keyed by line."""
    first = make_outcome(1).to_line() + make_outcome(2).to_line()
    journal.mark_done_many([(make_outcome(1).key, "completed")], len(first))  # row 2 "lost"
    dup = make_outcome(5, "failed", kind="duplicate_id")
    tail = [make_outcome(3), make_outcome(4, "failed"), dup]
    body = first + b"".join(o.to_line() for o in tail)
    out.write_bytes(body + b'{"id":"torn')

    report = reconcile(out, journal)

    assert report.repaired_bytes == len(b'{"id":"torn')
    assert (report.start_offset, report.end_offset) == (len(first), len(body))
    assert report.lines_marked == 3 and report.bad_lines == 0 and report.already_done == 0
    assert journal.output_offset == len(body) == out.stat().st_size
    assert journal.is_done(make_outcome(3).key)
    rec = journal.get(make_outcome(4).key)
    assert rec is not None and rec.outcome == "failed"
    assert dup.key == row_key("row-5", 7, duplicate=True) != "row-5"
    assert journal.is_done(dup.key) and journal.get("row-5") is None
    # Lines before the offset are the journal's business: not re-read.
    assert not journal.is_done(make_outcome(2).key)


def test_reconcile_counts_invalid_lines_without_failing(out: Path, journal: Journal) -> None:
    """A complete line that is not a record is counted and reported, the rest still marked."""
    bad = b"not json\n"
    out.write_bytes(
        make_outcome(1).to_line() + bad + b'{"status":"completed"}\n' + make_outcome(2).to_line()
    )
    report = reconcile(out, journal)
    assert report.bad_lines == 2 and report.lines_marked == 2
    assert report.bad_line_offsets[0] == len(make_outcome(1).to_line())
    assert journal.is_done(make_outcome(2).key)
    assert journal.output_offset == out.stat().st_size


def test_reconcile_reports_lines_for_rows_already_done(out: Path, journal: Journal) -> None:
    """A line past the offset for a row the journal had done is a duplicate: counted."""
    journal.mark_done_many([(make_outcome(1).key, "completed")], 0)
    out.write_bytes(make_outcome(1).to_line())
    assert reconcile(out, journal).already_done == 1


def test_reconcile_rescans_when_the_file_is_shorter_than_the_offset(
    out: Path, journal: Journal
) -> None:
    """An offset past EOF (file replaced) triggers a full, harmless rescan."""
    out.write_bytes(make_outcome(1).to_line())
    journal.mark_done_many([], 10_000)
    report = reconcile(out, journal)
    assert report.rescanned and report.lines_marked == 1
    assert journal.output_offset == out.stat().st_size


def test_reconcile_on_a_missing_output_is_a_noop(out: Path, journal: Journal) -> None:
    """A first run has no output yet: nothing to mark, offset 0."""
    report = reconcile(out, journal)
    assert report.lines_marked == 0 and journal.output_offset == 0


# ---------------------------------------------------------------------- ResultWriter


async def test_writer_writes_every_outcome_once_and_batches_fsyncs(
    out: Path, journal: Journal
) -> None:
    """200 outcomes with fsync_every=64 → 200 lines in order, 4 fsyncs, all rows done."""
    outcomes = [make_outcome(i, "failed" if i % 7 == 0 else "completed") for i in range(200)]
    batches: list[int] = []
    writer = ResultWriter(
        out,
        journal,
        fsync_every=64,
        clock=FakeClock(),
        on_durable=lambda b: batches.append(len(b)),
    )
    await run_writer(writer, outcomes)

    assert [r["id"] for r in read_records(out)] == [o.id for o in outcomes]
    assert writer.fsyncs == 4 and batches == [64, 64, 64, 8]
    assert writer.lines_written == writer.lines_durable == 200
    assert writer.bytes_written == size_of(out) == journal.output_offset
    counts = journal.counts()
    assert counts["done"] == 200 and counts["failed"] == len(range(0, 200, 7))


async def test_journal_marks_done_only_lines_already_durable(
    out: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each done-mark follows an fsync covering its lines; at on_durable the file holds them."""
    events: list[tuple[str, int]] = []
    real_fsync = os.fsync
    real_mark = journal.mark_done_many

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.fstat(fd).st_size))

    def mark(items: Any, output_offset: int, **kw: Any) -> None:
        events.append(("mark", output_offset))
        real_mark(items, output_offset, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(journal, "mark_done_many", mark)
    outcomes = [make_outcome(i) for i in range(50)]
    durable_so_far: list[str] = []

    def on_durable(batch: list[Outcome]) -> None:
        on_disk = {r["id"] for r in read_records(out)}
        assert {o.id for o in batch} <= on_disk
        durable_so_far.extend(o.key for o in batch)
        assert all(journal.is_done(k) for k in durable_so_far)
        assert not any(journal.is_done(o.key) for o in outcomes if o.key not in durable_so_far)
        # The offset covers exactly the lines made durable so far.
        made_durable = outcomes[: len(durable_so_far)]
        assert journal.output_offset == sum(len(o.to_line()) for o in made_durable)

    writer = ResultWriter(out, journal, fsync_every=16, clock=FakeClock(), on_durable=on_durable)
    await run_writer(writer, outcomes)

    assert len(durable_so_far) == 50
    marks = [i for i, e in enumerate(events) if e[0] == "mark"]
    assert len(marks) == 4
    for i in marks:
        assert events[i - 1][0] == "fsync" and events[i - 1][1] >= events[i][1]


async def test_cancellation_still_flushes_what_was_received(out: Path, journal: Journal) -> None:
    """Cancelling the writer mid-run (Ctrl-C) fsyncs and journals every line it received."""
    outcomes = [make_outcome(i) for i in range(10)]
    durable: list[Outcome] = []
    writer = ResultWriter(
        out, journal, fsync_every=64, clock=FakeClock(), on_durable=durable.extend
    )
    send, receive = anyio.create_memory_object_stream[Outcome](0)
    with anyio.fail_after(10):
        async with send, anyio.create_task_group() as tg:
            tg.start_soon(writer.run, receive)
            for o in outcomes:
                await send.send(o)
            await anyio.wait_all_tasks_blocked()
            assert writer.fsyncs == 0  # nothing durable yet: under both thresholds
            tg.cancel_scope.cancel()

    assert [r["id"] for r in read_records(out)] == [o.id for o in outcomes]
    assert writer.fsyncs == 1 and durable == outcomes
    assert all(journal.is_done(o.key) for o in outcomes)
    assert journal.output_offset == size_of(out)


async def test_interval_flush_when_the_stream_is_idle(out: Path, journal: Journal) -> None:
    """With no new line arriving, waiting lines become durable after fsync_interval."""
    durable = anyio.Event()
    seen: list[Outcome] = []

    def on_durable(batch: list[Outcome]) -> None:
        seen.extend(batch)
        durable.set()

    writer = ResultWriter(
        out,
        journal,
        fsync_every=64,
        fsync_interval=0.02,
        clock=MonotonicClock(),
        on_durable=on_durable,
    )
    send, receive = anyio.create_memory_object_stream[Outcome](0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, receive)
            async with send:
                for i in range(3):
                    await send.send(make_outcome(i))
                await durable.wait()  # the stream stays open: only the interval can flush
                assert len(seen) == 3 and writer.fsyncs == 1
                assert all(journal.is_done(make_outcome(i).key) for i in range(3))
    assert writer.fsyncs == 1  # end of stream had nothing left to flush


async def test_interval_flush_follows_the_injected_clock(out: Path, journal: Journal) -> None:
    """With a FakeClock, idle lines stay waiting until fsync_interval has passed on it."""
    clock = FakeClock()
    durable = anyio.Event()
    writer = ResultWriter(
        out,
        journal,
        fsync_every=64,
        fsync_interval=0.25,
        clock=clock,
        on_durable=lambda _b: durable.set(),
    )
    send, receive = anyio.create_memory_object_stream[Outcome](0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, receive)
            async with send:
                await send.send(make_outcome(1))
                await send.send(make_outcome(2))
                await anyio.wait_all_tasks_blocked()
                await clock.advance(0.2)
                await anyio.wait_all_tasks_blocked()
                assert writer.fsyncs == 0 and not journal.is_done(make_outcome(1).key)
                await clock.advance(0.1)
                await durable.wait()
                assert writer.fsyncs == 1 and journal.is_done(make_outcome(2).key)
                assert clock.sleeps == [0.25]


def test_writer_appends_after_existing_lines_and_repairs_a_torn_tail(
    out: Path, journal: Journal
) -> None:
    """A resumed run appends after the old lines; a torn tail is cut, not glued to."""
    out.write_bytes(make_outcome(1).to_line() + b'{"id":"half')
    writer = ResultWriter(out, journal, clock=FakeClock())
    anyio.run(run_writer, writer, [make_outcome(2)])
    assert [r["id"] for r in read_records(out)] == ["row-1", "row-2"]
    assert journal.output_offset == size_of(out)


_WRITER_CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import anyio
    from bulk_engine.clock import FakeClock
    from bulk_engine.journal import Journal
    from bulk_engine.models import Outcome
    from bulk_engine.writer import ResultWriter

    out = Path(sys.argv[1])
    journal = Journal.open(Path(sys.argv[2]))
    real_mark = journal.mark_done_many
    calls = 0

    def mark(items, output_offset, **kw):
        global calls
        calls += 1
        if calls == 2:  # the 2nd batch's lines are fsynced; its journal commit never happens
            os.kill(os.getpid(), signal.SIGKILL)
        real_mark(items, output_offset, **kw)

    journal.mark_done_many = mark

    async def main():
        send, receive = anyio.create_memory_object_stream(0)
        writer = ResultWriter(out, journal, fsync_every=30, clock=FakeClock())
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, receive)
            async with send:
                for i in range(100):
                    await send.send(Outcome(key=f"row-{i}", line=i + 2, id=f"row-{i}",
                                            folder="f", status="completed"))

    anyio.run(main)
    """
)


def test_kill_between_fsync_and_journal_commit_loses_and_doubles_nothing(
    out: Path, tmp_path: Path
) -> None:
    """SIGKILL after an fsync but before its journal commit: reconcile + rerun → 100 lines once."""
    jpath = tmp_path / "results.jsonl.journal"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _WRITER_CRASH_CHILD, str(out), str(jpath)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(read_records(out)) == 60

    with Journal.open(jpath) as journal:
        assert journal.counts()["done"] == 30  # the 2nd batch's commit was lost
        report = reconcile(out, journal)
        assert report.lines_marked == 30 and report.already_done == 0
        # The rerun: the producer skips done rows, the writer appends the others.
        todo = [
            Outcome(key=f"row-{i}", line=i + 2, id=f"row-{i}", folder="f", status="completed")
            for i in range(100)
            if not journal.is_done(f"row-{i}")
        ]
        assert len(todo) == 40
        anyio.run(run_writer, ResultWriter(out, journal, clock=FakeClock()), todo)
        ids = [r["id"] for r in read_records(out)]
        assert sorted(ids) == sorted(f"row-{i}" for i in range(100)) and len(ids) == 100
        assert journal.counts()["done"] == 100


# ---------------------------------------------------------------------- --retry-failed


def test_rewrite_without_failed_keeps_order_and_drops_only_retrying(
    out: Path, journal: Journal
) -> None:
    """Only retrying rows' lines go; the rest keep their order; a second rewrite changes nothing."""
    outcomes = [
        make_outcome(0),
        make_outcome(1, "failed"),
        make_outcome(2),
        make_outcome(3, "failed", kind="duplicate_id"),
        make_outcome(4),
        make_outcome(5, "failed"),
    ]
    out.write_bytes(b"".join(o.to_line() for o in outcomes))
    reconcile(out, journal)
    # Row 5 failed, but stays failed: pretend it was marked done-completed elsewhere.
    journal.mark_done_many([(outcomes[5].key, "completed")], journal.output_offset)
    assert journal.begin_retry_failed() == 2

    size = rewrite_without_failed(out, journal)
    kept = [o for o in outcomes if o.id not in ("row-1", "row-3")]
    assert out.read_bytes() == b"".join(o.to_line() for o in kept)
    assert size == out.stat().st_size
    assert not out.with_name(out.name + ".tmp").exists()

    assert rewrite_without_failed(out, journal) == size  # idempotent
    assert out.read_bytes() == b"".join(o.to_line() for o in kept)
    journal.finish_retry_failed(size)
    assert journal.output_offset == size
    assert set(journal.keys_in_state("pending")) == {outcomes[1].key, outcomes[3].key}


def test_retry_failed_cycle_survives_a_crash_before_finish(out: Path, journal: Journal) -> None:
    """Crash after the rename but before finish: startup reconcile and a redo converge."""
    outcomes = [make_outcome(0), make_outcome(1, "failed"), make_outcome(2)]
    out.write_bytes(b"".join(o.to_line() for o in outcomes))
    reconcile(out, journal)
    journal.begin_retry_failed()
    rewrite_without_failed(out, journal)
    # -- crash here; the next start: --
    assert journal.rewrite_pending
    report = reconcile(out, journal)  # the offset is past the (shorter) file: rescan, harmless
    assert report.rescanned and report.already_done == 2
    assert list(journal.keys_in_state("retrying")) == [outcomes[1].key]
    size = rewrite_without_failed(out, journal)
    journal.finish_retry_failed(size)
    assert [r["id"] for r in read_records(out)] == ["row-0", "row-2"]
    assert not journal.rewrite_pending and not journal.is_done(outcomes[1].key)
