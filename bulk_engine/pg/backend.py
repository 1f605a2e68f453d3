"""The journal over leases: ``JournalBackend`` for a worker of a run shared through PostgreSQL.

Where it sits: the shared stages (``Submitter``, ``Poller``) record each row's progress through
a ``backend.JournalBackend``; with ``--db`` that is a :class:`PgBackend`, which turns each
transition into the fenced statement of ``rows.RunStore`` for the lease this worker holds on
the row::

    ClaimProducer ─adopt(claimed row)─▶ PgBackend ◀─mark_submitting / mark_submitted─ Submitter
                                           │    ◀─mark_pending───────────────────── Poller
    DatabaseSink ─finish_row(outcome)─────▶│ ──▶ RunStore (one fenced UPDATE each)

A transition the database refuses (the lease ran out and another worker holds the row now) or
one for a row this worker holds no lease on raises ``backend.RowLost``: the stage drops the row
(no API call for it, no line). After leases may have lapsed, :meth:`PgBackend.prune` keeps
only the leases the database still gives this worker.

Keys have two fingerprints: the engine's (``client.key_fingerprint``, part of every request
identity and Idempotency-Key) and the database's (salted per database, what ``rows.api_key_fp``
and the governors hold). The backend is given both for each of the worker's keys and
translates; a fingerprint it does not know is stored as given.

A row is *in flight* here from :meth:`PgBackend.adopt` until its work item ends (finished,
dropped): a row claimed again while its first work item still runs (its lease lapsed, nobody
took it, this worker claimed it back) gets the new lease and no second work item.

For callers that never claim (``tests/test_journal_conformance.py``), a transition on a row the
backend holds no lease on loads the row and claims it by name; ``finish`` of such a row loads
it done with its line, as the loader does bad rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from bulk_engine.backend import RowLost
from bulk_engine.journal import RowRecord
from bulk_engine.logs import get_logger
from bulk_engine.models import Job, Outcome
from bulk_engine.pg.rows import ClaimedRow, LeaseKeeper, RowLease, RowSpec, RunStore
from bulk_engine.vocab import RowState, Status

__all__ = ["PgBackend", "job_options"]

log = get_logger()


def job_options(job: Job) -> dict[str, Any]:
    """What a row stores besides its folder to be rebuilt as a Job by whoever claims it."""
    return {"use_case": job.use_case,
            "analyse_type": list(job.analyse_type) if job.analyse_type is not None else None,
            "payload": job.payload}


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class PgBackend:
    """One worker's view of its rows in the shared run: a ``JournalBackend`` over leases.

    ``key_fps`` maps the engine's key fingerprint to the database's for each key of the worker.
    ``min_lease_s``: a POST is not started on a lease with less than that left.
    """

    def __init__(self, store: RunStore, keeper: LeaseKeeper, *,
                 key_fps: Mapping[str, str] | None = None, min_lease_s: float = 0.0,
                 close_db: bool = False) -> None:
        self.store = store
        self.keeper = keeper
        self.min_lease_s = min_lease_s
        self._to_db = dict(key_fps or {})
        self._from_db = {v: k for k, v in self._to_db.items()}
        self._close_db = close_db
        self._leases: dict[str, RowLease] = {}
        self._in_flight: set[str] = set()
        self._unsent: dict[str, str | None] = {}  # new rows not yet submitting: key -> db key fp
        self._unsent_by_key: Counter[str | None] = Counter()
        self.refused = 0  # transitions the database refused: the row was another worker's

    # ------------------------------------------------------------------ the worker's rows

    def adopt(self, row: ClaimedRow, *, for_key: str | None = None) -> bool:
        """Hold ``row``'s lease; True when it needs a work item (False: one runs already).

        ``for_key`` (a database key fingerprint): a ``pending`` row adopted for that key's
        lane counts in its :meth:`unsent` until it is marked submitting.
        """
        self._leases[row.key] = row.lease
        if row.key in self._in_flight:
            return False
        self._in_flight.add(row.key)
        if row.state is RowState.PENDING:
            self._unsent[row.key] = for_key
            self._unsent_by_key[for_key] += 1
        return True

    def holds(self, key: str) -> bool:
        """True while this worker holds a lease on ``key`` it has not been told is lost."""
        return key in self._leases

    def end(self, key: str) -> None:
        """The work item of ``key`` ended (finished or dropped): forget the row."""
        self._leases.pop(key, None)
        self._in_flight.discard(key)
        self._sent(key)

    def unsent(self, db_key_fp: str | None) -> int:
        """Rows claimed for that key's lane as new submissions, not yet marked submitting."""
        return self._unsent_by_key[db_key_fp]

    @property
    def in_flight(self) -> int:
        """Rows with a work item here."""
        return len(self._in_flight)

    @property
    def leases(self) -> int:
        """Leases held (as far as this worker knows)."""
        return len(self._leases)

    def prune(self, held: Mapping[str, int]) -> int:
        """Keep only the leases the database still gives this worker (``RunStore.held``:
        key -> epoch); returns how many were let go. Their work items drop at their next step.
        """
        lost = [k for k, lease in self._leases.items() if held.get(k) != lease.epoch]
        for key in lost:
            del self._leases[key]
        return len(lost)

    def _sent(self, key: str) -> None:
        if key in self._unsent:
            self._unsent_by_key[self._unsent.pop(key)] -= 1

    def _lost(self, key: str) -> RowLost:
        self.refused += 1
        self.end(key)
        return RowLost(key)

    async def _lease(self, key: str, job: Job | None = None) -> RowLease:
        """The lease on ``key``; a row never claimed here is loaded and claimed by name."""
        lease = self._leases.get(key)
        if lease is not None:
            return lease
        if key in self._in_flight or job is None:
            raise self._lost(key)  # the lease was lost: the row is someone else's
        await self.store.load([RowSpec(key=key, id=job.id, folder=job.folder, line=job.line,
                                       options=job_options(job))], mark_loaded=False)
        row = await self.store.claim_key(self.keeper.worker, key, self.keeper.lease_s)
        if row is None:
            raise self._lost(key)
        self.adopt(row)
        return row.lease

    # ------------------------------------------------------------------ JournalBackend

    async def check_settings(self, fingerprint: str, *, summary: str | None = None) -> None:
        await self.store.bind(fingerprint, summary or "")

    async def get(self, key: str) -> RowRecord | None:
        row = await self.store.get(key)
        return None if row is None else self._record(row)

    async def is_done(self, key: str) -> bool:
        row = await self.store.get(key)
        return row is not None and row["state"] == RowState.DONE

    async def live_tokens(self) -> list[RowRecord]:
        return [self._record(r) for r in await self.store.rows_in(RowState.SUBMITTED)]

    async def submitting_rows(self) -> list[RowRecord]:
        return [self._record(r) for r in await self.store.rows_in(RowState.SUBMITTING)]

    async def counts(self) -> dict[str, int]:
        counts = await self.store.counts()
        return {**counts.by_state, **counts.by_outcome}

    async def mark_submitting(self, job: Job, attempts: int, request_fp: str | None = None,
                              key_fp: str | None = None) -> None:
        lease = await self._lease(job.key, job)
        ok = await self.store.mark_submitting(
            lease, generation=attempts, fingerprint=job.fingerprint, path=str(job.path),
            api_key_fp=self._to_db.get(key_fp or "", key_fp or ""), request_fp=request_fp,
            min_lease_s=self.min_lease_s)
        if not ok:
            raise self._lost(job.key)
        self._sent(job.key)

    async def mark_submitted(self, key: str, token: str, run_id: str | None,
                             submitted_at: float) -> None:
        lease = await self._lease(key)
        if not await self.store.mark_submitted(lease, token, submitted_at=submitted_at,
                                               api_run_id=run_id):
            raise self._lost(key)

    async def mark_pending(self, key: str, *, attempts: int | None = None) -> None:
        lease = await self._lease(key)
        if not await self.store.mark_pending(lease, generation=attempts):
            raise self._lost(key)

    async def forget(self, key: str) -> None:
        lease = self._leases.get(key)
        if lease is not None:
            await self.store.forget(lease)
        self.end(key)

    async def finish(self, outcomes: Sequence[Outcome]) -> None:
        for out in outcomes:
            if self.holds(out.key) or out.key in self._in_flight:
                await self.finish_row(out)
            else:  # a row never claimed here (a bad row): loaded done with its line
                await self.store.load([RowSpec(
                    key=out.key, id=out.id, folder=out.folder, line=out.line,
                    output=out.to_line(), error_kind=out.error.kind if out.error else None)],
                    mark_loaded=False)

    async def close(self) -> None:
        if self._close_db:
            await self.store.db.close()

    # ------------------------------------------------------------------ the sink's part

    async def finish_row(self, out: Outcome) -> bool:
        """The row's final word, fenced: done with its line. False when the row is no longer
        this worker's (its new owner writes it); the work item ends either way."""
        lease = self._leases.get(out.key)
        try:
            ok = lease is not None and await self.store.finish(
                lease, outcome=Status(out.status), line=out.to_line(),
                error_kind=out.error.kind if out.error else None)
        finally:
            self.end(out.key)
        if not ok:
            self.refused += 1
        return ok

    # ------------------------------------------------------------------ records

    def _record(self, row: Mapping[str, Any]) -> RowRecord:
        options = row["options"]
        api_key_fp = row["api_key_fp"]
        return RowRecord(
            key=row["key"], id=row["id"], folder=row["folder"], path=row["path"],
            line=row["line"], state=row["state"], token=row["token"], run_id=row["api_run_id"],
            fingerprint=row["fingerprint"], attempts=row["generation"],
            submitted_at=_epoch(row["submitted_at"]), outcome=row["outcome"],
            possible_duplicate=row["possible_duplicate"], updated_at=_epoch(row["updated_at"]),
            extra=options,
            error_kind=row["error_kind"], request_fp=row["request_fp"],
            done_at=_epoch(row["done_at"]),
            key_fp=None if api_key_fp is None else self._from_db.get(api_key_fp, api_key_fp),
        )
