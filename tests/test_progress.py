"""Progress: recent-window ETA math, the status log line, the panel, background row counting."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from bulk_engine.clock import FakeClock
from bulk_engine.progress import (
    ProgressModel,
    RateWindow,
    RowCounter,
    eta_seconds,
    fmt_bytes,
    fmt_duration,
    render_panel,
    show_progress,
    status_fields,
)
from bulk_engine.stats import LiveCounters, WorkerShare

pytestmark = pytest.mark.timeout(10)


# ---- pure math ------------------------------------------------------------------------------


def test_rate_window_uses_only_the_recent_window() -> None:
    """A slow start is forgotten once it leaves the window: the rate is the recent pace."""
    w = RateWindow(60.0)
    for t in range(0, 301, 10):  # 1 row/s for 5 minutes...
        w.add(float(t), t)
    for t in range(310, 421, 10):  # ...then 5 rows/s for 2 minutes
        w.add(float(t), 300 + 5 * (t - 300))
    assert w.rate() == pytest.approx(5.0)


def test_rate_window_spans_the_whole_window() -> None:
    """The oldest sample kept is at or before the window's start, so the span is >= window."""
    w = RateWindow(60.0)
    for t in (0, 50, 70, 100):
        w.add(float(t), t * 2)
    # At t=100 the window starts at 40: the sample at 0 is the last one before it, kept.
    assert w.rate() == pytest.approx(2.0)
    w.add(120.0, 120 * 2)
    # At t=120 the window starts at 60: 50 is now the last sample before it; 0 is dropped.
    assert w._samples[0][0] == 50.0


def test_rate_window_needs_two_samples_and_min_span() -> None:
    """No rate from one sample, nor before the samples span ``min_span``."""
    w = RateWindow(60.0, min_span=5.0)
    assert w.rate() is None
    w.add(0.0, 0)
    assert w.rate() is None
    w.add(4.0, 40)
    assert w.rate() is None
    w.add(5.0, 50)
    assert w.rate() == pytest.approx(10.0)


def test_rate_window_ignores_a_counter_going_back() -> None:
    """A counter that goes down (it should not) gives 0, not a negative rate."""
    w = RateWindow(10.0)
    w.add(0.0, 10)
    w.add(5.0, 3)
    assert w.rate() == 0.0


@pytest.mark.parametrize(("remaining", "rate", "want"), [
    (100, 2.0, 50.0),
    (0, None, 0.0),  # nothing left: finished, whatever the pace
    (-3, 1.0, 0.0),
    (100, None, None),  # pace unknown yet
    (100, 0.0, None),  # stalled: no finite ETA
    (None, 5.0, None),  # total unknown (still counting)
])
def test_eta_seconds(remaining: int | None, rate: float | None, want: float | None) -> None:
    """ETA is remaining / recent rate; 0 when done; unknown when either is unknown or 0."""
    assert eta_seconds(remaining, rate) == want


@pytest.mark.parametrize(("sec", "text"), [
    (None, "—"), (0, "0s"), (59.4, "59s"), (61, "1m01s"), (3600, "1h00m"), (3725, "1h02m"),
    (90061, "1d01h"),
])
def test_fmt_duration(sec: float | None, text: str) -> None:
    assert fmt_duration(sec) == text


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (999, "999 B"), (1500, "1.5 kB"), (64_580, "64.6 kB"), (2_345_678, "2.35 MB"),
    (7.2e12, "7.2 TB"),
])
def test_fmt_bytes(n: float, text: str) -> None:
    assert fmt_bytes(n) == text


@dataclass
class _Stats:
    calls: int = 0
    throttled: int = 0
    retries: int = 0


def test_snapshot_eta_follows_the_recent_pace() -> None:
    """1000 rows; 100 done slowly in 10 min, then 10 rows/s: the ETA uses 10 rows/s."""
    m = ProgressModel(total_rows=1000, rate_limit=10.0)
    c = LiveCounters(rows_read=1000)
    stats = _Stats()
    t = 0.0
    while t < 600:  # 1 row every 6 s
        c.completed = int(t / 6)
        stats.calls = 2 * c.completed
        m.snapshot(t, c, stats, 10.0)
        t += 1.0
    while t <= 660:  # then 10 rows/s for a minute
        c.completed = 100 + int((t - 600) * 10)
        stats.calls = 2 * c.completed
        snap = m.snapshot(t, c, stats, 10.0)
        t += 1.0
    assert c.completed == 700
    assert snap["remaining"] == 300
    assert snap["rows_per_min"] == pytest.approx(600.0)
    assert snap["eta_s"] == 30  # 300 rows at 10 rows/s, not at the whole-run ~1 row/s
    assert snap["calls_per_s"] == pytest.approx(20.0)
    assert snap["elapsed_s"] == 660.0


def test_snapshot_counts_skipped_rows_as_done_and_failed_rows_too() -> None:
    """Remaining = total - completed - failed - skipped (rows already done by an earlier run)."""
    m = ProgressModel(total_rows=100)
    c = LiveCounters(rows_read=100, rows_skipped_done=40, completed=50, failed=10)
    snap = m.snapshot(0.0, c, None, 10.0)
    assert snap["remaining"] == 0
    assert snap["eta_s"] == 0
    assert status_fields(snap)["done"] == "100/100"


def test_snapshot_without_total_has_no_eta() -> None:
    """While the rows are being counted, the ETA is unknown, not a guess."""
    m = ProgressModel(total_rows=None)
    c = LiveCounters()
    for t in range(0, 30):
        c.completed = t
        snap = m.snapshot(float(t), c, None, 10.0)
    assert snap["eta_s"] is None and snap["remaining"] is None
    assert snap["rows_per_min"] == pytest.approx(60.0)


# ---- the panel ------------------------------------------------------------------------------


def _render(snap: dict[str, Any], **kw: Any) -> str:
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(render_panel(snap, **kw))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def test_panel_shows_every_figure() -> None:
    """Rows read / submitted / processing / done / failed, calls/s vs limit, 429s, bytes, ETA."""
    m = ProgressModel(total_rows=200, rate_limit=20.0)
    c = LiveCounters(rows_read=120, submitted=100, processing=30, completed=60, failed=5,
                     bytes_uploaded=3_400_000, rows_resumed=7)
    m.snapshot(0.0, c, _Stats(calls=0), 20.0)
    c.completed = 65
    snap = m.snapshot(10.0, c, _Stats(calls=150, throttled=3, retries=4), 10.0)
    text = _render(snap)
    for want in ("120 of 200", "100", "30 awaiting", "65 completed", "5 failed", "15 of 10 allowed",
                 "slowed from 20 after 429s", "3 · 4", "3.4 MB", "70/200 (35 %)", "ETA",
                 "7 submitted by the last run", "(last 10 s)"):
        assert want in text, (want, text)
    assert "4m20s" in text  # 130 left at 0.5 rows/s over the last 10 s: 260 s


def test_panel_without_total_and_finished() -> None:
    """No total yet: 'counting…' and no bar; a finished run says so instead of an ETA."""
    m = ProgressModel()
    snap = m.snapshot(0.0, LiveCounters(rows_read=5), None, 10.0)
    text = _render(snap)
    assert "5 (counting…)" in text and "progress" not in text
    m2 = ProgressModel(total_rows=5)
    done = m2.snapshot(0.0, LiveCounters(rows_read=5, completed=5), None, 10.0)
    assert "finished" in _render(done)
    assert "stopped" in _render(m2.snapshot(1.0, LiveCounters(rows_read=3, completed=2), None,
                                            10.0), finished=True)


def test_a_shared_run_shows_the_whole_run_and_each_workers_share() -> None:
    """--db: the bar, the pace and the ETA follow every worker's rows; the status line and the
    panel show each worker's part, and which one is gone; the rest is this worker's."""
    m = ProgressModel(total_rows=None, rate_limit=20.0)
    shares = (WorkerShare("m1:10", 30, 4, True, True), WorkerShare("m2:11", 60, 2, True, False),
              WorkerShare("m3:12", 10, 0, False, False))
    c = LiveCounters(completed=20, run_done=50, run_total=400, workers=shares)
    m.snapshot(0.0, c, None, 20.0)
    c.completed, c.run_done = 30, 100
    snap = m.snapshot(10.0, c, None, 20.0)
    assert (snap["remaining"], snap["eta_s"], snap["rows_per_min"]) == (300, 60, 300.0)
    status = status_fields(snap)
    assert status["done"] == "100/400" and status["this_worker_done"] == 30
    assert [w["worker"] for w in status["workers"]] == ["m1:10", "m2:11", "m3:12"]
    assert status["workers"][0]["this"] and not status["workers"][2]["alive"]
    text = _render(snap)
    for want in ("run (all workers)", "100/400 (25 %)", "m1:10 30 % (this)", "m2:11 60 %",
                 "m3:12 10 % (gone)", "30 completed"):
        assert want in text, (want, text)


# ---- the loop -------------------------------------------------------------------------------


@dataclass
class _Limiter:
    current_rate: float = 10.0


@dataclass
class _Client:
    stats: _Stats = field(default_factory=_Stats)


@dataclass
class _Engine:
    counters: LiveCounters = field(default_factory=LiveCounters)
    client: _Client | None = field(default_factory=_Client)
    limiter: _Limiter = field(default_factory=_Limiter)


async def test_status_line_every_interval() -> None:
    """Without a panel, one `status` event per interval, with the progress figures and ETA."""
    clock, eng = FakeClock(), _Engine()
    c = eng.counters
    with capture_logs() as logs:
        task = asyncio.create_task(
            show_progress(eng, live=False, total_rows=50, interval=3.0, clock=clock))
        await clock.advance(0)
        c.completed, c.rows_read = 5, 20
        await clock.advance(2.9)
        assert [e for e in logs if e["event"] == "status"] == []
        await clock.advance(0.1)  # t=3: 5 done
        c.completed, c.failed, c.rows_read = 20, 1, 50
        await clock.advance(3.0)  # t=6: 21 done
        c.completed = 34
        eng.client.stats.throttled = 2  # type: ignore[union-attr]
        await clock.advance(3.0)  # t=9: 35 done
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    status = [e for e in logs if e["event"] == "status"]
    assert [e["done"] for e in status] == ["5/50", "21/50", "35/50"]
    assert clock.sleeps == [3.0, 3.0, 3.0, 3.0]
    assert status[0]["eta_s"] is None  # a 3 s window is too short to trust
    assert status[1]["eta_s"] == 8  # 29 left at 21 rows / 6 s
    last = status[-1]
    assert last["completed"] == 34 and last["failed"] == 1 and last["throttled_429"] == 2
    assert last["log_level"] == "info" and last["elapsed_s"] == 9.0
    assert last["rows_per_min"] == pytest.approx(233.3)  # 35 rows in the 9 s since the start
    assert last["eta_s"] == 4 and last["eta"] == "4s"  # 15 left at 3.9 rows/s


async def test_status_line_counts_rows_in_the_background(tmp_path: Path) -> None:
    """With a row counter, the total arrives while the run goes, and the status line shows it."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,folder\n" + "".join(f"r{i},f{i}\n" for i in range(7)))
    clock, eng = FakeClock(), _Engine()
    counter = RowCounter.for_source(manifest, None)
    assert counter is not None
    with capture_logs() as logs:
        task = asyncio.create_task(
            show_progress(eng, live=False, interval=1.0, clock=clock, counter=counter))
        for _ in range(200):  # the count runs in a worker thread: wait for it, not for time
            await asyncio.sleep(0.005)
            if counter.done:
                break
        await clock.advance(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert counter.total == 7
    assert [e["done"] for e in logs if e["event"] == "status"] == ["0/7"]


async def test_live_panel_renders_and_ends_with_a_final_frame() -> None:
    """The live panel draws on the given console and leaves its last frame on cancel."""
    clock, eng = FakeClock(), _Engine()
    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=True, color_system=None)
    task = asyncio.create_task(
        show_progress(eng, live=True, total_rows=10, interval=0.5, console=console, clock=clock))
    await clock.advance(0)
    eng.counters.completed = 10
    await clock.advance(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    out = buf.getvalue()
    assert "bulk_engine" in out and "10 completed" in out and "finished" in out


# ---- counting rows --------------------------------------------------------------------------


def test_row_counter_counts_csv_records_not_lines(tmp_path: Path) -> None:
    """Quoted newlines are one record; blank lines and the header are not rows; BOM is fine."""
    m = tmp_path / "m.csv"
    m.write_bytes(b"\xef\xbb\xbf\r\nid,folder,payload\r\na,f1,\r\n\r\nb,f2,\"{\"\"x\"\":\n1}\"\r\n"
                  b" , \r\nc,f3,\r\n")
    counter = RowCounter.for_source(m, None)
    assert counter is not None
    steps = 0
    while not counter.step(budget=1):
        steps += 1
    assert counter.total == 3 and steps >= 3  # it really went a record at a time


def test_row_counter_counts_leaf_folders(tmp_path: Path) -> None:
    """Under --root, rows are leaf folders; hidden and symlinked folders are skipped."""
    for d in ("a/x", "a/y", "b", ".hidden/z", "c/d/e"):
        (tmp_path / "root" / d).mkdir(parents=True)
    (tmp_path / "root" / "link").symlink_to(tmp_path / "root" / "b")
    counter = RowCounter.for_source(None, tmp_path / "root")
    assert counter is not None
    counter.step()
    assert counter.total == 4  # a/x, a/y, b, c/d/e


def test_row_counter_gives_up_on_a_broken_manifest(tmp_path: Path) -> None:
    """A missing file gives no total (the engine reports the error), not an exception."""
    counter = RowCounter.for_source(tmp_path / "missing.csv", None)
    assert counter is not None
    assert counter.step() and counter.total is None
    assert RowCounter.for_source(None, None) is None
