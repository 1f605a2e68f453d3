"""The connection to the shared PostgreSQL database, and what a worker does when it is lost.

Where it sits: every other module of ``bulk_engine.pg`` (schema, rows, governor) talks to the
database through one :class:`Database` per process, opened from ``--db`` / ``BULK_ENGINE_DB``::

    Database.connect(dsn) ──▶ migrate (schema.py) ──▶ RunStore (rows.py), Governor (governor.py)

Two kinds of failure, told apart here and nowhere else:

* At startup, a wrong DSN, an unreachable server, a refused password or a missing database is
  the operator's to fix: :meth:`Database.connect` raises :class:`~bulk_engine.errors.ConfigError`
  naming what to fix (host, port, user, database) and never the password.
* Once running, losing the database (a restart, a network cut, a failover) is transient: every
  operation goes through :meth:`Database.run`, which retries connection errors with capped,
  jittered exponential backoff, logs ``db_unavailable`` once per outage (then every
  ``LOG_EVERY_S``) and ``db_recovered`` when it is back. Every operation handed to ``run`` must be
  idempotent: the statements of ``rows.py`` and ``governor.py`` are (each is one statement, fenced
  by the caller's lease, or a reservation whose loss only wastes one slot).

``Database.available`` says whether the last operation reached the database; callers that must
not act without it (the governor: no API call without a reservation) simply wait in ``run``.
``give_up_after`` bounds that wait and raises :class:`DatabaseUnavailable`.

Driver: asyncpg (see the ``pg`` package docstring for why and the figures).
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import hmac
import math
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from bulk_engine.backoff import full_jitter
from bulk_engine.errors import BulkEngineError, ConfigError
from bulk_engine.logs import get_logger

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    #: The connection an operation receives from the pool.
    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]
else:
    Conn = Any

__all__ = [
    "LOG_EVERY_S",
    "RETRYABLE",
    "RETRY_BASE_S",
    "RETRY_CAP_S",
    "Conn",
    "Database",
    "DatabaseStatistics",
    "DatabaseUnavailable",
    "DsnParts",
    "key_fingerprint",
    "parse_dsn",
    "redact_dsn",
]

log = get_logger()

_T = TypeVar("_T")

#: While the database stays away, ``db_unavailable`` is logged again this often.
LOG_EVERY_S = 30.0
RETRY_BASE_S = 0.05
RETRY_CAP_S = 2.0


class _ConnectionLost(Exception):
    """An InterfaceError on a connection that turned out closed: the connection died."""


#: Errors that mean "the connection or the server is gone for now": retried by ``run``.
#: Deadlocks and serialization failures are retried too (every operation is idempotent).
RETRYABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS (socket.gaierror)
    TimeoutError,
    _ConnectionLost,
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.CannotConnectNowError,  # 57P03: starting up, recovering
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.TooManyConnectionsError,  # 53300
    asyncpg.ConnectionDoesNotExistError,  # the connection died mid-operation
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    # "cannot switch to state N; another operation is in progress": asyncpg's protocol state
    # after the server vanished mid-operation (seen in the restart tests).
    asyncpg.InternalClientError,
)




#: At startup, errors that mean "not reachable yet" (``connect(wait_s=...)`` waits on them).
_STARTUP_TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionError,  # refused, reset (DNS failures and TLS errors are not waited on)
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,
)


class DatabaseUnavailable(BulkEngineError):
    """The database could not be reached within the caller's ``give_up_after``."""


@dataclass(frozen=True, slots=True)
class DsnParts:
    """What a DSN names, for messages: never the password."""

    host: str
    port: int
    user: str
    database: str

    def where(self) -> str:
        return f"database {self.database!r} as user {self.user!r} at {self.host}:{self.port}"


def parse_dsn(dsn: str) -> tuple[DsnParts, str | None]:
    """Check ``dsn`` is a ``postgresql://`` URL; its parts and its password (ConfigError if not).

    The host may also come from ``?host=/socket/dir``; user and database default as libpq's do.
    """
    text = dsn.strip()
    hint = "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE (in --db or BULK_ENGINE_DB)"
    try:
        url = urlsplit(text)
        port_value = url.port
    except ValueError:
        raise ConfigError(f"the database URL is not valid (bad host or port); {hint}") from None
    if url.scheme not in ("postgresql", "postgres"):
        shown = f"{url.scheme}://" if url.scheme else "no scheme"
        raise ConfigError(f"the database URL must start with postgresql://, got {shown}; {hint}")
    query = parse_qs(url.query)
    password = unquote(url.password) if url.password is not None else None
    if password is None and "password" in query:
        password = query["password"][-1]
    host = url.hostname or (query.get("host") or [""])[-1] or os.environ.get("PGHOST") or (
        "localhost")
    port = port_value or int((query.get("port") or [os.environ.get("PGPORT") or "5432"])[-1]
                             .split(",")[0] or 5432)
    user = unquote(url.username) if url.username else (
        (query.get("user") or [""])[-1] or os.environ.get("PGUSER") or getpass.getuser())
    database = unquote(url.path.lstrip("/")) or (query.get("dbname") or [""])[-1] or (
        os.environ.get("PGDATABASE") or user)
    return DsnParts(host, port, user, database), password


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ``***`` (for logs and messages)."""
    try:
        url = urlsplit(dsn)
        if url.password is None:
            return dsn.split("?", 1)[0] if "password=" in dsn else dsn
        netloc = url.netloc.replace(f":{url.password}@", ":***@", 1)
        return url._replace(netloc=netloc, query="").geturl()
    except ValueError:
        return "<an unparsable URL>"


def _scrub(text: str, password: str | None) -> str:
    """``text`` without the password, raw or URL-encoded."""
    if password:
        from urllib.parse import quote

        for form in {password, quote(password, safe=""), quote(password)}:
            text = text.replace(form, "***")
    return text


def _config_error(exc: BaseException, parts: DsnParts, password: str | None) -> ConfigError:
    """Translate a failed first connection into what the operator must fix."""
    where = parts.where()
    fix = "fix --db (or BULK_ENGINE_DB)"
    if isinstance(exc, asyncpg.InvalidPasswordError):
        msg = (f"PostgreSQL refused the password for user {parts.user!r} at "
               f"{parts.host}:{parts.port}: {fix} with the right password")
    elif isinstance(exc, asyncpg.InvalidCatalogNameError):
        msg = (f"the database {parts.database!r} does not exist at {parts.host}:{parts.port}: "
               f"create it (createdb {parts.database}) or {fix}")
    elif isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        msg = (f"PostgreSQL refused user {parts.user!r} for database {parts.database!r} at "
               f"{parts.host}:{parts.port} (no such role, or pg_hba.conf has no entry for "
               f"this host): {fix} or ask the database administrator")
    elif isinstance(exc, asyncpg.InsufficientPrivilegeError):
        msg = (f"user {parts.user!r} may not use {where}: grant it CONNECT and CREATE on the "
               f"database, or {fix}")
    elif isinstance(exc, (OSError, TimeoutError, asyncpg.PostgresConnectionError,
                          asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)):
        reason = type(exc).__name__ if not str(exc) else _scrub(str(exc), password)
        msg = (f"cannot reach PostgreSQL at {parts.host}:{parts.port} ({reason}): check the "
               f"host and port in --db (or BULK_ENGINE_DB) and that the server is running")
    elif isinstance(exc, (asyncpg.ClientConfigurationError, ValueError)):
        msg = f"the database URL is not valid ({_scrub(str(exc), password)}): {fix}"
    else:
        msg = (f"cannot use {where} ({type(exc).__name__}: {_scrub(str(exc), password)}): "
               f"{fix}")
    return ConfigError(_scrub(msg, password))


def key_fingerprint(api_key: str, salt: str) -> str:
    """HMAC-SHA256 of the API key under the database's salt, 24 hex digits. Never the key.

    The salt is random per database (``meta.key_salt``): a fingerprint says "same key" inside one
    database and nothing outside it.
    """
    mac = hmac.new(salt.encode(), api_key.encode("utf-8", "surrogateescape"), hashlib.sha256)
    return "k-" + mac.hexdigest()[:24]


@dataclass(slots=True)
class DatabaseStatistics:
    """Counters of one process's database use (for the summary and the tests)."""

    operations: int = 0
    retries: int = 0
    outages: int = 0
    unavailable_seconds: float = 0.0
    available: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Database:
    """One process's pool of connections to the shared database. Open with :meth:`connect`."""

    def __init__(self, pool: asyncpg.Pool, parts: DsnParts, *, rng: random.Random | None = None,
                 ) -> None:
        """Wrap an open pool; use :meth:`connect` instead."""
        self._pool = pool
        self.parts = parts
        self._rng = rng or random.Random()
        self._stats = DatabaseStatistics()
        self._down_since: float | None = None  # monotonic start of the current outage
        self._last_log = -math.inf
        self._key_salt: str | None = None
        self._up = asyncio.Event()
        self._up.set()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 0, max_size: int = 10,
                      connect_timeout: float = 10.0, wait_s: float = 0.0, migrate: bool = True,
                      application_name: str = "bulk_engine") -> Database:
        """Connect (and by default create or upgrade the schema); ConfigError if it cannot.

        ``wait_s``: how long to keep trying while the server is unreachable or starting up
        (workers often start before their database); a refused password, a missing database
        and the like fail at once. The error names the host, port, user and database and what
        to fix, never the password. ``min_size`` 0: no connection floor for asyncpg to restore
        (and log a traceback about) during an outage; connections open on demand.
        """
        parts, password = parse_dsn(dsn)
        settings = {"application_name": application_name}
        deadline = time.monotonic() + max(0.0, wait_s)
        rng = random.Random()
        attempt = 0
        while True:
            try:
                # One plain connection first: its error says precisely what is wrong, where a
                # pool would retry or hide it.
                probe = await asyncpg.connect(dsn, timeout=connect_timeout,
                                              server_settings=settings)
                await probe.close()
                pool = await asyncpg.create_pool(
                    dsn, min_size=min_size, max_size=max_size, timeout=connect_timeout,
                    command_timeout=60.0, server_settings=settings)
                break
            except _STARTUP_TRANSIENT as exc:
                delay = full_jitter(attempt, base=0.1, cap=RETRY_CAP_S, rng=rng)
                if time.monotonic() + delay > deadline:
                    raise _config_error(exc, parts, password) from None
                if attempt == 0:
                    log.warning("db_waiting", host=parts.host, port=parts.port,
                                error=type(exc).__name__, wait_s=wait_s)
                attempt += 1
                await asyncio.sleep(delay)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, ValueError) as exc:
                raise _config_error(exc, parts, password) from None
        db = cls(pool, parts)
        try:
            if migrate:
                from bulk_engine.pg.schema import migrate as _migrate

                async with pool.acquire() as conn:
                    await _migrate(conn)
            db._key_salt = await db.run(
                lambda c: c.fetchval("SELECT value FROM bulk_engine.meta WHERE key='key_salt'"),
                what="read the key salt", give_up_after=connect_timeout)
        except asyncpg.UndefinedTableError:
            await pool.close()
            raise ConfigError(
                f"{parts.where()} has no bulk_engine tables yet: connect once with "
                "migrate=True (any worker does) before reading it") from None
        except asyncpg.InsufficientPrivilegeError as exc:
            await pool.close()
            raise _config_error(exc, parts, password) from None
        except BaseException:
            await pool.close()
            raise
        return db

    async def close(self) -> None:
        """Close every connection (waits for the ones in use, up to 10 s)."""
        try:
            await asyncio.wait_for(self._pool.close(), 10.0)
        except TimeoutError:
            self._pool.terminate()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ state

    @property
    def available(self) -> bool:
        """False from the first failed operation of an outage until one succeeds again."""
        return self._down_since is None

    async def wait_available(self) -> None:
        """Return once an operation has reached the database again (at once if it is up)."""
        await self._up.wait()

    def statistics(self) -> DatabaseStatistics:
        s = self._stats
        s.available = self.available
        if self._down_since is not None:
            return DatabaseStatistics(
                s.operations, s.retries, s.outages,
                s.unavailable_seconds + time.monotonic() - self._down_since, False)
        return DatabaseStatistics(**asdict(s))

    def key_fingerprint(self, api_key: str) -> str:
        """The stored identity of an API key in this database (see :func:`key_fingerprint`)."""
        if self._key_salt is None:
            raise RuntimeError("the schema was not migrated on this connection")
        return key_fingerprint(api_key, self._key_salt)

    # ------------------------------------------------------------------ operations

    async def run(self, op: Callable[[Conn], Awaitable[_T]], *, what: str,
                  give_up_after: float | None = None) -> _T:
        """Run ``op`` on a pooled connection; on a connection error, wait and run it again.

        ``op`` must be idempotent: it may have committed before its answer was lost. Raises
        :class:`DatabaseUnavailable` if the database stays away ``give_up_after`` seconds
        (``None``: wait for ever, until cancelled). Other database errors propagate at once.
        """

        async def attempt() -> _T:
            async with self._pool.acquire() as conn:
                try:
                    return await op(conn)
                except asyncpg.InterfaceError:
                    # Misuse (a wrong argument count) is a bug to raise; a closed connection
                    # is an outage to wait through.
                    if conn.is_closed():
                        raise _ConnectionLost from None
                    raise

        return await self._retrying(attempt, what, give_up_after)

    @asynccontextmanager
    async def session(self, *, what: str = "use the database",
                      give_up_after: float | None = None) -> AsyncIterator[Conn]:
        """A pooled connection, waiting (with backoff) until one can be had and answers.

        Errors inside the block are not retried (a block cannot be re-run): use :meth:`run` for
        operations that must survive an outage.
        """
        conn = await self._retrying(self._checkout, what, give_up_after)
        try:
            yield conn
        finally:
            await self._pool.release(conn)

    async def _checkout(self) -> Conn:
        conn: Conn = await self._pool.acquire()
        try:
            await conn.execute("SELECT 1")
        except BaseException:
            await self._pool.release(conn)
            raise
        return conn

    async def _retrying(self, attempt: Callable[[], Awaitable[_T]], what: str,
                        give_up_after: float | None) -> _T:
        start = time.monotonic()
        n = 0
        while True:
            try:
                result = await attempt()
            except RETRYABLE as exc:
                self._note_failure(exc, what)
                delay = full_jitter(n, base=RETRY_BASE_S, cap=RETRY_CAP_S, rng=self._rng)
                n += 1
                if give_up_after is not None and time.monotonic() + delay - start > give_up_after:
                    raise DatabaseUnavailable(
                        f"the database ({self.parts.host}:{self.parts.port}) did not answer for "
                        f"{time.monotonic() - start:.1f} s while trying to {what}"
                    ) from None
                self._stats.retries += 1
                await asyncio.sleep(delay)
                continue
            self._stats.operations += 1
            self._note_success()
            return result

    def _note_failure(self, exc: BaseException, what: str) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._stats.outages += 1
            self._up.clear()
            self._last_log = -math.inf
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("db_unavailable", host=self.parts.host, port=self.parts.port,
                        error=type(exc).__name__, doing=what,
                        down_s=round(now - self._down_since, 1),
                        hint="retrying with backoff; no API call goes until the database "
                             "answers (each takes a rate slot from it)")

    def _note_success(self) -> None:
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            self._stats.unavailable_seconds += down
            self._down_since = None
            self._up.set()
            log.warning("db_recovered", host=self.parts.host, port=self.parts.port,
                        down_s=round(down, 1))

