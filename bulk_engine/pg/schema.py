"""The tool's tables in PostgreSQL, created and upgraded by the tool itself.

Where it sits: :meth:`bulk_engine.pg.connect.Database.connect` calls :func:`migrate` once per
process, before ``rows.py`` and ``governor.py`` use the tables.

Everything lives in the schema ``bulk_engine`` (no clash with other applications' tables).
``bulk_engine.schema_version`` lists the migrations applied. Many workers start at once, so
:func:`migrate` runs in one transaction under a transaction-level advisory lock: the first
worker applies what is missing, the others wait for it, then find nothing to do. DDL is
transactional in PostgreSQL, so a worker killed mid-migration leaves no half schema. A database
migrated by a newer bulk_engine is refused (ConfigError) rather than misread.

Tables (``MIGRATIONS[0]``, then what later migrations add):

* ``meta``: ``key_salt``, the random salt of API-key fingerprints (never a key).
* ``runs``: one per backfill (``--run NAME`` or derived from the manifest and settings), with the
  settings fingerprint and readable summary that every joining worker must match.
* ``rows``: one per manifest row of a run: what the manifest said (key, id, folder, line,
  options; bytea where a name must round-trip byte for byte), the journal state
  (pending → submitting → submitted(token) → done), the submission generation that keys the
  Idempotency-Key, the API key fingerprint the token belongs to, the outcome and the output line
  itself, the lease (owner, expiry on the database clock, fencing epoch) and the export order.
* ``workers``: who joined a run, from where, and when they last renewed.
* ``governors``: one per API key fingerprint: GCRA state on the database clock, the shared
  ``Retry-After`` pause, the 429 back-off, and the parallel-analysis window.

``MIGRATIONS[1]`` adds to ``rows`` the request identity of the last submission (``request_fp``:
what a worker that takes over a live token compares with the folder as it is now) and the id of
the ``mark_submitting`` call that set ``submitting`` (``submit_id``: a retry of that very call is
not a second POST; any other call on a row still ``submitting`` is, and flags it).

The governor's arithmetic is SQL functions (``gov_rate``, ``gov_step``, ``gov_throttled``,
``gov_pause``) so that a reservation is one ``UPDATE … RETURNING`` holding the row lock for
microseconds; ``governor.py`` holds the same arithmetic in Python for its unit tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from bulk_engine.errors import ConfigError
from bulk_engine.vocab import RowState, Status

if TYPE_CHECKING:  # connect.py imports this module to migrate: no cycle at run time
    from bulk_engine.pg.connect import Conn

__all__ = ["MIGRATIONS", "MIGRATION_LOCK", "SCHEMA", "SCHEMA_VERSION", "migrate", "schema_version"]

SCHEMA: Final = "bulk_engine"
#: Key of the advisory lock that serializes migrations (any fixed 64-bit number: "bulk_eng").
MIGRATION_LOCK: Final = 0x62756C6B5F656E67

_STATES = ", ".join(f"'{s.value}'" for s in RowState)
_OUTCOMES = ", ".join(f"'{s.value}'" for s in Status)

_V1 = f"""
CREATE TABLE bulk_engine.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO bulk_engine.meta (key, value) VALUES ('key_salt', gen_random_uuid()::text);

CREATE TABLE bulk_engine.runs (
    id                   bigserial PRIMARY KEY,
    name                 text NOT NULL UNIQUE,
    settings_fingerprint text NOT NULL,
    settings_summary     text NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    loaded_at            timestamptz,          -- a loader read the whole manifest
    rows_total           bigint,               -- rows in the manifest, once loaded
    last_done_seq        bigint NOT NULL DEFAULT 0
);

CREATE TABLE bulk_engine.rows (
    run                bigint NOT NULL REFERENCES bulk_engine.runs(id) ON DELETE CASCADE,
    key                bytea NOT NULL,         -- models.row_key, UTF-8 with surrogateescape
    id                 bytea NOT NULL,
    folder             bytea NOT NULL,         -- as written in the manifest
    line               bigint NOT NULL,        -- manifest line: the claim order
    options            text,                   -- JSON: use_case, analyse_type, payload
    path               bytea,                  -- the folder resolved on disk, once listed
    state              text NOT NULL DEFAULT 'pending' CHECK (state IN ({_STATES})),
    token              text,                   -- live retrieve token (state submitted)
    api_run_id         text,
    fingerprint        text,                   -- the folder's names, sizes, mtimes
    generation         integer NOT NULL DEFAULT 0,  -- submissions made; keys Idempotency-Key
    submitted_at       timestamptz,
    api_key_fp         text,                   -- fingerprint of the key that submitted it
    possible_duplicate boolean NOT NULL DEFAULT false,
    outcome            text CHECK (outcome IN ({_OUTCOMES})),
    error_kind         text,
    output             text,                   -- the JSONL line, without its newline
    done_at            timestamptz,
    done_seq           bigint,                 -- export order, numbered by the exporter
    lease_owner        text,
    lease_expires_at   timestamptz,            -- on the database clock
    epoch              bigint NOT NULL DEFAULT 0,  -- fencing: bumped by every claim
    claim_id           uuid,                   -- the claim that leased it (a retry finds it)
    submit_epoch       bigint,                 -- the claim that marked it submitting
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run, key),
    CHECK ((state = 'done') = (outcome IS NOT NULL AND output IS NOT NULL)),
    CHECK (state <> 'submitted' OR token IS NOT NULL)
);
-- Claims read two indexes that never hold a leased row, so a claim costs the same however
-- many rows the workers hold: rows never leased (or released), live tokens first then manifest
-- order; and leases that ran out, in expiry order (a range scan that stops at "now").
CREATE INDEX rows_free ON bulk_engine.rows (run, (state <> 'submitted'), line, key)
    WHERE state IN ('pending', 'submitting', 'submitted') AND lease_expires_at IS NULL;
CREATE INDEX rows_leased ON bulk_engine.rows (run, lease_expires_at)
    WHERE state IN ('pending', 'submitting', 'submitted') AND lease_expires_at IS NOT NULL;
-- Renewals and per-worker counts: the rows a worker holds; "any row left?" (finished()).
CREATE INDEX rows_held ON bulk_engine.rows (run, lease_owner) WHERE state <> 'done';
CREATE UNIQUE INDEX rows_done_seq ON bulk_engine.rows (run, done_seq)
    WHERE done_seq IS NOT NULL;
CREATE INDEX rows_unnumbered ON bulk_engine.rows (run, done_at)
    WHERE state = 'done' AND done_seq IS NULL;
-- The parallel-analysis window: rows whose analysis may be running, per API key.
CREATE INDEX rows_in_flight ON bulk_engine.rows (api_key_fp)
    WHERE state IN ('submitting', 'submitted');

CREATE TABLE bulk_engine.workers (
    id           text PRIMARY KEY,
    run          bigint NOT NULL REFERENCES bulk_engine.runs(id) ON DELETE CASCADE,
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    stopped_at   timestamptz
);

-- Times are seconds since the epoch on the database clock (double precision: GCRA arithmetic).
CREATE TABLE bulk_engine.governors (
    key_fp               text PRIMARY KEY,
    rate                 double precision NOT NULL CHECK (rate > 0),   -- the ceiling, calls/s
    burst                integer NOT NULL CHECK (burst >= 1),
    min_rate             double precision NOT NULL CHECK (min_rate > 0),
    tat                  double precision NOT NULL DEFAULT 0,  -- GCRA theoretical arrival time
    pause_until          double precision NOT NULL DEFAULT 0,  -- shared Retry-After
    decreased_rate       double precision,   -- the rate right after the last 429 decrease
    decreased_at         double precision NOT NULL DEFAULT 0,
    granted              bigint NOT NULL DEFAULT 0,
    throttled_events     bigint NOT NULL DEFAULT 0,
    rate_decreases       bigint NOT NULL DEFAULT 0,
    paused_seconds_total double precision NOT NULL DEFAULT 0,
    window_limit         integer CHECK (window_limit IS NULL OR window_limit >= 1),
    last_throttle_id     uuid,                 -- the last 429 report applied (a retry is a no-op)
    -- The answer to the last reservation: what the reserving UPDATE returns.
    last_granted         boolean,
    last_at              double precision,
    last_wait            double precision,
    last_rate            double precision,
    last_now             double precision,
    updated_at           timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The rate in force: the ceiling, or after a 429 the decreased rate plus 5 % of the ceiling
-- per second since (additive recovery, computed when read: no write per successful call).
CREATE FUNCTION bulk_engine.gov_rate(ceiling double precision, decreased double precision,
                                     decreased_at double precision, now double precision)
RETURNS double precision LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN decreased IS NULL THEN ceiling
                ELSE least(ceiling, decreased + 0.05 * ceiling * greatest(0, now - decreased_at))
           END
$$;

-- One reservation step (GCRA, burst included, after any pause), pure arithmetic: the
-- reserving UPDATE (governor.RESERVE_SQL) applies it to the key's row and returns its answer.
-- Grants a slot at most max_ahead seconds ahead: ok, at (when the call may go), wait (at - now);
-- otherwise not ok, and wait says when to ask again. Mirrors governor.GcraState.reserve.
CREATE FUNCTION bulk_engine.gov_step(
    tat double precision, pause_until double precision, ceiling double precision,
    burst integer, decreased double precision, decreased_at double precision,
    now double precision, max_ahead double precision,
    OUT n_tat double precision, OUT n_pause double precision, OUT ok boolean,
    OUT at double precision, OUT wait double precision, OUT rate double precision)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t double precision;
    tau double precision;
    base double precision;
    allowed double precision;
BEGIN
    rate := bulk_engine.gov_rate(ceiling, decreased, decreased_at, now);
    t := 1.0 / rate;
    tau := (burst - 1) * t;
    n_pause := least(pause_until, now + 300);  -- a clock stepped back cannot pause for ever
    -- The latest TAT a grant can leave; more means the clock stepped back: forget the excess.
    base := least(greatest(tat, now), greatest(n_pause, now + max_ahead) + tau + t);
    IF n_pause > base - tau THEN
        base := n_pause + tau;  -- after a pause the bucket holds one token, not a burst
    END IF;
    allowed := base - tau;
    ok := allowed <= now + max_ahead;
    IF ok THEN
        n_tat := base + t;
        at := greatest(allowed, now);
        wait := greatest(0.0, allowed - now);
    ELSE
        n_tat := tat;
        at := allowed;
        wait := allowed - max_ahead - now;
    END IF;
END
$$;

-- A 429: halve the rate in force (once per second across every worker), floor min_rate, and
-- drop any saved-up burst.
CREATE FUNCTION bulk_engine.gov_throttled(p_key text, p_events integer DEFAULT 1,
                                          p_now double precision DEFAULT NULL,
                                          p_report uuid DEFAULT NULL)
RETURNS TABLE (decreased boolean, rate double precision)
LANGUAGE plpgsql AS $$
DECLARE
    g bulk_engine.governors%ROWTYPE;
    v_now double precision := coalesce(p_now, extract(epoch FROM clock_timestamp()));
    v_rate double precision;
    v_new double precision;
BEGIN
    SELECT * INTO g FROM bulk_engine.governors AS x WHERE x.key_fp = p_key FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no governor for key %', p_key USING ERRCODE = 'no_data_found';
    END IF;
    v_rate := bulk_engine.gov_rate(g.rate, g.decreased_rate, g.decreased_at, v_now);
    IF p_report IS NOT NULL AND p_report = g.last_throttle_id THEN
        RETURN QUERY SELECT false, v_rate;  -- this report was applied; its answer was lost
        RETURN;
    END IF;
    UPDATE bulk_engine.governors AS x SET last_throttle_id = p_report WHERE x.key_fp = p_key;
    IF v_now - g.decreased_at < 1.0 AND v_now >= g.decreased_at THEN
        UPDATE bulk_engine.governors AS x SET throttled_events = x.throttled_events + p_events
         WHERE x.key_fp = p_key;
        RETURN QUERY SELECT false, v_rate;
        RETURN;
    END IF;
    v_new := greatest(g.min_rate, v_rate * 0.5);
    UPDATE bulk_engine.governors AS x
       SET decreased_rate = v_new, decreased_at = v_now,
           tat = greatest(x.tat, v_now + (x.burst - 1) / v_new),
           throttled_events = x.throttled_events + p_events,
           rate_decreases = x.rate_decreases + 1,
           updated_at = clock_timestamp()
     WHERE x.key_fp = p_key;
    RETURN QUERY SELECT true, v_new;
END
$$;

-- A Retry-After: hold every worker of the key until now + seconds (extends, never shortens).
CREATE FUNCTION bulk_engine.gov_pause(p_key text, p_seconds double precision,
                                      p_now double precision DEFAULT NULL)
RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    g bulk_engine.governors%ROWTYPE;
    v_now double precision := coalesce(p_now, extract(epoch FROM clock_timestamp()));
    v_until double precision;
    v_rate double precision;
BEGIN
    SELECT * INTO g FROM bulk_engine.governors AS x WHERE x.key_fp = p_key FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no governor for key %', p_key USING ERRCODE = 'no_data_found';
    END IF;
    v_until := v_now + least(greatest(p_seconds, 0), 300);
    IF v_until <= g.pause_until THEN
        RETURN g.pause_until;
    END IF;
    v_rate := bulk_engine.gov_rate(g.rate, g.decreased_rate, g.decreased_at, v_now);
    UPDATE bulk_engine.governors AS x
       SET pause_until = v_until,
           paused_seconds_total = x.paused_seconds_total + v_until - greatest(x.pause_until, v_now),
           tat = greatest(x.tat, v_now + (x.burst - 1) / v_rate),
           updated_at = clock_timestamp()
     WHERE x.key_fp = p_key;
    RETURN v_until;
END
$$;
"""

_V2 = """
ALTER TABLE bulk_engine.rows ADD COLUMN request_fp text;  -- client.request_identity, last POST
ALTER TABLE bulk_engine.rows ADD COLUMN submit_id uuid;   -- the mark_submitting call that set it
"""

#: (version, description, SQL). Append only: a released migration is never edited.
MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = (
    (1, "runs, rows, workers, governors", _V1),
    (2, "rows: request identity, submitting call id", _V2),
)
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]


async def migrate(conn: Conn) -> int:
    """Bring the database to :data:`SCHEMA_VERSION`; returns how many migrations were applied.

    Safe to call from many processes at once (advisory lock), and again and again (idempotent).
    ConfigError if the database was migrated by a newer bulk_engine.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (
                    version     integer PRIMARY KEY,
                    description text NOT NULL,
                    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp())"""
        )
        current = await conn.fetchval(
            f"SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_version")
        if current > SCHEMA_VERSION:
            raise ConfigError(
                f"the database's bulk_engine schema is version {current}, newer than this "
                f"bulk_engine understands ({SCHEMA_VERSION}): upgrade bulk_engine on this machine"
            )
        applied = 0
        for version, description, sql in MIGRATIONS:
            if version <= current:
                continue
            await conn.execute(sql)
            await conn.execute(
                f"INSERT INTO {SCHEMA}.schema_version (version, description) VALUES ($1, $2)",
                version, description,
            )
            applied += 1
        return applied


async def schema_version(conn: Conn) -> int:
    """The version the database is at (0 if the tool never migrated it)."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL",
                                 f"{SCHEMA}.schema_version")
    if not exists:
        return 0
    version = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_version")
    return int(version)
