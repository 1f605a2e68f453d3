"""The crash-safe record of a run: which rows are submitted, with which token, and which are done.

Where it sits::

    producer ──is_done?──▶ submitters ──mark_submitting / mark_submitted──▶ poll scheduler
                                                                                 │
    results.jsonl ◀── writer ──(fsync, then) mark_done_many ◀── Outcome ◀────────┘

The journal lives beside the output (``<output>.journal``) in SQLite, WAL mode,
``synchronous=NORMAL``:

* A process crash (``kill -9``, OOM, Ctrl-C at a bad moment) loses nothing that was committed.
* A power loss may lose the last few commits. That can only make a rerun poll a token again or
  submit a folder again, never lose or duplicate an output line: the output file, not the
  journal, is the source of truth for "done". ``writer.reconcile`` re-reads the output past
  ``output_offset`` at startup, and ``mark_done_many`` moves that offset in the same transaction
  as the done-marks, so the two cannot disagree after a crash.

One connection, used from the event-loop thread only (sqlite3 enforces it). Every call is a
short indexed statement, so calling it synchronously from async code is fine. Each mutating call
commits on its own unless it runs inside ``with journal.batch():``, which commits once at the end.
The producer's worker thread reads through its own connection (:meth:`Journal.reader`), so it
can skip done rows before listing their folders.

The journal is held exclusively while open (an ``flock`` on ``<journal>.lock``): a second
process running on the same output gets a ``ConfigError`` instead of interleaving its lines with
ours.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

from bulk_engine.config import Settings
from bulk_engine.errors import ConfigError, StorageError
from bulk_engine.logs import short_token
from bulk_engine.models import Job
from bulk_engine.s3.url import S3Url
from bulk_engine.vocab import RowState, Status

__all__ = [
    "DONE",
    "OUTCOMES",
    "PENDING",
    "REPOLL_WINDOW_S",
    "RETRYING",
    "SCHEMA_VERSION",
    "STATES",
    "SUBMITTED",
    "SUBMITTING",
    "Journal",
    "JournalReader",
    "RebuildReport",
    "RowRecord",
    "describe_sqlite_error",
    "lock_exclusively",
    "settings_fingerprint",
    "settings_summary",
]

SCHEMA_VERSION: Final = 2

PENDING: Final = RowState.PENDING.value
SUBMITTING: Final = RowState.SUBMITTING.value
SUBMITTED: Final = RowState.SUBMITTED.value
DONE: Final = RowState.DONE.value
RETRYING: Final = RowState.RETRYING.value
STATES: Final = tuple(s.value for s in RowState)
OUTCOMES: Final = tuple(s.value for s in Status)

# A completed row whose line went missing is re-polled (not resubmitted) when it was finished
# this recently: results stay retrievable for 60 minutes after the analysis completed, which
# was before the row was marked done.
REPOLL_WINDOW_S: Final = 50 * 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS rows (
    key                TEXT PRIMARY KEY,
    id                 TEXT,
    folder             TEXT,
    path               TEXT,
    line               INTEGER,
    state              TEXT NOT NULL,
    token              TEXT,
    run_id             TEXT,
    fingerprint        TEXT,
    attempts           INTEGER NOT NULL DEFAULT 0,
    submitted_at       REAL,
    outcome            TEXT,
    possible_duplicate INTEGER NOT NULL DEFAULT 0,
    updated_at         REAL,
    extra              TEXT,
    error_kind         TEXT,
    request_fp         TEXT,
    done_at            REAL,
    kept_token         TEXT,
    key_fp             TEXT
);
-- (state, key): state lookups, and key-ordered paging through one state.
CREATE INDEX IF NOT EXISTS rows_state ON rows(state, key);
"""

_COLUMNS = (
    "key, id, folder, path, line, state, token, run_id, fingerprint, attempts, submitted_at, "
    "outcome, possible_duplicate, updated_at, extra, error_kind, request_fp, done_at, kept_token, "
    "key_fp"
)
# Columns added by each schema version, for journals written by an older bulk_engine.
_MIGRATIONS: Final = {
    2: ("ALTER TABLE rows ADD COLUMN error_kind TEXT",
        "ALTER TABLE rows ADD COLUMN request_fp TEXT",
        "ALTER TABLE rows ADD COLUMN done_at REAL",
        "ALTER TABLE rows ADD COLUMN kept_token TEXT",
        "ALTER TABLE rows ADD COLUMN key_fp TEXT"),
}

_COLUMN_NAMES = tuple(c.strip() for c in _COLUMNS.split(","))

_PAGE = 1000  # keys per page in keys_in_state: bounded memory, robust to concurrent updates


@dataclass(slots=True)
class RebuildReport:
    """What :meth:`Journal.rebuild_from_output` found."""

    lines: int = 0  # valid lines in the output
    duplicate_keys: int = 0  # rows with more than one line
    already_done: int = 0  # rows with a line that the journal had done already
    repolled: int = 0  # done rows whose line was gone: their token is polled again
    resubmitted: int = 0  # done rows whose line was gone: sent back to pending

    @property
    def redone(self) -> int:
        return self.repolled + self.resubmitted


@dataclass(frozen=True, slots=True)
class RowRecord:
    """One row of the journal, as stored."""

    key: str
    id: str | None
    folder: str | None
    path: str | None
    line: int | None
    state: str
    token: str | None = field(repr=False)  # a bearer of results: never in logs or reprs
    run_id: str | None
    fingerprint: str | None
    attempts: int
    submitted_at: float | None
    outcome: str | None
    possible_duplicate: bool
    updated_at: float | None
    extra: str | None = None  # JSON {use_case, analyse_type, payload}: rebuilds the Job on resume
    error_kind: str | None = None  # error.kind of a done+failed row
    request_fp: str | None = None  # client.request_identity of the last submission
    done_at: float | None = None  # wall time the row's line became durable
    kept_token: str | None = field(default=None, repr=False)  # a done row's last token
    key_fp: str | None = None  # client.key_fingerprint of the key that submitted it

    @property
    def token_hint(self) -> str | None:
        """The token cut short, safe to log (``logs.short_token``)."""
        return short_token(self.token)

    @classmethod
    def _from_row(cls, row: tuple[Any, ...]) -> RowRecord:
        values = dict(zip(_COLUMN_NAMES, row, strict=True))
        values["attempts"] = values["attempts"] or 0
        values["possible_duplicate"] = bool(values["possible_duplicate"])
        if isinstance(values["path"], bytes):  # stored as the OS's bytes, see mark_submitting
            values["path"] = os.fsdecode(values["path"])
        return cls(**values)


def _job_extra(job: Job) -> str:
    """What a Job needs besides its folder to be rebuilt on resume (the manifest's row options)."""
    return json.dumps(
        {
            "use_case": job.use_case,
            "analyse_type": list(job.analyse_type) if job.analyse_type is not None else None,
            "payload": job.payload,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def settings_summary(settings: Settings, source: Path | S3Url | str) -> str:
    """The run-defining settings in readable form (never the API key).

    ``source`` is the manifest path (or the ``--root`` folder, or ``s3://`` prefix). Only what
    decides *which* lines the output holds is included: the API host, analyse types, use case
    and input. Tuning knobs (concurrency, rate, poll intervals) can change between a run and its
    resume. The S3 store that ``s3://`` folders are read from is part of the identity too, bound
    when the run first reads a bucket (``s3.access.bind_store``: journal meta ``s3_store``).
    """
    identity = {
        "host": urlsplit(settings.base_url).hostname or "",
        "analyse_type": ",".join(settings.analyse_type),
        "use_case": settings.use_case,
        "source": str(source) if isinstance(source, S3Url)
        else str(Path(source).expanduser().resolve()),
    }
    return json.dumps(identity, sort_keys=True)  # ASCII: a non-UTF-8 path must not break it


def settings_fingerprint(settings: Settings, source: Path | S3Url | str) -> str:
    """A digest of :func:`settings_summary`, for :meth:`Journal.check_settings`."""
    return hashlib.sha256(settings_summary(settings, source).encode()).hexdigest()


class Journal:
    """The run's SQLite journal. Open with :meth:`Journal.open`; use as a context manager."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        """Wrap an open connection; use :meth:`open` instead."""
        self._conn = conn
        self.path = path
        self._batch_depth = 0
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: Path, *, lock_timeout: float = 1.0) -> Journal:
        """Open (creating if needed) the journal at ``path`` and take it exclusively.

        Raises ConfigError if the file is not a journal, was written by a newer schema, or is
        still held by another running process after ``lock_timeout`` seconds.
        """
        path = Path(path)
        lock_fd = _take_lock(path, lock_timeout)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (batch()).
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=lock_timeout)
        except sqlite3.Error as exc:
            os.close(lock_fd)
            raise ConfigError(f"cannot open journal {path}: {exc}") from None
        try:
            journal = cls(conn, path)
            journal._lock_fd = lock_fd
            journal._setup()
        except sqlite3.OperationalError as exc:
            conn.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise ConfigError(
                    f"journal {path} is in use by another running bulk_engine process; "
                    "wait for it to finish or use another --output"
                ) from None
            raise ConfigError(f"cannot use journal {path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ConfigError(
                f"{path} is not a bulk_engine journal ({exc}); "
                "use another --output or move the file away"
            ) from None
        except BaseException:
            conn.close()
            os.close(lock_fd)
            raise
        return journal

    def reader(self) -> JournalReader:
        """A read-only view on its own connection, for the producer's worker thread."""
        return JournalReader(self.path)

    def _setup(self) -> None:
        c = self._conn
        mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        # Without WAL (some network filesystems), NORMAL is not crash-safe: pay for FULL.
        c.execute("PRAGMA synchronous=NORMAL" if mode == "wal" else "PRAGMA synchronous=FULL")
        c.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise ConfigError(
                    f"journal {self.path} has schema version {row[0]}, newer than this "
                    f"bulk_engine understands ({SCHEMA_VERSION}); upgrade bulk_engine"
                )
            elif int(row[0]) < SCHEMA_VERSION:
                for version in range(int(row[0]) + 1, SCHEMA_VERSION + 1):
                    for stmt in _MIGRATIONS.get(version, ()):
                        c.execute(stmt)
                self._set_meta(c, "schema_version", str(SCHEMA_VERSION))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection (idempotent); every call outside a batch has already committed."""
        self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group every call inside into one transaction, committed at the end.

        Rolled back if the block raises. Nested batches join the outermost one.
        """
        if self._batch_depth:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
            return
        with self._storage_errors():
            self._conn.execute("BEGIN IMMEDIATE")
            self._batch_depth = 1
            try:
                yield
            except BaseException:
                self._batch_depth = 0
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # a failed statement (disk full) may have rolled back already
                raise
            self._batch_depth = 0
            self._conn.execute("COMMIT")

    @contextmanager
    def _storage_errors(self) -> Iterator[None]:
        """SQLite's errors as a StorageError that names the journal and what to do."""
        try:
            yield
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # misuse (a bug), not the storage
        except sqlite3.Error as exc:
            raise StorageError(describe_sqlite_error(self.path, exc)) from None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction for one call, or a part of the enclosing batch."""
        with self.batch():
            yield self._conn

    # ------------------------------------------------------------------ reads

    def get(self, key: str) -> RowRecord | None:
        """The row of ``key``, or None if the journal never saw it."""
        with self._storage_errors():
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM rows WHERE key=?", (key,)).fetchone()
        return None if row is None else RowRecord._from_row(row)

    def is_done(self, key: str) -> bool:
        """True if the row's line is durably in the output."""
        with self._storage_errors():
            row = self._conn.execute("SELECT state FROM rows WHERE key=?", (key,)).fetchone()
        return row is not None and row[0] == DONE

    def live_tokens(self) -> list[RowRecord]:
        """Rows with a live token (state submitted): poll these on resume, do not resubmit."""
        return self._select_state(SUBMITTED)

    def submitting_rows(self) -> list[RowRecord]:
        """Rows whose POST /case may or may not have reached the server: possible duplicates."""
        return self._select_state(SUBMITTING)

    def _select_state(self, state: str) -> list[RowRecord]:
        with self._storage_errors():
            cur = self._conn.execute(
                f"SELECT {_COLUMNS} FROM rows WHERE state=? ORDER BY key", (state,)
            )
            return [RowRecord._from_row(r) for r in cur]

    def keys_in_state(self, state: str) -> Iterator[str]:
        """Every key in ``state``, in key order, fetched page by page (bounded memory)."""
        last = ""
        first = True
        while True:
            if first:
                cur = self._conn.execute(
                    "SELECT key FROM rows WHERE state=? ORDER BY key LIMIT ?", (state, _PAGE)
                )
                first = False
            else:
                cur = self._conn.execute(
                    "SELECT key FROM rows WHERE state=? AND key>? ORDER BY key LIMIT ?",
                    (state, last, _PAGE),
                )
            page = [r[0] for r in cur]
            yield from page
            if len(page) < _PAGE:
                return
            last = page[-1]

    def counts(self) -> dict[str, int]:
        """Rows per state (every state present, 0 if none) plus done rows per outcome.

        Keys: ``pending submitting submitted done retrying completed failed``.
        """
        out = dict.fromkeys(STATES + OUTCOMES, 0)
        with self._storage_errors():
            for state, n in self._conn.execute(
                    "SELECT state, COUNT(*) FROM rows GROUP BY state"):
                out[state] = n
            for outcome, n in self._conn.execute(
                "SELECT outcome, COUNT(*) FROM rows WHERE state=? GROUP BY outcome", (DONE,)
            ):
                if outcome is not None:
                    out[outcome] = n
        return out

    # ------------------------------------------------------------------ row transitions

    def mark_submitting(self, job: Job, attempts: int, request_fp: str | None = None,
                        key_fp: str | None = None) -> None:
        """Record that the POST /case of ``job`` is about to be sent (call BEFORE sending).

        ``request_fp`` is the submission's request identity (``client.request_identity``),
        ``key_fp`` the fingerprint of the key it is sent with (never the key). If the row was
        already ``submitting`` (a previous POST's fate is unknown), it is flagged
        ``possible_duplicate``.
        """
        now = time.time()
        with self._tx() as c:
            c.execute(
                """
                INSERT INTO rows (key, id, folder, path, line, state, token, run_id, fingerprint,
                                  attempts, submitted_at, outcome, possible_duplicate, updated_at,
                                  extra, request_fp, key_fp)
                VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, NULL, NULL, 0, ?, ?, ?, ?)
                ON CONFLICT(key) DO UPDATE SET
                    id=excluded.id, folder=excluded.folder, path=excluded.path,
                    line=excluded.line, state=excluded.state, token=NULL,
                    fingerprint=excluded.fingerprint, attempts=excluded.attempts,
                    outcome=NULL, error_kind=NULL, done_at=NULL,
                    possible_duplicate=(rows.possible_duplicate OR rows.state='submitting'),
                    updated_at=excluded.updated_at, extra=excluded.extra,
                    request_fp=excluded.request_fp, key_fp=excluded.key_fp
                """,
                (
                    job.key,
                    job.id,
                    job.folder,
                    # The path as the OS's bytes: a name that is not UTF-8 round-trips exactly.
                    os.fsencode(str(job.path) if isinstance(job.path, S3Url) else job.path),
                    job.line,
                    SUBMITTING,
                    job.fingerprint,
                    attempts,
                    now,
                    _job_extra(job),
                    request_fp,
                    key_fp,
                ),
            )

    def mark_submitted(self, key: str, token: str, run_id: str | None, submitted_at: float) -> None:
        """Record the token of an accepted submit (commit this BEFORE the token is polled)."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE rows SET state=?, token=?, run_id=?, submitted_at=?, updated_at=? "
                "WHERE key=?",
                (SUBMITTED, token, run_id, submitted_at, time.time(), key),
            )
            if cur.rowcount == 0:
                raise KeyError(f"mark_submitted: no journal row for key {key!r}")

    def mark_pending(self, key: str, *, attempts: int | None = None) -> None:
        """Send the row back to be submitted again (e.g. token expired: 404); drops the token.

        ``attempts`` rewrites the count of submissions made (a refused one does not count).
        """
        with self._tx() as c:
            c.execute(
                "UPDATE rows SET state=?, token=NULL, updated_at=?, "
                "attempts=COALESCE(?, attempts) WHERE key=?",
                (PENDING, time.time(), attempts, key),
            )

    def forget(self, key: str) -> None:
        """Remove a row the manifest no longer holds (it gets no line)."""
        with self._tx() as c:
            c.execute("DELETE FROM rows WHERE key=?", (key,))

    def mark_possible_duplicate(self, key: str) -> None:
        """Flag a row whose submit may have created a second run server-side."""
        with self._tx() as c:
            c.execute(
                "UPDATE rows SET possible_duplicate=1, updated_at=? WHERE key=?",
                (time.time(), key),
            )

    def mark_done_many(
        self,
        items: Iterable[tuple[str, str] | tuple[str, str, str | None]],
        output_offset: int,
        *,
        tail: str | None = None,
    ) -> None:
        """Mark rows done and move ``output_offset``, in one transaction.

        ``items`` is ``[(key, 'completed'|'failed'[, error kind]), ...]``. Call only after the
        rows' lines are fsynced and ``output_offset`` is the output's size just past them;
        ``tail`` is ``writer.tail_digest`` of the output's bytes just before that offset (how the
        next run tells the output was not edited behind the journal's back). Keys the journal
        never saw (bad manifest rows) are inserted. The token moves to ``kept_token``: a row
        whose line goes missing later can be re-polled instead of resubmitted.
        """
        now = time.time()
        rows = []
        for item in items:
            key, outcome = item[0], item[1]
            kind = item[2] if len(item) > 2 else None
            if outcome not in OUTCOMES:
                raise ValueError(f"outcome must be 'completed' or 'failed', got {outcome!r}")
            rows.append((key, DONE, outcome, kind, now, now))
        with self._tx() as c:
            c.executemany(
                """
                INSERT INTO rows (key, state, outcome, error_kind, attempts, possible_duplicate,
                                  updated_at, done_at)
                VALUES (?, ?, ?, ?, 0, 0, ?, ?)
                ON CONFLICT(key) DO UPDATE SET
                    state=excluded.state, outcome=excluded.outcome,
                    error_kind=excluded.error_kind, updated_at=excluded.updated_at,
                    done_at=excluded.done_at, kept_token=COALESCE(rows.token, rows.kept_token),
                    token=NULL
                """,
                rows,
            )
            self._set_offset(c, output_offset, tail)

    def rebuild_from_output(
        self,
        items: Iterable[tuple[str, str, str | None]],
        output_offset: int,
        *,
        tail: str | None = None,
    ) -> RebuildReport:
        """Make the done-set exactly the rows that have a line in the output (``items``).

        For an output that changed behind the journal's back (deleted, truncated, lines removed
        by hand): every row with a line is done; every row the journal had done whose line is
        gone is redone — re-polled if it completed within ``REPOLL_WINDOW_S`` and its token is
        known, else sent back to ``pending`` (resubmitted under a new generation). Streams
        ``items`` (``(key, status, error kind)`` per line) into a temporary table: memory flat.
        """
        now = time.time()
        report = RebuildReport()
        with self._tx() as c:
            c.execute("CREATE TEMP TABLE IF NOT EXISTS present "
                      "(key TEXT PRIMARY KEY, outcome TEXT, error_kind TEXT, n INTEGER)")
            c.execute("DELETE FROM temp.present")
            for key, outcome, kind in items:
                c.execute(
                    "INSERT INTO temp.present VALUES (?, ?, ?, 1) ON CONFLICT(key) DO UPDATE "
                    "SET outcome=excluded.outcome, error_kind=excluded.error_kind, n=n+1",
                    (key, outcome, kind))
                report.lines += 1
            report.duplicate_keys = c.execute(
                "SELECT COUNT(*) FROM temp.present WHERE n > 1").fetchone()[0]
            report.already_done = c.execute(
                "SELECT COUNT(*) FROM temp.present JOIN rows USING (key) WHERE rows.state=?",
                (DONE,)).fetchone()[0]
            gone = "state=? AND key NOT IN (SELECT key FROM temp.present)"
            report.repolled = c.execute(
                f"UPDATE rows SET state=?, token=kept_token, outcome=NULL, error_kind=NULL, "
                f"done_at=NULL, updated_at=? WHERE {gone} AND outcome=? "
                f"AND kept_token IS NOT NULL AND path IS NOT NULL AND done_at >= ?",
                (SUBMITTED, now, DONE, Status.COMPLETED.value, now - REPOLL_WINDOW_S)).rowcount
            report.resubmitted = c.execute(
                f"UPDATE rows SET state=?, token=NULL, outcome=NULL, error_kind=NULL, "
                f"done_at=NULL, updated_at=? WHERE {gone}", (PENDING, now, DONE)).rowcount
            c.execute(
                """
                INSERT INTO rows (key, state, outcome, error_kind, attempts, possible_duplicate,
                                  updated_at, done_at)
                SELECT key, ?, outcome, error_kind, 0, 0, ?, ? FROM temp.present WHERE true
                ON CONFLICT(key) DO UPDATE SET
                    state=excluded.state, outcome=excluded.outcome,
                    error_kind=excluded.error_kind, updated_at=excluded.updated_at,
                    done_at=COALESCE(rows.done_at, excluded.done_at)
                """,
                (DONE, now, now))
            c.execute("DELETE FROM temp.present")
            self._set_offset(c, output_offset, tail)
        return report

    # ------------------------------------------------------------------ run metadata

    @property
    def output_offset(self) -> int:
        """Bytes of the output known durable and journaled (0 for a new run)."""
        value = self.get_meta("output_offset")
        return int(value) if value is not None else 0

    def get_meta(self, key: str) -> str | None:
        """A run metadata value, or None."""
        with self._storage_errors():
            row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store a run metadata value (strings only; never a secret)."""
        with self._tx() as c:
            self._set_meta(c, key, value)

    @classmethod
    def _set_offset(cls, c: sqlite3.Connection, offset: int, tail: str | None) -> None:
        cls._set_meta(c, "output_offset", str(int(offset)))
        cls._set_meta(c, "output_tail", tail or "")

    @property
    def output_tail(self) -> str | None:
        """``writer.tail_digest`` of the output just before ``output_offset``; None if unknown
        (a journal written before it was recorded)."""
        return self.get_meta("output_tail") or None

    @staticmethod
    def _set_meta(c: sqlite3.Connection, key: str, value: str) -> None:
        c.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def check_settings(self, fingerprint: str, *, summary: str | None = None) -> None:
        """Bind the journal to one run's settings (see :func:`settings_fingerprint`).

        The first call stores the fingerprint (and the readable ``summary``); later runs must
        present the same one, else ConfigError: resuming with other settings would mix two runs'
        lines in one output.
        """
        previous = self.get_meta("settings_fingerprint")
        if previous is None:
            with self._tx() as c:
                self._set_meta(c, "settings_fingerprint", fingerprint)
                if summary is not None:
                    self._set_meta(c, "settings_summary", summary)
            return
        if previous == fingerprint:
            return
        before = self.get_meta("settings_summary")
        detail = ""
        if before is not None and summary is not None:
            detail = f" (journal: {before}; now: {summary})"
        raise ConfigError(
            f"the output and journal {self.path} belong to a different run: its API host, "
            f"analyse_type, use_case or manifest differ from this one{detail}. "
            "To start a new run, choose another --output; to start this output over, delete "
            "the output and its journal; to resume, rerun with the original settings."
        )

    # ------------------------------------------------------------------ --retry-failed

    def begin_retry_failed(self, kinds: Collection[str] | None = None) -> int:
        """Move done+failed rows to ``retrying`` and set ``rewrite_pending``; returns how many.

        ``kinds``: only rows whose error kind is one of these (None: every failed row). Then
        ``writer.rewrite_without_failed`` drops their lines, and :meth:`finish_retry_failed`
        makes them pending. A crash in between is redone at startup while
        ``get_meta('rewrite_pending') == '1'``. With nothing to retry, nothing is flagged.
        """
        with self._tx() as c:
            where = "state=? AND outcome=?"
            args: list[Any] = [RETRYING, time.time(), DONE, Status.FAILED.value]
            if kinds is not None:
                wanted = sorted(kinds)
                where += f" AND error_kind IN ({','.join('?' * len(wanted))})"
                args += wanted
            cur = c.execute(f"UPDATE rows SET state=?, updated_at=? WHERE {where}", args)
            if cur.rowcount:
                self._set_meta(c, "rewrite_pending", "1")
            return cur.rowcount

    def finish_retry_failed(self, new_offset: int, *, tail: str | None = None) -> None:
        """After the rewrite: ``retrying`` rows become ``pending``, the offset the new size."""
        with self._tx() as c:
            c.execute(
                "UPDATE rows SET state=?, outcome=NULL, error_kind=NULL, token=NULL, "
                "done_at=NULL, updated_at=? WHERE state=?",
                (PENDING, time.time(), RETRYING),
            )
            self._set_meta(c, "rewrite_pending", "0")
            self._set_offset(c, new_offset, tail)

    @property
    def rewrite_pending(self) -> bool:
        """True if a --retry-failed rewrite was begun and not finished."""
        return self.get_meta("rewrite_pending") == "1"


def describe_sqlite_error(path: Path, exc: sqlite3.Error) -> str:
    """A SQLite error as one line naming the journal file and what to do (no traceback)."""
    text = str(exc)
    low = text.lower()
    if "full" in low:
        return (f"journal {path}: the disk is full ({text}); free space on that disk or put "
                "the journal elsewhere (--journal), then rerun the same command: the state "
                "committed so far is safe")
    if "locked" in low or "busy" in low:
        return (f"journal {path} is in use by another running bulk_engine process; wait for it "
                "to finish or use another --output")
    if "readonly" in low or "read-only" in low or "permission" in low:
        return f"journal {path} cannot be written ({text}); check the file's permissions"
    if "disk i/o" in low:
        return f"journal {path}: disk I/O error ({text}); check the disk, then rerun"
    return f"journal {path}: {text}"


def _take_lock(path: Path, timeout: float) -> int:
    """flock ``<path>.lock`` exclusively, waiting up to ``timeout`` s; returns the held fd."""
    return lock_exclusively(
        Path(f"{path}.lock"), timeout, what="journal lock",
        busy=f"journal {path} is in use by another running bulk_engine process; wait for it to "
             "finish or use another --output")


def lock_exclusively(lock_path: Path, timeout: float, *, what: str, busy: str) -> int:
    """``flock`` ``lock_path`` (created if needed) exclusively, waiting up to ``timeout`` s;
    returns the held fd. ConfigError ``busy`` when another process holds it."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the {what} {lock_path}: {exc.strerror}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                os.close(fd)
                raise ConfigError(busy) from None
            time.sleep(0.05)


class JournalReader:
    """A read-only connection for the producer thread: done rows and per-run duplicate ids.

    ``is_done`` sees what the journal had committed (rows done in earlier runs); ``seen`` keeps
    this run's ids in a TEMP table of this connection, on disk, so memory stays flat.
    """

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA temp_store=FILE")
        self._conn.execute("CREATE TEMP TABLE seen (key TEXT PRIMARY KEY)")
        # Keys the journal holds in a state other than done (from earlier runs: at most the
        # rows in flight when they stopped). Rows not in here are new: no need to look them up.
        self.known: set[str] = set()

    def is_done(self, key: str) -> bool:
        row = self._conn.execute("SELECT state FROM rows WHERE key = ?", (key,)).fetchone()
        if row is not None and row[0] != DONE:
            self.known.add(key)
        return row is not None and row[0] == DONE

    def state(self, key: str) -> str | None:
        """The journaled state of ``key`` (a ``RowState`` value), or None if never seen."""
        row = self._conn.execute("SELECT state FROM rows WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def seen(self, key: str) -> bool:
        """True if ``key`` was already passed to seen() on this reader (duplicate ids of a run).

        Backed by a TEMP table on disk, so memory stays bounded for millions of rows.
        """
        cur = self._conn.execute("INSERT OR IGNORE INTO temp.seen(key) VALUES (?)", (key,))
        return cur.rowcount == 0

    def close(self) -> None:
        self._conn.close()
