"""Prometheus metrics of a run, read from its figures at scrape time.

Where it sits: ``admin.py`` serves :func:`render` at ``GET /metrics``. Nothing here is on the
hot path: :class:`EngineCollector` reads ``Engine.statistics()`` (every stage's
``statistics()``), the end-of-run ``Summary`` (fed by durable output lines) and the limiter when
Prometheus scrapes, so a row costs nothing more with metrics on, and the figures are the ones the
summary prints at the end (``tests/test_metrics.py`` compares them).

Conventions: counters end in ``_total``, units are seconds and bytes, labels are few and
bounded (endpoint, HTTP status, row status, error kind from ``vocab.ERROR_KINDS``); never a row
id, a token or the key. The row-latency histogram is derived from the summary's log buckets
(2 % wide): a bucket's rows count below ``le`` when the middle of their 2 % bucket does, the
same reading the summary's quantiles use. Counters count this process's run; rows an earlier
run finished show as ``bulk_engine_rows_skipped_total``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from bulk_engine.engine import RunStatistics
from bulk_engine.stats import LatencyHistogram, Summary
from bulk_engine.vocab import Status

__all__ = [
    "CONTENT_TYPE",
    "LATENCY_BUCKETS_S",
    "POLL_BUCKETS",
    "EngineCollector",
    "MetricsSource",
    "render",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                     600.0, 1200.0, 1800.0, 3600.0)
POLL_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100)


class _Limiter(Protocol):
    @property
    def current_rate(self) -> float: ...

    rate: float
    rate_decreases: int
    paused_seconds_total: float


class MetricsSource(Protocol):
    """What the metrics read of a run (an ``Engine``)."""

    summary: Summary
    started_at: float  # epoch seconds

    @property
    def limiter(self) -> _Limiter: ...

    def statistics(self) -> RunStatistics: ...


class EngineCollector:
    """A Prometheus collector over one engine; ``rows_total`` gives the manifest's row count
    once known (the panel's background count), else None."""

    def __init__(self, engine: MetricsSource, *,
                 rows_total: Callable[[], int | None] | None = None) -> None:
        self._engine = engine
        self._rows_total = rows_total or (lambda: None)

    def collect(self) -> Iterator[Metric]:
        eng = self._engine
        st = eng.statistics()
        yield from _rows(eng.summary, st, self._rows_total())
        yield from _api(st)
        yield from _pipeline(st)
        yield from _limiter(eng.limiter)
        yield from _tuning(st)
        yield _latency(eng.summary.latency)
        yield _polls(eng.summary)
        yield _gauge("bulk_engine_start_time_seconds",
                     "When this run started, in seconds since the epoch.", eng.started_at)


class _Both:
    """Our collector and the process's own figures (CPU seconds, memory, open files)."""

    def __init__(self, *collectors: object) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for c in self._collectors:
            yield from c.collect()  # type: ignore[attr-defined]


def render(collector: EngineCollector, *, process: bool = True) -> bytes:
    """The Prometheus text exposition of ``collector`` (and of the process, unless told not)."""
    target: object = _Both(collector, ProcessCollector(registry=None)) if process else collector
    return generate_latest(target)  # type: ignore[arg-type]


# ---- the families ---------------------------------------------------------------------------


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _rows(summary: Summary, st: RunStatistics, total: int | None) -> Iterator[Metric]:
    rows = CounterMetricFamily(
        "bulk_engine_rows", "Rows this run finished (their line is durable in the output), by "
        "status and error kind (empty for completed rows).", labels=["status", "error_kind"])
    failed_by_kind = 0
    for kind, n in sorted(summary.by_error.items()):
        rows.add_metric([Status.FAILED, kind], n)
        failed_by_kind += n
    for status, n in sorted(summary.by_status.items()):
        if status == Status.FAILED:
            if n > failed_by_kind:  # a failed line without an error kind (never written)
                rows.add_metric([status, "unknown"], n - failed_by_kind)
        else:
            rows.add_metric([status, ""], n)
    yield rows
    p = st.producer
    yield _counter("bulk_engine_rows_read", "Manifest rows read so far.", p.rows_read)
    yield _counter("bulk_engine_rows_skipped", "Rows an earlier run finished: skipped, no API "
                   "call.", p.rows_skipped_done)
    yield _counter("bulk_engine_rows_resumed", "Tokens of an earlier run this run took over.",
                   p.rows_resumed)
    yield _counter("bulk_engine_rows_withdrawn", "Rows not sent because the run drains (the "
                   "rerun sends them).", st.control.withdrawn)
    yield _counter("bulk_engine_resubmits", "Folders resubmitted after a dead token (404/401).",
                   st.resubmits)
    if total is not None:
        yield _gauge("bulk_engine_manifest_rows", "Rows in the manifest (or leaf folders under "
                     "--root), once counted.", total)
        done = summary.rows + p.rows_skipped_done
        yield _gauge("bulk_engine_progress_ratio", "Share of the manifest's rows done (this run "
                     "and earlier ones), 0 to 1.", min(1.0, done / total) if total else 1.0)


def _api(st: RunStatistics) -> Iterator[Metric]:
    c = st.client
    calls = CounterMetricFamily(
        "bulk_engine_api_calls", "API exchanges by endpoint (submit: POST /case, retrieve: "
        "POST /case/retrieve) and HTTP status (\"error\": no answer: connect error, timeout, "
        "reset).", labels=["endpoint", "code"])
    for (endpoint, code), n in sorted(c.answers.items()):
        calls.add_metric([endpoint, code], n)
    yield calls
    yield _counter("bulk_engine_api_throttled", "429 answers (rate limited).", c.throttled)
    yield _counter("bulk_engine_api_retries", "Calls retried after a transient error (429, 5xx, "
                   "network, timeout).", c.retries)
    yield _counter("bulk_engine_api_transport_errors", "Calls that got no answer (connect "
                   "error, timeout, reset).", c.transport_errors)
    yield _counter("bulk_engine_api_ambiguous_submits", "Uploads whose answer was lost after "
                   "the body was sent.", c.ambiguous_submits)
    yield _counter("bulk_engine_uploaded_bytes", "Bytes of folders uploaded (every attempt).",
                   c.bytes_uploaded)
    h = st.health
    yield _gauge("bulk_engine_api_healthy", "1 while the API answers, 0 during an outage.",
                 1.0 if h.healthy else 0.0)
    yield _counter("bulk_engine_api_outages", "Times the API was found down.", h.outages)


def _pipeline(st: RunStatistics) -> Iterator[Metric]:
    ctl, stuck = st.control, st.stuck
    yield _gauge("bulk_engine_uploads_in_flight", "Uploads (POST /case) under way.",
                 st.submitter.uploading)
    yield _gauge("bulk_engine_upload_slots", "Uploads allowed in flight (--concurrency now).",
                 ctl.concurrency)
    yield _gauge("bulk_engine_outstanding_folders", "Folders submitted whose result is not yet "
                 "retrieved.", st.processing)
    yield _gauge("bulk_engine_outstanding_limit", "The outstanding window's bound now.",
                 ctl.outstanding_limit)
    yield _gauge("bulk_engine_oldest_outstanding_age_seconds", "Seconds since the oldest "
                 "outstanding token was accepted (results expire after 3600 s).",
                 stuck.oldest_age_s or 0.0)
    yield _gauge("bulk_engine_poll_lateness_seconds", "How late the earliest due poll is "
                 "(new uploads wait while it is over 60 s).", st.poll_lateness_s)
    yield _counter("bulk_engine_stuck_analyses", "Folders reported stuck: running past "
                   "stuck_factor times the learned p99 processing time.", stuck.reported)
    yield _gauge("bulk_engine_stuck_analyses_outstanding", "Folders reported stuck still "
                 "awaiting their result.", stuck.outstanding)
    if stuck.threshold_s is not None:
        yield _gauge("bulk_engine_stuck_threshold_seconds", "Seconds after submission past "
                     "which a folder is reported stuck.", stuck.threshold_s)
    yield _gauge("bulk_engine_paused", "1 while new uploads are paused.", float(ctl.paused))
    yield _gauge("bulk_engine_draining", "1 once the run drains.", float(ctl.draining))
    yield _counter("bulk_engine_settings_applied", "Live settings changes applied (SIGHUP, "
                   "POST /control/settings).", ctl.settings_applied)
    yield _counter("bulk_engine_settings_refused", "Live settings changes refused (nothing "
                   "changed).", ctl.settings_refused)


def _limiter(limiter: _Limiter) -> Iterator[Metric]:
    yield _gauge("bulk_engine_rate_limit_configured_calls_per_second", "The rate limit's "
                 "ceiling (--rate-limit now).", limiter.rate)
    yield _gauge("bulk_engine_rate_limit_current_calls_per_second", "The rate the limiter "
                 "allows now (below the ceiling after 429s).", limiter.current_rate)
    yield _counter("bulk_engine_rate_limit_decreases", "Times a 429 halved the rate.",
                   limiter.rate_decreases)
    yield _counter("bulk_engine_rate_limit_paused_seconds", "Seconds every call was held by a "
                   "Retry-After.", limiter.paused_seconds_total)


def _tuning(st: RunStatistics) -> Iterator[Metric]:
    """What the self-tuning found (README "Self-tuning")."""
    r, w = st.limiter, st.window
    if r is not None:
        yield _gauge("bulk_engine_rate_limit_auto", "1 when the rate is found at run time "
                     "(--rate-limit auto), 0 for a fixed ceiling.", float(r.mode == "auto"))
        if r.limit_estimate is not None:
            yield _gauge("bulk_engine_rate_limit_estimate_calls_per_second", "The key's rate "
                         "limit as auto estimated it at its last 429.", r.limit_estimate)
    if w is not None:
        yield _gauge("bulk_engine_window_adaptive", "1 while the outstanding window adapts to "
                     "the API's parallel capacity.", float(w.phase != "fixed"))
        yield _gauge("bulk_engine_window_queue_estimate_folders", "Folders the window estimates "
                     "are queued at the API (waiting for a parallel slot).", w.queue_estimate)
        yield _gauge("bulk_engine_window_queue_delay_seconds", "The queueing delay the window "
                     "estimates per folder.", w.queue_delay_s)
        if w.baseline_s is not None:
            yield _gauge("bulk_engine_window_baseline_seconds", "Mean processing time the "
                         "window learned (without queueing).", w.baseline_s)


def _latency(hist: LatencyHistogram) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    spans = hist.buckets()
    i = seen = 0
    for le in LATENCY_BUCKETS_S:
        while i < len(spans) and math.sqrt(spans[i][0] * spans[i][1]) <= le:
            seen += spans[i][2]
            i += 1
        buckets.append((_le(le), seen))
    buckets.append(("+Inf", hist.count))
    return HistogramMetricFamily(
        "bulk_engine_row_latency_seconds", "Seconds from a row's submission to its final "
        "answer, over the rows this run finished.", buckets=buckets, sum_value=hist.total)


def _polls(summary: Summary) -> HistogramMetricFamily:
    counts = sorted(summary.polls_by_count.items())
    buckets: list[tuple[str, float]] = []
    i = seen = 0
    for le in POLL_BUCKETS:
        while i < len(counts) and counts[i][0] <= le:
            seen += counts[i][1]
            i += 1
        buckets.append((_le(le), seen))
    buckets.append(("+Inf", summary.polled_rows))
    return HistogramMetricFamily(
        "bulk_engine_row_polls", "Retrieve calls per polled folder (its final submission).",
        buckets=buckets, sum_value=summary.polls)


def _le(x: float) -> str:
    return repr(float(x))
