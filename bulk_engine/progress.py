"""Live progress: a rich panel on a terminal, or a periodic one-line status in the logs.

Reads the engine's ``LiveCounters``, the client's call counters and the limiter; never touches
the pipeline. The ETA comes from a recent window of completions (the last 60 s), not the
whole-run average, so it follows the current pace after a slow start or a throttled hour.

The total number of rows (for the bar and the ETA) is counted in a worker thread, a chunk at a
time, while the run goes: a manifest's records, or the leaf folders under ``--root``. Under
``--root s3://`` it is counted from the bucket's flat listing (``BucketRowCounter``: LIST
requests only, about one per 1000 objects, never an object's body). Until it is known the ETA
shows ``—``.

The figures are computed by ``ProgressModel.snapshot``, pure code fed with a time and the
counters, so tests check them without an engine or a clock.

With ``--db`` the counters also carry the whole run's progress (``run_done``/``run_total``,
every worker's rows) and each worker's share: the bar, the pace and the ETA follow the run;
the other figures are this worker's.
"""

from __future__ import annotations

import csv
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from bulk_engine.clock import Clock, MonotonicClock
from bulk_engine.errors import BulkEngineError
from bulk_engine.logs import get_logger
from bulk_engine.s3.url import S3Url
from bulk_engine.stats import LiveCounters, WorkerShare

if TYPE_CHECKING:
    from bulk_engine.ratelimit import RateLimiterStatistics
    from bulk_engine.tuning import WindowStatistics

if TYPE_CHECKING:
    from bulk_engine.config import Settings

__all__ = [
    "CALL_WINDOW_S",
    "ETA_WINDOW_S",
    "MIN_SPAN_S",
    "BucketRowCounter",
    "ProgressModel",
    "RateWindow",
    "RowCounter",
    "describe_rate",
    "describe_window",
    "eta_seconds",
    "fmt_bytes",
    "fmt_duration",
    "render_panel",
    "show_progress",
    "status_fields",
]

log = get_logger()

ETA_WINDOW_S = 60.0  # the "recent pace" the ETA follows
CALL_WINDOW_S = 10.0  # API calls/s are shown over this window
MIN_SPAN_S = 5.0  # no ETA until the window spans this long (the first seconds are noise)


class RateWindow:
    """Events per second over a sliding window of (time, cumulative count) samples."""

    def __init__(self, window: float = ETA_WINDOW_S, *, min_span: float = 0.0) -> None:
        self.window = window
        self.min_span = min_span
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> None:
        self._samples.append((now, total))
        # Keep one sample at or before the window's start, so the window spans it fully.
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def span(self) -> float:
        """Seconds between the oldest and newest samples kept."""
        return self._samples[-1][0] - self._samples[0][0] if self._samples else 0.0

    def rate(self) -> float | None:
        """Events per second over the window; None until the samples span ``min_span``."""
        if len(self._samples) < 2:
            return None
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        if t1 - t0 <= 0 or t1 - t0 < self.min_span:
            return None
        return max(c1 - c0, 0) / (t1 - t0)


def eta_seconds(remaining: int | None, rate: float | None) -> float | None:
    """Seconds left at the recent pace; 0 when nothing remains; None when unknown."""
    if remaining is None:
        return None
    if remaining <= 0:
        return 0.0
    if rate is None or rate <= 0:
        return None
    return remaining / rate


def describe_window(w: WindowStatistics) -> str:
    """The outstanding window in a few words: ``11 (learned; cap ~10)``, ``20 (probing)``."""
    if w.phase == "fixed":
        return f"{w.limit} (fixed)"
    if w.phase == "settled" and w.baseline_s is not None:
        cap = max(1, round(w.limit - w.queue_estimate))
        return f"{w.limit} (learned; cap ~{cap})"
    return f"{w.limit} ({w.phase})"


def describe_rate(r: RateLimiterStatistics) -> str:
    """The rate in a few words: ``23.5/s (probing)``, ``10/s (fixed)``."""
    if r.mode == "fixed":
        slowed = r.ceiling is not None and r.rate < r.ceiling - 0.05
        why = f", slowed from {r.ceiling:g} after 429s" if slowed else ""
        return f"{r.rate:.3g}/s (fixed{why})"
    est = f"; limit ~{r.limit_estimate:.3g}/s" if r.limit_estimate else ""
    return f"{r.rate:.3g}/s ({r.phase}{est})"


def fmt_duration(sec: float | None) -> str:
    """``1h05m``, ``4m07s``, ``12s``; ``—`` when unknown."""
    if sec is None:
        return "—"
    sec = round(sec)
    d, rem = divmod(sec, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_bytes(n: float) -> str:
    """``512 B``, ``1.2 MB``, ``3.40 GB`` (powers of 1000, as network rates are)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


class _ClientStats(Protocol):
    calls: int
    throttled: int
    retries: int


@dataclass
class ProgressModel:
    """The figures shown, from a time and the counters; keeps the rate windows between ticks."""

    total_rows: int | None = None
    rate_limit: float | None = None  # the configured limit (the limiter may run below it)
    started: float | None = None
    done_rate: RateWindow = field(
        default_factory=lambda: RateWindow(ETA_WINDOW_S, min_span=MIN_SPAN_S))
    call_rate: RateWindow = field(
        default_factory=lambda: RateWindow(CALL_WINDOW_S, min_span=MIN_SPAN_S))

    def snapshot(self, now: float, c: LiveCounters, stats: _ClientStats | None,
                 current_rate: float, *, api: str = "ok", window: str | None = None,
                 rate: str | None = None) -> dict[str, Any]:
        """One tick: the figures as a flat dict (also the fields of the status log line).

        ``api`` is ``ApiHealth.statistics().describe()``: ``ok`` or ``unhealthy since ...``;
        ``window`` and ``rate`` what the self-tuning found (:func:`describe_window`,
        :func:`describe_rate`), when known.
        """
        if self.started is None:
            self.started = now
        run_wide = c.run_done is not None and c.run_total is not None  # --db: every worker's
        self.done_rate.add(now, c.run_done if c.run_done is not None else c.done)
        self.call_rate.add(now, stats.calls if stats else 0)
        if c.run_done is not None and c.run_total is not None:
            remaining: int | None = max(c.run_total - c.run_done, 0)
        else:
            remaining = (max(self.total_rows - c.done - c.rows_skipped_done, 0)
                         if self.total_rows is not None else None)
        per_s = self.done_rate.rate()
        eta = eta_seconds(remaining, per_s)
        return {
            "rows_total": self.total_rows,
            "rows_read": c.rows_read,
            "skipped_done": c.rows_skipped_done,
            "resumed": c.rows_resumed,
            "submitted": c.submitted,
            "processing": c.processing,
            "completed": c.completed,
            "failed": c.failed,
            "remaining": remaining,
            "rows_per_min": round(per_s * 60, 1) if per_s is not None else None,
            "pace_window_s": round(self.done_rate.span()),
            "calls_per_s": _round(self.call_rate.rate()),
            "rate_limit": round(current_rate, 1),
            "rate_limit_configured": self.rate_limit,
            "throttled_429": stats.throttled if stats else 0,
            "retries": stats.retries if stats else 0,
            "bytes_uploaded": c.bytes_uploaded,
            "stuck": c.stuck,
            "elapsed_s": round(now - self.started, 1),
            "eta_s": round(eta) if eta is not None else None,
            "api": api,
            "window": window,
            "rate": rate,
            **({"run_done": c.run_done, "run_total": c.run_total,
                "workers": [_share(w) for w in c.workers]} if run_wide else {}),
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _share(w: WorkerShare) -> dict[str, Any]:
    return {"worker": w.name, "done": w.done, "held": w.held, "alive": w.alive,
            **({"this": True} if w.this else {})}


def _shares_text(workers: list[dict[str, Any]], run_done: int) -> str:
    """``host:1 40 % (this) · host:2 35 % · host:3 25 % (gone)``: each worker's part of the
    rows done."""
    return " · ".join(
        f"{w['worker']} {100 * w['done'] / run_done if run_done else 0:.0f} %"
        + (" (this)" if w.get("this") else "") + ("" if w["alive"] else " (gone)")
        for w in workers)


def status_fields(snap: dict[str, Any]) -> dict[str, Any]:
    """The snapshot as the periodic ``status`` log event: short, one line, machine-readable."""
    total = snap["rows_total"]
    done = snap["completed"] + snap["failed"] + snap["skipped_done"]
    fields = {
        "done": f"{done}/{total}" if total is not None else done,
        **{k: snap[k] for k in ("completed", "failed", "skipped_done", "submitted",
                                "processing", "rows_per_min", "calls_per_s", "rate_limit",
                                "throttled_429", "retries", "bytes_uploaded", "stuck", "elapsed_s",
                                "eta_s", "api", "window", "rate")},
        "eta": fmt_duration(snap["eta_s"]),
    }
    if "run_total" in snap:  # --db: the whole run, and each worker's share of it
        fields["done"] = f"{snap['run_done']}/{snap['run_total']}"
        fields["this_worker_done"] = done
        fields["workers"] = snap["workers"]
    return fields


def render_panel(snap: dict[str, Any], *, finished: bool = False) -> Table:
    """The live panel for one snapshot."""
    t = Table(title=f"bulk_engine · {fmt_duration(snap['elapsed_s'])} elapsed",
              show_header=False, title_justify="left", min_width=56)
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value", no_wrap=True)
    total = snap["rows_total"]
    done = snap["completed"] + snap["failed"] + snap["skipped_done"]
    run_wide = "run_total" in snap  # --db: the bar is the whole run's
    bar_done, bar_total = (snap["run_done"], snap["run_total"]) if run_wide else (done, total)
    if bar_total:
        grid = Table.grid(padding=(0, 1))
        grid.add_row(ProgressBar(total=bar_total, completed=min(bar_done, bar_total), width=24),
                     f"{bar_done}/{bar_total} ({100 * bar_done / bar_total:.0f} %)")
        t.add_row("run (all workers)" if run_wide else "progress", grid)
    if run_wide:
        t.add_row("workers", _shares_text(snap["workers"], snap["run_done"]))
    read = str(snap["rows_read"])
    t.add_row("rows read", read + (f" of {total}" if total is not None else " (counting…)"))
    if snap["skipped_done"]:
        t.add_row("already done", f"{snap['skipped_done']} (skipped)")
    if snap["resumed"]:
        t.add_row("resumed", f"{snap['resumed']} submitted by the last run, polled again")
    t.add_row("submitted", str(snap["submitted"]))
    t.add_row("processing", f"{snap['processing']} awaiting their result")
    if snap.get("stuck"):
        t.add_row("stuck", f"[yellow]{snap['stuck']} running far past the usual time "
                           "(stuck_analysis in the log); still polled[/]")
    t.add_row("done", f"[green]{snap['completed']} completed[/]  "
                      f"[{'red' if snap['failed'] else 'dim'}]{snap['failed']} failed[/]")
    pace = snap["rows_per_min"]
    t.add_row("pace", f"{pace:g} rows/min (last {snap['pace_window_s']} s)" if pace is not None
              else "—")
    calls = snap["calls_per_s"]
    text = f"{'—' if calls is None else f'{calls:g}'} of {snap['rate_limit']:g} allowed"
    conf = snap["rate_limit_configured"]
    if conf is not None and abs(conf - snap["rate_limit"]) > 0.05:
        text += f" [yellow](slowed from {conf:g} after 429s)[/]"
    if snap.get("rate"):
        text = f"{'—' if calls is None else f'{calls:g}'} · rate {snap['rate']}"
    t.add_row("API calls/s", text)
    if snap.get("window"):
        t.add_row("window", snap["window"])
    t.add_row("429s · retries", f"{snap['throttled_429']} · {snap['retries']}")
    if snap.get("api", "ok") != "ok":
        t.add_row("API", f"[yellow]{snap['api']}[/]")
    t.add_row("uploaded", fmt_bytes(snap["bytes_uploaded"]))
    if finished or snap["remaining"] == 0:
        eta = "finished" if snap["remaining"] == 0 else "stopped"
    else:
        eta = fmt_duration(snap["eta_s"])
        if snap["eta_s"] is None and snap["remaining"] is not None and pace == 0:
            eta = "— (nothing finished in the last minute)"
    t.add_row("ETA", eta)
    return t


# ---- row counting ---------------------------------------------------------------------------


def _rows_of(manifest: Path | None, root: Path | S3Url | None) -> Iterator[bool]:
    """Yield once per row of the source, by the producer's own rules (``rules.row_stream``),
    folders not listed: a manifest's records, or the leaf folders under ``root``."""
    from bulk_engine.config import Settings
    from bulk_engine.manifest import ProducerStats
    from bulk_engine.rules import row_stream

    rows = row_stream(Settings(root=root), manifest, seen=None, is_done=None,
                      stats=ProducerStats(), list_folders=False)
    for _ in rows:
        yield True


class RowCounter:
    """Counts a run's rows a chunk at a time (``step``), so a thread can do it cancellably."""

    def __init__(self, items: Iterator[bool]) -> None:
        self._items = items
        self.count = 0
        self.done = False
        self.failed = False

    @classmethod
    def for_source(cls, manifest: Path | None, root: Path | S3Url | None,
                   settings: Settings | None = None) -> RowCounter | BucketRowCounter | None:
        """The counter of a run's rows (``settings``: the S3 endpoint and retries of a
        ``--root s3://`` run)."""
        if manifest is None and isinstance(root, S3Url):
            return BucketRowCounter(root, settings)
        if manifest is None and root is None:
            return None
        return cls(_rows_of(manifest, root))

    async def count_all(self) -> int | None:
        """Count to the end, a chunk at a time in a worker thread; the total or None."""
        while not await anyio.to_thread.run_sync(self.step):
            pass
        return self.total

    def step(self, budget: int = 20_000) -> bool:
        """Advance by up to ``budget`` items; True once the count is final (or failed)."""
        try:
            for _ in range(budget):
                if next(self._items):
                    self.count += 1
        except StopIteration:
            self.done = True
        except (OSError, csv.Error, UnicodeError, BulkEngineError):
            # The engine reports a broken manifest itself; the panel just shows no total.
            self.done = self.failed = True
        return self.done

    @property
    def total(self) -> int | None:
        return self.count if self.done and not self.failed else None


class BucketRowCounter:
    """Counts the rows of ``--root s3://...`` from the flat listing, with its own S3 client.

    Any failure (credentials, an outage, an empty root) gives no total: the run reports the
    error itself.
    """

    def __init__(self, root: S3Url, settings: Settings | None = None) -> None:
        self.root = root
        self._settings = settings
        self.count = 0
        self.done = False
        self.failed = False

    async def count_all(self) -> int | None:
        """The number of leaf prefixes under the root, or None when it cannot be listed."""
        from bulk_engine.config import Settings
        from bulk_engine.s3.access import S3Access

        try:
            async with S3Access.for_settings(self._settings or Settings()) as s3:
                self.count = await s3.count_leaves(self.root)
        except BulkEngineError:
            self.failed = True
        self.done = True
        return self.total

    @property
    def total(self) -> int | None:
        return self.count if self.done and not self.failed else None


# ---- the loop -------------------------------------------------------------------------------


class _Source(Protocol):
    """What the panel reads of an engine: ``Engine.counters`` is derived from its stages'
    ``statistics()``."""

    @property
    def counters(self) -> LiveCounters: ...

    @property
    def client(self) -> Any: ...

    @property
    def limiter(self) -> Any: ...


async def show_progress(
    engine: _Source,
    *,
    live: bool,
    total_rows: int | None = None,
    interval: float | None = None,
    console: Console | None = None,
    clock: Clock | None = None,
    rate_limit: float | None = None,
    counter: RowCounter | BucketRowCounter | None = None,
) -> None:
    """Run until cancelled: a rich Live panel when ``live``, else a ``status`` log line.

    ``interval`` is the panel refresh (default 0.5 s) or the status period (default 10 s).
    ``counter`` counts the rows in the background when ``total_rows`` is not given.
    """
    clock = clock or MonotonicClock()
    model = ProgressModel(total_rows=total_rows, rate_limit=rate_limit)

    def snap() -> dict[str, Any]:
        health = getattr(engine, "health", None)  # an engine has one; a bare source may not
        api = health.statistics().describe() if health is not None else "ok"
        figures = getattr(engine, "statistics", None)  # an engine has them; a bare source not
        if figures is None:
            stats = engine.client.stats if engine.client is not None else None
            return model.snapshot(clock.now(), engine.counters, stats,
                                  engine.limiter.current_rate, api=api)
        run = figures()  # an Engine: every figure from its stages' statistics()
        return model.snapshot(clock.now(), run.counters(), run.client, run.current_rate,
                              api=api,
                              window=describe_window(run.window) if run.window else None,
                              rate=describe_rate(run.limiter) if run.limiter else None)

    async with anyio.create_task_group() as tg:
        if total_rows is None and counter is not None:
            tg.start_soon(_count_rows, counter, model)
        if live:
            console = console or Console(stderr=True)
            with Live(console=console, auto_refresh=False, transient=False) as panel:
                try:
                    while True:
                        panel.update(render_panel(snap()), refresh=True)
                        await clock.sleep(interval or 0.5)
                finally:
                    panel.update(render_panel(snap(), finished=True), refresh=True)
        else:
            period = interval or 10.0
            snap()  # the first sample: elapsed time and the rate windows start now
            while True:
                await clock.sleep(period)
                log.info("status", **status_fields(snap()))


async def _count_rows(counter: RowCounter | BucketRowCounter, model: ProgressModel) -> None:
    model.total_rows = await counter.count_all()
