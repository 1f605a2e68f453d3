"""The journal interface's conformance suite: every backend keeps the same row state machine.

Written against ``bulk_engine.backend.JournalBackend`` only and parametrized by backend, so a new
backend (PostgreSQL) proves itself by passing the same tests as the embedded SQLite one. The
PostgreSQL backend runs on a fresh database of the session's throwaway cluster; the rows the
suite marks without claiming them are loaded and claimed by the adapter itself.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from bulk_engine.backend import JournalBackend, SqliteBackend
from bulk_engine.errors import ConfigError
from bulk_engine.journal import Journal
from bulk_engine.models import ErrorInfo, FileEntry, Job, Outcome, fingerprint_files
from bulk_engine.vocab import RowState, Status

from pg_cluster import pg_cluster_fixture  # noqa: F401 - the PostgreSQL backend's fixture

BackendFactory = Callable[[pytest.FixtureRequest, Path], Awaitable[JournalBackend]]
_databases = itertools.count()


async def sqlite_backend(request: pytest.FixtureRequest, tmp: Path) -> JournalBackend:
    return SqliteBackend(Journal.open(tmp / "out.jsonl.journal"))


async def postgres_backend(request: pytest.FixtureRequest, tmp: Path) -> JournalBackend:
    """A worker's ``PgBackend`` on a run of a fresh database, bound to no settings yet."""
    from bulk_engine.pg.backend import PgBackend
    from bulk_engine.pg.connect import Database
    from bulk_engine.pg.rows import LeaseKeeper, RunStore

    cluster = request.getfixturevalue("pg_cluster")
    db = await Database.connect(
        cluster.create_database(f"conf{os.getpid()}_{next(_databases)}"), max_size=2)
    store = await RunStore.open(db, "conformance", settings_fingerprint="", settings_summary="")
    keeper = LeaseKeeper(store, await store.register_worker(), lease_s=60)
    return PgBackend(store, keeper, close_db=True)


FACTORIES: dict[str, BackendFactory] = {"sqlite": sqlite_backend, "postgres": postgres_backend}
_MARKS = {"postgres": [pytest.mark.postgres]}


@pytest.fixture(params=[pytest.param(name, marks=_MARKS.get(name, ())) for name in FACTORIES])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JournalBackend]:
    b = await FACTORIES[request.param](request, tmp_path)
    try:
        yield b
    finally:
        await b.close()


def job(i: int, *, size: int = 10) -> Job:
    files = (FileEntry(path=Path(f"/data/f{i}/a.pdf"), name="a.pdf", size=size, mtime_ns=1),)
    return Job(line=i + 1, id=f"row-{i}", folder=f"f{i}", path=Path(f"/data/f{i}"),
               files=files, fingerprint=fingerprint_files(files))


def outcome(j: Job, status: Status = Status.COMPLETED, kind: str | None = None) -> Outcome:
    return Outcome.for_job(j, status=status, attempts=1,
                           error=ErrorInfo(kind, "boom") if kind else None)


async def test_it_is_a_journal_backend(backend: JournalBackend) -> None:
    """The backend implements the whole protocol."""
    assert isinstance(backend, JournalBackend)


async def test_a_row_goes_submitting_submitted_done(backend: JournalBackend) -> None:
    """The life of a row: intent, token, done — each visible to the reads that resume a run."""
    j = job(1)
    assert await backend.get(j.key) is None
    await backend.mark_submitting(j, 1, request_fp="rfp-1", key_fp="kfp")
    rec = await backend.get(j.key)
    assert rec is not None and rec.state == RowState.SUBMITTING and rec.attempts == 1
    assert (rec.request_fp, rec.key_fp, rec.fingerprint) == ("rfp-1", "kfp", j.fingerprint)
    assert [r.key for r in await backend.submitting_rows()] == [j.key]
    await backend.mark_submitted(j.key, "tok-1", "run-1", 1000.5)
    live = await backend.live_tokens()
    assert [(r.key, r.token, r.run_id, r.submitted_at) for r in live] == [
        (j.key, "tok-1", "run-1", 1000.5)]
    assert await backend.submitting_rows() == []
    assert not await backend.is_done(j.key)
    await backend.finish([outcome(j)])
    assert await backend.is_done(j.key)
    rec = await backend.get(j.key)
    assert rec is not None and rec.state == RowState.DONE and rec.outcome == Status.COMPLETED
    assert rec.token is None and await backend.live_tokens() == []


async def test_a_dead_token_goes_back_to_pending_with_its_generation(
    backend: JournalBackend,
) -> None:
    """mark_pending drops the token and keeps the generation (or rewrites it when told)."""
    j = job(2)
    await backend.mark_submitting(j, 1)
    await backend.mark_submitted(j.key, "tok", None, 1.0)
    await backend.mark_pending(j.key)
    rec = await backend.get(j.key)
    assert rec is not None and (rec.state, rec.token, rec.attempts) == (RowState.PENDING, None, 1)
    await backend.mark_submitting(j, 2)
    await backend.mark_pending(j.key, attempts=1)  # that submission never reached a server
    rec = await backend.get(j.key)
    assert rec is not None and rec.attempts == 1


async def test_a_second_intent_while_submitting_flags_a_possible_duplicate(
    backend: JournalBackend,
) -> None:
    """A POST whose fate is unknown, sent again: the row is flagged possible_duplicate."""
    j, other = job(3), job(4)
    await backend.mark_submitting(j, 1)
    await backend.mark_submitting(j, 1)
    await backend.mark_submitting(other, 1)
    a, b = await backend.get(j.key), await backend.get(other.key)
    assert a is not None and a.possible_duplicate
    assert b is not None and not b.possible_duplicate


async def test_finish_records_outcomes_and_error_kinds_and_counts(
    backend: JournalBackend,
) -> None:
    """Done rows by outcome, every state counted (zeros included), bad rows never submitted."""
    ok, bad, never = job(5), job(6), job(7)
    for j in (ok, bad):
        await backend.mark_submitting(j, 1)
    await backend.finish([outcome(ok), outcome(bad, Status.FAILED, "analysis_failed"),
                          outcome(never, Status.FAILED, "folder_missing")])
    rec = await backend.get(bad.key)
    assert rec is not None and rec.error_kind == "analysis_failed"
    counts = await backend.counts()
    assert counts == {"pending": 0, "submitting": 0, "submitted": 0, "done": 3,
                      "retrying": 0, "completed": 1, "failed": 2}
    assert await backend.is_done(never.key)


async def test_forget_removes_a_row(backend: JournalBackend) -> None:
    """A row that left the manifest is forgotten: no state, no token to resume."""
    j = job(8)
    await backend.mark_submitting(j, 1)
    await backend.mark_submitted(j.key, "tok", None, 1.0)
    await backend.forget(j.key)
    assert await backend.get(j.key) is None and await backend.live_tokens() == []


async def test_settings_bind_the_journal_to_one_run(backend: JournalBackend) -> None:
    """The first run's settings bind the journal; the same ones pass, others are refused."""
    await backend.check_settings("fp-1", summary='{"host": "a"}')
    await backend.check_settings("fp-1", summary='{"host": "a"}')
    with pytest.raises(ConfigError, match="different run"):
        await backend.check_settings("fp-2", summary='{"host": "b"}')
