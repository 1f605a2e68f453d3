"""Live progress: a rich panel on a terminal, or a periodic one-line status in the logs.

Reads the engine's ``LiveCounters`` and the limiter; never touches the pipeline. The ETA comes
from a recent window of completions (the last ~60 s), not the whole-run average, so it follows
the current pace after a slow start or a throttled hour.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from bulk_engine.logs import get_logger

if TYPE_CHECKING:
    from bulk_engine.engine import Engine

log = get_logger()


class RateWindow:
    """Events per second over a sliding window of (time, cumulative count) samples."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> None:
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window:
            self._samples.popleft()

    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else None


def eta_seconds(remaining: int | None, rate: float | None) -> float | None:
    """Seconds left at the recent pace; None when unknown."""
    if remaining is None or rate is None or rate <= 0:
        return None
    return remaining / rate


def _fmt_eta(sec: float | None) -> str:
    if sec is None:
        return "—"
    sec = int(sec)
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def snapshot(engine: Engine, done_rate: RateWindow, call_rate: RateWindow,
             total_rows: int | None) -> dict[str, Any]:
    """The figures shown, as one dict (also what the periodic status line logs)."""
    c = engine.counters
    stats = engine.client.stats if engine.client else None
    now = time.monotonic()
    done_rate.add(now, c.done)
    call_rate.add(now, stats.calls if stats else 0)
    remaining = (total_rows - c.done - c.rows_skipped_done) if total_rows else None
    return {
        "rows_read": c.rows_read,
        "submitted": c.submitted,
        "processing": c.processing,
        "completed": c.completed,
        "failed": c.failed,
        "skipped_done": c.rows_skipped_done,
        "calls_per_s": round(call_rate.rate() or 0.0, 1),
        "rate_limit": round(engine.limiter.current_rate, 1),
        "throttled_429": stats.throttled if stats else 0,
        "mb_uploaded": round(c.bytes_uploaded / 1e6, 1),
        "eta": _fmt_eta(eta_seconds(remaining, done_rate.rate())),
    }


def _table(snap: dict[str, Any]) -> Table:
    t = Table(title="bulk_engine", show_header=False, expand=False)
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    t.add_row("rows read", str(snap["rows_read"]))
    t.add_row("submitted", str(snap["submitted"]))
    t.add_row("processing", str(snap["processing"]))
    t.add_row("done", f"[green]{snap['completed']}[/] ok  [red]{snap['failed']}[/] failed")
    if snap["skipped_done"]:
        t.add_row("already done", str(snap["skipped_done"]))
    t.add_row("API calls/s", f"{snap['calls_per_s']} / {snap['rate_limit']} limit")
    t.add_row("429s", str(snap["throttled_429"]))
    t.add_row("uploaded", f"{snap['mb_uploaded']} MB")
    t.add_row("ETA", snap["eta"])
    return t


async def show_progress(engine: Engine, *, live: bool, total_rows: int | None = None,
                        interval: float | None = None, console: Console | None = None) -> None:
    """Run until cancelled: a rich Live panel when ``live``, else a status log line."""
    done_rate, call_rate = RateWindow(), RateWindow(10.0)
    if live:
        console = console or Console(stderr=True)
        with Live(console=console, refresh_per_second=4, transient=False) as panel:
            try:
                while True:
                    panel.update(_table(snapshot(engine, done_rate, call_rate, total_rows)))
                    await anyio.sleep(interval or 0.25)
            finally:
                panel.update(_table(snapshot(engine, done_rate, call_rate, total_rows)))
    else:
        while True:
            await anyio.sleep(interval or 10.0)
            log.info("status", **snapshot(engine, done_rate, call_rate, total_rows))
