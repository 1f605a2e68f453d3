"""``--db`` worker processes for the multi-worker tests, and what the tests read back.

``WorkerProcess`` runs ``python -m bulk_engine MANIFEST`` as one worker of a shared run: the
database URL and the API keys travel in the environment (``BULK_ENGINE_DB``,
``BULK_ENGINE_API_KEY``), never on argv; JSON logs go to a file beside the archive and the
end-of-run summary to ``--stats-json``. ``RunDb`` reads the run's rows as the superuser through
``psql`` (the tests never need the workers' password). Waiting is bounded polling, never a
fixed sleep; every child is reaped in ``finally`` blocks.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bulk_engine.emulator.process import EmulatorProcess, emulator_process

from conftest import expected_for_folder, read_lines
from pg_cluster import PgCluster
from procs import child_env, wait_for

KEYS = ("pg-key-one-0123456789", "pg-key-two-9876543210")
#: Worker flags for the failure tests: fast polls, a rate the emulator's 429s never see.
WORKER_FLAGS = ("--rate-limit", "40", "--burst", "2", "--poll-min", "0.3", "--poll-max", "1",
                "--concurrency", "4")


class WorkerProcess:
    """One worker child. ``extra`` are CLI flags; ``env`` more BULK_ENGINE_* settings."""

    def __init__(self, manifest: Path, dsn: str, base_url: str, *extra: str, tag: str,
                 keys: tuple[str, ...] = KEYS, env: dict[str, str] | None = None) -> None:
        self.tag = tag
        self.log_path = manifest.parent / f"worker-{tag}.log"
        self.stats_path = manifest.parent / f"worker-{tag}.json"
        cmd = [sys.executable, "-m", "bulk_engine", str(manifest), "--base-url", base_url,
               "--no-progress", "--log-format", "json", "--log-level", "info",
               "--stats-json", str(self.stats_path), *extra]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=manifest.parent,
            env=child_env(BULK_ENGINE_DB=dsn, BULK_ENGINE_API_KEY=",".join(keys),
                          **(env or {})))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.tag} still running after {timeout} s; log:\n"
                                 f"{self.log_text()[-4000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        self._log.close()

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events (of one name), skipping the summary table's lines."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if name is None or event.get("event") == name:
                    out.append(event)
        return out

    def stats(self) -> dict[str, Any]:
        """The end-of-run summary (``--stats-json``)."""
        return json.loads(self.stats_path.read_text())  # type: ignore[no-any-return]


class RunDb:
    """The shared run's rows, read as the superuser (psql over the cluster's socket)."""

    def __init__(self, cluster: PgCluster, dsn: str) -> None:
        self.cluster = cluster
        self.name = urlsplit(dsn).path.lstrip("/")

    def query(self, sql: str) -> list[list[str]]:
        out = self.cluster.psql(sql, db=self.name)
        return [line.split("|") for line in out.splitlines() if line]

    def dump(self) -> str:
        """Every table of the tool's schema, as JSON text (to look for what must not be)."""
        tables = [r[0] for r in self.query(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'bulk_engine'")]
        return "".join(self.cluster.psql(f"SELECT row_to_json(t)::text FROM bulk_engine.{t} t",
                                         db=self.name) for t in tables)

    def scalar(self, sql: str) -> int:
        rows = self.query(sql)
        return int(rows[0][0]) if rows and rows[0][0] else 0

    def tables_ready(self) -> bool:
        return bool(self.query("SELECT to_regclass('bulk_engine.rows') IS NOT NULL")[0][0] == "t")

    def worker_id(self, pid: int) -> str | None:
        rows = self.query(f"SELECT id FROM bulk_engine.workers WHERE pid = {int(pid)}")
        return rows[0][0] if rows else None

    def held(self, worker: str, states: str = "'submitted'") -> list[str]:
        """Keys ``worker`` holds under a live lease in ``states``."""
        return [r[0] for r in self.query(
            "SELECT convert_from(key, 'UTF8') FROM bulk_engine.rows "
            f"WHERE lease_owner = '{worker}' AND state IN ({states}) "
            "AND lease_expires_at > clock_timestamp()")]

    def taken_from(self, worker: str, keys: list[str]) -> bool:
        """True once none of ``keys`` is ``worker``'s any more (another worker claimed it, or it
        is done)."""
        quoted = ",".join("'" + k.replace("'", "''") + "'" for k in keys)
        return self.scalar(
            "SELECT count(*) FROM bulk_engine.rows "
            f"WHERE convert_from(key, 'UTF8') IN ({quoted}) AND lease_owner = '{worker}' "
            "AND state <> 'done'") == 0

    def done(self) -> int:
        if not self.tables_ready():
            return 0
        return self.scalar("SELECT count(*) FROM bulk_engine.rows WHERE state = 'done'")


def holding(db: RunDb, worker: WorkerProcess, n: int, *, states: str = "'submitted'",
            workers: list[WorkerProcess]) -> str:
    """Until ``worker`` holds at least ``n`` rows in ``states`` (live tokens by default) under a
    live lease; returns its id in the run."""
    def held() -> bool:
        wid = db.worker_id(worker.pid) if db.tables_ready() else None
        return wid is not None and len(db.held(wid, states)) >= n

    wait_until(held, timeout=60, what=f"worker {worker.tag} to hold {n} rows in {states}",
               workers=workers)
    wid = db.worker_id(worker.pid)
    assert wid is not None
    return wid


def wait_until(cond: Any, *, timeout: float, what: str,
               workers: list[WorkerProcess] | None = None) -> None:
    """Bounded polling; on a timeout, the workers' log tails are in the message."""
    try:
        wait_for(cond, timeout=timeout, interval=0.05, what=what)
    except AssertionError as exc:
        tails = "".join(f"\n--- worker {w.tag}:\n{w.log_text()[-2500:]}" for w in workers or [])
        raise AssertionError(f"{exc}{tails}") from None


def emulator(tmp: Path, *flags: str) -> AbstractContextManager[EmulatorProcess]:
    """The emulator in its own process, with both test keys."""
    return emulator_process(["--seed", "3", *flags], api_keys=",".join(KEYS),
                            env=child_env(), log_path=tmp / "emulator.log")


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m bulk_engine ARGS`` to completion, settings from ``env``."""
    return subprocess.run([sys.executable, "-m", "bulk_engine", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=child_env(**env))


def started(workers: list[WorkerProcess]) -> None:
    """Until every worker has joined its run (or exited)."""
    for w in workers:
        wait_until(lambda w=w: bool(w.events("worker_started")) or not w.running(), timeout=60,
                   what=f"worker {w.tag} to start", workers=workers)


def finish(workers: list[WorkerProcess], out: Path, dsn: str, tmp: Path) -> list[dict[str, Any]]:
    """Every worker exits 0; then ``export`` writes ``out``; its lines, parsed."""
    for w in workers:
        assert w.wait(90) == 0, w.log_text()[-3000:]
    proc = cli("export", "--output", str(out), env={"BULK_ENGINE_DB": dsn}, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return read_lines(out)


def folders_of(manifest: Path) -> dict[str, Path]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        return {row["id"]: manifest.parent / row["folder"] for row in csv.DictReader(fh)}


def assert_one_right_line_per_row(lines: list[dict[str, Any]], manifest: Path) -> None:
    """Exactly one line per manifest row, each completed with its own folder's result."""
    folders = folders_of(manifest)
    assert sorted(r["id"] for r in lines) == sorted(folders)  # one line per row, no other
    for rec in lines:
        assert rec["status"] == "completed", rec
        assert rec["result"] == expected_for_folder(folders[rec["id"]]), rec["id"]
