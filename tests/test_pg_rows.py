"""bulk_engine.pg.rows against a real PostgreSQL: loading, claims, leases and fencing, export.

Each test gets a fresh database; "workers" are separate ``Database`` pools (separate
connections, as separate processes would have), so locking is real.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bulk_engine.config import Settings
from bulk_engine.errors import ConfigError
from bulk_engine.pg.connect import Database
from bulk_engine.pg.rows import (
    ClaimedRow,
    LeaseKeeper,
    RowSpec,
    RunStore,
    default_run_name,
    run_identity,
)
from bulk_engine.vocab import RowState, Status

from pg_cluster import (  # noqa: F401 - fixtures
    PgCluster,
    eventually,
    pg_cluster_fixture,
    pg_db_fixture,
    pg_dsn_fixture,
)

pytestmark = pytest.mark.postgres

FP = "f" * 64


def specs(n: int, *, start: int = 0) -> list[RowSpec]:
    return [RowSpec(key=f"row{i:05d}", id=f"row{i:05d}", folder=f"folders/{i}", line=i + 2,
                    options={"use_case": "rental"}) for i in range(start, start + n)]


def line_of(key: str, by: str) -> str:
    return f'{{"id":"{key}","status":"completed","by":"{by}"}}'


async def open_store(db: Database, name: str = "run-a") -> RunStore:
    return await RunStore.open(db, name, settings_fingerprint=FP, settings_summary="{}")


async def loaded_store(db: Database, n: int) -> RunStore:
    store = await open_store(db)
    await store.load(specs(n))
    return store


async def wait_expired(store: RunStore, key: str) -> None:
    """Bounded polling on the database clock until the row's lease has run out."""
    deadline = time.monotonic() + 10
    while (row := await store.get(key)) is not None and (row["lease_left"] or 0) > 0:
        assert time.monotonic() < deadline, "lease never expired"
        await asyncio.sleep(0.02)


@pytest.fixture
async def other_db(pg_dsn: str) -> AsyncIterator[Database]:
    """A second worker's own pool on the same database."""
    db = await Database.connect(pg_dsn, max_size=4)
    try:
        yield db
    finally:
        await db.close()


async def submit(store: RunStore, row: ClaimedRow, token: str = "gAAAAAtoken") -> None:
    assert await store.mark_submitting(row.lease, generation=row.next_generation,
                                       fingerprint="fp1", path=f"/data/{row.folder}",
                                       api_key_fp="k-1")
    assert await store.mark_submitted(row.lease, token, submitted_at=time.time())


# ---------------------------------------------------------------------- runs and loading


async def test_joining_a_run_with_other_settings_is_a_config_error(pg_db: Database) -> None:
    """Same run name, another settings fingerprint: refused with both summaries."""
    await RunStore.open(pg_db, "nightly", settings_fingerprint="a", settings_summary='{"x":1}')
    with pytest.raises(ConfigError, match="started with other settings"):
        await RunStore.open(pg_db, "nightly", settings_fingerprint="b",
                            settings_summary='{"x":2}')


async def test_export_can_find_runs_without_their_settings(pg_db: Database) -> None:
    """list_runs/join: the export command finds a run by name alone; an unknown name is a
    ConfigError that lists the runs there are."""
    await open_store(pg_db, "alpha")
    await open_store(pg_db, "beta")
    assert [r.name for r in await RunStore.list_runs(pg_db)] == ["alpha", "beta"]
    assert (await RunStore.join(pg_db, "beta")).run.name == "beta"
    with pytest.raises(ConfigError, match="runs there: 'alpha', 'beta'"):
        await RunStore.join(pg_db, "gamma")


def test_run_identity_follows_the_manifest_content_not_its_path(tmp_path: Path) -> None:
    """The same manifest mounted in two places is one run; another analyse_type is another."""
    a, b = tmp_path / "a.csv", tmp_path / "sub" / "b.csv"
    b.parent.mkdir()
    for p in (a, b):
        p.write_text("folder\nx\n")
    s = Settings(api_key="k")
    assert run_identity(s, manifest=a) == run_identity(s, manifest=b)
    other = run_identity(Settings(api_key="k", analyse_type=("decision", "share_link")),
                         manifest=a)
    assert other[1] != run_identity(s, manifest=a)[1]
    assert default_run_name(run_identity(s, manifest=a)[1]).startswith("run-")
    assert "k" not in run_identity(s, manifest=a)[0].replace("kind", "")


async def test_concurrent_loaders_insert_each_row_once(pg_db: Database, pg_dsn: str) -> None:
    """Four workers load the same manifest at once: every row exists once, the inserts add up
    to the manifest's length, and the run is marked loaded."""
    dbs = [await Database.connect(pg_dsn, max_size=2) for _ in range(4)]
    try:
        stores = [await open_store(db) for db in dbs]
        reports = await asyncio.gather(*(s.load(specs(2500), batch=300) for s in stores))
    finally:
        for db in dbs:
            await db.close()
    assert [r.rows_read for r in reports] == [2500] * 4
    assert sum(r.rows_inserted for r in reports) == 2500
    store = await open_store(pg_db)
    counts = await store.counts()
    assert counts.total == 2500 and counts.by_state["pending"] == 2500
    assert store.run.loaded and store.run.rows_total == 2500


async def test_load_streams_one_batch_at_a_time(pg_db: Database, other_db: Database) -> None:
    """The loader never runs more than one batch ahead of the database: memory is bounded by
    the batch, not the manifest."""
    store = await open_store(pg_db)
    watcher = await open_store(other_db)
    batch, ahead = 100, []

    async def rows() -> AsyncIterator[RowSpec]:
        for i, spec in enumerate(specs(1000)):
            if i % 50 == 0:
                ahead.append(i - (await watcher.counts()).total)
            yield spec

    report = await store.load(rows(), batch=batch)
    assert report.rows_inserted == 1000
    assert max(ahead) <= batch and max(ahead) > 0


async def test_bad_rows_are_loaded_done_with_their_failed_line(pg_db: Database) -> None:
    """A manifest row that cannot be submitted is loaded done+failed, with its line."""
    store = await open_store(pg_db)
    bad = RowSpec(key="x\x00dup@7", id="x", folder="", line=7, error_kind="duplicate_id",
                  output=b'{"id":"x","status":"failed"}\n')
    await store.load([*specs(2), bad])
    counts = await store.counts()
    assert counts.by_state["done"] == 1 and counts.by_outcome["failed"] == 1
    assert [line async for _, line in store.export()] == [b'{"id":"x","status":"failed"}\n']
    assert all(r.key != bad.key for r in await store.claim("w", 10, 30))


async def test_names_round_trip_byte_for_byte(pg_db: Database) -> None:
    """Keys with NUL, ids and folders that are not UTF-8 come back exactly."""
    store = await open_store(pg_db)
    odd = RowSpec(key="caf\udce9\x00dup@3", id="caf\udce9", folder="dir/\udcff name", line=3)
    await store.load([odd])
    [row] = await store.claim("w", 5, 30)
    assert (row.key, row.id, row.folder) == (odd.key, odd.id, odd.folder)
    assert await store.mark_submitting(row.lease, generation=1, fingerprint="f",
                                       path="/abs/dir/\udcff name", api_key_fp="k")
    stored = await store.get(odd.key)
    assert stored is not None and stored["path"] == "/abs/dir/\udcff name"


# ---------------------------------------------------------------------- claims


async def test_concurrent_claimers_never_get_the_same_row(pg_db: Database, pg_dsn: str) -> None:
    """Six workers claim small batches as fast as they can: every row goes to exactly one."""
    await loaded_store(pg_db, 300)
    dbs = [await Database.connect(pg_dsn, max_size=2) for _ in range(6)]

    async def worker(i: int, db: Database) -> list[str]:
        store = await open_store(db)
        got: list[str] = []
        while batch := await store.claim(f"w{i}", 7, 60):
            got += [r.key for r in batch]
        return got

    try:
        results = await asyncio.gather(*(worker(i, db) for i, db in enumerate(dbs)))
    finally:
        for db in dbs:
            await db.close()
    every = [k for got in results for k in got]
    assert len(every) == len(set(every)) == 300
    assert sum(1 for got in results if got) >= 2  # they really competed


async def test_claim_takes_live_tokens_first_then_manifest_order(pg_db: Database) -> None:
    """Rows with a token come first; a row caught mid-upload keeps its generation."""
    store = await loaded_store(pg_db, 6)
    first = await store.claim("w1", 3, 60)
    assert [r.line for r in first] == [2, 3, 4]
    await submit(store, first[2])  # row 2: submitted, token journaled
    assert await store.mark_submitting(first[1].lease, generation=1, fingerprint="f",
                                       path="/p", api_key_fp="k-1")  # row 1: mid-upload
    assert await store.release("w1") == 3
    rows = await store.claim("w2", 10, 60)
    assert [(r.key, r.state) for r in rows] == [
        ("row00002", RowState.SUBMITTED), ("row00000", RowState.PENDING),
        ("row00001", RowState.SUBMITTING), ("row00003", RowState.PENDING),
        ("row00004", RowState.PENDING), ("row00005", RowState.PENDING)]
    assert rows[0].token == "gAAAAAtoken" and rows[0].api_key_fp == "k-1"
    assert rows[1].next_generation == 1 and rows[2].next_generation == 1
    assert all(r.lease.epoch == 2 for r in rows[:3])


async def test_live_tokens_go_only_to_workers_with_the_same_key(pg_db: Database) -> None:
    """A token works only with its key: a worker with another key does not get it."""
    store = await loaded_store(pg_db, 2)
    [a, _] = await store.claim("w1", 2, 60)
    await submit(store, a)
    await store.release("w1")
    other = await store.claim("w2", 5, 60, api_key_fp="k-other")
    assert [r.key for r in other] == ["row00001"]
    same = await store.claim("w3", 5, 60, api_key_fp="k-1")
    assert [r.key for r in same] == ["row00000"]


class LostAnswers:
    """A Database whose every operation commits, loses its answer, and is retried (as
    Database.run does after a connection dies at the wrong moment)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def run(self, op: Any, *, what: str, give_up_after: float | None = None) -> Any:
        await self.db.run(op, what=what)  # committed; the answer never arrives
        return await self.db.run(op, what=what)


async def test_a_claim_whose_answer_was_lost_returns_the_same_rows(pg_db: Database) -> None:
    """The retry of a committed claim returns the rows it leased, instead of leasing more and
    leaving the first ones held by a worker that does not know it."""
    store = await loaded_store(pg_db, 5)
    lossy = RunStore(LostAnswers(pg_db), store.run)  # type: ignore[arg-type]
    got = await lossy.claim("w1", 3, 60)
    assert [r.key for r in got] == ["row00000", "row00001", "row00002"]
    assert sorted(await store.held("w1")) == [r.key for r in got]
    rest = await store.claim("w2", 5, 60)
    assert [r.key for r in rest] == ["row00003", "row00004"]


async def test_retried_transitions_succeed_once_and_flag_nothing(pg_db: Database) -> None:
    """Every transition, committed then retried, reports success and leaves the row as one
    call would: no false possible_duplicate, one line."""
    store = await loaded_store(pg_db, 1)
    lossy = RunStore(LostAnswers(pg_db), store.run)  # type: ignore[arg-type]
    [row] = await store.claim("w1", 1, 60)
    assert await lossy.mark_submitting(row.lease, generation=1, fingerprint="f", path="/p",
                                       api_key_fp="k")
    assert await lossy.mark_submitted(row.lease, "gAAAAAtok", submitted_at=time.time())
    assert await lossy.finish(row.lease, outcome="completed", line=line_of(row.key, "w1"))
    stored = await store.get(row.key)
    assert stored is not None and not stored["possible_duplicate"]
    assert stored["state"] == "done" and stored["generation"] == 1
    assert [x async for _, x in store.export()] == [(line_of(row.key, "w1") + "\n").encode()]


# ---------------------------------------------------------------------- leases and fencing


async def test_an_expired_lease_is_taken_over_with_a_new_epoch(pg_db: Database,
                                                               other_db: Database) -> None:
    """While a lease lives nobody else gets the row; once it ran out another worker does."""
    store1 = await loaded_store(pg_db, 3)
    store2 = await open_store(other_db)
    held = await store1.claim("w1", 3, 0.5)
    assert await store2.claim("w2", 3, 60) == []
    await wait_expired(store1, held[-1].key)
    taken = await store2.claim("w2", 3, 60)
    assert sorted(r.key for r in taken) == sorted(r.key for r in held)
    assert all(r.lease.epoch == 2 for r in taken)


async def test_fencing_refuses_a_paused_workers_late_writes(pg_db: Database,
                                                            other_db: Database) -> None:
    """Worker 1 submits, then stalls past its lease; worker 2 takes the row over and finishes
    it. Worker 1's late finish (and every other write) is refused: one line, worker 2's."""
    store1 = await loaded_store(pg_db, 1)
    store2 = await open_store(other_db)
    [row1] = await store1.claim("w1", 1, 0.5)
    await submit(store1, row1)
    await wait_expired(store1, row1.key)  # worker 1 is "paused" (GC, SIGSTOP, network)
    [row2] = await store2.claim("w2", 1, 60)
    assert row2.state is RowState.SUBMITTED and row2.token == "gAAAAAtoken"
    assert not await store1.finish(row1.lease, outcome=Status.COMPLETED, line=line_of("x", "w1"))
    assert not await store1.mark_pending(row1.lease)
    assert not await store1.mark_submitted(row1.lease, "gAAAAAother", submitted_at=0.0)
    assert await store2.finish(row2.lease, outcome="completed", line=line_of("row00000", "w2"))
    assert not await store1.finish(row1.lease, outcome="completed", line=line_of("x", "w1"))
    lines = [line async for _, line in store2.export()]
    assert lines == [(line_of("row00000", "w2") + "\n").encode()]


async def test_no_write_after_the_lease_ran_out_even_if_nobody_took_the_row(
        pg_db: Database) -> None:
    """The lease is the permission: once it expired, writes are refused (claim again first)."""
    store = await loaded_store(pg_db, 1)
    [row] = await store.claim("w1", 1, 0.3)
    await wait_expired(store, row.key)
    assert not await store.mark_submitting(row.lease, generation=1, fingerprint="f", path="/p",
                                           api_key_fp="k")
    assert not await store.finish(row.lease, outcome="completed", line=line_of(row.key, "w1"))
    assert (await store.counts()).by_state["pending"] == 1


async def test_the_same_worker_reclaiming_its_row_fences_its_old_claim(pg_db: Database) -> None:
    """Fencing is by epoch, not only by owner: an old claim of the same worker is refused."""
    store = await loaded_store(pg_db, 1)
    [old] = await store.claim("w1", 1, 0.3)
    await wait_expired(store, old.key)
    [new] = await store.claim("w1", 1, 60)
    assert new.lease.epoch == old.lease.epoch + 1
    assert not await store.mark_submitting(old.lease, generation=1, fingerprint="f", path="/p",
                                           api_key_fp="k")
    assert await store.mark_submitting(new.lease, generation=1, fingerprint="f", path="/p",
                                       api_key_fp="k")


async def test_a_row_caught_mid_upload_is_resent_with_its_generation_and_flagged(
        pg_db: Database, other_db: Database) -> None:
    """The first worker died mid-POST: the next sends the same generation (same
    Idempotency-Key) and the row is marked a possible duplicate."""
    store1 = await loaded_store(pg_db, 1)
    store2 = await open_store(other_db)
    [row1] = await store1.claim("w1", 1, 0.4)
    assert row1.next_generation == 1
    assert await store1.mark_submitting(row1.lease, generation=1, fingerprint="f", path="/p",
                                        api_key_fp="k")
    await wait_expired(store1, row1.key)
    [row2] = await store2.claim("w2", 1, 60)
    assert row2.state is RowState.SUBMITTING and row2.next_generation == 1
    assert await store2.mark_submitting(row2.lease, generation=row2.next_generation,
                                        fingerprint="f", path="/p", api_key_fp="k")
    stored = await store2.get(row2.key)
    assert stored is not None and stored["possible_duplicate"] and stored["generation"] == 1


async def test_a_token_that_expired_is_resubmitted_with_the_next_generation(
        pg_db: Database) -> None:
    """mark_pending after a 404 keeps the count: the resubmission is generation 2."""
    store = await loaded_store(pg_db, 1)
    [row] = await store.claim("w1", 1, 60)
    await submit(store, row)
    assert await store.mark_pending(row.lease)
    await store.release("w1")
    [again] = await store.claim("w2", 1, 60)
    assert again.state is RowState.PENDING and again.next_generation == 2
    assert not again.possible_duplicate


async def test_mark_submitting_needs_enough_lease_left_for_the_upload(pg_db: Database) -> None:
    """An upload must not outlive the lease: refused when less than min_lease_s is left."""
    store = await loaded_store(pg_db, 1)
    [row] = await store.claim("w1", 1, 5)
    kw: dict[str, Any] = dict(generation=1, fingerprint="f", path="/p", api_key_fp="k")
    assert not await store.mark_submitting(row.lease, min_lease_s=30, **kw)
    assert await store.mark_submitting(row.lease, min_lease_s=1, **kw)


async def test_renew_extends_live_leases_and_never_revives_expired_ones(
        pg_db: Database) -> None:
    """One statement extends every live lease of the worker; an expired one stays expired."""
    store = await loaded_store(pg_db, 4)
    live = await store.claim("w1", 3, 2)
    assert await store.renew("w1", 30) == 3
    stored = await store.get(live[0].key)
    assert stored is not None and stored["lease_left"] > 20
    await store.release("w1")
    short = await store.claim("w1", 1, 0.3)
    await wait_expired(store, short[0].key)
    assert await store.renew("w1", 30) == 0
    assert await store.held("w1") == {}


async def test_finish_is_idempotent_for_its_own_lease(pg_db: Database) -> None:
    """A retried finish (its answer was lost) succeeds again and leaves one line."""
    store = await loaded_store(pg_db, 1)
    [row] = await store.claim("w1", 1, 60)
    line = line_of(row.key, "w1")
    assert await store.finish(row.lease, outcome="completed", line=line)
    assert await store.finish(row.lease, outcome="completed", line=line + "\n")
    assert [x async for _, x in store.export()] == [(line + "\n").encode()]
    assert not await store.finish(row.lease, outcome="completed", line=line_of(row.key, "other"))


# ---------------------------------------------------------------------- export, counts


async def test_export_yields_done_order_and_resumes_after_a_sequence(pg_db: Database) -> None:
    """Lines come in the order rows were finished; since=N gives only later ones."""
    store = await loaded_store(pg_db, 4)
    rows = {r.key: r for r in await store.claim("w1", 4, 60)}
    for key in ("row00002", "row00000", "row00003"):
        assert await store.finish(rows[key].lease, outcome="completed", line=line_of(key, "w"))
    first = [(seq, line) async for seq, line in store.export()]
    assert [line for _, line in first] == [(line_of(k, "w") + "\n").encode()
                                          for k in ("row00002", "row00000", "row00003")]
    assert [seq for seq, _ in first] == sorted(seq for seq, _ in first)
    assert await store.finish(rows["row00001"].lease, outcome="failed",
                              line=line_of("row00001", "w"), error_kind="network")
    later = [line async for _, line in store.export(since=first[-1][0])]
    assert later == [(line_of("row00001", "w") + "\n").encode()]


async def test_export_since_never_misses_a_row_that_committed_late(
        pg_db: Database, other_db: Database) -> None:
    """A finish still uncommitted while an export runs is numbered by the next export, after
    everything already exported: an incremental export never skips it."""
    store = await loaded_store(pg_db, 2)
    late_store = await open_store(other_db)
    rows = {r.key: r for r in await store.claim("w1", 2, 60)}
    async with other_db.session() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            "UPDATE bulk_engine.rows SET state='done', outcome='completed', output=$2, "
            "done_at=clock_timestamp() WHERE key=$1",
            b"row00000", line_of("row00000", "late"))
        assert await store.finish(rows["row00001"].lease, outcome="completed",
                                  line=line_of("row00001", "w"))
        first = [(seq, line) async for seq, line in store.export()]
        await tx.commit()
    assert [line for _, line in first] == [(line_of("row00001", "w") + "\n").encode()]
    later = [line async for _, line in late_store.export(since=first[-1][0])]
    assert later == [(line_of("row00000", "late") + "\n").encode()]


async def test_counts_per_state_and_per_worker(pg_db: Database) -> None:
    """Progress figures: rows per state and outcome, rows held and done per worker."""
    store = await loaded_store(pg_db, 6)
    await store.register_worker("w1")
    await store.register_worker("w2")
    a = await store.claim("w1", 3, 60)
    b = await store.claim("w2", 2, 60)
    await submit(store, a[0])
    assert await store.finish(a[1].lease, outcome="completed", line=line_of("a", "w1"))
    assert await store.finish(b[0].lease, outcome="failed", line=line_of("b", "w2"),
                              error_kind="analysis_failed")
    counts = await store.counts()
    assert counts.by_state == {"pending": 3, "submitting": 0, "submitted": 1, "done": 2,
                               "retrying": 0}
    assert counts.by_outcome == {"completed": 1, "failed": 1}
    assert counts.held == 3 and counts.total == 6
    workers = {w.id: w for w in await store.workers()}
    assert workers["w1"].held == {"submitted": 1, "pending": 1} and workers["w1"].done == 1
    assert workers["w2"].held == {"pending": 1} and workers["w2"].done == 1
    assert all(0 <= w.heartbeat_age_s < 60 for w in workers.values())


async def test_reset_failed_puts_failed_rows_back_and_drops_their_lines(
        pg_db: Database) -> None:
    """--retry-failed: chosen failed rows are pending again, their lines gone from the export."""
    store = await loaded_store(pg_db, 3)
    rows = await store.claim("w1", 3, 60)
    await store.finish(rows[0].lease, outcome="failed", line=line_of("0", "w"),
                       error_kind="network")
    await store.finish(rows[1].lease, outcome="failed", line=line_of("1", "w"),
                       error_kind="analysis_failed")
    await store.finish(rows[2].lease, outcome="completed", line=line_of("2", "w"))
    assert await store.reset_failed(kinds=["network"]) == 1
    assert [x async for _, x in store.export()] == [
        (line_of(k, "w") + "\n").encode() for k in ("1", "2")]
    assert not await store.finished()
    [again] = await store.claim("w2", 5, 60)
    assert again.key == "row00000" and again.state is RowState.PENDING


# ---------------------------------------------------------------------- all together


async def test_workers_that_stall_still_give_one_right_line_per_row(pg_db: Database,
                                                                   pg_dsn: str) -> None:
    """Four workers share 60 rows; at random points (seeded) one stalls past its lease and
    another takes the row over. In the end: one line per row, each carrying a token of that
    row; the same generation sent twice only where a stall hit mid-upload, and exactly those
    rows flagged possible_duplicate; a worker's late writes all refused."""
    rng = random.Random(13)
    await loaded_store(pg_db, 60)
    sent: dict[str, list[tuple[str, int]]] = defaultdict(list)
    wins: dict[str, list[str]] = defaultdict(list)
    refused = 0
    lease_s, stall_s = 0.3, 0.45

    async def maybe_stall() -> None:
        if rng.random() < 0.06:
            await asyncio.sleep(stall_s)  # this worker is "paused" past its lease

    async def worker(name: str) -> None:
        nonlocal refused
        async with await Database.connect(pg_dsn, max_size=2) as db:
            store = await open_store(db)
            while not await store.finished():
                rows = await store.claim(name, 4, lease_s)
                if not rows:
                    await asyncio.sleep(0.01)  # others hold the last rows: look again
                    continue
                for row in rows:
                    token = row.token
                    if row.state is not RowState.SUBMITTED:
                        gen = row.next_generation
                        if not await store.mark_submitting(row.lease, generation=gen,
                                                           fingerprint="f", path="/p",
                                                           api_key_fp="k"):
                            refused += 1
                            continue
                        sent[row.key].append((name, gen))  # the POST /case
                        await maybe_stall()
                        token = f"gAAAAA-{row.key}-{gen}"
                        if not await store.mark_submitted(row.lease, token,
                                                          submitted_at=time.time()):
                            refused += 1
                            continue
                    await maybe_stall()
                    line = json.dumps({"id": row.key, "token": token, "by": name})
                    if await store.finish(row.lease, outcome="completed", line=line):
                        wins[row.key].append(name)
                    else:
                        refused += 1

    await asyncio.wait_for(asyncio.gather(*(worker(f"w{i}") for i in range(4))), 60)
    store = await open_store(pg_db)
    lines = [json.loads(line) async for _, line in store.export()]
    assert sorted(x["id"] for x in lines) == [f"row{i:05d}" for i in range(60)]
    assert all(len(w) == 1 for w in wins.values()) and len(wins) == 60
    assert all(x["token"].startswith(f"gAAAAA-{x['id']}-") for x in lines)
    assert all(gen == 1 for s in sent.values() for _, gen in s)
    twice = {k for k, s in sent.items() if len(s) > 1}
    flagged = {k for k in sent if (await store.get(k) or {}).get("possible_duplicate")}
    assert twice == flagged
    assert refused > 0 and twice  # the stalls did happen and were caught


# ---------------------------------------------------------------------- the lease horizon


class _Clock:
    """A clock the fake store moves: a call "takes" the time the test says."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


class _Store:
    """claim/renew that take ``took`` seconds on the shared clock."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.took = 0.0

    async def claim(self, worker: str, n: int, lease_s: float, *,
                    api_key_fp: str | None = None, max_new: int | None = None) -> list[object]:
        self.clock.t += self.took
        return [object()] * n

    async def renew(self, worker: str, lease_s: float) -> int:
        self.clock.t += self.took
        return 1


async def test_lease_horizon_counts_from_when_each_lease_was_set() -> None:
    """valid() holds until lease - margin after the claim or renewal that set the oldest held
    lease was *sent*; a renewal sent while a claim was in flight does not cover that claim."""
    clock = _Clock()
    store = _Store(clock)
    keeper = LeaseKeeper(store, "w", lease_s=60, margin_s=10, clock=clock)  # type: ignore[arg-type]
    assert not keeper.valid()  # holds nothing yet: no call allowed
    store.took = 0.5
    await keeper.claim(3)  # sent at 0
    assert keeper.horizon() == 50
    clock.t = 20
    await keeper.renew()  # sent at 20, after the claim returned: covers it
    assert keeper.horizon() == 70
    clock.t, store.took = 40, 2.0
    await keeper.claim(1)  # sent at 40, came back at 42: later than the renewal
    assert keeper.horizon() == 70
    clock.t = 41  # a renewal sent at 41, while that claim was still in flight
    await keeper.renew()
    assert keeper.horizon() == 40 + 50  # it may not have seen the rows claimed at 40
    clock.t = 60
    await keeper.renew()  # sent after the claim came back: covers everything
    assert keeper.horizon() == 110
    clock.t = 111
    assert not keeper.valid() and keeper.remaining() < 0


# ---------------------------------------------------------------------- outages


async def test_a_worker_that_cannot_renew_knows_to_stop_and_recovers_consistently(
        pg_cluster: PgCluster, pg_db: Database, other_db: Database) -> None:
    """The database crashes: the lease keeper reports its leases lost (no API call from then
    on); once the database is back, the rows it still holds and the rows another worker can
    claim are the whole run, with no row in both."""
    store = await loaded_store(pg_db, 5)
    keeper = LeaseKeeper(store, "w1", lease_s=1.2)
    await keeper.claim(5)
    assert keeper.valid()
    task = asyncio.create_task(keeper.run())
    try:
        await asyncio.to_thread(pg_cluster.stop, "immediate")
        try:
            await eventually(lambda: keeper.lost.is_set(), timeout=10, what="leases lost")
            assert not keeper.valid()
        finally:
            await asyncio.to_thread(pg_cluster.start)
        await eventually(keeper.valid, timeout=30, what="a renewal after the restart")
        held = await store.held("w1")
        other = await open_store(other_db)
        taken = [r.key for r in await other.claim("w2", 10, 60)]
        assert not set(held) & set(taken)
        assert set(held) | set(taken) == {f"row{i:05d}" for i in range(5)}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_claims_wait_through_a_restart(pg_cluster: PgCluster, pg_db: Database) -> None:
    """A claim made while the server is down waits and succeeds once it is back."""
    store = await loaded_store(pg_db, 2)
    await asyncio.to_thread(pg_cluster.stop, "immediate")
    try:
        task = asyncio.create_task(store.claim("w1", 2, 60))
        await eventually(lambda: not pg_db.available, timeout=10, what="the outage noticed")
        assert not task.done()
    finally:
        await asyncio.to_thread(pg_cluster.start)
    rows = await asyncio.wait_for(task, 30)
    assert len(rows) == 2
