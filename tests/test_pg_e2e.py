"""End to end: three ``--db`` workers, two API keys, one backfill, every failure at once.

The emulator runs in its own process with a per-key rate limit and a cap on parallel analyses.
Three worker processes share the run; mid-run one is killed (kill -9), one is paused past its
lease (SIGSTOP, then SIGCONT once its rows were taken over) and the database is restarted
(``pg_ctl restart -m immediate``). After ``export``: exactly one line per row, each with its own
folder's result; one analysis per folder at the emulator (a same-key Idempotency-Key replay is
not a new analysis); and no call beyond either key's rate plus burst (the emulator's token
bucket answers 429 to any, and counted none).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from archive_factory import make_archive
from pg_cluster import (  # noqa: F401 - fixtures
    TEST_PASSWORD,
    PgCluster,
    pg_cluster_fixture,
    pg_dsn_fixture,
)
from pg_workers import (
    KEYS,
    RunDb,
    WorkerProcess,
    assert_one_right_line_per_row,
    emulator,
    finish,
    holding,
    started,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(240)]

ROWS = 200
RATE, KEY_BURST, WORKER_BURST = 20, 10, 2


def test_three_workers_two_keys_a_kill_a_pause_and_a_database_restart(
        tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str) -> None:
    """Every row once, with its own result; one analysis per folder; the keys' rates held."""
    manifest = make_archive(tmp_path / "a", ROWS, seed=13)
    db = RunDb(pg_cluster, pg_dsn)
    flags = ("--rate-limit", str(RATE), "--burst", str(WORKER_BURST), "--concurrency", "4",
             "--poll-min", "0.5", "--poll-max", "2", "--max-outstanding", "8")
    with emulator(tmp_path, "--rate-limit", str(RATE), "--burst", str(KEY_BURST),
                   "--max-parallel-analyses", "8", "--processing-time", "1:2") as emu:
        workers = [WorkerProcess(manifest, pg_dsn, emu.base_url, *flags, tag=tag,
                                 env={"BULK_ENGINE_LEASE": "3"}) for tag in ("a", "b", "c")]
        a, b, c = workers
        try:
            started(workers)
            holding(db, c, 2, workers=workers)
            c.kill()
            b_id = holding(db, b, 2, states="'submitting', 'submitted'", workers=workers)
            b.stop()
            held = db.held(b_id, "'pending', 'submitting', 'submitted'")
            wait_until(lambda: db.taken_from(b_id, held), timeout=60,
                       what="worker a to take worker b's rows over", workers=workers)
            b.cont()
            wait_until(lambda: db.done() >= ROWS * 2 // 3, timeout=120, what="two thirds done",
                       workers=workers)
            assert db.done() < ROWS, "the run ended before the database restart"
            # The restart, with the server kept down until a worker has seen it (a restart
            # quicker than every worker's next statement would go unnoticed: the pool
            # reconnects on its own).
            pg_cluster.stop("immediate")
            wait_until(lambda: any(w.events("db_unavailable") for w in (a, b)), timeout=60,
                       what="a worker to find the database down", workers=workers)
            pg_cluster.start()
            lines = finish([a, b], tmp_path / "results.jsonl", pg_dsn, tmp_path)
            stats, submissions = emu.stats(), emu.submissions()
        finally:
            for w in workers:
                w.close()
    assert_one_right_line_per_row(lines, manifest)
    assert stats["runs_created"] == ROWS and len({s["digest"] for s in submissions}) == ROWS
    assert stats["rate_limited"] == 0, stats
    assert sorted({s["key_index"] for s in submissions}) == [0, 1]  # both keys did work
    assert b.stats()["rows_lost"] >= 1 and a.stats()["rows_resumed"] >= 1
    # One worker at least found the database down (the restart waited for it), said so, and
    # carried on once it was back; an idle one may not have noticed (its pool reconnects).
    assert any(w.events("db_unavailable") and w.events("db_recovered") for w in (a, b))
    # The keys are stored nowhere (a salted fingerprint is) and logged nowhere; nor is the
    # database's password.
    dump, logs = db.dump(), "".join(w.log_text() for w in workers)
    assert "pg-key" not in dump and "\"api_key_fp\":\"k-" in dump
    for secret in (*KEYS, TEST_PASSWORD):
        assert secret not in logs and secret not in dump
