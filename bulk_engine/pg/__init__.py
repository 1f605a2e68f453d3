"""PostgreSQL building blocks for many workers sharing one backfill (``--db postgresql://…``).

Several machines run the same command with ``--db`` (or ``BULK_ENGINE_DB``); they share one
run through PostgreSQL, whose clock is the only clock compared across machines. Every
single-machine guarantee holds: one line per row (from :meth:`RunStore.export`), the right result
for the right row (fenced writes), no duplicate analyses (leases, generations, Idempotency-Key),
and the key's rate limit respected across workers (:class:`Governor`). Install with
``pip install 'bulk-engine[postgres]'``.

Modules, in the order a worker uses them::

    connect.py   Database.connect(dsn): ConfigError for what the operator must fix; run()/session()
                 wait through outages; the API key is stored only as a salted fingerprint
    schema.py    migrate(): versioned migrations under an advisory lock (done by connect)
    rows.py      RunStore: runs, manifest loading, claims under leases, fenced transitions,
                 export in done order, progress counts; LeaseKeeper: renewals and "may I call?"
    governor.py  Governor: one GCRA rate per API key on the database clock, shared pause and
                 429 back-off, local priorities (polls first); the parallel-analysis window

and the engine's ``--db`` mode built on them (``docs/architecture.md``, "Many workers")::

    worker.py    PgWorker: the Engine of one worker; one lane (stages) per API key
    producer.py  the manifest loaded into the run; ClaimProducer: rows claimed under leases
    backend.py   PgBackend: the JournalBackend over leases (RowLost when a row is another's)
    guard.py     LeaseGuard, GuardedLimiter: no API call while leases may have lapsed
    sink.py      DatabaseSink: each row done with its line, one fenced transaction
    export.py    ``python -m bulk_engine export``: the run's lines as a JSONL file

Driver: asyncpg, chosen over psycopg 3 (async) by measurement on the governor's own statement
shape, one row ``UPDATE … RETURNING`` in autocommit (``benchmarks/bench_pg_governor.py``, five
runs on a shared 2-core machine): p50 0.16-0.23 ms against 0.27-0.34 ms, client CPU 106-140 µs
against 200-246 µs per call, 4,000-5,200 against 1,800-4,200 calls/s on one connection and
6,200-9,400 against 2,300-5,500 on eight. A reservation per API call, on machines that also run
the engine, makes latency and client CPU what counts.

How the engine uses it (what replaces the SQLite journal and the local limiter; the guide
the modules above follow):

* start: ``db = await Database.connect(dsn)``; ``summary, fp = run_identity(settings,
  manifest=…)``; ``store = await RunStore.open(db, name or default_run_name(fp),
  settings_fingerprint=fp, settings_summary=summary)``; ``worker = await
  store.register_worker()``; ``keeper = LeaseKeeper(store, worker, lease_s=…,
  api_key_fp=db.key_fingerprint(key))``; ``gov = await Governor.open(db, key, rate=…,
  burst=…)``. In the run's task group: ``keeper.run()`` and ``gov.run()``.
* producer: every worker streams the manifest into ``store.load(row_specs)`` (idempotent;
  bad rows go in done with their failed line), then work comes from ``keeper.claim(n)``
  instead of the manifest (``Journal.is_done``/``JournalReader`` are not needed: a done row is
  never claimed). Claim when the local queue runs low; ``store.finished()`` ends the run.
* a claimed row in ``submitted`` is what ``Journal.live_tokens()`` gave: poll its token (rebuild
  the Job from ``path``/``options``; a changed fingerprint means ``mark_pending`` and resubmit).
  Otherwise submit with ``row.next_generation`` as the attempts (same generation, and
  ``possible_duplicate``, for a row caught in ``submitting``).
* ``Journal.mark_submitting(job, attempts)`` → ``store.mark_submitting(row.lease,
  generation=…, fingerprint=…, path=…, api_key_fp=…, min_lease_s=upload budget)``, called
  where it is now (``before_send``); ``mark_submitted`` → ``store.mark_submitted(lease, token,
  submitted_at=…)``; ``mark_pending`` → ``store.mark_pending(lease[, generation=…])``;
  ``mark_possible_duplicate`` likewise. A False answer means the row is no longer this
  worker's: drop it (no API call, no line).
* the writer: instead of appending to the output and then ``mark_done_many``, ``await
  store.finish(lease, outcome=…, line=outcome.to_line(), error_kind=…)``; False: another worker
  owns the row now, drop the outcome. ``python -m bulk_engine export`` writes
  ``store.export()`` to a temporary file and renames it over the output.
* before every API call, ``keeper.valid()`` must hold; when it does not (``keeper.lost``),
  stop calling (hold submits and polls), and once it is valid again keep only the rows in
  ``store.held(worker)``. On a clean stop, ``store.release(worker)``.
* the limiter: ``Governor`` has ``RateLimiter``'s calls (``acquire(priority)``, ``pause_for``,
  ``on_throttled``, ``on_success``, ``current_rate``): pass it to ``CaseClient`` as the limiter.
  The outstanding window: ``gov.window()`` gives (limit, in use) across workers;
  ``gov.set_window(limit)`` sets it (the engine's lanes publish what they learned).
* progress: ``store.counts()`` (rows per state and outcome), ``store.workers()`` (held and done
  per worker, heartbeat age), ``gov.statistics()`` and ``gov.shared_state()``.
* ``--retry-failed``: ``store.reset_failed()`` (a row has one line at most: no rewrite).
"""

from __future__ import annotations

from bulk_engine.errors import ConfigError as _ConfigError

try:
    import asyncpg as _asyncpg  # noqa: F401 - only to say what is missing
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    raise _ConfigError(
        "--db needs PostgreSQL support: pip install 'bulk-engine[postgres]'"
    ) from None

from bulk_engine.pg.connect import Database, DatabaseUnavailable, key_fingerprint, redact_dsn
from bulk_engine.pg.governor import GcraState, Governor, GovernorStatistics, Grant
from bulk_engine.pg.rows import (
    ClaimedRow,
    LeaseKeeper,
    LoadReport,
    RowLease,
    RowSpec,
    RunCounts,
    RunInfo,
    RunStore,
    WorkerInfo,
    default_run_name,
    manifest_digest,
    run_identity,
)
from bulk_engine.pg.schema import SCHEMA_VERSION, migrate
from bulk_engine.ratelimit import PRIORITY_POLL, PRIORITY_SUBMIT, Limiter

__all__ = [
    "PRIORITY_POLL",
    "PRIORITY_SUBMIT",
    "SCHEMA_VERSION",
    "ClaimedRow",
    "Database",
    "DatabaseUnavailable",
    "GcraState",
    "Governor",
    "GovernorStatistics",
    "Grant",
    "LeaseKeeper",
    "Limiter",
    "LoadReport",
    "RowLease",
    "RowSpec",
    "RunCounts",
    "RunInfo",
    "RunStore",
    "WorkerInfo",
    "default_run_name",
    "key_fingerprint",
    "manifest_digest",
    "migrate",
    "redact_dsn",
    "run_identity",
]
