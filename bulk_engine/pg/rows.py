"""A run's rows in PostgreSQL: loaded once, claimed under leases, moved through their states
only by the worker whose lease is current, and exported in done order.

Where it sits (the distributed counterpart of ``journal.py``)::

    manifest ──load()──▶ rows(pending) ──claim()──▶ worker: mark_submitting ─▶ POST /case
                                                        mark_submitted(token) ◀─ 202
                                                        finish(line) ◀─ retrieve 200/500/...
    export() ◀── rows(done), in done order ──▶ results.jsonl (one line per row)

Leases and fencing. :meth:`RunStore.claim` gives a worker up to ``n`` rows nobody holds (their
lease expired or never existed; ``FOR UPDATE SKIP LOCKED``, so concurrent claimers never get the
same row), live tokens first (state ``submitted``: polling them is cheap and their results
expire), then ``pending``/``submitting`` rows in manifest order. Each claim bumps the row's
``epoch``; the worker gets a :class:`RowLease` ``(key, worker, epoch)``. Every transition is one
``UPDATE … WHERE lease_owner = $w AND epoch = $e AND lease_expires_at > clock_timestamp()`` and
says whether it happened: a worker that was paused (GC, SIGSTOP, a network cut) past its lease,
while another worker claimed the row, is refused, so it can never write a second line or move a
row it no longer owns. Expiry is judged on the database clock only; workers' clocks are never
compared. :meth:`RunStore.renew` extends every lease the worker holds in one statement.
:class:`LeaseKeeper` renews periodically and tells a worker how long its leases are surely
valid, measured on its own monotonic clock from the moment it *sent* the claim or renewal that
set them (the database set the expiry later than that, so this is conservative); once that
horizon passes the worker must make no API call for its rows.

Transitions are idempotent for their (worker, epoch): a retry after a lost answer finds the row
already moved and succeeds again (``finish`` even after the lease ran out, if it had committed).

Generations. ``generation`` counts submissions; the engine derives the Idempotency-Key from it.
A row claimed in ``submitting`` (its POST may have reached the API) is sent again with the *same*
generation and flagged ``possible_duplicate``; a ``pending`` row is sent with ``generation + 1``
(:attr:`ClaimedRow.next_generation`).

Export order. ``finish`` does not number rows: :meth:`RunStore.export` first numbers the rows
done since the last export (``done_seq``, under an advisory lock, in ``done_at`` order) and then
reads them in that order. Numbers are therefore given after commit and only ever increase, so
``export(since=last_seq)`` never misses a row that committed late.

Names (key, id, folder, path) are stored as bytea, UTF-8 with ``surrogateescape``: a folder whose
name is not valid UTF-8 comes back byte for byte. The output line is text (valid UTF-8, no NUL:
``Outcome.to_line`` guarantees both).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import socket
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import asyncpg

from bulk_engine.clock import Clock, MonotonicClock
from bulk_engine.config import Settings
from bulk_engine.errors import ConfigError
from bulk_engine.logs import get_logger
from bulk_engine.pg.connect import Conn, Database
from bulk_engine.vocab import RowState, Status

__all__ = [
    "EXPORT_PAGE",
    "LOAD_BATCH",
    "NUMBER_BATCH",
    "ClaimedRow",
    "LeaseKeeper",
    "LoadReport",
    "RowLease",
    "RowSpec",
    "RunCounts",
    "RunInfo",
    "RunStore",
    "WorkerInfo",
    "dec",
    "default_run_name",
    "enc",
    "manifest_digest",
    "run_identity",
]

log = get_logger()

LOAD_BATCH = 1000
EXPORT_PAGE = 2000
NUMBER_BATCH = 10000
#: Advisory-lock namespace of the export numbering (one lock per run: (this, run id)).
_EXPORT_LOCK = 0x6578706F


def enc(text: str) -> bytes:
    """A name as stored (bytea): UTF-8, undecodable bytes kept by ``surrogateescape``."""
    return text.encode("utf-8", "surrogateescape")


def dec(data: bytes | None) -> str | None:
    """The inverse of :func:`enc`."""
    return None if data is None else bytes(data).decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------- run identity


def manifest_digest(path: Path, *, chunk: int = 1 << 20) -> str:
    """sha256 of the manifest's bytes, streamed (the same file on every machine, wherever it
    is mounted, gives the same run)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def run_identity(settings: Settings, *, manifest: Path | None = None,
                 root: Path | None = None) -> tuple[str, str]:
    """The run-defining settings, readable, and their fingerprint (never the API key).

    Like ``journal.settings_summary`` but the source is the manifest's *content* (its sha256),
    not its path: workers on several machines mount it in different places.
    """
    from urllib.parse import urlsplit

    if manifest is not None:
        source = "sha256:" + manifest_digest(manifest)
    elif root is not None:
        source = "root:" + str(Path(root).expanduser().resolve())
    else:
        raise ValueError("give a manifest or a root")
    summary = json.dumps({
        "host": urlsplit(settings.base_url).hostname or "",
        "analyse_type": ",".join(settings.analyse_type),
        "use_case": settings.use_case,
        "source": source,
    }, sort_keys=True)
    return summary, hashlib.sha256(summary.encode()).hexdigest()


def default_run_name(fingerprint: str) -> str:
    """The run's name when ``--run`` is not given: derived from the identity, so every worker
    given the same manifest and settings joins the same run."""
    return "run-" + fingerprint[:16]


# ---------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run as stored."""

    id: int
    name: str
    settings_fingerprint: str
    settings_summary: str
    loaded: bool
    rows_total: int | None


@dataclass(frozen=True, slots=True)
class RowSpec:
    """One manifest row to load. ``output`` set: a bad row, loaded done+failed with that line."""

    key: str
    id: str
    folder: str
    line: int
    options: dict[str, Any] | None = None  # use_case, analyse_type, payload
    output: str | bytes | None = None
    error_kind: str | None = None


@dataclass(frozen=True, slots=True)
class RowLease:
    """The right to move one row: valid while the database has this (worker, epoch) current."""

    key: str
    worker: str
    epoch: int


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """A row handed to a worker by :meth:`RunStore.claim`, with its lease."""

    lease: RowLease
    id: str
    folder: str
    line: int
    options: dict[str, Any]
    state: RowState
    token: str | None = field(repr=False)  # a bearer of results: never in logs or reprs
    api_run_id: str | None
    fingerprint: str | None
    path: str | None
    generation: int
    submitted_at: float | None
    api_key_fp: str | None
    possible_duplicate: bool
    request_fp: str | None = None  # client.request_identity of the last submission

    @property
    def key(self) -> str:
        return self.lease.key

    @property
    def next_generation(self) -> int:
        """The generation of this row's next POST /case: the same one if it was caught
        mid-upload (same Idempotency-Key: the API replays instead of analysing twice)."""
        if self.state is RowState.SUBMITTING:
            return max(self.generation, 1)
        return self.generation + 1


@dataclass(frozen=True, slots=True)
class LoadReport:
    rows_read: int
    rows_inserted: int  # the others were already there (another loader, an earlier start)


@dataclass(frozen=True, slots=True)
class RunCounts:
    """Rows per state and done rows per outcome; ``held``: rows under a live lease."""

    by_state: dict[str, int]
    by_outcome: dict[str, int]
    held: int
    total: int

    @property
    def done(self) -> int:
        return self.by_state.get(RowState.DONE, 0)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    heartbeat_age_s: float  # on the database clock
    stopped: bool
    held: dict[str, int]  # rows under a live lease, per state
    done: int  # rows this worker finished


_CLAIMED_COLUMNS = (
    "key, id, folder, line, options, state, token, api_run_id, fingerprint, path, generation, "
    "extract(epoch FROM submitted_at)::float8 AS submitted_at, api_key_fp, possible_duplicate, "
    "epoch, request_fp"
)


def _claimed(rec: asyncpg.Record, worker: str) -> ClaimedRow:
    return ClaimedRow(
        lease=RowLease(dec(rec["key"]) or "", worker, rec["epoch"]),
        id=dec(rec["id"]) or "", folder=dec(rec["folder"]) or "", line=rec["line"],
        options=json.loads(rec["options"]) if rec["options"] else {},
        state=RowState(rec["state"]), token=rec["token"], api_run_id=rec["api_run_id"],
        fingerprint=rec["fingerprint"], path=dec(rec["path"]), generation=rec["generation"],
        submitted_at=rec["submitted_at"], api_key_fp=rec["api_key_fp"],
        possible_duplicate=rec["possible_duplicate"], request_fp=rec["request_fp"],
    )


def _line_text(line: str | bytes) -> str:
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    text = text.rstrip("\n")
    if "\n" in text or "\x00" in text:
        raise ValueError("an output line must be one line of JSON without NUL")
    return text


# The lease condition every transition repeats: this worker, this claim, not expired.
_FENCE = ("run = $1 AND key = $2 AND lease_owner = $3 AND epoch = $4 "
          "AND lease_expires_at > clock_timestamp()")


class RunStore:
    """One run's rows in the shared database. Open with :meth:`open`."""

    def __init__(self, db: Database, run: RunInfo) -> None:
        self.db = db
        self.run = run

    # ------------------------------------------------------------------ the run

    @classmethod
    async def open(cls, db: Database, name: str, *, settings_fingerprint: str,
                   settings_summary: str) -> RunStore:
        """Create the run ``name``, or join it if its settings match (ConfigError if not).

        ``settings_fingerprint=""`` creates a run bound to no settings yet: the first
        :meth:`bind` binds it (the journal adapter's ``check_settings``).
        """

        async def op(c: Conn) -> asyncpg.Record:
            await c.execute(
                "INSERT INTO bulk_engine.runs (name, settings_fingerprint, settings_summary) "
                "VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                name, settings_fingerprint, settings_summary)
            row = await c.fetchrow("SELECT * FROM bulk_engine.runs WHERE name = $1", name)
            assert row is not None  # inserted above, and runs are never deleted by the tool
            return row

        store = cls(db, _run_info(await db.run(op, what="open the run")))
        await store.bind(settings_fingerprint, settings_summary)
        return store

    async def bind(self, fingerprint: str, summary: str) -> None:
        """Check that the run was started with these settings (ConfigError if not); a run
        created without settings is bound to these."""
        if fingerprint and not self.run.settings_fingerprint:
            await self.db.run(lambda c: c.execute(
                "UPDATE bulk_engine.runs SET settings_fingerprint = $2, settings_summary = $3 "
                "WHERE id = $1 AND settings_fingerprint = ''", self.run.id, fingerprint,
                summary), what="bind the run to its settings")
            await self.refresh()
        if self.run.settings_fingerprint != fingerprint:
            raise ConfigError(
                f"the run {self.run.name!r} in the database was started with other settings: "
                f"it is a different run (its API host, analyse_type, use_case or manifest "
                f"differ: database {self.run.settings_summary}; now {summary}). Rerun with the "
                "original settings to join it, or give another --run NAME to start a new run."
            )

    @classmethod
    async def join(cls, db: Database, name: str) -> RunStore:
        """The existing run ``name``, whatever its settings (for ``export``, progress, admin).

        ConfigError naming the runs there are if it does not exist.
        """
        rec = await db.run(lambda c: c.fetchrow(
            "SELECT * FROM bulk_engine.runs WHERE name = $1", name), what="find the run")
        if rec is None:
            names = [r.name for r in await cls.list_runs(db)]
            known = ", ".join(map(repr, names[:10])) if names else "none"
            raise ConfigError(f"no run {name!r} in the database (runs there: {known}); "
                              "check --run")
        return cls(db, _run_info(rec))

    @staticmethod
    async def list_runs(db: Database) -> list[RunInfo]:
        """Every run in the database, oldest first (``export`` without ``--run`` takes the only
        one, or asks which)."""
        recs = await db.run(lambda c: c.fetch(
            "SELECT * FROM bulk_engine.runs ORDER BY created_at, id"), what="list runs")
        return [_run_info(r) for r in recs]

    async def refresh(self) -> RunInfo:
        rec = await self.db.run(
            lambda c: c.fetchrow("SELECT * FROM bulk_engine.runs WHERE id = $1", self.run.id),
            what="read the run")
        if rec is None:
            raise ConfigError(f"the run {self.run.name!r} was deleted from the database")
        self.run = _run_info(rec)
        return self.run

    # ------------------------------------------------------------------ loading

    async def load(self, rows: Iterable[RowSpec] | AsyncIterable[RowSpec], *,
                   batch: int = LOAD_BATCH, mark_loaded: bool = True) -> LoadReport:
        """Insert the manifest's rows, ``batch`` at a time (``ON CONFLICT DO NOTHING``).

        Streams: holds one batch in memory. Every worker may load the same manifest at once;
        each row is inserted once. A plain iterable is drained in a worker thread (reading the
        manifest blocks). With ``mark_loaded``, records that the whole manifest is in, so that
        workers can tell "no row left" from "rows not loaded yet" (:meth:`finished`).
        """
        read = inserted = 0
        if isinstance(rows, AsyncIterable):
            chunk: list[RowSpec] = []
            async for spec in rows:
                chunk.append(spec)
                if len(chunk) >= batch:
                    inserted += await self._insert(chunk)
                    read += len(chunk)
                    chunk = []
            if chunk:
                inserted += await self._insert(chunk)
                read += len(chunk)
        else:
            it = iter(rows)
            while chunk := await asyncio.to_thread(lambda: list(islice(it, batch))):
                inserted += await self._insert(chunk)
                read += len(chunk)
        if mark_loaded:
            await self.db.run(lambda c: c.execute(
                "UPDATE bulk_engine.runs SET loaded_at = coalesce(loaded_at, clock_timestamp()), "
                "rows_total = (SELECT count(*) FROM bulk_engine.rows WHERE run = $1) "
                "WHERE id = $1", self.run.id), what="mark the run loaded")
            await self.refresh()
        return LoadReport(read, inserted)

    async def _insert(self, chunk: list[RowSpec]) -> int:
        keys, ids, folders, lines, options, outputs, kinds = [], [], [], [], [], [], []
        for r in chunk:
            keys.append(enc(r.key))
            ids.append(enc(r.id))
            folders.append(enc(r.folder))
            lines.append(r.line)
            options.append(json.dumps(r.options, sort_keys=True) if r.options else None)
            outputs.append(_line_text(r.output) if r.output is not None else None)
            kinds.append(r.error_kind)
        status: str = await self.db.run(lambda c: c.execute(
            """
            INSERT INTO bulk_engine.rows (run, key, id, folder, line, options, state, outcome,
                                          error_kind, output, done_at)
            SELECT $1, k, i, f, l, o,
                   CASE WHEN out IS NULL THEN 'pending' ELSE 'done' END,
                   CASE WHEN out IS NULL THEN NULL ELSE 'failed' END,
                   ek, out, CASE WHEN out IS NULL THEN NULL ELSE clock_timestamp() END
              FROM unnest($2::bytea[], $3::bytea[], $4::bytea[], $5::bigint[], $6::text[],
                          $7::text[], $8::text[]) AS u(k, i, f, l, o, out, ek)
            ON CONFLICT (run, key) DO NOTHING
            """, self.run.id, keys, ids, folders, lines, options, outputs, kinds),
            what="load manifest rows")
        return int(status.rsplit(" ", 1)[-1])

    # ------------------------------------------------------------------ workers

    async def register_worker(self, worker_id: str | None = None) -> str:
        """Record this process as a worker of the run; returns its id (host:pid:random)."""
        host = socket.gethostname()
        wid = worker_id or f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        await self.db.run(lambda c: c.execute(
            "INSERT INTO bulk_engine.workers (id, run, host, pid) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = clock_timestamp(), stopped_at = NULL",
            wid, self.run.id, host, os.getpid()), what="register the worker")
        return wid

    async def release(self, worker: str) -> int:
        """A clean stop: give back every lease ``worker`` holds (rows keep their state, so a
        live token is polled by the next claimer). Returns how many."""

        async def op(c: Conn) -> int:
            async with c.transaction():
                status: str = await c.execute(
                    "UPDATE bulk_engine.rows SET lease_owner = NULL, lease_expires_at = NULL, "
                    "updated_at = clock_timestamp() "
                    "WHERE run = $1 AND lease_owner = $2 AND state <> 'done'",
                    self.run.id, worker)
                await c.execute(
                    "UPDATE bulk_engine.workers SET stopped_at = clock_timestamp() WHERE id = $1",
                    worker)
            return int(status.rsplit(" ", 1)[-1])

        return await self.db.run(op, what="release leases")

    # ------------------------------------------------------------------ claims and leases

    async def claim(self, worker: str, n: int, lease_s: float, *,
                    api_key_fp: str | None = None,
                    max_new: int | None = None) -> list[ClaimedRow]:
        """Lease up to ``n`` free rows to ``worker`` for ``lease_s`` seconds (database clock).

        Free: never leased (or released), or their lease ran out. Live tokens first (state
        ``submitted``), then ``pending``/``submitting`` rows in manifest order. With
        ``api_key_fp``, a row that key has submitted (``submitted``: a token works only with
        the key that got it; ``submitting``: only the same key replays the same
        Idempotency-Key) goes only to a claim for that key; ``pending`` rows go to any key.
        ``max_new``: at most that many ``pending`` rows (new analyses: the caller's share of
        the key's outstanding window); rows already submitted or caught mid-upload are
        claimed whatever it says, since their analyses count in the window already. Each
        claimed row's epoch is bumped. Leased rows are in neither index the claim reads, so
        its cost does not grow with the rows the workers hold. A claim does not renew the
        worker's other leases: :meth:`renew` does (``LeaseKeeper.run``). Idempotent under
        ``Database.run``'s retries: a retry returns the rows a lost answer had leased.
        """
        if n < 1:
            return []
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")

        claim_id = uuid.uuid4()
        tries = 0

        async def op(c: Conn) -> list[asyncpg.Record]:
            nonlocal tries
            tries += 1
            if tries > 1:
                # A retry: the last attempt may have committed before its answer was lost.
                # Its rows are ours; return them rather than leave them leased to nobody.
                done: list[asyncpg.Record] = await c.fetch(
                    f"SELECT {_CLAIMED_COLUMNS} FROM bulk_engine.rows "
                    "WHERE run = $1 AND lease_owner = $2 AND claim_id = $3 AND state <> 'done' "
                    "AND lease_expires_at > clock_timestamp()", self.run.id, worker, claim_id)
                if done:
                    return done
            rows: list[asyncpg.Record] = await c.fetch(
                """
                WITH expired AS (
                    SELECT key, state, line FROM bulk_engine.rows
                     WHERE run = $1 AND state IN ('pending', 'submitting', 'submitted')
                       AND lease_expires_at IS NOT NULL
                       -- stable, so the index can use it; never later than clock_timestamp(),
                       -- so the old holder's fence agrees the lease is over
                       AND lease_expires_at <= statement_timestamp()
                       AND (state = 'pending' OR $5::text IS NULL OR api_key_fp = $5
                            OR api_key_fp IS NULL)
                     ORDER BY (state <> 'submitted'), line, key
                     LIMIT $3
                     FOR UPDATE SKIP LOCKED
                ), never AS (
                    SELECT key, state, line FROM bulk_engine.rows
                     WHERE run = $1 AND state IN ('pending', 'submitting', 'submitted')
                       AND lease_expires_at IS NULL
                       AND (state = 'pending' OR $5::text IS NULL OR api_key_fp = $5
                            OR api_key_fp IS NULL)
                     ORDER BY (state <> 'submitted'), line, key
                     LIMIT $3
                     FOR UPDATE SKIP LOCKED
                ), free AS (
                    SELECT key FROM (
                        SELECT f.*, row_number() OVER (PARTITION BY f.state = 'pending'
                                                       ORDER BY f.line, f.key) AS nth
                          FROM (SELECT * FROM expired UNION ALL SELECT * FROM never) f) g
                     WHERE g.state <> 'pending' OR $7::integer IS NULL OR g.nth <= $7
                     ORDER BY (state <> 'submitted'), line, key
                     LIMIT $3
                )
                UPDATE bulk_engine.rows AS r
                   SET lease_owner = $2, epoch = r.epoch + 1, claim_id = $6,
                       lease_expires_at = clock_timestamp() + make_interval(secs => $4),
                       updated_at = clock_timestamp()
                  FROM free
                 WHERE r.run = $1 AND r.key = free.key
                RETURNING r.key, r.id, r.folder, r.line, r.options, r.state, r.token,
                          r.api_run_id, r.fingerprint, r.path, r.generation,
                          extract(epoch FROM r.submitted_at)::float8 AS submitted_at,
                          r.api_key_fp, r.possible_duplicate, r.epoch, r.request_fp
                """, self.run.id, worker, n, float(lease_s), api_key_fp, claim_id, max_new)
            return rows

        recs = await self.db.run(op, what="claim rows")
        rows = [_claimed(r, worker) for r in recs]
        # Live tokens first, then manifest order (RETURNING has no order of its own).
        rows.sort(key=lambda r: (r.state is not RowState.SUBMITTED, r.line, r.key))
        return rows

    async def renew(self, worker: str, lease_s: float) -> int:
        """Extend every lease ``worker`` still holds (one statement); returns how many.

        Expired leases are not revived: another worker may have claimed the row since.
        """

        async def op(c: Conn) -> int:
            n: int = await c.fetchval(
                """
                WITH renewed AS (
                    UPDATE bulk_engine.rows
                       SET lease_expires_at = clock_timestamp() + make_interval(secs => $3)
                     WHERE run = $1 AND lease_owner = $2 AND state <> 'done'
                       AND lease_expires_at > clock_timestamp()
                    RETURNING 1
                ), beat AS (
                    UPDATE bulk_engine.workers SET heartbeat_at = clock_timestamp()
                     WHERE id = $2 RETURNING 1
                )
                SELECT (SELECT count(*) FROM renewed) + 0 * (SELECT count(*) FROM beat)
                """, self.run.id, worker, float(lease_s))
            return n

        return await self.db.run(op, what="renew leases")

    async def claim_key(self, worker: str, key: str, lease_s: float) -> ClaimedRow | None:
        """Lease the row ``key`` to ``worker`` if it is free (None if it is not, or is done).

        For callers that name their row (the journal adapter given a row it never claimed);
        workers take rows with :meth:`claim`. Idempotent under ``Database.run``'s retries.
        """
        claim_id = uuid.uuid4()

        async def op(c: Conn) -> asyncpg.Record | None:
            rec: asyncpg.Record | None = await c.fetchrow(
                f"""
                UPDATE bulk_engine.rows AS r
                   SET lease_owner = $3, epoch = r.epoch + 1, claim_id = $5,
                       lease_expires_at = clock_timestamp() + make_interval(secs => $4),
                       updated_at = clock_timestamp()
                 WHERE r.run = $1 AND r.key = $2 AND r.state <> 'done'
                   AND (r.lease_expires_at IS NULL OR r.lease_expires_at <= clock_timestamp())
                RETURNING {_CLAIMED_COLUMNS}
                """, self.run.id, enc(key), worker, float(lease_s), claim_id)
            if rec is None:  # a retry whose first attempt committed: the row is ours already
                rec = await c.fetchrow(
                    f"SELECT {_CLAIMED_COLUMNS} FROM bulk_engine.rows WHERE run = $1 "
                    "AND key = $2 AND lease_owner = $3 AND claim_id = $4 AND state <> 'done'",
                    self.run.id, enc(key), worker, claim_id)
            return rec

        rec = await self.db.run(op, what="claim a row")
        return None if rec is None else _claimed(rec, worker)

    # ------------------------------------------------------------------ transitions

    async def _fenced(self, lease: RowLease, sql: str, *args: Any, what: str) -> bool:
        status: str = await self.db.run(
            lambda c: c.execute(sql, self.run.id, enc(lease.key), lease.worker, lease.epoch,
                                *args), what=what)
        return status.rsplit(" ", 1)[-1] != "0"

    async def mark_submitting(self, lease: RowLease, *, generation: int, fingerprint: str,
                              path: str, api_key_fp: str, min_lease_s: float = 0.0,
                              request_fp: str | None = None) -> bool:
        """Record that POST /case of ``generation`` is about to go (call BEFORE sending).

        A row still ``submitting`` (left by an earlier claim that died mid-POST, or sent again
        by this one) is flagged ``possible_duplicate``; a retry of this very call after a lost
        answer is not (each call has its own id). ``min_lease_s``: refuse unless the lease has
        at least that long left. ``request_fp``: the request identity, for whoever takes over
        the row's token to compare with the folder as it is then.
        """
        submit_id = uuid.uuid4()
        return await self._fenced(lease, f"""
            UPDATE bulk_engine.rows
               SET state = 'submitting', generation = $5, fingerprint = $6, path = $7,
                   api_key_fp = $8, token = NULL, api_run_id = NULL, submit_epoch = $4,
                   request_fp = $10, submit_id = $11,
                   -- still submitting from another call (a crash mid-POST, a second intent):
                   -- maybe two runs. The same call retried after a lost answer: not a POST.
                   possible_duplicate = possible_duplicate OR (
                       state = 'submitting' AND submit_id IS DISTINCT FROM $11),
                   updated_at = clock_timestamp()
             WHERE {_FENCE} AND state IN ('pending', 'submitting')
               AND lease_expires_at > clock_timestamp() + make_interval(secs => $9)
            """, generation, fingerprint, enc(path), api_key_fp, float(min_lease_s), request_fp,
            submit_id, what="mark a row submitting")

    async def mark_submitted(self, lease: RowLease, token: str, *, submitted_at: float,
                             api_run_id: str | None = None) -> bool:
        """Record the retrieve token of the accepted submission (before polling it).

        ``submitted_at`` is the worker's wall clock (it goes into the output line as is).
        """
        return await self._fenced(lease, f"""
            UPDATE bulk_engine.rows
               SET state = 'submitted', token = $5, api_run_id = $6,
                   submitted_at = to_timestamp($7), updated_at = clock_timestamp()
             WHERE {_FENCE} AND state IN ('submitting', 'submitted')
            """, token, api_run_id, float(submitted_at), what="record a retrieve token")

    async def mark_pending(self, lease: RowLease, *, generation: int | None = None) -> bool:
        """Back to ``pending`` (token expired, folder changed, key refused mid-upload).

        ``generation`` overrides the stored count (the engine's ``attempts - 1`` when the key was
        refused: the upload made no run). The lease is kept: the caller resubmits it.
        """
        return await self._fenced(lease, f"""
            UPDATE bulk_engine.rows
               SET state = 'pending', token = NULL, generation = coalesce($5::integer, generation),
                   updated_at = clock_timestamp()
             WHERE {_FENCE} AND state IN ('pending', 'submitting', 'submitted')
            """, generation, what="mark a row pending")

    async def forget(self, lease: RowLease) -> bool:
        """Delete a row that is not done (it left the manifest: it gets no line)."""
        return await self._fenced(lease, f"""
            DELETE FROM bulk_engine.rows WHERE {_FENCE} AND state <> 'done'
            """, what="forget a row")

    async def mark_possible_duplicate(self, lease: RowLease) -> bool:
        """Flag a row whose submit may have created a second run server-side."""
        return await self._fenced(lease, f"""
            UPDATE bulk_engine.rows SET possible_duplicate = true, updated_at = clock_timestamp()
             WHERE {_FENCE} AND state <> 'done'
            """, what="flag a possible duplicate")

    async def finish(self, lease: RowLease, *, outcome: Status | str, line: str | bytes,
                     error_kind: str | None = None) -> bool:
        """The row's final word: ``done`` with its outcome and its output line.

        Refused (False) unless the lease is current, so a stale worker never writes a second
        line. A retry by the same (worker, epoch) after a lost answer succeeds again.
        """
        outcome = Status(outcome)
        return await self._fenced(lease, """
            UPDATE bulk_engine.rows
               SET state = 'done', outcome = $5, output = $6, error_kind = $7, token = NULL,
                   done_at = CASE WHEN state = 'done' THEN done_at ELSE clock_timestamp() END,
                   lease_expires_at = NULL, updated_at = clock_timestamp()
             WHERE run = $1 AND key = $2 AND lease_owner = $3 AND epoch = $4
               AND ((state <> 'done' AND lease_expires_at > clock_timestamp())
                    OR (state = 'done' AND output = $6))
            """, outcome.value, _line_text(line), error_kind, what="finish a row")

    # ------------------------------------------------------------------ reads

    async def held(self, worker: str) -> dict[str, int]:
        """The rows ``worker`` holds under a live lease right now: key -> epoch.

        After an outage (``LeaseKeeper.lost``), a worker keeps only these and forgets the rest.
        """
        recs = await self.db.run(lambda c: c.fetch(
            "SELECT key, epoch FROM bulk_engine.rows WHERE run = $1 AND lease_owner = $2 "
            "AND state <> 'done' AND lease_expires_at > clock_timestamp()",
            self.run.id, worker), what="list held rows")
        return {dec(r["key"]) or "": r["epoch"] for r in recs}

    async def get(self, key: str) -> dict[str, Any] | None:
        """One row as stored (names decoded), for tests and diagnostics; never logged whole."""
        rec = await self.db.run(lambda c: c.fetchrow(
            "SELECT *, extract(epoch FROM lease_expires_at - clock_timestamp()) AS lease_left "
            "FROM bulk_engine.rows WHERE run = $1 AND key = $2", self.run.id, enc(key)),
            what="read a row")
        return None if rec is None else _decoded(rec)

    async def rows_in(self, state: RowState, *, limit: int = EXPORT_PAGE) -> list[dict[str, Any]]:
        """The first ``limit`` rows in ``state``, in manifest order, as :meth:`get` gives them
        (for the journal adapter and diagnostics; workers learn their rows from claims)."""
        recs = await self.db.run(lambda c: c.fetch(
            "SELECT *, NULL::float8 AS lease_left FROM bulk_engine.rows "
            "WHERE run = $1 AND state = $2 ORDER BY line, key LIMIT $3",
            self.run.id, RowState(state).value, limit), what="list rows")
        return [_decoded(r) for r in recs]

    async def counts(self) -> RunCounts:
        """Rows per state (every state present), done rows per outcome, rows under lease."""

        async def op(c: Conn) -> list[asyncpg.Record]:
            recs: list[asyncpg.Record] = await c.fetch(
                """
                SELECT state, outcome, count(*) AS n,
                       count(*) FILTER (WHERE lease_expires_at > clock_timestamp()) AS held
                  FROM bulk_engine.rows WHERE run = $1 GROUP BY state, outcome
                """, self.run.id)
            return recs

        by_state = dict.fromkeys((s.value for s in RowState), 0)
        by_outcome = dict.fromkeys((s.value for s in Status), 0)
        held = total = 0
        for r in await self.db.run(op, what="count rows"):
            by_state[r["state"]] += r["n"]
            if r["outcome"] is not None:
                by_outcome[r["outcome"]] += r["n"]
            held += r["held"]
            total += r["n"]
        return RunCounts(by_state, by_outcome, held, total)

    async def workers(self) -> list[WorkerInfo]:
        """Every worker of the run: heartbeat age (database clock), rows held, rows done.

        Rows held come from the index of held rows; rows done from one pass over the run's done
        rows, whatever the number of workers.
        """

        async def op(c: Conn) -> tuple[list[asyncpg.Record], ...]:
            async with c.transaction(isolation="repeatable_read", readonly=True):
                workers: list[asyncpg.Record] = await c.fetch(
                    "SELECT id, host, pid, stopped_at IS NOT NULL AS stopped, "
                    "extract(epoch FROM clock_timestamp() - heartbeat_at) AS age "
                    "FROM bulk_engine.workers WHERE run = $1 ORDER BY started_at, id",
                    self.run.id)
                held: list[asyncpg.Record] = await c.fetch(
                    "SELECT lease_owner, state, count(*) AS n FROM bulk_engine.rows "
                    "WHERE run = $1 AND state <> 'done' AND lease_owner IS NOT NULL "
                    "AND lease_expires_at > clock_timestamp() GROUP BY lease_owner, state",
                    self.run.id)
                done: list[asyncpg.Record] = await c.fetch(
                    "SELECT lease_owner, count(*) AS n FROM bulk_engine.rows "
                    "WHERE run = $1 AND state = 'done' GROUP BY lease_owner", self.run.id)
            return workers, held, done

        workers, held, done = await self.db.run(op, what="list workers")
        held_by: dict[str, dict[str, int]] = {}
        for r in held:
            held_by.setdefault(r["lease_owner"], {})[r["state"]] = r["n"]
        done_by = {r["lease_owner"]: r["n"] for r in done}
        return [WorkerInfo(r["id"], r["host"], r["pid"], float(r["age"]), r["stopped"],
                           held_by.get(r["id"], {}), done_by.get(r["id"], 0))
                for r in workers]

    async def finished(self) -> bool:
        """True when the manifest is fully loaded and every row is done."""
        run = await self.refresh()
        if not run.loaded:
            return False
        left = await self.db.run(lambda c: c.fetchval(
            "SELECT EXISTS (SELECT 1 FROM bulk_engine.rows WHERE run = $1 AND state <> 'done')",
            self.run.id), what="check for rows left")
        return not left

    # ------------------------------------------------------------------ export

    async def number_done(self) -> int:
        """Give export numbers to the rows done since the last call; returns the last number.

        Serialized per run by an advisory lock, so numbers only grow in commit order.
        """

        async def op(c: Conn) -> int:
            async with c.transaction():
                await c.execute("SELECT pg_advisory_xact_lock($1, $2::int)", _EXPORT_LOCK,
                                self.run.id % (1 << 31))
                last: int = await c.fetchval(
                    "SELECT last_done_seq FROM bulk_engine.runs WHERE id = $1 FOR UPDATE",
                    self.run.id)
                while True:
                    got = await c.fetchval(
                        """
                        WITH todo AS (
                            SELECT key, row_number() OVER (ORDER BY done_at, key) AS rn
                              FROM bulk_engine.rows
                             WHERE run = $1 AND state = 'done' AND done_seq IS NULL
                             ORDER BY done_at, key LIMIT $3
                        ), upd AS (
                            UPDATE bulk_engine.rows r SET done_seq = $2 + todo.rn
                              FROM todo WHERE r.run = $1 AND r.key = todo.key
                            RETURNING r.done_seq
                        )
                        SELECT max(done_seq) FROM upd
                        """, self.run.id, last, NUMBER_BATCH)
                    if got is None:
                        break
                    last = got
                await c.execute("UPDATE bulk_engine.runs SET last_done_seq = $2 WHERE id = $1",
                                self.run.id, last)
                return last

        return await self.db.run(op, what="number done rows")

    async def export(self, since: int | None = None) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(done_seq, line)`` for every done row after ``since``, in done order.

        Each ``line`` ends with a newline, ready to write. Pages through the rows (bounded
        memory); rows done while it runs are numbered by the next export.
        """
        await self.number_done()
        cursor = since or 0
        while True:
            page = await self.db.run(self._page_op(cursor), what="export done rows")
            for r in page:
                yield r["done_seq"], (r["output"] + "\n").encode("utf-8")
            if len(page) < EXPORT_PAGE:
                return
            cursor = page[-1]["done_seq"]

    def _page_op(self, cursor: int) -> Callable[[Conn], Awaitable[list[asyncpg.Record]]]:
        async def op(c: Conn) -> list[asyncpg.Record]:
            return await c.fetch(
                "SELECT done_seq, output FROM bulk_engine.rows "
                "WHERE run = $1 AND done_seq > $2 ORDER BY done_seq LIMIT $3",
                self.run.id, cursor, EXPORT_PAGE)

        return op

    async def reset_failed(self, *, kinds: Iterable[str] | None = None) -> int:
        """``--retry-failed``: done+failed rows (of ``kinds``, or all) back to ``pending``.

        Their lines leave the export at once (a row has one line at most, always): no rewrite
        dance. Rows failed before any upload keep generation 0. Returns how many.
        """
        kind_list = None if kinds is None else list(kinds)
        status: str = await self.db.run(lambda c: c.execute(
            """
            UPDATE bulk_engine.rows
               SET state = 'pending', outcome = NULL, output = NULL, error_kind = NULL,
                   done_at = NULL, done_seq = NULL, token = NULL, lease_owner = NULL,
                   lease_expires_at = NULL, updated_at = clock_timestamp()
             WHERE run = $1 AND state = 'done' AND outcome = 'failed'
               AND ($2::text[] IS NULL OR error_kind = ANY($2))
            """, self.run.id, kind_list), what="reset failed rows")
        return int(status.rsplit(" ", 1)[-1])


def _decoded(rec: asyncpg.Record) -> dict[str, Any]:
    out = dict(rec)
    for name in ("key", "id", "folder", "path"):
        out[name] = dec(out[name])
    return out


def _run_info(rec: asyncpg.Record) -> RunInfo:
    return RunInfo(rec["id"], rec["name"], rec["settings_fingerprint"], rec["settings_summary"],
                   rec["loaded_at"] is not None, rec["rows_total"])


# ---------------------------------------------------------------------- lease keeping


class LeaseKeeper:
    """One worker's claims and renewals, and how long its leases are surely valid.

    ``valid()`` is False once ``lease_s - margin_s`` has passed (on this process's monotonic
    clock) since the last claim or renewal that succeeded was *sent*: from then on the worker
    must make no API call for its rows (their leases may have expired and been claimed). Run
    :meth:`run` in the worker's task group: it renews every ``lease_s / 3`` seconds and, while the
    database is away, keeps trying (``Database.run`` waits and retries).
    """

    def __init__(self, store: RunStore, worker: str, *, lease_s: float = 60.0,
                 margin_s: float | None = None, api_key_fp: str | None = None,
                 clock: Clock | None = None) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.store = store
        self.worker = worker
        self.lease_s = float(lease_s)
        self.margin_s = float(lease_s / 6 if margin_s is None else margin_s)
        self.api_key_fp = api_key_fp
        self.clock = clock or MonotonicClock()
        self._renewed_sent: float | None = None  # the last renewal that succeeded, when sent
        self._claim_sent: float | None = None  # the first claim no renewal covers yet
        self._claim_done = -math.inf  # when the last claim came back
        self.renewals = 0
        # Renewals sent once the horizon had passed: leases may have run out before them (and
        # been claimed by others). A worker compares it with the count it last acted on.
        self.lapses = 0
        self.lost = asyncio.Event()  # set when the horizon passed while renewing
        self._renewed = asyncio.Event()  # set (and replaced) by every renewal that succeeds

    def horizon(self) -> float:
        """Until when (this process's clock) every held lease is surely current."""
        times = [t for t in (self._renewed_sent, self._claim_sent) if t is not None]
        return min(times) + self.lease_s - self.margin_s if times else -math.inf

    def valid(self) -> bool:
        """True while every lease this worker holds is surely still current."""
        return self.clock.now() < self.horizon()

    def remaining(self) -> float:
        """Seconds the leases are surely valid for (negative: past the horizon)."""
        return self.horizon() - self.clock.now()

    async def wait_valid(self) -> None:
        """Return once every held lease is surely current (at once if it is)."""
        while not self.valid():
            await self._renewed.wait()

    async def claim(self, n: int, *, api_key_fp: str | None = None,
                    max_new: int | None = None) -> list[ClaimedRow]:
        """Claim up to ``n`` rows for ``lease_s`` (see :meth:`RunStore.claim`; ``api_key_fp``
        defaults to the keeper's)."""
        sent = self.clock.now()
        rows = await self.store.claim(self.worker, n, self.lease_s,
                                      api_key_fp=api_key_fp or self.api_key_fp, max_new=max_new)
        if rows and self._claim_sent is None:
            self._claim_sent = sent
        self._claim_done = self.clock.now()
        return rows

    async def renew(self) -> int:
        """Extend every lease held; a renewal sent after the last claim returned covers it."""
        sent = self.clock.now()
        horizon = self.horizon()
        n = await self.store.renew(self.worker, self.lease_s)
        if -math.inf < horizon <= sent:
            self.lapses += 1
        self.renewals += 1
        self._renewed_sent = sent if self._renewed_sent is None else max(self._renewed_sent,
                                                                         sent)
        if sent >= self._claim_done:
            self._claim_sent = None
        self.lost.clear()
        self._renewed.set()
        self._renewed = asyncio.Event()
        return n

    async def run(self) -> None:
        """Renew every ``lease_s / 3`` seconds until cancelled.

        A renewal still waiting for the database when the horizon passes sets :attr:`lost`
        (and logs ``leases_lost``); it goes on waiting, and the first renewal that succeeds
        clears it. Rows claimed by others meanwhile are refused at their next transition
        (or pruned with :meth:`RunStore.held`).
        """
        period = self.lease_s / 3
        while True:
            await self.clock.sleep(period)
            left = self.remaining()
            try:
                if left > 0:
                    await asyncio.wait_for(self.renew(), timeout=left)
                else:
                    await self.renew()
            except TimeoutError:
                self.lost.set()
                log.warning("leases_lost", worker=self.worker, lease_s=self.lease_s,
                            hint="no API call for held rows until the database answers again")
