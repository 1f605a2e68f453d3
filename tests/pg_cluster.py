"""A throwaway PostgreSQL cluster for the tests: one per test session, stopped at its end.

``PgCluster.start()`` finds the server binaries (``$BULK_ENGINE_PG_BINDIR``, ``pg_config
--bindir``, then the newest ``/usr/lib/postgresql/*/bin``), runs ``initdb`` into a fresh temporary
directory, and starts the server with its unix socket in the data directory and TCP on a free
port of 127.0.0.1 only. ``initdb`` and the server refuse to run as root, so when the tests run
as root (CI, this machine) every server command runs as the ``postgres`` user and the data
directory is chowned to it.

Authentication: the unix socket trusts the superuser (administration by the tests themselves);
TCP asks a password (scram-sha-256) of the test role ``bulk``, which owns the database ``bulk``,
so that a wrong-password test is possible and ``dsn`` looks like a real deployment's.

``restart(mode="immediate")`` (and ``stop``/``start``) are for fault tests: ``immediate`` kills
the server without a checkpoint, the same as a crash, and the next start replays the WAL.

The fixtures ``pg_cluster`` (session-wide), ``pg_dsn`` (a fresh database per test) and ``pg_db``
(a connected ``Database`` on it) are defined as ``*_fixture`` functions that test modules import;
every module shares the same server, started on first use and stopped when pytest exits. When
PostgreSQL is missing, the tests skip, except with ``CI=true``, where they fail: CI must install
it (``.ci/run`` does).

Run as a script (``python tests/pg_cluster.py governor-child ...``) it is the child process of
the multi-process governor tests (see ``governor_child``).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import pwd
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TEST_ROLE = "bulk"
TEST_PASSWORD = "s3cret-Pw-for-tests"  # a throwaway cluster's; tests check it never leaks
TEST_DB = "bulk"
SERVER_USER = "postgres"


class PostgresMissing(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def find_bindir() -> Path:
    """The directory of ``initdb``/``pg_ctl``/``postgres`` (PostgresMissing if none)."""
    candidates: list[Path] = []
    if env := os.environ.get("BULK_ENGINE_PG_BINDIR"):
        candidates.append(Path(env))
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            candidates.append(Path(out))

    def version(p: str) -> int:
        try:
            return int(Path(p).parent.name)
        except ValueError:
            return 0

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                           key=version, reverse=True)]
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file() and (c / "postgres").is_file():
            return c
    raise PostgresMissing(
        "PostgreSQL server binaries not found (looked at $BULK_ENGINE_PG_BINDIR, "
        "pg_config --bindir, /usr/lib/postgresql/*/bin); install them: apt-get install postgresql"
    )


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now (the server may still lose a race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One throwaway cluster. ``start()``, then ``dsn``; ``close()`` stops it and deletes it."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.base = Path(tempfile.mkdtemp(prefix="bulk-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = 0
        self._as_root = os.geteuid() == 0
        self._started = False

    # ---------------------------------------------------------------- commands

    def _run(self, *args: str, check: bool = True, timeout: float = 120.0
             ) -> subprocess.CompletedProcess[str]:
        """Run a server binary, as ``postgres`` when we are root."""
        kwargs: dict[str, Any] = {}
        if self._as_root:
            kwargs["user"] = SERVER_USER
            kwargs["group"] = pwd.getpwnam(SERVER_USER).pw_gid
            kwargs["extra_groups"] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        res = subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True,
                             text=True, env=env, cwd=self.base, timeout=timeout, check=False,
                             **kwargs)
        if check and res.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({res.returncode}): {res.stdout}{res.stderr}\n"
                f"server log: {self.server_log()[-2000:]}"
            )
        return res

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    # ---------------------------------------------------------------- lifecycle

    def init(self) -> None:
        """initdb into ``data``: superuser trusted on the socket, passwords over TCP."""
        if self._as_root:
            pw = pwd.getpwnam(SERVER_USER)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        os.chmod(self.base, 0o755)
        self._run("initdb", "-D", str(self.data), "-U", SERVER_USER, "--auth-local=trust",
                  "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync")
        conf = self.data / "postgresql.conf"
        # Speed for tests only; synchronous_commit stays on so that an immediate restart never
        # loses a commit that a client saw succeed (fsync=off only skips the kernel's disk sync).
        with conf.open("a") as fh:
            fh.write(
                "\nfsync = off\nfull_page_writes = off\nshared_buffers = 32MB\n"
                "max_connections = 200\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.data}'\nlog_min_messages = warning\n"
            )

    def start(self, *, attempts: int = 5) -> None:
        """Start the server on a free port (another on a lost race); waits until it accepts."""
        if not self.data.exists():
            self.init()
        last = ""
        for _ in range(attempts):
            port = self.port or free_port()
            res = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t",
                            "60", "-o", f"-p {port}", "start", check=False)
            if res.returncode == 0:
                self.port = port
                self._started = True
                return
            last = res.stdout + res.stderr + self.server_log()[-1500:]
            if self.port:  # a restart keeps its port: nothing else to try
                break
        raise RuntimeError(f"could not start PostgreSQL: {last}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean) or ``immediate`` (like a crash)."""
        if self._started:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
            self._started = False

    def restart(self, mode: str = "immediate") -> None:
        """Stop (``immediate``: no checkpoint, a crash) and start again on the same port."""
        self.stop(mode)
        self.start()

    @property
    def running(self) -> bool:
        return self._started

    def close(self) -> None:
        """Stop the server and delete its files (idempotent)."""
        try:
            if self._started:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # ---------------------------------------------------------------- access

    def psql(self, sql: str, *, db: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket; returns psql's unaligned output."""
        res = self._run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h",
                        str(self.data), "-p", str(self.port), "-U", SERVER_USER, "-d", db,
                        "-c", sql)
        return res.stdout.strip()

    def create_role_and_db(self, role: str = TEST_ROLE, password: str = TEST_PASSWORD,
                           db: str = TEST_DB) -> None:
        self.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        self.psql(f"CREATE DATABASE {db} OWNER {role}")

    def create_database(self, name: str) -> str:
        """A fresh database owned by the test role; returns its DSN."""
        self.psql(f"CREATE DATABASE {name} OWNER {TEST_ROLE}")
        return self.dsn_for(name)

    def dsn_for(self, db: str, *, password: str = TEST_PASSWORD, port: int | None = None) -> str:
        return f"postgresql://{TEST_ROLE}:{password}@127.0.0.1:{port or self.port}/{db}"

    @property
    def dsn(self) -> str:
        """The test role's DSN over TCP, with its password."""
        return self.dsn_for(TEST_DB)


# -------------------------------------------------------------------- the fixture

_cluster: PgCluster | None = None
_databases = 0


def _session_cluster(config: pytest.Config) -> PgCluster:
    """The session's cluster, started on first use; stopped when pytest unconfigures."""
    global _cluster
    if _cluster is None:
        try:
            bindir = find_bindir()
        except PostgresMissing as exc:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true and {exc}", pytrace=False)
            pytest.skip(str(exc))
        cluster = PgCluster(bindir)
        config.add_cleanup(cluster.close)
        cluster.start()
        cluster.create_role_and_db()
        _cluster = cluster
    return _cluster


@pytest.fixture(scope="session", name="pg_cluster")
def pg_cluster_fixture(request: pytest.FixtureRequest) -> PgCluster:
    """The session's throwaway PostgreSQL (skips without PostgreSQL, fails with CI=true)."""
    return _session_cluster(request.config)


@pytest.fixture(name="pg_dsn")
def pg_dsn_fixture(pg_cluster: PgCluster) -> str:
    """A fresh, empty database for one test (the tool creates its schema), as a DSN."""
    global _databases
    _databases += 1
    return pg_cluster.create_database(f"t{os.getpid()}_{_databases}")


@pytest.fixture(name="pg_db")
async def pg_db_fixture(pg_dsn: str) -> AsyncIterator[Any]:
    """A connected, migrated ``bulk_engine.pg.connect.Database`` on a fresh database."""
    from bulk_engine.pg.connect import Database

    db = await Database.connect(pg_dsn)
    try:
        yield db
    finally:
        await db.close()


async def eventually(cond: Callable[[], bool], *, timeout: float, what: str,
                     interval: float = 0.01) -> None:
    """Bounded polling from async code: until ``cond()`` holds (AssertionError after timeout)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def server_down(cluster: PgCluster, mode: str = "immediate") -> Iterator[None]:
    """Stop the server (``immediate``: like a crash) for the block; always started again."""
    cluster.stop(mode)
    try:
        yield
    finally:
        cluster.start()


# -------------------------------------------------------------------- child processes


def spawn_child(*args: str) -> subprocess.Popen[str]:
    """``python tests/pg_cluster.py ARGS``: prints ``ready``, waits for ``go`` on stdin, then
    prints one JSON document and exits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULK_ENGINE_")}
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    """One line of a child's stdout, waiting at most until ``deadline`` (monotonic)."""
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out waiting for a child process to get ready")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"child exited before it was ready: {err[-3000:]}")
            return line


@contextlib.contextmanager
def children(argv: list[list[str]], *, timeout: float) -> Iterator[list[dict[str, Any]]]:
    """Run one child per argv; start them together once all are ready; yields their results.

    Every child is reaped, whatever happens.
    """
    procs: list[subprocess.Popen[str]] = []
    try:
        procs = [spawn_child(*a) for a in argv]
        deadline = time.monotonic() + timeout
        for p in procs:
            line = _read_line(p, deadline)
            assert line.strip() == "ready", f"unexpected child output {line!r}"
        for p in procs:  # the start barrier: every child is connected and waiting
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results: list[dict[str, Any]] = []
        for p in procs:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            if p.returncode != 0:
                raise AssertionError(f"child failed ({p.returncode}): {err[-3000:]}")
            results.append(json.loads(out))
        yield results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


async def _governor_child(dsn: str, key: str, rate: float, burst: int,
                          seconds: float) -> dict[str, Any]:
    """Reserve through the shared governor as fast as it allows for ``seconds``.

    Reports every grant as ``[at, wall]``: the database-clock time of its slot and this
    machine's wall clock when ``acquire`` returned (every child runs on this machine, so wall
    times compare across children).
    """
    from bulk_engine.pg.connect import Database
    from bulk_engine.pg.governor import Governor

    db = await Database.connect(dsn, max_size=2)
    try:
        gov = await Governor.open(db, key, rate=rate, burst=burst, configure=False)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        grants: list[list[float]] = []
        stop = time.monotonic() + seconds

        async def caller() -> None:  # two per process: the local queue is never empty
            while time.monotonic() < stop:
                grant = await gov.acquire()
                grants.append([grant.at, time.time()])

        await asyncio.gather(caller(), caller())
        return {"grants": grants, "stats": gov.statistics().as_dict()}
    finally:
        await db.close()


def _main(argv: list[str]) -> int:
    if argv[:1] == ["governor-child"]:
        dsn, key, rate, burst, seconds = argv[1:6]
        result = asyncio.run(_governor_child(dsn, key, float(rate), int(burst), float(seconds)))
        print(json.dumps(result))
        return 0
    print(f"unknown role {argv!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
