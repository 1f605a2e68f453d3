"""``--db`` workers: the engine's stages fed by claims, fenced by leases, governed per key.

In-process tests (a ``PgWorker`` against the in-process emulator) show what a run gives: the
single machine's JSONL, through ``export``, that ``report`` reads; keys pinned to their rows;
the guard that holds API calls while leases may have lapsed. Process tests show what each
failure does to workers: a worker killed (kill -9), a worker paused past its lease
(SIGSTOP/SIGCONT), the database restarted under them, a bad DSN or password.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from bulk_engine.backend import RowLost
from bulk_engine.clock import Clock
from bulk_engine.config import Settings, load_settings
from bulk_engine.emulator import EmulatorConfig, run_emulator
from bulk_engine.engine import Engine
from bulk_engine.errors import ConfigError
from bulk_engine.pg.backend import PgBackend
from bulk_engine.pg.connect import Database
from bulk_engine.pg.export import export_run
from bulk_engine.pg.governor import Governor
from bulk_engine.pg.guard import GuardedLimiter, LeaseGuard
from bulk_engine.pg.rows import LeaseKeeper, RowSpec, RunStore
from bulk_engine.pg.worker import PgWorker
from bulk_engine.vocab import RowState

from archive_factory import make_archive
from conftest import engine_settings, read_lines
from pg_cluster import (  # noqa: F401 - fixtures
    TEST_PASSWORD,
    PgCluster,
    eventually,
    pg_cluster_fixture,
    pg_db_fixture,
    pg_dsn_fixture,
)
from pg_workers import (
    KEYS,
    WORKER_FLAGS,
    RunDb,
    WorkerProcess,
    assert_one_right_line_per_row,
    cli,
    emulator,
    finish,
    holding,
    started,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


def pg_settings(base_url: str, dsn: str, tmp: Path, **kw: Any) -> Settings:
    return engine_settings(base_url, tmp / "unused.jsonl", api_key=",".join(KEYS), db=dsn,
                           lease=5.0, **kw)


# ---------------------------------------------------------------------- in-process


async def test_a_worker_run_exports_the_single_machine_jsonl_and_report_reads_it(
        tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """One worker with two keys does the whole run; ``export`` writes one line per row with
    its own folder's result, the same fields as a single machine's output, and ``report``
    reads it as it reads that; an incremental export has only the rows finished later."""
    manifest = make_archive(tmp_path / "a", 24, seed=5)
    cfg = EmulatorConfig(api_keys=(*KEYS, "single-key"), processing_time=(0.01, 0.05), seed=2)
    async with run_emulator(cfg) as emu:
        result = await PgWorker(pg_settings(emu.base_url, pg_dsn, tmp_path), manifest).run()
        runs = emu.stats()["runs_created"]
        single = tmp_path / "single.jsonl"
        await Engine(engine_settings(emu.base_url, single, api_key="single-key"), manifest).run()
    assert result.exit_code == 0, result.summary.to_json()
    assert runs == 24  # one analysis per row
    out = tmp_path / "results.jsonl"
    rep = await export_run(pg_dsn, out)
    assert (rep.lines, rep.since, rep.last, rep.rows_not_done) == (24, 0, 24, 0)
    lines = read_lines(out)
    assert_one_right_line_per_row(lines, manifest)
    assert [list(r) for r in lines] == [list(r) for r in read_lines(single)]  # same schema
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # renamed, not left
    from bulk_engine.cli import main

    capsys.readouterr()  # the runs' logs
    assert main(["report", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 24 and report["by_status"] == {"completed": 24}
    assert report["duplicate_lines"] == 0
    again = await export_run(pg_dsn, tmp_path / "later.jsonl", since=20)
    assert [r["id"] for r in read_lines(tmp_path / "later.jsonl")] == [
        r["id"] for r in lines[20:]]
    assert (again.since, again.last) == (20, 24)


async def test_failed_rows_give_exit_2_and_retry_failed_redoes_them_in_place(
        tmp_path: Path, pg_dsn: str) -> None:
    """A run with folders the API fails exits 2 (the run's code, not the worker's); a worker
    started with --retry-failed analysis_failed puts them back and redoes them: the export
    then has one line per row, all completed."""
    manifest = make_archive(tmp_path / "a", 12, seed=6)
    failing = EmulatorConfig(api_keys=KEYS, processing_time=(0.01, 0.03), fail_rate=0.5, seed=4)
    async with run_emulator(failing) as emu:
        first = await PgWorker(pg_settings(emu.base_url, pg_dsn, tmp_path), manifest).run()
    assert first.exit_code == 2 and first.summary.extra["total_failed"] > 0
    healthy = EmulatorConfig(api_keys=KEYS, processing_time=(0.01, 0.03), seed=4)
    async with run_emulator(healthy) as emu:
        settings = pg_settings(emu.base_url, pg_dsn, tmp_path, retry_failed=True,
                               retry_failed_kinds=("analysis_failed",))
        again = await PgWorker(settings, manifest).run()
    assert again.exit_code == 0, again.summary.to_json()
    out = tmp_path / "results.jsonl"
    await export_run(pg_dsn, out)
    assert_one_right_line_per_row(read_lines(out), manifest)


async def test_the_adaptive_window_is_learned_by_the_lane_and_shared_by_the_key(
        tmp_path: Path, pg_dsn: str) -> None:
    """Defaults (adaptive window) with --db: the lane learns the key's parallel capacity from
    its folders, bounds its claims by it, and publishes it as the key's window in the governor
    row, the bound every worker reads for new rows. A worker with a fixed window clears it
    (its bound is every worker's max_outstanding)."""
    manifest = make_archive(tmp_path / "a", 30, seed=3)
    key = KEYS[0]
    cfg = EmulatorConfig(api_keys=(key,), processing_time=(0.1, 0.3), max_parallel_analyses=3,
                         seed=2)
    async with run_emulator(cfg) as emu:
        adaptive = PgWorker(engine_settings(emu.base_url, tmp_path / "unused.jsonl",
                                            api_key=key, db=pg_dsn, lease=5.0, run="adaptive",
                                            adaptive_window=True, max_outstanding=40),
                            manifest)
        result = await adaptive.run()
        runs = emu.stats()["runs_created"]
    assert result.exit_code == 0, result.summary.to_json()
    assert runs == 30
    window = adaptive.statistics().window
    assert window is not None and window.phase != "fixed" and window.observations >= 20
    assert 2 <= window.limit <= 40 and window.in_use == 0
    db = await Database.connect(pg_dsn)
    try:
        gov = await Governor.open(db, key, rate=500.0, burst=50, configure=False)
        assert await gov.window() == (window.limit, 0)  # the shared window: what it learned
        async with run_emulator(cfg) as emu:
            fixed = PgWorker(engine_settings(emu.base_url, tmp_path / "unused.jsonl",
                                             api_key=key, db=pg_dsn, lease=5.0, run="fixed",
                                             max_outstanding=40), manifest)
            assert (await fixed.run()).exit_code == 0
        assert fixed.statistics().window is not None
        assert fixed.statistics().window.phase == "fixed"  # type: ignore[union-attr]
        assert await gov.window() == (None, 0)  # cleared: max_outstanding bounds new rows
    finally:
        await db.close()


async def test_rows_a_key_submitted_are_claimed_only_for_that_key(pg_db: Database) -> None:
    """A live token and a row caught mid-upload go only to a claim for the key that sent them
    (its token, its Idempotency-Key); a pending row goes to any key; max_new bounds the new
    rows a claim takes, never the ones whose analysis already runs."""
    store = await RunStore.open(pg_db, "pin", settings_fingerprint="f", settings_summary="{}")
    await store.load([RowSpec(key=f"r{i}", id=f"r{i}", folder=f"f{i}", line=i + 2)
                      for i in range(4)])
    rows = await store.claim("w1", 2, 0.3)
    assert await store.mark_submitting(rows[0].lease, generation=1, fingerprint="f", path="/p",
                                       api_key_fp="k-A")
    assert await store.mark_submitting(rows[1].lease, generation=1, fingerprint="f", path="/p",
                                       api_key_fp="k-A")
    assert await store.mark_submitted(rows[1].lease, "gAAAAAtok", submitted_at=time.time())
    deadline = time.monotonic() + 10
    while (await store.counts()).held:  # the two leases run out (database clock)
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    for_b = await store.claim("w2", 10, 60, api_key_fp="k-B", max_new=1)
    assert [r.key for r in for_b] == ["r2"]  # one new row, none of key A's
    for_a = await store.claim("w3", 10, 60, api_key_fp="k-A", max_new=0)
    assert sorted((r.key, r.state) for r in for_a) == [
        ("r0", RowState.SUBMITTING), ("r1", RowState.SUBMITTED)]


class _Clock(Clock):
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)


async def test_the_guard_holds_calls_while_leases_may_have_lapsed_then_drops_lost_rows(
        pg_db: Database, pg_dsn: str) -> None:
    """Past the lease horizon no call is granted; once a renewal gets through, the rows
    another worker took meanwhile are dropped before any call goes, and a poll of one of them
    raises RowLost instead of calling."""
    store = await RunStore.open(pg_db, "guard", settings_fingerprint="f", settings_summary="{}")
    await store.load([RowSpec(key=f"r{i}", id=f"r{i}", folder=f"f{i}", line=i + 2)
                      for i in range(2)])
    clock = _Clock()
    keeper = LeaseKeeper(store, await store.register_worker(), lease_s=0.5, margin_s=0.1,
                         clock=clock)
    backend = PgBackend(store, keeper)
    guard = LeaseGuard(store, keeper, backend, clock=clock)
    governor = await Governor.open(pg_db, "sk-guard", rate=1000, burst=100)
    limiter = GuardedLimiter(governor, guard)
    mine = await keeper.claim(2)
    for row in mine:
        backend.adopt(row)
    await limiter.acquire()  # leases current: a call may go
    clock.t = 0.45  # past the horizon (lease - margin): this worker cannot know its leases
    waiting = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done() and guard.holds == 1
    async with await Database.connect(pg_dsn, max_size=2) as other_db:
        other = await RunStore.open(other_db, "guard", settings_fingerprint="f",
                                    settings_summary="{}")
        deadline = time.monotonic() + 10
        while not (taken := await other.claim("w-other", 1, 60)):  # r0's lease runs out
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    assert [r.key for r in taken] == ["r0"]
    assert await keeper.renew() == 0  # r1's lease ran out too: nothing to renew
    await asyncio.wait_for(waiting, 5)
    assert guard.pruned == 2 and keeper.lapses == 1
    assert not backend.holds("r0") and not backend.holds("r1")
    with guard.polling("r0"), pytest.raises(RowLost):
        await limiter.acquire()


def test_several_keys_come_from_a_list_or_numbered_variables_and_need_db() -> None:
    """BULK_ENGINE_API_KEY=k1,k2 or BULK_ENGINE_API_KEY_1, _2: the run's keys, in order, not
    warned about; several keys without --db are refused, naming neither key."""
    env = {"BULK_ENGINE_API_KEY_2": "kb", "BULK_ENGINE_API_KEY_1": "ka",
           "BULK_ENGINE_DB": "postgresql://u@h/d"}
    assert load_settings(environ=env).api_keys == ("ka", "kb")
    env["BULK_ENGINE_API_KEY"] = "k0, kz"
    assert load_settings(environ=env).api_keys == ("k0", "kz", "ka", "kb")
    from bulk_engine.config import unknown_env

    assert unknown_env(env) == []
    with pytest.raises(ConfigError, match="several keys are for one run shared through --db") \
            as info:
        load_settings(environ={"BULK_ENGINE_API_KEY": "alpha-key,beta-key"})
    assert "alpha" not in str(info.value) and "beta" not in str(info.value)
    with pytest.raises(ConfigError, match="value is not shown") as info:
        load_settings(environ={"BULK_ENGINE_DB": "mysql://u:hunter2@h/d"})
    assert "hunter2" not in str(info.value)


def test_an_engine_is_not_a_worker(tmp_path: Path) -> None:
    """Settings with a database run through PgWorker (as the command line does); an Engine
    given them refuses instead of writing a local output nobody would export; a worker needs a
    manifest and a numeric rate."""
    manifest = make_archive(tmp_path / "a", 1, seed=1)
    settings = Settings(api_key=KEYS[0], db="postgresql://u@127.0.0.1:9/d")
    with pytest.raises(ConfigError, match="PgWorker"):
        Engine(settings, manifest)
    with pytest.raises(ConfigError, match="--root is not supported with --db"):
        PgWorker(settings, None)
    with pytest.raises(ConfigError, match="--db needs --rate-limit"):
        PgWorker(settings, manifest)  # auto: one process's rate; a shared run needs the key's


# ---------------------------------------------------------------------- processes


def test_a_bad_dsn_or_a_wrong_password_exits_1_with_a_clear_message(
        tmp_path: Path, pg_cluster: PgCluster) -> None:
    """A worker and an export given a wrong password, or a DSN that is not one: exit 1, one
    line saying what to fix, no traceback, the password nowhere."""
    manifest = make_archive(tmp_path / "a", 2, seed=1)
    wrong = pg_cluster.dsn_for("bulk", password="N0t-the-Pw")
    cases = [
        (["--base-url", "http://127.0.0.1:9", "--rate-limit", "10", str(manifest)],
         {"BULK_ENGINE_DB": wrong}, "refused the password for user 'bulk'"),
        (["export", "--output", str(tmp_path / "o.jsonl")], {"BULK_ENGINE_DB": wrong},
         "refused the password for user 'bulk'"),
        ([str(manifest), "--rate-limit", "10", "--db",
          "postgresql://bulk:N0t-the-Pw@127.0.0.1:99999/x"], {}, "the database URL is not valid"),
        ([str(manifest)], {"BULK_ENGINE_DB": "http://bulk:N0t-the-Pw@h/x"},
         "db must be a postgresql://"),
    ]
    for args, env, message in cases:
        proc = cli(*args, env={"BULK_ENGINE_API_KEY": KEYS[0], **env}, cwd=tmp_path)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 1, (args, text)
        assert message in " ".join(text.split()), (args, text)
        assert "Traceback" not in text and "N0t-the-Pw" not in text, (args, text)
        assert TEST_PASSWORD not in text


def test_a_killed_workers_rows_are_taken_over_and_its_tokens_polled_not_resubmitted(
        tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str) -> None:
    """kill -9 of a worker holding live tokens: once its leases run out the other worker
    claims its rows and polls its tokens (no second analysis at the API), one line per row."""
    manifest = make_archive(tmp_path / "a", 30, seed=7)
    db = RunDb(pg_cluster, pg_dsn)
    with emulator(tmp_path, "--processing-time", "1.5:2.5") as emu:
        env = {"BULK_ENGINE_LEASE": "3"}
        victim = WorkerProcess(manifest, pg_dsn, emu.base_url, *WORKER_FLAGS, tag="victim",
                               env=env)
        workers = [victim]
        try:
            wid = holding(db, victim, 3, workers=workers)
            tokens = db.held(wid)
            survivor = WorkerProcess(manifest, pg_dsn, emu.base_url, *WORKER_FLAGS,
                                     tag="survivor", env=env)
            workers.append(survivor)
            victim.kill()
            lines = finish([survivor], tmp_path / "out.jsonl", pg_dsn, tmp_path)
            stats = emu.stats()
        finally:
            for w in workers:
                w.close()
    assert_one_right_line_per_row(lines, manifest)
    assert stats["runs_created"] == 30 and stats["duplicate_submissions"] == 0
    assert survivor.stats()["rows_resumed"] >= len(tokens)  # the victim's tokens, polled
    resumed = {r["id"] for r in lines if r["id"] in tokens}
    assert resumed == set(tokens)


def test_a_worker_paused_past_its_lease_has_its_late_writes_refused(
        tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str) -> None:
    """SIGSTOP a worker holding rows until another worker has taken them all over, then
    SIGCONT: it makes no call for them, its late results are refused (dropped), and the run
    still has exactly one line per row and one analysis per folder."""
    manifest = make_archive(tmp_path / "a", 30, seed=8)
    db = RunDb(pg_cluster, pg_dsn)
    with emulator(tmp_path, "--processing-time", "1:2") as emu:
        env = {"BULK_ENGINE_LEASE": "3"}
        paused = WorkerProcess(manifest, pg_dsn, emu.base_url, *WORKER_FLAGS, tag="paused",
                               env=env)
        workers = [paused]
        try:
            wid = holding(db, paused, 3, workers=workers)
            paused.stop()
            held = db.held(wid, "'pending', 'submitting', 'submitted'")
            other = WorkerProcess(manifest, pg_dsn, emu.base_url, *WORKER_FLAGS, tag="other",
                                  env=env)
            workers.append(other)
            wait_until(lambda: db.taken_from(wid, held), timeout=60,
                       what="the other worker to take the paused one's rows", workers=workers)
            paused.cont()
            lines = finish(workers, tmp_path / "out.jsonl", pg_dsn, tmp_path)
            stats = emu.stats()
        finally:
            for w in workers:
                w.close()
    assert_one_right_line_per_row(lines, manifest)
    assert stats["runs_created"] == 30 and stats["duplicate_submissions"] == 0
    late = paused.stats()
    assert late["lease_lapses"] >= 1 and late["rows_lost"] >= 1, late
    assert paused.events("api_calls_held") and paused.events("leases_pruned")


def test_a_worker_stopped_by_sigterm_gives_its_rows_back_at_once(
        tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str) -> None:
    """SIGTERM: the worker exits 143 and releases its leases on the way out, so another worker
    takes its live tokens over at once (the 60 s leases never have to run out)."""
    manifest = make_archive(tmp_path / "a", 20, seed=10)
    db = RunDb(pg_cluster, pg_dsn)
    with emulator(tmp_path, "--processing-time", "1.5:2.5") as emu:
        first = WorkerProcess(manifest, pg_dsn, emu.base_url, *WORKER_FLAGS, tag="first",
                              env={"BULK_ENGINE_LEASE": "60"})
        workers = [first]
        try:
            wid = holding(db, first, 3, workers=workers)
            first.proc.send_signal(signal.SIGTERM)
            assert first.wait(30) == 143
            assert db.held(wid, "'pending', 'submitting', 'submitted'") == []
            second = WorkerProcess(manifest, pg_dsn, emu.base_url, *WORKER_FLAGS, tag="second",
                                   env={"BULK_ENGINE_LEASE": "60"})
            workers.append(second)
            lines = finish([second], tmp_path / "out.jsonl", pg_dsn, tmp_path)
            stats = emu.stats()
        finally:
            for w in workers:
                w.close()
    assert_one_right_line_per_row(lines, manifest)
    assert stats["runs_created"] == 20 and second.stats()["rows_resumed"] >= 1
    assert first.events("worker_stopped")[0]["leases_released"] >= 1


def test_a_database_restart_holds_every_call_then_the_workers_carry_on(
        tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str) -> None:
    """pg_ctl stop -m immediate mid-run: both workers log that the database is unavailable
    and make no API call while they cannot reserve one; once it is back they carry on and
    the run ends with one line per row."""
    manifest = make_archive(tmp_path / "a", 40, seed=9)
    db = RunDb(pg_cluster, pg_dsn)
    with emulator(tmp_path, "--processing-time", "0.3:0.8") as emu:
        workers = [WorkerProcess(manifest, pg_dsn, emu.base_url, *WORKER_FLAGS, tag=t,
                                 env={"BULK_ENGINE_LEASE": "20"}) for t in ("a", "b")]
        try:
            started(workers)
            wait_until(lambda: db.done() >= 5, timeout=60, what="some rows done",
                       workers=workers)
            pg_cluster.stop("immediate")
            try:
                wait_until(lambda: all(w.events("db_unavailable") for w in workers),
                           timeout=30, what="both workers to see the outage", workers=workers)
                calls = _calls(emu.stats())
                # An observation, not a wait: the count of calls must not move for 2 s.
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    assert _calls(emu.stats()) == calls, "an API call while the db was down"
                    time.sleep(0.1)
            finally:
                pg_cluster.start()
            lines = finish(workers, tmp_path / "out.jsonl", pg_dsn, tmp_path)
            stats = emu.stats()
        finally:
            for w in workers:
                w.close()
    assert_one_right_line_per_row(lines, manifest)
    assert stats["runs_created"] == 40 and stats["duplicate_submissions"] == 0
    for w in workers:
        assert w.events("db_recovered"), w.log_text()[-2000:]


def _calls(stats: dict[str, Any]) -> int:
    return int(stats["submissions"] + stats["polls"] + stats["in_flight_requests"])

