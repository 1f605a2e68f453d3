"""bulk_engine.pg.connect and schema: clear ConfigErrors without the password, migrations that
many workers can run at once, and operations that wait through a database outage."""

from __future__ import annotations

import asyncio
import traceback
from urllib.parse import quote

import pytest
from structlog.testing import capture_logs

from bulk_engine.errors import ConfigError
from bulk_engine.pg.connect import Database, DatabaseUnavailable, key_fingerprint, redact_dsn
from bulk_engine.pg.schema import MIGRATIONS, SCHEMA_VERSION, migrate, schema_version

from pg_cluster import (  # noqa: F401 - fixtures
    TEST_PASSWORD,
    PgCluster,
    eventually,
    free_port,
    pg_cluster_fixture,
    pg_db_fixture,
    pg_dsn_fixture,
)

pytestmark = pytest.mark.postgres


def _all_text(exc: BaseException) -> str:
    """Everything an operator could see of an exception: message, repr and traceback."""
    return str(exc) + repr(exc) + "".join(traceback.format_exception(exc))


async def _config_error(dsn: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        await Database.connect(dsn, connect_timeout=5)
    return info.value


# ---------------------------------------------------------------------- bad DSNs


async def test_wrong_password_is_a_config_error_without_the_password(pg_cluster: PgCluster,
                                                                     ) -> None:
    """A refused password names the user and host, and says to fix the password; the password
    (given or right) appears nowhere, not even URL-encoded or in the traceback."""
    wrong = "Wr0ng:p@ss/w%rd"
    exc = await _config_error(pg_cluster.dsn_for("bulk", password=quote(wrong, safe="")))
    text = _all_text(exc)
    assert "refused the password for user 'bulk'" in str(exc)
    assert f"127.0.0.1:{pg_cluster.port}" in str(exc)
    for secret in (wrong, quote(wrong, safe=""), TEST_PASSWORD):
        assert secret not in text


async def test_missing_database_names_it_and_how_to_create_it(pg_cluster: PgCluster) -> None:
    """A database that does not exist is named, with the command that creates it."""
    exc = await _config_error(pg_cluster.dsn_for("no_such_db"))
    assert "'no_such_db' does not exist" in str(exc) and "createdb no_such_db" in str(exc)
    assert TEST_PASSWORD not in _all_text(exc)


async def test_unreachable_server_names_host_and_port() -> None:
    """Nothing listening: the message names host and port and what to check, not the password."""
    port = free_port()
    exc = await _config_error(f"postgresql://bulk:{TEST_PASSWORD}@127.0.0.1:{port}/bulk")
    assert f"cannot reach PostgreSQL at 127.0.0.1:{port}" in str(exc)
    assert TEST_PASSWORD not in _all_text(exc)


@pytest.mark.parametrize("dsn", [
    f"mysql://bulk:{TEST_PASSWORD}@127.0.0.1/bulk",
    f"host=127.0.0.1 user=bulk password={TEST_PASSWORD}",
    f"postgresql://bulk:{TEST_PASSWORD}@127.0.0.1:notaport/bulk",
], ids=["other-scheme", "keyword-form", "bad-port"])  # ids: no password in pytest's output
async def test_malformed_dsn_is_a_config_error_without_the_password(dsn: str) -> None:
    """Not a postgresql:// URL, or a bad port: ConfigError showing the expected form."""
    exc = await _config_error(dsn)
    assert "postgresql://USER:PASSWORD@HOST:PORT/DATABASE" in str(exc)
    assert TEST_PASSWORD not in _all_text(exc)


def test_redact_dsn_hides_the_password() -> None:
    """The DSN as logged keeps everything but the password."""
    shown = redact_dsn(f"postgresql://bulk:{TEST_PASSWORD}@db.example:5433/bulk?sslmode=require")
    assert shown == "postgresql://bulk:***@db.example:5433/bulk"


# ---------------------------------------------------------------------- schema


async def test_migrations_are_idempotent(pg_dsn: str) -> None:
    """A second start applies nothing; the version table lists each migration once."""
    async with await Database.connect(pg_dsn) as db, db.session() as conn:
        assert await schema_version(conn) == SCHEMA_VERSION
        assert await migrate(conn) == 0
        versions = [r["version"] for r in await conn.fetch(
            "SELECT version FROM bulk_engine.schema_version ORDER BY version")]
    assert versions == [m[0] for m in MIGRATIONS]
    async with await Database.connect(pg_dsn) as db, db.session() as conn:
        assert await migrate(conn) == 0


async def test_many_workers_starting_at_once_migrate_once(pg_dsn: str) -> None:
    """Eight processes' first connections at the same moment: one applies the schema, all
    succeed, and all see the same key salt (the same fingerprint for the same key)."""
    dbs = await asyncio.gather(*(Database.connect(pg_dsn, max_size=2) for _ in range(8)))
    try:
        fps = {db.key_fingerprint("the-key") for db in dbs}
        async with dbs[0].session() as conn:
            rows = await conn.fetchval("SELECT count(*) FROM bulk_engine.schema_version")
    finally:
        await asyncio.gather(*(db.close() for db in dbs))
    assert len(fps) == 1
    assert rows == len(MIGRATIONS)


async def test_newer_schema_is_refused(pg_db: Database, pg_dsn: str) -> None:
    """A database migrated by a newer bulk_engine: ConfigError asking to upgrade, no change."""
    async with pg_db.session() as conn:
        await conn.execute("INSERT INTO bulk_engine.schema_version (version, description) "
                           "VALUES (999, 'from the future')")
    with pytest.raises(ConfigError, match="newer than this bulk_engine understands"):
        await Database.connect(pg_dsn)


async def test_key_fingerprint_is_salted_per_database_and_never_the_key(
        pg_db: Database, pg_dsn: str) -> None:
    """The stored identity of a key is an HMAC under the database's random salt."""
    key = "sk-live-0123456789abcdef"
    fp = pg_db.key_fingerprint(key)
    assert key not in fp and fp == pg_db.key_fingerprint(key)
    assert fp != pg_db.key_fingerprint(key + "x")
    assert key_fingerprint(key, "salt-a") != key_fingerprint(key, "salt-b")


async def test_the_api_key_is_stored_nowhere(pg_db: Database) -> None:
    """After a governor, a run, a claim and a submission made with a key, no table holds the
    key (only its fingerprint), in any column."""
    from bulk_engine.pg.governor import Governor
    from bulk_engine.pg.rows import RowSpec, RunStore

    key = "sk-live-SECRET-0123456789abcdef"
    gov = await Governor.open(pg_db, key, rate=10, burst=2)
    await gov.acquire()
    gov.on_throttled()
    gov.pause_for(0.01)
    await gov.flush()
    store = await RunStore.open(pg_db, "r", settings_fingerprint="f", settings_summary="{}")
    await store.load([RowSpec(key="a", id="a", folder="f", line=2)])
    [row] = await store.claim("w", 1, 60, api_key_fp=pg_db.key_fingerprint(key))
    assert await store.mark_submitting(row.lease, generation=1, fingerprint="f", path="/p",
                                       api_key_fp=pg_db.key_fingerprint(key))
    async with pg_db.session() as c:
        tables = [r["table_name"] for r in await c.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'bulk_engine'")]
        dump = "".join([str(r[0]) for t in tables for r in await c.fetch(
            f"SELECT row_to_json(t)::text FROM bulk_engine.{t} t")])
    assert len(tables) >= 6 and pg_db.key_fingerprint(key) in dump
    assert key not in dump and "SECRET" not in dump


# ---------------------------------------------------------------------- outages


async def test_operations_wait_through_a_crash_restart_and_recover(
        pg_cluster: PgCluster, pg_db: Database) -> None:
    """The server killed (immediate stop): an operation keeps retrying, the database reads as
    unavailable, and the operation completes once the server is back."""
    db = pg_db
    assert await db.run(lambda c: c.fetchval("SELECT 1"), what="probe") == 1
    with capture_logs() as logs:
        await asyncio.to_thread(pg_cluster.stop, "immediate")
        try:
            task = asyncio.create_task(db.run(lambda c: c.fetchval("SELECT 42"),
                                              what="count the rows"))
            await eventually(lambda: db.statistics().retries >= 3, timeout=20,
                             what="retries while the server is down")
            assert not task.done()
            assert not db.available
        finally:
            await asyncio.to_thread(pg_cluster.start)
        assert await asyncio.wait_for(task, 30) == 42
    stats = db.statistics()
    assert db.available and stats.outages == 1 and stats.unavailable_seconds > 0
    events = [e["event"] for e in logs]
    assert events.count("db_unavailable") == 1 and events[-1] == "db_recovered"
    down = next(e for e in logs if e["event"] == "db_unavailable")
    assert down["doing"] == "count the rows" and down["port"] == pg_cluster.port
    assert TEST_PASSWORD not in repr(logs)


async def test_a_worker_started_before_its_database_waits_for_it(pg_cluster: PgCluster,
                                                                  pg_dsn: str) -> None:
    """connect(wait_s=...) while the server is down: it says it waits, then connects."""
    await asyncio.to_thread(pg_cluster.stop, "fast")
    try:
        with capture_logs() as logs:
            task = asyncio.create_task(Database.connect(pg_dsn, wait_s=60))
            await eventually(lambda: any(e["event"] == "db_waiting" for e in logs),
                             timeout=10, what="the wait to be logged")
            assert not task.done()
    finally:
        await asyncio.to_thread(pg_cluster.start)
    db = await asyncio.wait_for(task, 60)
    await db.close()
    assert TEST_PASSWORD not in repr(logs)


async def test_without_migrating_an_empty_database_is_a_config_error(pg_dsn: str) -> None:
    """A reader (migrate=False) on a database no worker set up yet is told so."""
    with pytest.raises(ConfigError, match="has no bulk_engine tables yet"):
        await Database.connect(pg_dsn, migrate=False)


async def test_busy_callers_ride_out_repeated_crashes(pg_cluster: PgCluster,
                                                      pg_db: Database) -> None:
    """Six callers keep querying through three immediate restarts: no error escapes to them
    (asyncpg's mid-operation protocol errors included), and each outage is one outage."""
    db = pg_db
    stop = asyncio.Event()

    async def caller() -> int:
        done = 0
        while not stop.is_set():
            await db.run(lambda c: c.fetchval("SELECT pg_sleep(0.005)"), what="probe")
            done += 1
        return done

    tasks = [asyncio.create_task(caller()) for _ in range(6)]
    try:
        for _ in range(3):
            ops = db.statistics().operations
            await eventually(lambda ops=ops: db.statistics().operations >= ops + 30,
                             timeout=30, what="calls going through")
            retries = db.statistics().retries
            await asyncio.to_thread(pg_cluster.stop, "immediate")
            try:
                await eventually(lambda r=retries: db.statistics().retries > r, timeout=20,
                                 what="calls waiting")
            finally:
                await asyncio.to_thread(pg_cluster.start)
        ops = db.statistics().operations
        await eventually(lambda: db.statistics().operations >= ops + 30, timeout=30,
                         what="calls going through again")
    finally:
        stop.set()
        counts = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert all(n > 0 for n in counts)
    assert db.statistics().outages >= 3


async def test_give_up_after_raises_database_unavailable(pg_cluster: PgCluster,
                                                         pg_db: Database) -> None:
    """A caller that cannot wait for ever gets DatabaseUnavailable, naming what it was doing."""
    await asyncio.to_thread(pg_cluster.stop, "immediate")
    try:
        with pytest.raises(DatabaseUnavailable, match="count the rows"):
            await pg_db.run(lambda c: c.fetchval("SELECT 1"), what="count the rows",
                            give_up_after=0.3)
    finally:
        await asyncio.to_thread(pg_cluster.start)
    assert await pg_db.run(lambda c: c.fetchval("SELECT 1"), what="probe") == 1
