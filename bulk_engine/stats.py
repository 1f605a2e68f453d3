"""Run statistics: live counters for progress, and the end-of-run summary.

The engine feeds ``Summary`` each durable output line; ``python -m bulk_engine report`` feeds it
the lines of an output file, so both print the same summary. Memory is constant: latencies go
into a log-bucket histogram (1 % resolution), not a list.
"""

from __future__ import annotations

import calendar
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class LatencyHistogram:
    """Quantiles of positive durations within ~1 %, in constant memory."""

    _GROWTH = 1.02

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        seconds = max(seconds, 1e-4)
        self._buckets[math.floor(math.log(seconds, self._GROWTH))] += 1
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def quantile(self, q: float) -> float | None:
        if self.count == 0:
            return None
        rank = q * (self.count - 1)
        seen = 0
        for b in sorted(self._buckets):
            seen += self._buckets[b]
            if seen > rank:
                return float(min(self._GROWTH ** (b + 0.5), self.max))
        return self.max


@dataclass
class LiveCounters:
    """What the progress display and the periodic status line read while a run goes."""

    rows_read: int = 0
    rows_skipped_done: int = 0
    rows_resumed: int = 0
    submitted: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0
    bytes_uploaded: int = 0
    started_mono: float = field(default_factory=time.monotonic)

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
    attempts: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    first_submit: float | None = None
    last_complete: float | None = None
    # Filled by the engine from the client and the run (absent when read from a file):
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, rec: dict[str, Any]) -> None:
        """Account one output line (a parsed JSON object)."""
        self.rows += 1
        status = str(rec.get("status"))
        self.by_status[status] += 1
        result = rec.get("result")
        if isinstance(result, dict) and isinstance(result.get("decision"), dict):
            self.by_decision[str(result["decision"].get("status"))] += 1
        err = rec.get("error")
        if isinstance(err, dict):
            self.by_error[str(err.get("kind"))] += 1
        polls = rec.get("polls") or 0
        if isinstance(polls, int) and polls > 0:
            self.polls += polls
            self.polled_rows += 1
        att = rec.get("attempts")
        if isinstance(att, int):
            self.attempts += att
        lat = rec.get("latency_s")
        if isinstance(lat, (int, float)):
            self.latency.add(float(lat))
        sub, comp = _ts(rec.get("submitted_at")), _ts(rec.get("completed_at"))
        if sub is not None:
            self.first_submit = sub if self.first_submit is None else min(self.first_submit, sub)
        if comp is not None:
            self.last_complete = comp if self.last_complete is None else max(self.last_complete,
                                                                             comp)

    def to_json(self) -> dict[str, Any]:
        span = None
        if self.first_submit is not None and self.last_complete is not None:
            span = max(self.last_complete - self.first_submit, 1e-9)
        out: dict[str, Any] = {
            "rows": self.rows,
            "by_status": dict(self.by_status),
            "by_decision": dict(self.by_decision),
            "error_kinds": dict(self.by_error),
            "polls_per_folder": (
                round(self.polls / self.polled_rows, 3) if self.polled_rows else None
            ),
            "latency_s": {
                "p50": _r(self.latency.quantile(0.50)),
                "p95": _r(self.latency.quantile(0.95)),
                "p99": _r(self.latency.quantile(0.99)),
                "max": _r(self.latency.max if self.latency.count else None),
            },
            "span_s": _r(span),
            "rows_per_s": _r(self.rows / span) if span else None,
        }
        out.update(self.extra)
        return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _ts(value: Any) -> float | None:
    """Parse our ISO timestamps (``2026-01-02T03:04:05.678Z``) back to epoch seconds."""
    if not isinstance(value, str) or len(value) < 20:
        return None
    try:
        base = time.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
        frac = float("0" + value[19:].rstrip("Z")) if value[19:].rstrip("Z") else 0.0
    except ValueError:
        return None
    return float(calendar.timegm(base)) + frac
