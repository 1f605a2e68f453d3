"""Run statistics: live counters for progress, and the end-of-run summary.

The engine feeds ``Summary`` each durable output line; ``python -m bulk_engine report`` feeds it
the lines of an output file, so both print the same summary. Memory is constant in the number of
rows: latencies go into a log-bucket histogram (~1 % resolution), not a list, and completions
into 10-second bins (for the throughput chart).
"""

from __future__ import annotations

import calendar
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BIN_S",
    "LatencyHistogram",
    "LiveCounters",
    "Summary",
    "WorkerShare",
    "decision_of",
]

# Width of the completion-time bins kept for the throughput chart, seconds.
BIN_S = 10


class LatencyHistogram:
    """Quantiles of positive durations within ~1 %, in constant memory.

    Bucket ``b`` holds values in ``[G**b, G**(b+1))`` with ``G = 1.02``; a quantile is read as
    the geometric middle of its bucket (at most ~1 % off), clamped to the observed min and max.
    """

    GROWTH = 1.02
    FLOOR = 1e-4  # durations below this (or negative, from clock steps) count as this

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def add(self, seconds: float) -> None:
        if not math.isfinite(seconds):
            return
        seconds = max(seconds, self.FLOOR)
        self._buckets[math.floor(math.log(seconds) / math.log(self.GROWTH))] += 1
        self.count += 1
        self.total += seconds
        self.min = min(self.min, seconds)
        self.max = max(self.max, seconds)

    def quantile(self, q: float) -> float | None:
        """The value below which a share ``q`` of the durations fall (None when empty)."""
        if self.count == 0:
            return None
        rank = min(max(q, 0.0), 1.0) * (self.count - 1)
        seen = 0
        for b in sorted(self._buckets):
            seen += self._buckets[b]
            if seen > rank:
                return float(min(max(self.GROWTH ** (b + 0.5), self.min), self.max))
        return self.max  # pragma: no cover - seen reaches count > rank

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def buckets(self) -> list[tuple[float, float, int]]:
        """``(low, high, count)`` per non-empty bucket, in order (for a histogram chart)."""
        g = self.GROWTH
        return [(g**b, g ** (b + 1), n) for b, n in sorted(self._buckets.items())]


@dataclass(frozen=True, slots=True)
class WorkerShare:
    """One worker of a run shared through ``--db``: its rows done and held right now."""

    name: str  # host:pid
    done: int
    held: int
    alive: bool  # renewed within its lease and not stopped
    this: bool  # the worker showing it


@dataclass
class LiveCounters:
    """What the progress display and the periodic status line read while a run goes.

    With ``--db``, ``run_done``/``run_total`` are the whole run's (every worker's) and
    ``workers`` each worker's share; the other figures are this worker's.
    """

    rows_read: int = 0
    rows_skipped_done: int = 0
    rows_resumed: int = 0
    submitted: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0
    bytes_uploaded: int = 0
    stuck: int = 0  # analyses reported stuck (stuck.StuckWatch)
    started_mono: float = field(default_factory=time.monotonic)
    run_done: int | None = None
    run_total: int | None = None
    workers: tuple[WorkerShare, ...] = ()

    @property
    def done(self) -> int:
        return self.completed + self.failed


@dataclass
class Summary:
    """Counts by status, decision and error kind; latency quantiles; polls; throughput."""

    rows: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_decision: Counter[str] = field(default_factory=Counter)
    by_error: Counter[str] = field(default_factory=Counter)
    polls: int = 0
    polled_rows: int = 0
    max_polls: int = 0
    polls_by_count: Counter[int] = field(default_factory=Counter)  # polled rows by their polls
    attempts: int = 0
    resubmitted_rows: int = 0  # rows that needed more than one submission
    possible_duplicates: int = 0  # rows flagged possible_duplicate in their line
    files: int = 0
    bytes: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    first_submit: float | None = None
    first_complete: float | None = None
    last_complete: float | None = None
    # Completions per BIN_S-second bin of completed_at (epoch // BIN_S), for the chart.
    done_bins: Counter[int] = field(default_factory=Counter)
    # Filled by the engine from the client and the run (absent when read from a file):
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, rec: dict[str, Any],
            times: tuple[float | None, float | None] | None = None) -> None:
        """Account one output line (a parsed JSON object); odd values are ignored, not fatal.

        ``times`` (submitted, completed as epoch seconds), when the caller has them, saves
        parsing the line's ISO timestamps back.
        """
        self.rows += 1
        status = str(rec.get("status"))
        self.by_status[status] += 1
        decision = decision_of(rec.get("result"))
        if decision is not None:
            self.by_decision[decision] += 1
        err = rec.get("error")
        if isinstance(err, dict):
            self.by_error[str(err.get("kind"))] += 1
        polls = _int(rec.get("polls"))
        if polls > 0:
            self.polls += polls
            self.polled_rows += 1
            self.max_polls = max(self.max_polls, polls)
            self.polls_by_count[polls] += 1
        att = _int(rec.get("attempts"))
        self.attempts += att
        if att > 1:
            self.resubmitted_rows += 1
        if rec.get("possible_duplicate") is True:
            self.possible_duplicates += 1
        self.files += _int(rec.get("files"))
        self.bytes += _int(rec.get("bytes"))
        lat = rec.get("latency_s")
        if isinstance(lat, (int, float)) and not isinstance(lat, bool):
            self.latency.add(float(lat))
        if times is None:
            times = (_ts(rec.get("submitted_at")), _ts(rec.get("completed_at")))
        sub, comp = times
        if sub is not None:
            self.first_submit = sub if self.first_submit is None else min(self.first_submit, sub)
        if comp is not None:
            self.done_bins[int(comp // BIN_S)] += 1
            self.first_complete = (comp if self.first_complete is None
                                   else min(self.first_complete, comp))
            self.last_complete = (comp if self.last_complete is None
                                  else max(self.last_complete, comp))

    @property
    def span(self) -> float | None:
        """Seconds from the first submission (or completion) to the last completion."""
        starts = [t for t in (self.first_submit, self.first_complete) if t is not None]
        if not starts or self.last_complete is None:
            return None
        return max(self.last_complete - min(starts), 0.0)

    def to_json(self) -> dict[str, Any]:
        span = self.span
        out: dict[str, Any] = {
            "rows": self.rows,
            "by_status": dict(sorted(self.by_status.items())),
            "by_decision": dict(sorted(self.by_decision.items())),
            "error_kinds": dict(self.by_error.most_common()),
            "latency_s": {
                "p50": _r(self.latency.quantile(0.50)),
                "p95": _r(self.latency.quantile(0.95)),
                "p99": _r(self.latency.quantile(0.99)),
                "max": _r(self.latency.max if self.latency.count else None),
                "mean": _r(self.latency.mean),
            },
            "polls_per_folder": (
                round(self.polls / self.polled_rows, 3) if self.polled_rows else None
            ),
            "polls_total": self.polls,
            "max_polls": self.max_polls,
            "resubmitted_rows": self.resubmitted_rows,
            "possible_duplicates": self.possible_duplicates,
            "files": self.files,
            "bytes": self.bytes,
            "span_s": _r(span),
            "rows_per_s": _r(self.rows / span) if span else None,
        }
        out.update(self.extra)
        return out


def decision_of(result: Any) -> str | None:
    """``result.decision.status`` of an API answer (``approved``...), or None."""
    if isinstance(result, dict) and isinstance(result.get("decision"), dict):
        return str(result["decision"].get("status"))
    return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _ts(value: Any) -> float | None:
    """Parse our ISO timestamps (``2026-01-02T03:04:05.678Z``) back to epoch seconds."""
    if not isinstance(value, str) or len(value) < 20:
        return None
    try:
        base = time.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
        tail = value[19:].rstrip("Z")
        frac = float("0" + tail) if tail else 0.0
    except ValueError:
        return None
    return float(calendar.timegm(base)) + frac
